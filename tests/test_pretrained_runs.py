"""Trainers and the generate command starting from a pretrained checkpoint (`init.checkpoint`),
in real processes: SFT, a preference model's trunk, a policy with no SFT run, and sampling from
a Hugging Face directory and from our run directory."""

import json
import os
import re
import subprocess
import sys

import pytest

from alignment_gap.data import tokenizer, world
from alignment_gap.pretrained import open_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3 = os.path.join(ROOT, "tests", "fixtures", "hf", "qwen3")


def run(module, *args, expect=0, env=None):
    done = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == expect, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny Qwen 3 checkpoint (vocabulary 128) and a sentencepiece model of the synthetic
    world small enough for it."""
    root = tmp_path_factory.mktemp("pretrained_runs")
    spm = root / "world.model"
    tokenizer.Tokenizer.train(world.corpus(world.WorldConfig(seed=0), 400), 120, str(spm))
    fields = open_checkpoint(QWEN3).fields
    model = [f"--config.model.{k}={v}" for k, v in fields.items()]
    common = [f"--config.init.checkpoint=hf:{QWEN3}", f"--config.data.tokenizer={spm}",
              f"--config.data.dir={root / 'data'}", *model]
    return root, spm, common


def test_sft_starts_from_the_pretrained_weights_and_samples_from_its_run(setup):
    root, spm, common = setup
    run("alignment_gap.main", "--config", os.path.join(ROOT, "configs", "sft.py:tiny"),
        "--workdir", root / "sft", *common, "--config.num_steps=2", "--config.learning_rate=0",
        "--config.checkpoint_every=2", "--config.warmup_steps=1")
    # With learning rate 0 the run's checkpoint holds exactly the imported weights; sampling
    # from it and from the Hugging Face directory gives the same tokens.
    prompts = ["--prompt", "the cat sat on the mat", "--prompt", "a post about a"]
    ours = run("alignment_gap.generate", "--checkpoint", f"run:{root / 'sft'}", *prompts,
               "--max_new_tokens", 6)
    theirs = run("alignment_gap.generate", "--checkpoint", f"hf:{QWEN3}", "--tokenizer", spm,
                 *prompts, "--max_new_tokens", 6)
    lines = ours.stdout.strip().splitlines()
    assert len(lines) == 2 and all(" -> " in line for line in lines)
    assert lines == theirs.stdout.strip().splitlines()
    meta = json.loads((root / "sft" / "config.json").read_text())
    assert meta["model"]["qk_norm"] and meta["init"]["checkpoint"] == f"hf:{QWEN3}"


def test_a_policy_runs_from_the_pretrained_model_with_no_sft_run(setup):
    root, _, common = setup
    run("alignment_gap.main", "--config", os.path.join(ROOT, "configs", "policy.py:offline_tiny"),
        "--workdir", root / "policy", *common, "--config.num_steps=2",
        "--config.checkpoint_every=2", "--config.log_every=1", "--config.beta=0.1")
    rows = [json.loads(line) for line in (root / "policy" / "metrics.jsonl").read_text()
            .splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # Both the policy and the reference are the pretrained model at the first step: the IPO
    # loss is (0 - 1 / (2 beta))^2 = 25; later steps move away from it.
    assert losses[0] == pytest.approx(25.0, abs=1e-4) and len(losses) == 2


def test_generate_names_a_bad_checkpoint_in_one_line(tmp_path):
    done = run("alignment_gap.generate", "--checkpoint", f"hf:{tmp_path}", "--prompt", "x",
               expect=1)
    assert "config.json: missing" in done.stderr.strip().splitlines()[-1]



@pytest.mark.parametrize("flag,says", [
    (["--top_p", "0"], "--top_p: must be in (0, 1], got 0.0"),
    (["--top_k", "129"], "--top_k: must be in [0, 128], got 129"),  # the vocabulary is 128
    (["--temperature", "-1"], "--temperature: must be >= 0"),
    (["--max_new_tokens", "0"], "--max_new_tokens: must be >= 1, got 0"),
    (["--mesh", "2"], "--mesh: '2' is not three device counts data,fsdp,tensor"),
    (["--mesh", "1,2,1"], "--mesh: 1,2,1 spans 2 devices but jax sees 1")])
def test_generate_names_a_bad_sampling_flag_in_one_line(setup, flag, says):
    _, spm, _ = setup
    done = run("alignment_gap.generate", "--checkpoint", f"hf:{QWEN3}", "--tokenizer", spm,
               "--prompt", "x", *flag, expect=1)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in last and "Traceback" not in done.stderr


def test_generate_pads_a_batch_the_mesh_does_not_divide_and_refuses_a_larger_tokenizer(
        setup, tmp_path):
    """One prompt on a mesh whose fsdp axis splits the batch over 2 devices (it was an
    IndivisibleError): the same tokens as on one device. A tokenizer with more pieces than
    the model has ids is refused (they would read past its embedding)."""
    _, spm, _ = setup
    args = ["--checkpoint", f"hf:{QWEN3}", "--tokenizer", spm, "--prompt", "the cat sat",
            "--max_new_tokens", 4]
    two = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               "--xla_force_host_platform_device_count=2")
    split = run("alignment_gap.generate", *args, "--mesh", "1,2,1", env=two)
    assert split.stdout == run("alignment_gap.generate", *args).stdout
    assert len(split.stdout.strip().splitlines()) == 1
    large = tmp_path / "large.model"
    tokenizer.Tokenizer.train(world.corpus(world.WorldConfig(seed=0), 400), 200, str(large))
    done = run("alignment_gap.generate", *args[:2], "--tokenizer", large, "--prompt", "x",
               expect=1)
    assert re.fullmatch(rf"error: --tokenizer: {large} has 1[3-9]\d pieces but the model reads "
                        r"128 ids; use the tokenizer it was trained with",
                        done.stderr.strip().splitlines()[-1]), done.stderr[-500:]


@pytest.mark.parametrize("config,says", [
    ({"task": "preference_model"}, "is a preference model's run; run:DIR takes an sft or "
     "policy run's directory"),
    ({"task": "study"}, "is a study's directory (its language models are runs under stages/"),
    ({"task": "sft"}, "holds no checkpoint yet")])
def test_generate_from_a_run_that_holds_no_language_model_is_one_line(tmp_path, config, says):
    from alignment_gap import generate
    from alignment_gap.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(f"--checkpoint: {tmp_path} {says}")):
        generate._load_run(str(tmp_path), 64, "float32", None, None)


def test_a_missing_pretrained_checkpoint_is_one_line_naming_it(setup, tmp_path):
    _, _, common = setup
    done = run("alignment_gap.main", "--config", os.path.join(ROOT, "configs", "sft.py:tiny"),
               "--workdir", tmp_path / "sft", *common, f"--config.init.checkpoint=hf:{tmp_path}/x",
               expect=1)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint hf:") and "does not exist" in last
