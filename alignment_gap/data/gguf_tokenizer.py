"""Rebuild a GGUF file's tokenizer as a sentencepiece model, so `Tokenizer` reads it unchanged.

GGUF stores a SentencePiece-style vocabulary (`tokenizer.ggml.model == "llama"`, which Gemma and
Llama 2 use) as metadata: pieces, scores, token types and the special ids. Piece types use the
numbering of sentencepiece's `ModelProto.SentencePiece.Type` (1 normal, 2 unknown, 3 control,
4 user defined, 5 unused, 6 byte), so they carry over; the merges of a BPE model follow from the
scores, which is how sentencepiece's own BPE encoder works.

Two things the file does not say directly:
- llama.cpp's converter writes user-defined pieces with their `▁` turned back into spaces (Gemma's
  whitespace runs `"  "`, `"   "`, ...). sentencepiece escapes spaces before it looks pieces up,
  so they are turned back into `▁` here, or those pieces could never match.
- the unknown piece may be typed CONTROL; sentencepiece needs exactly one UNKNOWN piece, so the
  piece at `unknown_token_id` gets that type.
The normaliser is the identity with whitespace escaped, a dummy prefix unless `add_space_prefix`
says no (llama.cpp's default for these vocabularies; Gemma's files say no), and whitespace runs
kept (Gemma's settings).
"""

from __future__ import annotations

import os

from sentencepiece import sentencepiece_model_pb2 as sp_model

from alignment_gap.data.tokenizer import Tokenizer
from alignment_gap.errors import ConfigError
from alignment_gap.gguf_file import GgufFile

_PIECE = sp_model.ModelProto.SentencePiece
_KEY = "tokenizer.ggml."


def _metadata(path: str) -> dict:
    """The `tokenizer.ggml.*` fields of a GGUF file, keys without the prefix."""
    return {name[len(_KEY):]: value for name, value in GgufFile(path).fields.items()
            if name.startswith(_KEY)}


def model_proto(meta: dict, where: str = "GGUF") -> sp_model.ModelProto:
    """The sentencepiece ModelProto of `tokenizer.ggml.*` metadata (see `_metadata`)."""
    kind = meta.get("model")
    if kind != "llama":
        raise ConfigError(f"config.data.tokenizer: {where} has tokenizer.ggml.model={kind!r}; "
                          "only SentencePiece-style ('llama') GGUF tokenizers can be rebuilt, "
                          "point it at the checkpoint's tokenizer.json or tokenizer.model instead")
    tokens, scores, types = meta["tokens"], meta["scores"], meta["token_type"]
    if not len(tokens) == len(scores) == len(types):
        raise ConfigError(f"config.data.tokenizer: {where} has {len(tokens)} tokens but "
                          f"{len(scores)} scores and {len(types)} types; the file is damaged")
    unk = meta.get("unknown_token_id")
    if unk is None:
        raise ConfigError(f"config.data.tokenizer: {where} names no unknown_token_id, which "
                          "sentencepiece needs; use the checkpoint's tokenizer.model instead")

    proto = sp_model.ModelProto()
    for i, (piece, score, kind_id) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind_id == _PIECE.USER_DEFINED:
            piece = piece.replace(" ", "\u2581")
        proto.pieces.add(piece=piece, score=score,
                         type=_PIECE.UNKNOWN if i == unk else kind_id)

    spec = proto.trainer_spec
    spec.model_type = sp_model.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = _PIECE.BYTE in types
    for name in ("unk", "bos", "eos", "pad"):
        token_id = unk if name == "unk" else meta.get(
            "padding_token_id" if name == "pad" else f"{name}_token_id")
        setattr(spec, f"{name}_id", -1 if token_id is None else int(token_id))
        if token_id is not None:
            setattr(spec, f"{name}_piece", tokens[int(token_id)])

    norm = proto.normalizer_spec
    norm.name = "identity"
    # llama.cpp adds the prefix to SentencePiece ("llama") vocabularies unless the file says no
    norm.add_dummy_prefix = bool(meta.get("add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


# End-of-turn pieces llama.cpp also ends generation at, whatever the file's ids say (Gemma's
# GGUF names no eot_token_id, while its Hugging Face generation config stops at <end_of_turn>).
END_OF_TURN_PIECES = ("<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>")


def stop_ids(meta: dict) -> tuple[int, ...]:
    """EOS first, then end-of-turn / end-of-message ids where the file names them, then the
    vocabulary's end-of-turn pieces (`END_OF_TURN_PIECES`)."""
    ids = [meta.get(k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    pieces = [i for i, piece in enumerate(meta.get("tokens", ())) if piece in END_OF_TURN_PIECES]
    return tuple(dict.fromkeys(int(i) for i in [*ids, *pieces] if i is not None))


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """A `Tokenizer` rebuilt from the GGUF file at `path`; its fingerprint hashes the rebuilt
    model, so the same vocabulary in another file keeps its fingerprint."""
    meta = _metadata(path)
    if "tokens" not in meta:
        raise ConfigError(f"config.data.tokenizer: {path} holds no tokenizer.ggml.tokens; point "
                          "it at a GGUF file with a tokenizer, or at the checkpoint's tokenizer")
    proto = model_proto(meta, os.path.basename(path)).SerializeToString()
    return Tokenizer(proto, path, add_bos=meta.get("add_bos_token"), stop_ids=stop_ids(meta))
