"""The two batch sources of policy optimisation; both yield the same `PreferenceBatch`.

* `OfflineSource`: the next batch of a preference dataset (`D_golden`), or a replay of a
  recorded online stream - in order ("tandem"), shuffled uniformly, or shuffled within windows
  of k batches (the paper's partial shuffling, Sec. 5.1).
* `OnlineSource`: the next batch of prompts from the same prompt set; two responses per prompt
  sampled from the *current* policy with the jitted KV-cache sampler (both in one decode
  loop); ranked by the proxy preference model's both-order sign rule.

`OnlineSource` can record every batch it produces, token-exact and in order (`StreamRecorder`):
that is `D_online`. Chunks are sealed at each checkpoint, so a resumed run's stream holds each
step exactly once.
"""

from __future__ import annotations

import glob
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python import array_record_module
from flax import nnx, serialization
from jax.experimental import multihost_utils

from alignment_gap import cpu_groups, program_cache, sharding
from alignment_gap.batches import PreferenceBatch, merge_rows, split_rows
from alignment_gap.data import pipelines
from alignment_gap.data.array_records import check_readable
from alignment_gap.errors import ConfigError
from alignment_gap.models.heads import both_order_margin
from alignment_gap.sampling import Sampler, SamplingConfig, per_sample

FIELDS = ("prompt", "prompt_mask", "chosen", "chosen_mask", "rejected", "rejected_mask")
REPLAY_ORDERS = ("tandem", "shuffle", "window")


class OfflineSource:
    """Batches of a preference dataset; `next_batch` ignores the policy."""

    def __init__(self, iterator, to_global):
        self.iterator, self.to_global = iterator, to_global
        self.stats: dict = {}

    def next_batch(self, policy_params, key) -> PreferenceBatch:
        return self.to_global(next(self.iterator))


def dataset_iterator(source, tokenizer, shape, seed, num_threads=2):
    """The usual offline path: tokenised comparisons (e.g. D_golden), shuffled per epoch."""
    return iter(pipelines.preference_pipeline(source, tokenizer, shape, seed=seed,
                                              num_threads=num_threads))


