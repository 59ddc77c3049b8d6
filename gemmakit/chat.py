"""Gemma's chat format (report Table 3) as token ids, with the mask of the tokens SFT trains on.

    <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n

The turn markers are control ids from the vocabulary, and each message is encoded as plain text
(`encode(text, special=False)`), so a message that contains the string "<start_of_turn>" cannot
open a turn. (HF transformers' `apply_chat_template` renders the template to text and then
matches markers in it, so there such a message would open one; on any other message both give
the same ids.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gemmakit.config import GemmaConfig, TokenIds
from gemmakit.errors import DataError
from gemmakit.tokenizer import Tokenizer

ROLES = {"user": "user", "model": "model", "assistant": "model", "system": "system"}


@dataclass(frozen=True)
class ChatEncoding:
    """ids [T] of the conversation; target_mask [T]: True on the tokens of model turns (the
    model's text and its <end_of_turn>, not the "model\\n" header) that SFT learns to predict."""

    ids: list[int]
    target_mask: list[bool]


def chat_turns(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(role, text) of each turn, roles "user" / "model" alternating from "user".

    "assistant" means "model"; a leading system message is folded into the first user turn as
    system text + "\\n\\n" + user text; user and model texts are stripped of surrounding
    whitespace, the system text is kept as it is, as Gemma's HF chat template does
    (gemmakit.checkpoint.hf_tokenizer.CHAT_TEMPLATE). Out-of-order roles raise DataError naming
    the message.
    """
    turns: list[tuple[str, str]] = []
    system: str | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"messages[{i}]: expected {{'role': ..., 'content': ...}}, got {m!r}")
        role, text = ROLES.get(m["role"]), m["content"]
        if role is None:
            raise DataError(f"messages[{i}]: unknown role {m['role']!r}; use {', '.join(ROLES)}")
        if not isinstance(text, str):
            raise DataError(f"messages[{i}]: content must be a string, got {type(text).__name__}")
        if role == "system":
            if i != 0:
                raise DataError(f"messages[{i}]: a system message may only come first")
            system = text
            continue
        expected = "user" if not turns or turns[-1][0] == "model" else "model"
        if role != expected:
            after = f"after a {turns[-1][0]} turn" if turns else "first"
            raise DataError(
                f"messages[{i}]: role {m['role']!r} {after}; roles must alternate user/model, "
                f"starting with user"
            )
        text = text.strip()
        if system is not None:
            text, system = f"{system}\n\n{text}", None
        turns.append((role, text))
    if system is not None:
        raise DataError("messages[0]: a system message needs a user message after it")
    return turns


def _check_prompt(turns: list[tuple[str, str]], add_generation_prompt: bool) -> None:
    if add_generation_prompt and turns and turns[-1][0] == "model":
        raise DataError("add_generation_prompt: the last message must be a user turn")


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    token_ids: TokenIds | None = None,
) -> ChatEncoding:
    """The conversation as ids, with the SFT target mask (see ChatEncoding).

    The turn markers are the tokenizer's <start_of_turn>/<end_of_turn> pieces, or where it has
    none, those of `token_ids` (the model config's). With `add_generation_prompt`, ends with
    <start_of_turn>model\\n for the model to answer. Each header ("user\\n") and text is
    encoded on its own as plain text (special names in it stay text), so the mask boundary
    falls between tokens.
    """
    turns = chat_turns(messages)
    _check_prompt(turns, add_generation_prompt)
    tok = tokenizer.token_ids(token_ids)
    ids, mask = [tok.bos], [False]

    def add(new: list[int], target: bool) -> None:
        ids.extend(new)
        mask.extend([target] * len(new))

    def plain(text: str) -> list[int]:
        return tokenizer.encode(text, bos=False, special=False)

    for role, text in turns:
        add([tok.start_of_turn, *plain(role + "\n")], False)
        add([*plain(text), tok.end_of_turn], role == "model")
        add(plain("\n"), False)
    if add_generation_prompt:
        add([tok.start_of_turn, *plain("model\n")], False)
    return ChatEncoding(ids, mask)


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The same conversation as text, the special tokens written by name (for display)."""
    turns = chat_turns(messages)
    _check_prompt(turns, add_generation_prompt)
    text = "<bos>" + "".join(
        f"<start_of_turn>{role}\n{body}<end_of_turn>\n" for role, body in turns
    )
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


@dataclass
class FittedPrompt:
    encoded: ChatEncoding  # ids and SFT mask of the kept conversation
    dropped: int  # messages removed from the front of the conversation


def fit_context(
    tokenizer: Tokenizer, messages: list[dict], cfg: GemmaConfig, reserve: int
) -> FittedPrompt | None:
    """The conversation encoded with a generation prompt, leaving `reserve` tokens of the
    context for the answer: the oldest user/model exchanges are dropped first (from
    `messages` itself, so the session forgets them too); a system message stays. None when
    even the last user message alone does not fit."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        enc = encode_chat(tokenizer, messages, add_generation_prompt=True, token_ids=cfg.tokens)
        if len(enc.ids) + reserve <= cfg.max_seq_len:
            return FittedPrompt(enc, dropped)
        if len(messages) - first <= 1:  # only the new user message is left
            return None if len(enc.ids) >= cfg.max_seq_len else FittedPrompt(enc, dropped)
        del messages[first : first + 2]  # a user message and the model's answer to it
        dropped += 2
