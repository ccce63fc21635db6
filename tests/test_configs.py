"""Named sizes have the parameters their names promise; bad configs fail in one clear line; the
documented studies hold the runs their presets plan."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import pytest
from flax import nnx

from alignment_gap import config_checks, resume_guard, run_dir
from alignment_gap.data import datasets
from alignment_gap.errors import ConfigError
from alignment_gap.models import LanguageModel, TransformerConfig
from alignment_gap.study import pipeline
from alignment_gap.study.hypotheses import coverage
from configs import demo, meshes, models, policy, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOMINAL = {"60m": 60e6, "250m": 250e6, "770m": 770e6, "3b": 3e9, "11b": 11e9,
           # Pretrained models: the count each model card states (Gemma 3 text models without
           # the vision tower).
           "gemma3_270m": 268e6, "gemma3_1b": 1.0e9, "gemma3_4b": 3.88e9, "gemma3_12b": 11.8e9,
           "gemma3_27b": 27.0e9, "qwen2_5_0_5b": 0.49e9, "qwen2_5_1_5b": 1.54e9,
           "qwen2_5_3b": 3.09e9, "qwen2_5_7b": 7.61e9, "qwen3_0_6b": 0.6e9,
           "qwen3_1_7b": 1.7e9, "qwen3_4b": 4.0e9, "qwen3_8b": 8.2e9, "llama3_2_1b": 1.24e9,
           "llama3_2_3b": 3.21e9, "llama3_1_8b": 8.03e9}


@pytest.mark.parametrize("size", sorted(models.SIZES) + sorted(models.PRETRAINED))
def test_sizes_have_their_nominal_parameter_count(size):
    cfg = TransformerConfig.from_config(models.get_config(size))
    abstract = nnx.eval_shape(lambda: LanguageModel(cfg, nnx.Rngs(0)))  # no memory used
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    if size in NOMINAL:
        assert 0.85 * NOMINAL[size] <= count <= 1.15 * NOMINAL[size], count
    else:
        assert count < 2e6  # the CPU sizes stay tiny


def _set(c, path: str, value):
    """Set the (dotted) field `path` of config `c`."""
    *parents, leaf = path.split(".")
    for p in parents:
        c = c[p]
    c[leaf] = value


def _demo(**changes):
    c = demo.get_config("mini")
    for path, value in changes.items():
        _set(c, path, value)
    return c


@pytest.mark.parametrize("changes,devices,field", [
    ({"model.num_heads": 5}, 1, "config.model.num_heads: 5 does not divide model.width=64"),
    ({"model.num_kv_heads": 3}, 1, "config.model.num_kv_heads"),
    ({"model.dtype": "float16"}, 1, "config.model.dtype"),
    ({"model.sliding_window": 8, "model.rope_scaling": "linear"}, 1, "config.model.rope_scaling: "
     "'linear' would scale no layer: every layer is local"),
    ({"mesh.data": 3}, 8, "config.mesh: data*fsdp*tensor = 3 but 8 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "config.mesh: more than one axis is -1"),
    ({"mesh.data": -1, "mesh.tensor": 3}, 8, "config.mesh: fixed axes multiply to 3"),
    ({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 8}, 8, "config.model.num_heads: 4 is not "
     "divisible by mesh.tensor=8"),
    ({"batch_size": 60}, 8, "config.batch_size: 60 is not divisible by mesh data*fsdp=8"),
    ({"batch_size": 16, "microbatches": 4}, 8, "config.microbatches: 4 does not split "
     "batch_size=16"),
    ({"sampling.top_p": 0.0}, 1, "config.sampling.top_p"),
    ({"sampling.temperature": -1.0}, 1, "config.sampling.temperature"),
    ({"warmup_steps": 5000}, 1, "config.warmup_steps"),
    ({"model.max_len": 8}, 1, "config.model.max_len"),
    ({"sampling.max_new_tokens": 12}, 1, "config.sampling.max_new_tokens: 12 is not "
     "response_len=9"),
    ({"prompt_len": 12}, 1, "config.response_len: 9 is shorter than prompt_len + 1 = 13"),
    ({"eval_prompts": 12}, 8, "config.eval_prompts: 12 is not divisible by mesh data*fsdp=8"),
    ({"alphabet": 600}, 1, "config.alphabet: 600 symbols (ids 2 .. 601) do not fit "
     "model.vocab_size=512"),
])
def test_bad_values_name_the_field_and_the_fix(changes, devices, field):
    with pytest.raises(ConfigError) as err:
        config_checks.validate(_demo(**changes), devices)
    message = str(err.value)
    assert field in message and "\n" not in message and ";" in message  # field; problem; fix


@pytest.mark.parametrize("field,value,message", [
    ("grad_clip", -1.0, "config.grad_clip: must be >= 0, got -1.0; 0 turns clipping off"),
    ("end_lr_fraction", -1.0, "config.end_lr_fraction: must be in [0, 1], got -1.0"),
    ("data.label_temperature", 0.0, "config.data.label_temperature: must be positive, got 0.0"),
    ("data.validation_pairs", 0, "config.data.validation_pairs: must be positive, got 0"),
    ("data.sft_source", "demonstration", "config.data.sft_source: 'demonstration' is unknown; "
     "use one of ('comparisons', 'demonstrations')"),
])
def test_a_trainers_bad_optimizer_or_data_field_is_one_line(field, value, message):
    """Each had been accepted: a negative clip norm is gradient ascent (the loss rose), a
    negative end fraction a negative learning rate, an unknown SFT source trained on
    comparisons; a temperature or a split of 0 ended in a traceback."""
    from configs import sft

    c = sft.get_config("tiny")
    _set(c, field, value)
    with pytest.raises(ConfigError) as err:
        config_checks.validate(c, 1)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    c = study.get_config("smoke")
    c.policy.grad_clip = -1.0  # a study's stage section
    with pytest.raises(ConfigError, match=r"^config\.policy\.grad_clip: must be >= 0"):
        config_checks.validate(c, 1)


def test_unknown_loss_is_a_clear_error():
    c = _demo()
    c.loss = "ppo"
    with pytest.raises(ConfigError, match=r"config.loss: 'ppo' is unknown; use"):
        config_checks.validate(c, 1)


def test_sub_second_sweep_polling_is_accepted_and_zero_is_named():
    c = study.get_config("smoke")
    c.sweep.poll_s, c.sweep.wait_timeout_s = 0.1, 0.5
    config_checks.validate(c, 1)  # was "must be positive, got 0.1; set it to >= 1"
    c.sweep.poll_s = 0.0
    with pytest.raises(ConfigError, match=r"^config.sweep.poll_s: must be positive, got 0.0; "
                       "set it above 0$"):
        config_checks.validate(c, 1)


@pytest.mark.parametrize("field,value,message", [
    ("seeds", (), "config.seeds: is empty; list policy seeds"),
    ("seeds", (0, -1), "config.seeds: -1 in (0, -1) is not an integer >= 0"),
    ("upstream_chains", 0, "config.upstream_chains: must be >= 1"),
    ("golden.steps", 0, "config.golden.steps: must be positive"),
    ("proxy.learning_rate", 0.0, "config.proxy.learning_rate: must be positive"),
    ("policy.checkpoint_every", 0, "config.policy.checkpoint_every: must be positive"),
    ("policy.loss", "dpoo", "config.policy.loss: 'dpoo' is unknown; use one of"),
    ("policy.beta", 0.0, "config.policy.beta: must be positive"),
    ("policy.microbatches", 3, "config.policy.microbatches: 3 does not split batch_size=8"),
    ("policy.temperature", 0.0, "config.policy.temperature: must be positive"),
    ("policy.top_p", 1.5, "config.policy.top_p: must be in (0, 1]"),
    ("policy.kl_cap", -1.0, "config.policy.kl_cap: must be >= 0"),
    ("policy.top_k", 1000, "config.policy.top_k: 1000 exceeds model.vocab_size="),
    ("golden_model.num_heads", 3, "config.golden_model.num_heads: 3 does not divide"),
    ("golden_model.max_len", 8, "config.golden_model.max_len: 8 is shorter than the"),
    ("offline_learning_rates", (5e-4, 0.0), "config.offline_learning_rates: 0.0 in (0.0005, "
     "0.0) is not a positive number"),
    ("online_learning_rates", (), "config.online_learning_rates: is empty"),
    ("offline_steps", (12.5,), "config.offline_steps: 12.5 in (12.5,) is not a positive integer"),
    ("opponent", "golden", "config.opponent: 'golden' is unknown; use one of ('sft', "
     "'golden_policy')"),
    ("eval.kl_prompts", 0, "config.eval.kl_prompts: must be positive"),
    ("eval.test_prompts", -1, "config.eval.test_prompts: must be >= 0"),
    ("eval.kl_prompts", 128, "config.eval.kl_prompts: 128 exceeds eval.prompts=32"),
    ("eval.prompts", 128, "config.eval.prompts: 128 exceeds the test split's data.test_pairs=64"),
    ("eval.pairs", 128, "config.eval.pairs: 128 exceeds the validation split's "
     "data.validation_pairs=64"),
])
def test_a_bad_study_field_is_named_as_the_user_set_it(field, value, message):
    """Study fields become the stages' trainer configs; a bad one stops the study before any
    stage starts (it had surfaced mid-study as a ZeroDivisionError, a JAX traceback, or not at
    all: an unknown opponent silently meant SFT while the report named it)."""
    c = study.get_config("smoke")
    config_checks.validate(c, 1)
    _set(c, field, value)
    with pytest.raises(ConfigError) as err:
        config_checks.validate(c, 1)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


@pytest.mark.parametrize("variant,field,value,message", [
    ("smoke_scaling", "scaling.sizes", ("nano", "huge"), "config.scaling.sizes: 'huge' is not a "
     "model size"),
    ("smoke_scaling", "scaling.sizes", ("nano",), "config.scaling.sizes: ('nano',) has fewer "
     "than two sizes"),
    ("smoke_scaling", "scaling.quantile", 1.5, "config.scaling.quantile: must be in (0, 1]"),
    ("smoke_quality", "quality.pairs", 0, "config.quality.pairs: must be positive"),
    ("smoke_quality", "quality.learning_rates", (), "config.quality.learning_rates: is empty"),
    ("smoke_coverage", "coverage.orders", (("tandem", "tandem", 1), ("shuffled", "random", 1)),
     "config.coverage.orders: ('shuffled', 'random', 1) is not a replay order"),
    ("smoke_coverage", "coverage.orders", (("tandem", "tandem", 1),), "config.coverage.orders: "
     "labels ['tandem'] lack 'tandem' or 'shuffled'"),
    ("smoke_coverage", "online_betas", (0.5,), "config.online_betas: (0.5,) lacks "
     "policy.beta=0.1, the online run the coverage variant reads"),
    ("smoke_classification", "policy.offline_checkpoint_every", 5,
     "config.policy.offline_checkpoint_every: 5 does not divide policy.checkpoint_every="),
    ("smoke_classification", "classification.stream_pairs", 0,
     "config.classification.stream_pairs: must be positive"),
    ("smoke_noncontrastive", "noncontrastive.offline_learning_rates", (0.0,),
     "config.noncontrastive.offline_learning_rates: 0.0 in (0.0,) is not a positive number"),
])
def test_a_bad_hypothesis_field_is_a_one_line_error(variant, field, value, message):
    c = study.get_config(variant)
    config_checks.validate(c, 1)
    _set(c, field, value)
    with pytest.raises(ConfigError) as err:
        config_checks.validate(c, 1)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value


def test_an_unknown_data_kind_is_named_before_the_tokenizer_it_would_need():
    c = study.get_config("smoke")
    c.data.kind = "tldrr"
    with pytest.raises(ConfigError, match=r"^config.data.kind: 'tldrr' is unknown; use one of"):
        datasets.tokenizer(c.data)


def test_online_runs_cannot_stop_early_under_the_hypotheses():
    c = study.get_config("smoke_coverage")
    config_checks.validate(c, 1)
    c.policy.stop_after_falls = 2
    with pytest.raises(ConfigError, match=r"config.policy.stop_after_falls: the hypothesis"):
        config_checks.validate(c, 1)
    c = study.get_config("smoke")
    c.policy.stop_after_falls, c.policy.kl_cap = 2, 3.0
    config_checks.validate(c, 1)  # the main study alone may
    # ... when a test stage scores the report: otherwise the stop reads the prompts that do.
    c.eval.test_prompts = 0
    with pytest.raises(ConfigError, match=r"^config.policy.stop_after_falls: 2 stops online runs "
                       r".* half of those prompts score the report; set eval.test_prompts"):
        config_checks.validate(c, 1)
    c.policy.stop_after_falls = 0
    config_checks.validate(c, 1)  # a KL cap reads no win rate


def test_the_test_stage_needs_test_prompts_after_the_selection_prompts():
    c = study.get_config("smoke")  # 32 selection + 32 test prompts of a 64-prompt test split
    config_checks.validate(c, 1)
    c.eval.test_prompts = 48
    with pytest.raises(ConfigError, match=r"config.eval.test_prompts: the test stage scores "
                       r"prompts 32 to 79 .* raise data.test_pairs to >= 80"):
        config_checks.validate(c, 1)
    c.data.test_pairs = 80
    config_checks.validate(c, 1)


def test_upstream_draws_are_refused_beside_the_hypotheses():
    c = study.get_config("smoke_coverage")
    c.upstream_chains = 2
    with pytest.raises(ConfigError, match=r"config.upstream_chains: 2 re-draws"):
        config_checks.validate(c, 1)
    c = study.get_config("smoke")
    c.upstream_chains = 2
    config_checks.validate(c, 1)


def test_a_negative_stop_margin_is_a_one_line_error():
    c = study.get_config("smoke")
    c.policy.stop_margin = -0.01
    with pytest.raises(ConfigError, match=r"config.policy.stop_margin: must be >= 0"):
        config_checks.validate(c, 1)


def test_a_stop_rule_needs_evaluations():
    c = policy.get_config("online_tiny")
    c.eval.kl_cap = 2.0
    with pytest.raises(ConfigError, match=r"config.eval.kl_cap: stops a run on its evaluations"):
        config_checks.validate(c, 1)
    c.eval.golden_checkpoint = "/runs/golden"
    config_checks.validate(c, 1)


def test_good_configs_pass():
    config_checks.validate(_demo(), 1)
    config_checks.validate(_demo(**{"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2}), 8)
    for name in meshes.SHAPES:
        assert meshes.get_config(name).rules == meshes.RULES


def test_bad_extra_checkpoints_are_one_line_errors():
    c = study.get_config("smoke")
    c.policy.early_checkpoints = [10, 0]
    with pytest.raises(ConfigError, match=r"config.policy.early_checkpoints: 0 is not a "
                       r"positive step; list steps >= 1"):
        config_checks.validate(c, 1)
    c = policy.get_config("online_tiny")  # 6 steps
    c.checkpoint_steps = [2, 6]
    with pytest.raises(ConfigError, match=r"config.checkpoint_steps: 6 is not a step in 1 .. "
                       r"num_steps-1"):
        config_checks.validate(c, 1)
    c.checkpoint_steps = [2, 4]
    config_checks.validate(c, 1)


def _schedule(stage) -> tuple[int, list[int]]:
    """(interval, extra steps) a policy stage checkpoints and evaluates at."""
    return stage.config.checkpoint_every, list(stage.config.get("checkpoint_steps", []))


def test_early_checkpoints_reach_both_methods_and_steps_on_an_interval_are_not_extra():
    plan = pipeline.build_plan(study.get_config("mini"), "/nonexistent")
    runs = [s for s in plan.stages if s.meta.get("method")]
    assert {s.meta["method"] for s in runs} == {"online", "offline"}
    for stage in runs:
        assert _schedule(stage) == (50, [25, 35, 45, 75]), stage.name
        assert stage.config.max_to_keep == 300 // 50 + 1 + 4  # every checkpoint is kept
    c = study.get_config("mini")
    c.policy.offline_checkpoint_every = 5  # the early steps are on this interval
    offline = pipeline.build_plan(c, "/nonexistent").main_runs("offline")
    assert [_schedule(s) for s in offline] == [(5, [])] * len(offline)
    c.policy.early_checkpoints = [400]  # past the runs' end: skipped
    online = pipeline.build_plan(c, "/nonexistent").main_runs("online")
    assert "checkpoint_steps" not in online[0].config
    plan = pipeline.build_plan(study.get_config("mini_golden_opponent"), "/nonexistent")
    golden_policy = next(s for s in plan.stages if s.name == "golden_policy")
    assert "checkpoint_steps" not in golden_policy.config  # trained, never evaluated


ALONE = {"stack_runs": 1}  # ran before `paper` stacked its offline grid: every run alone


@pytest.mark.parametrize("docs, variant, sweep", [
    ("mini_study", "mini", {}), ("hypotheses", "hypotheses", {}),
    ("paper_study", "paper_v1", ALONE), ("mini_study_amd", "mini", {}),
    ("paper_study_amd", "paper_v1", ALONE), ("hypotheses_amd", "hypotheses", {}),
    ("mini_study_intel_2026-12-03", "mini", {}), ("mini_study_intel_2026-12-04", "mini", {}),
    ("mini_study_intel_2026-12-05", "mini", {}), ("mini_study_amd_2026-12-06", "mini", {}),
    ("mini_study_amd_2026-12-07", "mini", {}), ("mini_study_intel_2026-12-07", "mini", {}),
    ("paper_study_intel_2026-12-04", "paper_v1", ALONE),
    ("hypotheses_intel_2026-12-04", "hypotheses", {}),
    ("hypotheses_intel_2026-12-06", "hypotheses", {}),
    ("hypotheses_amd_2026-12-06", "hypotheses", {}),
    ("hypotheses_amd_2026-12-07", "hypotheses", {}),
    ("paper_study_v2_intel_2026-12-04", "paper", ALONE),
    ("mini_chains_intel_2026-12-04", "mini_chains", {}),
    ("paper_wide_intel_2026-12-05", "paper_wide", ALONE),
    ("paper_study_stacked_intel_2026-12-05", "paper", {}),
    ("paper_low_beta_intel_2026-12-05", "paper_low_beta", {}),
    ("mini_large_golden_intel_2026-12-05", "mini_large_golden", {}),
    ("mini_weak_proxy_intel_2026-12-05", "mini_weak_proxy", {}),
    ("mini_medium_proxy_intel_2026-12-05", "mini_medium_proxy", {}),
    ("mini_weak_proxy_chains_intel_2026-12-05", "mini_weak_proxy_chains", {}),
    ("mini_medium_proxy_chains_intel_2026-12-05", "mini_medium_proxy_chains", {})])
def test_committed_results_are_the_runs_their_preset_plans(docs, variant, sweep):
    """docs/<study>/results.csv holds exactly the runs the preset's plan has, each evaluated at
    the steps its schedule has (up to where it stopped), and its config.json is the preset: a
    preset changed without rerunning its documented study fails here."""
    documented = {}
    with open(os.path.join(ROOT, "docs", docs, "results.csv")) as f:
        for row in csv.DictReader(f):
            documented.setdefault(row["stage"], []).append(int(row["step"]))
    with open(os.path.join(ROOT, "docs", docs, "config.json")) as f:
        recorded = json.load(f)
    config = study.get_config(variant)
    config.sweep.update(sweep)  # how the documented run shared its runs out
    preset = json.loads(json.dumps(config.to_dict()))
    recorded["data"].pop("dir"), preset["data"].pop("dir")  # where the datasets were cached
    recorded["sweep"].setdefault("stack_runs", 1)  # studies from before the field: runs alone
    for c in (preset, recorded):
        c["sweep"].pop("launch", None)  # which launch ran it (later fields: absent before)
    # Replay windows given as a share of the run were recorded in batches before 2026-12-07.
    for c in (preset, recorded):
        c["coverage"]["orders"] = [[label, order, coverage.batches(window, config.policy.steps)]
                                   for label, order, window in c["coverage"]["orders"]]
    assert recorded == preset
    plan = pipeline.build_plan(config, "/nonexistent")
    planned = {s.name: s for s in plan.stages if s.meta.get("method")}
    assert set(documented) == set(planned), (sorted(set(documented) - set(planned)),
                                             sorted(set(planned) - set(documented)))
    for name, steps in documented.items():
        every, extra = _schedule(planned[name])
        n = planned[name].config.num_steps
        schedule = sorted({0, n, *range(every, n + 1, every), *extra})
        assert steps == [k for k in schedule if k <= max(steps)], name


@pytest.mark.parametrize("variant", ["mini", "paper"])
def test_the_offline_sweep_reaches_down_to_onlines_learning_rate(variant):
    c = study.get_config(variant)
    assert min(c.offline_learning_rates) <= min(c.online_learning_rates)


def _main(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "alignment_gap.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_bad_override_exits_with_one_line():
    done = _main("--config", "configs/demo.py:mini", "--workdir", "/nonexistent",
                 "--config.model.num_heads=5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: config.model.num_heads: 5")


def test_a_config_that_does_not_load_or_a_field_it_lacks_is_one_line():
    """They had ended in tracebacks from the flag parser (a bare KeyError for a misspelt
    policy variant)."""
    for args, line in (
            (["configs/sft.py:tiny", "--config.learnig_rate=1e-3"],
             "error: --config.learnig_rate: the config has no field 'learnig_rate' (Did you "
             'mean "learning_rate" instead of "learnig_rate"?); check its spelling'),
            (["configs/policy.py:online_mni"], "error: flag --config=configs/policy.py:online_mni: "
             "ValueError: policy variant 'online_mni' is unknown; use one of ['offline_mini', "),
            (["configs/sftt.py:tiny"], "error: --config: [Errno 2] No such file or directory: "
             "'configs/sftt.py'")):
        done = _main("--config", *args, "--workdir", "/nonexistent")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(line), done.stderr[-500:]


def test_several_processes_need_a_coordinator_and_ids_in_range():
    """jax.distributed had ended in 'ValueError: coordinator_address should be defined.'"""
    from alignment_gap import sharding
    from alignment_gap.presets import meshes as mesh_presets

    d = mesh_presets.distributed_config()
    d.num_processes = 2
    with pytest.raises(ConfigError, match=r"^config\.distributed\.coordinator_address: empty"):
        sharding.initialize_distributed(d)
    d.coordinator_address, d.process_id = "localhost:1234", 2
    with pytest.raises(ConfigError, match=r"^config\.distributed\.process_id: 2 is not in"):
        sharding.initialize_distributed(d)


def test_cli_overrides_sweep_lists_as_tuples():
    """The study's sweep fields are tuples, which config flags can override (lists cannot)."""
    done = _main("--config", "configs/study.py:smoke", "--workdir", "/nonexistent",
                 "--config.seeds=(0, 1)", "--config.offline_learning_rates=(5e-4, 0.0)")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: config.offline_learning_rates: 0.0 in (0.0005, 0.0) is not a positive number; "
        "list positive learning rates, e.g. '(2e-4, 1e-3)'")


