"""The KV-cache sampler against naive full-recompute decoding, its options, and on a mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment_gap import cpu_groups, logprobs, sampling, sharding
from alignment_gap.batches import PreferenceBatch, PromptBatch
from alignment_gap.evaluation import Evaluator, eval_programs
from alignment_gap.models import LanguageModel, TransformerConfig
from alignment_gap.sampling import Sampler, SamplingConfig, choose_tokens
from configs import models
from tests.conftest import random_prompts
from tests.helpers import language_model, preference_model, sample_unsharded, scanned_copy


def _prompts(batch=8, length=6, seed=0):
    return random_prompts(np.random.default_rng(seed), batch, length, 512)


def _sample(lm, cfg, use_cache, prompts, seed=0):
    graphdef, state = nnx.split(lm)
    return sample_unsharded(graphdef, state, *prompts, jax.random.key(seed), cfg, use_cache)


@pytest.mark.parametrize("cfg", [
    SamplingConfig(max_new_tokens=7, temperature=0.0, eos_id=-1),
    SamplingConfig(max_new_tokens=7, temperature=1.0, eos_id=-1),
    SamplingConfig(max_new_tokens=7, temperature=0.7, top_k=20, top_p=0.9, eos_id=-1),
], ids=["greedy", "sample", "topk_topp"])
def test_cache_matches_full_recompute(mini_config, cfg):
    lm, _, _ = language_model(mini_config, num_kv_heads=2)  # grouped-query cache too
    prompts = _prompts()
    cached = _sample(lm, cfg, True, prompts)
    naive = _sample(lm, cfg, False, prompts)
    np.testing.assert_array_equal(cached.tokens, naive.tokens)
    np.testing.assert_array_equal(cached.mask, naive.mask)
    np.testing.assert_allclose(cached.logprobs, naive.logprobs, atol=2e-5)
    assert cached.mask.all()  # eos_id=-1 never fires: every slot is sampled


def test_noise_drawn_before_the_loop_is_what_each_step_would_draw(mini_config):
    lm, _, _ = language_model(mini_config)
    prompts = _prompts()
    cfg = SamplingConfig(max_new_tokens=7, temperature=0.8, top_k=40, eos_id=-1)
    assert 7 * 8 * mini_config.vocab_size * 4 <= sampling.PREDRAW_NOISE_BYTES  # drawn first
    drawn_first, per_step = (sampling.sample(lm, *prompts, jax.random.key(3), cfg,
                                             predraw_noise_bytes=budget)
                             for budget in (sampling.PREDRAW_NOISE_BYTES, 0))
    np.testing.assert_array_equal(drawn_first.tokens, per_step.tokens)
    np.testing.assert_allclose(drawn_first.logprobs, per_step.logprobs, atol=1e-6)


@pytest.mark.parametrize("samples_per_prompt,cfg", [
    (2, SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=-1)),
    (1, SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=40, eos_id=-1)),
    (1, SamplingConfig(max_new_tokens=6, temperature=0.0, eos_id=-1)),
], ids=["two_per_prompt", "topk", "greedy"])
def test_a_batch_sampled_in_side_by_side_groups_gets_the_whole_batchs_tokens(
        mini_config, samples_per_prompt, cfg):
    """On a one-device CPU mesh a `Sampler` runs its batch as two groups of prompts from two
    threads: each group draws the noise the whole batch's rows would, so the tokens are the
    whole batch's (log-probs up to rounding: matmuls over fewer rows)."""
    lm, mesh, rules = language_model(mini_config)
    prompt, mask = _prompts()
    mask[:3, :2] = False  # some left padding
    whole = Sampler(lm, mesh, rules, cfg, samples_per_prompt, groups=1)
    grouped = Sampler(lm, mesh, rules, cfg, samples_per_prompt)
    assert grouped.groups == cpu_groups.CPU_GROUPS == 2 and grouped.program is not whole.program
    larger = nnx.eval_shape(lambda: LanguageModel(TransformerConfig.from_config(
        models.get_config("60m")), nnx.Rngs(0)))  # its decode keeps both cores busy already
    assert cpu_groups.default_groups(mesh, nnx.state(larger)) == 1
    a, b = (s(nnx.state(lm), prompt, mask, jax.random.key(5)) for s in (whole, grouped))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert len(set(np.asarray(b.tokens)[:, 0].tolist())) > 1 or cfg.temperature == 0.0
    if samples_per_prompt == 1 and cfg.temperature:  # noise drawn step by step, groups too
        per_step = [sampling.sample(lm, prompt[i:i + 4], mask[i:i + 4], jax.random.key(5), cfg,
                                    predraw_noise_bytes=0, group=(i, 8)) for i in (0, 4)]
        np.testing.assert_array_equal(np.concatenate([o.tokens for o in per_step]), a.tokens)


