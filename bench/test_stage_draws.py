"""How far a test window's outcomes repeat the selection window's, row by row.

The sampler draws each row's noise from the evaluation key by row, so two windows of prompts
evaluated under one key share their draws row by row (the test stage did so until be5e140).
For each checkpoint of one policy run of a finished study this prints the correlation of the
golden judge's outcome on selection prompt i with test prompt i's: under the selection key
(the old test stage) and under the window's own key (`evaluation.evaluation_key`, now).

    python bench/test_stage_draws.py --workdir workdir/study --stage online-s0
"""

import argparse
import glob
import json
import os
import tempfile

import ml_collections
import numpy as np
from flax import nnx

from alignment_gap import evaluation
from alignment_gap.train import common, policy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdir/study", help="a finished study")
    parser.add_argument("--stage", default="online-s0", help="a policy run's name prefix")
    parser.add_argument("--prompts", type=int, default=256, help="prompts in each window")
    args = parser.parse_args()
    run = sorted(glob.glob(os.path.join(args.workdir, "stages", f"{args.stage}-*")))[0]
    with open(os.path.join(run, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    cfg.eval.prompts, cfg.eval.kl_prompts, cfg.eval.pairs = args.prompts, 16, 0
    steps = sorted(int(p) for p in os.listdir(os.path.join(run, "checkpoints")) if p.isdigit())
    rt = common.runtime(cfg, tempfile.mkdtemp())
    lm = common.load_frozen("lm", cfg.sft_checkpoint, cfg.model, rt)
    sft, own_key = nnx.state(lm), evaluation.evaluation_key

    def outcomes(first: int, one_key: bool) -> dict:
        cfg.eval.first_prompt = first
        evaluation.evaluation_key = (lambda seed, _=0: own_key(seed)) if one_key else own_key
        evaluator = policy.make_evaluator(cfg, rt, lm, sft)
        evaluation.evaluation_key = own_key
        return {step: evaluator.evaluate(nnx.state(common.load_frozen(
            "lm", run, cfg.model, rt, step)))[1]["win"] for step in steps[1:]}

    selection = outcomes(0, True)
    columns = {"one key (old)": outcomes(args.prompts, True),
               "own key (now)": outcomes(args.prompts, False)}
    print(f"{os.path.basename(run)}: corr(selection prompt i, test prompt i), golden outcomes")
    print("| step | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for step in steps[1:]:
        print(f"| {step} | " + " | ".join(
            f"{np.corrcoef(selection[step], test[step])[0, 1]:+.3f}" for test in columns.values())
            + " |")


if __name__ == "__main__":
    main()
