"""Bad input, tried systematically: each row is a damaged file or a malformed record of the real
datasets and the one line it must stop with (file, record, field and the fix), or input that
looks odd but is valid and must build (an empty summary, a very long post); a dataset shard
or a recorded stream chunk cut short names itself and what to delete.

After every error nothing half-built is left where a later run would read it: the data
directory holds no finished dataset, and the same directory builds once the file is repaired.

Covered by other tables, not repeated here: config fields (test_configs), Chatbot Arena battles
(test_real_data), pretrained checkpoints of the wrong shape or architecture (test_pretrained),
tokenizers that do not fit the model (test_tokenizers), frozen and resumed checkpoints of
another model and a loss that turns NaN (test_trainers).
"""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module

from alignment_gap.batches import PreferenceBatch
from alignment_gap.data import builders, datasets, real_data, tokenizer
from alignment_gap.data.pipelines import BatchShape, as_text, encode_prompt, encode_response
from alignment_gap.errors import ConfigError, DataError
from alignment_gap.sources import StreamRecorder, replay_iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TLDR_SPLITS = ["train"] * 8 + ["valid1"] * 4 + ["valid2"] * 4


def tldr_record(i, split="train"):
    return {"info": {"id": f"t3_{i}", "post": f"My sourdough number {i} stays flat all day.",
                     "title": f"Bread {i}", "subreddit": "Baking"},
            "summaries": [{"text": f" Flat bread {i}."}, {"text": f" Bread {i} is flat, why?"}],
            "choice": i % 2, "split": split}


def hh_record(i):
    prompt = f"\n\nHuman: How long do I boil egg number {i}?\n\nAssistant:"
    return {"chosen": f"{prompt} About {i % 9 + 4} minutes.", "rejected": f"{prompt} No idea."}


def lines(records):
    return [json.dumps(r).encode() for r in records]


def _set(path, value):
    """A spoiler: record 3's field at dotted `path` (list indices as numbers) set to `value`."""
    def spoil(rows):
        record = json.loads(rows[3])
        *parents, leaf = path.split(".")
        node = record
        for key in parents:
            node = node[int(key) if key.isdigit() else key]
        node[int(leaf) if leaf.isdigit() else leaf] = value
        rows[3] = json.dumps(record).encode()
    return spoil


def _raw(line: bytes):
    def spoil(rows):
        rows[3] = line
    return spoil


def _cut_last_line(rows):
    rows[-1] = rows[-1][:25]


def _latin1(rows):
    record = tldr_record(3)
    record["info"]["post"] = "Mon pain ne lève pas."
    rows[3] = json.dumps(record, ensure_ascii=False).encode("latin-1")


def _utf16(rows):
    rows[:] = [b"\n".join(rows).decode().encode("utf-16")]


def write_tldr(manual, rows):
    path = manual / "comparisons" / "batch1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(rows) + b"\n")


def write_hh(manual, rows, compress=gzip.compress):
    for split, part in (("train", rows), ("test", lines(hh_record(1000 + i) for i in range(4)))):
        path = manual / "helpful-base" / f"{split}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(compress(b"\n".join(part) + b"\n"))


KINDS = {  # kind -> (builder, the records of valid files, their writer)
    "tldr": (real_data.tldr_builder, lambda: lines(tldr_record(i, s)
                                                   for i, s in enumerate(TLDR_SPLITS)), write_tldr),
    "hh": (real_data.hh_builder, lambda: lines(hh_record(i) for i in range(60)), write_hh),
}

