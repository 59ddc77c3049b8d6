"""`gemmakit chat`: talk with an instruction-tuned model in Gemma's chat format, streaming
each answer; Ctrl-C stops an answer, Ctrl-D (end of input) or /exit quits, /reset starts over."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import TextIO

from gemmakit.chat import encode_chat
from gemmakit.commands.common import add_model_args, add_sampling_args, load_model_and_tokenizer
from gemmakit.commands.generate import stream_text

HELP = "/reset: new conversation, /exit or Ctrl-D: quit, Ctrl-C: stop an answer"


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with an instruction-tuned model", description=__doc__)
    add_model_args(p)
    p.add_argument("--system", help="system prompt (folded into the first user turn)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per answer")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args)
    print(f"{model.config.name}: {HELP}", file=sys.stderr)
    return chat_loop(model, tokenizer, args, sys.stdout)


def read_line(prompt: str = "> ") -> str:
    """One line of input without its newline; EOFError at the end of input. A terminal gets a
    prompt and line editing; piped input is read as is."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (gives input() editing and history)

        return input(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n")


def chat_loop(model, tokenizer, args: argparse.Namespace, out: TextIO) -> int:
    """Read user lines until /exit or end of input (returns 0), answering each in turn."""
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    while True:
        try:
            line = read_line()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
            out.write("\n")
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            messages = list(start)
            out.write("(new conversation)\n")
            continue
        if command == "/help" or not command:
            out.write(HELP + "\n" if command else "")
            continue
        messages.append({"role": "user", "content": line})
        answer = respond(model, tokenizer, messages, args, out)
        if answer is None:
            messages.pop()
        else:
            messages.append({"role": "model", "content": answer})


def respond(model, tokenizer, messages: list[dict], args: argparse.Namespace, out: TextIO):
    """Stream the model's answer to `messages` (ending in a user turn) to `out` and return its
    text; the part already shown when Ctrl-C stops it. None when the context is full."""
    cfg = model.config
    prompt = encode_chat(tokenizer, messages, add_generation_prompt=True, token_ids=cfg.tokens)
    room = cfg.max_seq_len - len(prompt.ids)
    if room <= 0:
        out.write(f"(the conversation fills the {cfg.max_seq_len}-token context: /reset)\n")
        return None
    ids = tokenizer.token_ids(cfg.tokens)
    # <start_of_turn> too: a model that opens a turn has ended its own (base models do that)
    stops = {ids.eos, ids.end_of_turn, ids.start_of_turn}
    from gemmakit import generation  # imports torch: only once a chat runs

    steps = generation.stream_generate(
        model, [prompt.ids], min(args.max_new_tokens, room), args.temperature, args.top_k,
        args.top_p, stop_tokens=stops, seed=args.seed,
    )  # fmt: skip
    answer: list[int] = []
    try:
        stream_text(tokenizer, _recorded(steps, answer), out)
    except KeyboardInterrupt:
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return tokenizer.decode(answer)


def _recorded(steps: Iterator[list[int | None]], into: list[int]) -> Iterator[list[int | None]]:
    """`steps` passed through, each token also appended to `into` (kept if Ctrl-C stops it)."""
    for step in steps:
        if step[0] is not None:
            into.append(step[0])
        yield step
