"""The paper's pipeline on real-data files from a pretrained checkpoint, every stage, on CPU:
`configs/study.py:hh_gemma3_270m_cpu` pointed at the tiny Gemma 3 checkpoint (the real
architecture at toy width) and HH-RLHF files in the published layout."""

import json
import os
import subprocess
import sys

from alignment_gap.data import tokenizer
from configs import study
from tests.test_real_data import _hh_row, write_hh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEMMA3 = os.path.join(ROOT, "tests", "fixtures", "hf", "gemma3")

CONFIG = '''
from alignment_gap.pretrained import open_checkpoint
from configs import study


def get_config(arg=None):
    c = study.get_config("hh_gemma3_270m_cpu")
    fields = open_checkpoint({checkpoint!r}).fields
    for m in (c.model, c.proxy_model, c.golden_model):
        m.update(fields)
    c.init.checkpoint = c.golden_init = "hf:" + {checkpoint!r}
    c.data.manual_dir, c.data.tokenizer = {manual!r}, {tokenizer!r}
    c.data.dir = {data!r}
    return c
'''


def test_every_stage_runs_from_the_pretrained_checkpoint_on_hh(tmp_path):
    manual = write_hh(tmp_path / "manual", train=200, test=12)
    corpus = [r[k] for r in (_hh_row(i) for i in range(200)) for k in ("chosen", "rejected")]
    spm = tmp_path / "hh.model"
    tokenizer.Tokenizer.train(corpus * 2, 100, path=str(spm))
    config = tmp_path / "study_config.py"
    config.write_text(CONFIG.format(checkpoint=GEMMA3, manual=str(manual), tokenizer=str(spm),
                                    data=str(tmp_path / "data")))
    workdir = tmp_path / "study"
    done = subprocess.run([sys.executable, "-m", "alignment_gap.main", "--config", str(config),
                           "--workdir", str(workdir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    stages = sorted(os.listdir(workdir / "stages"))
    for name in ("sft-", "golden-", "relabel-", "proxy-", "online-", "offline-"):
        assert any(s.startswith(name) for s in stages), (name, stages)
    sft_dir = next(workdir / "stages" / s for s in stages if s.startswith("sft-"))
    sft_config = json.loads((sft_dir / "config.json").read_text())
    assert sft_config["init"]["checkpoint"] == f"hf:{GEMMA3}"
    assert sft_config["model"]["sliding_window"] == 4 and sft_config["data"]["kind"] == "hh"
    report = (workdir / "report.md").read_text()
    assert "carved" in report  # the report says where HH's validation split came from


def test_stage_keys_follow_the_data_files_not_only_their_path(tmp_path):
    """Records edited in place (or other files copied to the same path): every stage reading
    them gets a new key, so a rerun trains on the new data rather than reusing the old."""
    from alignment_gap.study import pipeline

    manual = write_hh(tmp_path / "manual", train=60, test=6)
    c = study.get_config("hh_gemma3_270m_cpu")
    c.data.manual_dir, c.data.dir = str(manual), str(tmp_path / "data")
    keys = lambda: {s.name: s.key for s in pipeline.build_plan(c, str(tmp_path / "w")).stages}
    before = keys()
    assert keys() == before  # the same files: the same stages
    write_hh(manual, train=60, test=6, reverse=True)  # the same records in another order
    after = keys()
    assert after.keys() == before.keys() and "sft" in after
    assert all(after[name] != key for name, key in before.items()), [
        name for name, key in before.items() if after[name] == key]
