"""The study from one command: the smoke preset end to end, its caching, and a study stopped
mid-way (preempted, killed) that reruns to the same results."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from alignment_gap import run_dir
from alignment_gap.metrics import read_jsonl
from alignment_gap.study import pipeline, results, scheduler
from alignment_gap.study.hypotheses import coverage
from bench import chaos
from configs import study as study_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    args = [sys.executable, "-m", "alignment_gap.main", "--config",
            os.path.join(ROOT, "configs", "study.py:smoke"), "--workdir", str(workdir),
            f"--config.data.dir={workdir / 'data'}"]
    # Compile logs name every program the study runs (test_aot_report_holds_every_program...).
    env = dict(os.environ, JAX_LOG_COMPILES="1")
    first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return workdir, args, first


def test_smoke_study_writes_table_plot_and_report(smoke):
    workdir, _, first = smoke
    rows = json.loads((workdir / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert methods == {"online", "offline"}
    for method in methods:
        steps = sorted(r["step"] for r in rows if r["method"] == method)
        assert steps == [0, 6, 12]  # the starting point and every checkpoint
    start = [r for r in rows if r["step"] == 0]
    assert all(r["kl"] == pytest.approx(0.0, abs=1e-4) for r in start)  # SFT itself: no KL
    assert all(0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["oracle_win_rate"] <= 1.0 for r in rows)
    assert (workdir / "frontier.png").stat().st_size > 10_000
    report = (workdir / "report.md").read_text()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["verdict"] in report and "## Online minus offline at matched KL" in report
    assert summary["verdict"] == first.stdout.splitlines()[-2]  # the verdict is printed
    places = re.findall(r"^== stage \S+ -> \S+  \((\d+) of (\d+)\)$", first.stdout, re.M)
    assert [int(k) for k, _ in places] == list(range(1, len(places) + 1))  # k of n, in order
    assert {int(n) for _, n in places} == {len(places)}
    config = study_configs.get_config("smoke")  # beside the report: the config it is of
    config.data.dir = str(workdir / "data")
    assert json.loads((workdir / "config.json").read_text()) == json.loads(
        json.dumps(config.to_dict()))
    # Every evaluation's per-prompt outcomes are on disk, and the verdict follows from them:
    # the golden judge's and the oracle's, each with its interval.
    stage = next(r["stage"] for r in rows if r["method"] == "online")
    online = next((workdir / "stages").glob(f"{stage}-*"))
    assert sorted(os.listdir(online / "outcomes")) == [f"step_{s}.npz" for s in (0, 12, 6)]
    comparison = summary["comparison"]
    assert set(comparison["rows"]) == {"golden", "oracle"}
    for judge in ("golden", "oracle"):
        for row in comparison["rows"][judge]:
            assert row["verdict"] in ("online better", "offline better", "undecided")
            if row["verdict"] != "undecided":
                assert row["low"] > 0 or row["high"] < 0
    assert "golden judge: online minus offline" in summary["verdict"]
    # Chosen on the runs' 32 evaluation prompts, scored on the test stage's 32 others: at the
    # largest budget each method's number is the test score of the checkpoint that the
    # selection prompts rate best (the test stage scored it: a candidate).
    assert comparison["test_stage"] and comparison["prompts"] == {"selection": 32, "test": 32}
    assert "What the selection prompts chose there" in report
    outside = comparison["outside_candidates"]
    assert set(outside) == {"online", "offline"} and all(0 <= v <= 1 for v in outside.values())
    assert f"{outside['online']:.1%} of online's and " in report
    assert comparison["chosen"]["offline"][-1][0].startswith(("lr 0.0005, beta 0.1, step",
                                                              "SFT (step 0)"))
    (test_dir,) = (workdir / "stages").glob("test-*")
    for method in ("online", "offline"):
        evaluations = {(d.name, int(f.stem[5:])): np.load(f) for d in (workdir / "stages").glob(
            f"{method}-*") for f in (d / "outcomes").glob("step_*.npz")}
        (run, step), _ = max(evaluations.items(),  # ties: the least KL, as compare's order
                             key=lambda kv: (kv[1]["win"].mean(), -kv[1]["kl"].mean()))
        scored = test_dir / "scored" / ("start-s0" if step == 0 else run.rsplit("-", 1)[0])
        test_win = np.load(scored / "outcomes" / f"step_{step}.npz")["win"]
        assert comparison["rows"]["golden"][-1][method] == pytest.approx(test_win.mean())
    # Beside it, the same comparison through mixtures of two checkpoints; at the largest
    # budget no checkpoint lies beyond, so there it is the single-checkpoint comparison.
    mixed = summary["comparison_interpolated"]
    assert mixed["interpolated"] and mixed["budgets"] == comparison["budgets"]
    assert "### Through mixtures of two checkpoints" in report
    assert mixed["rows"]["golden"][-1] == comparison["rows"]["golden"][-1]
    # How far the golden judge is from the truth, on its own D_golden pairs (synthetic world).
    graded = summary["golden model agreement with the oracle on D_golden pairs"]
    assert set(graded) == {"validation", "test"} and all(0.5 < v <= 1.0 for v in graded.values())
    shown = ", ".join(f"{split} {value:.3f}" for split, value in graded.items())
    assert f"- golden model agreement with the oracle on D_golden pairs: {shown}\n" in report
    assert "oracle: online minus offline" in summary["verdict"]
    # ... and on the samples the policies produce (their evaluations against the SFT policy).
    on_samples = summary["golden model agreement with the oracle on policy-vs-opponent samples"]
    assert set(on_samples) == {"online", "offline"}
    for method, rates in on_samples.items():
        outcomes = [np.load(f) for f in (workdir / "stages").glob(f"{method}-*/outcomes/step_12*")]
        last = np.mean(np.concatenate([1 - np.abs(o["win"] - o["oracle_win"])  # ties: half
                                       for o in outcomes]))
        assert rates["last evaluations"] == pytest.approx(last, abs=1e-3)
        assert 0.0 <= rates["all evaluations"] <= 1.0
    timings = json.loads((workdir / "timings.json").read_text())
    assert {"sft", "golden", "relabel", "proxy"} <= set(timings)
    samples = json.loads((workdir / "samples.json").read_text())["samples"]
    assert {"prompt", "sft", "online", "offline"} <= set(samples[0])


# JAX's own operations that the study runs eagerly, outside any program of ours (host-side
# arithmetic on results, PRNG keys). Every other name in the compile log is a program.
EAGER_OPS = {"_mean", "_reduce_sum", "_threefry_fold_in", "_threefry_seed", "_threefry_split",
             "_where", "add", "broadcast_in_dim", "convert_element_type", "dynamic_slice",
             "stage", "true_divide", "unstack"}
# Programs of a one-device CPU mesh only, which the tool's multi-device meshes never run, and
# the program each stands in for: the merge of side-by-side groups (`cpu_groups`; none), the
# policy update's groups and their mean (`train/state.py`).
ONE_CPU_PROGRAMS = {"merge_groups": None, "policy_update_group": "policy_update",
                    "policy_update_apply": "policy_update"}


def test_aot_report_holds_every_program_the_smoke_study_runs(smoke, tmp_path):
    """The ahead-of-time tool compiles exactly the programs a real run compiles: a new jitted
    program in a trainer that the tool does not build fails here."""
    workdir, _, first = smoke
    log = (workdir / "log.txt").read_text()  # library logging, jax's compile log included
    ran = {ONE_CPU_PROGRAMS.get(name, name) for name in re.findall(
        r"Compiling jit\((\w+)\)", log)} - EAGER_OPS - {None}
    # Which programs, not how they compile for a TPU (tests/test_aot.py does that): 4 fake CPU
    # devices at the tests' quick XLA settings (24 s here against 49 s for v5e-4).
    out = subprocess.run([sys.executable, "-m", "alignment_gap.compile", "--config",
                          "configs/study.py:smoke", "--topology", "cpu:4", "--nocosts",
                          "--out", str(tmp_path / "smoke.json")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = {p["program"] for p in json.loads((tmp_path / "smoke.json").read_text())[
        "programs"]}
    assert ran == compiled, (sorted(ran - compiled), sorted(compiled - ran))
    # libtpu is installed (the test extra) but this CPU run never probed for a TPU.
    assert not re.search(r"TPU_ACCELERATOR_TYPE|libtpu|backend 'tpu'", log + first.stderr)


def test_a_preempted_study_resumes_to_the_same_results(smoke):
    """SIGTERM during the online run: that step is saved, the study exits 75 (requeue), and
    the same command finishes it with the uninterrupted study's results to the last digit.
    The finished smoke study is the reference: its online run and results are removed, so only
    they run again (the module's later tests find the study whole again)."""
    workdir, args, _ = smoke
    outputs = ("results.json", "results.csv", "samples.json")
    expected = {name: (workdir / name).read_text() for name in outputs}
    (online,) = (workdir / "stages").glob("online-s0-*")
    logged = lambda: [(r["step"], r["loss"], r["grad_norm"], r["kl_sequence"])
                      for r in read_jsonl(online / "metrics.jsonl") if "loss" in r]
    expected_log = logged()
    shutil.rmtree(online)
    for name in outputs:
        (workdir / name).unlink()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    running = False
    for line in proc.stdout:
        running = running or line.startswith("== stage online")
        if running and re.match(r"step \d+/", line):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    assert (online / "PREEMPTED.json").exists() and not (online / "FAILED.json").exists()
    assert not any((workdir / name).exists() for name in outputs)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== stage sft " not in done.stdout and "== stage online" in done.stdout
    for name in outputs:
        assert (workdir / name).read_text() == expected[name], name
    # Each logged line averages the same steps (those before the signal came from its record).
    assert logged() == expected_log and len(expected_log) >= 2


def test_killed_at_seeded_moments_the_study_reruns_to_the_same_results(smoke, tmp_path):
    """SIGKILL (no handler runs) at two moments a seeded generator draws over the policy runs,
    then the same command to the end: results, samples, recorded streams and report numbers
    equal the undisturbed study's (`bench/chaos.py --kills 50` does this at length)."""
    workdir, _, _ = smoke
    reference = tmp_path / "reference"
    shutil.copytree(workdir, reference, ignore=shutil.ignore_patterns(
        "data", "jax_cache", "checkpoints", "tensorboard"))
    timings = json.loads((workdir / "timings.json").read_text())
    runs = [d for d in (workdir / "stages").iterdir() if d.name.startswith(("online", "offline"))]
    window = sum(timings[d.name.rsplit("-", 1)[0]] for d in runs)  # this machine, this sitting
    for d in runs:
        shutil.rmtree(d)
    for name in ("results.json", "results.csv", "samples.json", "report.md"):
        (workdir / name).unlink()
    config, rng, landed = os.path.join(ROOT, "configs", "study.py:smoke"), random.Random(0), []
    for _ in range(2):
        # Early in the window: it was measured cold, the rerun compiles from a warm cache.
        status, stage = chaos.run(config, str(workdir), rng.uniform(0.1, 0.5) * window + 3.0)
        if status == -9:
            landed.append(stage)
    assert landed, "no kill landed: the study finished before the drawn moments"
    status, _ = chaos.run(config, str(workdir), None)
    assert status == 0
    assert chaos.differences(str(reference), str(workdir)) == [], landed


def test_upstream_draws_repeat_the_main_study_in_another_world(smoke, tmp_path):
    """`upstream_chains=2` in the smoke study's workdir: chain 0's stages are reused (same
    keys), chain 1's run under `-u1` names with the world, SFT, golden and proxy seeds moved
    on by one, and the verdict's interval is over the two draws' differences. (The smoke
    study's own outputs are put back afterwards for the module's later tests.)"""
    workdir, args, _ = smoke
    kept = tmp_path / "kept"
    shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("data", "jax_cache", "stages",
                                                                 "sweep"))
    out = subprocess.run(args + ["--config.upstream_chains=2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    summary = json.loads((workdir / "summary.json").read_text())
    rows = json.loads((workdir / "results.json").read_text())
    report = (workdir / "report.md").read_text()
    for path in kept.iterdir():
        shutil.copy(path, workdir / path.name)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = re.findall(r"^== stage (\S+) ", out.stdout, re.M)
    assert ran and all(name.endswith("-u1") for name in ran), ran
    assert {"sft-u1", "golden-u1", "relabel-u1", "proxy-u1", "test-u1"} <= set(ran)
    (sft,) = (workdir / "stages").glob("sft-u1-*")
    config = json.loads((sft / "config.json").read_text())
    assert (config["data"]["world_seed"], config["seed"]) == (1, 1)
    assert (summary["comparison"]["chains"], summary["comparison"]["units"]) == (2, 2)
    assert "over the differences of 2 upstream draws" in summary["verdict"]
    proxies = summary["proxy model validation accuracy (vs D_golden labels)"]  # each draw's
    assert set(proxies) == {"draw 0", "draw 1"} and proxies["draw 0"] != proxies["draw 1"]
    assert "- upstream draws 0-1: the world, SFT, golden and proxy seeds shifted" in report
    assert {(r["method"], r["chain"]) for r in rows} == {(m, c) for m in ("online", "offline")
                                                         for c in (0, 1)}


def test_stacked_offline_runs_equal_runs_trained_alone_and_resume(smoke, tmp_path):
    """The smoke study's offline sweep widened to two learning rates and trained as one
    stacked program (`sweep.stack_runs=2`) in a copy of the finished study, SIGTERM sent as the
    stack starts: both runs save their first step and the study exits 75; the same command
    finishes them, and the run the smoke study trained alone (lr 5e-4) logs the same losses
    and evaluations within float tolerance. Then both runs are reopened with the second one's
    last checkpoint gone (a kill between two runs' saves): the stack resumes from the step
    both saved and ends where it ended; and with the first one's last checkpoint damaged."""
    workdir, args, _ = smoke
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("data", "jax_cache"))
    main_runs = "offline-s0-*-n12-" + "[0-9a-f]" * 10  # not an upstream draw's (-u1-)
    (alone,) = (workdir / "stages").glob(main_runs)
    shutil.rmtree(copy / "stages" / alone.name)
    args = [str(copy) if a == str(workdir) else a for a in args] + [
        "--config.offline_learning_rates=[0.0005,0.001]", "--config.sweep.stack_runs=2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    announced = []
    for line in proc.stdout:  # the signal lands while the stack loads and compiles
        announced += re.findall(r"^== stage (offline\S+) .*stacked, (\d) of 2\)$", line)
        if len(announced) == 2:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    assert announced == [(alone.name.rsplit("-", 1)[0], "1"), ("offline-s0-lr0.001-b0.1-n12", "2")]
    runs = sorted((copy / "stages").glob(main_runs))  # lr 0.0005, then 0.001
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "PREEMPTED.json").read_text())["step"] == 1
        assert not (run / run_dir.DONE).exists()
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def log(run):
        return [{k: v for k, v in r.items() if not k.endswith("_per_s")}
                for r in read_jsonl(run / "metrics.jsonl")]

    expected, stacked = log(alone), log(runs[0])
    assert [r["step"] for r in stacked] == [r["step"] for r in expected]
    # Classifier accuracy counts the signs of margins, whose float noise may cross zero. At
    # step 1 the policy is the reference and every margin is zero up to that noise: each of the
    # step's 8 pairs may score 0, 1/2 or 1 in either run, so the first logged mean (6 steps, 48
    # pairs) may move by up to 8/48; the tolerance allows half of that, and later a margin near
    # zero may flip, 1/48 a pair (on a 2-core AMD EPYC VM, 2026-12-06: 0.635 against 0.625 at
    # step 6).
    signs = {"classifier_accuracy": {6: 5 / 48 + 1e-6, 12: 1 / 48 + 1e-6}}
    for a, b in zip(expected, stacked, strict=True):
        assert a.keys() == b.keys()
        for name, value in a.items():
            # A batched matmul may sum in another order: Adam turns that into ~1e-4 moves.
            tolerance = signs.get(name, {}).get(a["step"], 1e-3)
            assert b[name] == pytest.approx(value, rel=1e-3, abs=tolerance), (a["step"], name)
    assert log(runs[1]) != stacked  # the other learning rate trained its own run
    assert run_dir.read_outcomes(str(runs[0])).keys() == run_dir.read_outcomes(str(alone)).keys()

    finished = [log(run) for run in runs]
    results_json = (copy / "results.json").read_text()
    for run in runs:
        (run / run_dir.DONE).unlink()
    shutil.rmtree(runs[1] / "checkpoints" / "12")
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    steps = [int(k) for k in re.findall(r"^step (\d+)/12", again.stdout, re.M)]
    assert steps and min(steps) > 6  # both resumed from step 6
    assert [log(run) for run in runs] == finished
    assert (copy / "results.json").read_text() == results_json

    # The first run's last checkpoint damaged: the stack is given up before any step and each
    # run resumes alone, the damaged step set aside (as a run alone does).
    for run in runs:
        (run / run_dir.DONE).unlink()
    for chunk in (runs[0] / "checkpoints" / "12" / "params").rglob("d/*"):
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
    damaged = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert damaged.returncode == 0, damaged.stdout[-3000:] + damaged.stderr[-3000:]
    assert "these runs resume one by one" in damaged.stderr
    assert (runs[0] / "checkpoints" / "12.damaged").is_dir()
    assert all(run_dir.is_finished(str(run), 12) for run in runs)
    assert log(runs[1]) == finished[1]  # it had its step 12: nothing to train
    for a, b in zip(finished[0], log(runs[0]), strict=True):  # steps 7-12 again, alone
        assert b == pytest.approx(a, rel=1e-3, abs=1e-3), a["step"]


