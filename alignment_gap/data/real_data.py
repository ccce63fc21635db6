"""TFDS builders for the paper's real preference data, read from a local manual directory.

Nothing is downloaded: put the published files in a directory and point the builder at it.

* **TL;DR comparisons** (OpenAI summarize-from-feedback): `comparisons/*.json`, one JSON object
  per line with `info` (`id`, `post`, `title`, `subreddit`), `summaries` (two objects with
  `text`), `choice` (0 or 1) and `split` (`train`, `valid1`, `valid2` -> train, validation,
  test). The prompt is the paper's layout, `SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:`. The
  published folder also holds CNN/Daily Mail batches (`info.article`, no `post`): news, not
  Reddit posts; they are dropped and counted (`dropped_news` in the dataset's metadata).
* **Anthropic HH-RLHF**: `<subset>/{train,test}.jsonl.gz` (e.g. `helpful-base`), lines of
  `chosen` / `rejected` dialogues. The shared prefix up to the last `Assistant:` turn becomes
  the prompt; the final assistant turns are the responses. Pairs whose dialogues differ earlier
  are dropped and counted (`dropped_diverged`). HH publishes no validation split: it is carved
  from train (`carved_split`).
* **Chatbot Arena conversations**: `*.jsonl`, `*.jsonl.gz` or `*.parquet` anywhere under the
  manual dir, one battle per record; rules in `ChatbotArena`. Arena publishes only train:
  validation and test are carved from it.

A response is stored as it follows its prompt in the published text: one leading space (`TL;DR:
summary`, `Assistant: reply`), trailing whitespace dropped. Responses are tokenised apart from
their prompts, so the space must be in the response: a pretrained tokenizer that adds no space of
its own (Gemma's, and the byte-level ones of Qwen and Llama 3) then reads `TL;DR: My` as the
model saw such text, not `TL;DR:My`.

The built dataset's name carries a fingerprint of the files it was built from (their paths
under the manual dir and their bytes): pointing `manual_dir` at other files, or changing them,
builds a new dataset beside the old one instead of reading the old one.

Carving is deterministic: a record's split is decided by the SHA-256 of its prompt text alone,
so it never depends on file order, carved splits never overlap train, and pairs sharing a
prompt share a split (no prompt leaks from train into a carved split). Splits a dataset
publishes are kept as published: HH's train and test can hold the same short prompt.

A malformed record stops the build with the file, the line (a parquet file: the row, from 0)
and the field named (`DataError`); no record is skipped silently.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import hashlib
import json
import os
import zlib

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from alignment_gap.data.builders import FILE_FORMAT, comparison_features
from alignment_gap.errors import DataError

TLDR_SPLITS = {"train": "train", "valid1": "validation", "valid2": "test"}
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
CARVE_FRACTION = 0.05  # Of train, for each split the published data lacks.
# 1.1.0 (HH 1.2.0): responses keep their leading space; TL;DR drops the CNN/DM batches.
TLDR_VERSION = tfds.core.Version("1.1.0")
# 1.1.0: validation carved from train (1.0.0 had train and test only); 1.2.0: as above;
# 1.3.0: pairs differing before the final assistant turn dropped.
HH_VERSION = tfds.core.Version("1.3.0")
ARENA_VERSION = tfds.core.Version("1.1.0")
RELEASE_NOTES = {"1.1.0": "responses keep the leading space that follows their prompt."}


def hash_unit(text: str) -> float:
    """A stable number in [0, 1) for `text` (the same on every machine and Python run)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def carved_split(prompt: str, carved: tuple[str, ...]) -> str:
    """`train`, or the `i`-th of `carved` for prompts hashing into [i, i + 1) * CARVE_FRACTION."""
    index = int(hash_unit(prompt) // CARVE_FRACTION)
    return carved[index] if index < len(carved) else "train"


def carving_note(carved: tuple[str, ...]) -> str:
    """One sentence stating how the splits missing from the published data were made."""
    if len(carved) == 1:
        lacks, made = f"{carved[0]} split: it is", "the records"
    else:
        lacks, made = f"{' and '.join(carved)} splits: they are", "each the records"
    return (f"The published data has no {lacks} carved from train, {made} whose prompt's "
            f"SHA-256 falls in a fixed {CARVE_FRACTION:.0%} of hash space (about "
            f"{CARVE_FRACTION:.0%} of train; deterministic, independent of file order, "
            "disjoint from train).")


def _empty_split_message(split: str, root: str) -> str:
    return (f"{root}: the {split!r} split holds no records; every stage needs train, validation "
            f"and test (a carved split takes {CARVE_FRACTION:.0%} of train: too few records "
            "leave it empty)")


def _field(record, path: str, where: str):
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(f"{where}: field '{path}' is missing")
        value = value[part]
    return value


def _shown(value, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters (a wrong field can hold a whole document)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _text(value, name: str, where: str) -> str:
    """`value` if it is text UTF-8 can encode (JSON's \\ud83d escapes can leave half an emoji)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {_shown(value)}; expected text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field '{name}' holds {value[e.start]!r} at character "
                        f"{e.start}, half of a UTF-16 pair; repair the record's escapes") from None
    return value


def _text_field(record, name: str, where: str) -> str:
    return _text(_field(record, name, where), name, where)


def response(text: str) -> str:
    """A response as it follows its prompt: one leading space, no trailing whitespace ("" for
    an empty one, which trains as EOS alone)."""
    text = text.strip()
    return f" {text}" if text else ""


def _read_json_lines(path: str, opener=open):
    """(line index from 0, where: "path: line n" counted from 1 as editors do, record) of a
    JSON-lines file; a line that is not UTF-8 or not JSON, and a gzip file cut short or not gzip
    at all, stop with one line naming the file and the fix."""
    index = -1
    try:
        with opener(path, "rb") as f:
            for index, raw in enumerate(f):
                where = f"{path}: line {index + 1}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 (byte "
                                    f"{raw[e.start]:#04x} at column {e.start}); re-encode the "
                                    "file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg}); the file "
                                    "must hold one JSON object per line (JSON lines)") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: a JSON {type(record).__name__}, "
                                    "not an object; the file must hold one JSON object per line "
                                    "(JSON lines)")
                yield index, where, record
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: the file is damaged after {index + 1} records ({e}); copy "
                        "it again from the published data") from None


def tldr_prompt(info: dict, where: str) -> str:
    if not isinstance(info, dict):
        raise DataError(f"{where}: field 'info' is {_shown(info)}; expected an object with "
                        "'post', 'title' and 'subreddit'")
    body = info.get("post")
    if body is None:
        raise DataError(f"{where}: field 'info.post' is missing")
    for name, value in (("post", body), ("title", info.get("title")),
                        ("subreddit", info.get("subreddit"))):
        if value is not None:
            _text(value, f"info.{name}", where)
    title = info.get("title") or ""
    subreddit = info.get("subreddit")
    head = f"SUBREDDIT: r/{subreddit}\n" if subreddit else ""
    return f"{head}TITLE: {title}\nPOST: {body}\nTL;DR:"


def is_news(record: dict) -> bool:
    """A CNN/Daily Mail comparison of the published folder: `info` with an `article`, no `post`."""
    info = record.get("info")
    return isinstance(info, dict) and info.get("post") is None and info.get("article") is not None


def parse_tldr_comparison(record: dict, where: str) -> tuple[str, dict]:
    """(split, comparison record) of one line of a summarize-from-feedback comparisons file."""
    info = _field(record, "info", where)
    summaries = _field(record, "summaries", where)
    choice = _field(record, "choice", where)
    split = _field(record, "split", where)
    if not isinstance(split, str) or split not in TLDR_SPLITS:
        raise DataError(f"{where}: field 'split' is {split!r}; expected one of "
                        f"{sorted(TLDR_SPLITS)}")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(f"{where}: field 'summaries' must hold exactly 2 summaries")
    if type(choice) is not int or choice not in (0, 1):  # noqa: E721 - True is not a choice
        raise DataError(f"{where}: field 'choice' is {_shown(choice)}; expected 0 or 1")
    texts = [_text_field(s, "text", f"{where}: summaries[{i}]") for i, s in enumerate(summaries)]
    return TLDR_SPLITS[split], {
        "prompt": tldr_prompt(info, where), "chosen": response(texts[choice]),
        "rejected": response(texts[1 - choice]), "post_id": _post_id(record, where)}


def _post_id(record: dict, where: str) -> str:
    value = _field(record, "info.id", where)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: field 'info.id' is {_shown(value)}; expected text or a "
                        "number")
    return str(value)


def split_hh_dialogue(chosen: str, rejected: str, where: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) from two full HH dialogues; None when they
    differ before the final assistant turn (see `AnthropicHh`). Two dialogues that share no
    assistant turn at all are not one comparison: a malformed record."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: field 'chosen' has no '{ASSISTANT.strip()}' turn")
    prompt = chosen[: cut + len(ASSISTANT)]
    good, bad = chosen[len(prompt):], rejected[len(prompt):]
    if rejected.startswith(prompt) and HUMAN not in good and HUMAN not in bad:
        return prompt, response(good), response(bad)
    if ASSISTANT not in os.path.commonprefix([chosen, rejected]):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' share no prompt ending in an "
                        f"'{ASSISTANT.strip()}' turn")
    return None


@dataclasses.dataclass
class ManualConfig(tfds.core.BuilderConfig):
    subsets: tuple[str, ...] = ()  # HH only: subset directories to read.


class _RecordsRead(tfds.core.GeneratorBasedBuilder):
    """A builder whose `_split_generators` reads every record first (to count what it drops
    and carve splits) and hands each split its (key, example) rows; the key is the id."""

    def _generate_examples(self, rows):
        for key, example in rows:
            yield key, {"id": key, **example}


def tldr_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "comparisons", "*.json")))


class TldrComparisons(_RecordsRead):
    """OpenAI summarize-from-feedback comparisons (`comparisons/*.json` in the manual dir)."""

    VERSION = TLDR_VERSION
    RELEASE_NOTES = {**RELEASE_NOTES, "1.1.0": RELEASE_NOTES["1.1.0"] + " CNN/DM dropped."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the published comparisons/*.json files in manual_dir."

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=comparison_features(post_id=tfds.features.Text()),
            metadata=tfds.core.MetadataDict(),
            description="OpenAI TL;DR comparisons; the published splits train, valid1 and "
                        "valid2 are train, validation and test; the CNN/DM batches dropped.")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        files = tldr_files(root)
        if not files:
            raise DataError(f"{root}/comparisons: no *.json files; put the summarize-from-"
                            "feedback comparison files there")
        by_split = {name: [] for name in TLDR_SPLITS.values()}
        news = 0
        for path in files:
            for index, where, record in _read_json_lines(path):
                if is_news(record):
                    news += 1
                    continue
                split, example = parse_tldr_comparison(record, where)
                by_split[split].append((f"{os.path.basename(path)}:{index}", example))
        self.info.metadata.update(dropped_news=news)
        return {split: self._generate_examples(rows) for split, rows in by_split.items() if rows}


def hh_files(root: str, subsets, splits=("train", "test")) -> list[str]:
    return [os.path.join(root, s, f"{split}.jsonl.gz") for s in subsets for split in splits]


class AnthropicHh(_RecordsRead):
    """Anthropic HH-RLHF (`<subset>/{train,test}.jsonl.gz` in the manual dir).

    A pair is the two dialogues' final assistant turns after their shared prompt. Pairs whose
    dialogues differ before that turn are dropped, counted in the dataset's metadata
    (`dropped_diverged`): their responses would hold later human turns (a policy trained on them
    learns to write the user's side) and their label judges turns the prompt does not condition
    on; this is Chatbot Arena's multi-turn rule.

    Splits: train and test as published; validation carved from train (`carving_note`).
    """

    VERSION = HH_VERSION
    RELEASE_NOTES = {"1.1.0": "validation split carved from train.",
                     "1.2.0": RELEASE_NOTES["1.1.0"],
                     "1.3.0": "pairs differing before the final assistant turn dropped."}
    BUILDER_CONFIGS = [ManualConfig(name=s, version=HH_VERSION, subsets=(s,)) for s in
                       ("helpful-base", "harmless-base", "helpful-online",
                        "helpful-rejection-sampled")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <subset>/train.jsonl.gz and test.jsonl.gz in manual_dir."
    CARVED = ("validation",)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=comparison_features(), metadata=tfds.core.MetadataDict(),
            description=f"Anthropic HH-RLHF {'+'.join(self.builder_config.subsets)}: pairs "
                        "differing before the final assistant turn dropped. "
                        f"{carving_note(self.CARVED)}")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        by_split = {"train": [], "validation": [], "test": []}
        files = {published: self._files(root, published) for published in ("train", "test")}
        diverged = 0
        for published, paths in files.items():
            for path in paths:
                subset = os.path.basename(os.path.dirname(path))
                for index, where, record in _read_json_lines(path, gzip.open):
                    chosen, rejected = (_text_field(record, k, where) for k in
                                        ("chosen", "rejected"))
                    pair = split_hh_dialogue(chosen, rejected, where)
                    if pair is None:
                        diverged += 1
                        continue
                    prompt, good, bad = pair
                    split = carved_split(prompt, self.CARVED) if published == "train" else "test"
                    by_split[split].append((f"{subset}/{index}", {
                        "prompt": prompt, "chosen": good, "rejected": bad}))
        self.info.metadata.update(dropped_diverged=diverged)
        empty = [split for split, rows in by_split.items() if not rows]
        if empty:
            raise DataError(_empty_split_message(empty[0], root))
        return {split: self._generate_examples(rows) for split, rows in by_split.items()}

    def _files(self, root: str, split: str) -> list[str]:
        paths = hh_files(root, self.builder_config.subsets, (split,))
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise DataError(f"{missing[0]}: file is missing; put the HH-RLHF "
                            f"{split}.jsonl.gz of that subset there")
        return paths


ARENA_WINNERS = ("model_a", "model_b")
ARENA_TIES = ("tie", "tie (bothbad)")
ARENA_ROLES = ("user", "assistant")
ARENA_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.parquet")


def arena_conversation(record, name: str, turns: int, where: str) -> list[str]:
    """The contents of conversation `name`: user, assistant, user, ... (`turns` user turns)."""
    conversation = _field(record, name, where)
    if not isinstance(conversation, list):
        raise DataError(f"{where}: field '{name}' is not a list of role/content turns")
    contents = []
    for i, turn in enumerate(conversation):
        role = _field(turn, "role", f"{where}: {name}[{i}]")
        content = _field(turn, "content", f"{where}: {name}[{i}]")
        if role != ARENA_ROLES[i % 2]:
            raise DataError(f"{where}: field '{name}[{i}].role' is {role!r}; expected "
                            f"{ARENA_ROLES[i % 2]!r} (turns alternate user, assistant)")
        contents.append(_text(content, f"{name}[{i}].content", where))
    if len(contents) != 2 * turns:
        raise DataError(f"{where}: field '{name}' holds {len(contents)} turns; field 'turn' "
                        f"is {turns}, so expected {2 * turns} (user and assistant each)")
    return contents


def parse_arena_battle(record, where: str) -> tuple[str, dict | None]:
    """(outcome, comparison record or None) of one battle; outcome is `pair`, `tie` or
    `multi_turn` (the last two carry no record). Every field is checked whatever the outcome."""
    models = [_text_field(record, k, where) for k in ("model_a", "model_b")]
    winner = _field(record, "winner", where)
    if winner not in ARENA_WINNERS + ARENA_TIES:
        raise DataError(f"{where}: field 'winner' is {winner!r}; expected one of "
                        f"{list(ARENA_WINNERS + ARENA_TIES)}")
    language = _text_field(record, "language", where)
    turns = _field(record, "turn", where)
    if not isinstance(turns, int) or isinstance(turns, bool) or turns < 1:
        raise DataError(f"{where}: field 'turn' is {turns!r}; expected a count of user turns >= 1")
    a, b = (arena_conversation(record, k, turns, where)
            for k in ("conversation_a", "conversation_b"))
    if a[0] != b[0]:
        raise DataError(f"{where}: fields 'conversation_a' and 'conversation_b' open with "
                        "different user turns; a battle asks both models the same question")
    if winner in ARENA_TIES:
        return "tie", None
    if turns > 1:
        return "multi_turn", None
    w = ARENA_WINNERS.index(winner)
    replies, prompt = (response(a[1]), response(b[1])), f"{HUMAN} {a[0].strip()}{ASSISTANT}"
    return "pair", {"prompt": prompt, "chosen": replies[w], "rejected": replies[1 - w],
                    "language": language, "chosen_model": models[w],
                    "rejected_model": models[1 - w]}


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow, which is not installed; "
                        "pip install pyarrow, or convert the file to JSON lines") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{path}: not a readable parquet file ({why}); copy it again from "
                        "the published data, or convert it to JSON lines") from None
    for index, record in enumerate(table.to_pylist()):
        yield index, f"{path}: row {index}", record


def read_arena_file(path: str):
    """(record index, where, record) of one Arena file, by its extension."""
    if path.endswith(".parquet"):
        return _read_parquet(path)
    return _read_json_lines(path, gzip.open if path.endswith(".gz") else open)


def arena_files(root: str) -> list[str]:
    return sorted({path for pattern in ARENA_PATTERNS
                   for path in glob.glob(os.path.join(root, "**", pattern), recursive=True)})


class ChatbotArena(_RecordsRead):
    """Chatbot Arena conversations (`*.jsonl`, `*.jsonl.gz`, `*.parquet` in the manual dir).

    Each record is one battle: `model_a`, `model_b`, `winner`, `conversation_a` and
    `conversation_b` (lists of `{role, content}` turns), `turn` (user turns) and `language`.

    Rules:
    * `winner` `model_a` / `model_b`: the winner's reply is `chosen`, the other `rejected`.
    * Ties (`tie` and `tie (bothbad)`) state no preference: dropped, counted in the dataset's
      metadata (`dropped_ties`).
    * Multi-turn battles (`turn` > 1) are dropped, counted (`dropped_multi_turn`). The vote
      judges the whole conversation, and after the first turn each model continues its own
      history, so there is no shared prompt to condition two responses on; using only the first
      turn would pin a verdict on later turns onto the first replies.
    * Single-turn battles: the prompt is the user turn in HH's layout,
      `\\n\\nHuman: <question>\\n\\nAssistant:`; the responses are the two assistant replies.
    * Malformed records (a missing field, an unknown winner, a role out of the user/assistant
      alternation, a `turn` count the conversation does not hold, two conversations opening
      with different questions) stop the build with one line naming file, record and field,
      ties and multi-turn records included.

    Splits: Arena publishes train only; validation and test are carved from it
    (`carving_note`).
    """

    VERSION = ARENA_VERSION
    RELEASE_NOTES = RELEASE_NOTES
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the Chatbot Arena conversations (*.jsonl, *.jsonl.gz "
                                    "or *.parquet) in manual_dir.")
    CARVED = ("validation", "test")

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self, metadata=tfds.core.MetadataDict(),
            features=comparison_features(language=text, chosen_model=text, rejected_model=text),
            description="Chatbot Arena conversations: single-turn battles with a winner (ties "
                        f"and multi-turn battles dropped). {carving_note(self.CARVED)}")

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        by_split = {"train": [], **{name: [] for name in self.CARVED}}
        counts = {"pair": 0, "tie": 0, "multi_turn": 0}
        for path in self._files(root):
            for index, where, record in read_arena_file(path):
                outcome, example = parse_arena_battle(record, where)
                counts[outcome] += 1
                if example is not None:
                    key = f"{os.path.relpath(path, root)}:{index}"
                    by_split[carved_split(example["prompt"], self.CARVED)].append((key, example))
        self.info.metadata.update(pairs=counts["pair"], dropped_ties=counts["tie"],
                                  dropped_multi_turn=counts["multi_turn"])
        empty = [split for split, rows in by_split.items() if not rows]
        if empty:
            raise DataError(_empty_split_message(empty[0], root))
        return {split: self._generate_examples(rows) for split, rows in by_split.items()}

    def _files(self, root: str) -> list[str]:
        files = arena_files(root)
        if not files:
            raise DataError(f"{root}: no {', '.join(ARENA_PATTERNS)} files; put the Chatbot "
                            "Arena conversations there")
        return files


def source_files(kind: str, manual_dir: str, hh_subset: str = "helpful-base") -> list[str]:
    """The files the `kind` builder reads from `manual_dir`."""
    if kind == "tldr":
        return tldr_files(manual_dir)
    if kind == "hh":
        return hh_files(manual_dir, (hh_subset,))
    if kind == "arena":
        return arena_files(manual_dir)
    raise ValueError(f"real dataset kind {kind!r} is unknown")


@functools.lru_cache(maxsize=4096)  # more than a dataset has files: a scan of them all hits
def _digest(path: str, size: int, mtime_ns: int) -> bytes:
    del size, mtime_ns  # the cache key: a file changed on disk is read again
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.digest()


def source_fingerprint(kind: str, manual_dir: str, hh_subset: str = "helpful-base") -> str:
    """12 hex digits of SHA-256 over the paths under `manual_dir` and the bytes of the files the
    `kind` builder reads (a file not there is left out: the builder names it). With several
    processes, process 0's: the one it builds and the others read."""
    paths = source_files(kind, manual_dir, hh_subset) if manual_dir else []
    sha = hashlib.sha256()
    for path in sorted(paths):
        if os.path.isfile(path):
            stat = os.stat(path)
            sha.update(os.path.relpath(path, manual_dir).encode() + b"\0")
            sha.update(_digest(path, stat.st_size, stat.st_mtime_ns))
    digest = np.frombuffer(sha.digest()[:6], np.uint8)
    if jax.process_count() > 1:
        digest = np.asarray(multihost_utils.broadcast_one_to_all(digest))
    return bytes(digest.astype(np.uint8)).hex()


def tldr_builder(data_dir: str, manual_dir: str) -> TldrComparisons:
    """Build with `builders.prepare(tldr_builder(dir, manual_dir), manual_dir=manual_dir)`."""
    source = source_fingerprint("tldr", manual_dir)
    config = tfds.core.BuilderConfig(name=f"default-{source}", version=TLDR_VERSION)
    return TldrComparisons(data_dir=data_dir, file_format=FILE_FORMAT, config=config)


def hh_builder(data_dir: str, manual_dir: str, subset: str = "helpful-base") -> AnthropicHh:
    """Build with `builders.prepare(hh_builder(dir, manual_dir, subset), manual_dir=...)`."""
    source = source_fingerprint("hh", manual_dir, subset)
    config = ManualConfig(name=f"{subset}-{source}", version=HH_VERSION, subsets=(subset,))
    return AnthropicHh(data_dir=data_dir, file_format=FILE_FORMAT, config=config)


def arena_builder(data_dir: str, manual_dir: str) -> ChatbotArena:
    """Build with `builders.prepare(arena_builder(dir, manual_dir), manual_dir=manual_dir)`."""
    source = source_fingerprint("arena", manual_dir)
    config = tfds.core.BuilderConfig(name=f"default-{source}", version=ARENA_VERSION)
    return ChatbotArena(data_dir=data_dir, file_format=FILE_FORMAT, config=config)
