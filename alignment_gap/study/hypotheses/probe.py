"""Policies of finished runs at any checkpoint, sampled and judged: the analysis stages' tools.

`Probe` loads the SFT policy (the reference), a run's policy at a given checkpoint, the golden
and proxy preference models, and offers batched sampling, policy-as-classifier margins `h`,
preference margins (both-order sign rule) and the synthetic world's oracle. Everything runs on
the study's mesh; inputs are host arrays of the whole batch (one process, or identical on all).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignment_gap import logprobs, sharding
from alignment_gap.data import datasets, pipelines
from alignment_gap.data import world as world_lib
from alignment_gap.data.relabel import margins_program
from alignment_gap.sampling import Sampler, SamplingConfig
from alignment_gap.train import common, policy

CHUNK = 128  # Rows per call of every probe program.


def _host(x) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def probe_sampler(lm, mesh, rules, cfg: SamplingConfig) -> Sampler:
    return Sampler(lm, mesh, rules, cfg, name="probe_sample")


def probe_sampling(plan, tokenizer) -> SamplingConfig:
    """How the probes sample: as the study's online runs do (temperature, top-k, top-p)."""
    return policy.sampling_config(plan.online(plan.study.seeds[0]).config, tokenizer)


def margin_h_program(graphdef, mesh):
    """Jitted policy-as-classifier margin `h(a, b)` against the SFT policy (replicated)."""
    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def probe_h(params, sft_params, prompt, prompt_mask, a, a_mask, b, b_mask):
        seq = lambda p, y, m: logprobs.sequence_logprobs(nnx.merge(graphdef, p), prompt,
                                                         prompt_mask, y, m)[1]
        return ((seq(params, a, a_mask) - seq(sft_params, a, a_mask))
                - (seq(params, b, b_mask) - seq(sft_params, b, b_mask)))

    return probe_h


def chunk_rows(mesh, rules) -> int:
    """Rows per probe call: `CHUNK`, rounded up to a multiple of the mesh's batch shards (the
    sampler splits its rows over them: 128 rows do not split over 256)."""
    shards = sharding.batch_shards(mesh, rules)
    return -(-CHUNK // shards) * shards


class Probe:
    def __init__(self, plan, out_dir: str):
        s = self.study = plan.study
        self.plan = plan
        self.rt = rt = common.runtime(plan.sft.config, out_dir)
        self.chunk = chunk_rows(rt.mesh, rt.rules)
        tok = rt.tokenizer
        self.world = datasets.world_config(s.data) if s.data.kind == "synthetic" else None
        self.lm = common.load_frozen("lm", plan.dir(plan.sft), s.model, rt)
        self.graphdef, self.sft_params = nnx.split(self.lm)
        self.sampler = probe_sampler(self.lm, rt.mesh, rt.rules, probe_sampling(plan, tok))
        self._h = margin_h_program(self.graphdef, rt.mesh)
        self._judges = {}

    def policy(self, stage, step: int | None = None):
        """The parameters of `stage`'s policy at checkpoint `step` (None: the latest)."""
        lm = common.load_frozen("lm", self.plan.dir(stage), self.study.model, self.rt, step)
        return nnx.state(lm)

    def preference_model(self, which: str):
        """The study's `golden` or `proxy` preference model."""
        stage = {"golden": self.plan.golden, "proxy": self.plan.proxy}[which]
        cfg = {"golden": self.study.golden_model, "proxy": self.study.proxy_model}[which]
        return common.load_frozen("preference", self.plan.dir(stage), cfg, self.rt)

    def _judge(self, which: str):
        if which not in self._judges:
            graphdef, state = nnx.split(self.preference_model(which))
            self._judges[which] = (margins_program(graphdef, self.rt.mesh), state)
        return self._judges[which]

    def _chunks(self, fn, *arrays) -> np.ndarray:
        """Apply `fn` to row chunks of host arrays (the last chunk padded) and join the results."""
        n, out = arrays[0].shape[0], []
        for start in range(0, n, self.chunk):
            part = [a[start: start + self.chunk] for a in arrays]
            rows = part[0].shape[0]
            if rows < self.chunk:
                part = [np.concatenate([p, np.repeat(p[-1:], self.chunk - rows, 0)]) for p in part]
            with sharding.use(self.rt.mesh, self.rt.rules):
                out.append(fn(*part)[:rows])
        return np.concatenate(out)

    def margin(self, which: str, prompt, prompt_mask, a, a_mask, b, b_mask) -> np.ndarray:
        """r(x, a, b) - r(x, b, a) of the golden or proxy model: > 0 where `a` wins."""
        fn, state = self._judge(which)
        return self._chunks(lambda *xs: _host(fn(state, *xs)), prompt, prompt_mask, a, a_mask,
                            b, b_mask)

    def h(self, params, prompt, prompt_mask, a, a_mask, b, b_mask) -> np.ndarray:
        """The policy's implicit margin vs SFT: > 0 where it classifies `a` as the winner."""
        return self._chunks(lambda *xs: _host(self._h(params, self.sft_params, *xs)), prompt,
                            prompt_mask, a, a_mask, b, b_mask)

    def sample(self, params, prompt, prompt_mask, key) -> tuple[np.ndarray, np.ndarray]:
        keys = iter(jax.random.split(key, -(-prompt.shape[0] // self.chunk)))

        def one(p, m):
            out = self.sampler(params, p, m, next(keys))
            return np.concatenate([_host(out.tokens), _host(out.mask)], axis=1)
        both = self._chunks(one, prompt, prompt_mask)
        r = self.study.data.response_len
        return both[:, :r], both[:, r:].astype(bool)

    def prompts(self, texts) -> tuple[np.ndarray, np.ndarray]:
        encoded = [pipelines.encode_prompt(self.rt.tokenizer, t, self.study.data.prompt_len)
                   for t in texts]
        return np.stack([e[0] for e in encoded]), np.stack([e[1] for e in encoded])

    def decode(self, tokens) -> list[str]:
        return [self.rt.tokenizer.decode(t) for t in tokens]

    def oracle_margin(self, prompt_texts, a_texts, b_texts) -> np.ndarray | None:
        """Exact oracle score of `a` minus that of `b` (None outside the synthetic world)."""
        if self.world is None:
            return None
        out = []
        for prompt, a, b in zip(prompt_texts, a_texts, b_texts, strict=True):
            post = world_lib.post_words_from_prompt(prompt)
            out.append(world_lib.oracle_score(self.world, post, a.split())
                       - world_lib.oracle_score(self.world, post, b.split()))
        return np.asarray(out, float)


def hits(prediction_margin, label_margin) -> np.ndarray:
    """Per pair, whether a classifier's margin picks the label's winner: 1, 0, or 1/2 for a
    tie of either (a pair the label cannot order is no one's hit: on the online stream, `a` is
    the proxy's own pick, so counting label ties for `a` scored them all for the proxy)."""
    pred = np.where(prediction_margin > 0, 1.0, np.where(prediction_margin < 0, 0.0, 0.5))
    label = np.asarray(label_margin)
    return np.where(label > 0, pred, np.where(label < 0, 1.0 - pred, 0.5))
