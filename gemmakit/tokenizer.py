"""The Gemma tokenizer: a SentencePiece model with Gemma's special ids, and training a new one
with the options of Gemma's own (report section 2: BPE, split digits, byte fallback, whitespace
kept as is, split by unicode script)."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from gemmakit.config import TokenIds
from gemmakit.errors import DataError, MissingFileError
from gemmakit.resolve import find_tokenizer, model_path

GEMMA_TOKEN_IDS = TokenIds()  # Gemma 1/2: turn markers at 106/107

# SentencePiece writes a space as this character, so a literal U+2581 in the text decodes to a
# space: the one character whose round trip is not exact (Gemma's own tokenizer shares this).
SPACE_MARKER = "\u2581"

# TokenIds field -> the piece that holds it.
SPECIAL_PIECES = {
    "pad": "<pad>",
    "eos": "<eos>",
    "bos": "<bos>",
    "unk": "<unk>",
    "mask": "<mask>",
    "start_of_turn": "<start_of_turn>",
    "end_of_turn": "<end_of_turn>",
}


class Tokenizer:
    """encode(text, bos=True) -> ids; decode(ids) -> text."""

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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`, with <bos> first (the default: Gemma needs it) and optionally
        <eos> last. Special-token names inside `text` are not turned into control ids."""
        ids = self.sp.encode(text.encode("utf-8"))  # a lone surrogate: UnicodeEncodeError
        if bos:
            ids = [self.bos_id, *ids]
        return [*ids, self.eos_id] if eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; control tokens (<bos>, <eos>, turn markers) give no text."""
        return self.sp.decode([int(i) for i in ids if i != self.bos_id])

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
