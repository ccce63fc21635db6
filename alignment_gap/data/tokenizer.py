"""sentencepiece tokenizer: train one on a corpus, or load any existing `.model` file.

Ids 0 and 1 are padding and end-of-sequence in every tokenizer we train (the sampler's
defaults), and they have no BOS; a loaded model reports its own. One tokenizer is shared by the
policy and the preference models. Its fingerprint (a hash of the serialized model) is recorded
next to every checkpoint and dataset built with it, and `check_fingerprint` turns a mismatch into
a clear error.

Every tokenizer kind (this one, `hf_tokenizer.HFTokenizer`; GGUF files rebuild into this one)
offers the same interface: `path`, `fingerprint`, `vocab_size`, `pad_id`, `eos_id`, `bos_id`
(None when there is none), `add_bos` (whether sequences should start with BOS), `stop_ids` (EOS
first, then any other end-of-turn ids), `encode(text)` (never adds specials) and `decode(ids)`.
`pretrained_tokenizers.load_tokenizer(spec)` loads any of them from a path.
"""

from __future__ import annotations

import hashlib
import io
import os

import jax
import numpy as np
import sentencepiece as spm
from jax.experimental import multihost_utils

from alignment_gap.data import world as world_lib
from alignment_gap.errors import ConfigError


def content_ids(ids, pad_id: int, stop_ids) -> list[int]:
    """The ids `decode` renders: left padding dropped, cut at the first stop id, padding dropped.

    Leading padding goes first so a tokenizer whose pad id is its EOS still decodes a
    left-padded prompt.
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    start = 0
    while start < len(ids) and ids[start] == pad_id:
        start += 1
    end = next((k for k in range(start, len(ids)) if ids[k] in stop_ids), len(ids))
    return [i for i in ids[start:end] if i != pad_id]


class Tokenizer:
    def __init__(self, model_proto: bytes, path: str = "<memory>", *,
                 add_bos: bool | None = None, stop_ids=()):
        """`add_bos=None`: add BOS exactly when the model has one (pretrained sentencepiece
        models such as Gemma's and Llama 2's expect it; the ones we train have none).
        `stop_ids`: extra end-of-sequence ids besides the model's EOS."""
        self.path = path
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        if self.eos_id < 0:
            raise ConfigError(f"config.data.tokenizer: {path} has no EOS piece, which every "
                              "sequence needs; use a tokenizer with one")
        # A model without BOS cannot start with it, whatever a tokenizer config asks.
        self.add_bos = self.bos_id is not None and (add_bos is None or bool(add_bos))
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *(int(i) for i in stop_ids)]))

    @classmethod
    def from_file(cls, path: str, **kwargs) -> Tokenizer:
        """A sentencepiece `.model` file."""
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, path, **kwargs)
        except RuntimeError:  # sentencepiece's parse error
            raise ConfigError(f"config.data.tokenizer: {path} is not a sentencepiece model; "
                              "point it at the checkpoint's tokenizer.model") from None

    @classmethod
    def train(cls, sentences, vocab_size: int, path: str | None = None,
              model_type: str = "unigram") -> Tokenizer:
        """Train on an iterable of strings; save to `path` (atomically) if given."""
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
            model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
            minloglevel=2, split_by_number=False)
        tokenizer = cls(buffer.getvalue(), path or "<memory>")
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as f:
                f.write(tokenizer.proto)
            os.replace(tmp, path)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The model's pad id; EOS when it has none (Llama 2's): padding is always masked, and
        `decode` drops leading padding before it looks for EOS."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int | None:
        return None if self.sp.bos_id() < 0 else self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Decode up to the first stop id (EOS); padding is dropped; ids past the tokenizer's
        pieces (a model's vocabulary may be larger) decode as unknown; control pieces (BOS)
        decode to nothing."""
        unk = self.sp.unk_id()
        return self.sp.decode([i if 0 <= i < self.vocab_size else unk
                               for i in content_ids(ids, self.pad_id, self.stop_ids)])


def check_fingerprint(tokenizer: Tokenizer, recorded: str, what: str) -> None:
    """Fail clearly when `what` (a checkpoint or dataset) was built with another tokenizer."""
    if recorded != tokenizer.fingerprint:
        raise ValueError(f"{what} was built with tokenizer {recorded}, but the configured "
                         f"tokenizer {tokenizer.path} is {tokenizer.fingerprint}; point the config "
                         "at the tokenizer it was built with")


def check_fits_model(tokenizer: Tokenizer, vocab_size: int, field: str = "model.vocab_size"):
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"config.{field}: {vocab_size} is smaller than tokenizer "
                         f"{tokenizer.path}'s {tokenizer.vocab_size} pieces; set it to >= "
                         f"{tokenizer.vocab_size}")


def synthetic_tokenizer(data_dir: str, world, vocab_size: int = 512, corpus_posts: int = 4000):
    """The synthetic world's tokenizer, trained once and cached beside its datasets."""

    path = os.path.join(data_dir, "synthetic_world",
                        f"tokenizer-seed{world.seed}-v{vocab_size}.model")
    if not os.path.exists(path) and jax.process_index() == 0:
        Tokenizer.train(world_lib.corpus(world, corpus_posts), vocab_size, path)
    if jax.process_count() > 1:  # the others wait for process 0's file
        multihost_utils.sync_global_devices(f"tokenizer {path}")
    return Tokenizer.from_file(path)
