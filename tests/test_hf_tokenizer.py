"""HF directories that HF transformers reads right (gemmakit/checkpoint/hf_tokenizer.py): on a
tiny model of each Gemma generation with a tokenizer trained by gemmakit, HF's `AutoTokenizer`,
`apply_chat_template`, `AutoModelForCausalLM.generate` and `pipeline("text-generation")` give
the ids, the chat prompt and the greedy tokens gemmakit gives. (The real Gemma 3 270M:
tests/test_gguf.py::test_real_convert_to_hf.)"""

from __future__ import annotations

import json

import pytest
import torch
from make_gguf_reference import special_strings
from test_tokenizer import VARIED, multilingual_texts

import gemmakit
from gemmakit.api import build_model
from gemmakit.chat import encode_chat, render_chat
from gemmakit.checkpoint import save_hf
from gemmakit.config import GEMMA3_TOKEN_IDS, TokenIds, get_config
from gemmakit.tokenizer import load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

LAYOUT = {"tiny": TokenIds(), "tiny-gemma2": TokenIds(), "tiny-gemma3": GEMMA3_TOKEN_IDS}
CHATS = [
    [{"role": "user", "content": "hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " über 42\n"},
        {"role": "assistant", "content": "привет мир"},
        {"role": "user", "content": "def f(x):\n    return x + 1"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """A trained tokenizer.model per special-id layout (Gemma 1/2, Gemma 3)."""
    out = {}
    for ids in (TokenIds(), GEMMA3_TOKEN_IDS):
        path = tmp_path_factory.mktemp("tok") / "tok"
        train_tokenizer(
            multilingual_texts(1500), vocab_size=1000, token_ids=ids, output=path, num_threads=1
        )
        out[ids] = path.with_suffix(".model")
    return out


@pytest.fixture(scope="module", params=list(LAYOUT))
def saved(request, tokenizer_files, tmp_path_factory):
    """(directory, gemmakit model, gemmakit tokenizer) of a random tiny model saved with its
    tokenizer; the model's vocabulary is the tokenizer's, so every id it emits decodes."""
    tok_file = tokenizer_files[LAYOUT[request.param]]
    tok = load_tokenizer(tok_file)
    cfg = get_config(request.param).replace(vocab_size=tok.vocab_size)
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # sharper logits than the init's: no near-ties in greedy decoding
        model.embedder.weight.copy_(torch.randn(model.embedder.weight.shape, generator=gen))
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    save_hf(model, directory, extra_files={"tokenizer.model": tok_file})
    return directory, model, tok


def test_files_hf_reads(saved):
    directory, model, tok = saved
    ids = tok.token_ids()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["bos_token"] == "<bos>" and config["eos_token"] == "<eos>"
    assert config["chat_template"].startswith("{{ bos_token }}")
    special = {int(i) for i, t in config["added_tokens_decoder"].items() if t["special"]}
    assert special == set(tok.special_pieces)  # every control piece and <unk>
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids.eos, ids.end_of_turn]
    assert generation["bos_token_id"] == 2 and generation["pad_token_id"] == 0
    assert json.loads((directory / "special_tokens_map.json").read_text())["pad_token"] == "<pad>"


def test_auto_tokenizer_gives_our_ids(saved):
    directory, _, tok = saved
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    texts = VARIED + special_strings(n_random=60)
    for text in texts:
        ids = tok.encode(text)
        assert hf(text).input_ids == ids, text
        assert hf(text, add_special_tokens=False, split_special_tokens=True).input_ids == (
            tok.encode(text, bos=False, special=False)
        ), text
        assert hf.decode(ids[1:]) == tok.decode(ids), text  # HF shows the leading <bos> too


def test_apply_chat_template_is_our_chat_format(saved):
    directory, _, tok = saved
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for messages in CHATS:
        for prompt in (False, True):
            if not prompt and messages[-1]["role"] == "user" and len(messages) == 1:
                continue
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert text == render_chat(messages, add_generation_prompt=prompt)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
            assert ids["input_ids"] == encode_chat(tok, messages, prompt).ids


def test_hf_model_and_pipeline_generate_our_greedy_tokens(saved):
    directory, model, tok = saved
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok)
    stops = {tok.eos_id, tok.token_ids().end_of_turn}
    for prompt in ["the quick brown fox", "<start_of_turn>user\nпривет<end_of_turn>\n"]:
        ours = gemmakit.generate(model, [tok.encode(prompt)], 12)[0]
        x = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            theirs = hf.generate(x, max_new_tokens=12, do_sample=False)[0, x.shape[1] :].tolist()
        if theirs and theirs[-1] in stops:  # HF keeps the stop token, gemmakit does not
            theirs = theirs[:-1]
        assert theirs == ours, prompt
        # the pipeline's text leaves special tokens out
        text = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
        assert text == prompt + tok.decode([i for i in ours if i not in tok.special_pieces])
