"""Jitted sampling from a language model: prefill + KV-cache decode loop.

Prompts are left-padded, so every row's first response token goes to the same cache slot and
one scalar `cache_index` drives the whole batch. Each step draws with
`fold_in(key, step)`, so the cached sampler and the naive full-recompute one
(`use_cache=False`, kept as the reference the tests and benchmarks compare against) draw the
same tokens from the same key.

Returned log-probs are those of the policy itself (temperature 1, no top-k/top-p), which is
what losses and KL estimates need; temperature / top-k / top-p only shape the draw.
Rows stop at their first EOS (kept, mask 1); later slots are padding (mask 0). The loop exits
early once every row is done.

On a one-device CPU mesh a `Sampler` of a small model runs its batch as two groups of prompts
side by side, from two threads (`cpu_groups`): a decode step's small ops keep one core busy,
and XLA:CPU runs calls from different threads at once. Each group draws the noise the whole
batch's rows would, so the tokens are those of one call. On several CPU devices that hold the
model whole (data parallel), each device decodes its own rows in a loop of its own, drawing
its rows' noise the same way: the mesh's one loop tested every step whether all rows were done,
a rendezvous of the devices.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from alignment_gap import cpu_groups, program_cache, sharding
from alignment_gap.logprobs import token_logprobs
from alignment_gap.models.attention import positions_from_mask
from alignment_gap.models.transformer import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy.
    top_k: int = 0  # 0: off.
    top_p: float = 1.0  # 1: off.
    eos_id: int = 1
    pad_id: int = 0
    # Further ids that end a response as EOS does: a chat model's end-of-turn markers
    # (`stop_ids_beyond_eos` of its tokenizer).
    stop_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, c) -> SamplingConfig:
        return cls(**{f.name: c[f.name] for f in dataclasses.fields(cls) if f.name in c})


def stop_ids_beyond_eos(tokenizer) -> tuple[int, ...]:
    """A tokenizer's end-of-sequence ids besides its EOS (where `decode` also cuts)."""
    return tuple(i for i in tokenizer.stop_ids if i != tokenizer.eos_id)


class SampleOutput(NamedTuple):
    tokens: jax.Array  # [batch, R] int32, pad after EOS.
    logprobs: jax.Array  # [batch, R] float32 log pi(token), 0 at padding.
    mask: jax.Array  # [batch, R] bool, True up to and including EOS.


def first_argmax(x_BxV):
    """`jnp.argmax` over the last axis as a max and a min: XLA:CPU lowers argmax to a
    two-operand reduction that took ~7% of a small model's decode step; same result."""
    top = jnp.max(x_BxV, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x_BxV.shape, x_BxV.ndim - 1)
    # A NaN is the maximum, as for argmax (max is then NaN, equal to nothing).
    hit = (x_BxV == top) | jnp.isnan(x_BxV)
    return jnp.min(jnp.where(hit, index, x_BxV.shape[-1]), axis=-1)


# The decode loop draws every step's Gumbel noise before it starts when all of it fits in this
# many bytes: on CPU, jax's threefry runs as a small loop of its own, whose fixed cost per call
# was a third of a mini decode step. Larger draws (a big vocabulary) stay one per step.
PREDRAW_NOISE_BYTES = 32 << 20


def gumbel_rows(key, samples: int, prompts: int, vocab: int):
    """`[prompts * samples, vocab]` Gumbel noise for prompt-major rows (prompt i's k-th sample
    at row `i * samples + k`). Row `i * samples + k` gets what row `k * prompts + i` of
    `gumbel(key, (samples * prompts, vocab))` gets (jax's threefry counts elements in order),
    so the draws do not depend on the layout; drawn this way they are drawn where their rows
    live."""
    noise = jax.random.gumbel(key, (samples, prompts, vocab), jnp.float32)
    return jnp.swapaxes(noise, 0, 1).reshape(prompts * samples, vocab)


def step_noise(key, steps: int, samples: int, prompts: int, vocab: int):
    """`[steps, prompts * samples, vocab]` Gumbel noise, step t's the same as
    `gumbel_rows(fold_in(key, t), ...)`."""
    draw = lambda t: gumbel_rows(jax.random.fold_in(key, t), samples, prompts, vocab)
    return jax.vmap(draw)(jnp.arange(steps))