def test_finished_study_is_not_rerun_even_from_a_moved_copy(smoke, tmp_path):
    workdir, args, _ = smoke
    moved = tmp_path / "moved"  # its datasets stay where they were (data.dir)
    shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns("jax_cache"))
    stamp = (moved / "timings.json").read_text()
    args = [str(moved) if a == str(workdir) else a for a in args]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "every stage is already finished" in again.stdout
    assert (moved / "timings.json").read_text() == stamp


def test_a_relabel_stage_whose_dataset_was_deleted_runs_again(smoke, tmp_path):
    """D_golden lives under data.dir, outside the relabel stage's directory: with it deleted
    (data.dir cleared, or moved), the stage is not finished, so the study writes it again
    instead of stopping at the proxy with "no dataset ... run the stage that writes it"."""
    workdir, _, _ = smoke
    config = study_configs.get_config("smoke")
    config.data.dir = str(workdir / "data")
    plan = pipeline.build_plan(config, str(workdir))
    assert scheduler.finished(plan.relabel, str(workdir))
    dataset = workdir / "data" / "comparisons" / plan.golden_data
    os.rename(dataset, tmp_path / "aside")
    try:
        assert not scheduler.finished(plan.relabel, str(workdir))
        assert scheduler.finished(plan.proxy, str(workdir))  # its outputs are in its directory
    finally:
        os.rename(tmp_path / "aside", dataset)


