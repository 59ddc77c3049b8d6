"""One typed-config mechanism (gemmakit.typed_config) for recipes and data configs: unknown keys
and wrong types are one-line errors naming file and key; the YAML users have keeps loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gemmakit import typed_config
from gemmakit.data.config import DataConfig, NearDedupConfig, load_config
from gemmakit.data.pipeline import DEFAULT_CONFIG
from gemmakit.errors import ConfigError, MissingFileError
from gemmakit.training.recipe import load_recipe
from gemmakit.typed_config import Off

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str  # required
    inner: Inner = field(default_factory=Inner)
    stage: Inner | Off = field(default_factory=Inner)
    items: dict[str, Inner] = field(default_factory=dict)
    sizes: list[int] = field(default_factory=list)
    limit: int | None = None


def test_typed_values_sections_and_overrides():
    o = typed_config.build(
        Outer,
        {"name": 3, "inner": {"rate": "1e-3"}, "stage": False, "items": {"x": {"mode": "b"}}},
        ["inner.mode=b", "sizes=7", "limit=null"],
        where="f.yaml",
    )
    assert o.name == "3" and o.inner == Inner(1e-3, "b") and o.stage is False
    assert o.items == {"x": Inner(0.5, "b")} and o.sizes == [7] and o.limit is None
    assert typed_config.build(Outer, {"name": "n", "stage": None}).stage == Inner()  # empty


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, r"f.yaml: the top level needs name"),
        (
            {"name": "n", "inner": {"rat": 1}},
            r"f.yaml: unknown key 'inner.rat' \(known under inner",
        ),
        ({"name": "n", "inner": {"rate": "high"}}, r"f.yaml: inner.rate must be float, got 'high'"),
        ({"name": "n", "inner": {"mode": "c"}}, r"inner.mode must be one of \('a', 'b'\)"),
        ({"name": "n", "stage": 0}, r"f.yaml: stage must be a mapping"),  # 0 is not false
        ({"name": "n", "items": {"x": {"rate": []}}}, r"items.x.rate must be float"),
        ({"name": "n", "sizes": ["many"]}, r"sizes\[0\] must be int"),
        ({"name": "n", "inner": 3}, r"inner must be a mapping"),
    ],
)
def test_errors_name_the_file_and_the_key(values, message):
    with pytest.raises(ConfigError, match=message) as e:
        typed_config.build(Outer, values, where="f.yaml")
    assert "\n" not in str(e.value)


def test_an_override_error_names_the_override():
    with pytest.raises(ConfigError, match=r"--set inner.rate=x: inner.rate must be float"):
        typed_config.build(Outer, {"name": "n"}, ["inner.rate=x"])


# --- the data config ------------------------------------------------------------------------


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


def test_data_config_wrong_type_is_one_line_naming_file_and_key(tmp_path, capsys):
    from gemmakit.cli import main

    path = write(tmp_path, "sources: {web: {paths: [w.jsonl]}}\ndedup: {near: {threshold: high}}\n")
    with pytest.raises(ConfigError, match=rf"{path}: dedup.near.threshold must be float"):
        load_config(path)
    assert main(["data", "prepare", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dedup.near.threshold" in err and str(path) in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("sources: {web: {paths: [a], qualty: {}}}", r"unknown key 'sources.web.qualty'"),
        ("sources: {web: {paths: [a], quality: {min_words: many}}}", "web.quality.min_words"),
        ("sources: {web: {paths: [a], quality: {preset: poetry}}}", "web.quality.preset"),
        ("sources: {web: {paths: [a]}}\ntokenize: {workers: two}", "tokenize.workers must be int"),
        ("sources: {web: {paths: [a]}}\nsafety: {max_hits: [1]}", "safety.max_hits must be int"),
        ("sources: {web: {text_field: t}}", "sources.web needs paths"),
        ("sources: {}", "no sources"),
        ("sources: {web: {paths: [a]}}\nmixture: {stages: [{until: 2}]}", "mixture stage 0"),
    ],
)
def test_data_config_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_data_config_stages_off_defaults_and_paths(tmp_path):
    path = write(
        tmp_path,
        "sources:\n  web: {paths: web.jsonl, quality: false}\n"
        "dedup: {near: false}\npii: false\nsafety: {max_hits: 2}\ntokenize: false\n",
    )
    cfg, base = load_config(path)
    assert base == tmp_path and cfg.sources["web"].paths == [str(tmp_path / "web.jsonl")]
    assert cfg.sources["web"].quality is False and cfg.dedup.near is False and cfg.dedup.exact
    assert cfg.pii is False and cfg.safety is False  # no blocklist: nothing to block against
    assert cfg.decontaminate is False  # no eval sets
    assert cfg.tokenize.workers == 2  # false: the defaults, as before
    assert cfg.mixture.stages == [{"until": 1.0, "weights": {"web": 1.0}}]
    with pytest.raises(MissingFileError):
        load_config(tmp_path / "none.yaml")


def test_the_shipped_data_config_loads_unchanged():
    cfg, _ = load_config(DEFAULT_CONFIG)
    assert isinstance(cfg, DataConfig) and list(cfg.sources) == ["web", "math", "code"]
    assert cfg.dedup.near == NearDedupConfig(0.8, 5, 128)
    assert cfg.tokenize.shard_tokens == 65536 and cfg.safety.blocklist.endswith("blocklist.txt")
    assert [s["until"] for s in cfg.mixture.stages] == [0.8, 1.0]
    assert cfg.to_dict()["sources"]["web"]["quality"] == {"preset": "web"}


def test_data_config_takes_overrides_as_recipes_do():
    cfg, _ = load_config(DEFAULT_CONFIG, ["dedup.near.threshold=0.9", "pii=false"])
    assert cfg.dedup.near.threshold == 0.9 and cfg.pii is False


@pytest.mark.parametrize("name", ["tiny", "gemma-2b", "gemma-7b"])
def test_shipped_recipes_load_through_the_same_mechanism(name):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml", ["training.dtype=bfloat16"])
    assert r.training.dtype == "bfloat16"
    assert typed_config.build(type(r), r.to_dict()) == r  # a recipe round-trips
