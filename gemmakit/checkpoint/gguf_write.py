"""Writing a model as a GGUF file (llama.cpp, Ollama): the reverse of gemmakit/checkpoint/gguf.py.

What llama.cpp's own converter does to Gemma weights, done here too:
- every RMSNorm weight is stored as 1 + w, in float32 (as are all 1-D tensors);
- q and k rows are stored as they are (no LLaMA-style RoPE permutation for Gemma);
- the vocabulary is stored as three arrays (piece, score, SentencePiece type), user-defined
  pieces with "\u2581" written as a space, padded with unused `[PADn]` pieces up to the
  embedding's rows (llama.cpp wants as many tokens as rows).
The metadata is checked by reading it back with `config_from_gguf`: a config that GGUF cannot
express (llama.cpp hard-codes some fields per architecture) is an error, not a silent change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import GGUFWriter, LlamaFileType, quants

from gemmakit.atomic import atomic_path
from gemmakit.checkpoint.gguf import ARCHITECTURES, config_from_gguf
from gemmakit.checkpoint.gguf_vocab import SPACE, UNUSED, USER_DEFINED
from gemmakit.checkpoint.layouts import gguf_layout
from gemmakit.checkpoint.save import prepare_output
from gemmakit.config import GemmaConfig
from gemmakit.errors import CheckpointError
from gemmakit.model.transformer import Gemma

__all__ = ["GGUF_DTYPES", "gguf_metadata", "save_gguf"]

# dtype name -> (stored type of matrices, general.file_type)
GGUF_DTYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32; a row of another length is stored f16


def architecture(config: GemmaConfig) -> str:
    """llama.cpp's name for the config's Gemma generation."""
    return ARCHITECTURES[config.generation - 1]


def gguf_metadata(config: GemmaConfig, tokenizer: Any = None) -> dict[str, tuple[Any, V]]:
    """key -> (value, GGUF value type; for a list, its items' type) for `config` and, when
    given, a gemmakit Tokenizer: the keys llama.cpp's converter writes for the architecture."""
    arch = architecture(config)
    meta: dict[str, tuple[Any, V]] = {
        "general.architecture": (arch, V.STRING),
        "general.type": ("model", V.STRING),
        "general.name": (config.name, V.STRING),
    }
    u32 = {
        "context_length": config.max_seq_len,
        "embedding_length": config.d_model,
        "block_count": config.n_layers,
        "feed_forward_length": config.ffn_dim,
        "attention.head_count": config.n_heads,
        "attention.head_count_kv": config.n_kv_heads,
        "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim,
    }
    f32: dict[str, float | None] = {
        "attention.layer_norm_rms_epsilon": config.norm_eps,
        "rope.freq_base": config.rope_theta,
    }
    if arch != "gemma":
        u32["attention.sliding_window"] = config.sliding_window
        f32["attn_logit_softcapping"] = config.attn_logit_softcap
        f32["final_logit_softcapping"] = config.final_logit_softcap
    for key, value in u32.items():
        if value is not None:
            meta[f"{arch}.{key}"] = (int(value), V.UINT32)
    for key, value in f32.items():
        if value is not None:
            meta[f"{arch}.{key}"] = (float(value), V.FLOAT32)
    if config.rope_scaling != 1.0:
        meta[f"{arch}.rope.scaling.type"] = ("linear", V.STRING)
        meta[f"{arch}.rope.scaling.factor"] = (float(config.rope_scaling), V.FLOAT32)
    if tokenizer is not None:
        meta |= _vocabulary(tokenizer, config.vocab_size)
    return meta


def _vocabulary(tokenizer: Any, rows: int) -> dict[str, tuple[Any, V]]:
    """tokenizer.ggml.* of a SentencePiece model (a gemmakit Tokenizer), padded to `rows`."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(tokenizer.sp.serialized_model_proto())
    if len(proto.pieces) > rows:
        raise CheckpointError(
            f"the tokenizer has {len(proto.pieces)} pieces, more than the model's {rows} "
            f"embedding rows"
        )
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        tokens.append(p.piece.replace(SPACE, " ") if p.type == USER_DEFINED else p.piece)
        scores.append(float(p.score))
        types.append(int(p.type))
    for i in range(len(tokens), rows):  # rows the vocabulary does not use, as llama.cpp pads
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    sp = tokenizer.sp
    meta: dict[str, tuple[Any, V]] = {
        "tokenizer.ggml.model": ("llama", V.STRING),
        "tokenizer.ggml.pre": ("default", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.STRING),
        "tokenizer.ggml.scores": (scores, V.FLOAT32),
        "tokenizer.ggml.token_type": (types, V.INT32),
    }
    special = {
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "unknown_token_id": sp.unk_id(),
        "padding_token_id": sp.pad_id(),
    }
    for key, i in special.items():
        if i >= 0:
            meta[f"tokenizer.ggml.{key}"] = (i, V.UINT32)
    meta |= {
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),  # Gemma needs <bos> first
        "tokenizer.ggml.add_sep_token": (False, V.BOOL),
        "tokenizer.ggml.add_eos_token": (False, V.BOOL),
        "tokenizer.ggml.add_space_prefix": (bool(proto.normalizer_spec.add_dummy_prefix), V.BOOL),
    }
    return meta


def _check_expressible(config: GemmaConfig, meta: dict[str, tuple[Any, V]]) -> None:
    """The config read back from `meta` (floats as float32) must be `config`."""
    stored = {
        k: float(np.float32(v)) if t == V.FLOAT32 and not isinstance(v, list) else v
        for k, (v, t) in meta.items()
    }
    back = config_from_gguf(stored, config.vocab_size)

    def same(c: GemmaConfig) -> GemmaConfig:  # what the file does not need to carry
        scalar = None if c.query_pre_attn_scalar == c.head_dim else c.query_pre_attn_scalar
        return c.replace(
            name="", padded_vocab_size=None, tokens=config.tokens, query_pre_attn_scalar=scalar
        )

    if same(back) != same(config):
        diff = [
            f"{f}={getattr(config, f)!r} (GGUF gives {getattr(back, f)!r})"
            for f in config.__dataclass_fields__
            if getattr(same(config), f) != getattr(same(back), f)
        ]
        raise CheckpointError(
            f"config {config.name!r} cannot be written as a {meta['general.architecture'][0]} "
            f"GGUF, llama.cpp would read it differently: {', '.join(diff)}"
        )


def _tensor(t: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q]:
    """(array for GGUFWriter.add_tensor, its stored type) of a float tensor (out, in)."""
    if qtype == Q.Q8_0 and t.shape[-1] % Q8_BLOCK:
        qtype = Q.F16
    if qtype == Q.F32:
        return t.float().numpy(), qtype  # GGUFWriter tells F32 and F16 by the numpy dtype
    if qtype == Q.F16:
        return t.half().numpy(), qtype
    if qtype == Q.BF16:  # round to nearest even, as ggml does; stored as raw bytes
        raw = t.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint8)
        return raw.reshape(*t.shape[:-1], -1), qtype
    return quants.quantize(t.float().numpy(), qtype), qtype  # uint8 [rows, bytes per row]


def save_gguf(
    model: Gemma,
    path: str | Path,
    tokenizer: Any = None,
    dtype: str = "f16",
) -> Path:
    """Write `model` as a llama.cpp GGUF file at `path`, atomically.

    tokenizer: a gemmakit Tokenizer whose vocabulary goes into the file (llama.cpp and Ollama
    need one); None writes the weights and config only.
    dtype: how matrices are stored: "f32", "f16", "bf16" or "q8_0" (blocks of 32 int8 with a
    float16 scale). Norm weights are always float32.
    """
    path = Path(path)
    prepare_output(path, folder=False)
    if dtype not in GGUF_DTYPES:
        raise CheckpointError(f"unknown GGUF dtype {dtype!r}; choose from {', '.join(GGUF_DTYPES)}")
    qtype, file_type = GGUF_DTYPES[dtype]
    config = model.config
    meta = gguf_metadata(config, tokenizer)
    _check_expressible(config, meta)
    meta["general.file_type"] = (int(file_type), V.UINT32)
    meta["general.quantization_version"] = (2, V.UINT32)  # GGML_QNT_VERSION

    layout = gguf_layout(config)
    try:
        with atomic_path(path) as tmp:
            writer = GGUFWriter(tmp, meta["general.architecture"][0])
            try:
                for key, (value, vtype) in meta.items():
                    if key == "general.architecture":
                        continue  # GGUFWriter writes it
                    if isinstance(value, list):
                        writer.add_key_value(key, value, V.ARRAY, sub_type=vtype)
                    else:
                        writer.add_key_value(key, value, vtype)
                for name, param in model.named_parameters():
                    spec = layout[name]
                    t = param.detach().to("cpu")
                    if spec.transform is not None:  # a norm: the reader removes this +1
                        array, stored = (t.float() + 1.0).numpy(), Q.F32
                    else:
                        array, stored = _tensor(t, qtype)
                    raw = stored if array.dtype == np.uint8 else None
                    writer.add_tensor(spec.key, array, raw_dtype=raw)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from e
    return path
