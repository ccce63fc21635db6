"""Relabelling: a preference dataset + a judge -> a new TFDS dataset (`D_initial` -> `D_golden`).

A judge is `judge(records) -> bool array`, True where the record's current `chosen` wins. Two
judges ship: the synthetic world's exact oracle, and any pairwise preference model through the
both-order sign rule (`model_judge`). Records the judge disagrees with are swapped, none are
dropped; the new dataset is written atomically by TFDS (a crash leaves no partial dataset).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from alignment_gap import sharding
from alignment_gap.data import builders
from alignment_gap.data import world as world_lib
from alignment_gap.data.pipelines import as_text, encode_prompt, encode_response
from alignment_gap.models.heads import both_order_margin

BATCH = 256  # Records judged per call.


def decoded(record) -> dict:
    """A comparison record's text fields as str."""
    return {k: as_text(record[k]) for k in ("id", "prompt", "chosen", "rejected")}


def relabelled_records(source, judge, batch_size: int = BATCH):
    """Yield every record of `source`, in order, with chosen/rejected as the judge says."""
    for start in range(0, len(source), batch_size):
        records = [decoded(source[i]) for i in range(start, min(start + batch_size, len(source)))]
        keep = np.asarray(judge(records), bool)
        if keep.shape != (len(records),):
            raise ValueError(f"judge returned shape {keep.shape} for {len(records)} records; it "
                             "must return one bool per record")
        for record, keep_order in zip(records, keep, strict=True):
            if not keep_order:
                record = dict(record, chosen=record["rejected"], rejected=record["chosen"])
            yield record


def relabel(sources: dict, judge, name: str, data_dir: str, batch_size: int = BATCH):
    """Write `{split: relabelled source}` as TFDS dataset `comparisons/<name>`; return sources.
    Every process labels every record before process 0 writes them: a model judge's program
    runs on all processes' devices, so no process may skip it."""
    splits = {split: list(relabelled_records(src, judge, batch_size))
              for split, src in sources.items()}
    return builders.prepare(builders.Comparisons(name=name, splits=splits, data_dir=data_dir))


def oracle_margins(records, world: world_lib.WorldConfig) -> np.ndarray:
    """The synthetic world's exact oracle score of each record's chosen response minus its
    rejected one's (> 0: the oracle prefers chosen)."""
    def margin(r):
        post = world_lib.post_words_from_prompt(r["prompt"])
        return (world_lib.oracle_score(world, post, r["chosen"].split())
                - world_lib.oracle_score(world, post, r["rejected"].split()))
    return np.array([margin(r) for r in records], float)


def oracle_judge(world: world_lib.WorldConfig):
    """The synthetic world's exact oracle (noise-free: the higher score wins; ties keep order)."""
    return lambda records: oracle_margins(records, world) >= 0


def oracle_agreement(records, world: world_lib.WorldConfig) -> float:
    """How far the synthetic world's oracle agrees that each record's chosen response beats
    its rejected one: 1 where it prefers chosen, 0 where rejected, 1/2 where it scores them
    alike (an order the oracle does not hold is neither right nor wrong)."""
    if not records:
        return float("nan")
    return float(np.mean(0.5 + 0.5 * np.sign(oracle_margins(records, world))))


def margins_program(graphdef, mesh):
    """Jitted both-order margins `r(x, a, b) - r(x, b, a)` of a batch of pairs (replicated)."""
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def preference_margins(state, prompt, prompt_mask, first, first_mask, second, second_mask):
        return both_order_margin(nnx.merge(graphdef, state), prompt, prompt_mask, first,
                                 first_mask, second, second_mask)

    return preference_margins


def model_judge(model, tokenizer, prompt_len: int, response_len: int, mesh, rules):
    """A pairwise preference model as judge: chosen wins iff r(x,c,r) - r(x,r,c) >= 0."""
    graphdef, state = nnx.split(model)
    margins = margins_program(graphdef, mesh)

    def judge(records):
        prompt, prompt_mask = zip(*(encode_prompt(tokenizer, r["prompt"], prompt_len)
                                    for r in records), strict=True)
        first, first_mask = zip(*(encode_response(tokenizer, r["chosen"], response_len)
                                  for r in records), strict=True)
        second, second_mask = zip(*(encode_response(tokenizer, r["rejected"], response_len)
                                    for r in records), strict=True)
        arrays = [np.stack(x) for x in (prompt, prompt_mask, first, first_mask, second,
                                        second_mask)]
        with sharding.use(mesh, rules):
            return np.asarray(jax.device_get(margins(state, *arrays))) >= 0
    return judge