MALFORMED = [  # (what, kind, spoil the rows, write the files, the line expected)
    ("line cut short", "tldr", _cut_last_line, None, r"batch1.json: line 16: not valid JSON"),
    ("a record that is a JSON list", "tldr", _raw(b'[{"info": {}}]'), None,
     r"batch1.json: line 4: a JSON list, not an object; the file must hold one JSON object "
     r"per line \(JSON lines\)"),
    ("latin-1 bytes in a UTF-8 file", "tldr", _latin1, None,
     r"batch1.json: line 4: not UTF-8 \(byte 0xe8 at column \d+\); re-encode the file"),
    ("a UTF-16 file", "tldr", _utf16, None, r"batch1.json: line 1: not UTF-8 \(byte 0xff at "
     r"column 0\)"),
    ("half of an emoji (a lone surrogate escape)", "tldr", _set("summaries.0.text", "ok \ud83d"),
     None, r"line 4: summaries\[0\]: field 'text' holds '\\ud83d' at character 3, half of a "
     r"UTF-16 pair"),
    ("choice as text", "tldr", _set("choice", "1"), None,
     r"line 4: field 'choice' is '1'; expected 0 or 1"),
    ("choice as a boolean", "tldr", _set("choice", True), None, r"field 'choice' is True"),
    ("summary as a number", "tldr", _set("summaries.1.text", 5), None,
     r"line 4: summaries\[1\]: field 'text' is 5; expected text"),
    ("post as a list", "tldr", _set("info.post", ["a"]), None,
     r"line 4: field 'info.post' is \['a'\]; expected text"),
    ("summary as a whole document", "tldr", _set("summaries.1.text", {"body": "x" * 50_000}),
     None, r"summaries\[1\]: field 'text' is \{'body': 'xxx+\.\.\.; expected text"),
    ("one summary", "tldr", _set("summaries", [{"text": "a"}]), None,
     r"line 4: field 'summaries' must hold exactly 2 summaries"),
    ("unknown split", "tldr", _set("split", "valid3"), None, r"field 'split' is 'valid3'"),
    ("missing post id", "tldr", _set("info.id", None), None,
     r"line 4: field 'info.id' is None; expected text or a number"),
    ("an empty line of JSON", "tldr", _raw(b"{}"), None, r"line 4: field 'info' is missing"),
    ("gzip cut short", "hh", None, lambda b: gzip.compress(b)[:-40],
     r"helpful-base/train.jsonl.gz: the file is damaged after \d+ records \(.*\); copy it "
     "again"),
    ("not gzip", "hh", None, lambda b: b, r"train.jsonl.gz: the file is damaged after 0 records "
     r"\(Not a gzipped file"),
    ("dialogue as a list", "hh", _set("chosen", ["Human: hi"]), None,
     r"train.jsonl.gz: line 4: field 'chosen' is \['Human: hi'\]; expected text"),
    ("empty dialogue", "hh", _set("chosen", ""), None,
     r"line 4: field 'chosen' has no 'Assistant:' turn"),
    ("dialogues about different questions", "hh", _set("rejected", "\n\nHuman: other?\n\n"
                                                       "Assistant: no."), None,
     r"line 4: fields 'chosen' and 'rejected' share no prompt ending in an 'Assistant:' turn"),
]


def _build(kind, data, manual):
    make_builder = KINDS[kind][0]
    return builders.prepare(make_builder(str(data), str(manual)), manual_dir=str(manual))


def _finished_datasets(data):
    return [p for p in data.rglob("dataset_info.json") if "incomplete" not in str(p)]


@pytest.mark.parametrize("what,kind,spoil,compress,expected", MALFORMED,
                         ids=[row[0] for row in MALFORMED])
def test_malformed_file_or_record_is_one_line_and_leaves_no_dataset(tmp_path, what, kind,
                                                                    spoil, compress, expected):
    _, records, write = KINDS[kind]
    rows = records()
    if spoil is not None:
        spoil(rows)
    manual, data = tmp_path / "manual", tmp_path / "data"
    write(manual, rows, **({"compress": compress} if compress else {}))
    with pytest.raises(DataError) as error:
        _build(kind, data, manual)
    message = str(error.value)
    assert "\n" not in message and len(message) < 400  # one line, a field's value cut short
    assert str(manual) in message, message  # names the file
    assert re.search(expected, message), message
    assert not _finished_datasets(data)  # nothing a later run would read as built
    write(manual, records())  # repaired: the same directories build
    assert {"train", "validation", "test"} <= set(_build(kind, data, manual))


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    corpus = [t for r in (tldr_record(i) for i in range(40))
              for t in (r["info"]["post"], r["summaries"][0]["text"], r["summaries"][1]["text"])]
    path = tmp_path_factory.mktemp("tok") / "tldr.model"
    corpus += ["SUBREDDIT: r/Baking TITLE: POST: TL;DR:"] * 20
    return tokenizer.Tokenizer.train(corpus * 3, 120, path=str(path))


