"""A SentencePiece model rebuilt from a GGUF file's vocabulary (tokenizer.ggml.*).

A "llama" GGUF vocabulary is a SentencePiece BPE model flattened into three arrays: piece text,
score (the merge priority) and type, whose numbering (1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte) is SentencePiece's own. Undone here, from llama.cpp's converter:
- user-defined pieces had "\u2581" turned into real spaces ("  " is stored for "\u2581\u2581");
- the unknown piece is marked control, but SentencePiece needs exactly one UNKNOWN piece.
Control pieces (<bos>, the turn markers) stay control: never matched in text, so a message that
contains "<start_of_turn>" cannot open a turn (see gemmakit/chat.py).
"""

from __future__ import annotations

from pathlib import Path

from gemmakit.checkpoint.gguf_file import GGUFFile
from gemmakit.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.ModelType
SPACE = "\u2581"


def sentencepiece_proto_from_gguf(path: str | Path) -> bytes:
    """The serialized SentencePiece ModelProto of the GGUF file's vocabulary."""
    path = Path(path)
    return sentencepiece_proto_from_metadata(GGUFFile(path).metadata, str(path))


def sentencepiece_proto_from_metadata(meta: dict, name: str = "gguf") -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise CheckpointError(
            f"{name}: tokenizer.ggml.model is {kind!r}; only 'llama' (SentencePiece)"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise CheckpointError(f"{name}: tokenizer.ggml tokens/scores/token_type lengths differ")
    ids = {
        key: meta.get(f"tokenizer.ggml.{key}")
        for key in ("unknown_token_id", "bos_token_id", "eos_token_id", "padding_token_id")
    }
    if ids["unknown_token_id"] is None:
        raise CheckpointError(f"{name}: tokenizer.ggml.unknown_token_id is missing")

    model = pb.ModelProto()
    for i, (text, score, kind_) in enumerate(zip(tokens, scores, types)):
        piece = model.pieces.add()
        if i == ids["unknown_token_id"]:
            kind_ = UNKNOWN
        if kind_ == USER_DEFINED:
            text = text.replace(" ", SPACE)
        piece.piece, piece.score, piece.type = text, float(score), int(kind_)

    spec = model.trainer_spec
    spec.model_type = BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(t == BYTE for t in types)
    spec.unk_id = ids["unknown_token_id"]
    spec.bos_id = -1 if ids["bos_token_id"] is None else ids["bos_token_id"]
    spec.eos_id = -1 if ids["eos_token_id"] is None else ids["eos_token_id"]
    spec.pad_id = -1 if ids["padding_token_id"] is None else ids["padding_token_id"]
    pieces = {
        "unk_piece": "unknown_token_id",
        "bos_piece": "bos_token_id",
        "eos_piece": "eos_token_id",
        "pad_piece": "padding_token_id",
    }
    for field, key in pieces.items():
        if ids[key] is not None:
            setattr(spec, field, tokens[ids[key]])
    # Gemma's whitespace handling: no dummy prefix, runs of spaces kept, digits split
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()
