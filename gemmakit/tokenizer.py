"""The Gemma tokenizer: a SentencePiece model with Gemma's special ids."""

from __future__ import annotations

from pathlib import Path


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
            raise ValueError(f"{label}: not a SentencePiece model ({e})") from e
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i != self.bos_id])

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


def load_tokenizer(source: str | Path) -> Tokenizer:
    """A tokenizer from a `.model` file, a checkpoint directory holding `tokenizer.model`,
    a `.gguf` file (its vocabulary) or an installed model name (gemma3-270m)."""
    from gemmakit.installed import installed_model_path

    path = installed_model_path(str(source)) or Path(source)
    if path.suffix == ".gguf":
        from gemmakit.checkpoint.gguf import sentencepiece_proto_from_gguf

        return Tokenizer(model_proto=sentencepiece_proto_from_gguf(path), name=str(path))
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer file")
    return Tokenizer(path)