@pytest.mark.slow
def test_cli_overrides_apply_and_a_finished_workdir_is_left_alone(tmp_path):
    args = ["--config", "configs/demo.py:mini", "--workdir", str(tmp_path),
            "--config.num_steps=6", "--config.warmup_steps=1", "--config.log_every=2",
            "--config.eval_prompts=16", "--config.model.num_layers=1"]
    first = _main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "steps: 6" in first.stdout and run_dir.result(str(tmp_path))["final_loss"] > 0
    again = _main(*args)
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    # Under another config it runs again (it had said "nothing to do"; no checkpoint to resume).
    other = _main(*args, "--config.learning_rate=0.01")
    assert other.returncode == 0, other.stderr[-2000:]
    assert f"{tmp_path} holds a demo run of another config (learning_rate " in other.stdout
    assert "steps: 6" in other.stdout
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 0.01


def test_the_studys_samples_take_rows_that_split_over_the_mesh():
    from alignment_gap.study.run import rows_for

    assert rows_for(8, 1, 100) == 8 and rows_for(8, 16, 100) == 16 and rows_for(8, 3, 100) == 9
    assert rows_for(8, 16, 20) == 16 and rows_for(8, 4, 6) == 4  # as many as the split holds


def test_a_resume_may_move_and_relayout_a_run_but_not_change_what_it_trains():
    started = policy.get_config("online_tiny")
    now = policy.get_config("online_tiny")
    now.sft_checkpoint, now.proxy_checkpoint = "/moved/sft", "/moved/proxy"
    now.data.dir, now.mesh.data, now.microbatches = "/moved/data", 4, 2
    now.distributed.num_processes, now.log_every = 2, 1
    now.num_steps = started.num_steps + 10  # policy runs keep the rate after warm-up
    now.data.tokenizer, now.checkpoint_steps = "/moved/tok.model", [4]
    now.proxy_model.dtype = now.eval.golden_model.dtype = "bfloat16"  # on a GPU now
    assert resume_guard.changes(json.loads(json.dumps(started.to_dict(), default=str)),
                                now.to_dict()) == []
    now.beta, now.sampling.temperature, now.eval.kl_cap = 0.5, 0.7, 3.0
    now.proxy_model.num_layers = 3  # another proxy
    now.eval.opponent_model = ml_collections.ConfigDict({"width": 8})  # another opponent
    assert [f for f, _, _ in resume_guard.changes(started.to_dict(), now.to_dict())] == [
        "beta", "eval.kl_cap", "eval.opponent_model.width", "proxy_model.num_layers",
        "sampling.temperature"]
    now.end_lr_fraction = 0.1  # now the schedule decays towards num_steps
    assert "num_steps" in [f for f, _, _ in resume_guard.changes(started.to_dict(),
                                                                 now.to_dict())]
    now = started.copy_and_resolve_references()
    now.model.dtype = "bfloat16"  # the trained model's precision: steps of two kinds
    assert [f for f, _, _ in resume_guard.changes(started.to_dict(), now.to_dict())] == [
        "model.dtype"]


