"""Start-up validation: a bad config stops with one line naming the field and the fix.

`validate(config, num_devices)` runs before anything is built or compiled. It checks only the
sections a config has, so every entry point (demo, trainers, study) shares it.
"""

from __future__ import annotations

import math

from alignment_gap.errors import ConfigError
from alignment_gap.losses import POLICY_LOSSES
from alignment_gap.presets import models as model_presets
from alignment_gap.presets.hypotheses import HYPOTHESES
from alignment_gap.sources import REPLAY_ORDERS

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "save_dots")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALING = ("none", "linear", "llama3")
MESH_AXES = ("data", "fsdp", "tensor")
SOURCES = ("online", "offline")
OPPONENTS = ("sft", "golden_policy")



def _fail(field: str, problem: str, fix: str):
    raise ConfigError(f"config.{field}: {problem}; {fix}")


def _positive(c, prefix, *names):
    for name in names:
        if c[name] <= 0:
            field = f"{prefix}.{name}" if prefix else name
            fix = "set it to >= 1" if isinstance(c[name], int) else "set it above 0"
            _fail(field, f"must be positive, got {c[name]}", fix)


def check_model(m, prefix="model"):
    _positive(m, prefix, "vocab_size", "width", "num_layers", "num_heads", "num_kv_heads",
              "mlp_dim", "max_len")
    head_dim = m.get("head_dim", 0)
    if not head_dim and m.width % m.num_heads:
        _fail(f"{prefix}.num_heads", f"{m.num_heads} does not divide {prefix}.width={m.width}",
              f"use a divisor of {m.width}, or set {prefix}.head_dim")
    if m.num_heads % m.num_kv_heads:
        _fail(f"{prefix}.num_kv_heads",
              f"{m.num_kv_heads} does not divide {prefix}.num_heads={m.num_heads}",
              f"use a divisor of {m.num_heads}")
    if (head_dim or m.width // m.num_heads) % 2:
        _fail(f"{prefix}.num_heads",
              f"head dim {head_dim or m.width // m.num_heads} is odd (RoPE needs even)",
              "choose num_heads (or head_dim) so the head dim is even")
    if m.get("mlp_activation", "silu") not in MLP_ACTIVATIONS:
        _fail(f"{prefix}.mlp_activation", f"{m.mlp_activation!r} is unknown",
              f"use one of {MLP_ACTIVATIONS}")
    if m.get("rope_scaling", "none") not in ROPE_SCALING:
        _fail(f"{prefix}.rope_scaling", f"{m.rope_scaling!r} is unknown",
              f"use one of {ROPE_SCALING}")
    if m.get("sliding_window", 0) < 0:
        _fail(f"{prefix}.sliding_window", f"must be >= 0, got {m.sliding_window}",
              "0 turns it off")
    if (m.get("sliding_window", 0) and not m.get("global_every", 0)
            and m.get("rope_scaling", "none") != "none"):
        # RoPE scaling applies to the global layers (as Gemma 3's): here there are none.
        _fail(f"{prefix}.rope_scaling", f"{m.rope_scaling!r} would scale no layer: every layer "
              f"is local ({prefix}.sliding_window={m.sliding_window}, {prefix}.global_every=0)",
              f"set {prefix}.global_every to make every n-th layer global, or rope_scaling "
              "'none'")
    if m.dtype not in DTYPES:
        _fail(f"{prefix}.dtype", f"{m.dtype!r} is not supported", f"use one of {DTYPES}")
    if m.get("remat", "none") not in REMAT:
        _fail(f"{prefix}.remat", f"{m.remat!r} is unknown", f"use one of {REMAT}")


def mesh_shape(mesh, num_devices: int) -> tuple[int, ...]:
    shape = [int(mesh[a]) for a in MESH_AXES]
    for axis, size in zip(MESH_AXES, shape, strict=True):
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", f"must be >= 1 or -1 (fill), got {size}", "fix the mesh shape")
    if shape.count(-1) > 1:
        _fail("mesh", f"more than one axis is -1 ({shape})", "let at most one axis fill")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            _fail("mesh", f"fixed axes multiply to {known}, which does not divide the "
                  f"{num_devices} devices", "change the fixed axes")
        shape[shape.index(-1)] = num_devices // known
    elif known != num_devices:
        _fail("mesh", f"data*fsdp*tensor = {known} but {num_devices} devices are available",
              f"make the product {num_devices} or set one axis to -1")
    return tuple(shape)


def check_model_on_mesh(m, shape, prefix="model"):
    _, fsdp, tensor = shape
    for name in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
        if m[name] % tensor:
            _fail(f"{prefix}.{name}", f"{m[name]} is not divisible by mesh.tensor={tensor}",
                  "use a smaller tensor axis or a divisible size")
    if m.width % fsdp:
        _fail(f"{prefix}.width", f"{m.width} is not divisible by mesh.fsdp={fsdp}",
              "use a smaller fsdp axis or a divisible width")


def check_sampling(s, prefix="sampling"):
    if s.temperature < 0:
        _fail(f"{prefix}.temperature", f"must be >= 0, got {s.temperature}", "0 means greedy")
    if s.top_k < 0:
        _fail(f"{prefix}.top_k", f"must be >= 0, got {s.top_k}", "0 turns it off")
    if not 0.0 < s.top_p <= 1.0:
        _fail(f"{prefix}.top_p", f"must be in (0, 1], got {s.top_p}", "1.0 turns it off")
    if "max_new_tokens" in s:
        _positive(s, prefix, "max_new_tokens")


def _check_microbatches(field: str, k: int, batch_size: int, rows: int):
    if k < 1 or batch_size % (k * rows):
        _fail(field, f"{k} does not split batch_size={batch_size} into slices divisible by "
              f"mesh data*fsdp={rows}", f"use a k >= 1 with batch_size a multiple of k*{rows}")


def validate(config, num_devices: int) -> None:
    """Raise ConfigError on the first problem found."""
    shape = mesh_shape(config.mesh, num_devices) if "mesh" in config else (1, 1, 1)
    models = [("model", config.get("model")), ("proxy_model", config.get("proxy_model")),
              ("golden_model", config.get("golden_model"))]  # the last: a study's own judge
    if "eval" in config:
        models.append(("eval.golden_model", config.eval.get("golden_model")))
        models.append(("eval.opponent_model", config.eval.get("opponent_model") or None))
    for name, model in models:
        if model is not None:
            check_model(model, name)
            check_model_on_mesh(model, shape, name)
    if "sampling" in config:
        check_sampling(config.sampling)
    if "loss" in config and config.loss not in POLICY_LOSSES:
        _fail("loss", f"{config.loss!r} is unknown", f"use one of {POLICY_LOSSES}")
    if "batch_size" in config:
        _positive(config, "", "batch_size")
        rows = shape[0] * shape[1]
        if config.batch_size % rows:
            _fail("batch_size", f"{config.batch_size} is not divisible by mesh data*fsdp={rows}",
                  f"use a multiple of {rows}")
        _check_microbatches("microbatches", config.get("microbatches", 1), config.batch_size,
                            rows)
    if "num_steps" in config:
        _positive(config, "", "num_steps")
        if config.get("warmup_steps", 0) >= config.num_steps:
            _fail("warmup_steps", f"{config.warmup_steps} is not below num_steps="
                  f"{config.num_steps}", "shorten the warm-up or train longer")
    if "source" in config and config.source not in SOURCES:
        _fail("source", f"{config.source!r} is unknown", f"use one of {SOURCES}")
    if config.get("source") == "online" and config.sampling.temperature <= 0:
        _fail("sampling.temperature", "0 (greedy) makes both online samples identical, so "
              "there is nothing to learn from", "use a temperature > 0 online")
    if "sampling" in config and "model" in config and config.sampling.top_k > \
            config.model.vocab_size:
        _fail("sampling.top_k", f"{config.sampling.top_k} exceeds model.vocab_size="
              f"{config.model.vocab_size}", "use a smaller top_k or 0 (off)")
    for name in ("log_every", "checkpoint_every", "eval_batches", "max_to_keep"):
        if name in config:
            _positive(config, "", name)
    for step in config.get("checkpoint_steps", ()):
        if not (isinstance(step, int) and 0 < step < config.get("num_steps", step + 1)):
            _fail("checkpoint_steps", f"{step!r} is not a step in 1 .. num_steps-1",
                  "list the steps between the start and the end to checkpoint at")
    if config.get("task") == "study":
        check_study(config, shape[0] * shape[1])
        for step in config.policy.get("early_checkpoints", ()):
            if not (isinstance(step, int) and step > 0):
                _fail("policy.early_checkpoints", f"{step!r} is not a positive step",
                      "list steps >= 1 (those at or past a run's end are skipped)")
    if config.get("task") == "demo":
        _check_demo(config, shape[0] * shape[1])
    if "data" in config:
        _positive(config.data, "data", "prompt_len", "response_len")
    if "eval" in config and "mesh" in config:
        rows = shape[0] * shape[1]
        for name in ("prompts", "pairs"):
            if config.eval.get(name, 0) % rows:
                _fail(f"eval.{name}", f"{config.eval[name]} is not divisible by mesh "
                      f"data*fsdp={rows}", f"use a multiple of {rows}")
    _check_optimizer(config, "")
    for section in ("sft", "golden", "proxy", "policy"):  # a study's stages
        if hasattr(config.get(section), "get"):
            _check_optimizer(config[section], f"{section}.")
    if "data" in config:
        _check_data(config.data)
    if "beta" in config and config.beta <= 0:
        _fail("beta", f"must be positive, got {config.beta}", "the paper uses 0.1")
    if "sweep" in config:
        _positive(config.sweep, "sweep", "shards", "poll_s", "wait_timeout_s")
        if not 0 <= config.sweep.shard < config.sweep.shards:
            _fail("sweep.shard", f"{config.sweep.shard} is not in [0, sweep.shards="
                  f"{config.sweep.shards})", "number the hosts 0 .. shards-1")
        if config.sweep.get("stack_runs", 1) < 1:
            _fail("sweep.stack_runs", f"{config.sweep.stack_runs} is not a number of runs",
                  "use 1 (each run alone) or more (runs per stacked program)")
    if "hypotheses" in config:
        for name in config.hypotheses:
            if name not in HYPOTHESES:
                _fail("hypotheses", f"{name!r} is unknown", f"use some of {HYPOTHESES}")
        check_hypotheses(config)
        if config.hypotheses and config.get("upstream_chains", 1) > 1:
            _fail("upstream_chains", f"{config.upstream_chains} re-draws the main study's "
                  "upstream stages, and the hypothesis variants analyse one draw",
                  "set it to 1 or run the hypotheses as a study of their own")
        stops = [f for f in ("stop_after_falls", "kl_cap") if config.policy.get(f, 0)]
        if config.hypotheses and stops:
            _fail(f"policy.{stops[0]}", "the hypothesis variants replay and read every online "
                  "step, so online runs cannot stop early there",
                  "set it to 0 or run the hypotheses from a study without it")
    if config.get("task") == "study" and config.eval.get("test_prompts", 0):
        e, d = config.eval, config.data
        if e.test_prompts % (shape[0] * shape[1]):
            _fail("eval.test_prompts", f"{e.test_prompts} is not divisible by mesh data*fsdp="
                  f"{shape[0] * shape[1]}", f"use a multiple of {shape[0] * shape[1]}")
        if d.kind == "synthetic" and e.prompts + e.test_prompts > d.test_pairs:
            _fail("eval.test_prompts", f"the test stage scores prompts {e.prompts} to "
                  f"{e.prompts + e.test_prompts - 1} of the test split (after the "
                  f"eval.prompts={e.prompts} the runs choose on), and it has data.test_pairs="
                  f"{d.test_pairs}", f"raise data.test_pairs to >= {e.prompts + e.test_prompts}")
    for prefix in ("policy", "eval"):
        section = config.get(prefix)
        if hasattr(section, "get") and section.get("stop_margin", 0.0) < 0:
            _fail(f"{prefix}.stop_margin", f"must be >= 0, got {section.stop_margin}",
                  "use 0 (any fall counts) or about the win rate's noise, e.g. 0.03")
    if "eval" in config and config.eval.get("stop_after_falls", 0) < 0:
        _fail("eval.stop_after_falls", f"must be >= 0, got {config.eval.stop_after_falls}",
              "use 0 (off) or the evaluations below the best that end a run, e.g. 2")
    if "eval" in config and not config.eval.get("golden_checkpoint", True):
        for name in ("stop_after_falls", "kl_cap"):
            if config.eval.get(name, 0):
                _fail(f"eval.{name}", "stops a run on its evaluations, and this run has none",
                      "set config.eval.golden_checkpoint (the judge) or set it to 0")
    lengths = config.data if "data" in config else config
    if "prompt_len" in lengths and "response_len" in lengths:
        pair = config.get("task") == "preference_model"  # reads [prompt | y1 | y2]
        _check_max_len(config, "model", lengths, 2 if pair else 1)
        _check_max_len(config, "proxy_model", lengths, 2)
        _check_max_len(config, "golden_model", lengths, 2)
        if "eval" in config:
            _check_max_len(config.eval, "golden_model", lengths, 2, prefix="eval.")


def _check_optimizer(c, prefix: str):
    if c.get("grad_clip", 0.0) < 0:  # optax would scale by a negative norm: gradient ascent
        _fail(f"{prefix}grad_clip", f"must be >= 0, got {c.grad_clip}", "0 turns clipping off")
    if not 0.0 <= c.get("end_lr_fraction", 0.0) <= 1.0:
        _fail(f"{prefix}end_lr_fraction", f"must be in [0, 1], got {c.end_lr_fraction}",
              "0 decays to zero, 1 keeps the rate after warm-up")


SFT_SOURCES = ("comparisons", "demonstrations")


def _check_data(d):
    if d.get("sft_source", SFT_SOURCES[0]) not in SFT_SOURCES:
        _fail("data.sft_source", f"{d.sft_source!r} is unknown", f"use one of {SFT_SOURCES}")
    if d.get("kind") != "synthetic":
        return
    if d.get("label_temperature", 1.0) <= 0:  # below 0 the labels would flip
        _fail("data.label_temperature", f"must be positive, got {d.label_temperature}",
              "lower is less label noise, e.g. 0.25")
    for split in ("train", "validation", "test"):
        if d.get(f"{split}_pairs", 1) <= 0:
            _fail(f"data.{split}_pairs", f"must be positive, got {d[f'{split}_pairs']}",
                  "set it to at least one batch")


def _check_demo(c, rows: int):
    """The sorting demo: a response is the prompt's symbols sorted, then EOS."""
    if c.response_len < c.prompt_len + 1:
        _fail("response_len", f"{c.response_len} is shorter than prompt_len + 1 = "
              f"{c.prompt_len + 1} (the sorted symbols, then EOS)", f"set it to >= "
              f"{c.prompt_len + 1}")
    if c.sampling.max_new_tokens != c.response_len:
        _fail("sampling.max_new_tokens", f"{c.sampling.max_new_tokens} is not response_len="
              f"{c.response_len}, the length the demo scores", f"set it to {c.response_len}")
    if c.get("alphabet", 0) + 2 > c.model.vocab_size:  # ids 0 and 1: padding and EOS
        _fail("alphabet", f"{c.alphabet} symbols (ids 2 .. {c.alphabet + 1}) do not fit "
              f"model.vocab_size={c.model.vocab_size}", f"set it to <= {c.model.vocab_size - 2}")
    _positive(c, "", "eval_prompts")
    if c.eval_prompts % rows:
        _fail("eval_prompts", f"{c.eval_prompts} is not divisible by mesh data*fsdp={rows}",
              f"use a multiple of {rows}")


def _positive_values(values, field: str, fix: str, *, integers=False, allow_empty=False):
    if not values and not allow_empty:
        _fail(field, "is empty", fix)
    for v in values:
        if not (isinstance(v, int) if integers else isinstance(v, (int, float))) or v <= 0:
            _fail(field, f"{v!r} in {tuple(values)} is not a positive "
                  f"{'integer' if integers else 'number'}", fix)


def check_study(c, rows: int):
    """The study's own fields, named as the user set them: each stage's trainer config is built
    from them, so a mistake here would otherwise surface mid-study as a traceback."""
    seeds = "list policy seeds, e.g. --config.seeds='(0, 1, 2)'"
    if not c.seeds:
        _fail("seeds", "is empty", seeds)
    for seed in c.seeds:
        if not isinstance(seed, int) or seed < 0:
            _fail("seeds", f"{seed!r} in {tuple(c.seeds)} is not an integer >= 0", seeds)
    if c.get("upstream_chains", 1) < 1:
        _fail("upstream_chains", f"must be >= 1, got {c.upstream_chains}",
              "1 runs the main study once")
    for name in ("sft", "golden", "proxy"):
        _positive(c[name], name, "steps", "batch_size", "checkpoint_every", "eval_batches")
        if c[name].learning_rate <= 0:
            _fail(f"{name}.learning_rate", f"must be positive, got {c[name].learning_rate}",
                  "set the peak learning rate")
        if c[name].batch_size % rows:
            _fail(f"{name}.batch_size", f"{c[name].batch_size} is not divisible by mesh "
                  f"data*fsdp={rows}", f"use a multiple of {rows}")
    p = c.policy
    _positive(p, "policy", "steps", "checkpoint_every", "microbatches")
    _positive(c, "", "golden_policy_steps")
    if p.loss not in POLICY_LOSSES:
        _fail("policy.loss", f"{p.loss!r} is unknown", f"use one of {POLICY_LOSSES}")
    if p.beta <= 0:
        _fail("policy.beta", f"must be positive, got {p.beta}", "the paper uses 0.1")
    _check_microbatches("policy.microbatches", p.microbatches, c.batch_size, rows)
    if p.get("offline_checkpoint_every", 0) < 0:
        _fail("policy.offline_checkpoint_every", f"must be >= 0, got "
              f"{p.offline_checkpoint_every}", "0 uses policy.checkpoint_every")
    for name in ("stop_after_falls", "kl_cap"):
        if p.get(name, 0) < 0:
            _fail(f"policy.{name}", f"must be >= 0, got {p[name]}", "0 turns it off")
    if p.get("stop_after_falls", 0) and not c.eval.get("test_prompts", 0):
        _fail("policy.stop_after_falls", f"{p.stop_after_falls} stops online runs on their "
              "golden win rate over every evaluation prompt, and with eval.test_prompts=0 "
              "half of those prompts score the report", "set eval.test_prompts (e.g. 256: a "
              "test stage scores other prompts) or set it to 0")
    if p.temperature <= 0:
        _fail("policy.temperature", f"must be positive, got {p.temperature}: at 0 (greedy) "
              "both online samples are the same", "use 1.0, the paper's")
    check_sampling(p, "policy")
    if p.top_k > c.model.vocab_size:
        _fail("policy.top_k", f"{p.top_k} exceeds model.vocab_size={c.model.vocab_size}",
              "use a smaller top_k or 0 (off)")
    rates = "list positive learning rates, e.g. '(2e-4, 1e-3)'"
    _positive_values(c.online_learning_rates, "online_learning_rates", rates)
    _positive_values(c.offline_learning_rates, "offline_learning_rates", rates)
    _positive_values(c.online_betas, "online_betas",
                     "list positive betas or () for policy.beta alone", allow_empty=True)
    _positive_values(c.offline_betas, "offline_betas", "list positive betas, e.g. '(0.1, 0.5)'")
    _positive_values(c.offline_steps, "offline_steps", "list positive step counts, e.g. '(300,)'",
                     integers=True)
    if c.opponent not in OPPONENTS:
        _fail("opponent", f"{c.opponent!r} is unknown", f"use one of {OPPONENTS}")
    e, d = c.eval, c.data
    _positive(e, "eval", "prompts", "kl_prompts", "pairs")
    if e.kl_prompts > e.prompts:
        _fail("eval.kl_prompts", f"{e.kl_prompts} exceeds eval.prompts={e.prompts}, the "
              "prompts whose samples it measures", f"set it to <= {e.prompts}")
    if d.kind == "synthetic":  # real splits' sizes are known once their files are read
        for name, split, size in (("prompts", "test", d.test_pairs),
                                  ("pairs", "validation", d.validation_pairs)):
            if e[name] > size:
                _fail(f"eval.{name}", f"{e[name]} exceeds the {split} split's data."
                      f"{split}_pairs={size}", f"raise data.{split}_pairs to >= {e[name]} "
                      "or evaluate on fewer")
    if e.get("test_prompts", 0) < 0:
        _fail("eval.test_prompts", f"must be >= 0, got {e.test_prompts}",
              "0 lets the evaluation prompts' halves choose and score")
    if e.get("candidate_margin", 0.0) < 0:
        _fail("eval.candidate_margin", f"must be >= 0, got {e.candidate_margin}",
              "use about the win rate's noise, e.g. 0.03")


def check_hypotheses(c):
    """The sections of the hypothesis variants a study runs."""
    names = set(c.hypotheses)
    if "classification" in names:  # it reads the offline partner at each online checkpoint
        online_every = c.policy.checkpoint_every
        offline_every = c.policy.get("offline_checkpoint_every", 0) or online_every
        if online_every % offline_every:
            _fail("policy.offline_checkpoint_every", f"{offline_every} does not divide "
                  f"policy.checkpoint_every={online_every}: the classification variant reads "
                  "the offline run at every online checkpoint", "use a divisor of it, or 0 "
                  "(policy.checkpoint_every)")
    reads_main_online = sorted(names & {"coverage", "quality", "classification",
                                        "noncontrastive"})
    if reads_main_online and c.online_betas and c.policy.beta not in c.online_betas:
        _fail("online_betas", f"{tuple(c.online_betas)} lacks policy.beta={c.policy.beta:g}, "
              f"the online run the {reads_main_online[0]} variant reads (it would join the "
              "main comparison unscored by its test stage)", f"add {c.policy.beta:g} to "
              "online_betas, or set policy.beta to one of them")
    if "coverage" in names:
        orders = "give (label, order, batches per window) with order in " \
            f"{REPLAY_ORDERS} and a window of >= 1 batches or a fraction of the run below 1, " \
            "e.g. ('window4', 'window', 4) or ('window_eighth', 'window', 0.125)"
        for entry in c.coverage.orders:
            window = entry[2] if len(entry) == 3 else None
            if not (len(entry) == 3 and entry[1] in REPLAY_ORDERS and (
                    (isinstance(window, int) and window >= 1)
                    or (isinstance(window, float) and 0 < window < 1))):
                _fail("coverage.orders", f"{tuple(entry)!r} is not a replay order", orders)
        labels = {entry[0] for entry in c.coverage.orders}
        if not {"tandem", "shuffled"} <= labels:
            _fail("coverage.orders", f"labels {sorted(labels)} lack 'tandem' or 'shuffled', "
                  "the two replays every verdict reads", "keep ('tandem', 'tandem', 1) and "
                  "('shuffled', 'shuffle', 1)")
    if "quality" in names:
        _positive(c.quality, "quality", "pairs", "early_step")
        _positive_values(c.quality.learning_rates, "quality.learning_rates",
                         "list positive learning rates, e.g. '(5e-4,)'")
    if "classification" in names:
        _positive(c.classification, "classification", "stream_pairs")
    if "noncontrastive" in names:
        if c.noncontrastive.learning_rate <= 0:
            _fail("noncontrastive.learning_rate", f"must be positive, got "
                  f"{c.noncontrastive.learning_rate}", "online's is the paper's choice")
        _positive_values(c.noncontrastive.offline_learning_rates,
                         "noncontrastive.offline_learning_rates",
                         "list positive learning rates, e.g. '(1e-4, 2e-4)'")
    if "scaling" in names:
        sizes = tuple(c.scaling.sizes)
        known = (*model_presets.SIZES, *model_presets.PRETRAINED)
        for size in sizes:
            if size not in known:
                _fail("scaling.sizes", f"{size!r} is not a model size", f"use some of {known}")
        if len(set(sizes)) < 2:
            _fail("scaling.sizes", f"{sizes} has fewer than two sizes to compare",
                  "list two or more, smallest first, e.g. ('nano', 'mini', 'small')")
        if not 0.0 < c.scaling.quantile <= 1.0:
            _fail("scaling.quantile", f"must be in (0, 1], got {c.scaling.quantile}",
                  "0.9 takes the best runs' peaks without the single luckiest")


def _check_max_len(config, name, lengths, responses, prefix=""):
    if name not in config:
        return
    needed = lengths.prompt_len + responses * lengths.response_len
    if needed > config[name].max_len:
        _fail(f"{prefix}{name}.max_len", f"{config[name].max_len} is shorter than the "
              f"{needed} tokens it reads (prompt_len + {responses} x response_len)",
              f"set it to >= {needed}")
