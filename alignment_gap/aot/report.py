"""Compile programs for a target and read what the compiler says: memory, FLOPs, fit.

Memory is the compiled program's own account, per device: arguments, outputs (less what
aliases donated arguments), temporaries and code. A program's **peak** adds the arrays its
run keeps on the devices besides its arguments (the train state while the sampler runs, the
frozen models): `resident + other arguments + outputs - aliased + temporaries + code`.

FLOPs and bytes accessed come from the compiler's cost analysis, which counts the body of a
loop once. So costs are read from the same programs built with 1 and 2 unrolled layers and
one micro-batch (the same arithmetic), extrapolated linearly in depth, and a sampler's cost
is its prefill plus `max_new_tokens` decode steps (an upper bound: rows stop at EOS).
The ideal time of a step is `max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)` at the chip's
published figures; the model-FLOPs utilisation ceiling is the compute share of that time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import jax
from jax.experimental.compilation_cache import compilation_cache

from alignment_gap import sampling, sharding
from alignment_gap.aot.programs import Program, Run

GIB = 1024**3
HEADROOM = 0.95  # The runtime keeps some HBM for itself: fit within 95% of the published size.
REPLICATED_MIN_BYTES = 1 << 20  # List replicated arguments from 1 MiB up.


def per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (each leaf's shard under its sharding)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def total_bytes(tree) -> int:
    """Bytes of an abstract tree, unsharded."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def replicated_arrays(program: Program) -> list[tuple[str, int]]:
    """(path, bytes per device) of arguments every device holds whole, largest first."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(program.args)[0]:
        if leaf.sharding is None or len(leaf.sharding.device_set) == 1:
            continue
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        if leaf.sharding.is_fully_replicated and nbytes >= REPLICATED_MIN_BYTES:
            out.append((jax.tree_util.keystr(path), nbytes))
    return sorted(out, key=lambda x: -x[1])


@dataclasses.dataclass
class Costs:
    flops: float
    bytes: float


@dataclasses.dataclass
class Result:
    program: Program
    runs: list[str]
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    peak: int  # Largest over the runs that execute it.
    peak_run: str
    compile_s: float
    costs: Costs | None = None
    replicated: list = dataclasses.field(default_factory=list)
    failure: str = ""  # The compiler's refusal (e.g. out of HBM), when it refused.

    def as_dict(self, chip) -> dict:
        d = {"program": self.program.name, "detail": self.program.detail, "runs": self.runs,
             "bytes_per_device": {"arguments": self.argument, "outputs": self.output,
                                  "aliased": self.alias, "temporaries": self.temp,
                                  "code": self.code, "peak_with_resident": self.peak},
             "peak_run": self.peak_run, "compile_seconds": round(self.compile_s, 2),
             "replicated_arguments": [{"path": p, "bytes": b} for p, b in self.replicated]}
        if self.failure:
            d["failure"] = self.failure
        if self.costs is not None:
            d["flops_per_device"] = self.costs.flops
            d["bytes_accessed_per_device"] = self.costs.bytes
            if chip is not None:
                d.update(ideal_step(self.costs, chip))
        return d


def ideal_step(costs: Costs, chip) -> dict:
    """The step at the chip's published peaks. `mfu_ceiling` divides the compiler's FLOPs,
    which hold any rematerialised forward: of a `remat` program it bounds hardware FLOPs."""
    compute_s = costs.flops / (chip.peak_tflops * 1e12)
    memory_s = costs.bytes / (chip.hbm_gbps * 1e9)
    ideal = max(compute_s, memory_s)
    return {"ideal_seconds": ideal, "bound": "compute" if compute_s >= memory_s else "memory",
            "mfu_ceiling": compute_s / ideal if ideal else 0.0}


def _first_line(error: Exception) -> str:
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    return lines[0] if lines else type(error).__name__


def compile_one(program: Program, mesh, rules):
    """(compiled, seconds) of a program lowered on `mesh`."""
    start = time.perf_counter()
    with sharding.use(mesh, rules), _persistent_cache_off_unless_local(mesh):
        compiled = program.jitted.lower(*program.args).compile()
    return compiled, time.perf_counter() - start


@contextlib.contextmanager
def _persistent_cache_off_unless_local(mesh):
    """A program compiled for another platform's topology (a TPU pod from this CPU) skips JAX's
    persistent compilation cache: no process here can load it back (a rerun would warn that the
    entry cannot be read, then compile it again)."""
    local = mesh.devices.flat[0].platform == jax.default_backend()
    if local or not jax.config.jax_enable_compilation_cache:
        yield
        return
    jax.config.update("jax_enable_compilation_cache", False)
    _quiet_reset()  # JAX decides once per process whether the cache is used
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        _quiet_reset()


def _quiet_reset():
    """`compilation_cache.reset_cache()` without its INFO line (two per TPU program, amid the
    tool's progress lines)."""
    logger = logging.getLogger("jax._src.compilation_cache")  # where the line is logged
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        compilation_cache.reset_cache()
    finally:
        logger.setLevel(level)


def compiled_costs(program: Program, mesh, rules) -> Costs:
    """The compiler's own count (a loop's body once)."""
    compiled, _ = compile_one(program, mesh, rules)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Costs(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)))