def test_changing_a_stage_reruns_it_and_what_depends_on_it_only(tmp_path):
    base = study_configs.get_config("smoke")
    changed = study_configs.get_config("smoke")
    changed.proxy.steps = 41
    keys = lambda c: {s.name: s.key for s in pipeline.build_plan(c, str(tmp_path)).stages}
    a, b = keys(base), keys(changed)
    assert a["sft"] == b["sft"] and a["golden"] == b["golden"] and a["relabel"] == b["relabel"]
    assert a["proxy"] != b["proxy"]
    online = [n for n in a if n.startswith("online")]
    offline = [n for n in a if n.startswith("offline")]
    assert online and all(a[n] != b[n] for n in online)  # reads the proxy
    assert offline and all(a[n] == b[n] for n in offline)  # does not


@pytest.mark.parametrize("variant", ["smoke_hypotheses", "paper"])
def test_stage_keys_do_not_depend_on_where_the_workdir_lies(variant, tmp_path, monkeypatch):
    """A workdir moved, or named relative, absolute or with `./`, keeps its finished stages:
    paths into upstream stages' directories (SFT, proxy, streams) count as those stages."""
    config = study_configs.get_config(variant)
    config.upstream_chains = 2
    monkeypatch.chdir(tmp_path)
    keys = [{s.name: s.key for s in pipeline.build_plan(config, w).stages}
            for w in ("study", "./study", str(tmp_path / "study"), "/elsewhere/moved")]
    assert all(k == keys[0] for k in keys[1:])
    plan = pipeline.build_plan(config, "/w")
    # ... and a path still counts: an online run reads its proxy's directory, so a changed
    # proxy config changes it (test_changing_a_stage_reruns_it... checks the config side).
    online = plan.online(config.seeds[0])
    assert online.config.proxy_checkpoint == plan.dir(plan.proxy)
    keys = [u.key for u in online.upstream]
    assert "/w" not in json.dumps(scheduler._relocatable(online.config.to_dict(),
                                                         online.upstream, keys))