def per_sample(rows, samples: int) -> list:
    """A `samples_per_prompt` call's output rows as `samples` arrays, the k-th holding every
    prompt's k-th sample (`[prompts, ...]`). Rows stay on the devices they are on."""
    grouped = rows.reshape(rows.shape[0] // samples, samples, *rows.shape[1:])
    return [grouped[:, k] for k in range(samples)]


def choose_tokens(logits_BxV, key, cfg: SamplingConfig, noise_BxV=None):
    """Draw one token per row after temperature, top-k and top-p. `noise_BxV`: the draw's
    Gumbel noise if drawn beforehand (`step_noise`; `key` is then unused); by default it is
    drawn here from `key`."""
    if cfg.temperature == 0.0:
        return first_argmax(logits_BxV)
    logits = logits_BxV / cfg.temperature
    if cfg.top_k:
        kth_largest = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest logit still inside the nucleus; the top token always is (top_p -> 0 is
        # greedy, not an empty nucleus).
        inside = (mass_before < cfg.top_p) | (jnp.arange(logits.shape[-1]) == 0)
        cutoff = jnp.min(jnp.where(inside, sorted_desc, jnp.inf), axis=-1)
        logits = jnp.where(logits < cutoff[:, None], -jnp.inf, logits)
    # The Gumbel-max draw `jax.random.categorical` makes, with the cheaper argmax.
    if noise_BxV is None:
        noise_BxV = jax.random.gumbel(key, logits.shape, logits.dtype)
    return first_argmax(logits + noise_BxV)


class _Loop(NamedTuple):
    step: jax.Array
    logits: jax.Array  # Logits for the token at `step`, [batch, vocab].
    cache: KVCache | None
    cache_mask: jax.Array  # [batch, P + R]; in the naive sampler, the sequence mask.
    sequence: jax.Array  # [batch, P + R] prompt then sampled tokens (naive sampler only).
    tokens: jax.Array
    logprobs: jax.Array
    done: jax.Array


def sample(lm, prompt_BxP, prompt_mask_BxP, key, cfg: SamplingConfig, use_cache: bool = True,
           samples_per_prompt: int = 1, predraw_noise_bytes: int | None = None,
           group: tuple[jax.Array, int] | None = None, run_axis: str | None = None):
    """Sample up to `cfg.max_new_tokens` tokens per prompt. Traceable; see `Sampler`.

    `samples_per_prompt` n > 1 draws n responses per prompt in one decode loop, prompt-major
    (prompt i's samples at rows `i * n .. i * n + n - 1`: on a data-parallel mesh they stay on
    their prompt's device; `per_sample` splits them); each prompt is prefilled once and its
    cache copied to its n rows. Every step's Gumbel noise is drawn before the loop when it fits in
    `predraw_noise_bytes` (default `PREDRAW_NOISE_BYTES`, read as the sampler is traced; the
    same draws as one per step). `group` (first, total): these
    prompts are prompts first .. of a batch of `total`, and draw the noise that batch's rows
    would (so a batch sampled in groups gives the tokens it gives whole). `run_axis`: the name
    of a `vmap` axis of stacked runs (`train/stacked.py`) that decode in one loop until every
    run is done.
    """
    n = samples_per_prompt
    repeat = lambda x: jnp.repeat(x, n, axis=0) if n > 1 else x
    prompts, p = prompt_BxP.shape
    batch, r = n * prompts, cfg.max_new_tokens
    prompt_mask_BxP = prompt_mask_BxP.astype(bool)
    if use_cache:
        prompt_only = jnp.concatenate([prompt_mask_BxP, jnp.zeros((prompts, r), bool)], axis=1)
        cache = KVCache.zeros(lm.cfg, prompts, p + r).constrained()
        logits, cache = lm(prompt_BxP, prompt_mask_BxP, cache=cache, cache_index=0,
                           cache_mask_BxS=prompt_only, logits_window=(p - 1, p))
        cache = cache.repeat_rows(n).constrained()
    else:
        cache = None
        logits, _ = lm(prompt_BxP, prompt_mask_BxP, logits_window=(p - 1, p))
    logits = repeat(logits)
    prompt_BxP, prompt_mask_BxP = repeat(prompt_BxP), repeat(prompt_mask_BxP)
    seq_mask = jnp.concatenate([prompt_mask_BxP, jnp.zeros((batch, r), bool)], axis=1)
    sequence = jnp.concatenate([prompt_BxP, jnp.full((batch, r), cfg.pad_id, jnp.int32)], axis=1)
    first_position = prompt_mask_BxP.sum(axis=1).astype(jnp.int32)
    vocab = logits.shape[-1]
    # The noise is drawn for the rows of the whole batch (`total` prompts) and this call's rows
    # taken from it: prompt-major, a group's rows are one block.
    first, total = (0, prompts) if group is None else group
    mine = lambda x, axis: x if group is None else jax.lax.dynamic_slice_in_dim(
        x, n * first, batch, axis)
    noise = None
    if predraw_noise_bytes is None:
        predraw_noise_bytes = PREDRAW_NOISE_BYTES
    if cfg.temperature != 0.0 and r * n * total * vocab * 4 <= predraw_noise_bytes:
        noise = mine(step_noise(key, r, n, total, vocab), 1)

    def cond(s: _Loop):
        pending = ~jnp.all(s.done)
        if run_axis is not None:
            # Summed over the runs, the predicate is the same for all: vmap keeps one loop and
            # an unbatched step, where a per-run predicate would select every carry (the whole
            # cache) per run at each step and write the cache by scatter.
            pending = jax.lax.psum(pending.astype(jnp.int32), run_axis) > 0
        return (s.step < r - 1) & pending

    def draw(s: _Loop) -> tuple[_Loop, jax.Array, jax.Array]:
        """Step `s.step`'s token drawn from `s.logits` into the carry; (carry, token, live)."""
        if cfg.temperature == 0.0:
            token = choose_tokens(s.logits, None, cfg)
        elif noise is None:  # this step's draw for the whole batch, at this call's rows
            step_draw = gumbel_rows(jax.random.fold_in(key, s.step), n, total, vocab)
            token = choose_tokens(s.logits, None, cfg, mine(step_draw, 0))
        else:  # no key to derive: this step's noise is already drawn
            token = choose_tokens(s.logits, None, cfg, noise[s.step])
        logprob = token_logprobs(s.logits[:, None], token[:, None])[:, 0]
        live = ~s.done
        token = jnp.where(live, token, cfg.pad_id)
        ends = token == cfg.eos_id
        for stop in cfg.stop_ids:
            ends |= token == stop
        return s._replace(tokens=s.tokens.at[:, s.step].set(token),
                          logprobs=s.logprobs.at[:, s.step].set(jnp.where(live, logprob, 0.0)),
                          done=s.done | ends,
                          cache_mask=s.cache_mask.at[:, p + s.step].set(live)), token, live

    def body(s: _Loop):
        s, token, live = draw(s)
        slot = p + s.step
        sequence = s.sequence if use_cache else s.sequence.at[:, slot].set(token)
        if use_cache:
            positions = (first_position + s.step)[:, None]
            logits, cache = lm(token[:, None], live[:, None], positions_BxL=positions,
                               cache=s.cache, cache_index=slot, cache_mask_BxS=s.cache_mask)
            next_logits = logits[:, 0]
        else:
            cache = None
            logits, _ = lm(sequence, s.cache_mask,
                           positions_BxL=positions_from_mask(s.cache_mask))
            next_logits = jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)
        return s._replace(step=s.step + 1, logits=next_logits, cache=cache, sequence=sequence)

    init = _Loop(
        step=jnp.int32(0), logits=logits[:, -1], cache=cache, cache_mask=seq_mask,
        sequence=sequence, tokens=jnp.full((batch, r), cfg.pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, r), jnp.float32), done=jnp.zeros((batch,), bool))
    # Every step but the last draws and runs the policy on its token; the last token is drawn
    # after the loop, with no forward pass for logits nothing would read.
    final, _, _ = draw(jax.lax.while_loop(cond, body, init))
    mask = final.cache_mask[:, p:]
    return SampleOutput(final.tokens, final.logprobs, mask)


