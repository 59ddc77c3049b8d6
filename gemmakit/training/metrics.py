"""What a run reports: FLOPs per token, the device's peak, MFU, and a JSONL/TensorBoard log."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from gemmakit.atomic import atomic_path
from gemmakit.config import GemmaConfig
from gemmakit.errors import DataError

# Dense bf16 peaks (no sparsity), per GPU, by name fragment as torch reports it.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12 (pass --set log.peak_flops=756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def train_flops_per_token(config: GemmaConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward) when every weight trains and
    every position is a target, as in PaLM's MFU: 6 * N for the weights (N: non-embedding
    parameters plus the output projection, which the tied embedding computes) + 12 * layers *
    heads * head_dim * seq_len for attention scores and values (causal masking not
    subtracted, as PaLM counts it). `StepFlops` counts any other run."""
    n = config.non_embedding_params() + config.vocab_size * config.d_model
    return 6 * n + attention_flops_per_token(config, seq_len)


def attention_flops_per_token(config: GemmaConfig, seq_len: int, backward: bool = True) -> float:
    """QK^T and AV of one position against seq_len keys: 4 per multiply-add pair forward, 8
    backward (both operands need gradients whether or not any weight trains)."""
    return (12 if backward else 4) * config.n_layers * config.n_heads * config.head_dim * seq_len


def forward_flops(config: GemmaConfig, tokens: float, logits: float, seq_len: int) -> float:
    """Model FLOPs of forward passes without gradients (a frozen teacher, a reference model, a
    reward model, sampling) over `tokens` positions, `logits` of them through the tied output
    head, with attention against seq_len keys counted as in training: 2 per body weight per
    token, 2 * V * D per logit."""
    per_token = 2 * config.non_embedding_params() + attention_flops_per_token(
        config, seq_len, backward=False
    )
    return per_token * tokens + 2 * config.vocab_size * config.d_model * logits


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of a training step (matmuls, as PaLM counts them) from what it computed:

    - per token (a position holding a token, not padding): 2 FLOPs per body weight forward
      and 2 for its input's gradient, plus 2 per body weight that trains (its own gradient:
      none for a frozen base under LoRA, so ~4N there, not 6N), plus attention;
    - per logit (a position whose next-token logits the loss takes: SFT's model turns, not
      the prompt): 2 * V * D forward through the tied head, 2 * V * D for the hidden
      state's gradient, and 2 * V * D more when the embedding trains.
    Full training on every position gives train_flops_per_token per token.
    """

    per_token: float
    per_logit: float

    @classmethod
    def of(cls, model: nn.Module, seq_len: int) -> StepFlops:
        """From the model as it trains (after adapters and freezing): its matrices outside
        the embedding (body, LoRA adapters included) and which of them have requires_grad."""
        cfg = model.config
        body = trained = 0
        for name, p in model.named_parameters():
            if name.endswith("embedder.weight"):
                continue
            body += p.numel()
            trained += p.numel() if p.requires_grad else 0
        head = cfg.vocab_size * cfg.d_model
        head_trains = model.embedder.weight.requires_grad
        per_token = 4 * body + 2 * trained + attention_flops_per_token(cfg, seq_len)
        return cls(per_token, (6 if head_trains else 4) * head)

    def __call__(self, tokens: float, logits: float) -> float:
        return self.per_token * tokens + self.per_logit * logits


def measured_peak_flops(device_type: str, dtype: torch.dtype, threads: int = 0) -> float:
    """Matmul FLOP/s this device reaches in `dtype` with torch's current threads (the run's):
    the CPU's practical peak, which has no datasheet figure to look up. Measured once per
    (device, dtype, thread count); `threads` is torch.get_num_threads() when 0."""
    return _matmul_rate(device_type, dtype, threads or torch.get_num_threads())


@cache
def _matmul_rate(device_type: str, dtype: torch.dtype, threads: int) -> float:
    """The fastest of repeated 1024^3 matmuls over ~0.3 s, after a warm-up. The fastest,
    over a window longer than a scheduler slice: on a shared machine another process taking
    a core for a moment slows every op that waits on all threads: a peak taken in such a
    moment (a few 25 ms matmuls) reads low, up to half, and MFU that much too high. On a
    2-core EPYC, 512 to 3072 give the same rate within noise (~80 GFLOP/s float32 on 1
    thread, ~130 on 2): the size is not what limits it."""
    n = 1024
    gen = torch.Generator(device_type).manual_seed(0)  # the global RNG stays as it was
    a = torch.randn(n, n, device=device_type, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device_type, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device_type, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    best, end, runs = float("inf"), time.perf_counter() + 0.3, 0
    while runs < 5 or time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device_type == "cuda":
            torch.cuda.synchronize()
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float:
    """Per-device peak FLOP/s for MFU: the override, the datasheet value of a known GPU, or
    (CPU, unknown GPU) a measured matmul rate. A CPU without native bf16 emulates bf16 matmuls
    far below its float32 rate, so its peak is the faster of the two (else MFU exceeds 100%)."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2
    measured = measured_peak_flops(device.type, dtype)
    if device.type == "cpu" and dtype != torch.float32:
        measured = max(measured, measured_peak_flops("cpu", torch.float32))
    return measured


class MetricsLog:
    """Appends one JSON object per record to RUN/metrics.jsonl (and TensorBoard scalars when
    the package is installed and wanted). Only rank 0 makes one."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            # A resumed run drops what it logged after its last checkpoint: those steps rerun.
            keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """RUN/metrics.jsonl's records. A torn last line (a run killed mid-write) is dropped with
    a warning; a bad line before it is a DataError naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise DataError(f"{path}:{i}: not a JSON record ({e.msg})") from None
            warnings.warn(f"{path}:{i}: dropped a torn last line ({line[:40]!r})", stacklevel=2)
    return records