class StreamRecorder:
    """Writes every example of every batch, in order, as ArrayRecord chunks (process 0)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.enabled = jax.process_index() == 0
        self.first = 1
        self._writer = None

    def resume_from(self, step: int):
        """Record from `step + 1`, the step after the checkpoint the run restored (not the
        latest on disk: a damaged one is set aside), dropping what was recorded after it."""
        self.first = step + 1
        if self.enabled:
            os.makedirs(self.directory, exist_ok=True)
            for stale in glob.glob(os.path.join(self.directory, "*.tmp")):  # after the last seal
                os.remove(stale)
            for path in stream_chunks(self.directory):  # chunks past the restored checkpoint
                if _chunk_range(path)[0] > step:
                    os.remove(path)

    def _tmp(self):
        return os.path.join(self.directory, "open.array_record.tmp")

    def record(self, step: int, batch: PreferenceBatch):
        host = {f: np.asarray(multihost_utils.process_allgather(getattr(batch, f), tiled=True))
                for f in FIELDS}
        if not self.enabled:
            return
        if self._writer is None:
            self._writer = array_record_module.ArrayRecordWriter(self._tmp(), "group_size:1")
        for row in range(host["prompt"].shape[0]):
            example = {f: host[f][row] for f in FIELDS}
            example["step"] = np.int64(step)
            self._writer.write(serialization.msgpack_serialize(example))

    def seal(self, step: int):
        """Close the open chunk as `steps-<first>-<last>.array_record` (called at checkpoints)."""
        if not self.enabled or self._writer is None:
            return
        self._writer.close()
        self._writer = None
        os.replace(self._tmp(), os.path.join(self.directory,
                                             f"steps-{self.first:08d}-{step:08d}.array_record"))
        self.first = step + 1


def _chunk_range(path: str) -> tuple[int, int]:
    first, last = os.path.basename(path).split(".")[0].split("-")[1:]
    return int(first), int(last)


def stream_chunks(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "steps-*.array_record")))


def replay_iterator(directory: str, shape, order: str = "tandem", window: int = 1, seed: int = 0,
                    num_steps: int | None = None):
    """Batches of a recorded stream: `tandem` (as recorded), `shuffle`, or `window` (k batches).
    `tandem` and `window` replay the stream once: `num_steps` past its end is refused (the
    stream would start over at its first step, no longer the run it replays); `shuffle`
    passes over it again in a new order."""
    chunks = stream_chunks(directory)
    if not chunks:
        raise ConfigError(f"config.replay.stream: {directory} holds no recorded stream chunks; "
                         "run an online policy with record_stream=True first")
    if order not in REPLAY_ORDERS:
        raise ConfigError(f"config.replay.order: {order!r} is unknown; use one of {REPLAY_ORDERS}")
    check_readable(chunks, f"delete {os.path.dirname(os.path.abspath(directory))} (the online "
                   "run that recorded it) and run again: it runs and records the same stream")
    records = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(chunks))
    records = records.map(lambda raw: serialization.msgpack_restore(raw))
    n, b = len(records), shape.global_batch_size
    steps = [int(records[i]["step"]) for i in range(min(b + 1, n))]
    if n < b or len(set(steps[:b])) != 1 or (n > b and steps[b] == steps[0]):
        raise ConfigError(f"config.batch_size: {b} does not match the recorded stream in "
                          f"{directory} (its first step holds {steps.count(steps[0])} pairs); "
                          "replay with the batch size it was recorded with")
    if num_steps is not None and order != "shuffle" and num_steps * b > n:
        raise ConfigError(f"config.num_steps: {num_steps} steps replay past the end of the "
                          f"stream in {directory}, which holds {n // b} (its online run stopped "
                          f"there); set num_steps <= {n // b}, or replay.order='shuffle' to "
                          "pass over it again")
    first = records[0]
    if first["prompt"].shape[0] != shape.prompt_len or \
            first["chosen"].shape[0] != shape.response_len:
        raise ConfigError(f"config.data: prompt_len/response_len {shape.prompt_len}/"
                          f"{shape.response_len} do not match the stream's "
                          f"{first['prompt'].shape[0]}/{first['chosen'].shape[0]}; use those")
    if order == "shuffle":
        records = records.shuffle(seed=pipelines.shuffle_seed(seed))
    elif order == "window":
        span = window * b
        perms = {}

        def position(i):  # shuffle within each window of `window` batches
            start = (i // span) * span
            size = min(span, n - start)
            if start not in perms:
                perms[start] = np.random.default_rng([seed, start]).permutation(size)
            return start + int(perms[start][i - start])
        records = grain.MapDataset.range(n).map(lambda i, base=records: base[position(i)])
    ordered = records.repeat(None)
    local, local_b = pipelines.local_records(ordered, shape)
    batches = local.batch(local_b, drop_remainder=True).map(
        lambda d: PreferenceBatch(**{f: d[f] for f in FIELDS}))
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def online_sampler(policy, mesh, rules, sampling: SamplingConfig) -> Sampler:
    """Two samples per prompt from the current policy, in one decode loop."""
    return Sampler(policy, mesh, rules, sampling, samples_per_prompt=2, name="online_sample")


def rank_pairs(proxy, prompt, prompt_mask, tokens, mask, microbatches: int = 1):
    """Each prompt's two samples (`online_sampler`'s rows, prompt-major) as a
    `PreferenceBatch`, ordered by the proxy's both-order sign rule. Traceable."""
    (y1, y2), (y1_mask, y2_mask) = per_sample(tokens, 2), per_sample(mask, 2)
    # Scored in `microbatches` sequential slices, as the update is: on CPU a slice's
    # activations stay in cache (bench/RESULTS.md).
    slices = split_rows((prompt, prompt_mask, y1, y1_mask, y2, y2_mask), microbatches)
    margin = merge_rows(jax.lax.map(lambda a: both_order_margin(proxy, *a), slices))
    first = (margin >= 0)[:, None]
    pick = lambda a, b: jnp.where(first, a, b)
    return PreferenceBatch(prompt, prompt_mask, pick(y1, y2), pick(y1_mask, y2_mask),
                           pick(y2, y1), pick(y2_mask, y1_mask))


def rank_program(proxy, mesh, rules, microbatches: int = 1):
    """Jitted `(proxy state, prompt, prompt mask, tokens, mask) -> PreferenceBatch`
    (`rank_pairs`). `proxy` may be abstract. One per process for each proxy graph, mesh, rule
    table and slicing (`program_cache`)."""
    return _rank_program(*_program_key(proxy, mesh, rules), microbatches)


def _program_key(proxy, mesh, rules) -> tuple:
    """(graph, shardings key, mesh, rules key): what fixes a ranking program of `proxy`."""
    proxy_graphdef, proxy_state = nnx.split(proxy)
    with sharding.use(mesh, rules):
        proxy_shardings = sharding.state_shardings(proxy_state, mesh)
    return (proxy_graphdef, program_cache.shardings_key(proxy_shardings), mesh,
            program_cache.rules_key(rules))