def test_an_empty_summary_is_a_response_of_end_of_sequence_only(tmp_path, spm):
    rows = lines(tldr_record(i, s) for i, s in enumerate(TLDR_SPLITS))
    _set("summaries.0.text", "   ")(rows)  # chosen for record 3 (choice 1 picks summary 1)
    _set("choice", 0)(rows)
    write_tldr(tmp_path / "manual", rows)
    train = _build("tldr", tmp_path / "data", tmp_path / "manual")["train"]
    record = next(train[i] for i in range(len(train)) if as_text(train[i]["post_id"]) == "t3_3")
    assert as_text(record["chosen"]) == ""
    ids, mask = encode_response(spm, as_text(record["chosen"]), 8)
    assert mask.sum() == 1 and ids[0] == spm.eos_id


def test_a_very_long_post_builds_and_its_prompt_keeps_the_tldr_end(tmp_path, spm):
    rows = lines(tldr_record(i, s) for i, s in enumerate(TLDR_SPLITS))
    _set("info.post", "flat bread " * 50_000)(rows)  # 550,000 characters
    write_tldr(tmp_path / "manual", rows)
    train = _build("tldr", tmp_path / "data", tmp_path / "manual")["train"]
    prompt = next(as_text(train[i]["prompt"]) for i in range(len(train))
                  if as_text(train[i]["post_id"]) == "t3_3")
    assert len(prompt) > 550_000
    ids, mask = encode_prompt(spm, prompt, 48)
    assert mask.all() and spm.decode(ids).endswith("TL;DR:")


