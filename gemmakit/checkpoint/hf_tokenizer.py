"""The tokenizer files HF transformers reads beside `tokenizer.model` in a model directory:
tokenizer_config.json (BOS on, the special tokens, Gemma's chat template), special_tokens_map.json
and generation_config.json (both stop ids: <eos> and <end_of_turn>).

Without them `AutoTokenizer` builds a tokenizer that prepends no <bos>, and a Gemma without
<bos> produces garbage; with them `AutoTokenizer`, `apply_chat_template` and
`pipeline("text-generation")` give the ids, the chat prompt and the greedy text gemmakit gives.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from google.protobuf.message import DecodeError

from gemmakit.config import SPECIAL_PIECES, GemmaConfig
from gemmakit.errors import CheckpointError

# Gemma 3's chat template as Google ships it (tokenizer_config.json of google/gemma-3-*-it):
# a leading system message is folded into the first user turn, "assistant" is "model", each
# message is trimmed. gemmakit.chat builds the same prompt (as ids, never tokenized from text).
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# special_tokens_map.json key -> piece; a piece the vocabulary lacks is left out
SPECIAL_TOKENS = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


def _added_token(piece: str, special: bool) -> dict:
    # matched as written (not normalized, no stripping of the spaces around it), as HF's
    # own conversion of Gemma's tokenizer.model has them
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    return dict(content=piece, **flags, special=special)


def hf_tokenizer_files(tokenizer_model: Path, config: GemmaConfig) -> dict[str, dict]:
    """file name -> JSON content of the HF tokenizer and generation files for the SentencePiece
    model `tokenizer_model` and the model `config` (its context length, its special ids where
    the vocabulary lacks a piece)."""
    import sentencepiece.sentencepiece_model_pb2 as pb

    try:
        proto = pb.ModelProto.FromString(Path(tokenizer_model).read_bytes())
    except DecodeError as e:
        raise CheckpointError(f"{tokenizer_model}: not a SentencePiece model ({e})") from None
    piece_ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    # the special ids as this vocabulary has them; a piece it lacks keeps the config's id
    found = {k: piece_ids[p] for k, p in SPECIAL_PIECES.items() if p in piece_ids}
    ids = dataclasses.replace(config.tokens, **found)
    kind = pb.ModelProto.SentencePiece
    # every control and unknown piece is a special token (matched in raw text, as
    # Tokenizer.encode does); user-defined pieces are added tokens that are not special
    added = {
        str(i): _added_token(p.piece, p.type != kind.USER_DEFINED)
        for i, p in enumerate(proto.pieces)
        if p.type in (kind.CONTROL, kind.UNKNOWN, kind.USER_DEFINED)
    }
    specials = {k: p for k, p in SPECIAL_TOKENS.items() if p in piece_ids}
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,  # Gemma needs <bos> first
        "add_eos_token": False,
        **specials,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "legacy": False,
        "model_max_length": config.max_seq_len,
        "padding_side": "left",  # batched generation: the prompts end together
        "sp_model_kwargs": {},
    }
    generation_config = {
        "bos_token_id": ids.bos,
        "eos_token_id": [ids.eos, ids.end_of_turn],  # what gemmakit's generate stops at
        "pad_token_id": ids.pad,
    }
    return {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": specials,
        "generation_config.json": generation_config,
    }


def write_hf_tokenizer_files(directory: Path, config: GemmaConfig) -> None:
    """Write the files of hf_tokenizer_files for `directory/tokenizer.model` into `directory`
    (a temporary directory that the caller publishes whole)."""
    for name, content in hf_tokenizer_files(directory / "tokenizer.model", config).items():
        (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