def test_stage_keys_do_not_depend_on_the_process_settings(tmp_path):
    """Each process of one job is given its own process_id (local_multiprocess.py): they must
    name the same stage directories; grain's reader threads change no record either. A stage
    an older study keyed with those settings is still found."""
    config = study_configs.get_config("smoke")
    config.data.dir = str(tmp_path / "data")
    one = {s.name: s.key for s in pipeline.build_plan(config, str(tmp_path)).stages}
    config.distributed.update(coordinator_address="127.0.0.1:1234", num_processes=2,
                              process_id=1, local_cpu_devices=1)
    config.data.num_threads = 8
    plan = pipeline.build_plan(config, str(tmp_path))
    assert {s.name: s.key for s in plan.stages} == one
    old = os.path.join(str(tmp_path), "stages", f"sft-{plan.sft.full_key}")
    assert plan.sft.full_key != plan.sft.key
    os.makedirs(old)
    run_dir.finish(old, step=plan.sft.config.num_steps)
    plan = pipeline.build_plan(config, str(tmp_path))
    assert plan.dir(plan.sft) == old and scheduler.finished(plan.sft, str(tmp_path))
    # Relabel too, with the D_golden it wrote (named by its directory's key), so what reads it
    # (the proxy) keeps its older key as well.
    relabel = plan.relabel
    run_dir.finish(os.path.join(str(tmp_path), "stages", f"relabel-{relabel.full_key}"))
    info = tmp_path / "data" / "comparisons" / f"d_golden-{relabel.full_key}" / "1.0.0"
    info.mkdir(parents=True)
    (info / "dataset_info.json").write_text("{}")
    plan = pipeline.build_plan(config, str(tmp_path))
    assert plan.golden_data == f"d_golden-{relabel.full_key}"
    assert scheduler.finished(plan.relabel, str(tmp_path))