def test_a_resume_against_another_finished_frozen_run_is_refused(tmp_path):
    """Frozen inputs may move (their paths are free); another run named, or one trained again
    in their place, would train the rest of the steps against another model."""
    from alignment_gap.train.common import run_identity

    sft, again, moved = (tmp_path / name for name in ("sft", "again", "moved"))
    for run, loss in ((sft, 1.0), (again, 1.1)):
        run_dir.finish(str(run), 400, metrics={"loss": loss})
    shutil.copytree(sft, moved)
    assert run_identity(str(sft)) == run_identity(str(moved)) != run_identity(str(again))
    assert run_identity(str(tmp_path / "unfinished")) is None
    workdir = tmp_path / "policy"
    resume_guard.check_inputs(str(workdir), {"sft_checkpoint": run_identity(str(sft))})
    (workdir / "checkpoints" / "6").mkdir(parents=True)  # it has trained since
    resume_guard.check_inputs(str(workdir), {"sft_checkpoint": run_identity(str(moved))})
    with pytest.raises(ConfigError) as error:
        resume_guard.check_inputs(str(workdir), {"sft_checkpoint": run_identity(str(again))})
    assert str(error.value) == (
        f"{workdir}: this run resumes from its checkpoints but config.sft_checkpoint now names "
        "another finished run than the one it started with; point back to that run, or start "
        "in a new workdir")