@program_cache.cached
def sample_program(graphdef, state_shardings_key, mesh, rules, cfg: SamplingConfig,
                   use_cache: bool, samples_per_prompt: int, name: str):
    """The jitted `sample` (`Sampler`), one per process for each distinct set of arguments."""
    rows = sharding.batch_sharding(mesh, rules, 2)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = program_cache.shardings_of(state_shardings_key)

    def whole(state, prompt, prompt_mask, key, group=None):
        return sample(nnx.merge(graphdef, state), prompt, prompt_mask, key, cfg, use_cache,
                      samples_per_prompt, group=group)

    shards, batch_axes = sharding.batch_shards(mesh, rules), sharding.batch_axes(rules)

    def own_rows(state, prompt, prompt_mask, key):  # one device's prompts of the batch
        first = jax.lax.axis_index(batch_axes) * prompt.shape[0]
        return whole(state, prompt, prompt_mask, key, group=(first, prompt.shape[0] * shards))

    if sharding.whole_on_every_cpu_device(mesh, rules, state_shardings):
        # Each device decodes its rows in a loop of its own: the mesh's program would test
        # "every row done" across the devices at each step, a rendezvous of their threads.
        rows_spec, whole_spec = sharding.rows_spec(rules), jax.sharding.PartitionSpec()
        each = sharding.per_device(own_rows, mesh, (whole_spec, rows_spec, rows_spec, whole_spec),
                                   SampleOutput(rows_spec, rows_spec, rows_spec))
    else:
        each = whole

    def run(state, prompt, prompt_mask, key):
        return each(state, prompt, prompt_mask, key)

    run.__name__ = name  # the program's name in compile logs and the AOT report
    return jax.jit(run, in_shardings=(state_shardings, rows, rows, replicated),
                   out_shardings=SampleOutput(rows, rows, rows))


