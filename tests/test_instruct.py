"""The IFEval-style checkers, each on hand-made passing and failing answers, and the strict /
loose scoring at prompt and instruction level."""

from __future__ import annotations

import pytest

from gemmakit.errors import DataError, MissingPackageError
from gemmakit.instruct.instructions import (
    REGISTRY,
    build_instruction,
    count_sentences,
    count_words,
    split_sentences,
)
from gemmakit.instruct.scoring import follows, loose_variants, match_responses, score

# (id, kwargs, answers that pass, answers that fail)
CASES = [
    (
        "keywords:existence",
        {"keywords": ["apple", "Sky"]},
        ["An APPLE under the sky.", "pineapples in the skyline"],
        ["An apple.", ""],
    ),
    (
        "keywords:forbidden_words",
        {"forbidden_words": ["red", "dog"]},
        ["A blue cat.", "Reddish dogs."],
        ["A red car.", "The DOG barks."],
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": "at least"},
        ["cat and Cat", "cats, cats, cats"],
        ["one cat", "no felines"],
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "less than"},
        ["zz top", "none here"],
        ["zzz", "Zig Zag Zoo"],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "exactly"},
        ["one two three", "it's dog"],
        ["one two", "one two three four"],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "less than"},
        ["one two", "hi"],
        ["one two three", "a b c d"],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "at most"},
        ["one two three", "a"],
        ["one two three four"],
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "at least"},
        ["one two three", "a b c d e"],
        ["one two"],
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "exactly"},
        ["I am here. You are there!", "Dr. Smith came. He paid $3.50 for it."],
        ["One sentence only.", "One. Two? Three!"],
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        ["First part.\n***\nSecond part.", "***\nA\n***\nB\n"],
        ["Only one.", "A\n***\n***\nB", "A\n***\nB\n***\nC"],
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        ["First.\n\nThen, second.", 'A\n\n"Then" B'],
        ["First.\n\nNow second.", "Then.\n\nthen\n\nx"],
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        ["Dear [name], at [address].", "[a][b]"],
        ["Dear [name].", "no placeholders"],
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        ["Hello.\n\nP.S. bye", "hi\np.s. later"],
        ["Hello.", "PS bye"],
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        ["Hello.\nP.P.S bye"],
        ["Hello.\nP.S. bye"],
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        ["* one\n* two", "Intro\n- one\n- two\nEnd", "* a\n- b"],
        ["* one", "* one\n* two\n* three", "**bold**\n* one"],
    ),
    (
        "detectable_format:constrained_response",
        {},
        ["My answer is yes.", "Well. My answer is maybe. Sorry"],
        ["Yes.", "my answer is yes."],
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        ["*one* and *two*", "**bold** and *it*"],
        ["*one* only", "** ** and * *"],
    ),
    (
        "detectable_format:multiple_sections",
        {"num_sections": 2, "section_spliter": "Section"},
        ["Section 1\nA\nSection 2\nB", "SECTION 1 a Section 2 b Section 3 c"],
        ["Section 1\nA"],
    ),
    (
        "detectable_format:json_format",
        {},
        ['{"a": 1}', "```json\n[1, 2]\n```", '"text"'],
        ["{a: 1}", 'Here: {"a": 1}'],
    ),
    (
        "detectable_format:json_key",
        {"key": "answer"},
        ['{"answer": "red"}', '```\n{"answer": [1], "x": 2}\n```'],
        ['{"answers": "red"}', '["answer"]', "answer: red"],
    ),
    (
        "detectable_format:title",
        {},
        ["<<My Title>>\nText", "text <<t>>"],
        ["<My Title>", "<<  >>", "<<broken\n>>"],
    ),
    (
        "combination:two_responses",
        {},
        ["First.\n******\nSecond.", "A******B"],
        ["A******A", "A******B******C", "just one"],
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Say hi."},
        ["say hi. Hi!", "  Say hi. hello"],
        ["Hi! Say hi.", "Say hello."],
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        ["Blue. Any other questions?", '"blue. ANY OTHER QUESTIONS?"'],
        ["Any other questions? Blue.", "Blue. Any other questions"],
    ),
    (
        "startend:start_checker",
        {"start_phrase": "Sure."},
        ["Sure. Blue.", '"sure. blue."'],
        ["Blue. Sure.", "Surely blue."],
    ),
    ("startend:quotation", {}, ['"Blue."', '  "a"  '], ["Blue.", '"Blue.', '"']),
    (
        "change_case:english_capital",
        {},
        ["BLUE SKY 42.", "HELLO!"],
        ["Blue sky.", "BLUE sKY", "42"],
    ),
    ("change_case:english_lowercase", {}, ["blue sky 42.", "hello!"], ["Blue sky.", "blue SKY"]),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        ["BIG and RED", "A NICE-LOOKING DOG"],
        ["Big and RED", "no caps"],
    ),
    ("punctuation:no_comma", {}, ["Red and blue.", "a; b"], ["Red, blue.", ","]),
]


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_checker_passes_and_fails_by_hand(iid, kwargs, good, bad):
    ins = build_instruction(iid, kwargs)
    for answer in good:
        assert ins.check(answer), (iid, answer)
    for answer in bad:
        assert not ins.check(answer), (iid, answer)