def test_fields_derived_from_the_run_length_and_batch_follow_command_line_overrides():
    """The hypothesis sections scale with policy.steps and batch_size (quality's early
    checkpoint, the classification stream's pairs, the replay window of an eighth of the run):
    overriding those on the command line moves them too, unless they are set themselves; the
    plan's replay runs get the window in batches."""
    script = ("import sys, json\nfrom absl import flags\nfrom ml_collections import config_flags"
              "\nc = config_flags.DEFINE_config_file('config')\nflags.FLAGS(sys.argv)\n"
              "c = c.value\nprint(json.dumps([c.quality.early_step, "
              "c.classification.stream_pairs, c.policy.steps, c.batch_size]))")
    base = [sys.executable, "-c", script, "--config=configs/study.py:mini_hypotheses"]
    runs = [base, base + ["--config.policy.steps=600", "--config.batch_size=16"],
            base + ["--config.policy.steps=600", "--config.quality.early_step=7"]]
    out = [json.loads(subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout) for args in runs]
    assert out == [[60, 64, 300, 32], [120, 32, 600, 16], [7, 64, 600, 32]]
    config = study.get_config("mini_coverage")
    config.policy.steps = 48
    windows = {s.config.replay.window for s in pipeline.build_plan(config, "/nonexistent").stages
               if s.config.get("replay") and s.config.replay.get("order") == "window"}
    assert windows == {4, 6}  # window4, and an eighth of 48 steps
    assert coverage.batches(0.125, 8) == 2 and coverage.batches(4, 8) == 4
