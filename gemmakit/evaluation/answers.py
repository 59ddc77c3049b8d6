"""Answer normalization, extraction and comparison for generation tasks.

- `normalize_answer`, `exact_match`, `token_f1`: SQuAD's normalization (lower case, punctuation
  and the articles a/an/the removed, whitespace collapsed), the best over all gold aliases, as
  the official TriviaQA and SQuAD scripts score;
- `last_number`, `gsm8k_gold`, `same_number`: GSM8K's answers (the last number of a chain of
  thought; the gold after "#### ");
- `last_boxed`, `math_equiv`: MATH's answers (the content of the last \\boxed{...}) compared
  after Hendrycks et al.'s `is_equiv` normalization combined with Minerva's
  `normalize_final_answer` (units and \\text removed, \\dfrac, \\left/\\right, spaces,
  shorthand fractions, trailing zeros of numbers);
- `after_phrase`: the text after "the answer is" (BIG-Bench Hard's chain of thought).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 when the normalized prediction equals any normalized gold alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Iterable[str]) -> float:
    """SQuAD's token F1 of the normalized texts, the best over the gold aliases (0.0 for none)."""
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(g).split()) for g in golds), default=0.0)


# --- numbers (GSM8K) ---

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def clean_number(text: str) -> str:
    """A number as a canonical string: no commas, $ or trailing period, trailing zeros of the
    fraction dropped ("1,000.50" -> "1000.5", "7.0" -> "7", "-0" -> "0")."""
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0" if text == "-0" else text
    return text


def last_number(text: str) -> str | None:
    """The last number written in `text`, cleaned (`clean_number`); None when there is none."""
    found = _NUMBER.findall(text)
    return clean_number(found[-1]) if found else None


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer: the text after its "#### ", cleaned."""
    if "####" not in answer:
        raise ValueError("a GSM8K answer ends with '#### N'")
    return clean_number(answer.split("####")[-1])


def same_number(a: str | None, b: str | None) -> bool:
    """Whether two cleaned numbers are equal (as numbers: "2.50" equals "2.5")."""
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    except ValueError:
        return a == b


# --- LaTeX (MATH) ---


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed x`) in `text`, with
    nested braces matched; None when there is none (or it is not closed)."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at:]
    if rest.startswith("\\boxed ") and not rest.startswith("\\boxed {"):
        return rest[len("\\boxed ") :].split("$")[0].strip()
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[start + 1 : i]
    return None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2} (Hendrycks' _fix_fracs)."""
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub.startswith("{"):
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b = sub[0], sub[1]
        if b != "{":
            out += "{" + a + "}{" + b + "}" + sub[2:]
        else:
            out += "{" + a + "}" + b + sub[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """ "3/4" -> \\frac{3}{4} for two integers (Hendrycks' _fix_a_slash_b)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    """\\sqrt2 -> \\sqrt{2}."""
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


_MINERVA_SUBS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]
_MINERVA_REMOVED = [
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "ft",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    r"\mathrm{th}",
    r"^\circ",
    r"^{\circ}",
    r"\;",
    r",\!",
    "{,}",
    '"',
    "\\dots",
]


def minerva_normalize(answer: str) -> str:
    """Minerva's `normalize_final_answer` (Lewkowycz et al. 2022, appendix D.1): the right side
    of an equation, units and \\text removed, $...$, \\textbf, \\boxed unwrapped, shorthand
    \\frac and \\sqrt braced, thousands commas dropped."""
    answer = answer.split("=")[-1]
    for before, after in _MINERVA_SUBS:
        answer = answer.replace(before, after)
    for expr in _MINERVA_REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


def hendrycks_strip(s: str) -> str:
    """Hendrycks et al.'s `_strip_string` (the MATH release's is_equiv normalization)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:  # units are written "\text{ cm}" in MATH's solutions
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    # Trailing zeros of a plain decimal ("2.50" -> "2.5", "3.0" -> "3"), beyond Hendrycks.
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def normalize_math(answer: str) -> str:
    """An answer in the form two equivalent MATH answers share: Minerva's normalization, then
    Hendrycks'."""
    return hendrycks_strip(minerva_normalize(answer))


def math_equiv(prediction: str | None, gold: str) -> bool:
    """Whether a predicted MATH answer equals the gold one: equal after either normalization
    (Hendrycks' alone, or Minerva's then Hendrycks'), or both plain numbers of equal value."""
    if prediction is None:
        return False
    if hendrycks_strip(prediction) == hendrycks_strip(gold):
        return True
    a, b = normalize_math(prediction), normalize_math(gold)
    if a == b:
        return True
    return bool(_NUMBER.fullmatch(a) and _NUMBER.fullmatch(b)) and same_number(
        clean_number(a), clean_number(b)
    )


def after_phrase(text: str, phrase: str = "the answer is") -> str:
    """The text after the last `phrase` (case-insensitive) up to its line's end, without a
    final period; the whole text stripped when the phrase is absent."""
    at = text.lower().rfind(phrase)
    if at < 0:
        return text.strip()
    answer = text[at + len(phrase) :].split("\n")[0].strip()
    return answer[:-1].strip() if answer.endswith(".") else answer
