"""Ahead-of-time compilation: prove a config's programs on a TPU slice before renting it.

    python -m alignment_gap.compile --config configs/study.py:tpu_v5p_3b --topology v5p-64
    python -m alignment_gap.compile --config configs/policy.py:online_mini --topology v5e-4 \\
        --config.model.remat=full --out /tmp/online.json

Builds the config's models abstractly (no weights), takes the mesh from the config, and
lowers and compiles for the named slice every jitted program the run would execute (for a
study: every stage's, each distinct program once) through libtpu on this CPU. Prints, per
program and per chip, the compiler's memory account against the chip's HBM, FLOPs and bytes,
the ideal step time and the model-FLOPs utilisation ceiling, and writes the same as JSON
(default `workdir/aot/<config>-<variant>-<topology>.json`). Exits 1 with one line naming the
program, the bytes over and the remedies when something does not fit; 2 on a config that does
not suit the topology. `--topology cpu:N` compiles for N fake CPU devices instead.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from alignment_gap import config_checks, sharding
from alignment_gap.aot import programs, report, topology
from alignment_gap.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file path[:variant].")
_TOPOLOGY = flags.DEFINE_string("topology", None, "v4-8 .. v4-4096, v5litepod-N (v5e-N), "
                                "v5p-8 .. v5p-12288, v6e-N, or cpu:N.")
_SLICES = flags.DEFINE_integer("slices", 1, "Slices joined over the data-center network.")
_OUT = flags.DEFINE_string("out", None, "JSON report path.")
_COSTS = flags.DEFINE_bool("costs", True, "Also compile 1- and 2-layer variants for FLOPs.")
flags.mark_flags_as_required(["config", "topology"])


def depth_variant(config, layers: int):
    """The config with every model `layers` deep, unrolled, and one micro-batch: the same
    arithmetic per layer and per example, in programs XLA's cost analysis counts whole."""
    variant = config.copy_and_resolve_references()

    def visit(node):
        for key in list(node.keys()):
            value = node[key]
            if hasattr(value, "keys"):
                if "num_layers" in value and "scan_layers" in value:
                    value.num_layers, value.scan_layers = layers, False
                visit(value)
            elif key == "microbatches":
                node[key] = 1

    visit(variant)
    return variant


