"""Verifiable instructions in the spirit of IFEval (Zhou et al. 2023): each one a small frozen
dataclass holding its parameters, with a few prompt phrasings and `check(response) -> bool`.

The ids and keyword-argument names are IFEval's (`length_constraints:number_words` with
`num_words` and `relation`, ...), so the rows of IFEval's own `input_data.jsonl` build these
checkers as they are. Two ids are gemmakit's extensions (EXTENSIONS:
`detectable_format:json_key`, `startend:start_checker`). Where IFEval calls nltk or langdetect,
this module counts with plain rules, documented on each checker:

- words are runs of `\\w` characters (IFEval's RegexpTokenizer(r"\\w+"), identical);
- sentences end at `.`, `!` or `?` followed by space or the end, except after common
  abbreviations, single initials and inside decimals (IFEval: nltk's punkt);
- the two case checkers check the case only (IFEval also asks langdetect for English);
- `relation` takes IFEval's "less than" and "at least", and also "at most" and "exactly".
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from gemmakit.errors import DataError, MissingPackageError

RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "less than": lambda n, k: n < k,
    "at most": lambda n, k: n <= k,
    "exactly": lambda n, k: n == k,
    "at least": lambda n, k: n >= k,
}

# Words whose trailing period does not end a sentence (lower case, without the period).
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "st",
    "jr",
    "sr",
    "inc",
    "ltd",
    "co",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "no",
    "fig",
    "approx",
}


def count_words(text: str) -> int:
    """Number of runs of word characters (`\\w+`), as IFEval counts words."""
    return len(re.findall(r"\w+", text))


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`: a sentence ends at `.`, `!` or `?` (or a run of them, with any
    closing quotes or brackets) followed by whitespace or the end of the text; a period after
    an abbreviation (Mr., e.g.), a single letter (J. Smith) or between digits (3.5) does not end
    one. Pieces without a word character (a lone bullet mark) are not sentences."""
    sentences: list[str] = []
    start = 0
    for m in re.finditer(r"[.!?]+[\"'”’)\]]*(?=\s|$)", text):
        before = text[start : m.start()].split()
        last = before[-1].lower().rstrip(".") if before else ""
        if m.group().startswith(".") and len(m.group()) == 1:
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue
        sentences.append(text[start : m.end()].strip())
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if re.search(r"\w", s)]


def count_sentences(text: str) -> int:
    """len(split_sentences(text))."""
    return len(split_sentences(text))


def _check_relation(relation: str) -> None:
    if relation not in RELATIONS:
        raise DataError(f"relation: {relation!r} is not one of {', '.join(RELATIONS)}")


_COUNTED = "word|sentence|bullet point|paragraph|placeholder|section|time"