def test_a_bad_record_stops_the_trainer_with_one_line_before_anything_is_written(tmp_path, spm):
    rows = lines(tldr_record(i, s) for i, s in enumerate(TLDR_SPLITS))
    _latin1(rows)
    write_tldr(tmp_path / "manual", rows)
    done = subprocess.run(
        [sys.executable, "-m", "alignment_gap.main", "--config",
         os.path.join(ROOT, "configs", "sft.py:tiny"), "--workdir", str(tmp_path / "sft"),
         "--config.data.kind=tldr", f"--config.data.manual_dir={tmp_path / 'manual'}",
         f"--config.data.dir={tmp_path / 'data'}", f"--config.data.tokenizer={spm.path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "batch1.json: line 4: not UTF-8" in last, last
    assert not (tmp_path / "sft" / "checkpoints").exists()
    assert not _finished_datasets(tmp_path / "data")


def _cut_in_half(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_dataset_shard_is_one_line_naming_it_and_the_rebuild(tmp_path):
    write_tldr(tmp_path / "manual", KINDS["tldr"][1]())
    data = tmp_path / "data"
    _build("tldr", data, tmp_path / "manual")
    (shard,) = data.rglob("*-train.array_record*")
    _cut_in_half(shard)
    with pytest.raises(DataError) as error:
        _build("tldr", data, tmp_path / "manual")
    message = str(error.value)
    assert message.startswith(f"{shard}: the file is damaged (") and "\n" not in message
    assert message.endswith(f"delete {shard.parent} and run the same command: it is built again")
    shutil.rmtree(shard.parent)  # the fix it names
    assert len(_build("tldr", data, tmp_path / "manual")["train"]) == 8


@pytest.mark.parametrize("lost", ["shard", "dataset_info.json"])
def test_a_built_dataset_missing_a_file_is_one_line_naming_it_and_the_rebuild(tmp_path, lost):
    write_tldr(tmp_path / "manual", KINDS["tldr"][1]())
    data = tmp_path / "data"
    _build("tldr", data, tmp_path / "manual")
    (shard,) = data.rglob("*-train.array_record*")
    gone = shard if lost == "shard" else shard.parent / "dataset_info.json"
    gone.unlink()
    with pytest.raises(DataError) as error:
        _build("tldr", data, tmp_path / "manual")
    message = str(error.value)
    assert message == (f"{shard.parent}: the built dataset is incomplete ({gone} is missing); "
                       f"delete {shard.parent} and run the same command: it is built again")
    shutil.rmtree(shard.parent)  # the fix it names
    assert len(_build("tldr", data, tmp_path / "manual")["train"]) == 8


def test_a_damaged_stream_chunk_is_one_line_naming_the_run_to_redo(tmp_path):
    stream = tmp_path / "online-s0-abc" / "stream"
    stream.mkdir(parents=True)
    for first in (1, 3):
        chunk = stream / f"steps-{first:08d}-{first + 1:08d}.array_record"
        writer = array_record_module.ArrayRecordWriter(str(chunk), "group_size:1")
        for i in range(400):
            writer.write(f"record {first} {i} ".encode() * 20)
        writer.close()
    _cut_in_half(chunk)
    with pytest.raises(DataError) as error:
        replay_iterator(str(stream), BatchShape(4, 8, 8))
    message = str(error.value)
    assert message.startswith(f"{chunk}: the file is damaged (") and "\n" not in message
    assert f"delete {stream.parent} (the online run that recorded it)" in message


def test_a_replay_past_the_end_of_its_stream_is_one_line_not_the_stream_again(tmp_path):
    """An online run that stopped early (KL cap, stop rule) recorded fewer steps than a replay
    may ask for: in tandem or window order the stream had started over at its first step."""
    recorder = StreamRecorder(str(tmp_path))
    recorder.resume_from(0)
    for step in (1, 2):
        z, m = np.full((2, 3), step, np.int32), np.ones((2, 3), bool)
        recorder.record(step, PreferenceBatch(z, m, z, m, z, m))
    recorder.seal(2)
    shape = BatchShape(2, 3, 3)
    for order in ("tandem", "window"):
        with pytest.raises(ConfigError) as error:
            replay_iterator(str(tmp_path), shape, order, window=2, num_steps=3)
        assert str(error.value).startswith("config.num_steps: 3 steps replay past the end")
        assert "which holds 2" in str(error.value) and "\n" not in str(error.value)
    tandem = replay_iterator(str(tmp_path), shape, "tandem", num_steps=2)
    assert [int(next(tandem).chosen[0, 0]) for _ in range(2)] == [1, 2]
    shuffled = replay_iterator(str(tmp_path), shape, "shuffle", num_steps=4)
    drawn = np.concatenate([next(shuffled).chosen[:, 0] for _ in range(4)])
    assert sorted(drawn) == [1] * 4 + [2] * 4  # two passes


def test_a_damaged_shard_of_a_written_dataset_is_one_line_not_records_of_none(tmp_path):
    """A dataset a stage wrote (D_golden, read through `data.comparisons`) is checked as a
    built one is: cut short, its records read as None and trained as the text "None"."""
    records = [{"id": f"r{i}", "prompt": f"p{i}", "chosen": "c" * 50, "rejected": "r" * 50}
               for i in range(64)]
    builders.prepare(builders.Comparisons(name="golden-x", data_dir=str(tmp_path),
                                          splits={"train": records,
                                                  "validation": records[:8]}))
    (shard,) = tmp_path.rglob("*-train.array_record*")
    _cut_in_half(shard)
    d = ml_collections.ConfigDict({"kind": "synthetic", "dir": str(tmp_path),
                                   "comparisons": "golden-x"})
    with pytest.raises(DataError) as error:
        datasets.comparisons(d)
    message = str(error.value)
    assert message.startswith(f"{shard}: the file is damaged (") and "\n" not in message
    assert "stages/relabel-*" in message
    with pytest.raises(DataError, match="read as None: its dataset file is damaged"):
        as_text(None)
