"""TFDS builders for the paper's real preference data, read from a local manual directory.

Nothing is downloaded: put the published files in a directory and point the builder at it.

* **TL;DR comparisons** (OpenAI summarize-from-feedback): `comparisons/*.json`, one JSON object
  per line with `info` (`id`, `post` or `article`, `title`, `subreddit`), `summaries` (two
  objects with `text`), `choice` (0 or 1) and `split` (`train`, `valid1`, `valid2` -> train,
  validation, test). The prompt is the paper's layout, `SUBREDDIT: r/... TITLE: ... POST: ...
  TL;DR:`.
* **Anthropic HH-RLHF**: `<subset>/{train,test}.jsonl.gz` (e.g. `helpful-base`), lines of
  `chosen` / `rejected` dialogues. The shared prefix up to the last `Assistant:` turn becomes
  the prompt; the final assistant turns are the responses.

A malformed record stops the build with the file, the record index and the field named
(`DataError`); no record is skipped silently.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os

import tensorflow_datasets as tfds

from alignment_gap.data.builders import FILE_FORMAT, VERSION, DataError, comparison_features

TLDR_SPLITS = {"train": "train", "valid1": "validation", "valid2": "test"}
ASSISTANT = "\n\nAssistant:"


def _field(record, path: str, where: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: field '{path}' is missing")
        value = value[part]
    return value


def _read_json_lines(path: str, opener=open):
    with opener(path, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: record {index}: not valid JSON ({e.msg})") from None


def tldr_prompt(info: dict, where: str) -> str:
    body = info.get("post") if info.get("post") is not None else info.get("article")
    if body is None:
        raise DataError(f"{where}: field 'info.post' is missing (nor is there 'info.article')")
    title = info.get("title") or ""
    subreddit = info.get("subreddit")
    head = f"SUBREDDIT: r/{subreddit}\n" if subreddit else ""
    return f"{head}TITLE: {title}\nPOST: {body}\nTL;DR:"


def parse_tldr_comparison(record: dict, where: str) -> tuple[str, dict]:
    """(split, comparison record) of one line of a summarize-from-feedback comparisons file."""
    info = _field(record, "info", where)
    summaries = _field(record, "summaries", where)
    choice = _field(record, "choice", where)
    split = _field(record, "split", where)
    if split not in TLDR_SPLITS:
        raise DataError(f"{where}: field 'split' is {split!r}; expected one of "
                        f"{sorted(TLDR_SPLITS)}")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(f"{where}: field 'summaries' must hold exactly 2 summaries")
    if choice not in (0, 1):
        raise DataError(f"{where}: field 'choice' is {choice!r}; expected 0 or 1")
    texts = [_field(s, "text", f"{where}: summaries[{i}]") for i, s in enumerate(summaries)]
    return TLDR_SPLITS[split], {
        "prompt": tldr_prompt(info, where), "chosen": texts[choice].strip(),
        "rejected": texts[1 - choice].strip(), "post_id": str(_field(info, "id", where))}


def split_hh_dialogue(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) from two full HH dialogues."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: field 'chosen' has no '{ASSISTANT.strip()}' turn")
    prompt = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        # The two dialogues diverge earlier: use the longest shared prefix ending at a turn.
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' share no prompt ending "
                            f"in an '{ASSISTANT.strip()}' turn")
        prompt = shared[: cut + len(ASSISTANT)]
    return prompt, chosen[len(prompt):].strip(), rejected[len(prompt):].strip()


@dataclasses.dataclass
class ManualConfig(tfds.core.BuilderConfig):
    subsets: tuple[str, ...] = ()  # HH only: subset directories to read.


class TldrComparisons(tfds.core.GeneratorBasedBuilder):
    """OpenAI summarize-from-feedback comparisons (`comparisons/*.json` in the manual dir)."""

    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the published comparisons/*.json files in manual_dir."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self,
                                     features=comparison_features(post_id=tfds.features.Text()))

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        files = sorted(glob.glob(os.path.join(root, "comparisons", "*.json")))
        if not files:
            raise DataError(f"{root}/comparisons: no *.json files; put the summarize-from-"
                            "feedback comparison files there")
        by_split = {name: [] for name in TLDR_SPLITS.values()}
        for path in files:
            for index, record in _read_json_lines(path):
                where = f"{path}: record {index}"
                split, example = parse_tldr_comparison(record, where)
                by_split[split].append((f"{os.path.basename(path)}:{index}", example))
        return {split: self._generate_examples(rows) for split, rows in by_split.items() if rows}

    def _generate_examples(self, rows):
        for key, example in rows:
            yield key, {"id": key, **example}


class AnthropicHh(tfds.core.GeneratorBasedBuilder):
    """Anthropic HH-RLHF (`<subset>/{train,test}.jsonl.gz` in the manual dir)."""

    VERSION = VERSION
    BUILDER_CONFIGS = [ManualConfig(name=s, version=VERSION, subsets=(s,)) for s in
                       ("helpful-base", "harmless-base", "helpful-online",
                        "helpful-rejection-sampled")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <subset>/train.jsonl.gz and test.jsonl.gz in manual_dir."

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=comparison_features())

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        splits = {}
        for split in ("train", "test"):
            paths = [os.path.join(root, s, f"{split}.jsonl.gz")
                     for s in self.builder_config.subsets]
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise DataError(f"{missing[0]}: file is missing; put the HH-RLHF "
                                f"{split}.jsonl.gz of that subset there")
            splits[split] = self._generate_examples(paths)
        return splits

    def _generate_examples(self, paths):
        for path in paths:
            for index, record in _read_json_lines(path, gzip.open):
                where = f"{path}: record {index}"
                chosen, rejected = (_field(record, k, where) for k in ("chosen", "rejected"))
                prompt, good, bad = split_hh_dialogue(chosen, rejected, where)
                key = f"{os.path.basename(os.path.dirname(path))}/{index}"
                yield key, {"id": key, "prompt": prompt, "chosen": good, "rejected": bad}


def tldr_builder(data_dir: str) -> TldrComparisons:
    """Build with `builders.prepare(tldr_builder(dir), manual_dir=...)`."""
    config = tfds.core.BuilderConfig(name="default", version=VERSION)
    return TldrComparisons(data_dir=data_dir, file_format=FILE_FORMAT, config=config)


def hh_builder(data_dir: str, subset: str = "helpful-base") -> AnthropicHh:
    """Build with `builders.prepare(hh_builder(dir, subset), manual_dir=...)`."""
    known = {c.name for c in AnthropicHh.BUILDER_CONFIGS}
    config = subset if subset in known else ManualConfig(name=subset, version=VERSION,
                                                         subsets=(subset,))
    return AnthropicHh(data_dir=data_dir, file_format=FILE_FORMAT, config=config)
