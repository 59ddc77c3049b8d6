"""The embedded default corpus, generated: English-like web prose, worked arithmetic and small
Python files, plus planted bad documents (spam, boilerplate, duplicates, near-duplicates,
personal data, a blocklisted term, copies of evaluation items) so every filter has something
to catch. Deterministic for a seed; `python -m gemmakit.data.generated_corpus [DIR]` rewrites the
shipped files in gemmakit/data/corpus/."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from gemmakit.atomic import atomic_path

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS_FILES = ("web.jsonl", "math.jsonl", "code.jsonl", "eval.jsonl")  # what write_corpus writes

TOPICS = {
    "gardening": {
        "nouns": [
            "tomato",
            "seedling",
            "compost",
            "trellis",
            "greenhouse",
            "mulch",
            "orchard",
            "hedge",
            "bulb",
            "watering can",
            "raised bed",
            "pumpkin",
            "rosebush",
            "soil",
        ],
        "verbs": ["plant", "prune", "water", "harvest", "protect", "feed", "transplant"],
        "adjs": ["sunny", "fertile", "shaded", "sheltered", "damp", "sandy", "healthy"],
    },
    "cooking": {
        "nouns": [
            "bread",
            "soup",
            "oven",
            "recipe",
            "spice",
            "onion",
            "pastry",
            "skillet",
            "broth",
            "dumpling",
            "sauce",
            "loaf",
            "stew",
            "butter",
        ],
        "verbs": ["bake", "simmer", "season", "chop", "roast", "knead", "taste"],
        "adjs": ["crisp", "savory", "tender", "golden", "fragrant", "rich", "smoky"],
    },
    "travel": {
        "nouns": [
            "train",
            "harbor",
            "village",
            "museum",
            "ferry",
            "mountain pass",
            "market",
            "bridge",
            "hostel",
            "coastline",
            "cathedral",
            "valley",
            "map",
            "station",
        ],
        "verbs": ["visit", "explore", "cross", "photograph", "reach", "discover", "walk"],
        "adjs": ["quiet", "crowded", "ancient", "remote", "colorful", "windy", "charming"],
    },
    "astronomy": {
        "nouns": [
            "telescope",
            "comet",
            "nebula",
            "planet",
            "eclipse",
            "star chart",
            "moon",
            "galaxy",
            "observatory",
            "meteor",
            "orbit",
            "lens",
            "asteroid",
            "horizon",
        ],
        "verbs": ["observe", "measure", "track", "record", "predict", "map", "study"],
        "adjs": ["faint", "distant", "bright", "clear", "dark", "rare", "brilliant"],
    },
    "woodworking": {
        "nouns": [
            "chisel",
            "plank",
            "workbench",
            "joint",
            "varnish",
            "saw",
            "cabinet",
            "drawer",
            "oak board",
            "clamp",
            "dowel",
            "lathe",
            "shelf",
            "mallet",
        ],
        "verbs": ["sand", "carve", "measure", "glue", "cut", "finish", "assemble"],
        "adjs": ["smooth", "sturdy", "rough", "polished", "seasoned", "narrow", "heavy"],
    },
    "history": {
        "nouns": [
            "archive",
            "castle",
            "treaty",
            "manuscript",
            "harvest festival",
            "guild",
            "canal",
            "lighthouse",
            "mill",
            "chronicle",
            "monastery",
            "coin",
            "charter",
        ],
        "verbs": ["build", "restore", "defend", "document", "rebuild", "celebrate", "found"],
        "adjs": ["medieval", "forgotten", "famous", "royal", "modest", "busy", "local"],
    },
}
PEOPLE = [
    "Mara",
    "Tobias",
    "Elena",
    "Rafael",
    "Ingrid",
    "Kwame",
    "Priya",
    "Oskar",
    "Lucia",
    "Dmitri",
    "Aiko",
    "Fergus",
    "Noor",
    "Bruno",
    "Selma",
    "Tariq",
]
PLACES = [
    "Alderford",
    "Brindlemoor",
    "Calloway",
    "Dunmere",
    "Eastwick",
    "Fallowmere",
    "Greyhaven",
    "Hollin",
    "Ivybridge",
    "Kestrel Bay",
    "Larkspur",
    "Millbrook",
]
SENTENCES = [
    "The {adj} {noun} in {place} has become a favorite subject for anyone who likes to {verb}.",
    "{person} explained that it is easier to {verb} the {noun} when the weather is {adj}.",
    "Most people in {place} learn to {verb} long before they own a {noun} of their own.",
    "A {adj} {noun} can last for {num} years if you {verb} it with a little care.",
    "In {year}, {person} wrote a short guide about how to {verb} a {noun2} without help.",
    "There is no single right way to {verb}, but a {adj} {noun} certainly helps.",
    "Visitors often ask why the {noun} near {place} looks so {adj} in the early morning.",
    "{person} and a friend spent {num} days trying to {verb} the old {noun2}.",
    "The first step is to find a {adj} spot for the {noun}, away from the wind and noise.",
    "Experts from {place} recommend that beginners {verb} slowly and keep careful notes.",
    "It took {person} nearly {num} weeks to understand why the {noun2} kept changing.",
    "Some say the {adj} {noun2} of {place} is older than the town itself.",
    "If the {noun} starts to look tired, it may be time to {verb} it again.",
    "Every spring the people of {place} gather to {verb} together and share stories.",
    "{person} keeps a notebook with {num} pages of advice about each {noun}.",
    "You will need patience, a {adj} afternoon and perhaps a cup of tea to {verb} well.",
    "Nobody expected the {noun2} to survive the storm of {year}, yet it is still there.",
    "When you {verb} for the first time, choose a {noun} that is small and forgiving.",
    "The local club in {place} meets every Thursday to talk about the {noun} and the {noun2}.",
    "According to {person}, the secret is to {verb} a little every day instead of all at once.",
    "A visitor from {place} once said that the {noun2} was the most {adj} thing in the valley.",
    "Children enjoy helping to {verb}, especially when they are allowed to hold the {noun}.",
    "Old records show that the {noun} was moved to {place} around {year}.",
    "It is worth asking a neighbor before you {verb}, since they may have a spare {noun2}.",
]
TITLES = [
    "Notes on the {noun} of {place}",
    "How {person} learned to {verb}",
    "A {adj} week in {place}",
    "Why the {noun} matters",
    "Ten years of the {noun2}",
]


def _fill(template: str, topic: dict, rng: random.Random) -> str:
    nouns = rng.sample(topic["nouns"], 2)
    s = template.format(
        noun=nouns[0],
        noun2=nouns[1],
        verb=rng.choice(topic["verbs"]),
        adj=rng.choice(topic["adjs"]),
        place=rng.choice(PLACES),
        person=rng.choice(PEOPLE),
        num=rng.randint(2, 60),
        year=rng.randint(1650, 2020),
    )
    return s[0].upper() + s[1:]


def web_document(rng: random.Random) -> str:
    """A titled article of 2-4 paragraphs of distinct sentences on one topic (~100-200 words)."""
    topic = TOPICS[rng.choice(sorted(TOPICS))]
    title = _fill(rng.choice(TITLES), topic, rng)
    templates = rng.sample(SENTENCES, rng.randint(9, 13))
    paras, i = [], 0
    while i < len(templates):
        k = rng.randint(3, 5)
        paras.append(" ".join(_fill(t, topic, rng) for t in templates[i : i + k]))
        i += k
    return title + "\n\n" + "\n\n".join(paras)


def math_document(rng: random.Random) -> str:
    """A few worked problems: arithmetic word problems and one-step linear equations."""
    problems = []
    for k in range(rng.randint(3, 6)):
        kind = rng.choice(["add", "sub", "mul", "div", "eq"])
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        who, what = (
            rng.choice(PEOPLE),
            rng.choice(["apples", "books", "stamps", "marbles", "coins", "tickets", "pencils"]),
        )
        if kind == "add":
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have?"
            s = f"We add the two amounts: {a} + {b} = {a + b}. The answer is {a + b}."
        elif kind == "sub":
            a, b = max(a, b), min(a, b)
            q = f"{who} had {a} {what} and gave away {b}. How many {what} are left?"
            s = f"We subtract: {a} - {b} = {a - b}. The answer is {a - b}."
        elif kind == "mul":
            a = rng.randint(2, 12)
            q = f"There are {a} boxes with {b} {what} in each box. How many {what} in total?"
            s = f"We multiply: {a} * {b} = {a * b}. The answer is {a * b}."
        elif kind == "div":
            a = rng.randint(2, 12)
            q = f"{who} shares {a * b} {what} equally among {a} friends. How many does each get?"
            s = f"We divide: {a * b} / {a} = {b}. The answer is {b}."
        else:
            x, m = rng.randint(1, 30), rng.randint(2, 9)
            q = f"Solve for x: {m}x + {a} = {m * x + a}."
            s = (
                f"Subtract {a} from both sides to get {m}x = {m * x}. "
                f"Then divide both sides by {m}, so x = {x}."
            )
        problems.append(f"Problem {k + 1}. {q}\nSolution. {s}")
    return "\n\n".join(problems)


CODE_FUNCS = [
    'def {name}(values):\n    """Return the sum of the {thing} in values."""\n    total = 0\n'
    "    for v in values:\n        total += v\n    return total\n",
    'def {name}(n):\n    """Return the first n Fibonacci numbers."""\n    out = [0, 1]\n'
    "    while len(out) < n:\n        out.append(out[-1] + out[-2])\n    return out[:n]\n",
    'def {name}(x, low={a}, high={b}):\n    """Clamp x to the range [low, high]."""\n'
    "    return max(low, min(high, x))\n",
    'def {name}(text):\n    """Count the words in text, by {thing}."""\n    counts = {{}}\n'
    "    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n"
    "    return counts\n",
    'def {name}(n):\n    """Return True if n is a prime number."""\n    if n < 2:\n'
    "        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n"
    "            return False\n    return True\n",
    'def {name}(s):\n    """Return s reversed."""\n    return s[::-1]\n',
    'def {name}(items, size={a}):\n    """Split items into chunks of the given size."""\n'
    "    return [items[i : i + size] for i in range(0, len(items), size)]\n",
    'class {cname}:\n    """A counter of {thing} with a limit of {b}."""\n\n'
    "    def __init__(self):\n        self.count = 0\n\n    def add(self, k=1):\n"
    "        self.count = min({b}, self.count + k)\n        return self.count\n",
    'def {name}(a, b):\n    """Return the greatest common divisor of a and b."""\n'
    "    while b:\n        a, b = b, a % b\n    return a\n",
    'def {name}(path):\n    """Read a file of {thing} and return its non-empty lines."""\n'
    "    with open(path) as f:\n        return [line.strip() for line in f if line.strip()]\n",
    'def {name}(celsius):\n    """Convert a temperature from Celsius to Fahrenheit."""\n'
    "    return celsius * 9 / 5 + 32\n",
    'def {name}(values):\n    """Return the mean of values, or {a} for an empty list."""\n'
    "    if not values:\n        return {a}\n    return sum(values) / len(values)\n",
]
NAME_PARTS = [
    "total",
    "count",
    "find",
    "make",
    "get",
    "load",
    "split",
    "merge",
    "scan",
    "score",
    "check",
    "build",
    "clean",
    "parse",
    "track",
    "rank",
]
THINGS = ["apples", "orders", "scores", "pages", "visits", "tokens", "rows", "events"]


def code_document(rng: random.Random) -> str:
    """A small Python module: a docstring and 2-4 functions or classes."""
    parts = [f'"""Helpers for {rng.choice(THINGS)} in the {rng.choice(PLACES)} project."""\n']
    for t in rng.sample(CODE_FUNCS, rng.randint(2, 4)):
        name = "_".join(rng.sample(NAME_PARTS, 2)) + "_" + rng.choice(THINGS)
        cname = "".join(w.title() for w in name.split("_"))
        parts.append(
            t.format(
                name=name,
                cname=cname,
                thing=rng.choice(THINGS),
                a=rng.randint(1, 9),
                b=rng.randint(10, 99),
            )
        )
    return "\n\n".join(parts)


def eval_items(rng: random.Random, n: int = 24) -> list[dict]:
    """A stand-in evaluation set: question/answer items with invented names."""
    items = []
    for i in range(n):
        who, place, topic = rng.choice(PEOPLE), rng.choice(PLACES), rng.choice(sorted(TOPICS))
        thing = rng.choice(TOPICS[topic]["nouns"])
        year = rng.randint(1700, 1990)
        q = (
            f"According to the parish register of {place}, in which year did {who} the "
            f"younger first present a {thing} at the winter fair held beside the river gate?"
        )
        items.append({"id": f"evalset-{i}", "question": q, "answer": str(year)})
    return items


# ---- planted bad documents: each is meant to be caught by one named stage or rule


def bad_web_documents(rng: random.Random, good: list[str], evals: list[dict]) -> list[dict]:
    words = "sale deal cheap discount offer price bargain shop store outlet".split()
    bad = {
        "spam-repeated-lines": "\n".join(["BUY NOW!!! Cheap watches, best price, click here"] * 12),
        "too-short": "Click here to subscribe to our newsletter.",
        "bullets": "\n".join(
            f"• {rng.choice(words)} {rng.choice(words)} item number {i}" for i in range(20)
        ),
        "ellipsis": "\n".join(
            f"{_fill(rng.choice(SENTENCES), TOPICS['travel'], rng)[:-1]} and "
            f"then the story continues with more details that follow..."
            for _ in range(6)
        ),
        "hashtags": " ".join(
            f"#{rng.choice(words)} great {rng.choice(words)} today" for _ in range(20)
        ),
        "numbers-table": "\n".join(
            " ".join(str(rng.randint(100, 9999)) for _ in range(8)) for _ in range(10)
        ),
        "lorem-ipsum": "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " + good[0],
        "no-stop-words": " ".join(
            rng.choice(
                words + ["flights", "hotels", "cruise", "rental", "tickets", "coupons", "vouchers"]
            )
            for _ in range(80)
        ),
        "repeated-phrase": "Welcome to our page. "
        + " ".join(["best cheap price deal"] * 30)
        + " Thanks for visiting, we hope you enjoy the offers and come back again soon.",
    }
    out = [{"id": f"web-bad-{k}", "text": v} for k, v in bad.items()]
    for i in range(3):  # exact duplicates up to case and whitespace
        out.append({"id": f"web-dup-exact-{i}", "text": "  " + good[i + 1].upper() + "\n"})
    for i in range(3):  # near duplicates: a few words changed
        words_i = good[i + 10].split(" ")
        for j in range(0, len(words_i), 45):
            words_i[j] = "truly"
        out.append({"id": f"web-dup-near-{i}", "text": " ".join(words_i)})
    pii = [
        "Contact the organisers at hello.events@example.org or call (555) 201-7788 for tickets.",
        "Payment was taken from card 4539 1488 0343 6467 and the receipt sent to 10.42.7.19.",
        "Our mirror lives at 2001:db8:85a3::8a2e:370:7334, and the owner's SSN is 219-09-9999.",
        "Reach Priya on +44 20 7946 0958 or priya.k@example.co.uk before the end of the week.",
    ]
    for i, line in enumerate(pii):
        out.append({"id": f"web-pii-{i}", "text": web_document(rng) + "\n\n" + line})
    for i in range(2):  # fresh articles, so that only the blocklist can catch them
        out.append(
            {
                "id": f"web-blocklisted-{i}",
                "text": web_document(rng).replace(".", " and a zorblax appeared.", 1),
            }
        )
    for i in range(2):
        out.append(
            {
                "id": f"web-eval-copy-{i}",
                "text": web_document(rng)
                + "\n\nQuiz: "
                + evals[i]["question"]
                + " Answer: "
                + evals[i]["answer"],
            }
        )
    return out


def generate(seed: int = 0, n_web: int = 160, n_math: int = 90, n_code: int = 70) -> dict:
    """{name: list of records} for web, math, code (good documents, then the planted bad ones,
    so a duplicate always comes after its original) and eval (a stand-in evaluation set)."""
    rng = random.Random(seed)
    evals = eval_items(rng)
    web = [web_document(rng) for _ in range(n_web)]
    math = [math_document(rng) for _ in range(n_math)]
    code = [code_document(rng) for _ in range(n_code)]
    web_recs = [{"id": f"web-{i}", "text": t} for i, t in enumerate(web)]
    web_recs += bad_web_documents(rng, web, evals)
    math_recs = [{"id": f"math-{i}", "text": t} for i, t in enumerate(math)]
    math_recs += [
        {"id": "math-bad-digits", "text": " ".join(str(rng.randint(0, 99)) for _ in range(80))},
        {"id": "math-dup-exact-0", "text": math[5]},
        {"id": "math-eval-copy-0", "text": math_document(rng) + "\n\n" + evals[2]["question"]},
    ]
    code_recs = [{"id": f"code-{i}", "text": t} for i, t in enumerate(code)]
    code_recs += [
        {
            "id": "code-bad-minified",
            "text": "; ".join(f"value_{i} = compute(item_{i})" for i in range(100)),
        },
        {"id": "code-bad-generated", "text": "\n".join(["    pass  # TODO: generated stub"] * 40)},
        {"id": "code-dup-exact-0", "text": code[3]},
    ]
    return {"web": web_recs, "math": math_recs, "code": code_recs, "eval": evals}


def write_corpus(directory: str | Path = CORPUS_DIR, seed: int = 0) -> dict[str, Path]:
    """Write web.jsonl, math.jsonl, code.jsonl and eval.jsonl (CORPUS_FILES) into `directory`,
    each atomically, replacing files of those names."""
    directory = Path(directory)
    out = {}
    for name, records in generate(seed).items():
        path = directory / f"{name}.jsonl"
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        out[name] = path
    return out


if __name__ == "__main__":
    for name, path in write_corpus(sys.argv[1] if len(sys.argv) > 1 else CORPUS_DIR).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
