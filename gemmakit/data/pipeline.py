"""`prepare`: the whole chain from a YAML config, per source
    read -> quality -> classifier -> safety -> PII scrub -> dedup -> decontaminate -> tokenize
(the classifier only where a source names a model), writing out/<source>/ (token shards and
the cleaned documents.jsonl), out/mixture.json and out/summary.json. Dedup state is shared by
all sources, so a document repeated across sources is kept once. The config keys (all optional
but `sources`) are in DEFAULTS below."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from gemmakit.atomic import atomic_path, write_json
from gemmakit.data.classifier import KeepPolicy, QualityClassifier, filter_classifier
from gemmakit.data.decontaminate import EvalIndex, decontaminate
from gemmakit.data.dedup import ExactDedup, MinHashDedup, dedup_documents
from gemmakit.data.mixture import MIXTURE_FILE, check_stages
from gemmakit.data.pii import KINDS, scrub_documents
from gemmakit.data.quality import QualityConfig, filter_quality
from gemmakit.data.readers import Document, read_documents
from gemmakit.data.safety import Blocklist, filter_safety
from gemmakit.data.summary import StageSummary
from gemmakit.data.tokenize import Encoder, tokenize_to_shards
from gemmakit.errors import ConfigError, MissingFileError
from gemmakit.paths import confined

DEFAULT_CONFIG = Path(__file__).parent / "corpus" / "default.yaml"
DOCUMENTS_FILE = "documents.jsonl"
SUMMARY_FILE = "summary.json"

# every key a config may hold, with its default; a stage set to false is skipped
DEFAULTS: dict[str, Any] = {
    "output": None,  # folder; the CLI's --out or prepare(out_dir=) wins
    "tokenizer": None,  # SentencePiece .model path (or pass a tokenizer object)
    # name: {paths: [...], text_field, id_field, split, quality: {...} | false,
    #        classifier: {path: MODEL.npz, policy: threshold | pareto, threshold, alpha, seed}}
    "sources": {},
    "safety": {"blocklist": None, "max_hits": 0},
    "pii": {"kinds": list(KINDS)},
    "dedup": {"exact": True, "near": {"threshold": 0.8, "shingle": 5, "num_perm": 128}},
    "decontaminate": {"eval": [], "ngram": 13, "min_words": 8, "text_field": "*"},
    "tokenize": {"workers": 2, "shard_tokens": 1 << 26, "val_fraction": 0.01},
    "mixture": None,  # {stages: [{until, weights}, ...]}; default: one stage, equal weights
}
SOURCE_KEYS = {"paths", "text_field", "id_field", "split", "quality", "classifier"}


def _merge(name: str, default: Any, given: Any) -> Any:
    if given is False or given is None:
        return False if given is False else default
    if isinstance(default, dict) and default:
        if not isinstance(given, dict):
            raise ConfigError(f"config: {name} must be a mapping, got {given!r}")
        unknown = set(given) - set(default)
        if unknown:
            raise ConfigError(
                f"config: unknown key(s) {sorted(unknown)} under {name} (known: {sorted(default)})"
            )
        return {k: _merge(f"{name}.{k}", v, given.get(k)) for k, v in default.items()}
    return given


def load_config(source: str | Path | dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """(config with defaults filled in and paths resolved, base folder) from a YAML file or a
    dict (whose relative paths are taken from the current folder)."""
    if isinstance(source, dict):
        raw, base = source, Path.cwd()
    else:
        path = Path(source)
        if not path.exists():
            raise MissingFileError(f"{path}: no config file")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        base = path.parent
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    cfg = {k: _merge(k, v, raw.get(k)) for k, v in DEFAULTS.items()}
    if not cfg["sources"]:
        raise ConfigError("config: no sources")
    for name, src in cfg["sources"].items():
        if not isinstance(src, dict) or "paths" not in src:
            raise ConfigError(f"config: sources.{name} needs paths: [FILE or FOLDER, ...]")
        unknown = set(src) - SOURCE_KEYS
        if unknown:
            raise ConfigError(
                f"config: unknown key(s) {sorted(unknown)} under sources.{name} "
                f"(known: {sorted(SOURCE_KEYS)})"
            )
        paths = [src["paths"]] if isinstance(src["paths"], str) else src["paths"]
        src["paths"] = [str(base / p) for p in paths]
        if src.get("classifier"):
            src["classifier"] = _classifier_config(src["classifier"], name, base)
    if cfg["safety"] and cfg["safety"]["blocklist"]:
        cfg["safety"]["blocklist"] = str(base / cfg["safety"]["blocklist"])
    elif cfg["safety"]:
        cfg["safety"] = False  # nothing to block against
    if cfg["decontaminate"]:
        evals = cfg["decontaminate"]["eval"]
        evals = [evals] if isinstance(evals, str) else evals
        cfg["decontaminate"]["eval"] = [str(base / p) for p in evals]
        if not evals:
            cfg["decontaminate"] = False
    for key in ("tokenizer", "output"):
        if cfg[key]:
            cfg[key] = str(base / cfg[key])
    names = list(cfg["sources"])
    stages = (cfg["mixture"] or {}).get("stages") or [
        {"until": 1.0, "weights": dict.fromkeys(names, 1.0)}
    ]
    cfg["mixture"] = {"stages": check_stages(stages, names)}
    return cfg, base


def _classifier_config(c: Any, name: str, base: Path) -> dict[str, Any]:
    """sources.NAME.classifier checked (a policy error names the key), its path resolved."""
    where = f"config: sources.{name}.classifier"
    if not isinstance(c, dict) or not isinstance(c.get("path"), str):
        raise ConfigError(f"{where} needs path: MODEL.npz (and policy, threshold or alpha)")
    KeepPolicy.from_dict({k: v for k, v in c.items() if k != "path"}, where)
    return {**c, "path": str(base / c["path"])}


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
    config: str | Path | dict[str, Any] = DEFAULT_CONFIG,
    out_dir: str | Path | None = None,
    tokenizer: Encoder | str | Path | None = None,
    workers: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the chain; returns (and writes to out/summary.json) what each stage kept and dropped.
    Without a tokenizer (argument or config) it stops after writing documents.jsonl per source,
    e.g. to train a tokenizer on the cleaned text first."""
    t0 = time.perf_counter()
    cfg, _ = load_config(config)
    out = Path(out_dir or cfg["output"] or "data_out")
    tokenizer = tokenizer if tokenizer is not None else cfg["tokenizer"]
    if isinstance(tokenizer, str | Path):
        from gemmakit.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    tok_cfg = cfg["tokenize"] or DEFAULTS["tokenize"]
    if workers is not None:
        tok_cfg = {**tok_cfg, "workers": workers}

    blocklist = Blocklist.from_file(cfg["safety"]["blocklist"]) if cfg["safety"] else None
    dd = cfg["dedup"]
    exact = ExactDedup() if dd and dd["exact"] else None
    near = MinHashDedup(**dd["near"]) if dd and dd["near"] else None
    dc = cfg["decontaminate"]
    eval_index = (
        EvalIndex.from_files(dc["eval"], dc["ngram"], dc["min_words"], dc["text_field"])
        if dc
        else None
    )

    # every model loaded before any output is written, so a bad file stops the run early
    classifiers = {
        src["classifier"]["path"]: QualityClassifier.load(src["classifier"]["path"])
        for src in cfg["sources"].values()
        if src.get("classifier")
    }

    report: dict[str, Any] = {"config": cfg, "out_dir": str(out), "sources": {}}
    for name, src in cfg["sources"].items():
        stages = [StageSummary("read", name)]
        docs: Iterable[Document] = read_documents(
            src["paths"],
            src.get("text_field", "text"),
            src.get("id_field", "id"),
            src.get("split", "file"),
            source=name,
        )
        docs = _counted(docs, stages[-1])
        if src.get("quality", {}) is not False:
            stages.append(StageSummary("quality", name))
            docs = filter_quality(docs, QualityConfig.from_dict(src.get("quality")), stages[-1])
        if src.get("classifier"):
            c = src["classifier"]
            policy = KeepPolicy.from_dict({k: v for k, v in c.items() if k != "path"})
            stages.append(StageSummary("classifier", name))
            docs = filter_classifier(docs, classifiers[c["path"]], policy, stages[-1])
        if blocklist is not None:
            stages.append(StageSummary("safety", name))
            docs = filter_safety(docs, blocklist, stages[-1], cfg["safety"]["max_hits"])
        if cfg["pii"]:
            stages.append(StageSummary("pii", name))
            docs = scrub_documents(docs, stages[-1], cfg["pii"]["kinds"])
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
                    workers=tok_cfg["workers"],
                    shard_tokens=tok_cfg["shard_tokens"],
                    val_fraction=tok_cfg["val_fraction"],
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
            {"sources": {n: n for n in cfg["sources"]}, "stages": cfg["mixture"]["stages"]},
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