def test_returned_logprobs_are_the_policys(mini_config):
    lm, _, _ = language_model(mini_config)
    prompts = _prompts()
    out = _sample(lm, SamplingConfig(max_new_tokens=6, temperature=0.5, eos_id=-1), True, prompts)
    per_token, _ = logprobs.sequence_logprobs(lm, *prompts, out.tokens, out.mask)
    np.testing.assert_allclose(out.logprobs, per_token, atol=2e-5)


def test_eos_stops_a_row_and_pads_the_rest(mini_config):
    lm, _, _ = language_model(mini_config)
    prompts = _prompts()
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0, eos_id=-1)
    first = np.asarray(_sample(lm, greedy, True, prompts).tokens)
    eos = int(first[0, 0])  # Row 0's first greedy token becomes the EOS id.
    out = _sample(lm, dataclasses.replace(greedy, eos_id=eos, pad_id=0), True, prompts)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    assert tokens[0, 0] == eos and mask[0].tolist() == [True, False, False, False, False]
    assert (tokens[0, 1:] == 0).all() and (np.asarray(out.logprobs)[0, 1:] == 0).all()
    for row in range(len(tokens)):  # Every row: valid up to and including its first EOS.
        hits = np.flatnonzero(tokens[row] == eos)
        valid = hits[0] + 1 if hits.size else 5
        assert mask[row].tolist() == [True] * valid + [False] * (5 - valid)


def test_a_tokenizers_other_stop_ids_end_a_response_as_eos_does(mini_config):
    """A chat model's end-of-turn marker ends the sampled response where `decode` cuts it."""
    from types import SimpleNamespace

    import ml_collections

    from alignment_gap.train.policy import sampling_config

    lm, _, _ = language_model(mini_config)
    prompts = _prompts()
    greedy = SamplingConfig(max_new_tokens=5, temperature=0.0, eos_id=-1)
    end_of_turn = int(np.asarray(_sample(lm, greedy, True, prompts).tokens)[0, 0])
    tokenizer = SimpleNamespace(eos_id=1, pad_id=0, stop_ids=(1, end_of_turn))
    config = ml_collections.ConfigDict({"sampling": {"temperature": 0.0, "top_k": 0,
                                                     "top_p": 1.0},
                                        "data": {"response_len": 5}})
    cfg = sampling_config(config, tokenizer)
    assert cfg.stop_ids == (end_of_turn,)
    out = _sample(lm, cfg, True, prompts)
    assert np.asarray(out.mask)[0].tolist() == [True, False, False, False, False]
    assert (np.asarray(out.tokens)[0, 1:] == 0).all()


