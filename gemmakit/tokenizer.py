"""The Gemma tokenizer: a SentencePiece model with Gemma's special ids, and training a new one
with the options of Gemma's own (report section 2: BPE, split digits, byte fallback, whitespace
kept as is, split by unicode script)."""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from gemmakit.config import SPECIAL_PIECES, TokenIds
from gemmakit.errors import DataError, MissingFileError
from gemmakit.resolve import find_tokenizer, model_path

GEMMA_TOKEN_IDS = TokenIds()  # Gemma 1/2: turn markers at 106/107

# SentencePiece writes a space as this character, so a literal U+2581 in the text decodes to a
# space: the one character whose round trip is not exact (Gemma's own tokenizer shares this).
SPACE_MARKER = "\u2581"


# TokenIds field -> the piece that holds it.
class Tokenizer:
    """encode(text, bos=True, special=True) -> ids; decode(ids) -> text.

    Special pieces (every control piece of the vocabulary, such as <bos> <eos> <pad> <mask>
    <unusedN> <start_of_turn> <end_of_turn>, and <unk>) written literally in the text become
    their ids, as HF transformers' Gemma tokenizer does; `special=False` treats all text as
    text. User-defined pieces (Gemma's "\\n", "<start_of_image>", HTML tags...) are always one
    piece: SentencePiece itself matches them.
    """

    def __init__(
        self,
        model_file: str | Path | None = None,
        model_proto: bytes | None = None,
        name: str | None = None,
    ) -> None:
        import sentencepiece as spm

        self.path = Path(model_file) if model_file is not None else None
        label = name or self.path
        try:
            if model_proto is not None:
                self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
            else:
                self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise DataError(f"{label}: not a SentencePiece model ({e})") from e
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @functools.cached_property
    def special_pieces(self) -> dict[int, str]:
        """id -> piece of each special piece: the control pieces and <unk>, the pieces HF
        transformers matches in raw text as special tokens (SentencePiece never emits them)."""
        sp = self.sp
        return {
            i: sp.id_to_piece(i)
            for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i)
        }

    @functools.cached_property
    def _special_ids(self) -> dict[str, int]:
        return {p: i for i, p in self.special_pieces.items() if p}

    @functools.cached_property
    def _special_regex(self) -> re.Pattern[str] | None:
        return re.compile(trie_regex(self._special_ids)) if self._special_ids else None

    def encode(
        self, text: str, bos: bool = True, eos: bool = False, special: bool = True
    ) -> list[int]:
        """Token ids of `text`, with <bos> first (the default: Gemma needs it) and optionally
        <eos> last. With `special` (the default, as HF transformers), a special piece written
        in the text ("<start_of_turn>", "<eos>"...) is its id, the longest one where several
        start at the same place; `special=False` encodes the whole text as plain text (for
        untrusted text, which then can never hold a control id)."""
        ids = [self.bos_id] if bos else []
        regex = self._special_regex if special else None
        start = 0
        if regex is not None:
            for m in regex.finditer(text):
                ids += self._plain(text[start : m.start()])
                ids.append(self._special_ids[m.group()])
                start = m.end()
        ids += self._plain(text[start:])
        return [*ids, self.eos_id] if eos else ids

    def _plain(self, text: str) -> list[int]:
        # bytes: a lone surrogate raises UnicodeEncodeError instead of being replaced
        return self.sp.encode(text.encode("utf-8")) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`: each special id gives its piece ("<end_of_turn>"), except a
        leading <bos> (the one `encode` puts first), which gives no text; so
        decode(encode(s)) == s. Ids past the tokenizer's pieces give no text: a model's
        embedding can have more rows than its tokenizer (Gemma 3's HF config says 262208 for
        262144 pieces), and sampling may pick one."""
        size = self.sp.get_piece_size()
        ids = [i for i in map(int, ids) if 0 <= i < size]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        special = self.special_pieces
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            piece = special.get(i)
            if piece is None:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            out.append(piece)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def has_piece(self, piece: str) -> bool:
        """True when `piece` is in the vocabulary (piece_to_id gives <unk>'s id otherwise)."""
        i = self.sp.piece_to_id(piece)
        return i != self.sp.unk_id() or piece == self.sp.id_to_piece(i)

    def token_ids(self, default: TokenIds | None = None) -> TokenIds:
        """The special ids as this vocabulary has them; a piece it lacks keeps `default`'s id
        (Gemma 1/2 put the turn markers at 106/107, Gemma 3 at 105/106)."""
        found = {k: self.piece_to_id(p) for k, p in SPECIAL_PIECES.items() if self.has_piece(p)}
        return dataclasses.replace(default or GEMMA_TOKEN_IDS, **found)


def trie_regex(words: Iterable[str]) -> str:
    """A regex matching any of `words`, the longest where several match at the same place,
    built as a trie ("<un(?:used(?:0|1)|k>)") so that a match costs about its own length however
    many words there are (Gemma 3 has 6000+ special pieces)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a word

    def alternation(node: dict) -> str:
        branches = [re.escape(ch) + alternation(child) for ch, child in node.items() if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # a word may end here: try the longer words first (greedy ?), then stop
        return f"(?:{body})?" if "" in node else body

    return alternation(trie)


def load_tokenizer(source: str | Path) -> Tokenizer:
    """A tokenizer from a `.model` file, a checkpoint (folder or file) with `tokenizer.model`
    beside it, a `.gguf` file (its vocabulary) or an installed model name (gemma3-270m)."""
    path = model_path(source)
    if path.suffix == ".gguf" and path.is_file():
        from gemmakit.checkpoint.gguf_vocab import sentencepiece_proto_from_gguf

        return Tokenizer(model_proto=sentencepiece_proto_from_gguf(path), name=str(path))
    return Tokenizer(find_tokenizer(path))


# --- training --------------------------------------------------------------------------------

# A sentence SentencePiece trains on: longer ones it would skip, so text is cut into chunks of
# whole lines up to this many characters (4 bytes each at most, within max_sentence_length).
CHUNK_CHARS = 2048


def control_pieces(ids: TokenIds = GEMMA_TOKEN_IDS) -> list[str]:
    """The control pieces after <pad> <eos> <bos> <unk>, in id order: <mask>, the reserved
    `<unusedN>` that fill the ids up to the turn markers, then <start_of_turn> <end_of_turn>."""
    first = max(ids.pad, ids.eos, ids.bos, ids.unk) + 1
    turns = ids.end_of_turn == ids.start_of_turn + 1
    if not (ids.mask == first and first < ids.start_of_turn and turns):
        raise DataError(f"unsupported special-id layout {ids}")
    unused = [f"<unused{i}>" for i in range(ids.start_of_turn - ids.mask - 1)]
    return ["<mask>", *unused, "<start_of_turn>", "<end_of_turn>"]


def chunk_text(texts: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Each text cut into chunks of whole lines (newlines kept, so SentencePiece learns them)
    of at most `max_chars` characters; a longer line is cut where the limit falls."""
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            if len(chunk) + len(line) > max_chars and chunk:
                yield chunk
                chunk = ""
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            chunk += line
        if chunk:
            yield chunk


def read_text_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """The text of each file, with a clear error for a missing or non-UTF-8 one."""
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise MissingFileError(f"{p}: no such text file")
        try:
            yield p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e})") from None


def train_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    files: Sequence[str | Path] = (),
    vocab_size: int,
    output: str | Path | None = None,
    token_ids: TokenIds = GEMMA_TOKEN_IDS,
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    num_threads: int | None = None,
    seed: int = 0,
) -> Tokenizer:
    """Train a SentencePiece BPE tokenizer with Gemma's options on `texts` (documents) and/or
    the UTF-8 text `files`.

    The special pieces get Gemma's ids (by default 0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>,
    4 <mask>, reserved <unusedN> controls, 106 <start_of_turn>, 107 <end_of_turn>), then the 256
    byte pieces. `vocab_size` is an upper bound: a corpus too small to fill it gives fewer
    pieces. With `output` (a path prefix), writes `{output}.model`.
    """
    import sentencepiece as spm

    controls = control_pieces(token_ids)
    reserved = 4 + len(controls) + 256  # specials, controls, bytes
    if vocab_size <= reserved:
        raise DataError(
            f"vocab_size {vocab_size} is too small: {reserved} ids are reserved for special, "
            f"control and byte pieces"
        )
    sources = [*read_text_files(files), *(texts or [])]
    sentences = list(chunk_text(sources))
    if not sentences:
        raise DataError("no training text: give texts or files")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # for the sentence shuffle
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary, not an error
            character_coverage=character_coverage,
            split_digits=True,
            byte_fallback=True,
            split_by_unicode_script=True,
            allow_whitespace_only_pieces=True,
            # identity normalization, no dummy prefix, keep all whitespace: text round-trips
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            pad_id=token_ids.pad,
            eos_id=token_ids.eos,
            bos_id=token_ids.bos,
            unk_id=token_ids.unk,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            control_symbols=controls,
            max_sentence_length=4 * CHUNK_CHARS,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed: {e}") from None
    proto = model.getvalue()
    name = str(output) + ".model" if output is not None else "trained tokenizer"
    tok = Tokenizer(model_proto=proto, name=name)
    for field, piece in SPECIAL_PIECES.items():  # the layout the model config relies on
        if tok.id_to_piece(getattr(token_ids, field)) != piece:
            raise AssertionError(f"trained tokenizer: {piece} is not at id {token_ids}")
    if output is not None:
        from gemmakit.atomic import atomic_path

        tok.path = Path(name)
        with atomic_path(tok.path) as tmp:
            tmp.write_bytes(proto)
    return tok
