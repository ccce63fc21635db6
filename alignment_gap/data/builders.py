"""TFDS builders writing ArrayRecord (no TensorFlow needed): the synthetic world and relabels.

Every preference dataset shares one record shape, `{prompt, chosen, rejected}` as text (plus
builder-specific extras), so grain pipelines read the synthetic world, TL;DR and Anthropic HH
alike. Text, not token ids, is stored: a dataset outlives any one tokenizer.

    builder = synthetic_builder("comparisons", data_dir, WorldConfig(seed=0), train=20_000)
    source = prepare(builder)["train"]   # built once (skipped when present); random access
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from alignment_gap.data import world as world_lib
from alignment_gap.data.array_records import check_readable
from alignment_gap.errors import DataError

VERSION = tfds.core.Version("1.0.0")
FILE_FORMAT = "array_record"  # Random access for grain; written without TensorFlow.
# Post indices of each split never overlap, whatever the sizes.
SPLIT_OFFSETS = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
KINDS = ("comparisons", "sft", "prompts")



def comparison_features(**extra):
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(), "prompt": tfds.features.Text(),
        "chosen": tfds.features.Text(), "rejected": tfds.features.Text(), **extra})


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    kind: str = "comparisons"  # comparisons (D_initial) | sft (demonstrations) | prompts
    world_seed: int = 0
    label_temperature: float = 0.25
    train: int = 20_000
    validation: int = 1_000
    test: int = 1_000

    def world(self) -> world_lib.WorldConfig:
        return world_lib.WorldConfig(seed=self.world_seed,
                                     label_temperature=self.label_temperature)


class SyntheticWorld(tfds.core.GeneratorBasedBuilder):
    """The synthetic summarisation world (alignment_gap/data/world.py) as a TFDS dataset."""

    VERSION = VERSION
    BUILDER_CONFIGS = [SyntheticConfig(name="comparisons")]

    def _info(self):
        kind = self.builder_config.kind
        if kind == "comparisons":
            features = comparison_features(chosen_score=np.float32, rejected_score=np.float32)
        elif kind == "sft":
            features = tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "prompt": tfds.features.Text(),
                "response": tfds.features.Text()})
        else:
            features = tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "prompt": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features,
                                     description=world_lib.__doc__.splitlines()[0])

    def _split_generators(self, dl_manager):
        c = self.builder_config
        sizes = {"train": c.train, "validation": c.validation, "test": c.test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n}

    def _generate_examples(self, split, n):
        c, world = self.builder_config, self.builder_config.world()
        for index in range(SPLIT_OFFSETS[split], SPLIT_OFFSETS[split] + n):
            key = f"post{index}"
            if c.kind == "comparisons":
                x = world_lib.make_comparison(world, index)
                yield key, {"id": key, "prompt": x.prompt, "chosen": x.chosen,
                            "rejected": x.rejected, "chosen_score": x.chosen_score,
                            "rejected_score": x.rejected_score}
            elif c.kind == "sft":
                prompt, response = world_lib.make_demonstration(world, index)
                yield key, {"id": key, "prompt": prompt, "response": response}
            else:
                yield key, {"id": key,
                            "prompt": world_lib.prompt_text(world_lib.make_post(world, index))}


def synthetic_builder(kind: str, data_dir: str, world: world_lib.WorldConfig, train: int,
                      validation: int = 1_000, test: int = 1_000) -> SyntheticWorld:
    if kind not in KINDS:
        raise ValueError(f"synthetic dataset kind {kind!r} is unknown; use one of {KINDS}")
    name = (f"{kind}-seed{world.seed}-t{world.label_temperature:g}"
            f"-n{train}-{validation}-{test}")
    config = SyntheticConfig(name=name, version=VERSION, kind=kind, world_seed=world.seed,
                             label_temperature=world.label_temperature, train=train,
                             validation=validation, test=test)
    return SyntheticWorld(config=config, data_dir=data_dir, file_format=FILE_FORMAT)


class Comparisons(tfds.core.GeneratorBasedBuilder):
    """Preference pairs handed over as Python records, e.g. a relabelled `D_golden`.

    The producer is given at construction (`splits`: split -> iterable of dicts with `id`,
    `prompt`, `chosen`, `rejected`); the builder config's name is the dataset's name.
    """

    VERSION = VERSION
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

    def __init__(self, *, name: str, splits=None, **kwargs):
        self._splits = splits or {}
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=VERSION), **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=comparison_features())

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(records) for split, records in self._splits.items()}

    def _generate_examples(self, records):
        for record in records:
            yield record["id"], {k: record[k] for k in ("id", "prompt", "chosen", "rejected")}


class DistinctPrompts(tfds.core.GeneratorBasedBuilder):
    """Each prompt of a comparisons dataset once, in the order it first appears: a real dataset
    holds several comparisons of one post (TL;DR) or question (HH, Arena), and the prompts a
    policy samples on, and those evaluations read, must each be one post. The config's name is
    the comparisons dataset's."""

    VERSION = VERSION
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

    def __init__(self, *, name: str, comparisons=None, **kwargs):
        self._comparisons = comparisons or {}
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=VERSION), **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "prompt": tfds.features.Text()}),
            disable_shuffling=True)  # the comparisons' order, not TFDS's key-hash order

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(source)
                for split, source in self._comparisons.items()}

    def _generate_examples(self, source):
        seen = set()
        for i in range(len(source)):
            record = source[i]
            if record["prompt"] not in seen:
                seen.add(record["prompt"])
                yield str(i), {"id": record["id"], "prompt": record["prompt"]}