def test_top_k_and_top_p_restrict_the_draw():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000, np.float32))
    keys = jax.random.key(0)
    top2 = choose_tokens(logits, keys, SamplingConfig(max_new_tokens=1, top_k=2))
    assert set(np.unique(top2)) == {0, 1}
    nucleus = choose_tokens(logits, keys, SamplingConfig(max_new_tokens=1, top_p=0.85))
    assert set(np.unique(nucleus)) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 needs the third token
    free = choose_tokens(logits, keys, SamplingConfig(max_new_tokens=1))
    assert set(np.unique(free)) == {0, 1, 2, 3}
    counts = np.bincount(np.asarray(free), minlength=4) / len(free)
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_sharded_sampler_matches_one_device(mini_config):
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=-1)
    prompts = _prompts()
    results = []
    for shape in [(1, 1, 1), (2, 2, 2)]:
        lm, mesh, rules = language_model(mini_config, shape)
        sampler = Sampler(lm, mesh, rules, cfg)
        batch = sharding.global_batch(prompts, mesh, rules)
        state = nnx.state(lm)
        out = sampler(state, *batch, jax.random.key(3))
        # Parameters are read where they live: same shardings in as the model holds.
        q = state["backbone"]["blocks"][0]["attn"]["q"][...]
        assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
        results.append(jax.device_get(out))
    np.testing.assert_array_equal(results[0].tokens, results[1].tokens)
    np.testing.assert_allclose(results[0].logprobs, results[1].logprobs, atol=2e-5)


def test_samplers_and_evaluations_of_one_model_graph_share_one_traced_program(mini_config):
    """Every study stage builds its samplers and evaluation programs again: those of the same
    model graph, mesh, rules and settings reuse the traced program (`program_cache`); other
    settings or rules do not."""
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_id=-1)
    lm, mesh, rules = language_model(mini_config)
    other_lm, _, _ = language_model(mini_config, seed=1)  # the same graph, other weights
    first = Sampler(lm, mesh, rules, cfg)
    second = Sampler(other_lm, mesh, [list(r) for r in rules], cfg)  # rules as a config's lists
    assert second.jitted is first.jitted and second.program is first.program
    batch = sharding.global_batch(_prompts(), mesh, rules)
    ours = first(nnx.state(lm), *batch, jax.random.key(0))
    traced = first.program._cache_size()
    theirs = second(nnx.state(other_lm), *batch, jax.random.key(0))
    assert second.program._cache_size() == traced == 1
    assert not np.array_equal(ours.tokens, theirs.tokens)  # each sampler read its own weights
    np.testing.assert_array_equal(ours.tokens, _sample(lm, cfg, True, _prompts()).tokens)
    hotter = Sampler(lm, mesh, rules, dataclasses.replace(cfg, temperature=2.0))
    unsharded_batch = tuple((name, None if name == "batch" else axes) for name, axes in rules)
    assert hotter.jitted is not first.jitted
    assert Sampler(lm, mesh, unsharded_batch, cfg).jitted is not first.jitted
    assert Sampler(lm, mesh, rules, cfg, name="other").jitted is not first.jitted
    judge_graphdef = nnx.split(preference_model(mini_config)[0])[0]
    graphdef, other_graphdef = nnx.split(lm)[0], nnx.split(other_lm)[0]
    programs = eval_programs(graphdef, judge_graphdef, mesh, rules)
    assert eval_programs(other_graphdef, judge_graphdef, mesh, [list(r) for r in rules]) is programs
    assert eval_programs(graphdef, judge_graphdef, mesh, unsharded_batch) is not programs


@pytest.mark.slow
def test_scanned_layers_sample_what_unrolled_layers_sample(mini_config):
    """The stacked cache of scanned blocks, on a mesh, two samples per prompt: the same tokens
    and log-probs as unrolled layers and as full recomputation."""
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=-1)
    lm, mesh, rules = language_model(mini_config, (2, 2, 2), num_kv_heads=2)
    scanned, _, _ = scanned_copy(lm, mini_config, (2, 2, 2), num_kv_heads=2)
    batch = sharding.global_batch(_prompts(), mesh, rules)
    outputs = [jax.device_get(Sampler(m, mesh, rules, cfg, use_cache=c, samples_per_prompt=2)(
        nnx.state(m), *batch, jax.random.key(5))) for m, c in ((lm, True), (scanned, True),
                                                                (scanned, False))]
    for out in outputs[1:]:
        np.testing.assert_array_equal(out.tokens, outputs[0].tokens)
        np.testing.assert_allclose(out.logprobs, outputs[0].logprobs, atol=2e-5)


