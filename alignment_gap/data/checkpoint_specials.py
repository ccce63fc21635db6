"""BOS / EOS / pad ids as a Hugging Face checkpoint directory's JSON files state them.

Every file is optional. Ids are gathered in this order, first found first: `config.json` (and its
`text_config`, where multimodal checkpoints such as Gemma 3 4B keep the language model's ids),
`generation_config.json`, then the token strings of `tokenizer_config.json` (`bos_token`,
`eos_token`, `pad_token`; a string or an added-token dict) mapped through the vocabulary. EOS may
be a list (Llama 3 instruct names three; Gemma 3's generation config adds `<end_of_turn>`): every
EOS id found stops generation, and the first is *the* EOS. `add_bos_token` in
`tokenizer_config.json` says whether sequences start with BOS (None when the file does not say).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from alignment_gap.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    bos: tuple[int, ...] = ()
    eos: tuple[int, ...] = ()
    pad: tuple[int, ...] = ()
    add_bos: bool | None = None


def _json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.data.tokenizer: {path} is not readable JSON ({e}); fix or "
                          "remove the file") from None
    return value if isinstance(value, dict) else {}


def _ids(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if v is not None]


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_special_ids(directory: str, token_to_id: Callable[[str], int | None]) -> SpecialIds:
    """The special ids the checkpoint in `directory` names; `token_to_id` maps a token string to
    its id (or None) in the checkpoint's vocabulary."""
    config = _json(directory, "config.json")
    sources = [config, config.get("text_config") or {},
               _json(directory, "generation_config.json")]
    tokenizer_config = _json(directory, "tokenizer_config.json")
    found = {}
    for name in ("bos", "eos", "pad"):
        ids = [i for source in sources for i in _ids(source.get(f"{name}_token_id"))]
        token = _token(tokenizer_config.get(f"{name}_token"))
        if token is not None and token_to_id(token) is not None:
            ids.append(int(token_to_id(token)))
        found[name] = tuple(dict.fromkeys(ids))
    add_bos = tokenizer_config.get("add_bos_token")
    return SpecialIds(**found, add_bos=None if add_bos is None else bool(add_bos))
