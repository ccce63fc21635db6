"""Hugging Face `tokenizer.json` tokenizers (Qwen, Llama 3, Gemma's fast tokenizer) behind the
interface of `tokenizer.Tokenizer`, read with the `tokenizers` package.

Special ids come from the checkpoint's JSON files beside `tokenizer.json`
(`checkpoint_specials`). Without a pad id anywhere (Llama 3) padding uses the EOS id: padding is
always masked, and `decode` drops leading padding before it looks for EOS. BOS is added when
`tokenizer_config.json` says `add_bos_token`, or else when the tokenizer's own post-processor
puts BOS first (Llama 3's does; Qwen's does not, though its config.json names a `bos_token_id`).
`encode` never adds special tokens itself, nor reads their strings in the text as them; the data
pipelines add BOS where it belongs. The fingerprint hashes the `tokenizer.json` bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os

import tokenizers

from alignment_gap.data.checkpoint_specials import read_special_ids
from alignment_gap.data.tokenizer import content_ids
from alignment_gap.errors import ConfigError


class HFTokenizer:
    def __init__(self, tk: tokenizers.Tokenizer, fingerprint: str, path: str = "<memory>", *,
                 eos_id: int, pad_id: int | None = None, bos_id: int | None = None,
                 add_bos: bool = False, stop_ids=()):
        self.path = path
        self.tk = tk
        # Text is data: a special token's string in it ("</s>" in a post) stays text, as the
        # sentencepiece and GGUF tokenizers keep it, not an EOS mid-response.
        self.tk.encode_special_tokens = True
        self.fingerprint = fingerprint
        self.eos_id = int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in stop_ids)]))

    @functools.cached_property
    def vocab_size(self) -> int:
        """1 + the largest id this tokenizer can give: its model's pieces, added tokens that
        text can spell (`encode` reads no special token's string), the special ids in use.
        Not every added token: Gemma 3's tokenizer.json adds `<image_soft_token>` at 262144,
        past the text models' vocabulary of 262144, and no text encodes to it."""
        added = self.tk.get_added_tokens_decoder()
        ids = [i for i, token in added.items() if not token.special]
        ids += [self.eos_id, self.pad_id, *self.stop_ids]
        ids += [] if self.bos_id is None else [self.bos_id]
        return max(self.tk.get_vocab_size(with_added_tokens=False), *(i + 1 for i in ids))

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Decode up to the first stop id (EOS); padding, special tokens (BOS) and ids past the
        vocabulary (a model's embedding table may be larger) are dropped."""
        size = self.vocab_size
        ids = [i for i in content_ids(ids, self.pad_id, self.stop_ids) if 0 <= i < size]
        return self.tk.decode(ids, skip_special_tokens=True)


def _post_processor_adds(tk: tokenizers.Tokenizer, bos_id: int) -> bool:
    ids = tk.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """The tokenizer of a `tokenizer.json` file, special ids from the JSON files beside it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        tk = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # the tokenizers package raises its own exception types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config.data.tokenizer: {path} is not a Hugging Face tokenizer.json "
                          f"({reason}); point it at the checkpoint's tokenizer.json") from None
    ids = read_special_ids(os.path.dirname(os.path.abspath(path)), tk.token_to_id)
    if not ids.eos:
        raise ConfigError(f"config.data.tokenizer: no EOS id for {path} in config.json, "
                          "generation_config.json or tokenizer_config.json beside it; add "
                          "eos_token_id to config.json")
    bos = ids.bos[0] if ids.bos else None
    add_bos = ids.add_bos if ids.add_bos is not None else (
        bos is not None and _post_processor_adds(tk, bos))
    return HFTokenizer(tk, hashlib.sha256(data).hexdigest()[:16], path, eos_id=ids.eos[0],
                       pad_id=ids.pad[0] if ids.pad else None, bos_id=bos, add_bos=add_bos,
                       stop_ids=ids.eos)
