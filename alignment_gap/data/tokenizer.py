"""sentencepiece tokenizer: train one on a corpus, or load any existing `.model` file.

Ids 0 and 1 are padding and end-of-sequence in every tokenizer we train (the sampler's
defaults); a loaded model reports its own. One tokenizer is shared by the policy and the
preference models. Its fingerprint (a hash of the serialized model) is recorded next to every
checkpoint and dataset built with it, and `check_fingerprint` turns a mismatch into a clear error.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        self.path = path
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        if not os.path.exists(path):
            from alignment_gap.config_checks import ConfigError

            raise ConfigError(f"config.data.tokenizer: {path} does not exist; train one with "
                                    "Tokenizer.train(...) or point the config at a .model file")
        with open(path, "rb") as f:
            return cls(f.read(), path)

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
        return self.sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Decode up to the first EOS; padding is dropped; ids past the tokenizer's pieces (a
        model's vocabulary may be larger) decode as unknown."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        unk = self.sp.unk_id()
        return self.sp.decode([i if i < self.vocab_size else unk for i in ids
                               if i != self.pad_id])


def check_fingerprint(tokenizer: Tokenizer, recorded: str, what: str) -> None:
    """Fail clearly when `what` (a checkpoint or dataset) was built with another tokenizer."""
    if recorded != tokenizer.fingerprint:
        raise ValueError(f"{what} was built with tokenizer {recorded}, but the configured "
                         f"tokenizer {tokenizer.path} is {tokenizer.fingerprint}; point the config "
                         "at the tokenizer it was built with")


def check_fits_model(tokenizer: Tokenizer, vocab_size: int, field: str = "model.vocab_size"):
    if tokenizer.vocab_size > vocab_size:
        from alignment_gap.config_checks import ConfigError

        raise ConfigError(f"config.{field}: {vocab_size} is smaller than tokenizer "
                         f"{tokenizer.path}'s {tokenizer.vocab_size} pieces; set it to >= "
                         f"{tokenizer.vocab_size}")


def synthetic_tokenizer(data_dir: str, world, vocab_size: int = 512, corpus_posts: int = 4000):
    """The synthetic world's tokenizer, trained once and cached beside its datasets."""
    import jax
    from jax.experimental import multihost_utils

    from alignment_gap.data import world as world_lib

    path = os.path.join(data_dir, "synthetic_world",
                        f"tokenizer-seed{world.seed}-v{vocab_size}.model")
    if not os.path.exists(path) and jax.process_index() == 0:
        Tokenizer.train(world_lib.corpus(world, corpus_posts), vocab_size, path)
    if jax.process_count() > 1:  # the others wait for process 0's file
        multihost_utils.sync_global_devices(f"tokenizer {path}")
    return Tokenizer.load(path)