@pytest.mark.slow
def test_several_samples_per_prompt_in_one_loop(mini_config):
    prompts = _prompts()
    lm, mesh, rules = language_model(mini_config, (2, 2, 2))
    batch, state = sharding.global_batch(prompts, mesh, rules), nnx.state(lm)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, eos_id=-1)
    one = jax.device_get(Sampler(lm, mesh, rules, greedy)(state, *batch, jax.random.key(0)))
    two = jax.device_get(Sampler(lm, mesh, rules, greedy, samples_per_prompt=2)(
        state, *batch, jax.random.key(0)))
    b = prompts[0].shape[0]
    assert two.tokens.shape == (2 * b, 6)  # prompt-major: rows 2i and 2i + 1 are prompt i's
    for k, sample_k in enumerate(sampling.per_sample(two.tokens, 2)):
        np.testing.assert_array_equal(sample_k, one.tokens)
        np.testing.assert_array_equal(two.tokens[k::2], one.tokens)
    sampled = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=-1)
    pair = jax.device_get(Sampler(lm, mesh, rules, sampled, samples_per_prompt=2)(
        state, *batch, jax.random.key(0)))
    assert (pair.tokens[0::2] != pair.tokens[1::2]).any()  # two independent samples per prompt
    per_token, _ = logprobs.sequence_logprobs(lm, np.repeat(prompts[0], 2, axis=0),
                                              np.repeat(prompts[1], 2, axis=0), pair.tokens,
                                              pair.mask)
    np.testing.assert_allclose(pair.logprobs, per_token, atol=2e-5)


def test_prompt_major_noise_is_the_sample_major_draw_rearranged():
    """Row i * n + k of `gumbel_rows` is row k * prompts + i of one draw of the whole batch: a
    prompt's samples sit next to each other without changing any row's draw (the layout
    before; the online stream of a seed is the same)."""
    key, n, prompts, vocab = jax.random.key(7), 3, 5, 11
    flat = np.asarray(jax.random.gumbel(key, (n * prompts, vocab), np.float32))
    rows = np.asarray(sampling.gumbel_rows(key, n, prompts, vocab))
    for i in range(prompts):
        for k in range(n):
            np.testing.assert_array_equal(rows[i * n + k], flat[k * prompts + i])
    steps = np.asarray(sampling.step_noise(key, 2, n, prompts, vocab))
    np.testing.assert_array_equal(
        steps[1], sampling.gumbel_rows(jax.random.fold_in(key, 1), n, prompts, vocab))


def test_online_sampling_and_ranking_keep_each_prompts_samples_on_its_device(mini_config):
    """On a data-parallel mesh a prompt's two samples are decoded and ranked on the prompt's
    device: the compiled programs move no rows (with every first sample before every second,
    the sampler took collective-permutes and all-gathers, the ranking permutes)."""
    import re

    from alignment_gap.sources import online_sampler, rank_program

    lm, mesh, rules = language_model(mini_config, (2, 1, 1))
    proxy, _, _ = preference_model(mini_config, (2, 1, 1))
    prompt, mask = sharding.global_batch(_prompts(), mesh, rules)
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, eos_id=-1)
    sampler = online_sampler(lm, mesh, rules, cfg)
    tokens = jax.ShapeDtypeStruct((16, 4), np.int32, sharding=prompt.sharding)
    with sharding.use(mesh, rules):
        texts = [sampler.jitted.lower(nnx.state(lm), prompt, mask, jax.random.key(0)),
                 rank_program(proxy, mesh, rules).lower(
                     nnx.state(proxy), prompt, mask, tokens, tokens.update(dtype=bool))]
    for lowered in texts:
        text = lowered.compile().as_text()
        ops = re.findall(r"= [^=]*? (all-to-all|collective-permute|all-gather)\(", text)
        assert not ops, sorted(ops)


