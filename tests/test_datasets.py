"""TFDS builders on real files: the synthetic world, TL;DR and HH fixtures in their formats."""

import gzip
import json

import numpy as np
import pytest

from alignment_gap.data import builders, real_data, relabel, tokenizer
from alignment_gap.data import world as W

WORLD = W.WorldConfig(seed=1)


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


def test_synthetic_world_builds_every_kind_with_disjoint_splits(tmp_path):
    sizes = dict(train=60, validation=10, test=10)
    comparisons = builders.prepare(builders.synthetic_builder("comparisons", str(tmp_path),
                                                              WORLD, **sizes))
    assert {k: len(v) for k, v in comparisons.items()} == sizes
    ids = {split: {_text(comparisons[split][i]["id"]) for i in range(n)}
           for split, n in sizes.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    record = comparisons["train"][0]
    index = int(_text(record["id"])[len("post"):])
    expected = W.make_comparison(WORLD, index)
    assert _text(record["chosen"]) == expected.chosen and _text(record["prompt"]).endswith(W.TLDR)
    sft = builders.prepare(builders.synthetic_builder("sft", str(tmp_path), WORLD, **sizes))
    prompts = builders.prepare(builders.synthetic_builder("prompts", str(tmp_path), WORLD,
                                                          **sizes))
    assert _text(sft["train"][0]["response"]) and len(prompts["test"]) == 10
    # The same prompt set: every D_initial train prompt is an online-training prompt.
    train_prompts = {_text(prompts["train"][i]["prompt"]) for i in range(60)}
    assert all(_text(comparisons["train"][i]["prompt"]) in train_prompts for i in range(60))


def test_a_dataset_another_job_finished_first_is_read_not_an_error(tmp_path):
    """Two sweep shards build the same prompts at once: the one that finishes second finds the
    first one's copy where it renames its own (FileExistsError before) and reads it."""
    sizes = dict(train=12, validation=4, test=4)
    slower = builders.synthetic_builder("prompts", str(tmp_path), WORLD, **sizes)
    faster = builders.synthetic_builder("prompts", str(tmp_path), WORLD, **sizes)
    build = slower._download_and_prepare

    def overtaken(*args, **kwargs):  # the other job finishes while this one generates
        builders.prepare(faster)
        return build(*args, **kwargs)

    slower._download_and_prepare = overtaken
    prompts = builders.prepare(slower)
    assert {split: len(source) for split, source in prompts.items()} == sizes
    assert [p.name for p in (tmp_path / "synthetic_world").rglob("incomplete*")] == []


def _tldr_line(i, split="train", choice=0, **overrides):
    record = {"info": {"id": f"t3_{i}", "post": f"my cat knocked over plant number {i}",
                       "title": "cat trouble", "subreddit": "pets"},
              "summaries": [{"text": f" cat broke plant {i}", "policy": "sup"},
                            {"text": " plant", "policy": "ref"}],
              "choice": choice, "split": split, "worker": "w1", "batch": "batch1"}
    record.update(overrides)
    return json.dumps(record)


def test_tldr_comparisons_from_the_published_layout(tmp_path):
    manual = tmp_path / "manual" / "comparisons"
    manual.mkdir(parents=True)
    (manual / "batch1.json").write_text("\n".join(
        [_tldr_line(0), _tldr_line(1, choice=1), _tldr_line(2, "valid1"),
         _tldr_line(3, "valid2")]) + "\n")
    sources = builders.prepare(real_data.tldr_builder(str(tmp_path / "data"),
                                                      str(tmp_path / "manual")),
                               manual_dir=str(tmp_path / "manual"))
    assert {k: len(v) for k, v in sources.items()} == {"train": 2, "validation": 1, "test": 1}
    rows = {_text(sources["train"][i]["post_id"]): sources["train"][i] for i in range(2)}
    assert _text(rows["t3_0"]["chosen"]) == " cat broke plant 0"  # the space after TL;DR:
    assert _text(rows["t3_1"]["chosen"]) == " plant"  # choice=1 picks the second summary
    assert _text(rows["t3_0"]["prompt"]) == ("SUBREDDIT: r/pets\nTITLE: cat trouble\n"
                                             "POST: my cat knocked over plant number 0\nTL;DR:")


def test_real_prompts_hold_each_post_once_in_the_order_it_first_appears(tmp_path):
    """TL;DR compares several summaries of one post: the prompts a policy samples on and the
    evaluations read hold each post once, so the test stage's window shares no post with the
    evaluation prompts before it."""
    import ml_collections

    from alignment_gap.data import datasets

    manual = tmp_path / "manual" / "comparisons"
    manual.mkdir(parents=True)
    lines = [_tldr_line(post, split) for post, split in ((0, "train"), (1, "valid1"))]
    for post in (5, 6, 5, 7, 6, 5):
        record = json.loads(_tldr_line(post, "valid2"))
        record["summaries"][1]["text"] = f" another summary {len(lines)}"
        lines.append(json.dumps(record))
    (manual / "batch1.json").write_text("\n".join(lines) + "\n")
    d = ml_collections.ConfigDict({"kind": "tldr", "dir": str(tmp_path / "data"),
                                   "manual_dir": str(tmp_path / "manual")})
    comparisons = datasets.initial_comparisons(d)["test"]
    assert len(comparisons) == 6
    test = datasets.prompts(d)["test"]
    prompts = [_text(test[i]["prompt"]) for i in range(len(test))]
    first_seen = list(dict.fromkeys(_text(comparisons[i]["prompt"]) for i in range(6)))
    assert prompts == first_seen and len(prompts) == 3
    assert len(datasets.prompts(d)["train"]) == 1  # built once, read again


def test_prompt_sets_follow_comparisons_rebuilt_from_other_files(tmp_path):
    """Comparisons deleted and rebuilt (as a damaged shard's message asks) from files that
    moved a post to the test split: the prompt sets are made again, so the online policy does
    not train on a test post (they were kept by name, made of the old files)."""
    import shutil

    import ml_collections

    from alignment_gap.data import datasets

    manual = tmp_path / "manual" / "comparisons"
    manual.mkdir(parents=True)
    d = ml_collections.ConfigDict({"kind": "tldr", "dir": str(tmp_path / "data"),
                                   "manual_dir": str(tmp_path / "manual")})
    posts = lambda split: sorted(_text(s[i]["prompt"]).split("POST: ")[1].split("\n")[0]
                                 for s in [datasets.prompts(d)[split]] for i in range(len(s)))
    for layout in (((0, "train"), (1, "train"), (2, "valid1"), (3, "valid2")),
                   ((0, "train"), (2, "valid1"), (1, "valid2"), (3, "valid2"))):
        if (tmp_path / "data").exists():
            shutil.rmtree(next((tmp_path / "data").glob("tldr_comparisons*")))
        (manual / "batch1.json").write_text(
            "\n".join(_tldr_line(post, split) for post, split in layout) + "\n")
        train, test = posts("train"), posts("test")
    assert [p[-1] for p in train] == ["0"] and [p[-1] for p in test] == ["1", "3"]


def test_other_or_changed_manual_files_build_another_dataset(tmp_path):
    """The built dataset is named by the files it came from: a sample first, then the full
    files at another path, then one label flipped in place (same size) each build anew; the
    first files again find their dataset built."""
    def tldr(root, lines):
        (root / "comparisons").mkdir(parents=True, exist_ok=True)
        (root / "comparisons" / "batch1.json").write_text("\n".join(lines) + "\n")
        return str(root)

    def chosen(manual):
        train = builders.prepare(real_data.tldr_builder(str(tmp_path / "data"), manual),
                                 manual_dir=manual)["train"]
        return sorted(_text(train[i]["chosen"]) for i in range(len(train)))

    rest = [_tldr_line(8, "valid1"), _tldr_line(9, "valid2")]
    sample = tldr(tmp_path / "sample", [_tldr_line(0), *rest])
    full = tldr(tmp_path / "full", [_tldr_line(0), _tldr_line(1), _tldr_line(2), *rest])
    assert chosen(sample) == [" cat broke plant 0"]
    assert len(chosen(full)) == 3
    tldr(tmp_path / "full", [_tldr_line(0, choice=1), _tldr_line(1), _tldr_line(2), *rest])
    assert chosen(full) == [" cat broke plant 1", " cat broke plant 2", " plant"]
    assert len(list((tmp_path / "data").glob("tldr_comparisons/*/*/dataset_info.json"))) == 3
    assert chosen(sample) == [" cat broke plant 0"]


def test_cnn_dm_comparisons_are_dropped_and_counted(tmp_path):
    """The published comparisons/ folder holds CNN/Daily Mail batches too: news articles, no
    Reddit post. They are not TL;DR posts to select or score checkpoints on."""
    news = json.loads(_tldr_line(5, "valid2"))
    news["info"] = {"id": "cnn-1", "article": "(CNN) The president said...", "site": "cnn"}
    news["batch"] = "cnndm0"
    manual = tmp_path / "manual" / "comparisons"
    manual.mkdir(parents=True)
    (manual / "cnndm0.json").write_text(json.dumps(news) + "\n")
    (manual / "batch1.json").write_text("\n".join(
        [_tldr_line(0), _tldr_line(2, "valid1"), _tldr_line(3, "valid2")]) + "\n")
    builder = real_data.tldr_builder(str(tmp_path / "data"), str(tmp_path / "manual"))
    sources = builders.prepare(builder, manual_dir=str(tmp_path / "manual"))
    test = sources["test"]
    assert [_text(test[i]["post_id"]) for i in range(len(test))] == ["t3_3"]
    built = real_data.tldr_builder(str(tmp_path / "data"), str(tmp_path / "manual"))
    assert built.info.metadata["dropped_news"] == 1


@pytest.mark.parametrize("bad,message", [
    ({"choice": None}, "line 2: field 'choice' is None; expected 0 or 1"),
    ({"summaries": [{"text": "x"}]}, "line 2: field 'summaries' must hold exactly 2"),
    ({"info": {"id": "t3_9", "title": "t"}}, "line 2: field 'info.post' is missing"),
    ({"split": "valid3"}, "line 2: field 'split' is 'valid3'"),
    ({"split": ["train"]}, "line 2: field 'split' is ['train']"),
    ({"info": ["a post"]}, "line 2: field 'info' is ['a post']; expected an object"),
])
def test_malformed_tldr_record_names_file_record_and_field(tmp_path, bad, message):
    manual = tmp_path / "manual" / "comparisons"
    manual.mkdir(parents=True)
    lines = [_tldr_line(0), _tldr_line(1, **bad)]
    (manual / "batch7.json").write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception) as err:
        builders.prepare(real_data.tldr_builder(str(tmp_path / "data"), str(tmp_path / "manual")),
                         manual_dir=str(tmp_path / "manual"))
    assert "batch7.json" in str(err.value) and message in str(err.value)


