"""Models: same numbers on every mesh, padding and causality invariants, preference head."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from alignment_gap import logprobs, losses, sharding
from alignment_gap.models import LanguageModel, TransformerConfig, both_order_margin
from alignment_gap.models.attention import attend, branched_layout
from alignment_gap.models.transformer import KVCache
from alignment_gap.train.state import TrainState, init_train_state, make_optimizer, make_update_step
from tests.conftest import random_prompts
from tests.helpers import language_model, mesh_and_rules, preference_model, scanned_copy

MESHES = [(2, 2, 2), (1, 4, 2), (8, 1, 1)]


def _batch(mini_config, rows=8, prompt_len=7, response_len=5, seed=0):
    rng = np.random.default_rng(seed)
    prompt, prompt_mask = random_prompts(rng, rows, prompt_len, mini_config.vocab_size)
    response = rng.integers(2, mini_config.vocab_size, (rows, response_len)).astype(np.int32)
    lengths = rng.integers(1, response_len + 1, rows)
    response_mask = np.arange(response_len)[None, :] < lengths[:, None]
    return {"prompt": prompt, "prompt_mask": prompt_mask,
            "response": np.where(response_mask, response, 0), "response_mask": response_mask}


def _loss(model, batch, extras):
    per_token, _ = logprobs.sequence_logprobs(model, batch["prompt"], batch["prompt_mask"],
                                              batch["response"], batch["response_mask"])
    return losses.next_token_loss(per_token, batch["response_mask"]), {}


def _forward_logprobs_and_two_steps(mini_config, shape, scan_layers=False, remat="none"):
    lm, mesh, rules = language_model(mini_config, shape, remat=remat)
    if scan_layers:
        lm, mesh, rules = scanned_copy(lm, mini_config, shape, remat=remat)
    batch = sharding.global_batch(_batch(mini_config), mesh, rules)
    with sharding.use(mesh, rules):
        logits, _ = jax.jit(lambda m, t, k: m(t, k))(lm, batch["prompt"], batch["prompt_mask"])
        per_token, _ = jax.jit(logprobs.sequence_logprobs)(
            lm, batch["prompt"], batch["prompt_mask"], batch["response"], batch["response_mask"])
    tx = optax.sgd(0.5)  # Linear in the gradient: Adam would amplify float noise in ~0 grads.
    graphdef, state, state_sh = init_train_state(lm, tx, mesh, rules)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)
    step = make_update_step(graphdef, tx, _loss, mesh, rules, state_sh, batch_sh)
    state, first = step(state, batch)
    state, second = step(state, batch)
    head = state.params["head"][...]
    return (np.asarray(logits), np.asarray(per_token), float(first["loss"]),
            float(first["grad_norm"]), float(second["loss"]), np.asarray(head), head.sharding)


@pytest.fixture(scope="module")
def single_device_reference():
    from configs import models
    return _forward_logprobs_and_two_steps(models.get_config("mini"), (1, 1, 1))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_same_numbers_on_every_mesh(mini_config, shape, single_device_reference):
    got = _forward_logprobs_and_two_steps(mini_config, shape)
    ref = single_device_reference
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)  # logits
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)  # response log-probs
    np.testing.assert_allclose(got[2:5], ref[2:5], rtol=1e-5)  # loss, grad norm, loss after step
    np.testing.assert_allclose(got[5], ref[5], rtol=1e-4, atol=1e-5)  # updated parameters
    # The updated parameters stay where their annotations put them (embed -> fsdp, vocab -> tensor).
    assert got[6].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


@pytest.mark.parametrize("scan_layers,remat", [(False, "full"), (True, "none"),
                                               (True, "save_dots")])
def test_scanned_layers_and_remat_give_the_same_numbers(mini_config, scan_layers, remat,
                                                        single_device_reference):
    """Stacked, scanned blocks and rematerialised activations change nothing but speed and
    memory: logits, log-probs, loss, gradient norm and the update match unrolled layers."""
    got = _forward_logprobs_and_two_steps(mini_config, (2, 2, 2), scan_layers, remat)
    ref = single_device_reference
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2:5], ref[2:5], rtol=1e-5)
    np.testing.assert_allclose(got[5], ref[5], rtol=1e-4, atol=1e-5)


def test_left_padding_does_not_change_response_logprobs(mini_config):
    lm, _, _ = language_model(mini_config)
    rng = np.random.default_rng(1)
    prompt = rng.integers(2, 512, (1, 5)).astype(np.int32)
    response = rng.integers(2, 512, (1, 4)).astype(np.int32)
    ones = np.ones((1, 4), bool)
    _, tight = logprobs.sequence_logprobs(lm, prompt, np.ones((1, 5), bool), response, ones)
    padded = np.concatenate([np.zeros((1, 3), np.int32), prompt], axis=1)
    padded_mask = np.concatenate([np.zeros((1, 3), bool), np.ones((1, 5), bool)], axis=1)
    _, loose = logprobs.sequence_logprobs(lm, padded, padded_mask, response, ones)
    np.testing.assert_allclose(loose, tight, rtol=1e-5)


def test_causal_later_tokens_do_not_change_earlier_logits(mini_config):
    lm, _, _ = language_model(mini_config)
    tokens = np.arange(2, 12, dtype=np.int32)[None]
    changed = tokens.copy()
    changed[0, 6:] = 99
    mask = np.ones_like(tokens, bool)
    a, _ = lm(tokens, mask)
    b, _ = lm(changed, mask)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.slow
def test_grouped_query_attention_and_bf16_run(mini_config):
    gqa, _, _ = language_model(mini_config, num_kv_heads=2)
    assert gqa.backbone.blocks[0].attn.k.shape == (64, 2, 16)
    tokens = np.arange(2, 10, dtype=np.int32)[None]
    mask = np.ones_like(tokens, bool)
    gqa_logits, _ = gqa(tokens, mask)
    assert np.all(np.isfinite(gqa_logits))
    f32, _, _ = language_model(mini_config)
    bf16, _, _ = language_model(mini_config, dtype="bfloat16")
    out32, _ = f32(tokens, mask)
    out16, _ = bf16(tokens, mask)
    assert out16.dtype == jnp.float32  # logits come back in float32 whatever the compute dtype
    np.testing.assert_allclose(out16, out32, atol=0.1)
    assert not np.allclose(out16, out32, atol=1e-6)  # bf16 really was used
    # ... and its logits keep float32's precision (the head's product is not rounded to bf16)
    rounded = np.asarray(jnp.asarray(out16).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(np.asarray(out16) != rounded) > 0.5


def test_bfloat16_attention_scores_keep_float32_precision():
    """Scores 20 and 20.156 (bfloat16 holds neither gap: 20.156 rounds to 20.125) must reach
    the softmax as computed: the second value's weight is sigmoid(0.156), not sigmoid(0.125)."""
    q = jnp.full((1, 1, 1), 20.0, jnp.bfloat16)
    k = jnp.asarray([[[1.0], [1.0078125]]], jnp.bfloat16)  # both exact in bfloat16
    v = jnp.asarray([[[0.0], [1.0]]], jnp.bfloat16)
    out = attend(q, k, v, jnp.ones((1, 1, 2), bool), 1, 1.0, jnp.bfloat16)
    expected = 1 / (1 + np.exp(-20.0 * 0.0078125))
    assert float(out[0, 0, 0]) == pytest.approx(expected, abs=2e-3)  # not 0.531 (rounded)