def test_a_study_written_with_legacy_keys_is_found_and_continued(tmp_path):
    """Stage directories an older study named with keys that hashed the workdir's paths are
    found (a finished one is not rerun), and downstream stages read them."""
    config = study_configs.get_config("smoke_hypotheses")
    workdir = str(tmp_path)
    plan = pipeline.build_plan(config, workdir)
    assert plan.sft.legacy_key == plan.sft.key  # no path in its config: one key
    assert plan.proxy.legacy_key != plan.proxy.key  # its config holds SFT's directory
    for pick in (lambda p: p.proxy, lambda p: p.online(config.seeds[0])):
        # As the older code left them, upstream first (its paths named legacy directories):
        stage = pick(pipeline.build_plan(config, workdir))
        old = os.path.join(workdir, "stages", f"{stage.name}-{stage.legacy_key}")
        os.makedirs(old)
        run_dir.finish(old, step=stage.config.get("num_steps", 1))
    plan = pipeline.build_plan(config, workdir)
    online = plan.online(config.seeds[0])
    assert plan.dir(plan.proxy).endswith(f"proxy-{plan.proxy.legacy_key}")
    assert online.config.proxy_checkpoint == plan.dir(plan.proxy)
    assert plan.dir(online).endswith(online.legacy_key)  # its legacy key is the older code's
    assert scheduler.finished(online, workdir) and not scheduler.finished(plan.golden, workdir)
    quality = next(s for s in plan.stages if s.name == "quality-data")
    key = quality.directory_key(workdir)
    assert key == quality.key  # not run before: the new key, and its datasets named by it
    assert set(quality.meta["datasets"].values()) == {f"{t}-{key}" for t in
                                                      ("d_4k_vs_4k", "d_sft_vs_800",
                                                       "d_800_vs_4k")}


