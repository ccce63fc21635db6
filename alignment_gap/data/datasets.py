"""From a `config.data` section to the tokenizer and random-access sources every trainer reads.

`data.kind` picks the world: `synthetic` (built on first use and cached under `data.dir`),
`tldr`, `hh` or `arena` (built from `data.manual_dir`). `data.comparisons` optionally names a
relabelled comparisons dataset in `data.dir` (e.g. the study's `D_golden`) to use instead of
`D_initial`.

Every kind has train, validation and test splits: where the published data lacks one (HH has
no validation, Arena only train), its builder carves it from train (`real_data.carving_note`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from alignment_gap.data import builders, real_data
from alignment_gap.data import world as world_lib
from alignment_gap.data.array_records import check_readable
from alignment_gap.data.pretrained_tokenizers import load_tokenizer
from alignment_gap.data.tokenizer import synthetic_tokenizer
from alignment_gap.errors import ConfigError

KINDS = ("synthetic", "tldr", "hh", "arena")
SPLITS = ("train", "validation", "test")  # What the trainers and the study ask for.


def world_config(d) -> world_lib.WorldConfig:
    return world_lib.WorldConfig(seed=d.world_seed, label_temperature=d.label_temperature)


def _sizes(d) -> dict:
    return {"train": d.train_pairs, "validation": d.validation_pairs, "test": d.test_pairs}


def tokenizer(d, default: str = ""):
    """The configured tokenizer (`data.tokenizer`, else `default`: a pretrained checkpoint's);
    any kind `load_tokenizer` reads."""
    if d.kind not in KINDS:
        raise ConfigError(f"config.data.kind: {d.kind!r} is unknown; use one of {KINDS}")
    if d.tokenizer or default:
        return load_tokenizer(d.tokenizer or default)
    if d.kind != "synthetic":
        raise ConfigError(f"config.data.tokenizer: empty, but data.kind={d.kind!r} needs one; "
                          "set a sentencepiece .model, a tokenizer.json, a Hugging Face "
                          "directory or a .gguf file (or init.checkpoint)")
    return synthetic_tokenizer(d.dir, world_config(d), d.vocab_size)


def initial_comparisons(d) -> dict:
    """`D_initial`: the world's (or the real dataset's) labelled pairs, split -> source."""
    if d.kind == "synthetic":
        return builders.prepare(builders.synthetic_builder("comparisons", d.dir, world_config(d),
                                                           **_sizes(d)))
    if not d.manual_dir or not os.path.isdir(d.manual_dir) or not os.listdir(d.manual_dir):
        raise ConfigError(f"config.data.manual_dir: {d.manual_dir!r} is not a directory holding "
                          f"files; put the {d.kind} files there and set the path")
    builder = _real_builder(d)
    return _with_every_split(builders.prepare(builder, manual_dir=d.manual_dir), d)


def source_fingerprint(d) -> str:
    """Of the files a real dataset is built from (`real_data.source_fingerprint`): a study puts it
    in its stages' configs, so their keys follow the files' contents, not their path alone."""
    return real_data.source_fingerprint(d.kind, d.manual_dir, d.hh_subset)


def _real_builder(d):
    if d.kind == "tldr":
        return real_data.tldr_builder(d.dir, d.manual_dir)
    if d.kind == "hh":
        return real_data.hh_builder(d.dir, d.manual_dir, d.hh_subset)
    if d.kind == "arena":
        return real_data.arena_builder(d.dir, d.manual_dir)
    raise ConfigError(f"config.data.kind: {d.kind!r} is unknown; use one of {KINDS}")


def _with_every_split(sources: dict, d) -> dict:
    """`sources`, or one line naming the split the files lack (e.g. TL;DR without valid2)."""
    missing = [split for split in SPLITS if split not in sources]
    if missing:
        raise ConfigError(f"config.data.manual_dir: the {d.kind} files in {d.manual_dir} hold "
                          f"no {missing[0]!r} records; every stage needs {list(SPLITS)}")
    return sources


def describe(d) -> str:
    """One sentence on the data a study ran on, for its report (builds nothing)."""
    if d.kind == "synthetic":
        return (f"data: the synthetic world (seed {d.world_seed}, label temperature "
                f"{d.label_temperature:g}); D_initial {d.train_pairs} train pairs, validation "
                f"{d.validation_pairs}, test {d.test_pairs}")
    if d.kind == "tldr":
        return ("data: OpenAI TL;DR comparisons from data.manual_dir, the published splits "
                "(train, valid1 as validation, valid2 as test), the CNN/Daily Mail batches "
                "dropped")
    if d.kind == "hh":
        return (f"data: Anthropic HH-RLHF {d.hh_subset}, train and test as published (pairs "
                "differing before the final assistant turn dropped). "
                f"{real_data.carving_note(real_data.AnthropicHh.CARVED)}")
    if d.kind == "arena":
        return ("data: Chatbot Arena conversations, single-turn battles with a winner (ties and "
                "multi-turn battles dropped). "
                f"{real_data.carving_note(real_data.ChatbotArena.CARVED)}")
    raise ConfigError(f"config.data.kind: {d.kind!r} is unknown; use one of {KINDS}")


def comparisons(d) -> dict:
    """The comparisons a trainer reads: `data.comparisons` if named, else `D_initial`."""
    if not d.comparisons:
        return initial_comparisons(d)
    builder = builders.Comparisons(name=d.comparisons, data_dir=d.dir)
    if not builder.is_prepared():
        raise ConfigError(f"config.data.comparisons: no dataset {d.comparisons!r} under "
                         f"{d.dir}/comparisons; run the stage that writes it (e.g. relabel)")
    # Checked as a built dataset is: a damaged shard reads as records of None.
    check_readable(sorted(glob.glob(os.path.join(builder.data_dir, "*.array_record*"))),
                   f"delete {builder.data_dir} and the run that wrote it (a study's "
                   "stages/relabel-*), then run the same command: it is written again")
    return builder.as_data_source()


def prompts(d) -> dict:
    """Prompt sets, split -> source: the prompts the comparisons are about, each once (a real
    dataset compares several responses to one post)."""
    if d.kind == "synthetic":
        return builders.prepare(builders.synthetic_builder("prompts", d.dir, world_config(d),
                                                           **_sizes(d)))
    comparisons = initial_comparisons(d)
    built = _real_builder(d)  # made after the build: its info is the files' on disk
    name = f"{d.kind}-{built.builder_config.name}-{_fingerprint(built)}"
    return builders.distinct_prompts(name, comparisons, d.dir)


def _fingerprint(builder) -> str:
    """Of a built dataset as TFDS recorded it: its version and each split's records per shard
    and bytes. Comparisons rebuilt from other files (a post moved to the test split) change
    it, so the prompt sets made of the old ones are not read for the new."""
    splits = {name: [list(split.shard_lengths), split.num_bytes]
              for name, split in builder.info.splits.items()}
    payload = json.dumps({"version": str(builder.info.version), "splits": splits},
                         sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:8]


def demonstrations(d) -> dict:
    """SFT data: the synthetic writers' demonstrations, or a real dataset's comparisons."""
    if d.kind == "synthetic" and d.sft_source == "demonstrations":
        return builders.prepare(builders.synthetic_builder("sft", d.dir, world_config(d),
                                                           **_sizes(d)))
    return initial_comparisons(d)