@program_cache.cached
def _rank_program(proxy_graphdef, proxy_shardings_key, mesh, rules, microbatches: int):
    rows = sharding.batch_sharding(mesh, rules, 2)

    def online_rank(proxy_state, prompt, prompt_mask, tokens, mask):
        return rank_pairs(nnx.merge(proxy_graphdef, proxy_state), prompt, prompt_mask, tokens,
                          mask, microbatches)

    return jax.jit(online_rank,
                   in_shardings=(program_cache.shardings_of(proxy_shardings_key),) + (rows,) * 4,
                   out_shardings=PreferenceBatch(*[rows] * 6))


@program_cache.cached
def _group_rank_program(proxy_graphdef, proxy_shardings_key, mesh, rules, microbatches: int,
                        groups: int):
    """`rank_pairs` of one of `groups` equal blocks of a batch's prompts (and their samples),
    which it is given whole with its first prompt's index (`Ranker`)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def online_rank(proxy_state, prompt, prompt_mask, tokens, mask, first):
        mine = lambda x, n=1: cpu_groups.group_rows(x, first, groups, n)
        return rank_pairs(nnx.merge(proxy_graphdef, proxy_state), mine(prompt),
                          mine(prompt_mask), mine(tokens, 2), mine(mask, 2), microbatches)

    return jax.jit(online_rank,
                   in_shardings=(program_cache.shardings_of(proxy_shardings_key),)
                   + (replicated,) * 5, out_shardings=PreferenceBatch(*[replicated] * 6))


class Ranker:
    """`rank_pairs` jitted on the mesh (`rank_program`). On a one-device CPU mesh a small
    proxy ranks the batch as side-by-side groups of prompts (`cpu_groups`; each group in
    `microbatches` slices), with the whole batch's order of every pair."""

    def __init__(self, proxy, mesh, rules, microbatches: int = 1, groups: int | None = None):
        self.mesh, self.rules, self.microbatches = mesh, rules, microbatches
        key = _program_key(proxy, mesh, rules)
        self.jitted = _rank_program(*key, microbatches)
        self.groups = cpu_groups.default_groups(mesh, nnx.state(proxy)) if groups is None \
            else groups
        if self.groups > 1:
            self.program = _group_rank_program(*key, microbatches, self.groups)

    def __call__(self, proxy_state, prompt, prompt_mask, tokens, mask) -> PreferenceBatch:
        b = prompt.shape[0]
        if self.groups == 1 or b % (self.groups * self.microbatches):
            with sharding.use(self.mesh, self.rules):
                return self.jitted(proxy_state, prompt, prompt_mask, tokens, mask)

        args = (proxy_state, prompt, prompt_mask, tokens, mask)
        outputs = cpu_groups.run_groups(self.program, args, self.groups, b, prompt.shape,
                                        self.mesh, self.rules)
        return cpu_groups.merge_groups(outputs)


class OnlineSource:
    """Sample two responses per prompt from the current policy; the proxy model ranks them."""

    def __init__(self, prompt_iterator, to_global, policy, proxy, mesh, rules,
                 sampling: SamplingConfig, recorder: StreamRecorder | None = None,
                 microbatches: int = 1):
        self.prompts, self.to_global, self.recorder = prompt_iterator, to_global, recorder
        self.mesh, self.rules = mesh, rules
        self.sampler = online_sampler(policy, mesh, rules, sampling)
        self.proxy_state = nnx.state(proxy)
        self.rank = Ranker(proxy, mesh, rules, microbatches)
        self.stats: dict = {}
        self.step = 0

    def next_batch(self, policy_params, key) -> PreferenceBatch:
        prompts = self.to_global(next(self.prompts))
        t0 = time.perf_counter()
        both = self.sampler(policy_params, prompts.prompt, prompts.prompt_mask, key)
        jax.block_until_ready(both.tokens)
        t1 = time.perf_counter()
        batch = self.rank(self.proxy_state, prompts.prompt, prompts.prompt_mask, both.tokens,
                          both.mask)
        jax.block_until_ready(batch.chosen)
        t2 = time.perf_counter()
        sampled = float(jnp.sum(both.mask))
        self.stats = {"sample_s": t1 - t0, "score_s": t2 - t1,
                      "sample_tokens_per_s": sampled / max(t1 - t0, 1e-9)}
        self.step += 1
        if self.recorder is not None:
            self.recorder.record(self.step, batch)
        return batch
