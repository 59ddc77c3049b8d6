"""Write tests/data/gemma3_270m_hf_reference.json: what HF transformers does with the real
Gemma 3 270M GGUF (tokenizer ids of varied strings, greedy continuations, logits), so that
tests/test_gguf.py can check gemmakit against it in seconds instead of HF's minutes of loading.

    .venv/bin/python tests/make_gguf_reference.py      # needs transformers, accelerate, gguf
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

OUT = Path(__file__).parent / "data" / "gemma3_270m_hf_reference.json"
# the last one: an instruction prompt written as text, its turn markers matched as control ids
CHAT_PROMPT = (
    "<start_of_turn>user\nList three colors of the rainbow.<end_of_turn>\n<start_of_turn>model\n"
)
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Le chat est", CHAT_PROMPT]
NEW_TOKENS = 16
LOGIT_IDS = 256  # logits of this many fixed vocabulary ids at every prompt position

# One line of each script / kind of text, then random strings drawn from these ranges.
SAMPLES = [
    "Hello, world!",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    "    indented code",
    "x = [1, 2, 3]  # comment",
    "def f(a, b):\n\treturn a ** b\n",
    "if (x != 0) { y = 1.5e-3; }",
    "SELECT * FROM t;",
    "1234567890 3.14159 1,000,000 0x1F",
    "Ελληνικά γράμματα",
    "Русский текст, ёж",
    "Հայերեն",
    "עברית עם ניקוד",
    "العربية النص",
    "हिन्दी भाषा",
    "বাংলা",
    "ภาษาไทย",
    "ქართული",
    "한국어 문장입니다",
    "ひらがなとカタカナ",
    "漢字と中文字符",
    "አማርኛ",
    "தமிழ்",
    "తెలుగు",
    "ខ្មែរ",
    "བོད་ཡིག",
    "ᠮᠣᠩᠭᠣᠯ",
    "ꦗꦮ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ❤️",
    "combining e\u0301 a\u0308 n\u0303",
    "zero\u200bwidth",
    "\u2581 the sentencepiece space",
    "NUL\x00and\x07bell",
    "<table><tr><td>cell</td></tr>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk>",
    "<unused5> <mask>",
    "",
    " ",
    "\n",
    "\t",
    "          ",
    "a" * 100,
    "ab " * 40,
    "Ünïcödé ñ ß Æ Ø å",
    "ﬁ ligature ＦＵＬＬ ｗｉｄｔｈ",
    "½ ² ⅷ ①",
    "☃ ★ ♫ ∑ ∫ √ ∞ ≠",
]
RANGES = [
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x590, 0x6FF),
    (0x900, 0xDFF),
    (0xE00, 0xEFF),
    (0x1100, 0x11FF),
    (0x3040, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0x1F300, 0x1FAFF),
    (0x10000, 0x1007F),
    (0x2000, 0x2BFF),
]
WHITESPACE = [" ", "  ", "\t", "\n", "\n\n", "   ", "\u3000"]

# Special pieces written in raw text, which HF matches as their ids (the default encoding):
# at the start, the end, back to back, inside words, beside spaces and newlines; and partial,
# misspelt or unknown ones that must stay text.
MARKERS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<unk>",
    "<mask>",
    "<unused0>",
    "<unused5>",
    "<unused99>",
    "<unused6241>",
    "<start_of_image>",
    "<end_of_image>",
    "[multimodal]",
    "<table>",
]
NOT_MARKERS = [
    "<start_of_turn",
    "start_of_turn>",
    "<Start_of_turn>",
    "<start_of_turn >",
    "< start_of_turn>",
    "<start-of-turn>",
    "<end_of_tur>",
    "<<bos>>",
    "<bos",
    "<eos >",
    "<unused>",
    "<unused6242>",
    "<unused99999>",
    "<unused-1>",
    "<unused05>",
    "<image>",
    "<start_of_image",
    "<0x41>",
    "\u2581<eos>",
]
SPECIAL_SAMPLES = [
    "<start_of_turn>user\nList three colors of the rainbow.<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "<start_of_turn><end_of_turn><start_of_turn>",
    "<eos>",
    "text<eos>",
    "<bos>text",
    "in<eos>side a w<pad>ord",
    " <end_of_turn> ",
    "  <eos>  ",
    "\n<start_of_turn>\n",
    "\n\n<end_of_turn>\n\n",
    "\t<unused5>\t",
    "<start_of_turn><start_of_turn>",
    "<bos><eos><pad><unk><mask>",
    "<unused0><unused1><unused6241>",
    "<start_of_image><end_of_image>[multimodal]",
    "<table><start_of_turn></table>",
    "<start_of_turn>user",
    "a<start_of_turn>b<end_of_turn>c",
    "<<start_of_turn>>",
    "<start_of_turn>>",
    "<start_of_<end_of_turn>turn>",
    "<start_of_turn<end_of_turn>",
    "<eos><eos><eos>",
    "x<unused99999>y<unused12>z",
    "Ünïcödé<eos>日本語<end_of_turn>🙂",
]


def special_strings(n_random: int = 150, seed: int = 0) -> list[str]:
    """SPECIAL_SAMPLES, each marker and non-marker alone and inside text, then random mixes."""
    rng = random.Random(seed)
    out = list(SPECIAL_SAMPLES)
    for m in MARKERS + NOT_MARKERS:
        out += [m, f"{m}x", f"x{m}", f"a {m} b", f"word{m}word", f"\n{m}\n", m + m]
    words = ["hello", "the", " ", "  ", "\n", "\t", "<", ">", "_", "turn", "é", "日本", "123"]
    for _ in range(n_random):
        parts = [rng.choice(MARKERS + NOT_MARKERS + words) for _ in range(rng.randint(1, 8))]
        out.append("".join(parts))
    return out


def varied_strings(n_random: int = 250, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(SAMPLES)
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 8)):
            if rng.random() < 0.25:
                parts.append(rng.choice(WHITESPACE))
            else:
                lo, hi = rng.choice(RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6))))
        out.append("".join(parts))
    return out


def hf_reference(path: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    strings = varied_strings()
    # split_special_tokens: "<bos>" typed in text is text, as encode(s, special=False)
    ids = [tok(s, add_special_tokens=False, split_special_tokens=True).input_ids for s in strings]
    # the default: special pieces typed in text are their ids, as encode(s)
    specials = special_strings()
    special_ids = [tok(s, add_special_tokens=False).input_ids for s in specials]
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    vocab = model.config.vocab_size
    logit_ids = sorted(random.Random(1).sample(range(vocab), LOGIT_IDS))
    prompts = []
    for text in PROMPTS:
        prompt = tok(text).input_ids
        x = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(x).logits[0]  # [T, V]
            out = model.generate(
                x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        prompts.append(
            dict(
                text=text,
                ids=prompt,
                greedy=out[0, len(prompt) :].tolist(),
                logits=logits[:, logit_ids].tolist(),
                top10=logits.topk(10, dim=-1).indices.tolist(),
                logsumexp=logits.logsumexp(-1).tolist(),
            )
        )
    return dict(
        strings=strings,
        ids=ids,
        logit_ids=logit_ids,
        prompts=prompts,
        special_strings=specials,
        special_ids=special_ids,
    )


def main() -> int:
    from gemmakit.installed import installed_model_path

    path = installed_model_path("gemma3-270m")
    ref = hf_reference(path)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref, ensure_ascii=False))
    tmp.replace(OUT)
    print(f"wrote {OUT} ({len(ref['strings'])} strings, {len(ref['prompts'])} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
