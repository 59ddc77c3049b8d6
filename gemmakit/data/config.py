"""The data pipeline's config (`gemmakit data prepare CONFIG.yaml`): typed sections, each with
its defaults, read by gemmakit.typed_config as recipes are. Every key but `sources` is
optional; a stage set to false is skipped. Paths are relative to the config file.

    sources:
      web: {paths: [web.jsonl], quality: {preset: web}}
      code: {paths: [code/], quality: {preset: code}, classifier: {path: q.npz}}
    safety: {blocklist: blocklist.txt, max_hits: 0}
    dedup: {exact: true, near: {threshold: 0.8}}
    decontaminate: {eval: [mmlu.jsonl], ngram: 13}
    tokenize: {workers: 8, val_fraction: 0.01}
    mixture: {stages: [{until: 1.0, weights: {web: 0.7, code: 0.3}}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit import typed_config
from gemmakit.data.classifier import KeepPolicy
from gemmakit.data.mixture import check_stages
from gemmakit.data.pii import KINDS
from gemmakit.data.quality import PRESETS, QualityConfig
from gemmakit.errors import ConfigError, GemmakitError
from gemmakit.typed_config import Off


@dataclass
class SourceConfig:
    paths: list[str]  # JSONL / text files or folders
    text_field: str = "text"  # "*": every string field joined
    id_field: str = "id"
    split: str = "file"  # plain text: one document per file, or per "paragraph"
    # {preset: web | math | code, <QualityConfig field>: value, ...}; false: no heuristics
    quality: dict | Off = field(default_factory=dict)
    # {path: MODEL.npz, policy: threshold | pareto, threshold, alpha, seed}
    classifier: dict | None = None


@dataclass
class SafetyConfig:
    blocklist: str | None = None  # none: the stage is off
    max_hits: int = 0


@dataclass
class PiiConfig:
    kinds: list[str] = field(default_factory=lambda: list(KINDS))


@dataclass
class NearDedupConfig:
    threshold: float = 0.8  # estimated Jaccard similarity at which a document is a duplicate
    shingle: int = 5
    num_perm: int = 128


@dataclass
class DedupConfig:
    exact: bool = True
    near: NearDedupConfig | Off = field(default_factory=NearDedupConfig)


@dataclass
class DecontaminateConfig:
    eval: list[str] = field(default_factory=list)  # evaluation sets; none: the stage is off
    ngram: int = 13
    min_words: int = 8
    text_field: str = "*"


@dataclass
class TokenizeConfig:
    workers: int = 2
    shard_tokens: int = 1 << 26
    val_fraction: float = 0.01


@dataclass
class MixtureConfig:
    # [{until: FRACTION, weights: {SOURCE: W}}, ...]; default: one stage, equal weights
    stages: list[dict] | None = None


@dataclass
class DataConfig:
    output: str | None = None  # folder; the CLI's --out or prepare(out_dir=) wins
    tokenizer: str | None = None  # SentencePiece .model (or pass a tokenizer object)
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    safety: SafetyConfig | Off = field(default_factory=SafetyConfig)
    pii: PiiConfig | Off = field(default_factory=PiiConfig)
    dedup: DedupConfig | Off = field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig | Off = field(default_factory=DecontaminateConfig)
    tokenize: TokenizeConfig | Off = field(default_factory=TokenizeConfig)  # false: defaults
    mixture: MixtureConfig = field(default_factory=MixtureConfig)

    def to_dict(self) -> dict[str, Any]:
        return typed_config.to_dict(self)


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | None = None
) -> tuple[DataConfig, Path]:
    """(the config with defaults filled in, checked, and paths resolved; its base folder) from
    a YAML file or a dict (whose relative paths are taken from the current folder)."""
    if isinstance(source, dict):
        values, base, where = source, Path.cwd(), "config"
    else:
        values = typed_config.read_yaml(source, "config file")
        base, where = Path(source).parent, str(source)
    cfg = typed_config.build(DataConfig, values, overrides, where)
    _resolve(cfg, base, where)
    return cfg, base


def quality_config(values: dict, key: str = "quality", where: str = "config") -> QualityConfig:
    """A source's quality section: a preset's thresholds with the fields it names replaced."""
    values = dict(values)
    preset = values.pop("preset", "web")
    if preset not in PRESETS:
        raise ConfigError(f"{where}: {key}.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return typed_config.updated(PRESETS[preset], values, key, where)


def _resolve(cfg: DataConfig, base: Path, where: str) -> None:
    """Check what the types cannot say; paths made relative to `base`; stages with nothing to
    work with turned off."""
    if not cfg.sources:
        raise ConfigError(f"{where}: no sources")
    for name, src in cfg.sources.items():
        key = f"sources.{name}"
        src.paths = [str(base / p) for p in src.paths]
        if src.quality is not False:
            quality_config(src.quality, f"{key}.quality", where)
        if src.classifier is not None:
            src.classifier = _classifier(src.classifier, f"{where}: {key}.classifier", base)
    if cfg.safety and cfg.safety.blocklist:
        cfg.safety.blocklist = str(base / cfg.safety.blocklist)
    elif cfg.safety:
        cfg.safety = False  # nothing to block against
    if cfg.decontaminate:
        cfg.decontaminate.eval = [str(base / p) for p in cfg.decontaminate.eval]
        if not cfg.decontaminate.eval:
            cfg.decontaminate = False
    if cfg.tokenize is False:
        cfg.tokenize = TokenizeConfig()
    cfg.tokenizer = str(base / cfg.tokenizer) if cfg.tokenizer else None
    cfg.output = str(base / cfg.output) if cfg.output else None
    names = list(cfg.sources)
    stages = cfg.mixture.stages or [{"until": 1.0, "weights": dict.fromkeys(names, 1.0)}]
    try:
        cfg.mixture.stages = check_stages(stages, names)
    except GemmakitError as e:
        raise ConfigError(f"{where}: {e}") from None


def _classifier(c: Any, where: str, base: Path) -> dict[str, Any]:
    """A source's classifier section checked (a policy error names the key), its path resolved."""
    if not isinstance(c, dict) or not isinstance(c.get("path"), str):
        raise ConfigError(f"{where} needs path: MODEL.npz (and policy, threshold or alpha)")
    KeepPolicy.from_dict({k: v for k, v in c.items() if k != "path"}, where)
    return {**c, "path": str(base / c["path"])}