def test_each_device_of_a_data_parallel_cpu_mesh_decodes_in_a_loop_of_its_own(mini_config):
    """On CPU devices that hold the model whole, each decodes its own rows in its own loop (the
    compiled sampler has no collective: the mesh's one loop all-reduced "every row done" at
    each step) and draws the noise its rows draw in one device's call: the tokens of one
    device, with EOS, and with the first device's rows all done after one token while the
    others go on."""
    import re

    prompts = _prompts()
    prompts[0][:4], prompts[1][:4] = prompts[0][0], prompts[1][0]  # first device: one prompt
    lm, mesh, rules = language_model(mini_config)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, eos_id=-1)
    free = Sampler(lm, mesh, rules, greedy, groups=1)(nnx.state(lm), *prompts, jax.random.key(0))
    stops = int(free.tokens[0, 0])  # the first device's rows end at their first token
    sampled = SamplingConfig(max_new_tokens=6, temperature=1.0, eos_id=-1)
    free = Sampler(lm, mesh, rules, sampled, groups=1)(nnx.state(lm), *prompts, jax.random.key(3))
    ends = int(free.tokens[5, 2])  # a sampled token that ends some rows
    for cfg in (dataclasses.replace(greedy, eos_id=stops),
                dataclasses.replace(sampled, eos_id=ends)):
        outputs = []
        for shape in ((1, 1, 1), (2, 1, 1), (4, 1, 1)):
            lm, mesh, rules = language_model(mini_config, shape)
            sampler = Sampler(lm, mesh, rules, cfg, samples_per_prompt=2, groups=1)
            batch = sharding.global_batch(prompts, mesh, rules)
            with sharding.use(mesh, rules):
                text = sampler.jitted.lower(nnx.state(lm), *batch,
                                            jax.random.key(3)).compile().as_text()
            shardings = jax.tree.map(lambda x: x.sharding, nnx.state(lm))
            assert sharding.whole_on_every_cpu_device(mesh, rules, shardings) == (shape[0] > 1)
            assert not re.findall(r"(all-reduce|all-gather|collective-permute)\(", text), shape
            outputs.append(jax.device_get(sampler(nnx.state(lm), *batch, jax.random.key(3))))
        assert not outputs[0].mask.all()  # EOS ended rows early
        if cfg.temperature == 0.0:
            assert outputs[0].mask[:8].sum() == 8 and outputs[0].mask[8:].sum() > 8
        for other in outputs[1:]:
            np.testing.assert_array_equal(other.tokens, outputs[0].tokens)
            np.testing.assert_array_equal(other.mask, outputs[0].mask)
            np.testing.assert_allclose(other.logprobs, outputs[0].logprobs, atol=2e-5)


def test_draws_are_jax_categorical_and_greedy_is_argmax():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(64, 512)).astype(np.float32)
    logits[0, [3, 9]] = 50.0  # a tie: the first index wins, as in jnp.argmax
    logits[1, :500] = -np.inf  # masked entries never win
    greedy = SamplingConfig(max_new_tokens=1, temperature=0.0)
    np.testing.assert_array_equal(choose_tokens(logits, jax.random.key(0), greedy),
                                  np.argmax(logits, axis=-1))
    sampled = SamplingConfig(max_new_tokens=1, temperature=0.7)
    for seed in range(5):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(choose_tokens(logits, key, sampled),
                                      jax.random.categorical(key, logits / 0.7, axis=-1))