def comparisons_built(data_dir: str, name: str) -> bool:
    """Whether `data_dir` holds the built `Comparisons` dataset `name` (TFDS writes its
    dataset_info.json last, into the directory it renames into place). A file check: the
    scheduler asks at every poll, and a builder logs a warning each time it is made."""
    return os.path.exists(os.path.join(data_dir, "comparisons", name, str(VERSION),
                                       "dataset_info.json"))


def distinct_prompts(name: str, comparisons: dict, data_dir: str) -> dict:
    """Split -> the distinct prompts of `comparisons` (built once under `data_dir`)."""
    return prepare(DistinctPrompts(name=name, comparisons=comparisons, data_dir=data_dir))


def prepare(builder, manual_dir: str | None = None):
    """Build the dataset unless already built; return split -> random-access data sources.

    With several processes, process 0 builds and the others wait, then all read.
    """
    tfds.disable_progress_bar()
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    if jax.process_index() == 0:
        _build(builder, config)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"prepare {builder.name}/{builder.builder_config.name}")
        builder.download_and_prepare(download_config=config)  # finds it built
        # A builder made before process 0 built the dataset keeps its empty splits: read them.
        builder.info.read_from_directory(builder.data_dir)
    rebuild = f"delete {builder.data_dir} and run the same command: it is built again"
    _check_complete(builder, rebuild)
    check_readable(sorted(glob.glob(os.path.join(builder.data_dir, "*.array_record*"))), rebuild)
    return builder.as_data_source()


def _check_complete(builder, fix: str):
    """Every split TFDS recorded, with every shard file it lists (a deleted shard, or a lost
    dataset_info.json that TFDS takes for a dataset of no splits)."""
    splits = builder.info.splits
    info = os.path.join(builder.data_dir, "dataset_info.json")
    missing = ([str(p) for split in splits.values() for p in split.filepaths
                if not os.path.exists(p)] if splits and os.path.exists(info) else [info])
    if missing:
        raise DataError(f"{builder.data_dir}: the built dataset is incomplete ({missing[0]} "
                        f"is missing); {fix}")


def _build(builder, config):
    """`download_and_prepare`, where another job sharing `data_dir` (a sweep's other shard) may
    build the same dataset at the same time: TFDS builds into a temporary directory and renames
    it into place, so the slower job's rename finds the faster one's finished copy. That copy
    is the same dataset (builds are deterministic): read it."""
    try:
        builder.download_and_prepare(download_config=config)
    except FileExistsError:
        if not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
            raise
        builder.info.read_from_directory(builder.data_dir)