def _extrapolate(one: Costs, two: Costs, layers: int) -> Costs:
    return Costs(one.flops + (layers - 1) * (two.flops - one.flops),
                 one.bytes + (layers - 1) * (two.bytes - one.bytes))


@contextlib.contextmanager
def _noise_drawn_per_step():
    """Samplers traced inside draw each step's noise in the step: a sampler's step cost is
    then its loop body's (noise drawn before the loop would be counted once per step)."""
    before, sampling.PREDRAW_NOISE_BYTES = sampling.PREDRAW_NOISE_BYTES, -1
    try:
        yield
    finally:
        sampling.PREDRAW_NOISE_BYTES = before


def program_costs(variants: tuple[Program, Program], layers: int, mesh, rules) -> Costs:
    """Whole-program FLOPs and bytes per device from its 1- and 2-layer unrolled variants. A
    sampler's: the prefill's, plus its loop body's (whole minus prefill: one step and the last
    token's draw) once per decode step."""
    with _noise_drawn_per_step():
        costs = [compiled_costs(v, mesh, rules) for v in variants]
    total = _extrapolate(*costs, layers)
    if variants[0].decode_steps:
        prefill = _extrapolate(*(compiled_costs(v.prefill, mesh, rules) for v in variants), layers)
        step = Costs(total.flops - prefill.flops, total.bytes - prefill.bytes)
        n = variants[0].decode_steps
        total = Costs(prefill.flops + n * step.flops, prefill.bytes + n * step.bytes)
    return total


def analyse(runs: list[Run], variant_runs: tuple[list[Run], list[Run]] | None, mesh, rules,
            log=print) -> list[Result]:
    """Compile every distinct program once and account for its memory in every run; with
    `variant_runs` (the same runs built 1 and 2 layers deep), also its costs."""
    unique: dict[tuple, Result] = {}
    for run_index, run in enumerate(runs):
        resident = sum(per_device_bytes(tree) for tree in run.resident.values())
        for program_index, program in enumerate(run.programs):
            result = unique.get(program.key)
            if result is None:
                log(f"compiling {program.name} ({run.name}) ...")
                try:
                    compiled, seconds = compile_one(program, mesh, rules)
                except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: too big
                    unique[program.key] = Result(program, [run.name], 0, 0, 0, 0, 0, 0,
                                                 run.name, 0.0, failure=_first_line(e))
                    continue
                m = compiled.memory_analysis()
                result = Result(program, [], m.argument_size_in_bytes, m.output_size_in_bytes,
                                m.alias_size_in_bytes, m.temp_size_in_bytes,
                                m.generated_code_size_in_bytes, 0, "", seconds,
                                replicated=replicated_arrays(program))
                # Initialisers run once: no step time.
                if variant_runs is not None and not program.outputs_resident:
                    pair = tuple(v[run_index].programs[program_index] for v in variant_runs)
                    assert all(v.name == program.name for v in pair), (program.name, pair)
                    result.costs = program_costs(pair, program.layers, mesh, rules)
                unique[program.key] = result
            result.runs.append(run.name)
            if result.failure:
                continue
            transient = sum(per_device_bytes(a) for i, a in enumerate(program.args)
                            if i not in program.resident_args)
            extra = 0 if program.outputs_resident else result.output - result.alias
            peak = resident + transient + extra + result.temp + result.code
            if peak > result.peak:
                result.peak, result.peak_run = peak, run.name
    return list(unique.values())
