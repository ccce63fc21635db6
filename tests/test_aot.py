"""Ahead-of-time compilation for TPU slices on this CPU: libtpu describes a slice, XLA compiles
the real TPU programs, and the report's memory and costs come from the compiler."""

import os
import subprocess
import sys

import jax
import pytest

from alignment_gap import config_checks, sharding
from alignment_gap.aot import programs, report, topology
from alignment_gap.compile import depth_variant, remedies
from alignment_gap.study.hypotheses import probe
from configs import meshes
from configs import policy as policy_configs
from configs import study as study_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,chips,shape", [
    ("v5p-8", 4, (2, 2, 1)), ("v5p-64", 32, (2, 4, 4)), ("v5p-256", 128, (4, 4, 8)),
    ("v5p-12288", 6144, (16, 16, 24)), ("v4-4096", 2048, (8, 16, 16)),
    ("v5litepod-16", 16, (4, 4)), ("v5e-256", 256, (16, 16)), ("v6e-8", 8, (2, 4))])
def test_slice_names_as_cloud_tpu_sells_them(name, chips, shape):
    generation, count = topology.parse(name)
    assert count == chips and topology.slice_shape(generation, count) == shape


@pytest.mark.parametrize("name,says", [
    ("v5p-7", "two per chip"), ("v5e-12", "not 12"), ("v5p-96", "multiples of 64"),
    ("tpu-8", "not a TPU"), ("v5p-4", "v5p slices are v5p-8, v5p-16, v5p-32, v5p-64 "),
    ("v4-0", "not 0 chips"), ("cpu:abc", "cpu:N needs a device count N >= 1"),
    ("cpu:0", "cpu:N needs a device count")])
def test_names_that_are_not_slices_fail_in_one_line(name, says):
    with pytest.raises(topology.TopologyError, match=says) as e:
        if name.startswith("cpu:"):
            topology.resolve(name)
        else:
            topology.slice_shape(*topology.parse(name))
    assert "\n" not in str(e.value) and str(e.value).startswith("--topology")


@pytest.mark.parametrize("name,kind", [("v5e-1", "TPU v5 lite"), ("v6e-1", "TPU v6 lite")])
def test_one_chip_slices_are_described(name, kind):
    """libtpu's default host block (2x2x1) cannot hold a one-chip slice: it was refused."""
    one = topology.resolve(name)
    assert one.chips == 1 and one.devices[0].device_kind == kind


def test_slices_are_described_without_a_tpu():
    one = topology.resolve("v5p-8")
    assert one.chips == 4 and {d.device_kind for d in one.devices} == {"TPU v5"}
    two = topology.resolve("v5e-4", slices=2)
    assert two.chips == 8 and {d.slice_index for d in two.devices} == {0, 1}
    grid = topology.device_grid(two, (2, 4, 1))  # the data axis spans the two slices
    assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]


def _ids(grid):
    return [d.id for d in grid.flat]


@pytest.mark.parametrize("name,slices,shape", [
    ("v5p-64", 1, (1, 8, 4)),  # tpu_v5p_3b's fsdp_tp4 mesh
    ("v5p-128", 1, (1, 8, 8)),  # no whole torus axes fit: one is split
    ("v5e-4", 2, (2, 4, 1))])  # multi-slice: the data axis spans the slices
def test_a_run_on_the_slice_builds_the_mesh_its_programs_were_compiled_for(name, slices, shape):
    target = topology.resolve(name, slices=slices)
    mesh_cfg = meshes.get_config("cpu")
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = shape
    run_mesh = sharding.make_mesh(mesh_cfg, target.devices)  # what the trainers call
    assert _ids(run_mesh.devices) == _ids(topology.device_grid(target, shape))