def _write_hh(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_anthropic_hh_extracts_the_shared_prompt(tmp_path):
    manual = tmp_path / "manual"
    turn = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: Then?"
    _write_hh(manual / "helpful-base" / "train.jsonl.gz", [
        {"chosen": turn + "\n\nAssistant: Boil for 8 minutes.",
         "rejected": turn + "\n\nAssistant: No idea."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
         "rejected": "\n\nHuman: Hi\n\nAssistant: What."},
        # Differing before the final turn: the responses would hold human turns. Dropped.
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye!",
         "rejected": "\n\nHuman: Hi\n\nAssistant: What.\n\nHuman: Rude\n\nAssistant: No."},
        {"chosen": "\n\nHuman: Yo\n\nAssistant: Hey.",
         "rejected": "\n\nHuman: Yo\n\nAssistant: Hey.\n\nHuman: And?\n\nAssistant: Bye."}] + [
        # Enough prompts that the validation split carved from train is not empty.
        {"chosen": f"\n\nHuman: Count to {i}\n\nAssistant: 1..{i}",
         "rejected": f"\n\nHuman: Count to {i}\n\nAssistant: No."} for i in range(40)])
    _write_hh(manual / "helpful-base" / "test.jsonl.gz", [
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
         "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}])
    sources = builders.prepare(real_data.hh_builder(str(tmp_path / "data"), str(manual)),
                               manual_dir=str(manual))
    assert len(sources["train"]) + len(sources["validation"]) == 42 and len(sources["test"]) == 1
    rows = [s[i] for s in (sources["train"], sources["validation"]) for i in range(len(s))]
    egg = next(r for r in rows if b"egg" in r["prompt"])
    assert _text(egg["prompt"]) == turn + "\n\nAssistant:"
    assert _text(egg["chosen"]) == " Boil for 8 minutes." and _text(egg["rejected"]) == " No idea."
    assert not any(b"Human:" in r[k] for r in rows for k in ("chosen", "rejected"))
    built = real_data.hh_builder(str(tmp_path / "data"), str(manual))  # reads what was written
    assert built.info.metadata["dropped_diverged"] == 2


def test_malformed_hh_record_names_file_record_and_field(tmp_path):
    manual = tmp_path / "manual"
    _write_hh(manual / "helpful-base" / "train.jsonl.gz", [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b"}])
    _write_hh(manual / "helpful-base" / "test.jsonl.gz", [])
    with pytest.raises(Exception, match=r"train.jsonl.gz: line 2: field 'rejected' is missing"):
        builders.prepare(real_data.hh_builder(str(tmp_path / "data"), str(manual)),
                         manual_dir=str(manual))


def test_tokenizer_trains_caches_round_trips_and_checks_fingerprints(tmp_path):
    tok = tokenizer.synthetic_tokenizer(str(tmp_path), WORLD, vocab_size=256, corpus_posts=300)
    again = tokenizer.synthetic_tokenizer(str(tmp_path), WORLD, vocab_size=256)
    assert again.fingerprint == tok.fingerprint and (tok.pad_id, tok.eos_id) == (0, 1)
    prompt = W.prompt_text(W.make_post(WORLD, 3))
    ids = tok.encode(prompt)
    assert tok.decode(ids + [tok.eos_id, 5, 6]) == prompt
    assert len(ids) < 2 * len(prompt.split())  # whole words, mostly one piece each
    other = tokenizer.Tokenizer.train(["completely different text"] * 50, 40)
    with pytest.raises(ValueError, match="was built with tokenizer .* point the config"):
        tokenizer.check_fingerprint(other, tok.fingerprint, "checkpoint /x/ckpt")
    with pytest.raises(ValueError, match="config.model.vocab_size: 8 is smaller"):
        tokenizer.check_fits_model(tok, 8)


def test_relabel_with_the_oracle_writes_a_new_dataset(tmp_path):
    noisy = W.WorldConfig(seed=1, label_temperature=2.0)  # many labels against the oracle
    source = builders.prepare(builders.synthetic_builder(
        "comparisons", str(tmp_path), noisy, train=80, validation=0, test=0))["train"]
    judge = relabel.oracle_judge(noisy)
    before = judge([relabel.decoded(source[i]) for i in range(80)])
    assert not before.all()
    golden = relabel.relabel({"train": source}, judge, "d_golden-test", str(tmp_path))["train"]
    records = [relabel.decoded(golden[i]) for i in range(len(golden))]
    assert len(records) == 80  # nothing dropped
    assert judge(records).all()
    pairs = {r["id"]: {r["chosen"], r["rejected"]} for r in records}
    for i in range(80):  # the same pairs, some swapped
        r = relabel.decoded(source[i])
        assert pairs[r["id"]] == {r["chosen"], r["rejected"]}
    assert np.sum(~before) > 0