def test_a_legacy_study_moved_elsewhere_is_found_under_its_new_name(tmp_path):
    """An older study's keys hashed the workdir's name; moved, its stages are found by the name
    their recorded configs point into (so nothing reruns), and a stage not run before is
    still new there."""
    config = study_configs.get_config("smoke_hypotheses")
    before, after = str(tmp_path / "before"), str(tmp_path / "after")
    for pick in (lambda p: p.sft, lambda p: p.proxy, lambda p: p.online(config.seeds[0])):
        stage = pick(pipeline.build_plan(config, before))  # upstream first, as it ran
        old = os.path.join(before, "stages", f"{stage.name}-{stage.legacy_key}")
        os.makedirs(old)
        run_dir.write_json(old, "config.json", stage.config.to_dict())  # as trainers do
        run_dir.finish(old, step=stage.config.get("num_steps", 1))
    shutil.move(before, after)
    assert scheduler.previous_names(after) == [before]
    plan = pipeline.build_plan(config, after)
    online = plan.online(config.seeds[0])
    assert plan.dir(online).startswith(os.path.join(after, "stages", "online-"))
    assert scheduler.finished(plan.proxy, after) and scheduler.finished(online, after)
    assert online.config.proxy_checkpoint == plan.dir(plan.proxy)  # reads the moved proxy
    assert plan.dir(plan.golden).endswith(plan.golden.key)  # never run: a new directory
    assert not scheduler.finished(plan.golden, after)


def test_an_online_beta_sweep_adds_runs_and_keeps_policy_betas_run(tmp_path):
    base = study_configs.get_config("smoke")
    swept = study_configs.get_config("smoke")
    swept.online_betas = [swept.policy.beta, 1.0]
    runs = lambda c: {s.name: s for s in pipeline.build_plan(c, str(tmp_path)).stages
                      if s.meta.get("method") == "online"}
    a, b = runs(base), runs(swept)
    assert set(b) == set(a) | {f"{n}-b1" for n in a}
    assert all(b[n].key == a[n].key for n in a)  # the policy.beta runs are reused
    for name in a:
        assert b[f"{name}-b1"].config.beta == 1.0 and b[f"{name}-b1"].meta["beta"] == 1.0
        assert b[f"{name}-b1"].key != a[name].key


def test_the_report_says_where_the_stop_rule_ended_the_online_runs(tmp_path):
    c = study_configs.get_config("smoke")
    c.seeds, c.online_betas = [0, 1], [c.policy.beta, 1.0]
    plan = pipeline.build_plan(c, str(tmp_path))
    assert results.online_ends(plan.stages, str(tmp_path), c.policy) is None  # rule off
    c.policy.stop_after_falls, c.policy.stop_margin, c.policy.kl_cap = 2, 0.025, 8.0
    plan = pipeline.build_plan(c, str(tmp_path))
    online = [s for s in plan.stages if s.meta.get("method") == "online"]
    assert len(online) == 4
    for stage, step, fired in zip(online, (6, 12, 12, 12), (True, True, False, False),
                                  strict=True):
        run_dir.finish(stage.directory(str(tmp_path)), step, stopped_early=fired)
    assert results.online_ends(plan.stages, str(tmp_path), c.policy) == (
        "the rule (the golden win rate below its best by over 0.025 at 2 evaluations or KL "
        "over 8 nats) stopped 1 of 4 before step 12 (at steps [6]); 3 ran all 12 steps (the "
        "rule fired at the last one in 1)")
    c.policy.stop_after_falls, c.policy.stop_margin = 0, 0.0  # the cap alone
    assert results.online_ends(plan.stages, str(tmp_path), c.policy).startswith(
        "the rule (KL over 8 nats) stopped 1 of 4")


def test_replays_are_measured_against_the_main_sweeps_run_at_their_learning_rate(tmp_path):
    """Where the main offline sweep has a run at the replays' (online's) learning rate, beta and
    length, the coverage variant compares against that run instead of training it twice."""
    c = study_configs.get_config("smoke_coverage")
    lr = c.online_learning_rates[0]
    names = lambda plan: {s.name for s in plan.stages}
    assert any(n.startswith("offline_same_lr") for n in names(pipeline.build_plan(c, "/w")))
    c.offline_learning_rates = [*c.offline_learning_rates, lr]
    plan = pipeline.build_plan(c, str(tmp_path))
    same_lr = coverage.runs(plan)["offline_same_lr"]
    assert [r.meta["seed"] for r in same_lr] == list(c.seeds)
    assert all(r in plan.main_runs("offline") and r.meta["learning_rate"] == lr
               for r in same_lr)
    assert not any(n.startswith("offline_same_lr") for n in names(plan))


