"""`gemmakit chat`: talk with an instruction-tuned model in Gemma's chat format, streaming
each answer; Ctrl-C stops an answer, Ctrl-D (end of input) or /exit quits, /reset starts over.
A line that ends with a backslash goes on to the next line; a message that opens with \"\"\"
goes on, line by line, until a line that ends with \"\"\". The KV cache is kept between turns:
each turn prefills only the tokens that are new. When the conversation outgrows the context,
its oldest exchanges are dropped (a system prompt stays)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from gemmakit.chat import fit_context
from gemmakit.commands.common import (
    add_model_args,
    add_sampling_args,
    check_sampling_args,
    load_model_and_tokenizer,
    stream_text,
)

HELP = (
    "/reset: new conversation, /exit or Ctrl-D: quit, Ctrl-C: stop an answer; "
    'more lines: end a line with \\, or put """ before and after them'
)
CONTINUED = "... "  # the prompt for the next line of a message


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with an instruction-tuned model", description=__doc__)
    add_model_args(p)
    p.add_argument("--system", help="system prompt (folded into the first user turn)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per answer")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_sampling_args(args)  # before the model loads: a bad option fails at once
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


def read_message(read: Callable[[str], str] = read_line) -> str:
    """One user message from `read` (read_line): a line; while a line ends with a backslash,
    the next one too (the backslash dropped, the newline kept); from a line that opens with
    \"\"\" to one that ends with \"\"\", every line in between (the quotes dropped). End of input
    inside a message ends the message; EOFError only before it."""
    line = read("> ")
    parts = []
    if line.lstrip().startswith('"""'):
        line = line.lstrip()[3:]
        while not line.rstrip().endswith('"""'):
            parts.append(line)
            try:
                line = read(CONTINUED)
            except EOFError:
                return "\n".join(parts)
        parts.append(line.rstrip()[:-3])
        return "\n".join(parts)
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = read(CONTINUED)
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def chat_loop(model, tokenizer, args: argparse.Namespace, out: TextIO) -> int:
    """Read user messages until /exit or end of input (returns 0), answering each in turn
    with one KV cache for the conversation."""
    from gemmakit.generation import Session  # imports torch: only once a chat runs

    session = Session(model)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    while True:
        try:
            line = read_message()
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
            session.reset()
            out.write("(new conversation)\n")
            continue
        if command == "/help" or not command:
            out.write(HELP + "\n" if command else "")
            continue
        messages.append({"role": "user", "content": line})
        answer = respond(session, tokenizer, messages, args, out)
        if answer is None:
            messages.pop()
        else:
            messages.append({"role": "model", "content": answer})


def respond(session, tokenizer, messages: list[dict], args: argparse.Namespace, out: TextIO):
    """Stream the model's answer to `messages` (ending in a user turn) to `out` and return its
    text; the part already shown when Ctrl-C stops it. None when the context is full.

    The whole conversation is encoded each turn; `session` (a generation.Session) prefills only
    the ids after those its cache holds, so the model sees exactly `encode_chat`'s ids."""
    cfg = session.model.config
    prompt = fit_context(tokenizer, messages, cfg, min(args.max_new_tokens, cfg.max_seq_len // 4))
    if prompt is None:
        out.write(f"(the message alone fills the {cfg.max_seq_len}-token context)\n")
        return None
    if prompt.dropped:
        out.write(
            f"(dropped the oldest {prompt.dropped} message(s) to fit the "
            f"{cfg.max_seq_len}-token context)\n"
        )
    prompt = prompt.encoded
    room = cfg.max_seq_len - len(prompt.ids)
    ids = tokenizer.token_ids(cfg.tokens)
    # <start_of_turn> too: a model that opens a turn has ended its own (base models do that)
    stops = {ids.eos, ids.end_of_turn, ids.start_of_turn}
    steps = session.stream(
        prompt.ids,
        min(args.max_new_tokens, room),
        args.temperature,
        args.top_k,
        args.top_p,
        stop_tokens=stops,
        seed=args.seed,
    )
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
