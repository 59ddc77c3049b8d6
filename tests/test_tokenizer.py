"""Training a tokenizer with Gemma's options, its special ids, and exact round trips."""

from __future__ import annotations

import random
import re
import string

import pytest
from helpers import multilingual_texts
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmakit.cli import main
from gemmakit.config import GEMMA3_TOKEN_IDS, TokenIds
from gemmakit.tokenizer import (
    SPACE_MARKER,
    Tokenizer,
    chunk_text,
    control_pieces,
    load_tokenizer,
    train_tokenizer,
    trie_regex,
)

VARIED = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nmany\r\nwindows\r\n",
    "mixed \t \n \u00a0 whitespace\u3000ideographic",
    "digits 0123456789 and 3.14159 and -42 and 1,000,000",
    "def main():\n    for i in range(10):\n        print(f'{i:>4}')  # comment\n",
    "int main(void) { return 0; }\n\t/* C */",
    "Ünïcödé façade naïve coöperate",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "日本語のテキストと中文和한국어",
    "emoji 🙂🚀👍🏽🇫🇷 family 👨‍👩‍👧‍👦 keycap 1️⃣",
    "combining e\u0301 a\u0308 and zero\u200bwidth\u200djoiner",
    "control chars \x00 \x01 \x7f \x1b[31m",
    "rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 🜁 \U0010fffd",
    "<start_of_turn>user\nnot a marker<end_of_turn>",
    "<bos><eos><pad><unk><mask><unused0>",
    "  \n  \n",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(multilingual_texts(6000), vocab_size=2048)


def test_special_pieces_at_gemma_ids(tok):
    expected = {
        0: "<pad>",
        1: "<eos>",
        2: "<bos>",
        3: "<unk>",
        4: "<mask>",
        5: "<unused0>",
        105: "<unused100>",
        106: "<start_of_turn>",
        107: "<end_of_turn>",
        108: "<0x00>",
        363: "<0xFF>",
    }
    assert {i: tok.id_to_piece(i) for i in expected} == expected
    assert tok.token_ids() == TokenIds()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    for i in [0, 1, 2, 4, 5, 105, 106, 107]:
        assert tok.sp.is_control(i), tok.id_to_piece(i)
    assert tok.vocab_size == 2048  # the corpus fills the vocabulary


def test_gemma3_layout_puts_turn_markers_at_105_106():
    assert control_pieces(GEMMA3_TOKEN_IDS)[-3:] == [
        "<unused99>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    t = train_tokenizer(multilingual_texts(300), vocab_size=800, token_ids=GEMMA3_TOKEN_IDS)
    assert t.token_ids() == GEMMA3_TOKEN_IDS
    assert t.piece_to_id("<start_of_turn>") == 105 and t.piece_to_id("<end_of_turn>") == 106


def test_digits_are_split(tok):
    ids = tok.encode("x = 12345 + 678", bos=False)
    digits = [tok.id_to_piece(i) for i in ids if any(c.isdigit() for c in tok.id_to_piece(i))]
    assert digits == list("12345678")


def test_learned_pieces_follow_gemma_options(tok):
    pieces = [tok.id_to_piece(i) for i in range(364, tok.vocab_size)]
    assert any(p and set(p) <= {SPACE_MARKER, "\t", "\n"} and len(p) > 1 for p in pieces)
    assert not any(len(p) > 1 and any(c.isdigit() for c in p) for p in pieces)  # split digits

    # split by unicode script: no learned piece mixes Latin and Cyrillic or CJK letters
    def other_script(c: str) -> bool:
        return "\u0400" <= c <= "\u04ff" or "\u4e00" <= c <= "\u9fff"  # Cyrillic, CJK

    assert not any(
        any(c in string.ascii_letters for c in p) and any(map(other_script, p)) for p in pieces
    )
    # no dummy prefix: a word at the start of text has no leading space marker
    assert not tok.id_to_piece(tok.encode("the", bos=False)[0]).startswith(SPACE_MARKER)


def test_bos_by_default(tok):
    assert tok.encode("hello")[0] == 2
    assert tok.encode("hello", bos=False)[0] != 2
    assert tok.encode("hello", bos=False, eos=True)[-1] == 1
    assert tok.encode("") == [2]
    assert tok.decode(tok.encode("hello", eos=True)) == "hello<eos>"  # as HF decodes it


@pytest.mark.parametrize("text", VARIED)
def test_exact_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters=SPACE_MARKER), max_size=80))
def test_exact_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_of_corpus_style_text(tok):
    for doc in multilingual_texts(200, seed=1):
        assert tok.decode(tok.encode(doc)) == doc


