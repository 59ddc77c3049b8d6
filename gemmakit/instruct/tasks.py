"""Simple tasks a small pretrained model can do, with their answers written by code: name
things of a category, list the days or months, describe a common object, give a synonym or an
opposite, repeat a phrase, answer a fact from the tables below.

`sample_task(rng)` returns a Task: the request text and the answer as `units` (the items of a
list, or the sentences of a description), which generate.py renders under the instructions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

CATEGORIES: dict[str, list[str]] = {
    "colors": [
        "red",
        "blue",
        "green",
        "yellow",
        "orange",
        "purple",
        "pink",
        "brown",
        "black",
        "white",
        "gray",
    ],
    "animals": [
        "dog",
        "cat",
        "horse",
        "cow",
        "lion",
        "tiger",
        "bear",
        "rabbit",
        "mouse",
        "sheep",
        "goat",
        "duck",
        "fox",
        "wolf",
        "frog",
    ],
    "fruits": [
        "apple",
        "banana",
        "grape",
        "pear",
        "peach",
        "cherry",
        "lemon",
        "mango",
        "plum",
        "melon",
        "strawberry",
        "kiwi",
    ],
    "vegetables": [
        "carrot",
        "potato",
        "onion",
        "tomato",
        "pea",
        "bean",
        "cabbage",
        "lettuce",
        "pepper",
        "corn",
        "cucumber",
        "spinach",
    ],
    "countries": [
        "France",
        "Spain",
        "Italy",
        "Germany",
        "Japan",
        "China",
        "India",
        "Brazil",
        "Canada",
        "Mexico",
        "Egypt",
        "Kenya",
    ],
    "sports": [
        "soccer",
        "tennis",
        "golf",
        "swimming",
        "running",
        "basketball",
        "baseball",
        "hockey",
        "cycling",
        "boxing",
    ],
    "musical instruments": [
        "piano",
        "guitar",
        "violin",
        "drum",
        "flute",
        "trumpet",
        "harp",
        "cello",
    ],
    "things found in a kitchen": [
        "spoon",
        "fork",
        "knife",
        "plate",
        "cup",
        "pot",
        "pan",
        "oven",
        "kettle",
        "bowl",
    ],
}

SEQUENCES: dict[str, list[str]] = {
    "days of the week": [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ],
    "months of the year": [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
    "seasons of the year": ["spring", "summer", "autumn", "winter"],
}

# Two plain sentences about each object.
OBJECTS: dict[str, tuple[str, str]] = {
    "an apple": ("An apple is a round fruit that grows on trees.", "It can be red or green."),
    "a chair": ("A chair is a seat for one person.", "It usually has four legs and a back."),
    "a book": ("A book is a set of printed pages bound together.", "People read books to learn."),
    "a cup": ("A cup is a small open container for drinks.", "It often has a handle."),
    "a bicycle": ("A bicycle is a vehicle with two wheels.", "You ride it by pushing pedals."),
    "a clock": ("A clock is a device that shows the time.", "It has hands or a screen."),
    "a tree": ("A tree is a tall plant with a wooden trunk.", "Its branches hold many leaves."),
    "a pencil": ("A pencil is a tool for writing and drawing.", "Its mark can be erased."),
    "a house": ("A house is a building where people live.", "It has walls and a roof."),
    "a dog": (
        "A dog is a friendly animal that people keep as a pet.",
        "It barks and wags its tail.",
    ),
    "the sun": (
        "The sun is the star at the center of our solar system.",
        "It gives us light and heat.",
    ),
    "a car": ("A car is a vehicle with four wheels and an engine.", "People drive cars on roads."),
    "a phone": (
        "A phone is a device for talking to people far away.",
        "Many phones have a screen.",
    ),
    "a table": (
        "A table is a piece of furniture with a flat top.",
        "People eat and work at tables.",
    ),
    "a key": ("A key is a small piece of metal that opens a lock.", "People carry keys on a ring."),
    "an umbrella": (
        "An umbrella keeps you dry in the rain.",
        "It folds up when you do not need it.",
    ),
    "a river": (
        "A river is a large stream of water that flows to the sea.",
        "Fish live in rivers.",
    ),
    "a banana": ("A banana is a long yellow fruit.", "You peel it before you eat it."),
    "a window": (
        "A window is an opening in a wall that lets in light.",
        "It is usually made of glass.",
    ),
    "a shoe": (
        "A shoe is something you wear on your foot.",
        "It protects your foot when you walk.",
    ),
}

SYNONYMS = {
    "happy": "glad",
    "big": "large",
    "small": "little",
    "fast": "quick",
    "begin": "start",
    "smart": "clever",
    "angry": "mad",
    "easy": "simple",
    "rich": "wealthy",
    "hard": "difficult",
    "tired": "sleepy",
    "scared": "afraid",
    "quiet": "silent",
    "pretty": "beautiful",
    "shut": "close",
    "gift": "present",
    "road": "street",
    "sick": "ill",
}

OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "day": "night",
    "open": "closed",
    "light": "dark",
    "happy": "sad",
    "old": "new",
    "wet": "dry",
    "early": "late",
    "full": "empty",
    "left": "right",
    "hard": "soft",
    "top": "bottom",
    "loud": "quiet",
}

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "England": "London",
    "Russia": "Moscow",
    "China": "Beijing",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
}

COLORS_OF = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "a banana": "yellow",
    "coal": "black",
    "a ripe tomato": "red",
    "an orange": "orange",
    "milk": "white",
    "a lemon": "yellow",
    "a frog": "green",
}

SOUNDS = {
    "a dog": "barks",
    "a cat": "meows",
    "a cow": "moos",
    "a duck": "quacks",
    "a lion": "roars",
    "a sheep": "bleats",
    "a horse": "neighs",
    "an owl": "hoots",
    "a snake": "hisses",
    "a bee": "buzzes",
}

PHRASES = [
    "the quick brown fox",
    "good morning to you",
    "a cup of hot tea",
    "the cat sat on the mat",
    "time to go home",
    "a bright sunny day",
    "the river runs to the sea",
    "bread and butter",
    "a walk in the park",
    "the early bird",
    "slow and steady",
    "the big red ball",
]

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


@dataclass
class Task:
    """One task instance.

    request: the user's request ("Name three colors."); units: the answer's parts (list items,
    or sentences); is_list: units are items (rendered "a, b and c" in a sentence) rather than
    sentences; lead: for lists, the words before the items in sentence form ("Three colors
    are"); title: a title for <<...>>; pool: more items of the same kind (for keywords to
    include or avoid); kind: the task's name.
    """

    kind: str
    request: str
    units: list[str]
    is_list: bool
    title: str
    lead: str = ""
    pool: list[str] = field(default_factory=list)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _name_things(rng: random.Random) -> Task:
    category = rng.choice(sorted(CATEGORIES))
    n = rng.randint(2, 5)
    items = rng.sample(CATEGORIES[category], n)
    request = rng.choice(["Name {n} {c}.", "List {n} {c}.", "Give me {n} {c}."])
    return Task(
        "name_things",
        request.format(n=NUMBER_WORDS[n], c=category),
        items,
        True,
        f"{NUMBER_WORDS[n]} {category}",
        lead=f"{_cap(NUMBER_WORDS[n])} {category} are",
        pool=[x for x in CATEGORIES[category] if x not in items],
    )


def _sequence(rng: random.Random) -> Task:
    name = rng.choice(sorted(SEQUENCES))
    items = SEQUENCES[name]
    request = rng.choice(["List the {s}.", "Name the {s} in order.", "What are the {s}?"])
    return Task("sequence", request.format(s=name), list(items), True, name, f"The {name} are")


def _describe(rng: random.Random) -> Task:
    thing = rng.choice(sorted(OBJECTS))
    n = rng.choice([1, 2])
    request = rng.choice(["Describe {t}.", "What is {t}?", "Tell me about {t}."])
    return Task(
        "describe", request.format(t=thing), list(OBJECTS[thing][:n]), False, f"about {thing}"
    )


def _word_pair(rng: random.Random) -> Task:
    if rng.random() < 0.5:
        word = rng.choice(sorted(SYNONYMS))
        request = rng.choice(["Give a synonym for {w}.", "What is another word for {w}?"])
        answer = f"A synonym for {word} is {SYNONYMS[word]}."
        title = f"synonym for {word}"
    else:
        word = rng.choice(sorted(OPPOSITES))
        request = rng.choice(["What is the opposite of {w}?", "Give the opposite of {w}."])
        answer = f"The opposite of {word} is {OPPOSITES[word]}."
        title = f"opposite of {word}"
    return Task("word_pair", request.format(w=word), [answer], False, title)


def _fact(rng: random.Random) -> Task:
    which = rng.randrange(3)
    if which == 0:
        country = rng.choice(sorted(CAPITALS))
        request = rng.choice(["What is the capital of {x}?", "Name the capital of {x}."])
        answer, title = f"The capital of {country} is {CAPITALS[country]}.", f"capital of {country}"
        request = request.format(x=country)
    elif which == 1:
        thing = rng.choice(sorted(COLORS_OF))
        request = rng.choice(["What color is {x}?", "Tell me the color of {x}."]).format(x=thing)
        answer, title = f"{_cap(thing)} is {COLORS_OF[thing]}.", f"the color of {thing}"
    else:
        animal = rng.choice(sorted(SOUNDS))
        request = rng.choice(["What sound does {x} make?", "How does {x} sound?"]).format(x=animal)
        answer, title = f"{_cap(animal)} {SOUNDS[animal]}.", f"the sound of {animal.split()[-1]}"
    return Task("fact", request, [answer], False, title)


def _repeat(rng: random.Random) -> Task:
    phrase = rng.choice(PHRASES)
    request = rng.choice(['Repeat this phrase: "{p}".', 'Say "{p}" back to me.']).format(p=phrase)
    return Task("repeat", request, [_cap(phrase) + "."], False, phrase)


TASKS = {
    "name_things": _name_things,
    "sequence": _sequence,
    "describe": _describe,
    "word_pair": _word_pair,
    "fact": _fact,
    "repeat": _repeat,
}


def sample_task(rng: random.Random, kinds: list[str] | None = None) -> Task:
    """A random task (of one of `kinds`, default any), drawn with `rng` alone."""
    kind = rng.choice(kinds or sorted(TASKS))
    return TASKS[kind](rng)
