"""Model configuration: one frozen dataclass, one named constructor per released model.

Every architectural difference between Gemma generations is a field here, never a subclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gemmakit.errors import ConfigError


@dataclass(frozen=True)
class TokenIds:
    """Special token ids. Gemma 1 and 2 share these; Gemma 3 moved the turn markers."""

    pad: int = 0
    eos: int = 1
    bos: int = 2
    unk: int = 3
    mask: int = 4
    start_of_turn: int = 106
    end_of_turn: int = 107


GEMMA3_TOKEN_IDS = TokenIds(start_of_turn=105, end_of_turn=106)


# GemmaConfig fields checked at construction: positive integers (None allowed unless required)
_REQUIRED = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
_POSITIVE_INTS = (*_REQUIRED, "max_seq_len", "global_every", "sliding_window", "padded_vocab_size")
_POSITIVE_FLOATS = (
    "rope_theta",
    "rope_local_theta",
    "rope_scaling",
    "norm_eps",
    "query_pre_attn_scalar",
    "attn_logit_softcap",
    "final_logit_softcap",
)


@dataclass(frozen=True)
class GemmaConfig:
    name: str
    vocab_size: int  # rows of the embedding as stored in PyTorch/HF checkpoints
    d_model: int
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # 1: multi-query; n_heads: multi-head; in between: grouped
    head_dim: int
    ffn_dim: int  # width of the gate projection (the up projection has the same width)
    max_seq_len: int = 8192
    rope_theta: float = 10_000.0  # global layers
    rope_local_theta: float | None = None  # local layers; None: same as rope_theta
    rope_scaling: float = 1.0  # linear position scaling on global layers (Gemma 3 4B+)
    norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # queries scaled by this**-0.5; None: head_dim
    sandwich_norm: bool = False  # Gemma 2/3: RMSNorm on attention and MLP outputs too
    qk_norm: bool = False  # Gemma 3: RMSNorm on each query and key head before RoPE
    attn_logit_softcap: float | None = None  # Gemma 2: 50
    final_logit_softcap: float | None = None  # Gemma 2: 30
    sliding_window: int | None = None  # window of the local layers
    # Layer i is global when (i + 1) % global_every == 0; 1 (or no window): all global.
    global_every: int = 1
    padded_vocab_size: int | None = None  # the Flax/Table 1 vocabulary, with padding rows
    tokens: TokenIds = field(default_factory=TokenIds)

    def __post_init__(self) -> None:
        """Every field in its range (a config read from a file is checked here too): a
        ConfigError names the field and its value."""

        def bad(field_name: str, want: str) -> ConfigError:
            value = getattr(self, field_name)
            error = ConfigError(f"config {self.name!r}: {field_name}={value!r} must be {want}")
            error.field = field_name  # for a reader to name the field as its file calls it
            return error

        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if value is not None or name in _REQUIRED:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise bad(name, "a positive integer")
        layers = self.n_layers  # 0 is allowed: embedding and final norm only (tests use it)
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise bad("n_layers", "an integer >= 0")
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if value is not None:
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if not number or not 0 < value < float("inf"):
                    raise bad(name, "a positive number")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config {self.name!r}: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise bad("head_dim", "even (RoPE turns pairs of dimensions)")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise bad("padded_vocab_size", f">= vocab_size={self.vocab_size}")
        if not isinstance(self.tokens, TokenIds):
            raise bad("tokens", "a TokenIds")
        for name, value in self.tokens.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"config {self.name!r}: token id {name}={value!r} must be a non-negative "
                    "integer"
                )

    @property
    def generation(self) -> int:
        """1, 2 or 3: the Gemma generation these fields describe (q/k norms mean Gemma 3,
        sandwich norms Gemma 2); what checkpoint formats name the architecture by."""
        return 3 if self.qk_norm else 2 if self.sandwich_norm else 1

    @property
    def query_scale(self) -> float:
        scalar = self.query_pre_attn_scalar or self.head_dim
        return scalar**-0.5

    def is_local(self, layer: int) -> bool:
        """True for a sliding-window layer."""
        if self.sliding_window is None or self.global_every == 1:
            return False
        return (layer + 1) % self.global_every != 0

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    # --- parameter counts (report Table 2) -------------------------------------------------

    def embedding_params(self, padded: bool = False) -> int:
        vocab = self.padded_vocab_size if padded and self.padded_vocab_size else self.vocab_size
        return vocab * self.d_model

    def non_embedding_params(self) -> int:
        d, hd = self.d_model, self.head_dim
        attn = 2 * d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd
        mlp = 3 * d * self.ffn_dim
        norms = (4 if self.sandwich_norm else 2) * d + (2 * hd if self.qk_norm else 0)
        return self.n_layers * (attn + mlp + norms) + d


# --- Gemma 1 (report Table 1); Gemma 1.0 and 1.1 share the architecture ----------------------


def gemma_2b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma-2b",
        vocab_size=256_000,
        padded_vocab_size=256_128,
        d_model=2048,
        n_layers=18,
        n_heads=8,
        n_kv_heads=1,
        head_dim=256,
        ffn_dim=16_384,
    )


def gemma_7b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma-7b",
        vocab_size=256_000,
        padded_vocab_size=256_128,
        d_model=3072,
        n_layers=28,
        n_heads=16,
        n_kv_heads=16,
        head_dim=256,
        ffn_dim=24_576,
    )


# --- Gemma 2 --------------------------------------------------------------------------------

_GEMMA2 = dict(
    vocab_size=256_000,
    padded_vocab_size=256_128,
    sandwich_norm=True,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    sliding_window=4096,
    global_every=2,
    head_dim=256,
)


def gemma2_2b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma2-2b",
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=9216,
        **_GEMMA2,
    )


def gemma2_9b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma2-9b",
        d_model=3584,
        n_layers=42,
        n_heads=16,
        n_kv_heads=8,
        ffn_dim=14_336,
        **_GEMMA2,
    )


def gemma2_27b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma2-27b",
        d_model=4608,
        n_layers=46,
        n_heads=32,
        n_kv_heads=16,
        ffn_dim=36_864,
        query_pre_attn_scalar=4608 / 32,
        **{**_GEMMA2, "head_dim": 128},
    )


# --- Gemma 3 (text) -------------------------------------------------------------------------

_GEMMA3 = dict(
    vocab_size=262_144,
    sandwich_norm=True,
    qk_norm=True,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    global_every=6,
    head_dim=256,
    tokens=GEMMA3_TOKEN_IDS,
    max_seq_len=32_768,
)


def gemma3_270m() -> GemmaConfig:
    return GemmaConfig(
        name="gemma3-270m",
        d_model=640,
        n_layers=18,
        n_heads=4,
        n_kv_heads=1,
        ffn_dim=2048,
        sliding_window=512,
        **_GEMMA3,
    )


def gemma3_1b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma3-1b",
        d_model=1152,
        n_layers=26,
        n_heads=4,
        n_kv_heads=1,
        ffn_dim=6912,
        sliding_window=512,
        **_GEMMA3,
    )


def gemma3_4b() -> GemmaConfig:
    return GemmaConfig(
        name="gemma3-4b",
        d_model=2560,
        n_layers=34,
        n_heads=8,
        n_kv_heads=4,
        ffn_dim=10_240,
        sliding_window=1024,
        rope_scaling=8.0,
        **{**_GEMMA3, "max_seq_len": 131_072},
    )


# --- small presets for tests and the tiny recipe -----------------------------------------


def tiny() -> GemmaConfig:
    """A Gemma-1-shaped model small enough to train in minutes on 2 CPU cores."""
    return GemmaConfig(
        name="tiny",
        vocab_size=4096,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=1,
        head_dim=32,
        ffn_dim=512,
        max_seq_len=512,
    )


def tiny_gemma2() -> GemmaConfig:
    return gemma2_2b().replace(
        name="tiny-gemma2",
        vocab_size=4096,
        padded_vocab_size=None,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        ffn_dim=512,
        max_seq_len=512,
        sliding_window=16,
    )


def tiny_gemma3() -> GemmaConfig:
    return gemma3_270m().replace(
        name="tiny-gemma3",
        vocab_size=4096,
        d_model=128,
        n_layers=6,
        n_heads=4,
        n_kv_heads=1,
        head_dim=32,
        ffn_dim=512,
        max_seq_len=512,
        sliding_window=16,
    )


PRESETS = {
    cfg().name: cfg
    for cfg in (
        gemma_2b,
        gemma_7b,
        gemma2_2b,
        gemma2_9b,
        gemma2_27b,
        gemma3_270m,
        gemma3_1b,
        gemma3_4b,
        tiny,
        tiny_gemma2,
        tiny_gemma3,
    )
}


def get_config(name: str) -> GemmaConfig:
    """The preset called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