class Instruction:
    """A verifiable instruction: `id` (IFEval's), `phrasings` (prompt texts, str.format'ed with
    the instance's fields), `describe(variant)` and `check(response)`."""

    id: ClassVar[str]
    phrasings: ClassVar[tuple[str, ...]]

    def kwargs(self) -> dict[str, Any]:
        """The parameters, as IFEval's `kwargs` entry for this instruction."""
        return asdict(self)  # type: ignore[call-overload]

    def describe(self, variant: int = 0) -> str:
        """Prompt text for this instruction; `variant` picks one of the phrasings (mod len)."""
        fmt = self.phrasings[variant % len(self.phrasings)]
        text = fmt.format(**self._format_args())
        # "exactly 1 bullet points" -> "exactly 1 bullet point"
        return re.sub(rf"\b1 ((?:markdown )?(?:{_COUNTED}))s\b", r"1 \1", text)

    def _format_args(self) -> dict[str, Any]:
        return self.kwargs()

    def check(self, response: str) -> bool:
        """True when `response` follows the instruction."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """{"id", "kwargs"}: how the SFT rows record the instruction."""
        return {"id": self.id, "kwargs": self.kwargs()}


REGISTRY: dict[str, type[Instruction]] = {}


def register(cls: type[Instruction]) -> type[Instruction]:
    REGISTRY[cls.id] = cls
    return cls


def _quoted_list(words: tuple[str, ...] | list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# ---- keywords -------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class KeywordsExistence(Instruction):
    """Every keyword appears somewhere in the response (case-insensitive substring)."""

    id = "keywords:existence"
    phrasings = (
        "Include the keyword{s} {words} in the response.",
        "Make sure to use the word{s} {words}.",
        "Your answer must mention {words}.",
    )
    keywords: tuple[str, ...]

    def _format_args(self) -> dict[str, Any]:
        return {"words": _quoted_list(self.keywords), "s": "s" if len(self.keywords) > 1 else ""}

    def kwargs(self) -> dict[str, Any]:
        return {"keywords": list(self.keywords)}

    def check(self, response: str) -> bool:
        return all(re.search(re.escape(k), response, re.IGNORECASE) for k in self.keywords)


@register
@dataclass(frozen=True)
class KeywordsForbidden(Instruction):
    """No forbidden word appears as a whole word (case-insensitive)."""

    id = "keywords:forbidden_words"
    phrasings = (
        "Do not include the keyword{s} {words} in the response.",
        "Do not use the word{s} {words}.",
        "Avoid the word{s} {words} in your answer.",
    )
    forbidden_words: tuple[str, ...]

    def _format_args(self) -> dict[str, Any]:
        s = "s" if len(self.forbidden_words) > 1 else ""
        return {"words": _quoted_list(self.forbidden_words), "s": s}

    def kwargs(self) -> dict[str, Any]:
        return {"forbidden_words": list(self.forbidden_words)}

    def check(self, response: str) -> bool:
        return not any(
            re.search(rf"\b{re.escape(w)}\b", response, re.IGNORECASE) for w in self.forbidden_words
        )


@register
@dataclass(frozen=True)
class KeywordFrequency(Instruction):
    """`keyword` (case-insensitive substring) occurs `relation` `frequency` times."""

    id = "keywords:frequency"
    phrasings = (
        "In your response, the word {keyword} should appear {relation} {frequency} times.",
    )
    keyword: str
    frequency: int
    relation: str = "at least"

    def __post_init__(self) -> None:
        _check_relation(self.relation)

    def check(self, response: str) -> bool:
        n = len(re.findall(re.escape(self.keyword.strip()), response, re.IGNORECASE))
        return RELATIONS[self.relation](n, self.frequency)


@register
@dataclass(frozen=True)
class LetterFrequency(Instruction):
    """The letter (case-insensitive) occurs `let_relation` `let_frequency` times."""

    id = "keywords:letter_frequency"
    phrasings = (
        "In your response, the letter {letter} should appear {let_relation} {let_frequency} times.",
    )
    letter: str
    let_frequency: int
    let_relation: str = "at least"

    def __post_init__(self) -> None:
        _check_relation(self.let_relation)

    def check(self, response: str) -> bool:
        n = Counter(response.lower())[self.letter.lower()]
        return RELATIONS[self.let_relation](n, self.let_frequency)


@register
@dataclass(frozen=True)
class ResponseLanguage(Instruction):
    """The whole response is in `language` (ISO 639-1), by langdetect as in IFEval (the one
    checker that needs an extra package: `pip install langdetect`)."""

    id = "language:response_language"
    phrasings = ("Your ENTIRE response should be in {language} language, no other language.",)
    language: str

    def check(self, response: str) -> bool:
        try:
            import langdetect
        except ImportError as e:
            raise MissingPackageError(f"{self.id} needs langdetect: pip install langdetect") from e
        try:
            return langdetect.detect(response) == self.language
        except langdetect.LangDetectException:
            return True  # IFEval counts an undetectable text as followed


# ---- length ---------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class NumberOfWords(Instruction):
    """The number of words (see count_words) is `relation` `num_words`."""

    id = "length_constraints:number_words"
    phrasings = (
        "Answer with {relation} {num_words} words.",
        "Respond in {relation} {num_words} words.",
        "Your answer must be {relation} {num_words} words long.",
    )
    num_words: int
    relation: str = "at least"

    def __post_init__(self) -> None:
        _check_relation(self.relation)

    def check(self, response: str) -> bool:
        return RELATIONS[self.relation](count_words(response), self.num_words)


@register
@dataclass(frozen=True)
class NumberOfSentences(Instruction):
    """The number of sentences (see split_sentences) is `relation` `num_sentences`."""

    id = "length_constraints:number_sentences"
    phrasings = (
        "Your response should contain {relation} {num_sentences} sentences.",
        "Answer in {relation} {num_sentences} sentences.",
        "Write {relation} {num_sentences} sentences.",
    )
    num_sentences: int
    relation: str = "at least"

    def __post_init__(self) -> None:
        _check_relation(self.relation)

    def check(self, response: str) -> bool:
        return RELATIONS[self.relation](count_sentences(response), self.num_sentences)


def _split_paragraphs(response: str) -> list[str] | None:
    """Paragraphs separated by a `***` line; None when an inner paragraph is empty."""
    parts = re.split(r"\s?\*\*\*\s?", response)
    kept = []
    for i, p in enumerate(parts):
        if p.strip():
            kept.append(p)
        elif 0 < i < len(parts) - 1:
            return None
    return kept


@register
@dataclass(frozen=True)
class NumberOfParagraphs(Instruction):
    """Exactly `num_paragraphs` non-empty paragraphs separated by the markdown divider `***`."""

    id = "length_constraints:number_paragraphs"
    phrasings = (
        "There should be {num_paragraphs} paragraphs, separated by the markdown divider ***.",
        "Write {num_paragraphs} paragraphs and put a line with *** between them.",
    )
    num_paragraphs: int

    def check(self, response: str) -> bool:
        paragraphs = _split_paragraphs(response)
        return paragraphs is not None and len(paragraphs) == self.num_paragraphs


@register
@dataclass(frozen=True)
class NthParagraphFirstWord(Instruction):
    """Exactly `num_paragraphs` paragraphs separated by blank lines, paragraph `nth_paragraph`
    (from 1) starting with `first_word` (case-insensitive, leading quotes and trailing
    punctuation ignored)."""

    id = "length_constraints:nth_paragraph_first_word"
    phrasings = (
        "There should be {num_paragraphs} paragraphs, separated by blank lines. "
        "Paragraph {nth_paragraph} must start with the word {first_word}.",
    )
    num_paragraphs: int
    nth_paragraph: int
    first_word: str

    def check(self, response: str) -> bool:
        paragraphs = [p.strip() for p in response.split("\n\n") if p.strip()]
        if len(paragraphs) != self.num_paragraphs or not (
            1 <= self.nth_paragraph <= len(paragraphs)
        ):
            return False
        word = paragraphs[self.nth_paragraph - 1].split()[0].lstrip("'\"")
        word = re.split(r"[.,?!'\"]", word)[0]
        return word.lower() == self.first_word.lower()


# ---- content --------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class NumberOfPlaceholders(Instruction):
    """At least `num_placeholders` placeholders in square brackets, like [address]."""

    id = "detectable_content:number_placeholders"
    phrasings = (
        "The response must contain at least {num_placeholders} placeholders in square "
        "brackets, such as [address].",
    )
    num_placeholders: int

    def check(self, response: str) -> bool:
        return len(re.findall(r"\[.*?\]", response)) >= self.num_placeholders


@register
@dataclass(frozen=True)
class Postscript(Instruction):
    """A line starting with the postscript marker (P.S. / P.P.S, case-insensitive)."""

    id = "detectable_content:postscript"
    phrasings = (
        'At the end of your response, add a postscript starting with "{postscript_marker}".',
        'End with a postscript that starts with "{postscript_marker}".',
    )
    postscript_marker: str = "P.S."

    def check(self, response: str) -> bool:
        marker = self.postscript_marker.strip()
        if marker == "P.P.S":
            pattern = r"\s*p\.\s?p\.\s?s.*$"
        elif marker == "P.S.":
            pattern = r"\s*p\.\s?s\..*$"
        else:
            pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
        return bool(re.search(pattern, response.lower(), re.MULTILINE))


# ---- format ---------------------------------------------------------------------------------


def count_bullets(response: str) -> int:
    """Lines that are markdown bullets: starting with "* " (not "**") or "- "."""
    stars = re.findall(r"^\s*\*[^*].*$", response, re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, re.MULTILINE)
    return len(stars) + len(dashes)


@register
@dataclass(frozen=True)
class NumberOfBullets(Instruction):
    """Exactly `num_bullets` markdown bullet lines (see count_bullets)."""

    id = "detectable_format:number_bullet_lists"
    phrasings = (
        "Your answer must contain exactly {num_bullets} bullet points, each starting with *.",
        "Use exactly {num_bullets} markdown bullet points (* item).",
        "Format the answer as a list of exactly {num_bullets} bullet points starting with *.",
    )
    num_bullets: int

    def check(self, response: str) -> bool:
        return count_bullets(response) == self.num_bullets


@register
@dataclass(frozen=True)
class ConstrainedResponse(Instruction):
    """Contains one of "My answer is yes.", "My answer is no.", "My answer is maybe."."""

    id = "detectable_format:constrained_response"
    phrasings = (
        'Answer with one of the following options: "My answer is yes.", "My answer is no.", '
        '"My answer is maybe."',
    )
    OPTIONS: ClassVar[tuple[str, ...]] = (
        "My answer is yes.",
        "My answer is no.",
        "My answer is maybe.",
    )

    def check(self, response: str) -> bool:
        return any(o in response.strip() for o in self.OPTIONS)


@register
@dataclass(frozen=True)
class HighlightedSections(Instruction):
    """At least `num_highlights` non-empty *highlighted* (or **bold**) spans."""

    id = "detectable_format:number_highlighted_sections"
    phrasings = (
        "Highlight at least {num_highlights} sections in your answer with markdown, "
        "i.e. *highlighted section*.",
    )
    num_highlights: int

    def check(self, response: str) -> bool:
        single = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
        double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h[2:-2].strip()]
        return len(single) + len(double) >= self.num_highlights


@register
@dataclass(frozen=True)
class MultipleSections(Instruction):
    """At least `num_sections` sections, each opened by "`section_spliter` N"."""

    id = "detectable_format:multiple_sections"
    phrasings = (
        "Your response must have {num_sections} sections. Mark the beginning of each section "
        "with {section_spliter} X, such as: {section_spliter} 1",
    )
    num_sections: int
    section_spliter: str = "Section"

    def check(self, response: str) -> bool:
        pattern = r"\s?" + re.escape(self.section_spliter.strip()) + r"\s?\d+\s?"
        return len(re.split(pattern, response)) - 1 >= self.num_sections


def _strip_code_fence(response: str) -> str:
    text = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    return text.removesuffix("```").strip()


@register
@dataclass(frozen=True)
class JsonFormat(Instruction):
    """The whole response parses as JSON (a ```json fence around it is allowed)."""

    id = "detectable_format:json_format"
    phrasings = (
        "Entire output should be wrapped in JSON format.",
        "Answer in valid JSON.",
    )

    def check(self, response: str) -> bool:
        try:
            json.loads(_strip_code_fence(response))
        except ValueError:
            return False
        return True


@register
@dataclass(frozen=True)
class JsonKey(Instruction):
    """gemmakit extension: the whole response is a JSON object (fence allowed) with `key`."""

    id = "detectable_format:json_key"
    phrasings = (
        'Answer in JSON with the key "{key}".',
        'Reply with a JSON object that has a "{key}" field.',
        'Give the answer as JSON, under the key "{key}".',
    )
    key: str

    def check(self, response: str) -> bool:
        try:
            obj = json.loads(_strip_code_fence(response))
        except ValueError:
            return False
        return isinstance(obj, dict) and self.key in obj


@register
@dataclass(frozen=True)
class Title(Instruction):
    """A non-empty title in double angle brackets, like <<poem of joy>>, on one line."""

    id = "detectable_format:title"
    phrasings = (
        "Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>.",
        "Give your answer a title in double angle brackets, like <<my title>>.",
        "Start with a title wrapped in << and >>.",
    )

    def check(self, response: str) -> bool:
        return any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", response))


# ---- combination ----------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class TwoResponses(Instruction):
    """Two different non-empty responses separated by six asterisks (******)."""

    id = "combination:two_responses"
    phrasings = ("Give two different responses, separated by 6 asterisk symbols: ******.",)

    def check(self, response: str) -> bool:
        parts = response.split("******")
        kept = []
        for i, p in enumerate(parts):
            if p.strip():
                kept.append(p.strip())
            elif 0 < i < len(parts) - 1:
                return False
        return len(kept) == 2 and kept[0] != kept[1]


@register
@dataclass(frozen=True)
class RepeatPrompt(Instruction):
    """The response starts by repeating `prompt_to_repeat` (case-insensitive)."""

    id = "combination:repeat_prompt"
    phrasings = ("First repeat the request word for word without change, then give your answer.",)
    prompt_to_repeat: str

    def check(self, response: str) -> bool:
        return response.strip().lower().startswith(self.prompt_to_repeat.strip().lower())


# ---- start / end ----------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class EndPhrase(Instruction):
    """The response (stripped of spaces and double quotes) ends with `end_phrase`
    (case-insensitive)."""

    id = "startend:end_checker"
    phrasings = (
        'Finish your response with this exact phrase: "{end_phrase}"',
        'End your answer with "{end_phrase}"',
        'Your last words must be "{end_phrase}"',
    )
    end_phrase: str

    def check(self, response: str) -> bool:
        return response.strip().strip('"').lower().endswith(self.end_phrase.strip().lower())


@register
@dataclass(frozen=True)
class StartPhrase(Instruction):
    """gemmakit extension: the response (stripped of spaces and double quotes) starts with
    `start_phrase` (case-insensitive), the mirror of startend:end_checker."""

    id = "startend:start_checker"
    phrasings = (
        'Start your response with "{start_phrase}"',
        'Begin your answer with the phrase "{start_phrase}"',
        'Your first words must be "{start_phrase}"',
    )
    start_phrase: str

    def check(self, response: str) -> bool:
        text = response.strip().strip('"').lower()
        return text.startswith(self.start_phrase.strip().lower())


@register
@dataclass(frozen=True)
class Quotation(Instruction):
    """The whole response (stripped of spaces) is wrapped in double quotation marks."""

    id = "startend:quotation"
    phrasings = (
        "Wrap your entire response with double quotation marks.",
        "Put your whole answer in double quotes.",
        'Enclose the entire answer in quotation marks (").',
    )

    def check(self, response: str) -> bool:
        text = response.strip()
        return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ---- case and punctuation -------------------------------------------------------------------


@register
@dataclass(frozen=True)
class Uppercase(Instruction):
    """Every cased character is upper case (and there is one). IFEval also requires English
    by langdetect; this checker checks the case only."""

    id = "change_case:english_capital"
    phrasings = (
        "Your entire response should be in English, and in all capital letters.",
        "Answer in all capital letters.",
        "Write your whole answer in UPPERCASE.",
    )

    def check(self, response: str) -> bool:
        return response.isupper()


@register
@dataclass(frozen=True)
class Lowercase(Instruction):
    """Every cased character is lower case (and there is one). IFEval also requires English
    by langdetect; this checker checks the case only."""

    id = "change_case:english_lowercase"
    phrasings = (
        "Your entire response should be in English, and in all lowercase letters. "
        "No capital letters are allowed.",
        "Answer in all lowercase letters.",
        "Use only lowercase letters in your answer.",
    )

    def check(self, response: str) -> bool:
        return response.islower()


@register
@dataclass(frozen=True)
class CapitalWordFrequency(Instruction):
    """Words in all capitals (words: runs of \\w joined by - or ') occur `capital_relation`
    `capital_frequency` times."""

    id = "change_case:capital_word_frequency"
    phrasings = (
        "In your response, words with all capital letters should appear {capital_relation} "
        "{capital_frequency} times.",
    )
    capital_frequency: int
    capital_relation: str = "at least"

    def __post_init__(self) -> None:
        _check_relation(self.capital_relation)

    def check(self, response: str) -> bool:
        words = re.findall(r"\w+(?:[-']\w+)*", response)
        n = sum(w.isupper() for w in words)
        return RELATIONS[self.capital_relation](n, self.capital_frequency)


@register
@dataclass(frozen=True)
class NoComma(Instruction):
    """No comma anywhere in the response."""

    id = "punctuation:no_comma"
    phrasings = (
        "In your entire response, refrain from the use of any commas.",
        "Do not use any commas.",
        "Write without commas.",
    )

    def check(self, response: str) -> bool:
        return "," not in response


EXTENSIONS = ("detectable_format:json_key", "startend:start_checker")


def build_instruction(instruction_id: str, kwargs: Mapping[str, Any] | None = None) -> Instruction:
    """The instruction `instruction_id` with IFEval-style `kwargs`.

    None values are dropped (the HF copy of IFEval gives every row every key, mostly null);
    lists become tuples. An unknown id or a missing or unknown parameter raises DataError.
    """
    cls = REGISTRY.get(instruction_id)
    if cls is None:
        raise DataError(f"unknown instruction id {instruction_id!r}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise DataError(f"{instruction_id}: unknown parameter(s) {', '.join(unknown)}")
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    try:
        return cls(**given)
    except TypeError as e:
        raise DataError(f"{instruction_id}: {e}") from e