def test_space_marker_is_the_one_inexact_character(tok):
    # SentencePiece writes spaces as U+2581; Gemma's tokenizer shares this limitation.
    assert tok.decode(tok.encode(f"a{SPACE_MARKER}b")) == "a b"


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        tok.encode("a\ud800")


CONTROL_IDS = {0, 1, 2, 3, 4, 5, 55, 105, 106, 107}  # pad eos bos unk mask unused0/50/100 turns


def test_special_pieces_in_text_are_their_ids(tok):
    """The default, as HF transformers: each control piece (and <unk>) written in the text is
    its id, wherever it stands; text around it is encoded as it would be alone."""

    def plain(s):
        return tok.encode(s, bos=False, special=False)

    assert tok.encode("<start_of_turn>user\n") == [2, 106, *plain("user\n")]
    assert tok.encode("a<end_of_turn>b", bos=False) == [*plain("a"), 107, *plain("b")]
    assert tok.encode(" <eos> ", bos=False) == [*plain(" "), 1, *plain(" ")]
    assert tok.encode("<bos><eos><pad><unk><mask>", bos=False) == [2, 1, 0, 3, 4]
    assert tok.encode("<unused0><unused50><unused100>", bos=False) == [5, 55, 105]
    assert tok.encode("<start_of_turn><start_of_turn>", bos=False) == [106, 106]
    assert tok.encode("<<eos>>", bos=False) == [*plain("<"), 1, *plain(">")]
    assert tok.encode("<start_of_<end_of_turn>turn>", bos=False) == [
        *plain("<start_of_"),
        107,
        *plain("turn>"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "<start_of_turn",
        "start_of_turn>",
        "<Start_of_turn>",
        "<start_of_turn >",
        "< eos>",
        "<unused101>",
        "<unused>",
        "<unused00>",
        "<0x41>",
        "<bos",
        "<end_of_tur>",
    ],
)
def test_partial_or_misspelt_markers_stay_text(tok, text):
    assert tok.encode(text, bos=False) == tok.encode(text, bos=False, special=False)
    assert not set(tok.encode(text, bos=False)) & CONTROL_IDS


def test_special_false_is_plain_text(tok):
    ids = tok.encode("<start_of_turn>user<end_of_turn><bos><eos><unk>", bos=False, special=False)
    assert not set(ids) & CONTROL_IDS
    assert tok.decode(ids) == "<start_of_turn>user<end_of_turn><bos><eos><unk>"


def test_decode_gives_markers_back(tok):
    assert (
        tok.decode([2, 106, *tok.encode("hi", bos=False), 107, 1])
        == "<start_of_turn>hi<end_of_turn><eos>"
    )
    assert tok.decode([5, 3, 0]) == "<unused0><unk><pad>"
    assert tok.decode([2, 2]) == "<bos>"  # only the leading <bos> (encode's) gives no text
    # an embedding row past the tokenizer's pieces (a padded vocabulary) gives no text
    hi = tok.encode("hi", bos=False)
    assert tok.decode([*hi, tok.sp.get_piece_size(), *hi]) == "hihi"