def test_a_plan_refuses_to_train_one_run_twice_under_two_names(tmp_path):
    """A variant that re-adds a main run under its own name (the duplicate `offline_same_lr`
    runs coverage once trained) is an error naming both stages, not a second identical run."""
    plan = pipeline.build_plan(study_configs.get_config("smoke"), str(tmp_path))
    run = plan.main_runs("offline")[0]
    twin = pipeline.Stage("offline_again-s0", run.config, run.run, run.upstream)
    with pytest.raises(ValueError, match=f"'offline_again-s0' would train '{run.name}' again"):
        plan.add(twin)
    assert plan.add(pipeline.Stage(run.name, run.config, run.run, run.upstream)) is run


def test_offline_runs_of_one_seed_and_length_stack_and_a_stack_stays_on_one_shard(tmp_path):
    """`sweep.stack_runs`: the paper plan's offline grid stacks per seed (online runs never);
    a stack is cut at `stack_runs` runs and the sweep's shards take whole stacks."""
    plan = pipeline.build_plan(study_configs.get_config("paper"), str(tmp_path))
    assert all(len(u) == 1 for u in scheduler.units(plan.stages, 1))
    units = scheduler.units(plan.stages, 5)
    offline = [u for u in units if u[0].meta["method"] == "offline"]
    assert all(len(u) == 1 for u in units if u[0].meta["method"] == "online")
    assert [len(u) for u in offline] == [5, 5, 2] * 5  # 12 runs per seed (4 lr x 3 beta)
    for unit in offline:
        assert len({(s.meta["seed"], s.meta["steps"]) for s in unit}) == 1
        assert len({(s.meta["learning_rate"], s.meta["beta"]) for s in unit}) == len(unit)
    owners = scheduler.owner(plan.stages, 3, 5)
    assert all(len({owners[s.name] for s in unit}) == 1 for unit in units)
    assert {owners[u[0].name] for u in offline} == {0, 1, 2}


def test_the_probes_sample_as_the_online_runs_do(tmp_path):
    """The hypotheses' samples (quality datasets, coverage, classification) come from the
    online runs' sampling: temperature, top-k and top-p."""
    import types

    from alignment_gap.study.hypotheses import probe

    c = study_configs.get_config("smoke_hypotheses")
    c.policy.temperature, c.policy.top_k, c.policy.top_p = 0.7, 5, 0.9
    plan = pipeline.build_plan(c, str(tmp_path))
    tokenizer = types.SimpleNamespace(eos_id=1, pad_id=0, stop_ids=(1, 7))
    cfg = probe.probe_sampling(plan, tokenizer)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.eos_id,
            cfg.stop_ids) == (0.7, 5, 0.9, c.data.response_len, 1, (7,))