@program_cache.cached
def group_sample_program(graphdef, state_shardings_key, mesh, rules, cfg: SamplingConfig,
                         use_cache: bool, samples_per_prompt: int, name: str, groups: int):
    """`sample` of one of `groups` equal blocks of a batch's prompts, which it is given whole
    with its first prompt's index (`Sampler` runs the groups side by side)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def run(state, prompt, prompt_mask, key, first):
        mine = lambda x: cpu_groups.group_rows(x, first, groups)
        return sample(nnx.merge(graphdef, state), mine(prompt), mine(prompt_mask), key, cfg,
                      use_cache, samples_per_prompt, group=(first, prompt.shape[0]))

    run.__name__ = name
    return jax.jit(run, in_shardings=(program_cache.shardings_of(state_shardings_key),
                                      replicated, replicated, replicated, replicated),
                   out_shardings=SampleOutput(replicated, replicated, replicated))


class Sampler:
    """`sample` jitted once on the training mesh, reading parameters where they already live.

    Call with the policy's current state (`nnx.state(policy)`): parameters are inputs with the
    same shardings the trainer keeps them in, so nothing is re-sharded between update and sample.
    `lm` may be abstract (`nnx.eval_shape`): only its structure and annotations are read.
    Samplers of the same model graph, mesh, rules and settings share one jitted program
    (`sample_program`), so a stage that builds another one does not trace it again. `groups`:
    blocks of prompts sampled side by side (default: `cpu_groups.default_groups`; 1: one
    call).
    """

    def __init__(self, lm, mesh, rules, cfg: SamplingConfig, use_cache: bool = True,
                 samples_per_prompt: int = 1, name: str = "sample", groups: int | None = None):
        self.mesh, self.rules, self.cfg = mesh, rules, cfg
        self.samples_per_prompt = samples_per_prompt
        graphdef, state = nnx.split(lm)
        with sharding.use(mesh, rules):
            state_sh = sharding.state_shardings(state, mesh)
        args = (graphdef, program_cache.shardings_key(state_sh), mesh,
                program_cache.rules_key(rules), cfg, use_cache, samples_per_prompt, name)
        self.jitted = sample_program(*args)  # the whole batch in one call
        self.groups = cpu_groups.default_groups(mesh, state) if groups is None else groups
        # What a call runs (for a batch the groups divide): a group's program or the whole's.
        self.program = self.jitted
        if self.groups > 1:
            self.program = group_sample_program(*args, self.groups)

    def __call__(self, state, prompt_BxP, prompt_mask_BxP, key) -> SampleOutput:
        if self.groups > 1 and prompt_BxP.shape[0] % self.groups == 0:
            return self._in_groups(state, prompt_BxP, prompt_mask_BxP, key)
        with sharding.use(self.mesh, self.rules):
            return self.jitted(state, prompt_BxP, prompt_mask_BxP, key)

    def _in_groups(self, state, prompt_BxP, prompt_mask_BxP, key) -> SampleOutput:
        """The batch as `groups` blocks of prompts sampled side by side (`cpu_groups`): the
        same tokens as one call."""
        outputs = cpu_groups.run_groups(self.program, (state, prompt_BxP, prompt_mask_BxP, key),
                                        self.groups, prompt_BxP.shape[0], prompt_BxP.shape,
                                        self.mesh, self.rules)
        return cpu_groups.merge_groups(outputs)
