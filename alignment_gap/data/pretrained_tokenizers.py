"""One entry point for every tokenizer `config.data.tokenizer` may name.

    tok = load_tokenizer("~/ckpt/gemma-3-270m")        # a directory: tokenizer.json, else .model
    tok = load_tokenizer("gemma-3-270m-q4_k_m.gguf")   # rebuilt from the GGUF metadata
    tok = load_tokenizer("data/tokenizer.model")       # sentencepiece, as we train them

Dispatch is on the path: a `.model` file is sentencepiece, a `.gguf` file is rebuilt from its
metadata (`gguf_tokenizer`), a `.json` file is a Hugging Face tokenizer (`hf_tokenizer`), and a
directory holding `tokenizer.json` or else `tokenizer.model` is read as that file. In a
checkpoint directory a sentencepiece model also takes `add_bos_token` and any extra EOS ids from
the JSON files beside it (`checkpoint_specials`). Anything else is a one-line `ConfigError`.
"""

from __future__ import annotations

import os

from alignment_gap.data.checkpoint_specials import read_special_ids
from alignment_gap.data.gguf_tokenizer import load_gguf_tokenizer
from alignment_gap.data.hf_tokenizer import load_hf_tokenizer
from alignment_gap.data.tokenizer import Tokenizer
from alignment_gap.errors import ConfigError

KINDS = ("a sentencepiece .model file, a .gguf file, a Hugging Face tokenizer.json, or a "
         "checkpoint directory holding tokenizer.json or tokenizer.model")


def _fail(spec: str, problem: str):
    raise ConfigError(f"config.data.tokenizer: {spec!r} {problem}; point it at {KINDS}")


def _sentencepiece_in_checkpoint(path: str) -> Tokenizer:
    sp = Tokenizer.from_file(path).sp

    def piece_id(piece: str) -> int | None:
        i = sp.piece_to_id(piece)  # unknown pieces map to the unk id
        return i if sp.id_to_piece(i) == piece else None

    ids = read_special_ids(os.path.dirname(os.path.abspath(path)), piece_id)
    return Tokenizer.from_file(path, add_bos=ids.add_bos, stop_ids=ids.eos)


def load_tokenizer(spec: str):
    """The tokenizer `spec` names: a `Tokenizer` (sentencepiece, GGUF) or an `HFTokenizer`."""
    path = os.path.expanduser(str(spec))
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        _fail(spec, "is a directory without tokenizer.json or tokenizer.model")
    if not os.path.isfile(path):
        _fail(spec, "does not exist")
    if path.endswith(".model"):
        if os.path.basename(path) == "tokenizer.model":
            return _sentencepiece_in_checkpoint(path)
        return Tokenizer.from_file(path)
    if path.endswith(".gguf"):
        return load_gguf_tokenizer(path)
    if path.endswith(".json"):
        return load_hf_tokenizer(path)
    _fail(spec, "is not a kind of tokenizer file we read")