def default_out(config_arg: str, topology: str) -> str:
    path, _, variant = config_arg.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("workdir", "aot", f"{stem}-{variant or 'default'}-{topology}.json")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _size(n: float) -> str:
    """Bytes as G, M or K (binary units)."""
    for unit, scale in (("G", 2**30), ("M", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n / 2**10:.0f}K"


def print_report(summary: dict, out=sys.stdout):
    chip = summary["chip"]
    print(f"\n{summary['config']} on {summary['topology']} ({summary['chips']} chips, "
          f"{summary['shape']}, {summary['slices']} slice(s)); mesh data x fsdp x tensor = "
          f"{summary['mesh']}", file=out)
    if chip:
        print(f"per chip: {chip['kind']}, {chip['hbm_gib']} GiB HBM (fit within "
              f"{summary['fit_fraction']:.0%}), {chip['peak_tflops']} TFLOP/s bf16, "
              f"{chip['hbm_gbps']} GB/s ({chip['source']})", file=out)
    print("\nresident per chip while each run runs:", file=out)
    for run, items in summary["runs"].items():
        parts = ", ".join(f"{k} {_size(v['per_device'])}" for k, v in items.items())
        print(f"  {run}: {parts}", file=out)
    head = (f"{'program':<20} {'peak in run':<18} {'detail':<22} {'args':>8} {'out':>8} "
            f"{'temp':>8} {'code':>8} {'peak':>8} {'of HBM':>6} {'GFLOP':>9} {'GB':>8} "
            f"{'ideal ms':>9} {'bound':>7} {'MFU max':>7}")
    print("\nper chip (out: not aliased to a donated input; peak: with the run's resident "
          "arrays)\n" + head, file=out)
    for p in summary["programs"]:
        if "failure" in p:
            print(f"{p['program']:<20} {p['peak_run'][:18]:<18} {p['detail'][:22]:<22} does "
                  f"not compile: {p['failure']}", file=out)
            continue
        b = p["bytes_per_device"]
        share = f"{b['peak_with_resident'] / (chip['hbm_gib'] * 2**30):.0%}" if chip else "-"
        row = (f"{p['program']:<20} {p['peak_run'][:18]:<18} {p['detail'][:22]:<22} "
               f"{_size(b['arguments']):>8} "
               f"{_size(b['outputs'] - b['aliased']):>8} {_size(b['temporaries']):>8} "
               f"{_size(b['code']):>8} {_size(b['peak_with_resident']):>8} {share:>6}")
        if "flops_per_device" in p:
            row += (f" {p['flops_per_device'] / 1e9:>9.1f} "
                    f"{p['bytes_accessed_per_device'] / 1e9:>8.2f}")
        if "ideal_seconds" in p:
            row += (f" {p['ideal_seconds'] * 1e3:>9.2f} {p['bound']:>7} "
                    f"{p['mfu_ceiling']:>7.0%}")
        print(row, file=out)
    replicated = {(r["path"], r["bytes"]) for p in summary["programs"]
                  for r in p["replicated_arguments"]}
    if replicated:
        print("\nlargest arguments replicated on every chip:", file=out)
        for path, nbytes in sorted(replicated, key=lambda x: -x[1])[:5]:
            print(f"  {path}: {nbytes / 2**20:.1f} MiB", file=out)


def _trained_model(config, run: str) -> str:
    """The config field of the model a run trains: a study's golden and proxy runs train
    `golden_model` and `proxy_model`; every other run `model`."""
    if config.get("task") == "study" and run in ("golden", "proxy"):
        return f"{run}_model"
    return "model"


def remedies(program: dict, config, mesh_shape) -> list[str]:
    name, out = program["program"], []
    data, fsdp, tensor = mesh_shape
    if data > 1:
        out.append(f"move the data axis into fsdp (mesh.data={data} -> 1, mesh.fsdp=-1)")
    out.append(f"a larger slice (more chips for mesh.fsdp, now {fsdp})")
    if name == "policy_update":  # the SFT and preference trainers have no micro-batches
        field = "policy.microbatches" if config.get("task") == "study" else "microbatches"
        out.append(f"more micro-batches ({field})")
    if name.endswith("update"):
        model = _trained_model(config, program.get("peak_run", ""))
        if config[model].get("remat", "none") != "full":
            out.append(f"{model}.remat=full")
    if name.endswith(("sample", "samples")):
        out.append("a smaller sampler batch (eval.prompts, batch_size)")
    if tensor == 1:
        out.append("a tensor axis (mesh.tensor=2 or 4) for the widest layers")
    return out


def main(argv):
    del argv
    topo_name = _TOPOLOGY.value
    config = _CONFIG.value
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        if topo_name.startswith("cpu:"):  # before anything initialises the CPU backend
            jax.config.update("jax_num_cpu_devices", topology.cpu_devices(topo_name))
        target = topology.resolve(topo_name, _SLICES.value)
        config_checks.validate(config, target.chips)
        mesh_shape = config_checks.mesh_shape(config.mesh, target.chips)
        mesh = sharding.mesh_from_grid(topology.device_grid(target, mesh_shape))
        runs = programs.build(config, mesh)
        variants = tuple(programs.build(depth_variant(config, n), mesh) for n in (1, 2)) \
            if _COSTS.value else None
    except (ConfigError, topology.TopologyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results = report.analyse(runs, variants, mesh, config.mesh.rules, log=log)
    chip = target.chip
    summary = {
        "config": config_arg,
        "topology": target.name, "chips": target.chips, "shape": target.topology,
        "slices": target.slices, "mesh": "x".join(map(str, mesh_shape)),
        "chip": chip.__dict__ if chip else None, "fit_fraction": report.HEADROOM,
        "runs": {run.name: {k: {"per_device": report.per_device_bytes(v),
                                "total": report.total_bytes(v)}
                            for k, v in run.resident.items()} for run in runs},
        "programs": [r.as_dict(chip) for r in results],
    }
    print_report(summary)
    out = _OUT.value or default_out(config_arg, target.name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nreport: {out}")
    if chip is None:
        return
    limit = report.HEADROOM * chip.hbm_gib * 2**30
    refused = [p for p in summary["programs"] if "failure" in p]
    if refused:
        worst = refused[0]
        print(f"error: {worst['program']} ({worst['peak_run']}) does not compile for "
              f"{chip.kind}: {worst['failure']}; try: "
              f"{'; '.join(remedies(worst, config, mesh_shape))}", file=sys.stderr)
        sys.exit(1)
    over = [p for p in summary["programs"] if p["bytes_per_device"]["peak_with_resident"] > limit]
    if over:
        worst = max(over, key=lambda p: p["bytes_per_device"]["peak_with_resident"])
        peak = worst["bytes_per_device"]["peak_with_resident"]
        print(f"error: {worst['program']} ({worst['peak_run']}) needs {_gib(peak)} GiB per chip, "
              f"{_gib(peak - limit)} GiB over {report.HEADROOM:.0%} of {chip.kind}'s "
              f"{chip.hbm_gib} GiB; try: {'; '.join(remedies(worst, config, mesh_shape))}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