def test_every_host_of_a_v5p_64_feeds_the_rows_its_chips_hold():
    """On the flagship mesh (`study.py:tpu_v5p_3b`: fsdp 8 x tensor 4 on a v5p-64) the torus
    order gives each host two blocks of the batch, each shared with a host beside it on the
    tensor axis; a host's loader reads exactly the rows its chips hold, and every row is read."""
    config = study_configs.get_config("tpu_v5p_3b")
    target = topology.resolve("v5p-64")
    mesh, rules = sharding.make_mesh(config.mesh, target.devices), config.mesh.rules
    rows = 64
    held = sharding.batch_sharding(mesh, rules, 1).devices_indices_map((rows,))
    shares = {p: sharding.rows_of_process(mesh, rules, rows, p)
              for p in sorted({d.process_index for d in target.devices})}
    assert len(shares) == 8 and {s.count for s in shares.values()} == {rows // 4}
    assert max(len(s.blocks) for s in shares.values()) == 2  # not one block per host
    for device, (index,) in held.items():
        assert set(range(rows)[index]) <= set(shares[device.process_index].indices)
    assert set().union(*(s.indices for s in shares.values())) == set(range(rows))


def test_branched_attention_is_blocked_on_cpu_and_masked_on_a_tpu_slice():
    """Branch-by-branch attention where it was measured faster (XLA:CPU); a TPU program keeps
    the masked form (`models.attention.blocked_here`)."""
    from alignment_gap.models.attention import blocked_here
    from alignment_gap.presets import meshes

    tpu = topology.resolve("v5p-8")
    tpu_mesh = sharding.mesh_from_grid(topology.device_grid(tpu, (1, 4, 1)))
    cpu_mesh = sharding.make_mesh(meshes.get_config("cpu"))
    rules = meshes.get_config("cpu").rules
    choices = {}
    for name, mesh in (("tpu", tpu_mesh), ("cpu", cpu_mesh)):
        with sharding.use(mesh, rules):
            choices[name] = blocked_here()
    assert choices == {"tpu": False, "cpu": True}


def test_a_program_for_a_tpu_slice_skips_the_persistent_cache_and_a_local_one_keeps_it(
        tmp_path):
    """This CPU cannot load back an executable built for a TPU slice (JAX would warn and
    compile again each time), so `compile_one` neither writes nor reads JAX's persistent cache
    for one, and leaves the cache on for the programs this process runs."""
    from jax.experimental.compilation_cache import compilation_cache
    from jax.sharding import NamedSharding, PartitionSpec

    from alignment_gap.presets import meshes

    def program(mesh, rows):
        x = jax.ShapeDtypeStruct((rows, 128), "float32", sharding=NamedSharding(mesh,
                                                                                PartitionSpec()))
        return programs.Program("scaled", jax.jit(lambda a: 2.0 * a + 1.0), (x,))

    tpu = sharding.mesh_from_grid(topology.device_grid(topology.resolve("v5e-4"), (1, 4, 1)))
    cpu = sharding.make_mesh(meshes.get_config("cpu"))
    rules = meshes.get_config("cpu").rules
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = [getattr(jax.config, name) for name in names]
    for name, value in zip(names, (str(tmp_path), 0), strict=True):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        report.compile_one(program(tpu, 8), tpu, rules)
        assert list(tmp_path.glob("*-cache")) == []
        report.compile_one(program(cpu, 16), cpu, rules)
        assert len(list(tmp_path.glob("*-cache"))) == 1
    finally:
        for name, value in zip(names, saved, strict=True):
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def _build(variant, topo, **model):
    config = policy_configs.get_config(variant)
    config.mesh.data, config.mesh.fsdp = 1, -1  # every chip shards parameters and batch
    config.model.update(model)
    target = topology.resolve(topo)
    config_checks.validate(config, target.chips)
    shape = config_checks.mesh_shape(config.mesh, target.chips)
    mesh = sharding.mesh_from_grid(topology.device_grid(target, shape))
    return config, mesh


@pytest.mark.parametrize("topo", ["v5e-4", "v5p-8"])
def test_mini_online_and_offline_programs_compile_for_tpu(topo):
    for variant, expected in (("online_mini", {"init_train_state", "policy_update",
                                               "online_sample", "online_rank"}),
                              ("offline_mini", {"init_train_state", "policy_update"})):
        config, mesh = _build(variant, topo)
        (run,) = programs.build(config, mesh)
        results = report.analyse([run], None, mesh, config.mesh.rules, log=lambda _: None)
        assert {r.program.name for r in results} == expected
        for result in results:
            # At least the shards the arguments describe (TPU pads small dims to its tiles).
            assert result.argument >= report.per_device_bytes(result.program.args)
            assert result.temp >= 0 and result.code > 0 and result.peak > result.argument
        # The compiled update takes the parameters and optimizer state as annotated, and FSDP
        # over 4 chips leaves a quarter of the parameters on each (norm scales replicated).
        update = next(r for r in results if r.program.name == "policy_update").program
        compiled, _ = report.compile_one(update, mesh, config.mesh.rules)
        state = update.args[0]
        assert [s.spec for s in jax.tree.leaves(compiled.input_shardings[0][0])] == \
            [x.sharding.spec for x in jax.tree.leaves(state)]
        reference = run.resident["reference policy"]
        assert report.per_device_bytes(reference) == pytest.approx(
            report.total_bytes(reference) / 4, rel=0.03)
        assert report.per_device_bytes(state.opt_state) == pytest.approx(
            report.total_bytes(state.opt_state) / 4, rel=0.03)


def test_the_side_by_side_samples_take_the_rows_the_study_rounds_up_to():
    """On 16 batch shards the study samples 16 side-by-side posts (8, rounded up to a multiple
    of the shards): the program compiled for the slice takes 16 rows (8 failed to shard and
    stopped the tool after every other program had compiled)."""
    study = study_configs.get_config("smoke")
    study.mesh.data, study.mesh.fsdp = 1, -1
    target = topology.resolve("v5e-16")
    mesh = sharding.mesh_from_grid(topology.device_grid(
        target, config_checks.mesh_shape(study.mesh, target.chips)))
    run = programs.samples_run(study, programs.Builder(mesh, study.mesh.rules))
    (program,) = run.programs
    assert program.args[1].shape[0] == 16
    compiled, _ = report.compile_one(program, mesh, study.mesh.rules)
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def test_the_probe_stages_sample_rows_their_batch_shards_split():
    """The hypotheses' probes sample 128 prompts a call: on 256 batch shards the call takes
    256 (128 rows do not split over 256 devices), in the compiled program and the run alike."""
    study = study_configs.get_config("smoke")
    study.mesh.data, study.mesh.fsdp = 1, -1
    target = topology.resolve("v5e-256")
    mesh = sharding.mesh_from_grid(topology.device_grid(
        target, config_checks.mesh_shape(study.mesh, target.chips)))
    assert probe.chunk_rows(mesh, study.mesh.rules) == 256
    run = programs.probe_run(study, programs.Builder(mesh, study.mesh.rules),
                             "classification-stream")
    sampler = next(p for p in run.programs if p.name == "probe_sample")
    assert sampler.args[1].shape[0] == 256
    one = sharding.mesh_from_grid(topology.device_grid(topology.resolve("cpu:1"), (1, 1, 1)))
    assert probe.chunk_rows(one, study.mesh.rules) == probe.CHUNK  # unchanged on one device


def test_each_models_initialiser_is_a_program_of_its_own():
    """A golden model wider than the proxy: two preference initialisers to prove (their one
    argument is a key, so the report had kept the golden one and never compiled the proxy's)."""
    study = study_configs.get_config("smoke")
    study.golden_model.width, study.golden_model.mlp_dim = 128, 256
    mesh = sharding.mesh_from_grid(topology.device_grid(topology.resolve("cpu:1"), (1, 1, 1)))
    runs = programs.study_runs(study, programs.Builder(mesh, study.mesh.rules))
    inits = {r.name: p.key for r in runs for p in r.programs if p.name == "init_preference"}
    assert set(inits) == {"golden", "proxy"} and inits["golden"] != inits["proxy"]


def test_the_opponent_policy_counts_only_in_the_call_that_samples_it():
    """The evaluator samples its opponent once and frees it: its parameters weigh on that call,
    not on every program of the run (which had made marginal configs fail to fit)."""
    peaks = {}
    for opponent in ("", "/opponent"):
        config, mesh = _build("online_tiny", "cpu:1")
        config.eval.golden_checkpoint, config.eval.opponent_checkpoint = "/golden", opponent
        (run,) = programs.build(config, mesh)
        run.programs = [p for p in run.programs if p.name in ("eval_sample", "policy_update")]
        results = report.analyse([run], None, mesh, config.mesh.rules, log=lambda _: None)
        peaks[opponent] = {r.program.name: r.peak for r in results}
    policy = report.per_device_bytes(run.resident["policy train state"].params)
    assert "opponent policy" not in run.resident
    assert peaks["/opponent"]["eval_sample"] >= peaks[""]["eval_sample"] + policy
    assert peaks["/opponent"]["policy_update"] == peaks[""]["policy_update"]


def _costs(config, mesh):
    (run,) = programs.build(config, mesh)
    variants = tuple(programs.build(depth_variant(config, n), mesh) for n in (1, 2))
    (result,) = [r for r in report.analyse([run], variants, mesh, config.mesh.rules,
                                           log=lambda _: None)
                 if r.program.name == "policy_update"]
    return result.costs, report.compiled_costs(result.program, mesh, config.mesh.rules)


def test_costs_count_every_layer_and_slice_where_xla_counts_a_loop_once():
    config, mesh = _build("offline_tiny", "v5e-4", num_layers=3)
    config.microbatches = 1
    unrolled, direct = _costs(config, mesh)
    # Unrolled and in one slice, the compiler counts everything: extrapolation agrees.
    assert unrolled.flops == pytest.approx(direct.flops, rel=0.01)
    config, mesh = _build("offline_tiny", "v5e-4", num_layers=3, scan_layers=True)
    config.microbatches = 2
    scanned, direct = _costs(config, mesh)
    assert direct.flops < 0.6 * unrolled.flops  # XLA: one layer of one slice
    assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02)


