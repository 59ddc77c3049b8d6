"""Each filter catches what it should and keeps what it should."""

import random

import pytest

from gemmakit.data.decontaminate import EvalIndex, decontaminate
from gemmakit.data.dedup import ExactDedup, MinHashDedup, dedup_documents
from gemmakit.data.generated_corpus import web_document
from gemmakit.data.pii import scrub_documents, scrub_pii
from gemmakit.data.quality import PRESETS, QualityConfig, filter_quality, quality_failure
from gemmakit.data.readers import Document
from gemmakit.data.safety import Blocklist, filter_safety
from gemmakit.data.summary import StageSummary

GOOD = web_document(random.Random(1))


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = (
        "river garden window market letter morning village teacher kitchen "
        "mountain orchard harbor lantern meadow"
    ).split()
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.mark.parametrize(
    "rule, text",
    [
        ("too few words", "The cat sat on the mat with a hat."),
        ("lorem ipsum", "Lorem ipsum dolor sit amet. " + GOOD),
        ("mean word length", "the of and to a " * 20 + "with that have be"),
        ("symbol-to-word ratio", " ".join(f"#tag{i} the and of with" for i in range(30))),
        ("bullet lines", "\n".join(f"• the {words(6, i)}" for i in range(20))),
        ("ellipsis lines", "\n".join(f"The {words(12, i)} and so on..." for i in range(8))),
        ("alphabetic words", "the and of with " + " ".join(str(i) for i in range(1000, 1100))),
        ("stop words", words(120)),
        (
            "duplicate lines",
            "\n".join(
                ["The price of the deal and the offer is low."] * 5
                + [f"The {words(10, i)} with and of." for i in range(6)]
            ),
        ),
        ("top 2-gram", "the and of with " + " ".join(["best deal"] * 60) + " " + words(30)),
        (
            "duplicate 5-grams",
            " ".join(
                [words(60, 1)]
                + ["and the train left with five old friends at dawn"] * 7
                + [words(60, 2)]
            ),
        ),
    ],
)
def test_quality_rule_catches_its_document(rule, text):
    failure = quality_failure(text)
    assert failure is not None and failure[0] == rule, failure


def test_quality_keeps_good_prose_and_attributes_drops():
    assert quality_failure(GOOD) is None
    summary = StageSummary("quality")
    docs = [Document("good", GOOD), Document("short", "Too short."), Document("good2", GOOD)]
    kept = [d.id for d in filter_quality(docs, summary=summary)]
    assert kept == ["good", "good2"]
    assert summary.dropped == {"too few words": 1}
    assert summary.examples["too few words"][0]["id"] == "short"


def test_quality_config_presets_overrides_and_errors():
    code = 'def add(a, b):\n    """Add two numbers."""\n    return a + b\n' * 2 + "x = add(1, 2)\n"
    assert quality_failure(code, PRESETS["web"]) is not None
    assert quality_failure(code, QualityConfig.from_dict({"preset": "code"})) is None
    assert (
        quality_failure(
            "one two three",
            QualityConfig.from_dict({"min_words": None, "min_stop_words": None, "preset": "code"}),
        )
        is None
    )
    with pytest.raises(ValueError, match="min_wrds"):
        QualityConfig.from_dict({"min_wrds": 3})
    with pytest.raises(ValueError, match="preset"):
        QualityConfig.from_dict({"preset": "poetry"})


def test_blocklist_matches_on_word_boundaries_only():
    bl = Blocklist(["ass", "frumious bandersnatch"])
    assert bl.find("A class of passengers assembled.") == []
    assert bl.find("Beware the ASS, and the frumious\n  Bandersnatch!") == [
        "ass",
        "frumious bandersnatch",
    ]
    summary = StageSummary("safety")
    docs = [Document("a", "a classic assessment"), Document("b", "you ass")]
    assert [d.id for d in filter_safety(docs, bl, summary)] == ["a"]
    assert summary.dropped == {"blocklist": 1} and summary.counts == {"term: ass": 1}


