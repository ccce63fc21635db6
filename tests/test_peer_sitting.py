"""bench/peer_sitting.py's reading of the peers' result files and its targets (no benchmark runs:
the files are written here in peerbench's format)."""

import json
import os
import time

import pytest

from bench import peer_sitting

PEER_SECONDS = {"trl_online_dpo_ipo": (0.6, 0.4), "trl_dpo_ipo": (0.30, 0.30),
                "tunix_dpo": (0.40, 0.44), "tunix_sampler": (0.16, 0.14)}


def write_peers(results, runs=2):
    results.mkdir(parents=True, exist_ok=True)
    for stem, seconds in PEER_SECONDS.items():
        key = "mean_s" if stem == "tunix_sampler" else "steady_mean_s"
        for i in range(runs):
            (results / f"{stem}_r{i + 1}.json").write_text(json.dumps({key: seconds[i],
                                                                       "median_s": 9.0}))
    for lib, gflops in (("jax", 180.0), ("torch", 140.0)):
        (results / f"matmul_{lib}.json").write_text(json.dumps({"gflops_at_median": gflops}))


def test_reads_each_peers_runs_and_the_matmul_peaks(tmp_path):
    write_peers(tmp_path)
    peers = peer_sitting.read_peers(str(tmp_path), 2, since=0.0)
    assert peers["trl_online_dpo"] == [0.6, 0.4] and peers["tunix_sampler"] == [0.16, 0.14]
    assert peers["matmul_gflops"] == {"jax": 180.0, "torch": 140.0}


def test_a_result_older_than_the_sitting_is_refused_naming_the_file(tmp_path):
    write_peers(tmp_path)
    stale = tmp_path / "tunix_dpo_r2.json"
    os.utime(stale, (time.time() - 3600,) * 2)
    with pytest.raises(SystemExit, match="tunix_dpo_r2.json is missing or older"):
        peer_sitting.read_peers(str(tmp_path), 2, since=time.time() - 60)


def test_targets_compare_ours_with_the_peers_mean():
    peers = {"trl_online_dpo": [0.6, 0.4], "trl_dpo": [0.3, 0.3], "tunix_dpo": [0.4, 0.44],
             "tunix_sampler": [0.16, 0.14]}
    ours = {"online_step_s": 0.25, "offline_step_s": 0.22, "sampler_call_s": 0.05}
    ratio = peer_sitting.ratios(ours, peers)
    assert ratio[peer_sitting.ONLINE] == pytest.approx(2.0)  # (0.6 + 0.4) / 2 / 0.25
    assert ratio[peer_sitting.OFFLINE_TRL] == pytest.approx(0.3 / 0.22)
    met = peer_sitting.meets(ratio)
    assert met[peer_sitting.ONLINE] and met[peer_sitting.SAMPLER]  # 2.0 meets ">= 2x"
    assert not met[peer_sitting.OFFLINE_TRL] and not met[peer_sitting.OFFLINE_TUNIX]


def test_tables_hold_each_runs_ratio_and_the_count_of_targets_met(tmp_path):
    write_peers(tmp_path)
    peers = peer_sitting.read_peers(str(tmp_path), 2, since=0.0)
    fast = {"online_step_s": 0.2, "offline_step_s": 0.1, "sampler_call_s": 0.05}
    slow = dict(fast, online_step_s=0.4)
    text = peer_sitting.tables("15", peers, {"1 device, 1 slice": [fast, slow]})
    assert "| 15 | 0.500 (0.600, 0.400) s | 0.300 (0.300, 0.300) |" in text
    assert "| 15 | 1 device, 1 slice (a / b) | 0.200 / 0.400 | 2.50 / 1.25x |" in text
    assert "1 device, 1 slice: online >= 2x in 1 of 2 runs, all four in 1" in text
