"""gemmakit models inside lm-evaluation-harness: `GemmakitLM`, registered as "gemmakit".

Importing this module registers the model in lm-eval's registry (lm-eval finds models only
there: it has no plugin entry points), so after it

    lm_eval.simple_evaluate(model="gemmakit", model_args="model=gemma3-270m,dtype=float32",
                            tasks=[...])

or `lm_eval.simple_evaluate(model=GemmakitLM(...), tasks=[...])` work, and `gemmakit lm-eval
ARGS...` runs lm-eval's own command line with it. Requests are answered by `ModelRunner`, which
tokenizes as lm-eval's HF backend does (BOS first, the context/continuation split of
`_encode_pair`), so both backends give the same per-request log-likelihoods.

model_args: model (an installed model, a preset or a checkpoint path) or checkpoint (a path),
dtype, adapter (a PEFT LoRA folder), tokenizer, device, batch_size, max_length, chat (wrap
prompts in Gemma's chat format), max_gen_toks (default when a task gives none), seed.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from gemmakit.errors import UsageError
from gemmakit.evaluation.requests import Generate, Loglikelihood, Rolling
from gemmakit.evaluation.runner import ModelRunner

DEFAULT_BATCH_SIZE = 16


def _flag(value: Any) -> bool:
    """A model_args boolean: lm-eval passes "True"/"false"/1 as parsed or as text."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@register_model("gemmakit")
class GemmakitLM(LM):
    """lm-eval's LM over a `ModelRunner`: give `runner`, or the model_args that load one."""

    def __init__(
        self,
        model: str | None = None,
        checkpoint: str | None = None,
        dtype: str | None = None,
        adapter: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        chat: bool | str = False,
        max_gen_toks: int = 256,
        seed: int = 1234,
        runner: ModelRunner | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise UsageError(f"gemmakit model_args: unknown {', '.join(sorted(unused))}")
        # "auto" (lm-eval's batch-size search) and an unset size take the default
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            size = DEFAULT_BATCH_SIZE
        else:
            size = int(batch_size)
        if runner is None:
            if (model is None) == (checkpoint is None):
                raise UsageError("gemmakit model_args: give one of model=... or checkpoint=...")
            runner = ModelRunner.load(
                model or checkpoint,
                dtype=dtype,
                adapter=adapter,
                tokenizer=tokenizer,
                device=_device(device),
                batch_size=size,
                max_length=int(max_length) if max_length else None,
                chat=_flag(chat),
            )
        self.runner = runner
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._device = runner.model.device

    @property
    def tokenizer_name(self) -> str:
        path = getattr(self.runner.tokenizer, "path", None)
        return str(path) if path is not None else "gemmakit"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        asked = [Loglikelihood(*r.args) for r in requests]
        out = []
        for r, res in zip(requests, self.runner.loglikelihood(asked)):
            answer = (res.logprob, res.greedy)
            self.cache_hook.add_partial("loglikelihood", r.args, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        asked = [Rolling(r.args[0]) for r in requests]
        out = self.runner.loglikelihood_rolling(asked)
        for r, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, answer)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's (context, gen_kwargs): `until` (stop sequences, cut from the
        text), `max_gen_toks` (or its aliases), `do_sample`, `temperature`, `top_p`."""
        asked = []
        for r in requests:
            context, gen_kwargs = r.args
            kw = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
            if kw.get("do_sample") and temperature == 0.0:
                temperature = 1.0  # sampling asked with no temperature: HF's default
            until = kw.get("until") or []
            asked.append(
                Generate(
                    context,
                    max_new_tokens=int(kw["max_gen_toks"]),
                    stop=tuple([until] if isinstance(until, str) else until),
                    temperature=temperature,
                    top_p=float(kw.get("top_p") or 1.0),
                    seed=self.seed,
                )
            )
        out = [answers[0] for answers in self.runner.generate(asked)]
        for r, answer in zip(requests, out):
            self.cache_hook.add_partial("generate_until", r.args, answer)
        return out


def _device(name: str | None) -> str | None:
    """lm-eval's configuration defaults --device to cuda:0: on a machine without CUDA that
    default means the CPU; any other device is used as named."""
    if name is not None and name.startswith("cuda") and not torch.cuda.is_available():
        return None
    return name