def test_hypothesis_variants_reuse_the_study_and_end_with_a_verdict_table(smoke):
    workdir, args, _ = smoke
    before = json.loads((workdir / "timings.json").read_text())
    hyp_args = [a.replace("study.py:smoke", "study.py:smoke_hypotheses") for a in args]
    out = subprocess.run(hyp_args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "== stage sft " not in out.stdout and "== stage online-s0" not in out.stdout
    timings = json.loads((workdir / "timings.json").read_text())
    assert all(timings[name] == sec for name, sec in before.items())  # shared stages reused
    for stage in ("tandem-s0", "shuffled-s0", "quality-data", "d_sft_vs_800-s0",
                  "classification-stream", "online-best_of_two-s0", "shuffled_b2-s0", "sft-nano",
                  "online-nano-s0", "window4-s0", "offline_same_lr-s0-lr0.0002"):
        assert any(name.startswith(stage) for name in timings), stage
    report = (workdir / "report.md").read_text()
    table = report[report.index("## Verdicts: what the paper found"):]
    summary = json.loads((workdir / "summary.json").read_text())["hypotheses"]
    assert [f["name"] for f in summary] == list(study_configs.HYPOTHESES)
    for finding in summary:
        assert "## Hypothesis" in report and finding["title"] in report
        assert finding["verdicts"]
        for verdict in finding["verdicts"]:  # every verdict row lands in the closing table
            assert f"| {finding['name']} | {verdict['claim']} |" in table
    for figure in ("coverage.png", "quality.png", "classification.png", "noncontrastive.png",
                   "scaling.png"):
        assert (workdir / figure).stat().st_size > 10_000, figure
    # Tandem replay retraces the online run it replays (the token stream is exact).
    coverage = next(f for f in summary if f["name"] == "coverage")
    assert coverage["verdicts"][0]["agree"] is True, coverage["verdicts"][0]
    # A replay's gain is measured against offline on D_golden at its own learning rate.
    assert "offline at the same learning rate" in coverage["verdicts"][1]["ours"] or (
        coverage["verdicts"][1]["agree"] is None)
    # Every verdict past the tandem check states the interval it follows from: matched-KL
    # differences for the replays and the quality datasets, counted intervals for classifiers.
    quality = next(f for f in summary if f["name"] == "quality")
    classification = next(f for f in summary if f["name"] == "classification")
    for verdict in coverage["verdicts"][1:] + quality["verdicts"]:
        assert " at KL " in verdict["ours"] or "no KL budget" in verdict["ours"], verdict
    for verdict in classification["verdicts"]:
        assert "[" in verdict["ours"] or "no interval" in verdict["ours"], verdict
    # Best-of-2: online against offline's own sweep at matched KL, with an interval.
    noncontrastive = next(f for f in summary if f["name"] == "noncontrastive")
    assert "online minus offline at KL" in noncontrastive["verdicts"][0]["ours"]
    assert "| KL budget (nats) | golden: online_b2 | golden: offline_b2 |" in report
    rows = json.loads((workdir / "results.json").read_text())
    online = {r["step"]: r["win_rate"] for r in rows if r["stage"].startswith("online-s0")}
    tandem = {r["step"]: r["win_rate"] for r in rows if r["stage"].startswith("tandem-s0")}
    assert tandem and all(tandem[s] == pytest.approx(online[s], abs=1e-6) for s in tandem)
    # The quality datasets keep D_golden's validation split, so evaluations stay comparable.
    done = run_dir.result(str(next((workdir / "stages").glob("quality-data-*"))))
    assert set(done["datasets"]) == {"d_4k_vs_4k", "d_sft_vs_800", "d_800_vs_4k"}
    assert all(d["pairs"] == 32 for d in done["datasets"].values())
    stream = run_dir.result(str(next((workdir / "stages").glob("classification-stream-*"))))[
        "checkpoints"]
    assert [p["step"] for p in stream] == [0, 6]  # the pairs sampled after each checkpoint
    assert all(0.0 <= p[k] <= 1.0 for p in stream for k in p if "/" in k)
    # Each accuracy is its pairs' outcomes averaged; they are kept for the paired intervals.
    assert {k for k in stream[1] if "/" in k} == set(stream[1]["hits"])
    assert all(len(p["hits"][k]) == p["pairs"] and p[k] == pytest.approx(np.mean(p["hits"][k]))
               for p in stream for k in p["hits"])
    # Scaling: every size, the main one included, plays one opponent, the golden policy (of
    # the main size), and its verdicts are matched-KL differences.
    golden_policy = next((workdir / "stages").glob("golden_policy-*"))
    for stage, other_size in (("online-nano-s0", True), ("online-mini-s0", False)):
        cfg = json.loads(next((workdir / "stages").glob(f"{stage}-*/config.json")).read_text())
        assert cfg["eval"]["opponent_checkpoint"] == str(golden_policy)
        assert ("opponent_model" in cfg["eval"]) == other_size
        if other_size:
            assert cfg["eval"]["opponent_model"]["width"] != cfg["model"]["width"]
    scaling = next(f for f in summary if f["name"] == "scaling")
    assert all("no matched budget" in v["ours"] or " at KL " in v["ours"]
               for v in scaling["verdicts"]), scaling["verdicts"]
    # Every matched-KL verdict row gives the oracle's difference beside the golden judge's.
    for verdict in (coverage["verdicts"][1:] + quality["verdicts"] + noncontrastive["verdicts"]
                    + scaling["verdicts"]):
        if " at KL " in verdict["ours"]:
            assert "golden" in verdict["ours"] and "oracle" in verdict["ours"], verdict


def test_unknown_hypothesis_is_a_one_line_error():
    from alignment_gap.errors import ConfigError
    from alignment_gap.study import hypotheses

    with pytest.raises(ConfigError, match="config.hypotheses: 'luck' is unknown"):
        hypotheses.get("luck")
    assert tuple(hypotheses.MODULES) == study_configs.HYPOTHESES  # every name has its module


def test_scaling_variant_spans_at_least_eight_times_the_parameters():
    from alignment_gap.study.hypotheses import scaling
    from configs import models

    c = study_configs.get_config("scaling")
    counts = [scaling.parameter_count(models.get_config(s)) for s in c.scaling.sizes]
    assert len(counts) >= 3 and max(counts) >= 8 * min(counts), counts
    for variant in ("scaling", "smoke_scaling"):  # smoke: two sizes, the main study's one of them
        v = study_configs.get_config(variant)
        assert len(v.scaling.sizes) >= 2 and v.model.name in v.scaling.sizes, variant