@pytest.mark.slow
def test_online_source_ranks_by_the_proxy_in_any_number_of_slices(mini_config):
    from alignment_gap.batches import PromptBatch
    from alignment_gap.models import both_order_margin
    from alignment_gap.sources import OnlineSource
    from tests.helpers import preference_model

    lm, mesh, rules = language_model(mini_config, (2, 2, 2))
    proxy, _, _ = preference_model(mini_config, (2, 2, 2), seed=3)
    prompts = PromptBatch(*_prompts(batch=8))
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_id=-1)
    to_global = lambda b: sharding.global_batch(b, mesh, rules)
    batches = []
    for k in (1, 2):
        source = OnlineSource(iter([prompts]), to_global, lm, proxy, mesh, rules, cfg,
                              microbatches=k)
        batches.append(jax.device_get(source.next_batch(nnx.state(lm), jax.random.key(7))))
    one, two = batches
    for name in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    margin = both_order_margin(proxy, one.prompt, one.prompt_mask, one.chosen, one.chosen_mask,
                               one.rejected, one.rejected_mask)
    assert np.all(np.asarray(margin) >= 0)  # chosen is the one the proxy prefers
    assert (one.chosen != one.rejected).any()


def test_a_one_device_ranker_ranks_in_side_by_side_groups_as_one_call_does(mini_config):
    """On a one-device CPU mesh the proxy ranks the batch as two groups of prompts from two
    threads (in slices too): each pair in the whole batch's order, with the margins' signs."""
    from alignment_gap.models import both_order_margin
    from alignment_gap.sources import FIELDS, Ranker, online_sampler

    lm, mesh, rules = language_model(mini_config)
    proxy, _, _ = preference_model(mini_config, seed=3)
    prompt, mask = _prompts(batch=8)
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, eos_id=-1)
    both = online_sampler(lm, mesh, rules, cfg)(nnx.state(lm), prompt, mask, jax.random.key(7))
    whole = Ranker(proxy, mesh, rules, groups=1)
    assert Ranker(proxy, mesh, rules).groups == cpu_groups.CPU_GROUPS == 2
    one = jax.device_get(whole(nnx.state(proxy), prompt, mask, both.tokens, both.mask))
    for k in (1, 2):
        grouped = Ranker(proxy, mesh, rules, microbatches=k)
        assert grouped.program is not whole.jitted
        batch = jax.device_get(grouped(nnx.state(proxy), prompt, mask, both.tokens, both.mask))
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(batch, name), getattr(one, name))
    margin = both_order_margin(proxy, *(getattr(one, name) for name in FIELDS))
    assert np.all(np.asarray(margin) >= 0) and (one.chosen != one.rejected).any()


def test_policy_as_classifier_reads_the_sft_log_probs_computed_once(mini_config):
    """`classify` takes the SFT policy's log-probs of the fixed pairs (computed once per
    evaluator): the SFT policy itself ties on every pair (accuracy 1/2, drift 0), and another
    policy scores what the four sequence log-probs computed directly give."""
    sft, mesh, rules = language_model(mini_config)
    policy = language_model(mini_config, seed=1)[0]
    judge_graphdef = nnx.split(preference_model(mini_config)[0])[0]
    programs = eval_programs(nnx.split(sft)[0], judge_graphdef, mesh, rules)
    prompt, prompt_mask = _prompts(batch=8, length=6, seed=3)
    chosen, chosen_mask = _prompts(batch=8, length=5, seed=4)
    rejected, rejected_mask = _prompts(batch=8, length=5, seed=5)
    chosen_mask, rejected_mask = chosen_mask[:, ::-1], rejected_mask[:, ::-1]  # right-padded
    pairs = PreferenceBatch(prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask)
    with sharding.use(mesh, rules):
        cached = programs.pair_logprobs(nnx.state(sft), pairs)
        itself = programs.classify(nnx.state(sft), cached, pairs)
        other = programs.classify(nnx.state(policy), cached, pairs)
    assert float(itself["classifier_accuracy"]) == 0.5 and float(itself["likelihood_drift"]) == 0
    seq = lambda m, y, ym: np.asarray(logprobs.sequence_logprobs(m, prompt, prompt_mask, y, ym)[1])
    pw, pl = seq(policy, chosen, chosen_mask), seq(policy, rejected, rejected_mask)
    sw, sl = seq(sft, chosen, chosen_mask), seq(sft, rejected, rejected_mask)
    h = (pw - sw) - (pl - sl)
    assert float(other["classifier_accuracy"]) == np.mean(np.where(h > 0, 1.0, 0.0))
    np.testing.assert_allclose(float(other["likelihood_drift"]), np.mean(pw - sw), atol=1e-5)


