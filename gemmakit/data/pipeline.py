"""`prepare`: the whole chain from a YAML config, per source
    read -> quality -> classifier -> safety -> PII scrub -> dedup -> decontaminate -> tokenize
(the classifier only where a source names a model), writing out/<source>/ (token shards and
the cleaned documents.jsonl), out/mixture.json and out/summary.json. Dedup state is shared by
all sources, so a document repeated across sources is kept once. The config's keys, with their
defaults, are in gemmakit/data/config.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gemmakit.atomic import atomic_path, write_json
from gemmakit.data.classifier import KeepPolicy, QualityClassifier, filter_classifier
from gemmakit.data.config import DataConfig, TokenizeConfig, load_config, quality_config
from gemmakit.data.decontaminate import EvalIndex, decontaminate
from gemmakit.data.dedup import ExactDedup, MinHashDedup, dedup_documents
from gemmakit.data.mixture import MIXTURE_FILE
from gemmakit.data.pii import scrub_documents
from gemmakit.data.quality import filter_quality
from gemmakit.data.readers import Document, read_documents
from gemmakit.data.safety import Blocklist, filter_safety
from gemmakit.data.summary import StageSummary
from gemmakit.data.tokenize import Encoder, tokenize_to_shards
from gemmakit.errors import ConfigError
from gemmakit.paths import confined

DEFAULT_CONFIG = Path(__file__).parent / "corpus" / "default.yaml"
DOCUMENTS_FILE = "documents.jsonl"
SUMMARY_FILE = "summary.json"


def _counted(docs: Iterable[Document], summary: StageSummary) -> Iterator[Document]:
    for doc in docs:
        summary.keep()
        yield doc


def _tee(docs: Iterable[Document], f) -> Iterator[Document]:
    for doc in docs:
        f.write(
            json.dumps({"id": doc.id, "text": doc.text, "source": doc.source}, ensure_ascii=False)
            + "\n"
        )
        yield doc


def prepare(
    config: str | Path | dict[str, Any] | DataConfig = DEFAULT_CONFIG,
    out_dir: str | Path | None = None,
    tokenizer: Encoder | str | Path | None = None,
    workers: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the chain; returns (and writes to out/summary.json) what each stage kept and dropped.
    Without a tokenizer (argument or config) it stops after writing documents.jsonl per source,
    e.g. to train a tokenizer on the cleaned text first."""
    t0 = time.perf_counter()
    cfg = config if isinstance(config, DataConfig) else load_config(config)[0]
    out = Path(out_dir or cfg.output or "data_out")
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
    if isinstance(tokenizer, str | Path):
        from gemmakit.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    tok_cfg = cfg.tokenize or TokenizeConfig()
    workers = tok_cfg.workers if workers is None else workers

    blocklist = Blocklist.from_file(cfg.safety.blocklist) if cfg.safety else None
    dd = cfg.dedup
    exact = ExactDedup() if dd and dd.exact else None
    near = (
        MinHashDedup(dd.near.threshold, dd.near.shingle, dd.near.num_perm)
        if dd and dd.near
        else None
    )
    dc = cfg.decontaminate
    eval_index = (
        EvalIndex.from_files(dc.eval, dc.ngram, dc.min_words, dc.text_field) if dc else None
    )

    # every model loaded before any output is written, so a bad file stops the run early
    classifiers = {
        src.classifier["path"]: QualityClassifier.load(src.classifier["path"])
        for src in cfg.sources.values()
        if src.classifier
    }

    report: dict[str, Any] = {"config": cfg.to_dict(), "out_dir": str(out), "sources": {}}
    for name, src in cfg.sources.items():
        stages = [StageSummary("read", name)]
        docs: Iterable[Document] = read_documents(
            src.paths, src.text_field, src.id_field, src.split, source=name
        )
        docs = _counted(docs, stages[-1])
        if src.quality is not False:
            stages.append(StageSummary("quality", name))
            docs = filter_quality(docs, quality_config(src.quality), stages[-1])
        if src.classifier:
            c = src.classifier
            policy = KeepPolicy.from_dict({k: v for k, v in c.items() if k != "path"})
            stages.append(StageSummary("classifier", name))
            docs = filter_classifier(docs, classifiers[c["path"]], policy, stages[-1])
        if blocklist is not None:
            stages.append(StageSummary("safety", name))
            docs = filter_safety(docs, blocklist, stages[-1], cfg.safety.max_hits)
        if cfg.pii:
            stages.append(StageSummary("pii", name))
            docs = scrub_documents(docs, stages[-1], cfg.pii.kinds)
        if exact or near:
            stages.append(StageSummary("dedup", name))
            docs = dedup_documents(docs, stages[-1], exact, near)
        if eval_index is not None:
            stages.append(StageSummary("decontaminate", name))
            docs = decontaminate(docs, eval_index, stages[-1])
        confined(out, name, "config: sources", ConfigError)  # its folder must lie in out
        src_out = out / name
        with atomic_path(src_out / DOCUMENTS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as f:
            docs = _tee(docs, f)
            if tokenizer is not None:
                stages.append(StageSummary("tokenize", name))
                index = tokenize_to_shards(
                    docs,
                    tokenizer,
                    src_out,
                    stages[-1],
                    workers=workers,
                    shard_tokens=tok_cfg.shard_tokens,
                    val_fraction=tok_cfg.val_fraction,
                    meta={"source": name},
                )
                tokens = {s: v["tokens"] for s, v in index["splits"].items()}
            else:
                tokens = None
                for _ in docs:
                    pass
        report["sources"][name] = {
            "stages": [s.to_dict() for s in stages],
            "tokens": tokens,
            "documents": stages[-1].kept,
        }
        if verbose:
            for s in stages:
                print(s.format())
    if tokenizer is not None:
        write_json(
            out / MIXTURE_FILE,
            {"sources": {n: n for n in cfg.sources}, "stages": cfg.mixture.stages},
        )
    report["totals"] = _totals(report["sources"])
    report["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(out / SUMMARY_FILE, report)
    if verbose:
        t = report["totals"]
        tokens = (
            f"{t['train_tokens']} train + {t['val_tokens']} val tokens"
            if tokenizer is not None
            else "no tokenizer: cleaned documents only"
        )
        print(
            f"prepare: {t['read']} documents read, {t['kept']} kept, {tokens} -> {out} "
            f"({report['seconds']:.1f} s)"
        )
    return report


def _totals(sources: dict[str, Any]) -> dict[str, Any]:
    dropped: dict[str, int] = {}
    for src in sources.values():
        for st in src["stages"]:
            for reason, n in st["dropped_by_reason"].items():
                key = f"{st['stage']}: {reason}"
                dropped[key] = dropped.get(key, 0) + n
    return {
        "read": sum(s["stages"][0]["seen"] for s in sources.values()),
        "kept": sum(s["documents"] for s in sources.values()),
        "dropped_by_reason": dropped,
        "train_tokens": sum((s["tokens"] or {}).get("train", 0) for s in sources.values()),
        "val_tokens": sum((s["tokens"] or {}).get("val", 0) for s in sources.values()),
    }


def prepare_default_corpus(
    out_dir: str | Path,
    tokenizer: Encoder | str | Path | None,
    workers: int = 2,
    verbose: bool = False,
) -> dict[str, Any]:
    """The embedded corpus (gemmakit/data/corpus/) through the whole chain into `out_dir`, in a
    few seconds; then MixtureSampler.from_dir(out_dir, total_steps) feeds training."""
    return prepare(DEFAULT_CONFIG, out_dir, tokenizer, workers=workers, verbose=verbose)