def test_every_registered_instruction_has_a_case_and_phrasings():
    covered = {c[0] for c in CASES} | {"language:response_language"}
    assert covered == set(REGISTRY)
    for iid, kwargs, _, _ in CASES:
        ins = build_instruction(iid, kwargs)
        assert ins.id == iid
        assert build_instruction(iid, ins.kwargs()) == ins  # kwargs round-trip
        texts = {ins.describe(v) for v in range(len(ins.phrasings))}
        assert len(texts) == len(ins.phrasings) and all("{" not in t for t in texts)


def test_describe_uses_the_parameters_and_singular():
    assert (
        build_instruction(
            "length_constraints:number_words", {"num_words": 7, "relation": "at most"}
        ).describe(0)
        == "Answer with at most 7 words."
    )
    one = build_instruction("detectable_format:number_bullet_lists", {"num_bullets": 1})
    assert "exactly 1 bullet point," in one.describe(0)
    kw = build_instruction("keywords:existence", {"keywords": ["sun"]})
    assert kw.describe(0) == 'Include the keyword "sun" in the response.'
    two = build_instruction("keywords:forbidden_words", {"forbidden_words": ["a", "b"]})
    assert two.describe(1) == 'Do not use the words "a" and "b".'


def test_build_instruction_takes_ifeval_rows_and_rejects_bad_ones():
    # the HF copy of IFEval gives each instruction every key, mostly null
    ins = build_instruction(
        "length_constraints:number_words",
        {"num_words": 5, "relation": "less than", "keywords": None, "num_bullets": None},
    )
    assert ins.check("a b c d") and not ins.check("a b c d e")
    with pytest.raises(DataError, match="unknown instruction id"):
        build_instruction("nope:nothing", {})
    with pytest.raises(DataError, match="unknown parameter"):
        build_instruction("punctuation:no_comma", {"num_words": 3})
    with pytest.raises(DataError, match="num_words"):
        build_instruction("length_constraints:number_words", {})
    with pytest.raises(DataError, match="relation"):
        build_instruction("length_constraints:number_words", {"num_words": 3, "relation": "<"})


def test_language_checker_needs_langdetect_or_says_so():
    ins = build_instruction("language:response_language", {"language": "en"})
    try:
        import langdetect  # noqa: F401
    except ImportError:
        with pytest.raises(MissingPackageError, match="langdetect"):
            ins.check("Hello there, how are you today?")
    else:
        assert ins.check("Hello there, how are you doing today, my friend?")


def test_word_and_sentence_counts():
    assert count_words("It's a well-known fact: 3.5 apples!") == 9  # it s a well known ...
    assert split_sentences("Mr. Smith paid 3.50 dollars. He left! Did he? Yes...") == [
        "Mr. Smith paid 3.50 dollars.",
        "He left!",
        "Did he?",
        "Yes...",
    ]
    assert count_sentences('He said "hi." Then he left') == 2
    assert count_sentences("J. R. Tolkien wrote books.") == 1
    assert count_sentences("* item one\n* item two") == 1
    assert count_sentences("") == 0


def test_loose_variants_are_ifevals_eight():
    v = loose_variants("Sure, here it is:\n**hello world**\nHope this helps")
    assert len(v) == 8 and v[0] == "Sure, here it is:\n**hello world**\nHope this helps"
    assert "**hello world**" in v and "hello world" in v  # first and last line removed
    lower = build_instruction("change_case:english_lowercase", {})
    assert not follows(lower, "Sure:\nhello world\nBye")
    assert follows(lower, "Sure:\nhello world\nBye", loose=True)
    assert not follows(lower, "   ", loose=True)  # a blank answer follows nothing


def test_scoring_prompt_and_instruction_levels():
    rows = [
        {
            "key": 1,
            "prompt": "p1",
            "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
            "kwargs": [{}, {}],
        },
        {"key": 2, "prompt": "p2", "instruction_id_list": ["startend:quotation"], "kwargs": [{}]},
        {
            "key": 3,
            "prompt": "p3",
            "instruction_id_list": ["change_case:english_capital"],
            "kwargs": [{}],
        },
    ]
    responses = ["a, b", '"quoted"', "Intro line:\nSHOUT"]
    result = score(rows, responses)
    # strict: row 1 follows one of two, row 2 follows, row 3 fails (first line has lowercase)
    assert result["prompt_strict"] == pytest.approx(1 / 3)
    assert result["instruction_strict"] == pytest.approx(2 / 4)
    # loose: row 3 passes once its first line is removed
    assert result["prompt_loose"] == pytest.approx(2 / 3)
    assert result["instruction_loose"] == pytest.approx(3 / 4)
    per = result["per_instruction"]
    assert per["punctuation:no_comma"] == {"n": 1, "strict": 0.0, "loose": 0.0}
    assert per["change_case:english_capital"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    assert result["per_category"]["change_case"]["n"] == 2
    assert result["samples"][0]["strict"] == [False, True]
    with pytest.raises(DataError, match="3 eval rows but 2"):
        score(rows, responses[:2])


def test_responses_match_by_key_or_prompt():
    rows = [{"key": 1, "prompt": "a"}, {"key": 2, "prompt": "b"}]
    got = match_responses(rows, [{"prompt": "b", "response": "B"}, {"key": 1, "response": "A"}])
    assert got == ["A", "B"]
    with pytest.raises(DataError, match="no response for eval key 2"):
        match_responses(rows, [{"key": 1, "response": "A"}], "resp.jsonl")