def test_the_kl_is_estimated_on_the_policys_own_samples_whatever_the_run_samples_with():
    """A run sampling at temperature 0.3 with top-k 5 reports the KL a temperature-1 run
    reports (the same draws of the policy itself); its win-rate responses are its own."""
    config = models.get_config("mini")
    policy, mesh, rules = language_model(config, seed=1)
    sft, _, _ = language_model(config, seed=0)
    golden, _, _ = preference_model(config, seed=2)
    prompt, mask = sharding.global_batch(_prompts(), mesh, rules)
    results = {}
    for name, overrides in (("pure", {}), ("tempered", {"temperature": 0.3, "top_k": 5})):
        evaluator = Evaluator(lm=policy, sft_params=nnx.state(sft), golden=golden,
                              opponent_params=nnx.state(sft), prompts=PromptBatch(prompt, mask),
                              pairs=None, mesh=mesh, rules=rules, kl_prompts=8,
                              sampling=SamplingConfig(max_new_tokens=6, eos_id=-1, **overrides))
        results[name] = evaluator.evaluate(nnx.state(policy))
    (pure, pure_outcomes), (tempered, tempered_outcomes) = results["pure"], results["tempered"]
    assert pure["kl"] > 0 and tempered["kl"] == pure["kl"]
    np.testing.assert_array_equal(tempered_outcomes["kl"], pure_outcomes["kl"])
    # The judge saw other responses: the tempered ones.
    assert not np.array_equal(tempered_outcomes["win"], pure_outcomes["win"])


def test_the_top_token_is_always_in_the_nucleus_and_a_nan_logit_is_the_argmax():
    """top_p near 0 is greedy (it emptied the nucleus: every row drew token 0); a NaN logit
    wins the argmax as in `jnp.argmax` (it gave the out-of-vocabulary id `vocab`)."""
    logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    for top_p in (0.0, 1e-6):
        cfg = SamplingConfig(max_new_tokens=1, temperature=0.7, top_p=top_p)
        draws = [int(t) for key in range(20) for t in
                 choose_tokens(logits, jax.random.key(key), cfg)[:1]]
        assert set(draws) == {1}
        assert list(choose_tokens(logits, jax.random.key(0), cfg)) == [1, 0]
    with_nan = jnp.asarray([[0.0, 2.0, jnp.nan, 1.0], [3.0, 1.0, 0.0, 2.0]])
    assert list(sampling.first_argmax(with_nan)) == list(jnp.argmax(with_nan, axis=-1)) == [2, 0]


def test_a_proxy_sure_of_both_orders_still_ranks_by_which_it_prefers():
    """Logits 18 and 20 (y2 preferred): their probabilities both round to 1 in float32, and
    the pair was ranked as a tie (y1 first)."""
    from alignment_gap.sources import rank_pairs

    class Sure:  # a proxy whose both-order logits are fixed
        def both_orders(self, prompt, prompt_mask, y1, y1_mask, y2, y2_mask):
            rows = prompt.shape[0]
            return jnp.full(rows, 18.0), jnp.full(rows, 20.0)

    prompt, mask = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), bool)
    tokens = jnp.asarray([[5, 6], [7, 8], [9, 10], [11, 12]], jnp.int32)  # prompt-major
    batch = rank_pairs(Sure(), prompt, mask, tokens, jnp.ones((4, 2), bool))
    assert batch.chosen.tolist() == [[7, 8], [11, 12]]  # each prompt's second sample
