"""Real data in the published layouts, written to disk: HH's carved validation split, Chatbot
Arena's rules and errors, and a trainer stage running on HH (no `KeyError: 'validation'`)."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from alignment_gap.data import builders, datasets, real_data, tokenizer
from alignment_gap.data.pipelines import as_text
from alignment_gap.errors import ConfigError, DataError
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _column(source, field):
    return [as_text(source[i][field]) for i in range(len(source))]


# --- Anthropic HH-RLHF: <subset>/{train,test}.jsonl.gz ------------------------------------

def _hh_row(i):
    prompt = f"\n\nHuman: How long do I boil egg number {i}?\n\nAssistant:"
    return {"chosen": f"{prompt} About {i % 9 + 4} minutes in boiling water.",
            "rejected": f"{prompt} No idea, sorry."}


def _write_gz_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def write_hh(manual, train=60, test=6, reverse=False):
    rows = [_hh_row(i) for i in range(train)]
    _write_gz_lines(manual / "helpful-base" / "train.jsonl.gz", rows[::-1] if reverse else rows)
    _write_gz_lines(manual / "helpful-base" / "test.jsonl.gz",
                    [_hh_row(1000 + i) for i in range(test)])
    return manual


def test_hh_has_a_validation_split_carved_from_train_disjoint_and_order_free(tmp_path):
    manual = write_hh(tmp_path / "manual")
    builder = real_data.hh_builder(str(tmp_path / "data"), str(manual))
    sources = builders.prepare(builder, manual_dir=str(manual))
    assert set(sources) == {"train", "validation", "test"}
    sizes = {split: len(source) for split, source in sources.items()}
    assert sizes["train"] + sizes["validation"] == 60 and sizes["test"] == 6
    assert 0 < sizes["validation"] < 10  # a small fraction, not empty on 60 prompts
    prompts = {split: set(_column(source, "prompt")) for split, source in sources.items()}
    assert not prompts["train"] & prompts["validation"]
    assert all(real_data.carved_split(p, ("validation",)) == "validation"
               for p in prompts["validation"])
    assert "carved from train" in builder.info.description
    # The same records in the opposite file order carve the same validation prompts.
    reversed_files = str(write_hh(tmp_path / "reversed", reverse=True))
    again = builders.prepare(real_data.hh_builder(str(tmp_path / "data2"), reversed_files),
                             manual_dir=reversed_files)
    assert set(_column(again["validation"], "prompt")) == prompts["validation"]


def test_carved_fractions_are_small_stable_and_exclusive():
    prompts = [f"\n\nHuman: question {i}\n\nAssistant:" for i in range(4000)]
    splits = [real_data.carved_split(p, ("validation", "test")) for p in prompts]
    for name in ("validation", "test"):
        assert 0.035 < splits.count(name) / len(prompts) < 0.065, name
    assert splits == [real_data.carved_split(p, ("validation", "test")) for p in prompts]
    # HH's one carved split is the same prompts as Arena's first.
    assert all((real_data.carved_split(p, ("validation",)) == "validation") == (s == "validation")
               for p, s in zip(prompts, splits, strict=True))


def test_study_report_states_how_the_splits_were_made():
    d = common.data_config()
    assert "carved" not in datasets.describe(d)
    d.kind = "hh"
    assert "HH-RLHF helpful-base" in datasets.describe(d)
    assert "no validation split: it is carved from train" in datasets.describe(d)
    d.kind = "arena"
    assert ("no validation and test splits: they are carved from train, each the records whose "
            "prompt's SHA-256 falls in a fixed 5%") in datasets.describe(d)
    from alignment_gap.study import differences, report
    from configs import study

    s = study.get_config("smoke")
    s.data.kind = "hh"
    text = report.markdown(s, [], differences.compare([]), {}, {})
    assert datasets.describe(s.data) in text and "oracle: none (real data)" in text


def test_a_split_the_files_lack_is_one_line_naming_it(tmp_path):
    manual = tmp_path / "manual" / "comparisons"
    manual.mkdir(parents=True)
    record = {"info": {"id": "t3_1", "post": "p", "title": "t", "subreddit": "s"},
              "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}
    (manual / "batch1.json").write_text("\n".join(
        json.dumps({**record, "split": split}) for split in ("train", "valid1")) + "\n")
    d = common.data_config()
    d.kind, d.dir, d.manual_dir = "tldr", str(tmp_path / "data"), str(tmp_path / "manual")
    with pytest.raises(ConfigError, match="hold no 'test' records"):
        datasets.initial_comparisons(d)


# --- Chatbot Arena conversations ----------------------------------------------------------

def _conversation(question, *replies, follow_up="And why?"):
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": replies[0]}]
    for reply in replies[1:]:
        turns += [{"role": "user", "content": follow_up},
                  {"role": "assistant", "content": reply}]
    return turns


def battle(i, winner="model_a", turns=1, **overrides):
    question = f"Which river runs through city {i}?"
    record = {"question_id": f"q{i}", "model_a": "vicuna-13b", "model_b": "koala-13b",
              "winner": winner, "judge": "arena_user", "turn": turns, "language": "English",
              "conversation_a": _conversation(question, *[f" City {i}. "] * turns),
              "conversation_b": _conversation(question, *[f"I am not sure about {i}."] * turns)}
    record.update(overrides)
    return record


def arena_records():
    """40 single-turn battles won by a or b, 2 ties of each kind, 3 multi-turn battles."""
    # Chosen so that the carved validation and test splits hold 3 and 4 of the 40 pairs.
    rows = [battle(i, "model_a" if i % 2 else "model_b") for i in range(40)]
    rows += [battle(100, "tie"), battle(101, "tie (bothbad)"), battle(102, "tie"),
             battle(103, "tie (bothbad)")]
    return rows + [battle(200 + i, "model_a", turns=2 + i) for i in range(3)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build_arena(tmp_path, manual):
    builder = real_data.arena_builder(str(tmp_path / "data"), str(manual))
    return builder, builders.prepare(builder, manual_dir=str(manual))


def test_arena_keeps_single_turn_winners_and_drops_ties_and_multi_turn(tmp_path):
    _write_jsonl(tmp_path / "manual" / "battles.jsonl", arena_records())
    builder, sources = build_arena(tmp_path, tmp_path / "manual")
    assert set(sources) == {"train", "validation", "test"}
    rows = [source[i] for source in sources.values() for i in range(len(source))]
    assert len(rows) == 40 and all(len(source) for source in sources.values())
    by_prompt = {as_text(r["prompt"]): r for r in rows}
    a_wins = by_prompt["\n\nHuman: Which river runs through city 1?\n\nAssistant:"]
    assert as_text(a_wins["chosen"]) == " City 1."
    assert as_text(a_wins["chosen_model"]) == "vicuna-13b"
    b_wins = by_prompt["\n\nHuman: Which river runs through city 2?\n\nAssistant:"]
    assert as_text(b_wins["chosen"]) == " I am not sure about 2."
    assert as_text(b_wins["rejected"]) == " City 2." and as_text(b_wins["language"]) == "English"
    assert not any(f"city {i}?" in p for p in by_prompt for i in (100, 101, 200, 201))
    expected = {"pairs": 40, "dropped_ties": 4, "dropped_multi_turn": 3}
    assert dict(builder.info.metadata) == expected
    # The counts are stored with the dataset: a fresh builder reads them back.
    reread = real_data.arena_builder(str(tmp_path / "data"), str(tmp_path / "manual"))
    assert dict(reread.info.metadata) == expected
    for split, source in sources.items():
        assert all(real_data.carved_split(p, ("validation", "test")) == split
                   for p in _column(source, "prompt"))


def test_arena_reads_jsonl_gz_and_parquet_to_the_same_pairs(tmp_path):
    records = arena_records()
    _write_jsonl(tmp_path / "plain" / "battles.jsonl", records)
    _write_gz_lines(tmp_path / "gz" / "data" / "battles.jsonl.gz", records)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    (tmp_path / "parquet" / "data").mkdir(parents=True)
    pq.write_table(pyarrow.Table.from_pylist(records),
                   tmp_path / "parquet" / "data" / "train-00000-of-00001.parquet")
    pairs = {}
    for layout in ("plain", "gz", "parquet"):
        _, sources = build_arena(tmp_path / f"built-{layout}", tmp_path / layout)
        pairs[layout] = {split: sorted(zip(_column(s, "prompt"), _column(s, "chosen"),
                                           strict=True))
                         for split, s in sources.items()}
    assert pairs["plain"] == pairs["gz"] == pairs["parquet"]
    assert sum(len(rows) for rows in pairs["plain"].values()) == 40


def test_arena_parquet_without_pyarrow_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError) as err:
        list(real_data.read_arena_file(str(path)))
    assert str(err.value).startswith(str(path)) and "pip install pyarrow" in str(err.value)
    assert "\n" not in str(err.value)


def _bad_role(record):
    record["conversation_b"][1]["role"] = "bot"


def _missing_winner(record):
    del record["winner"]


def _missing_content(record):
    del record["conversation_a"][0]["content"]


def _turn_count(record):
    record["turn"] = 2


def _other_question(record):
    record["conversation_b"][0]["content"] = "Something else?"


@pytest.mark.parametrize("spoil,message", [
    (_missing_winner, "line 2: field 'winner' is missing"),
    (lambda r: r.update(winner="model_c"), "line 2: field 'winner' is 'model_c'; expected"),
    (_bad_role, "line 2: field 'conversation_b[1].role' is 'bot'; expected 'assistant'"),
    (_missing_content, "line 2: conversation_a[0]: field 'content' is missing"),
    (_turn_count, "line 2: field 'conversation_a' holds 2 turns; field 'turn' is 2"),
    (_other_question, "line 2: fields 'conversation_a' and 'conversation_b' open with"),
    (lambda r: r.update(language=None), "line 2: field 'language' is None; expected text"),
])
def test_malformed_arena_record_is_one_line_naming_file_record_and_field(tmp_path, spoil,
                                                                          message):
    bad = battle(1, "tie")  # a tie is still checked before it is dropped
    spoil(bad)
    _write_jsonl(tmp_path / "manual" / "battles7.jsonl", [battle(0), bad, battle(2)])
    with pytest.raises(DataError) as err:
        build_arena(tmp_path, tmp_path / "manual")
    text = str(err.value)
    assert "battles7.jsonl" in text and message in text and "\n" not in text


def test_arena_line_that_is_not_json_is_one_line_naming_file_and_record(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "battles.jsonl").write_text(json.dumps(battle(0)) + "\n{\"model_a\": \n")
    with pytest.raises(DataError, match=r"battles.jsonl: line 2: not valid JSON") as err:
        build_arena(tmp_path, manual)
    assert "\n" not in str(err.value)


def test_arena_without_files_names_the_directory(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "battles.json").write_text("{}\n")  # not a layout Arena reads
    with pytest.raises(DataError, match=r"manual: no \*.jsonl, \*.jsonl.gz, \*.parquet files"):
        build_arena(tmp_path, tmp_path / "manual")


# --- A trainer on HH: the split every stage asks for exists -------------------------------

def _hh_sft(tmp_path, *flags):
    """SFT on HH files in the published layout; the finished process."""
    manual = write_hh(tmp_path / "manual")
    corpus = [r[k] for r in (_hh_row(i) for i in range(60)) for k in ("chosen", "rejected")]
    spm = tmp_path / "tok" / "hh.model"
    tokenizer.Tokenizer.train(corpus * 4, 200, path=str(spm))
    return subprocess.run(
        [sys.executable, "-m", "alignment_gap.main", "--config",
         os.path.join(ROOT, "configs", "sft.py:tiny"), "--workdir", str(tmp_path / "sft"),
         "--config.data.kind=hh", f"--config.data.manual_dir={manual}",
         f"--config.data.dir={tmp_path / 'data'}", f"--config.data.tokenizer={spm}",
         "--config.num_steps=2", "--config.batch_size=4", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.eval_batches=1", "--config.warmup_steps=1", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sft_on_hh_in_the_published_layout_runs_and_evaluates(tmp_path):
    done = _hh_sft(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    workdir = tmp_path / "sft"
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in r for r in rows)


def test_a_split_smaller_than_a_batch_stops_before_the_first_step(tmp_path):
    """The carved HH validation split (~5% of 60 records, two examples each) is smaller than a
    batch of 16: one line naming the field that applies to real data, and no step is taken."""
    done = _hh_sft(tmp_path, "--config.batch_size=16")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-4000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: config.batch_size: the SFT validation split holds ")
    assert "data.manual_dir" not in message and str(tmp_path / "manual") in message
    assert not (tmp_path / "sft" / "metrics.jsonl").exists()
    assert not (tmp_path / "sft" / "checkpoints").exists()


def test_a_damaged_arena_parquet_file_is_one_line_naming_it(tmp_path):
    pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 not a parquet file")
    with pytest.raises(DataError) as err:
        list(real_data.read_arena_file(str(path)))
    message = str(err.value)
    assert message.startswith(f"{path}: not a readable parquet file (") and "\n" not in message
