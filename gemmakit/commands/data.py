"""`gemmakit data ...`: the pretraining data pipeline, whole (`prepare CONFIG.yaml`) or one
stage at a time (read, quality, safety, scrub, dedup, decontaminate, tokenize), plus `inspect`
for a shard folder, `corpus` to write out the embedded default corpus, and `classifier train` /
`classifier score` for model-based quality filtering.

Each stage reads documents (txt, jsonl, parquet, or a folder of them), writes the documents it
keeps as JSONL, prints what it dropped and why, and writes that summary as JSON beside its
output (OUT.summary.json, or --summary)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import yaml

from gemmakit.data.readers import Document
from gemmakit.data.summary import StageSummary
from gemmakit.errors import UsageError

Stage = Callable[[Iterable[Document], StageSummary, argparse.Namespace], Iterator[Document]]


def register(sub) -> None:
    p = sub.add_parser("data", help="pretraining data: filter, dedup, decontaminate, tokenize")
    dsub = p.add_subparsers(dest="data_command", required=True)

    q = dsub.add_parser("prepare", help="the whole chain from a YAML config")
    q.add_argument("config", nargs="?", help="YAML config (default: the embedded corpus)")
    q.add_argument("--out", help="output folder (default: the config's `output`)")
    q.add_argument("--tokenizer", help="SentencePiece .model (default: the config's)")
    q.add_argument("--workers", type=int, help="tokenizer processes")
    q.set_defaults(func=run_prepare)

    stages: dict[str, tuple[str, Stage]] = {
        "read": ("convert documents to the pipeline's JSONL", _read),
        "quality": ("Gopher/C4 heuristic quality filters", _quality),
        "safety": ("drop documents matching a blocklist", _safety),
        "scrub": ("replace personal data with placeholder tags", _scrub),
        "dedup": ("remove exact and near (MinHash) duplicates", _dedup),
        "decontaminate": ("remove documents sharing n-grams with eval sets", _decontaminate),
    }
    for name, (help_text, fn) in stages.items():
        s = dsub.add_parser(name, help=help_text)
        _add_io_args(s, out_help="output JSONL of the documents kept")
        s.set_defaults(func=lambda a, name=name, fn=fn: run_stage(a, name, fn))
        if name == "quality":
            s.add_argument("--preset", default="web", help="web, math or code thresholds")
            s.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="RULE=VALUE",
                help="override a threshold (null turns the rule off)",
            )
        elif name == "safety":
            s.add_argument("--blocklist", required=True, help="one term per line")
            s.add_argument("--max-hits", type=int, default=0, help="matches a document may have")
        elif name == "scrub":
            s.add_argument("--kinds", help="comma-separated: email,ipv6,ipv4,credit_card,ssn,phone")
        elif name == "dedup":
            s.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity")
            s.add_argument("--shingle", type=int, default=5, help="words per shingle")
            s.add_argument("--num-perm", type=int, default=128, help="MinHash functions")
            s.add_argument("--no-exact", action="store_true", help="skip exact dedup")
            s.add_argument("--no-near", action="store_true", help="skip near-duplicate dedup")
        elif name == "decontaminate":
            s.add_argument(
                "--eval",
                action="append",
                required=True,
                metavar="FILE",
                help="evaluation set (jsonl or txt); repeat for several",
            )
            s.add_argument("--ngram", type=int, default=13, help="words per matching n-gram")
            s.add_argument("--min-words", type=int, default=8, help="shortest item matched")

    _register_classifier(dsub)

    t = dsub.add_parser("tokenize", help="tokenize in parallel and pack into token shards")
    _add_io_args(t, out_help="output shard folder")
    t.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--shard-tokens", type=int, default=1 << 26)
    t.add_argument("--val-fraction", type=float, default=0.01, help="documents held out")
    t.set_defaults(func=run_tokenize)

    i = dsub.add_parser("inspect", help="describe a token-shard folder, decode a document")
    i.add_argument("directory")
    i.add_argument("--split", default="train")
    i.add_argument("--tokenizer", help="decode with this .model")
    i.add_argument("--document", type=int, default=0, help="which document to show")
    i.set_defaults(func=run_inspect)

    c = dsub.add_parser("corpus", help="write the embedded default corpus files to a folder")
    c.add_argument("directory")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--force", action="store_true", help="replace corpus files already there")
    c.set_defaults(func=run_corpus)


def _register_classifier(dsub) -> None:
    c = dsub.add_parser("classifier", help="model-based quality filter: train one, or filter")
    csub = c.add_subparsers(dest="classifier_command", required=True)
    t = csub.add_parser("train", help="learn high-quality (positive) vs other (negative) text")
    t.add_argument("--positive", nargs="+", required=True, metavar="FILE", help="files/folders")
    t.add_argument("--negative", nargs="+", required=True, metavar="FILE", help="files/folders")
    t.add_argument("--out", required=True, help="model file (.npz)")
    t.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    t.add_argument("--split", choices=["file", "paragraph"], default="file")
    t.add_argument("--bits", type=int, default=20, help="2^bits hashed feature buckets")
    t.add_argument("--char-ngrams", default="", help="e.g. 3,4,5 (default: words only)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--holdout", type=float, default=0.1, help="fraction held out to evaluate")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_classifier_train)
    s = csub.add_parser("score", help="keep the documents a classifier scores as high quality")
    _add_io_args(s, out_help="output JSONL of the documents kept")
    s.add_argument("--model", required=True, help="a model from `classifier train`")
    s.add_argument("--policy", choices=["threshold", "pareto"], default="threshold")
    s.add_argument("--threshold", type=float, default=0.5, help="threshold: keep score >= this")
    s.add_argument("--alpha", type=float, default=9.0, help="pareto: GPT-3's shape parameter")
    s.add_argument("--seed", type=int, default=0, help="pareto: seed of the per-document draws")
    s.set_defaults(func=lambda a: run_stage(a, "classifier", _classifier))


def _add_io_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("inputs", nargs="+", help="txt/jsonl/parquet files or folders")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--summary", help="summary JSON (default: beside the output)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    p.add_argument("--id-field", default="id")
    p.add_argument(
        "--split",
        choices=["file", "paragraph"],
        default="file",
        help="plain text: one document per file or per blank-line-separated block",
    )


def _inputs(args: argparse.Namespace) -> Iterator[Document]:
    from gemmakit.data.readers import read_documents

    return read_documents(args.inputs, args.text_field, args.id_field, args.split)


def _finish(summary: StageSummary, path: Path) -> None:
    from gemmakit.atomic import write_json

    print(summary.format())
    write_json(path, summary.to_dict())
    print(f"summary: {path}")


def run_stage(args: argparse.Namespace, name: str, stage: Stage) -> int:
    from gemmakit.data.readers import write_documents

    summary = StageSummary(name)
    n = write_documents(stage(_inputs(args), summary, args), args.out)
    print(f"{n} documents -> {args.out}")
    _finish(summary, Path(args.summary or f"{args.out}.summary.json"))
    return 0


def _read(docs, summary, args):
    for doc in docs:
        summary.keep()
        yield doc


def _quality(docs, summary, args):
    from gemmakit.data.quality import QualityConfig, filter_quality

    overrides = {"preset": args.preset}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected RULE=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return filter_quality(docs, QualityConfig.from_dict(overrides), summary)


def _classifier(docs, summary, args):
    from gemmakit.data.classifier import KeepPolicy, QualityClassifier, filter_classifier

    policy = KeepPolicy(args.policy, args.threshold, args.alpha, args.seed)
    return filter_classifier(docs, QualityClassifier.load(args.model), policy, summary)


def run_classifier_train(args: argparse.Namespace) -> int:
    from gemmakit.data.classifier import HashedFeatures, train_classifier
    from gemmakit.data.readers import read_documents

    def texts(paths: list[str]) -> Iterator[str]:
        return (d.text for d in read_documents(paths, args.text_field, split=args.split))

    try:
        chars = tuple(int(n) for n in args.char_ngrams.split(",") if n.strip())
    except ValueError:
        raise UsageError(f"--char-ngrams {args.char_ngrams!r}: expected sizes like 3,4,5") from None
    model = train_classifier(
        texts(args.positive),
        texts(args.negative),
        HashedFeatures(bits=args.bits, char_ngrams=chars),
        epochs=args.epochs,
        holdout=args.holdout,
        seed=args.seed,
    )
    t = model.training
    print(
        f"trained on {t['train']['positive']} positive + {t['train']['negative']} negative "
        f"documents in {t['seconds']:.1f} s; train accuracy {t['train_accuracy']}"
    )
    held = t["heldout"]
    print(
        f"held-out accuracy {t['heldout_accuracy']} "
        f"({held['positive']} positive + {held['negative']} negative)"
    )
    print(f"model: {model.save(args.out)}")
    return 0


def _safety(docs, summary, args):
    from gemmakit.data.safety import Blocklist, filter_safety

    return filter_safety(docs, Blocklist.from_file(args.blocklist), summary, args.max_hits)


def _scrub(docs, summary, args):
    from gemmakit.data.pii import KINDS, scrub_documents

    kinds = args.kinds.split(",") if args.kinds else KINDS
    return scrub_documents(docs, summary, kinds)


def _dedup(docs, summary, args):
    from gemmakit.data.dedup import ExactDedup, MinHashDedup, dedup_documents

    exact = None if args.no_exact else ExactDedup()
    near = None if args.no_near else MinHashDedup(args.threshold, args.shingle, args.num_perm)
    return dedup_documents(docs, summary, exact, near)


def _decontaminate(docs, summary, args):
    from gemmakit.data.decontaminate import EvalIndex, decontaminate

    index = EvalIndex.from_files(args.eval, args.ngram, args.min_words)
    return decontaminate(docs, index, summary)


def _check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")


def run_tokenize(args: argparse.Namespace) -> int:
    from gemmakit.data.tokenize import tokenize_to_shards
    from gemmakit.tokenizer import load_tokenizer

    _check_workers(args.workers)
    summary = StageSummary("tokenize")
    tokenize_to_shards(
        _inputs(args),
        load_tokenizer(args.tokenizer),
        args.out,
        summary,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        val_fraction=args.val_fraction,
    )
    _finish(summary, Path(args.summary or Path(args.out) / "tokenize.summary.json"))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from gemmakit.data.pipeline import DEFAULT_CONFIG, SUMMARY_FILE, prepare

    _check_workers(args.workers)
    config = args.config or DEFAULT_CONFIG
    report = prepare(config, args.out, args.tokenizer, workers=args.workers)
    print(f"summary: {Path(report['out_dir']) / SUMMARY_FILE}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from gemmakit.data.shards import TokenShards

    shards = TokenShards(args.directory, args.split)
    print(shards)
    for split, info in shards.index["splits"].items():
        print(
            f"  {split}: {info['tokens']} tokens, {info['documents']} documents, "
            f"{len(info['shards'])} shards"
        )
    if shards.num_documents:
        if not 0 <= args.document < shards.num_documents:
            raise UsageError(
                f"--document {args.document}: the {args.split} split holds documents "
                f"0..{shards.num_documents - 1}"
            )
        ids = shards.document(args.document)
        print(f"document {args.document} ({len(ids)} tokens): {ids[:16].tolist()} ...")
        if args.tokenizer:
            from gemmakit.tokenizer import load_tokenizer

            print(load_tokenizer(args.tokenizer).decode(ids.tolist()))
    return 0


def run_corpus(args: argparse.Namespace) -> int:
    from gemmakit.atomic import atomic_path
    from gemmakit.data.generated_corpus import CORPUS_DIR, CORPUS_FILES, write_corpus

    directory = Path(args.directory)
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory}: not a folder")
    extras = ("blocklist.txt", "default.yaml")
    there = [n for n in (*CORPUS_FILES, *extras) if (directory / n).exists()]
    if there and not args.force:
        # these are the files the README tells users to adapt: never replaced silently
        raise UsageError(
            f"{directory} already holds {', '.join(there)}; "
            "choose another folder, or pass --force to replace them"
        )
    for name, path in write_corpus(directory, args.seed).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    for extra in extras:
        with atomic_path(directory / extra) as tmp:
            tmp.write_bytes((CORPUS_DIR / extra).read_bytes())
        print(f"{extra}: {directory / extra}")
    return 0
