"""`gemmakit tokenizer train|encode|decode|info`: train a SentencePiece tokenizer with Gemma's
options, and look at what a tokenizer does to text."""

from __future__ import annotations

import argparse
import json
import sys
import time

from gemmakit.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or inspect a tokenizer", description=__doc__)
    tsub = p.add_subparsers(dest="action", required=True)

    t = tsub.add_parser("train", help="train a BPE tokenizer with Gemma's options")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="at most this many pieces")
    t.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=run_train)

    src = "a .model file, checkpoint directory, .gguf file or installed model name"
    e = tsub.add_parser("encode", help="text to ids and pieces")
    e.add_argument("--tokenizer", required=True, help=src)
    e.add_argument("text", nargs="?", help="default: standard input")
    e.add_argument("--no-bos", action="store_true")
    e.add_argument(
        "--plain",
        action="store_true",
        help="special names in the text (<start_of_turn>, <eos>...) stay text (default: their ids, "
        "as HF transformers)",
    )
    e.add_argument("--chat", action="store_true", help="text is a JSON list of chat messages")
    e.set_defaults(func=run_encode)

    d = tsub.add_parser("decode", help="ids to text")
    d.add_argument("--tokenizer", required=True, help=src)
    d.add_argument("ids", nargs="+", type=int)
    d.set_defaults(func=run_decode)

    i = tsub.add_parser("info", help="vocabulary size and special ids")
    i.add_argument("tokenizer", help=src)
    i.set_defaults(func=run_info)


def run_train(args: argparse.Namespace) -> int:
    from gemmakit.tokenizer import train_tokenizer

    start = time.perf_counter()
    tok = train_tokenizer(
        files=args.input,
        vocab_size=args.vocab_size,
        output=args.output,
        character_coverage=args.character_coverage,
        num_threads=args.threads,
    )
    took = time.perf_counter() - start
    print(f"wrote {tok.path}: {tok.vocab_size} pieces ({took:.1f}s)")
    if tok.vocab_size < args.vocab_size:
        note = f"note: the corpus filled {tok.vocab_size} of {args.vocab_size} pieces"
        print(note, file=sys.stderr)
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from gemmakit.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    if args.chat:
        from gemmakit.chat import encode_chat

        try:
            messages = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--chat: not JSON ({err})") from None
        if not isinstance(messages, list) or not messages:
            raise UsageError("--chat: expected a non-empty JSON list of messages")
        last = messages[-1]
        prompt = isinstance(last, dict) and last.get("role") == "user"
        enc = encode_chat(tok, messages, add_generation_prompt=prompt)
        ids, marks = enc.ids, ["*" if m else "" for m in enc.target_mask]
    else:
        ids = tok.encode(text, bos=not args.no_bos, special=not args.plain)
        marks = [""] * len(ids)
    print(" ".join(map(str, ids)))
    print(" ".join(f"{tok.id_to_piece(i)!r}{m}" for i, m in zip(ids, marks)))
    print(f"{len(ids)} tokens" + (" (* = SFT target)" if args.chat else ""))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from gemmakit.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise UsageError(f"ids {bad} outside the vocabulary (0..{tok.vocab_size - 1})")
    sys.stdout.write(tok.decode(args.ids) + "\n")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from gemmakit.tokenizer import SPECIAL_PIECES, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(f"{args.tokenizer}: {tok.vocab_size} pieces")
    for piece in SPECIAL_PIECES.values():
        print(f"  {piece:<16} {tok.piece_to_id(piece) if tok.has_piece(piece) else '-'}")
    return 0