def test_a_samplers_costs_count_its_steps_once_each():
    """Two new tokens: the prefill, one loop step, the last draw; the whole unrolled program
    counts exactly that, so the estimate must equal it. (The estimate had multiplied the noise
    drawn before the loop, and one step too many, by the steps: 2x here, 2.8x at mini.)"""
    config, mesh = _build("online_tiny", "v5e-4", num_layers=3)
    config.data.response_len = 2
    sampler = [[p for p in run.programs if p.name == "online_sample"][0]
               for (run,) in (programs.build(c, mesh) for c in (
                   config, depth_variant(config, 1), depth_variant(config, 2)))]
    costs = report.program_costs(tuple(sampler[1:]), 3, mesh, config.mesh.rules)
    direct = report.compiled_costs(sampler[0], mesh, config.mesh.rules)
    assert costs.flops == pytest.approx(direct.flops, rel=0.02)


def _compile_tool(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "alignment_gap.compile", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_a_config_that_does_not_fit_fails_in_one_line_with_remedies(tmp_path):
    # Four 1B-parameter layers with AdamW on four 16 GiB chips: 4 GiB of parameters, twice
    # that of Adam moments and the reference's 4 GiB on every chip before any activation.
    out = _compile_tool("--config", "configs/policy.py:offline_tiny", "--topology", "v5e-4",
                        "--nocosts", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                        "--config.model.width=8192", "--config.model.mlp_dim=32768",
                        "--config.model.num_heads=64", "--config.model.num_kv_heads=64",
                        "--config.model.num_layers=4", "--config.model.scan_layers=True",
                        "--out", str(tmp_path / "big.json"))
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    # The TPU compiler itself refuses the update step (its temporaries do not fit beside its
    # arguments); the line says so with the compiler's figures and what would help.
    assert last.startswith("error: policy_update (policy) does not compile for TPU v5e: "
                           "RESOURCE_EXHAUSTED"), last
    assert "exceeds available HBM" in last
    assert "model.remat=full" in last and "a larger slice" in last and "micro-batches" in last
    assert (tmp_path / "big.json").exists()  # the report is written all the same


def test_remedies_name_the_fields_of_the_model_and_trainer_that_ran_out():
    study = study_configs.get_config("smoke")
    golden = remedies({"program": "preference_update", "peak_run": "golden"}, study, (1, 8, 1))
    assert "golden_model.remat=full" in golden
    assert not any("micro-batches" in r for r in golden)  # the preference trainer has none
    policy = remedies({"program": "policy_update", "peak_run": "online-s0"}, study, (1, 8, 1))
    assert {"more micro-batches (policy.microbatches)", "model.remat=full"} <= set(policy)


def test_a_mesh_the_slice_cannot_hold_is_a_config_error():
    out = _compile_tool("--config", "configs/policy.py:offline_tiny", "--topology", "v5e-4",
                        "--config.mesh.data=8")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: config.mesh:")


def test_a_run_sampling_at_another_temperature_compiles_the_kls_own_sampler():
    """Evaluations draw the KL's samples from the policy itself where the run samples
    otherwise (`evaluation.kl_sampling`): that sampler is one more program to prove."""
    names = {}
    for temperature in (1.0, 0.7):
        config, mesh = _build("online_tiny", "cpu:1")
        config.eval.golden_checkpoint = "/golden"  # evaluations on: a judge is configured
        config.sampling.temperature = temperature
        (run,) = programs.build(config, mesh)
        names[temperature] = {p.name for p in run.programs}
    assert names[0.7] - names[1.0] == {"eval_kl_sample"} and "eval_sample" in names[1.0]
