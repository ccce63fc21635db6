"""Evaluating a policy the way the paper does (Tang et al. 2024, Sec. 3; PAPER.md).

* **Win rate** against a fixed opponent (the SFT policy, or a "golden policy"), judged by the
  golden preference model's both-order sign rule on a fixed prompt subset (a tie counts 1/2).
* **KL budget**: one sample per prompt, the exact per-token KL to the SFT policy summed over
  tokens, averaged over prompts. The samples are the policy's own (temperature 1, no top-k or
  top-p), whatever the run samples its win-rate responses with.
* **Oracle win rate** (synthetic world only): the same comparison judged by the exact oracle.
* **Policy-as-classifier accuracy** on held-out `D_golden` pairs (`h(yw, yl) > 0`; a tie, as
  for the SFT policy itself where h = 0, counts 1/2) and
  **likelihood drift** `E[log pi(yw) - log pi_sft(yw)]` (paper Fig. 6-8).

Prompts and samples are fixed per evaluator (the same keys at every checkpoint), so curves
move only because the policy moves. The opponent's responses are sampled once and cached.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from alignment_gap import logprobs, losses, program_cache, sharding
from alignment_gap.batches import PreferenceBatch, PromptBatch
from alignment_gap.data import world as world_lib
from alignment_gap.models.heads import both_order_margin
from alignment_gap.sampling import Sampler, SamplingConfig


def _host(x) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class EvalPrograms(NamedTuple):
    judge: Callable  # (golden state, prompt, mask, ours, mask, theirs, mask) -> [B] 1 / 0.5 / 0
    kl: Callable  # (params, sft params, prompt, mask, response, mask) -> [B] sequence KL
    pair_logprobs: Callable  # (params, PreferenceBatch) -> ([B] chosen, [B] rejected) log-probs
    classify: Callable  # (params, SFT's pair_logprobs, PreferenceBatch) -> accuracy, drift


def eval_programs(graphdef, golden_graphdef, mesh, rules) -> EvalPrograms:
    """The jitted evaluation programs (results replicated), called under `sharding.use(mesh,
    rules)`; graphdefs may come from abstract models. One set per process for each model pair,
    mesh and rule table: every stage evaluating the same models calls the same programs."""
    return _eval_programs(graphdef, golden_graphdef, mesh, program_cache.rules_key(rules))


@program_cache.cached
def _eval_programs(graphdef, golden_graphdef, mesh, rules) -> EvalPrograms:
    del rules  # read while tracing (`sharding.use`); part of the cache key
    replicated = sharding.replicated(mesh)

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_judge(golden_state, prompt, prompt_mask, ours, ours_mask, theirs, theirs_mask):
        margin = both_order_margin(nnx.merge(golden_graphdef, golden_state), prompt,
                                   prompt_mask, ours, ours_mask, theirs, theirs_mask)
        return losses.tie_half(margin)

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_kl(params, sft_params, prompt, prompt_mask, response, response_mask):
        return logprobs.sequence_kl(nnx.merge(graphdef, params), nnx.merge(graphdef, sft_params),
                                    prompt, prompt_mask, response, response_mask)

    def eval_pair_logprobs(params, b: PreferenceBatch):
        lm = nnx.merge(graphdef, params)
        seq = lambda y, ym: logprobs.sequence_logprobs(lm, b.prompt, b.prompt_mask, y, ym)[1]
        return seq(b.chosen, b.chosen_mask), seq(b.rejected, b.rejected_mask)

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_classify(params, sft_logprobs, b: PreferenceBatch):
        (pw, pl), (sw, sl) = eval_pair_logprobs(params, b), sft_logprobs
        h = (pw - sw) - (pl - sl)
        return {"classifier_accuracy": jnp.mean(losses.tie_half(h)),
                "likelihood_drift": jnp.mean(pw - sw)}

    return EvalPrograms(eval_judge, eval_kl,
                        jax.jit(eval_pair_logprobs, out_shardings=replicated),
                        eval_classify)


def eval_sampler(lm, mesh, rules, sampling: SamplingConfig) -> Sampler:
    """One sample per evaluation prompt (the policy's and, once, the opponent's)."""
    return Sampler(lm, mesh, rules, sampling, name="eval_sample")


def kl_sampling(sampling: SamplingConfig) -> SamplingConfig:
    """`sampling` as the policy's own distribution (temperature 1, no top-k or top-p): the one
    a sequence KL estimate must sample from to be unbiased."""
    return dataclasses.replace(sampling, temperature=1.0, top_k=0, top_p=1.0)


def kl_sampler(lm, mesh, rules, sampling: SamplingConfig) -> Sampler | None:
    """The sampler of a KL estimate's own samples where `sampling` is not the policy's own
    distribution (`kl_sampling`); None where its samples serve."""
    pure = kl_sampling(sampling)
    return None if pure == sampling else Sampler(lm, mesh, rules, pure, name="eval_kl_sample")


def evaluation_key(seed: int, first_prompt: int = 0):
    """The key of an evaluation's draws over the prompts from `first_prompt`. The sampler
    draws each row's noise from the key by row, so a window of prompts after the first under
    the same key would repeat the first window's noise row by row (the test stage's test
    prompts would share the draws their checkpoints were chosen on): each window has its own.
    The first window's is `key(seed)`, as every run's evaluations have always drawn."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, first_prompt) if first_prompt else key


