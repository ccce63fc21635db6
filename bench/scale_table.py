"""The scale table: every model preset x the TPU slices a user would pick, compiled on this CPU.

    python bench/scale_table.py                       # the README's table (hours, 2 cores)
    python bench/scale_table.py --sizes 3b --topologies v5p-64
    python bench/scale_table.py --fsdp_sweep          # per-chip bytes as fsdp grows 8 -> 64
    python bench/scale_table.py --scan_compare        # compile time, scanned vs unrolled layers

Each cell is an online policy run (`configs/policy.py:online_mini` with the preset swapped in:
bfloat16, scanned layers, TL;DR-sized batches of 64 pairs, 512 prompt + 64 response tokens,
a proxy of the policy's size up to 770m, no evaluation) compiled ahead of time through libtpu
(`alignment_gap/aot`). The mesh puts min(chips, 64) on fsdp and the rest on tensor. A cell
first tries no rematerialisation, then `remat=full`, then 4 micro-batches, and reports the
first setting whose update step and sampler fit (peak with the run's resident arrays within
95% of HBM). Writes `bench/out/scale_table.json` beside the printed markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import alignment_gap  # noqa: F401  (no TPU probe on this CPU)
from alignment_gap import config_checks, sharding
from alignment_gap.aot import programs, report, topology
from alignment_gap.compile import depth_variant
from alignment_gap.presets import models
from alignment_gap.presets import policy as policy_configs

SIZES = ["60m", "250m", "770m", "3b", "11b"]
TOPOLOGIES = ["v5e-8", "v5e-16", "v5e-64", "v5e-256", "v5p-8", "v5p-64", "v5p-256", "v6e-8",
              "v6e-64"]
PAIRS, PROMPT, RESPONSE = 64, 512, 64
SHOWN = ("policy_update", "online_sample")
SETTINGS = [("none", 1), ("full", 1), ("full", 4)]  # (remat, micro-batches), tried in order


def cell_config(size: str, chips: int, remat: str, microbatches: int):
    c = policy_configs.get_config("online_mini")
    # Proxies up to 770m's width; a pretrained policy's proxy shares its architecture (and so
    # its vocabulary).
    small = models.get_config(size).width <= models.SIZES["770m"][0]
    proxy = size if small or size in models.PRETRAINED else "770m"
    c.model, c.proxy_model = models.get_config(size), models.get_config(proxy)
    for m in (c.model, c.proxy_model):
        m.dtype, m.scan_layers, m.remat = "bfloat16", True, remat
        m.max_len = PROMPT + 2 * RESPONSE
    c.eval.golden_model.max_len = PROMPT + 2 * RESPONSE
    c.data.prompt_len, c.data.response_len = PROMPT, RESPONSE
    c.batch_size, c.microbatches = PAIRS, microbatches
    fsdp = min(chips, PAIRS)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, chips // fsdp
    return c


def compile_cell(config, target, costs: bool = True, shown=SHOWN) -> dict:
    """The shown programs' memory, and the update step's costs (the table's ideal time)."""
    config_checks.validate(config, target.chips)
    shape = config_checks.mesh_shape(config.mesh, target.chips)
    mesh = sharding.mesh_from_grid(topology.device_grid(target, shape))

    def runs(c, names):
        built = programs.build(c, mesh)
        for run in built:
            run.programs = [p for p in run.programs if p.name in names]
        return built

    start, results = time.perf_counter(), []
    for names in ([shown[0]], shown[1:]):
        variants = (tuple(runs(depth_variant(config, n), names) for n in (1, 2))
                    if costs and names == [shown[0]] else None)
        results += report.analyse(runs(config, names), variants, mesh, config.mesh.rules,
                                  log=lambda _: None)
    out = {"mesh": "x".join(map(str, shape)), "compile_s": time.perf_counter() - start,
           "resident": {k: report.per_device_bytes(v) for k, v in
                        programs.build(config, mesh)[0].resident.items()}}
    for r in results:
        entry = r.as_dict(target.chip)
        out[r.program.name] = entry
    return out


def fits(cell: dict, chip) -> bool:
    limit = report.HEADROOM * chip.hbm_gib * 2**30
    return all("failure" not in cell[name] and
               cell[name]["bytes_per_device"]["peak_with_resident"] <= limit for name in SHOWN)


def table(sizes, topologies, out_rows):
    print("| policy | slice | chips | mesh d x f x t | fits (setting) | update peak GiB/chip | "
          "sampler peak GiB/chip | HBM | update ideal ms | bound | MFU ceiling | "
          "compile s |", flush=True)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        for name in topologies:
            target = topology.resolve(name)
            try:
                for remat, k in SETTINGS:
                    cell = compile_cell(cell_config(size, target.chips, remat, k), target)
                    if fits(cell, target.chip):
                        break
            except Exception as e:  # a cell the tool cannot build: say why, go on
                print(f"| {size} | {name} | {target.chips} | - | error: "
                      f"{str(e).splitlines()[0][:200]} |", flush=True)
                continue
            ok = fits(cell, target.chip)
            upd, smp = cell["policy_update"], cell["online_sample"]
            gib = lambda p: ("refused" if "failure" in p else
                             f"{p['bytes_per_device']['peak_with_resident'] / 2**30:.1f}")
            setting = f"remat={remat}, k={k}"
            ideal = (f"{upd['ideal_seconds'] * 1e3:.0f} | {upd['bound']} | "
                     f"{upd['mfu_ceiling']:.0%}" if "ideal_seconds" in upd else "- | - | -")
            print(f"| {size} | {name} | {target.chips} | {cell['mesh']} | "
                  f"{'yes' if ok else 'no'} ({setting}) | {gib(upd)} | {gib(smp)} | "
                  f"{target.chip.hbm_gib} | {ideal} | {cell['compile_s']:.0f} |", flush=True)
            out_rows.append({"size": size, "topology": name, "chips": target.chips,
                             "fits": ok, "remat": remat, "microbatches": k, **cell})


def fsdp_sweep(out_rows, size="3b", names=("v5e-8", "v5e-16", "v5e-64")):
    """Per-chip bytes of the train state and of the update step's peak as fsdp grows."""
    print(f"\n{size} online policy, mesh 1 x fsdp x 1 (parameters, AdamW moments and the "
          "reference sharded over fsdp)\n")
    print("| slice | fsdp | train state GiB/chip | total / fsdp GiB | ratio | update temp GiB/chip "
          "| update peak GiB/chip |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        target = topology.resolve(name)
        config = cell_config(size, target.chips, "full", 1)
        config.mesh.fsdp, config.mesh.tensor = target.chips, 1
        config.batch_size = max(PAIRS, target.chips)
        cell = compile_cell(config, target, costs=False, shown=("policy_update",))
        shape = config_checks.mesh_shape(config.mesh, target.chips)
        mesh = sharding.mesh_from_grid(topology.device_grid(target, shape))
        state = programs.build(config, mesh)[0].resident["policy train state"]
        per_chip, total = report.per_device_bytes(state), report.total_bytes(state)
        b = cell["policy_update"]["bytes_per_device"]
        print(f"| {name} | {target.chips} | {per_chip / 2**30:.2f} | "
              f"{total / target.chips / 2**30:.2f} | {per_chip * target.chips / total:.3f} | "
              f"{b['temporaries'] / 2**30:.2f} | {b['peak_with_resident'] / 2**30:.2f} |",
              flush=True)
        out_rows.append({"fsdp_sweep": name, "train_state_per_chip": per_chip,
                         "train_state_total": total, **cell})


def scan_compare(out_rows, remat: str, sizes=("60m", "250m", "770m"), name="v5e-8"):
    """Compile seconds and the compiler's numbers with layers scanned and unrolled."""
    print(f"\nupdate step on {name}, remat={remat}, scanned vs unrolled layers (compile on "
          "this CPU)\n")
    print("| policy | layers | compile s scanned | compile s unrolled | temp GiB scanned | "
          "temp GiB unrolled | GFLOP/chip scanned (extrapolated) | GFLOP/chip unrolled "
          "(compiler) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    target = topology.resolve(name)
    for size in sizes:
        row = {}
        for scan in (True, False):
            config = cell_config(size, target.chips, remat, 1)
            config.model.scan_layers = config.proxy_model.scan_layers = scan
            shape = config_checks.mesh_shape(config.mesh, target.chips)
            mesh = sharding.mesh_from_grid(topology.device_grid(target, shape))
            (run,) = programs.build(config, mesh)
            update = next(p for p in run.programs if p.name == "policy_update")
            try:
                compiled, seconds = report.compile_one(update, mesh, config.mesh.rules)
            except Exception as e:  # the compiler's refusal (out of HBM): say so, go on
                print(f"| {size} | scanned={scan}: {str(e).splitlines()[0][:160]} |")
                break
            cost = compiled.cost_analysis()
            row[scan] = (seconds, compiled.memory_analysis().temp_size_in_bytes,
                         float(cost.get("flops", 0.0)))
            if scan:
                variants = tuple(next(p for p in programs.build(depth_variant(config, n), mesh)[
                    0].programs if p.name == "policy_update") for n in (1, 2))
                extrapolated = report.program_costs(variants, update.layers, mesh,
                                                    config.mesh.rules)
        if len(row) < 2:
            continue
        print(f"| {size} | {models.SIZES[size][1]} | {row[True][0]:.1f} | {row[False][0]:.1f} | "
              f"{row[True][1] / 2**30:.2f} | {row[False][1] / 2**30:.2f} | "
              f"{extrapolated.flops / 1e9:.0f} | {row[False][2] / 1e9:.0f} |", flush=True)
        out_rows.append({"scan_compare": size, "scanned": row[True], "unrolled": row[False],
                         "extrapolated_flops": extrapolated.flops})


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--fsdp_sweep", action="store_true")
    parser.add_argument("--scan_compare", action="store_true")
    parser.add_argument("--remat", default="none", help="--scan_compare: remat of both")
    parser.add_argument("--out", default="bench/out/scale_table.json")
    args = parser.parse_args()
    rows: list = []
    start = time.perf_counter()
    if args.scan_compare:
        scan_compare(rows, args.remat)
    elif args.fsdp_sweep:
        fsdp_sweep(rows)
    else:
        table(args.sizes.split(","), args.topologies.split(","), rows)
    print(f"\n{time.perf_counter() - start:.0f} s on this CPU", file=sys.stderr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