def test_pii_is_replaced_with_tags_and_counted():
    text = (
        "Write to jane.roe@example.com or j@mail.example.org, call (555) 201-7788 or "
        "+44 20 7946 0958. Hosts 192.168.0.12 and 2001:db8:85a3::8a2e:370:7334. "
        "Card 4539 1488 0343 6467; SSN 219-09-9999."
    )
    out, counts = scrub_pii(text)
    assert counts == {"email": 2, "phone": 2, "ipv4": 1, "ipv6": 1, "credit_card": 1, "ssn": 1}
    for tag in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<SSN>"):
        assert tag in out
    assert "example.com" not in out and "4539" not in out and "7946" not in out


def test_pii_leaves_lookalikes_alone():
    text = (
        "Card 4539 1488 0343 6468 fails Luhn. Version 1.2.3.4.5, 999.1.1.1, "
        "a[::2] at 12:30:45, 3 + 4 = 7, in 2023-01-15 we paid 1234567."
    )
    assert scrub_pii(text) == (text, {})
    summary = StageSummary("pii")
    docs = list(scrub_documents([Document("a", text), Document("b", "mail a@b.io")], summary))
    assert docs[1].text == "mail <EMAIL>" and summary.counts == {"documents changed": 1, "email": 1}


def test_exact_and_near_duplicates_on_constructed_pairs():
    a = " ".join(words(200, 1).split())
    w = a.split()
    near = " ".join("changed" if i % 40 == 0 else x for i, x in enumerate(w))  # J ~ 0.78-0.9
    far = " ".join("changed" if i % 6 == 0 else x for i, x in enumerate(w))  # J well below
    docs = [
        Document("a", a),
        Document("a-upper", "  " + a.upper() + "\n"),
        Document("near", near),
        Document("far", far),
        Document("other", words(200, 2)),
    ]
    summary = StageSummary("dedup")
    kept = [d.id for d in dedup_documents(docs, summary, ExactDedup(), MinHashDedup())]
    assert kept == ["a", "far", "other"]
    assert summary.dropped == {"exact duplicate": 1, "near duplicate": 1}
    assert summary.examples["near duplicate"][0]["detail"].endswith("with a")


def test_minhash_estimates_jaccard():
    m = MinHashDedup(num_perm=256)
    w = words(400, 3).split()
    b = w[:300] + words(100, 4).split()
    sa = {tuple(w[i : i + 5]) for i in range(len(w) - 4)}
    sb = {tuple(b[i : i + 5]) for i in range(len(b) - 4)}
    true = len(sa & sb) / len(sa | sb)
    est = float((m.signature(" ".join(w)) == m.signature(" ".join(b))).mean())
    assert abs(est - true) < 0.08, (est, true)


def test_decontamination_finds_a_planted_eval_item(tmp_path):
    item = (
        "In which year did the lighthouse keeper of Kestrel Bay first record the "
        "migration of the grey herons across the northern marshes?"
    )
    (tmp_path / "quiz.jsonl").write_text(
        '{"question": "' + item + '", "answer": "1887"}\n{"question": "Too short?"}\n'
    )
    (tmp_path / "trivia.txt").write_text("Name the river that runs through the old town.\n")
    index = EvalIndex.from_files([tmp_path / "quiz.jsonl", tmp_path / "trivia.txt"], n=13)
    planted = GOOD + "\n\nQuiz time! " + item.upper().replace(" ", "  ") + " Answer below."
    docs = [
        Document("clean", GOOD),
        Document("planted", planted),
        Document("short-item", "Please name the river that runs through the old town today"),
    ]
    summary = StageSummary("decontaminate")
    kept = [d.id for d in decontaminate(docs, index, summary)]
    assert kept == ["clean"]
    by_doc = {d["document"]: d for d in summary.details}
    assert by_doc["planted"]["eval_set"] == "quiz"
    assert len(by_doc["planted"]["ngram"].split()) == 13
    assert by_doc["planted"]["ngram"] in " ".join(item.lower().replace("?", "").split())
    assert by_doc["short-item"]["eval_set"] == "trivia"  # a 10-word item matches whole
    assert index.skipped_short == 1  # "Too short?" is too generic to match on