def test_preference_model_reads_both_responses_and_sign_rule_is_antisymmetric(mini_config):
    pm, mesh, rules = preference_model(mini_config, (2, 2, 2))
    b = _batch(mini_config, rows=8)
    y2 = np.roll(b["response"], 1, axis=0)
    y2_mask = np.roll(b["response_mask"], 1, axis=0)
    args = (b["prompt"], b["prompt_mask"], b["response"], b["response_mask"], y2, y2_mask)
    with sharding.use(mesh, rules):
        logits = jax.jit(lambda m, *a: m(*a))(pm, *args)
        forward = jax.jit(both_order_margin)(pm, *args)
        swapped = jax.jit(both_order_margin)(
            pm, b["prompt"], b["prompt_mask"], y2, y2_mask, b["response"], b["response_mask"])
    assert logits.shape == (8,)
    np.testing.assert_allclose(forward, -swapped, atol=1e-6)
    assert np.all(np.abs(forward) > 0)  # order matters to r itself, so the rule has work to do
    # Changing only the second response changes the score: the head sees both.
    other = np.where(y2_mask, (y2 + 7) % 500 + 2, 0)
    changed = pm(b["prompt"], b["prompt_mask"], b["response"], b["response_mask"], other, y2_mask)
    assert not np.allclose(changed, logits)


def test_sign_rule_accuracy_counts_a_tie_half_as_the_win_rates_do(mini_config):
    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.preference import sign_rule_accuracy

    pm, mesh, rules = preference_model(mini_config, (2, 2, 2))
    b = _batch(mini_config, rows=8)
    y2 = np.roll(b["response"], 1, axis=0)
    y2_mask = np.roll(b["response_mask"], 1, axis=0)
    same = PreferenceBatch(b["prompt"], b["prompt_mask"], b["response"], b["response_mask"],
                           b["response"], b["response_mask"])
    apart = PreferenceBatch(b["prompt"], b["prompt_mask"], b["response"], b["response_mask"],
                            y2, y2_mask)
    with sharding.use(mesh, rules):
        tied = float(jax.jit(sign_rule_accuracy)(pm, same))
        either = [float(jax.jit(sign_rule_accuracy)(pm, x)) for x in (apart, PreferenceBatch(
            apart.prompt, apart.prompt_mask, y2, y2_mask, b["response"], b["response_mask"]))]
    assert tied == 0.5  # every pair a tie: neither response preferred
    assert sum(either) == pytest.approx(1.0)  # no ties: a swap turns each right into wrong


