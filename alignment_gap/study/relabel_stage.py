"""The study's relabel stage: D_initial judged by the golden model -> D_golden (PAPER.md).

The relabelling itself (judges, the new TFDS dataset) is `data/relabel.py`; this stage loads
the finished golden model as the judge, writes `comparisons/<name>`, and records how many of
D_initial's labels the golden model kept and, in the synthetic world, how far the exact
oracle agrees with the golden model's order on D_golden's validation and test pairs.
"""

from __future__ import annotations

import ml_collections

from alignment_gap import run_dir
from alignment_gap.data import builders, datasets
from alignment_gap.data.relabel import decoded, model_judge, oracle_agreement, relabel
from alignment_gap.train import common


def config(study) -> ml_collections.ConfigDict:
    """What the stage's output depends on (besides the golden model): its key hashes this."""
    return ml_collections.ConfigDict({"data": study.data.to_dict(),
                                      "model": study.golden_model.to_dict()})


def run(study, golden_dir: str, name: str, out_dir: str):
    """D_initial relabelled by the golden model's sign rule -> comparisons/<name>."""
    rt = common.runtime(_runtime_config(study), out_dir)
    golden = common.load_frozen("preference", golden_dir, study.golden_model, rt)
    judge = model_judge(golden, rt.tokenizer, study.data.prompt_len, study.data.response_len,
                        rt.mesh, rt.rules)
    sources = datasets.initial_comparisons(study.data)
    relabel(sources, judge, name, study.data.dir)
    golden_data = builders.Comparisons(name=name, data_dir=study.data.dir).as_data_source()
    agreement = _agreement(sources, golden_data)
    run_dir.finish(out_dir, dataset=name, kept_initial_label=agreement,
                   golden_oracle_agreement=_oracle_agreement(study, name))


def kept_initial_label(out_dir: str) -> dict | None:
    """{split: fraction of D_initial's labels the golden model kept} of a finished stage."""
    return run_dir.result(out_dir).get("kept_initial_label")


def golden_agrees_with_oracle(out_dir: str, study, name: str) -> dict | None:
    """{split: the oracle's agreement with the golden order of D_golden's pairs} (synthetic
    data; `relabel.oracle_agreement`: an oracle tie earns half). A stage finished before ties
    counted half (its record has no `golden_oracle_agreement`) is graded again here."""
    result = run_dir.result(out_dir)
    if "golden_oracle_agreement" in result:
        return result["golden_oracle_agreement"]
    return _oracle_agreement(study, name)


def _oracle_agreement(study, name: str) -> dict | None:
    if study.data.kind != "synthetic":  # only the synthetic world has an exact oracle
        return None
    golden_data = builders.Comparisons(name=name, data_dir=study.data.dir).as_data_source()
    world = datasets.world_config(study.data)
    return {split: oracle_agreement([decoded(golden_data[split][i])
                                     for i in range(len(golden_data[split]))], world)
            for split in ("validation", "test") if split in golden_data}


def _runtime_config(study):
    c = ml_collections.ConfigDict({"data": study.data.to_dict(), "mesh": study.mesh.to_dict(),
                                   "model": study.golden_model.to_dict(), "batch_size": 1})
    c.mesh.rules = study.mesh.rules
    return c


def _agreement(initial: dict, golden: dict) -> dict:
    """Fraction of pairs whose label the golden model kept, per split."""
    out = {}
    for split in initial:
        before = {initial[split][i]["id"]: initial[split][i]["chosen"]
                  for i in range(len(initial[split]))}
        after = golden[split]
        kept = sum(before[after[i]["id"]] == after[i]["chosen"] for i in range(len(after)))
        out[split] = kept / max(len(after), 1)
    return out
