"""The training data behind a run, as named token-shard sources, for memorization tests.

A source is one token-shard folder (gemmakit.data.shards): `gemmakit data prepare` writes one
per data source and records the source's name in its index ("source") and in the folder's
mixture.json, so the shard format already says which source each document came from. Accepted:
- a shard folder (index.json): one source, named by its index's "source" or its folder name;
- a data folder with mixture.json: each source it lists;
- a training run folder (checkpoints/step_N/...): the shard folders of its recipe's data.train,
  read from the newest checkpoint's training state, and that checkpoint as the default model;
- a `gemmakit run` folder: its pretrain/ run.
"""

from __future__ import annotations

from pathlib import Path

from gemmakit.data.mixture import MIXTURE_FILE, MixtureSampler
from gemmakit.data.shards import INDEX, TokenShards
from gemmakit.errors import DataError, MissingFileError, UsageError
from gemmakit.training.state import checkpoint_root, latest_checkpoint, read_train_state


def shard_sources(folder: Path, name: str | None = None) -> dict[str, TokenShards]:
    """The sources of a shard folder or a data folder with a mixture.json (train splits)."""
    if (folder / INDEX).is_file():
        shards = TokenShards(folder, "train")
        label = name or shards.index.get("source") or folder.resolve().name
        return {str(label): shards}
    if (folder / MIXTURE_FILE).is_file():
        mixture = MixtureSampler.from_dir(folder, 1)
        return {n: TokenShards(s.directory, "train") for n, s in mixture.sources.items()}
    raise MissingFileError(
        f"{folder}: neither a token-shard folder ({INDEX}) nor a data folder ({MIXTURE_FILE})"
    )


def run_sources(run_dir: Path) -> tuple[dict[str, TokenShards], Path]:
    """(sources, newest checkpoint) of a training run folder."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MissingFileError(f"{checkpoint_root(run_dir)}: no complete checkpoint")
    state = read_train_state(ckpt, mmap=True)
    data = state.get("recipe", {}).get("data", {})
    where = f"{ckpt / 'train_state.pt'}: recipe data"
    if data.get("synthetic"):
        raise UsageError(f"{where}: the run trained on synthetic tokens, not on documents")
    train = data.get("train") or []
    if not isinstance(train, list) or not all(isinstance(p, str) for p in train) or not train:
        raise DataError(f"{where}.train: expected a list of shard folders, got {train!r}")
    dirs = [_locate(Path(p), run_dir, where) for p in train]
    sources: dict[str, TokenShards] = {}
    names = [d.name for d in dirs]
    for d in dirs:
        # several plain shard folders: named as training named them (folder names)
        label = d.name if len(dirs) > 1 and len(set(names)) == len(names) else None
        for n, s in shard_sources(d, label).items():
            if n in sources:
                n = f"{d.name}/{n}"
            sources[n] = s
    return sources, ckpt


def _locate(path: Path, run_dir: Path, where: str) -> Path:
    """A recipe's shard folder: as written (relative to the cwd of training), else relative to
    a folder above the run (a run started elsewhere: `runs/main/data` beside
    `runs/main/pretrain`)."""
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise MissingFileError(f"{where}.train: {path}: no such folder")
        return path
    for base in Path(run_dir).resolve().parents:
        if (base / path).exists():
            return base / path
    raise MissingFileError(f"{where}.train: {path}: no such folder (run from where it trained)")


def find_sources(path: str | Path) -> tuple[dict[str, TokenShards], Path | None]:
    """(name -> train split, the run's newest checkpoint or None) for any accepted folder."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such folder")
    if not path.is_dir():
        raise UsageError(f"{path}: expected a run, data or shard folder, got a file")
    if checkpoint_root(path).is_dir():
        return run_sources(path)
    if checkpoint_root(path / "pretrain").is_dir():
        return run_sources(path / "pretrain")
    return shard_sources(path), None


def describe(sources: dict[str, TokenShards]) -> str:
    """One line per source: its folder and document count (for progress output)."""
    return "\n".join(
        f"  {n}: {s.num_documents} documents in {s.directory}" for n, s in sources.items()
    )