def test_two_equal_responses_are_a_tie_whatever_the_orders_round_to():
    class OrdersRoundApart:  # both orders of each pair, apart in the last bits
        def both_orders(self, *args):
            return jnp.full(4, 0.5), jnp.full(4, 0.5 - 2**-20)

    y1 = np.array([[5, 6, 1, 0], [5, 6, 1, 0], [5, 6, 1, 0], [5, 6, 7, 1]])
    y2 = np.array([[5, 6, 1, 9], [5, 6, 7, 1], [5, 6, 1, 0], [5, 6, 7, 1]])  # 9: padding
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    mask2 = mask.copy()
    mask2[1] = True
    mask2[2, 2] = False  # same ids, one ends a token earlier
    margin = both_order_margin(OrdersRoundApart(), None, None, y1, mask, y2, mask2)
    np.testing.assert_array_equal(margin, [0.0, 2**-20, 2**-20, 0.0])


def test_parameters_carry_logical_axes(mini_config):
    lm, mesh, rules = language_model(mini_config, (1, 4, 2))
    specs = nnx.get_partition_spec(nnx.state(lm))
    with sharding.use(mesh, rules):
        names = jax.tree.leaves(
            jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), nnx.state(lm),
                         is_leaf=lambda v: isinstance(v, nnx.Variable)),
            is_leaf=lambda x: isinstance(x, tuple))
    assert all(isinstance(n, tuple) and n for n in names)  # every parameter is annotated
    q = lm.backbone.blocks[0].attn.q
    assert q[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    logical = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v
    P = jax.sharding.PartitionSpec
    assert logical(specs["backbone"]["embed"]) == P("vocab", "embed")
    assert logical(specs["head"]) == P("embed", "vocab")
    assert logical(specs["backbone"]["blocks"][0]["mlp"]["down"]) == P("mlp", "embed")


def test_every_seed_runs_one_initialiser_that_gives_a_constant_seeds_parameters(mini_config):
    """The seed is the initialiser's argument, so models that differ only in seed share one
    compiled program; their parameters are those of a program with the seed built in, bit for
    bit (the runs of committed studies start from the same weights as before)."""
    cfg = TransformerConfig.from_config(mini_config)
    models = [language_model(mini_config, (2, 2, 2), seed=seed)[0] for seed in (0, 1)]
    mesh, rules = mesh_and_rules((2, 2, 2))
    init, _ = sharding.init_program(LanguageModel, cfg, mesh, rules)
    assert init._cache_size() == 1
    with sharding.use(mesh, rules):
        constant = jax.jit(lambda: nnx.state(LanguageModel(cfg, nnx.Rngs(1))))()
    leaves = lambda tree: jax.tree.leaves(jax.device_get(tree))
    for got, want in zip(leaves(nnx.state(models[1])), leaves(constant), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(models[0].head[...], models[1].head[...])


def test_logits_window_is_the_same_rows_of_the_full_logits(mini_config):
    lm, _, _ = language_model(mini_config)
    tokens, mask = random_prompts(np.random.default_rng(2), 4, 10, 512)
    full, _ = lm(tokens, mask)
    window, _ = lm(tokens, mask, logits_window=(3, 7))
    assert window.shape == (4, 4, full.shape[-1])
    np.testing.assert_allclose(window, full[:, 3:7], atol=1e-5)
    for outside in ((-2, -1), (7, 11), (5, 5)):  # a negative start read no key, silently
        with pytest.raises(ValueError, match=rf"logits_window \({outside[0]}, {outside[1]}\) "
                                             "is not within the 10 positions given"):
            lm(tokens, mask, logits_window=outside)


def _two_responses(mini_config):
    """A batch with ragged prompts, an empty one (all padding: an empty text from a tokenizer
    that adds no BOS), a short, a one-token and an empty response among them."""
    b = _batch(mini_config, rows=6, prompt_len=9, response_len=6, seed=3)
    b["prompt"][0], b["prompt_mask"][0] = 0, False
    y2 = np.roll(b["response"], 2, axis=0)
    y2_mask = np.roll(b["response_mask"], 2, axis=0)
    y2_mask[1, 1:] = False
    y2_mask[4] = False  # an empty second response
    b["response_mask"][5] = False  # and a row where both are empty
    y2_mask[5] = False
    return (b["prompt"], b["prompt_mask"], np.where(b["response_mask"], b["response"], 0),
            b["response_mask"], np.where(y2_mask, y2, 0), y2_mask)


@pytest.mark.parametrize("shape,overrides", [
    ((1, 1, 1), {}), ((2, 2, 2), {}),
    # two query heads per key head; local and global layers, the local window inside a response
    ((1, 1, 1), {"num_kv_heads": 2}), ((1, 1, 1), {"sliding_window": 4, "global_every": 2}),
    ((2, 2, 2), {"num_kv_heads": 2, "scan_layers": True, "num_layers": 3, "remat": "full"})])
def test_one_pass_over_prompt_and_both_responses_equals_two_passes(mini_config, shape,
                                                                   overrides):
    lm, mesh, rules = language_model(mini_config, shape, **overrides)
    prompt, prompt_mask, y1, y1_mask, y2, y2_mask = _two_responses(mini_config)
    # `[2, batch, R, vocab]`, pair axis first; rows joined here as the separate passes give them.
    pair = jax.jit(lambda *a: jnp.concatenate(logprobs.pair_response_logits(*a)))
    with sharding.use(mesh, rules):
        shared = pair(lm, prompt, prompt_mask, y1, y1_mask, y2, y2_mask)
        separate = jax.jit(lambda m: jnp.concatenate([
            logprobs.response_logits(m, prompt, prompt_mask, y1, y1_mask),
            logprobs.response_logits(m, prompt, prompt_mask, y2, y2_mask)]))(lm)
    valid = np.concatenate([y1_mask, y2_mask])
    assert shared.shape == separate.shape == (12, 6, mini_config.vocab_size)
    np.testing.assert_allclose(np.asarray(shared)[valid], np.asarray(separate)[valid], atol=2e-5)
    # The second response never reads the first: changing the first leaves it unchanged.
    other = pair(lm, prompt, prompt_mask, (y1 + 5) % 500 + 2, y1_mask, y2, y2_mask)
    np.testing.assert_allclose(np.asarray(other)[6:][y2_mask], np.asarray(shared)[6:][y2_mask],
                               atol=2e-5)
    assert not np.allclose(np.asarray(other)[:6][y1_mask], np.asarray(shared)[:6][y1_mask])
    if shape == (1, 1, 1) and not lm.cfg.scan_layers:  # one device's count; a scan's body once
        # Attention by branch: no scores of the prompt against the responses or between them.
        p, r, c = prompt.shape[1], y1.shape[1], lm.cfg
        tokens = np.concatenate([prompt, y1, y2], axis=1)
        mask = np.concatenate([prompt_mask, y1_mask, y2_mask], axis=1)
        with sharding.use(mesh, rules):
            dense = jax.jit(lambda m: m(tokens, mask, logits_window=(p - 1, p + 2 * r - 1))[0])
            branched = jax.jit(logprobs.pair_response_logits)
            flops = [f.lower(*a).compile().cost_analysis()["flops"] for f, a in (
                (dense, (lm,)), (branched, (lm, prompt, prompt_mask, y1, y1_mask, y2, y2_mask)))]
        skipped = (p + 2 * r) ** 2 - p * p - 2 * r * (p + r)  # scores per head, layer and row
        per_score = 2 * 2 * c.head_dim * c.num_heads * prompt.shape[0]  # q.k and p.v, every row
        assert flops[0] - flops[1] > 0.8 * skipped * per_score * (c.num_layers - 1)


def test_an_empty_prompt_reads_no_later_slot(mini_config):
    """A query with no visible key (the last slot of an all-padding prompt, whose output
    predicts the first response token) attends to nothing: its logits do not depend on the
    response it predicts. A softmax over masked scores alone spread it over every slot."""
    lm, mesh, rules = language_model(mini_config, (1, 1, 1))
    prompt, prompt_mask, y1, y1_mask, _, _ = _two_responses(mini_config)
    later = y1.copy()
    later[:, 1:] = (later[:, 1:] + 5) % 500 + 2
    with sharding.use(mesh, rules):
        first = jax.jit(lambda m, y: logprobs.response_logits(m, prompt, prompt_mask, y,
                                                              y1_mask)[:, 0])
        np.testing.assert_array_equal(np.asarray(first(lm, y1)), np.asarray(first(lm, later)))


@pytest.mark.parametrize("overrides", [
    {}, {"num_kv_heads": 2, "sliding_window": 3, "global_every": 2, "num_layers": 3},
    {"num_kv_heads": 2, "sliding_window": 3, "global_every": 2, "num_layers": 3,
     "scan_layers": True, "remat": "full"}])
def test_preference_model_scores_both_orders_in_one_pass(mini_config, overrides):
    pm, mesh, rules = preference_model(mini_config, (2, 2, 2), **overrides)
    args = _two_responses(mini_config)
    prompt, prompt_mask, y1, y1_mask, y2, y2_mask = args
    with sharding.use(mesh, rules):
        forward, backward = jax.jit(lambda m, *a: m.both_orders(*a))(pm, *args)
        one = jax.jit(lambda m, *a: m(*a))
        np.testing.assert_allclose(forward, one(pm, *args), atol=1e-5)
        np.testing.assert_allclose(backward, one(pm, prompt, prompt_mask, y2, y2_mask, y1,
                                                 y1_mask), atol=1e-5)
    assert not np.allclose(forward[:5], backward[:5])  # the orders really differ
    assert forward[5] == pytest.approx(float(backward[5]), abs=1e-6)  # both empty: one input
    # Responses padded to two lengths: the orders' segments and read slots would be wrong.
    with pytest.raises(ValueError, match="the responses are padded to 6 and 4 tokens"):
        pm.both_orders(prompt, prompt_mask, y1, y1_mask, y2[:, :4], y2_mask[:, :4])


@pytest.mark.parametrize("overrides", [
    {}, {"scan_layers": True}, {"scan_layers": True, "num_layers": 3, "remat": "full"},
    {"scan_layers": True, "num_layers": 1},
    # local and global layers mixed: the scanned layers' kinds travel as flags
    {"sliding_window": 4, "global_every": 2}, {"scan_layers": True, "sliding_window": 4,
                                                "global_every": 2, "num_layers": 4}])
def test_last_block_read_at_some_slots_equals_those_slots_of_the_full_pass(mini_config,
                                                                           overrides):
    lm, mesh, rules = language_model(mini_config, **overrides)
    prompt, prompt_mask, y1, y1_mask, y2, y2_mask = _two_responses(mini_config)
    tokens = np.concatenate([prompt, y1, y2], axis=1)
    mask = np.concatenate([prompt_mask, y1_mask, y2_mask], axis=1).astype(bool)
    positions, branches = branched_layout(prompt_mask, y1_mask, y2_mask)
    # A prompt slot, a slot of each branch and a padded one: any slots, any order.
    read_at = np.array([[3, 10, 18, 20]] * 6, np.int32)
    read_at[1] = [20, 0, 14, 9]
    with sharding.use(mesh, rules):
        run = jax.jit(lambda m, at: m.backbone(tokens, positions, mask, branches=branches,
                                               read_at_BxQ=at)[0])
        full, part = run(lm, None), run(lm, read_at)
        window = jax.jit(lambda m: m.backbone(tokens, positions, mask, branches=branches,
                                              read_at_BxQ=(8, 17))[0])(lm)  # a static window
    assert part.shape == (6, 4, mini_config.width) and window.shape == (6, 9, mini_config.width)
    # Per-row slots run masked dense attention, the full pass attends branch by branch: equal
    # at every slot, a prompt's pads (which see no key, so read nothing) included.
    np.testing.assert_allclose(np.asarray(part), np.take_along_axis(
        np.asarray(full), read_at[..., None], 1), atol=2e-5)
    np.testing.assert_allclose(window, np.asarray(full)[:, 8:17], atol=2e-5)


@pytest.mark.parametrize("overrides", [
    {}, {"scan_layers": True}, {"scan_layers": True, "num_layers": 1},
    {"sliding_window": 4, "global_every": 2}, {"scan_layers": True, "sliding_window": 4,
                                                "global_every": 2, "num_layers": 4}])
def test_a_prefill_read_at_its_last_slots_fills_the_same_cache_with_less_work(mini_config,
                                                                             overrides):
    """A sampler's prefill reads logits at the prompt's last slot only: the last block then
    runs its queries and MLP there alone, yet every layer's keys and values fill the cache."""
    lm, mesh, rules = language_model(mini_config, num_kv_heads=2, **overrides)
    prompt, prompt_mask = random_prompts(np.random.default_rng(4), 6, 9, mini_config.vocab_size)
    p, slots = prompt.shape[1], prompt.shape[1] + 3
    cache_mask = np.concatenate([prompt_mask, np.zeros((6, 3), bool)], axis=1)

    def prefill(m, window):
        cache = KVCache.zeros(m.cfg, 6, slots)
        return m(prompt, prompt_mask, cache=cache, cache_index=0, cache_mask_BxS=cache_mask,
                 logits_window=window)

    with sharding.use(mesh, rules):
        run = {w: jax.jit(prefill, static_argnums=1) for w in ((p - 2, p), None)}
        (part, part_cache), (full, full_cache) = (run[w](lm, w) for w in run)
        flops = {w: run[w].lower(lm, w).compile().cost_analysis()["flops"] for w in run}
    np.testing.assert_allclose(part, np.asarray(full)[:, p - 2:], atol=2e-5)
    for a, b in zip(jax.tree.leaves(part_cache), jax.tree.leaves(full_cache), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    c = lm.cfg
    if not c.scan_layers:  # XLA counts a scan's body once, whatever its trip count
        # the last block's MLP over p - 2 fewer slots, at the least
        assert flops[None] - flops[(p - 2, p)] > 2 * 3 * c.width * c.mlp_dim * 6 * (p - 2)


def test_a_data_parallel_update_keeps_every_row_on_its_device(mini_config):
    """Chosen and rejected log-probs are computed where their rows live: on a data-parallel mesh
    the compiled update's only collectives are the gradient and metric all-reduces (joined
    along the sharded batch axis, chosen and rejected took all-to-alls and permutes)."""
    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.policy import make_policy_loss

    lm, mesh, rules = language_model(mini_config, (2, 1, 1))
    reference, _, _ = language_model(mini_config, (2, 1, 1), seed=1)
    ref_graphdef, ref_params = nnx.split(reference)
    tx = optax.adam(1e-3)
    graphdef, state, state_sh = init_train_state(lm, tx, mesh, rules)
    batch = sharding.global_batch(PreferenceBatch(*_two_responses(mini_config)), mesh, rules)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
        step = make_update_step(graphdef, tx, make_policy_loss("ipo", 0.1, 1, ref_graphdef), mesh,
                                rules, state_sh, jax.tree.map(lambda x: x.sharding, batch),
                                {"reference": ref_sh})
        text = step.jitted.lower(state, batch, {"reference": ref_params}, None).compile().as_text()
    ops = re.findall(r"= [^=]*? (all-to-all|collective-permute|all-gather|all-reduce)\(", text)
    assert ops and set(ops) == {"all-reduce"}, sorted(set(ops))


@pytest.mark.slow
def test_microbatched_update_equals_the_full_batch_update(mini_config, shape=(2, 2, 2)):
    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.policy import make_policy_loss

    prompt, prompt_mask, y1, y1_mask, y2, y2_mask = _two_responses(mini_config)
    rows = slice(0, 4)  # both-empty rows have no tokens to learn from; keep 4 ragged ones
    batch = PreferenceBatch(*(np.tile(a[rows], (4, 1)) for a in (prompt, prompt_mask, y1,
                                                                  y1_mask, y2, y2_mask)))
    results = []
    # 4 slices of 4 rows: each still spread over the mesh's 4 batch shards. Rematerialised
    # blocks (in the policy and in the frozen reference) must change nothing either.
    for k, remat in ((1, "none"), (4, "none"), (4, "full")):
        lm, mesh, rules = language_model(mini_config, shape, remat=remat)
        reference, _, _ = language_model(mini_config, shape, seed=1, remat=remat)
        ref_graphdef, ref_params = nnx.split(reference)
        tx = optax.adam(1e-2)
        graphdef, state, state_sh = init_train_state(lm, tx, mesh, rules)
        global_batch = sharding.global_batch(batch, mesh, rules)
        batch_sh = jax.tree.map(lambda x: x.sharding, global_batch)
        with sharding.use(mesh, rules):
            ref_sh = sharding.state_shardings(ref_params, mesh)
        step = make_update_step(graphdef, tx, make_policy_loss("ipo", 0.1, 1, ref_graphdef), mesh,
                                rules, state_sh, batch_sh, {"reference": ref_sh}, microbatches=k)
        state, metrics = step(state, global_batch, {"reference": ref_params})
        state, second = step(state, global_batch, {"reference": ref_params})
        results.append((jax.device_get(metrics), float(second["loss"]),
                        np.asarray(state.params["head"][...])))
    _assert_same_two_steps(results, head_atol=1e-6)


def _assert_same_two_steps(results, head_atol: float):
    """Each of `results[1:]` ((first step's metrics, second step's loss, updated head)) is
    `results[0]`'s, whose first step changed the loss."""
    full, *others = results
    for metrics, second_loss, head in others:
        for name in ("loss", "grad_norm", "h", "tokens", "classifier_accuracy"):
            assert metrics[name] == pytest.approx(full[0][name], rel=1e-5, abs=1e-6), name
        assert second_loss == pytest.approx(full[1], rel=1e-5)
        np.testing.assert_allclose(head, full[2], atol=head_atol)
    assert full[1] != pytest.approx(full[0]["loss"], rel=1e-3)


def _ragged_pairs(mini_config):
    from alignment_gap.batches import PreferenceBatch

    b = _batch(mini_config, rows=8, seed=5)  # ragged prompts and responses
    return PreferenceBatch(b["prompt"], b["prompt_mask"], b["response"], b["response_mask"],
                           np.roll(b["response"], 3, 0), np.roll(b["response_mask"], 3, 0))


def _policy_update(mini_config, shape, microbatches, row_mean_loss):
    """(update step, train state, reference params, mesh, rules): an IPO update with SGD,
    linear in the gradient (Adam would amplify float noise)."""
    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.policy import make_policy_loss

    lm, mesh, rules = language_model(mini_config, shape)
    reference, _, _ = language_model(mini_config, shape, seed=1)
    ref_graphdef, ref_params = nnx.split(reference)
    tx = optax.sgd(0.1)
    graphdef, state, state_sh = init_train_state(lm, tx, mesh, rules)
    rows_sh = PreferenceBatch(*[sharding.batch_sharding(mesh, rules, 2)] * 6)
    with sharding.use(mesh, rules):
        ref_sh = sharding.state_shardings(ref_params, mesh)
    step = make_update_step(graphdef, tx, make_policy_loss("ipo", 0.1, 1, ref_graphdef), mesh,
                            rules, state_sh, rows_sh, {"reference": ref_sh},
                            microbatches=microbatches, row_mean_loss=row_mean_loss)
    return step, state, ref_params, mesh, rules


def test_a_one_device_update_of_a_row_mean_loss_runs_in_side_by_side_groups(mini_config):
    """On a one-device CPU mesh the policy's update (a mean over pairs) computes the gradient
    of two groups of rows from two threads (in slices too), then applies their mean: the same
    step as one call, within float rounding. With a PRNG key among the extras (which both
    groups would draw alike) it runs as one call."""
    batch = _ragged_pairs(mini_config)
    results = []
    for grouped, k in ((False, 1), (True, 1), (True, 2)):
        step, state, ref_params, _, _ = _policy_update(mini_config, (1, 1, 1), k, grouped)
        state, metrics = step(state, batch, {"reference": ref_params})
        state, second = step(state, batch, {"reference": ref_params})
        assert (step.grouped is not None) == grouped
        if grouped:  # the groups' programs ran, the whole batch's did not
            assert step.grouped.group._cache_size() == 1 and step.jitted._cache_size() == 0
            assert not step.grouped.takes(state.params, batch, {"key": jax.random.key(0)})
        results.append((jax.device_get(metrics), float(second["loss"]),
                        np.asarray(state.params["head"][...])))
    _assert_same_two_steps(results, head_atol=1e-5)  # the groups sum over other rows


def test_a_row_mean_update_on_data_parallel_cpu_devices_all_reduces_once(mini_config):
    """On CPU devices that hold the parameters whole, the policy's update computes each
    device's gradient (its slices summed locally) and averages the devices' with one
    all-reduce (the mesh's program all-reduced every slice's gradient and metrics): the same
    two steps as one device's, within float rounding."""
    batch = _ragged_pairs(mini_config)
    results = []
    for shape, k in (((1, 1, 1), 1), ((2, 1, 1), 1), ((2, 1, 1), 2), ((4, 1, 1), 2)):
        step, state, ref_params, mesh, rules = _policy_update(mini_config, shape, k, True)
        global_batch = sharding.global_batch(batch, mesh, rules)
        extras = {"reference": ref_params}
        if shape[0] > 1:
            with sharding.use(mesh, rules):
                text = step.jitted.lower(state, global_batch, extras, None).compile().as_text()
            assert len(re.findall(r" all-reduce(?:-start)?\(", text)) == 1, (shape, k)
        state, metrics = step(state, global_batch, extras)
        state, second = step(state, global_batch, extras)
        results.append((jax.device_get(metrics), float(second["loss"]),
                        np.asarray(state.params["head"][...])))
    _assert_same_two_steps(results, head_atol=1e-5)


def test_policy_runs_that_differ_in_learning_rate_and_beta_share_one_program(mini_config):
    """The policy trainer's update takes its learning rate and beta as inputs: a second run
    with other values gets the first run's programs (traced and compiled once), and each run's
    steps are those of the update with its values built in as constants."""
    from ml_collections import ConfigDict

    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.policy import make_policy_loss, make_policy_update
    from alignment_gap.train.state import make_optimizer

    b = _batch(mini_config, rows=8, seed=6)
    batch = PreferenceBatch(b["prompt"], b["prompt_mask"], b["response"], b["response_mask"],
                            np.roll(b["response"], 3, 0), np.roll(b["response_mask"], 3, 0))
    programs, heads = [], []
    for lr, beta in ((1e-3, 0.1), (3e-3, 0.5)):
        config = ConfigDict(dict(learning_rate=lr, beta=beta, loss="ipo", microbatches=1,
                                 warmup_steps=1, num_steps=10, weight_decay=0.01,
                                 grad_clip=1.0))
        results = []
        for as_inputs in (True, False):
            lm, mesh, rules = language_model(mini_config)
            reference, _, _ = language_model(mini_config, seed=1)
            ref_graphdef, ref_params = nnx.split(reference)
            graphdef, state, state_sh = init_train_state(lm, make_optimizer(config), mesh, rules)
            rows_sh = PreferenceBatch(*[sharding.batch_sharding(mesh, rules, 2)] * 6)
            with sharding.use(mesh, rules):
                ref_sh = sharding.state_shardings(ref_params, mesh)
            if as_inputs:
                step = make_policy_update(config, graphdef, ref_graphdef, 1, mesh, rules,
                                          state_sh, rows_sh, ref_sh)
                programs.append((step.jitted, step.grouped))
            else:
                step = make_update_step(graphdef, make_optimizer(config),
                                        make_policy_loss("ipo", beta, 1, ref_graphdef), mesh,
                                        rules, state_sh, rows_sh, {"reference": ref_sh},
                                        row_mean_loss=True)
            extras = {"reference": ref_params}
            state, _ = step(state, batch, extras)  # a learning rate of 0 (warm-up)
            state, metrics = step(state, batch, extras)
            state, second = step(state, batch, extras)
            results.append((jax.device_get(metrics), float(second["loss"]),
                            np.asarray(state.params["head"][...])))
        _assert_same_two_steps(results, head_atol=1e-6)
        heads.append(results[0][2])
    assert programs[0][0] is programs[1][0] and programs[0][1] is programs[1][1]
    assert not np.allclose(heads[0], heads[1], atol=1e-6)  # the settings were used


def test_weight_decay_shrinks_weights_but_not_norm_scales_or_biases(mini_config):
    lm, _, _ = language_model(mini_config, qkv_bias=True)
    params = nnx.state(lm, nnx.Param)
    c = ml_collections.ConfigDict({"learning_rate": 0.1, "warmup_steps": 0, "num_steps": 10,
                                   "end_lr_fraction": 1.0, "weight_decay": 0.5})
    tx = make_optimizer(c)
    bias = params["backbone"]["blocks"][0]["attn"]["q_bias"]
    bias[...] = jnp.ones_like(bias[...])  # initialised at 0, which decay would not move
    zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: decay alone moves them
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = optax.apply_updates(params, updates)
    block = lambda state: state["backbone"]["blocks"][0]
    np.testing.assert_allclose(moved["head"][...], 0.95 * params["head"][...], rtol=1e-6)
    np.testing.assert_allclose(block(moved)["mlp"]["up"][...],
                               0.95 * block(params)["mlp"]["up"][...], rtol=1e-6)
    for kept in (lambda s: s["backbone"]["final_norm"]["scale"],
                 lambda s: block(s)["attn_norm"]["scale"], lambda s: block(s)["attn"]["q_bias"]):
        np.testing.assert_array_equal(kept(moved)[...], kept(params)[...])


def test_the_optimizer_state_keeps_adamws_tree_so_older_checkpoints_restore(mini_config):
    lm, _, _ = language_model(mini_config)
    params = nnx.state(lm, nnx.Param)
    for decay in (0.0, 0.1):
        c = ml_collections.ConfigDict({"learning_rate": 0.1, "warmup_steps": 0, "num_steps": 10,
                                       "end_lr_fraction": 1.0, "weight_decay": decay,
                                       "grad_clip": 1.0})
        before = optax.chain(optax.clip_by_global_norm(1.0),
                             optax.adamw(optax.constant_schedule(0.1), b1=0.9, b2=0.95,
                                         weight_decay=decay))
        assert jax.tree.structure(make_optimizer(c).init(params)) == \
            jax.tree.structure(before.init(params))


def test_a_policy_steps_kl_per_token_is_the_whole_batchs_however_it_is_sliced(mini_config):
    """kl_per_token divides the batch's summed KL by its tokens once (it averaged the slices'
    ratios: 1.0071 on one slice, 1.0026 on four, in the review's case)."""
    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.policy import make_policy_loss
    from alignment_gap.train.state import update_fn

    policy, _, _ = language_model(mini_config, seed=0)
    reference, _, _ = language_model(mini_config, seed=1)
    graphdef, params = nnx.split(policy)
    ref_graphdef, ref_params = nnx.split(reference)
    batch = PreferenceBatch(*_two_responses(mini_config))  # ragged: slices' token counts differ
    tx = optax.sgd(0.0)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    loss_fn = make_policy_loss("ipo", 0.1, 1, ref_graphdef)
    kl = {k: float(jax.jit(update_fn(graphdef, tx, loss_fn, k))(
        state, batch, {"reference": ref_params})[1]["kl_per_token"]) for k in (1, 2, 3)}
    assert kl[2] == pytest.approx(kl[1], rel=1e-5) and kl[3] == pytest.approx(kl[1], rel=1e-5)


def test_the_policy_update_counts_pairs_of_two_equal_responses(mini_config):
    """An online policy can draw the same response twice: such a pair has margin 0 and no
    gradient under IPO, DPO or SLiC. The update reports their share."""
    from alignment_gap.batches import PreferenceBatch

    batch = _ragged_pairs(mini_config)
    rejected, rejected_mask = np.array(batch.rejected), np.array(batch.rejected_mask)
    rejected[:2], rejected_mask[:2] = batch.chosen[:2], batch.chosen_mask[:2]
    batch = PreferenceBatch(batch.prompt, batch.prompt_mask, batch.chosen, batch.chosen_mask,
                            rejected, rejected_mask)
    step, state, ref_params, _, _ = _policy_update(mini_config, (1, 1, 1), 1, False)
    _, metrics = step(state, batch, {"reference": ref_params})
    assert float(metrics["identical_pairs"]) == 2 / 8


def test_eos_rate_counts_a_response_ended_by_any_stop_id(mini_config):
    """A chat tokenizer ends a turn at an id besides EOS (`tokenizer.stop_ids`): the sampler
    stops there, and the metric counts it as ended."""
    from alignment_gap.batches import PreferenceBatch
    from alignment_gap.train.policy import make_policy_loss

    policy, _, _ = language_model(mini_config, seed=0)
    ref_graphdef, ref_params = nnx.split(language_model(mini_config, seed=1)[0])
    prompt = jnp.full((2, 4), 5, jnp.int32)
    chosen = jnp.array([[9, 9, 7, 0], [9, 1, 0, 0]], jnp.int32)  # end turn (7), EOS (1)
    rejected = jnp.array([[9, 9, 9, 9], [9, 7, 0, 0]], jnp.int32)  # cut at the length, 7
    batch = PreferenceBatch(prompt, prompt > 0, chosen, chosen > 0, rejected, rejected > 0)
    rate = lambda stop_ids: float(make_policy_loss("ipo", 0.1, stop_ids, ref_graphdef)(
        policy, batch, {"reference": ref_params})[1]["eos_rate"])
    assert rate((1, 7)) == 3 / 4 and rate(1) == 1 / 4