MARKERS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<unused7>",
    "<start_of_turn",
    "<unused",
    "<",
    ">",
    "_of_turn>",
]


TEXT_CHARS = st.characters(codec="utf-8", exclude_characters=SPACE_MARKER)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(MARKERS),
            st.text(alphabet=TEXT_CHARS, max_size=8),
        ),
        max_size=10,
    )
)
def test_round_trip_with_markers(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, special=False)) == text
    # a special id only where its piece is written; none at all in plain text
    ids = tok.encode(text, bos=False)
    found = [tok.special_pieces[i] for i in ids if i in tok.special_pieces]
    assert all(p in text for p in found) and len(found) <= text.count("<")
    assert not set(tok.encode(text, bos=False, special=False)) & set(tok.special_pieces)


def test_trie_regex_is_leftmost_longest():
    rng = random.Random(0)
    for _ in range(200):
        words = {"".join(rng.choice("ab<>") for _ in range(rng.randint(1, 4))) for _ in range(6)}
        text = "".join(rng.choice("ab<>") for _ in range(30))
        got = [m.group() for m in re.finditer(trie_regex(words), text)]
        want, i = [], 0
        while i < len(text):  # at each place the longest word, else move on one character
            match = max((w for w in words if text.startswith(w, i)), key=len, default=None)
            if match:
                want.append(match)
            i += len(match) if match else 1
        assert got == want, (words, text)


def test_chunk_text_keeps_text_and_bounds_length():
    texts = ["short\nlines\n", "x" * 5000 + "\n" + "y\n" * 3000, ""]
    chunks = list(chunk_text(texts, max_chars=1000))
    assert max(len(c) for c in chunks) <= 1000
    assert "".join(chunks) == "".join(texts)


def test_small_corpus_gives_a_smaller_vocab():
    t = train_tokenizer(["hello world\n"] * 20, vocab_size=2048)
    assert 364 < t.vocab_size < 4096
    assert t.decode(t.encode("hello world, 42 🙂")) == "hello world, 42 🙂"


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 300 is too small"):
        train_tokenizer(["abc"], vocab_size=300)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], vocab_size=1000)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer(files=[tmp_path / "missing.txt"], vocab_size=1000)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        train_tokenizer(files=[latin1], vocab_size=1000)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_cli_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(multilingual_texts(400)), encoding="utf-8")
    prefix = tmp_path / "out" / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(corpus),
                "--vocab-size",
                "1000",
                "--output",
                str(prefix),
            ]
        )
        == 0
    )
    assert f"wrote {prefix}.model: 1000 pieces" in capsys.readouterr().out
    assert [p.name for p in prefix.parent.iterdir()] == ["tok.model"]  # no temp file left
    tok = load_tokenizer(tmp_path / "out" / "tok.model")

    assert main(["tokenizer", "encode", "--tokenizer", f"{prefix}.model", "über 42"]) == 0
    ids_line = capsys.readouterr().out.splitlines()[0]
    ids = [int(i) for i in ids_line.split()]
    assert ids == tok.encode("über 42")
    turn = ["tokenizer", "encode", "--tokenizer", f"{prefix}.model", "--no-bos", "<start_of_turn>x"]
    assert main(turn) == 0
    assert capsys.readouterr().out.split()[0] == "106"  # the marker is its control id
    assert main([*turn, "--plain"]) == 0
    assert "106" not in capsys.readouterr().out.splitlines()[0].split()  # text, as written
    assert main(["tokenizer", "decode", "--tokenizer", f"{prefix}.model", *map(str, ids)]) == 0
    assert capsys.readouterr().out == "über 42\n"
    assert main(["tokenizer", "decode", "--tokenizer", f"{prefix}.model", "99999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err

    assert main(["tokenizer", "info", f"{prefix}.model"]) == 0
    out = capsys.readouterr().out
    assert "<start_of_turn>  106" in out and "<end_of_turn>    107" in out