class Evaluator:
    def __init__(self, *, lm, sft_params, golden, opponent_params, prompts: PromptBatch,
                 pairs: PreferenceBatch | None, mesh, rules, sampling: SamplingConfig,
                 kl_prompts: int, tokenizer=None, prompt_texts=None, world=None, seed: int = 0,
                 opponent_lm=None, first_prompt: int = 0):
        self.mesh, self.rules = mesh, rules
        self.graphdef, _ = nnx.split(lm)
        self.sft_params, self.prompts, self.pairs = sft_params, prompts, pairs
        self.kl_prompts, self.tokenizer, self.world = kl_prompts, tokenizer, world
        self.post_words = ([world_lib.post_words_from_prompt(t) for t in prompt_texts]
                           if world is not None else None)
        self.sampler = eval_sampler(lm, mesh, rules, sampling)
        # KL(policy || SFT) averages over the policy's own samples: where the run samples
        # otherwise (a temperature, top-k or top-p), they are drawn apart (`kl_sampling`).
        self.kl_sampler = kl_sampler(lm, mesh, rules, sampling)
        self.key = evaluation_key(seed, first_prompt)
        golden_graphdef, self.golden_state = nnx.split(golden)
        self._judge, self._kl, pair_logprobs, self._classify = eval_programs(
            self.graphdef, golden_graphdef, mesh, rules)
        if pairs is not None:  # the SFT policy's log-probs of the fixed pairs, once
            with sharding.use(mesh, rules):
                self.sft_pair_logprobs = pair_logprobs(sft_params, pairs)
        opponent_key = jax.random.fold_in(self.key, 1)
        if opponent_lm is None:  # the policy's architecture (its SFT start, a golden policy)
            self.opponent = self._sample(opponent_params, opponent_key)
        else:  # another architecture (one opponent for policies of every size), sampled once
            self.opponent = self._sample(nnx.state(opponent_lm), opponent_key,
                                         eval_sampler(opponent_lm, mesh, rules, sampling))

    def _sample(self, params, key, sampler=None):
        with sharding.use(self.mesh, self.rules):
            return (sampler or self.sampler)(params, self.prompts.prompt,
                                             self.prompts.prompt_mask, key)

    def evaluate(self, params) -> tuple[dict, dict]:
        """(scores, per-prompt outcomes): the judge's verdict on each prompt (1 / 0.5 / 0),
        the oracle's (synthetic world) and each KL prompt's sequence KL, as numpy arrays."""
        key = jax.random.fold_in(self.key, 2)
        ours = self._sample(params, key)
        own = ours if self.kl_sampler is None else self._sample(params, key, self.kl_sampler)
        p = self.prompts
        with sharding.use(self.mesh, self.rules):
            wins = self._judge(self.golden_state, p.prompt, p.prompt_mask, ours.tokens, ours.mask,
                               self.opponent.tokens, self.opponent.mask)
            kls = self._kl(params, self.sft_params, p.prompt, p.prompt_mask, own.tokens,
                           own.mask)
            result = {"win_rate": float(jnp.mean(wins)),
                      "kl": float(jnp.mean(kls[: self.kl_prompts])),
                      "response_length": float(jnp.mean(ours.mask.sum(-1)))}
            if self.pairs is not None:
                result.update({k: float(v) for k, v in
                               self._classify(params, self.sft_pair_logprobs,
                                              self.pairs).items()})
        outcomes = {"win": _host(wins), "kl": _host(kls)[: self.kl_prompts]}
        if self.world is not None:
            outcomes["oracle_win"] = self._oracle_outcomes(ours)
            result["oracle_win_rate"] = float(np.mean(outcomes["oracle_win"]))
        return result, outcomes

    def _oracle_outcomes(self, ours) -> np.ndarray:
        mine, theirs = _host(ours.tokens), _host(self.opponent.tokens)
        scores = []
        for words, a, b in zip(self.post_words, mine, theirs, strict=True):
            sa = world_lib.oracle_score(self.world, words, self.tokenizer.decode(a).split())
            sb = world_lib.oracle_score(self.world, words, self.tokenizer.decode(b).split())
            scores.append(1.0 if sa > sb else 0.0 if sa < sb else 0.5)
        return np.asarray(scores, np.float32)

