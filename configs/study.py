"""The controlled study (PAPER.md, Fig. 1) end to end, from one command.

    python -m alignment_gap.main --config configs/study.py:mini --workdir workdir/study
Variants: `smoke` (whole pipeline in about two minutes on 2 cores; tests), `mini` (the default of
`make study`: 10.7 minutes from empty on a 2-core Intel Xeon VM and 7.0 on an AMD EPYC one,
2026-12-04; 16-29 on Intel Xeon VMs with earlier code), `paper` (the full protocol at the mini
size: 5 seeds, the offline grid and an online beta sweep, curves to a turn beyond noise, 1,024 test
prompts; 105 minutes from empty on the Intel Xeon VM, each seed's offline grid stacked,
2026-12-05), `paper_v1` (the same with any fall of the golden curve ending an online run, as
docs/paper_study, _amd and _intel_2026-12-04 ran: 106 minutes from empty on the Intel Xeon VM, 99
on AMD EPYC), `paper_wide` (`paper` with offline lr 2e-3 too: a check that the grid's top edge does
not hold offline back; 133 minutes of stages), `paper_low_beta` (`paper` with online beta 0.03 and
0.01 too: online past beta 0.1's 3.5-nat plateau, to the KL cap; 118 minutes of stages),
`mini_chains` (mini with the upstream stages drawn three times: their share of the variance),
`mini_large_golden` (mini with a golden model three times the proxy's size, as in the paper's
regime; 16 minutes of stages), `mini_weak_proxy` and `mini_medium_proxy` (that, with the
proxy trained on 3,200 or 9,600 pairs and online runs of 600 steps at beta 0.1 and 0.01: a proxy
to exploit; `mini_weak_proxy_chains`, `mini_medium_proxy_chains`: those with the upstream
stages drawn three times, each seed's two offline runs stacked), `mini_golden_opponent` (the
paper's golden-policy opponent),
accelerator presets (`tpu_v5p_3b`, `gpu_h100_770m`) that swap only the model sizes and the mesh,
and studies on real data from pretrained models (`tldr_gemma3_270m`, `hh_gemma3_270m`, and `_cpu`
versions of both: every stage, a few steps).

The paper's hypotheses (PAPER.md, "Hypotheses tested") are variants too, each adding its runs,
figure and verdict rows to the same stages and caches: `coverage`, `quality`,
`classification`, `noncontrastive`, `scaling`, or `hypotheses` for all five; `smoke_<name>`
is the same at smoke scale (tests). Run them in the main study's workdir to reuse its stages.
"""

import ml_collections

from alignment_gap.presets import common, meshes, models
from alignment_gap.presets.hypotheses import HYPOTHESES


def _stage(steps, batch_size, learning_rate, *, warmup_steps, eval_batches):
    """A trainer stage's section: every optimiser and evaluation field its run reads."""
    s = ml_collections.ConfigDict()
    s.steps = steps  # Update steps.
    s.batch_size = batch_size  # Global batch.
    s.learning_rate = learning_rate  # Peak learning rate.
    s.seed = 0  # Initialisation and data-order seed.
    s.warmup_steps = warmup_steps  # Linear warm-up steps (at most a tenth of `steps`).
    s.end_lr_fraction = 0.1  # Cosine decay ends at this fraction of the peak.
    s.weight_decay = 0.0  # AdamW decoupled weight decay.
    s.grad_clip = 1.0  # Global-norm gradient clipping (0: off).
    s.checkpoint_every = 500  # Checkpoint and validation interval (at most `steps`).
    s.eval_batches = eval_batches  # Validation batches per evaluation.
    return s


# Warm-up caps as the study has always run (the mini presets' 5% of 1500 / 3000 / 2000 steps).
def _sft_stage(steps, batch_size, learning_rate):
    return _stage(steps, batch_size, learning_rate, warmup_steps=75, eval_batches=8)


def _preference_stage(steps, batch_size, learning_rate, *, warmup_steps):
    s = _stage(steps, batch_size, learning_rate, warmup_steps=warmup_steps, eval_batches=16)
    s.patience = 3  # Evaluations without improvement before stopping (validation plateau).
    s.min_improvement = 0.002  # Validation accuracy gain that counts as improvement.
    return s


def _golden_stage(steps, batch_size, learning_rate):
    return _preference_stage(steps, batch_size, learning_rate, warmup_steps=150)


def _proxy_stage(steps, batch_size, learning_rate):
    return _preference_stage(steps, batch_size, learning_rate, warmup_steps=100)


# Proxies trained on less of D_golden (32 pairs a step, each pair seen at most once).
WEAK_PROXY_STEPS = {"mini_weak_proxy": 100, "mini_medium_proxy": 300,
                    "mini_weak_proxy_chains": 100, "mini_medium_proxy_chains": 300}


def get_config(variant: str = "mini") -> ml_collections.ConfigDict:
    scale, _, hypothesis = variant.partition("_")
    if scale in ("smoke", "mini") and (hypothesis in HYPOTHESES or hypothesis == "hypotheses"):
        pass  # smoke_coverage, ..., smoke_hypotheses
    elif variant in HYPOTHESES or variant == "hypotheses":
        scale, hypothesis = "mini", variant
    else:
        return _main(variant)
    c = _main(scale)
    c.hypotheses = list(HYPOTHESES) if hypothesis == "hypotheses" else [hypothesis]
    if scale == "mini":
        c.seeds = [0, 1]  # Two seeds per arm: 33 min past `make study` (2 Intel Xeon cores).
        # The main study's runs (sweep and checkpoints): in its workdir they are reused. The
        # quality datasets' offline runs keep the learning rate docs/hypotheses ran them at.
        c.quality.learning_rates = [5e-4]
    else:  # smoke: every analysis's code path once, at the least cost (tests)
        c.quality.pairs = 4 * c.batch_size
        c.scaling.sizes = ["nano", c.model.name]
        c.coverage.orders = [o for o in c.coverage.orders if o[0] != "window_eighth"]
        c.noncontrastive.offline_learning_rates = [c.noncontrastive.learning_rate]
    return c


def _hypothesis_sections(c):
    c.hypotheses = ()  # Hypothesis variants whose runs, figures and verdicts to add.
    c.coverage = ml_collections.ConfigDict()
    # Replay orders of D_online: (label, order, batches per shuffled window; a fraction below
    # 1: that share of policy.steps, at least 2). The paper's windows of 4 and 500 batches in
    # 4k-step runs; 500/4000 scales to an eighth of the run here.
    c.coverage.orders = [("tandem", "tandem", 1), ("window4", "window", 4),
                         ("window_eighth", "window", 0.125), ("shuffled", "shuffle", 1)]
    c.quality = ml_collections.ConfigDict()
    c.quality.pairs = 4096  # Train pairs sampled for each of D_4k vs 4k, D_sft vs 800, ...
    # The paper's 800 of 4k steps, scaled; references follow --config.policy.steps and
    # --config.batch_size until set themselves.
    c.quality.early_step = c.policy.get_ref("steps") // 5
    c.quality.learning_rates = (c.offline_learning_rates[0],)  # Offline lr on each dataset.
    c.classification = ml_collections.ConfigDict()
    c.classification.stream_pairs = 2 * c.get_ref("batch_size")  # Stream pairs a checkpoint.
    c.noncontrastive = ml_collections.ConfigDict()
    c.noncontrastive.learning_rate = c.online_learning_rates[0]  # Best-of-2 online (and shuffled).
    lr = c.noncontrastive.learning_rate  # Best-of-2 offline on D_golden: its own sweep.
    c.noncontrastive.offline_learning_rates = (lr / 2, lr, 2.5 * lr)
    c.scaling = ml_collections.ConfigDict()
    c.scaling.sizes = ("nano", "mini", "small")  # Policy sizes (>= 8x params), same proxy,
    # each against one opponent: the golden policy (trained at the main size, c.model).
    c.scaling.quantile = 0.9  # "best" = this quantile of a method's run peaks at a size.


# Studies on real data from a pretrained model: variant -> (data kind, policy and proxy, golden).
# The accelerator variants set the paper's shapes; `_cpu` ones run every stage for a few steps
# (tests point them at tiny checkpoints and fixture files). Set init.checkpoint (and
# golden_init) to local copies of the checkpoints, data.manual_dir to the published files.
PRETRAINED_STUDIES = {
    "tldr_gemma3_270m": ("tldr", "gemma3_270m", "gemma3_1b"),
    "hh_gemma3_270m": ("hh", "gemma3_270m", "gemma3_1b"),
    "tldr_gemma3_270m_cpu": ("tldr", "gemma3_270m", "gemma3_270m"),
    "hh_gemma3_270m_cpu": ("hh", "gemma3_270m", "gemma3_270m"),
}


def _pretrained_study(c, variant: str):
    kind, policy, golden = PRETRAINED_STUDIES[variant]
    c.data.kind = kind
    c.model, c.proxy_model, c.golden_model = (models.get_config(s) for s in
                                              (policy, policy, golden))
    if variant.endswith("_cpu"):
        c.seeds, c.batch_size = [0], 4
        c.sft, c.golden, c.proxy = (_sft_stage(4, 4, 1e-5), _golden_stage(4, 4, 1e-5),
                                    _proxy_stage(4, 4, 1e-5))
        c.policy.steps, c.policy.checkpoint_every, c.policy.microbatches = 4, 2, 1
        c.offline_learning_rates, c.offline_steps = [1e-6], [4]
        c.online_learning_rates = [1e-6]
        c.eval.prompts, c.eval.kl_prompts, c.eval.pairs = 8, 4, 8
        c.data.prompt_len, c.data.response_len = 48, 8
    else:  # TL;DR posts run to ~500 tokens; the paper's summaries to ~64.
        c.data.prompt_len, c.data.response_len = 512, 64
        c.sft, c.golden, c.proxy = (_sft_stage(2000, 64, 1e-5), _golden_stage(2000, 64, 1e-5),
                                    _proxy_stage(2000, 64, 1e-5))
        c.online_learning_rates, c.offline_learning_rates = [1e-6], [1e-6, 3e-6]
        c.mesh = meshes.get_config("fsdp")  # compiles for a v5e-8 (README, the AOT tool)
        c.golden_model.remat = "full"  # its update needs 25 GiB of temporaries on v5e without
    for m in (c.model, c.golden_model, c.proxy_model):
        m.max_len = c.data.prompt_len + 2 * c.data.response_len


def _paper(c):
    """The full protocol at the mini size (issue 17): five seeds, the offline grid over learning
    rate (online's and below it too) x beta x two epochs of D_golden, online runs over beta to the
    turn of their golden curve (a fall beyond the evaluations' noise), a proxy that sees less data
    than the golden model, and checkpoints chosen on the evaluation prompts but reported on 1,024
    others."""
    c.seeds = [0, 1, 2, 3, 4]
    c.policy.early_checkpoints = []  # the plan docs/paper_study ran: online_betas reach low KL
    c.data.train_pairs = 10_000  # D_initial, relabelled into D_golden
    c.proxy.steps = 250  # 8,000 of D_golden's pairs, once: a proxy there is more to exploit in
    c.policy.steps = 600  # online: at most; it stops where its golden curve has turned
    c.policy.stop_after_falls = 2
    # A fall counts past ~2 standard errors of the difference between consecutive evaluations
    # (0.012: median over the online runs of docs/paper_study_intel_2026-12-04, paired over its
    # 256 prompts); at 0, 11 of that run's 19 stops were on falls of one prompt in 256.
    c.policy.stop_margin = 0.025
    c.policy.kl_cap = 8.0
    c.online_betas = [0.1, 0.3, 0.5, 1.0]  # online points down to the low KL offline reaches
    c.offline_learning_rates = [1e-4, 2e-4, 5e-4, 1e-3]
    c.offline_betas = [0.1, 0.5, 1.0]
    c.offline_steps = [2 * c.data.train_pairs // c.batch_size]  # two epochs; shorter arms are
    # its earlier checkpoints (the learning rate is constant after warm-up)
    c.policy.offline_checkpoint_every = 125  # the grid's 12 runs per seed span the KL range
    c.eval.test_prompts = 1024
    c.data.test_pairs = c.eval.prompts + c.eval.test_prompts
    # Each seed's offline grid trained as one stacked program (train/policy_stack.py): 105 min
    # from an empty workdir on a 2-core Intel Xeon VM against stage times adding to 118 run
    # alone; the same win rates at every evaluation (docs/paper_study_stacked_intel_2026-12-05).
    c.sweep.stack_runs = 12


def _main(variant: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "study"  # Which entry point main.py runs.
    c.seeds = (0, 1, 2)  # Policy-run seeds (online and offline); headline numbers average them.
    # Upstream draws: n > 1 repeats the main study n - 1 more times with the world, SFT, golden
    # and proxy seeds shifted by 1, 2, ... (stages named -u1, ...): the intervals then resample
    # draws and seeds within them, and the report says the draws' share of the variance.
    c.upstream_chains = 1
    common.add_runtime(c, model_size="mini")  # c.model: the policy (and SFT, reference) size.
    c.batch_size = 32  # Pairs per policy step (the paper's 32 prompts, one pair each).
    c.golden_model = models.get_config("mini")  # The golden preference model (paper: 11B).
    c.proxy_model = models.get_config("mini")  # The proxy preference model (paper: 770M).
    # Pretrained starts (hf:DIR, gguf:FILE; empty: from scratch). init.checkpoint is the
    # policy's: SFT starts from it, and so does the proxy (from SFT, the paper's recipe) when it
    # has the policy's architecture. The golden model's trunk, and a proxy of another size,
    # start from these; they must share the policy's tokenizer (one family).
    c.golden_init = ""
    c.proxy_init = ""
    c.sft = _sft_stage(1000, 32, 3e-3)  # SFT on D_initial's responses, winners and losers.
    c.golden = _golden_stage(1500, 32, 1e-3)  # Golden preference model on D_initial.
    c.proxy = _proxy_stage(1000, 32, 1e-3)  # Proxy preference model on D_golden, from SFT.
    c.policy = ml_collections.ConfigDict()
    c.policy.loss = "ipo"  # The policy loss of every run (ipo | dpo | slic | best_of_two).
    c.policy.beta = 0.1  # KL strength of the online runs (the paper's default).
    c.policy.steps = 300  # Online steps per run.
    c.policy.checkpoint_every = 50  # Checkpoint and evaluation interval (one curve point each).
    c.policy.offline_checkpoint_every = 0  # The offline runs' interval (0: checkpoint_every).
    # Online runs stop before policy.steps once the golden win rate has been below its best at
    # this many evaluations (the curve has turned) or their KL passes kl_cap nats; 0: off.
    c.policy.stop_after_falls = 0
    c.policy.kl_cap = 0.0
    c.policy.stop_margin = 0.0  # A fall counts only this far below the best (evaluation noise).
    # Extra checkpoints (each evaluated) where the interval leaves gaps in KL, so that every
    # curve has points across the budgets: both methods are at ~0.17 nats at step 25 (at step
    # 10, ~0.006: too close to SFT to tell apart); from step 35 to 50 offline at online's
    # learning rate goes 0.42 -> 0.79 nats, and from step 50 to 100 online 0.5 -> 0.95.
    c.policy.early_checkpoints = (25, 35, 45, 75)
    c.policy.warmup_steps = 20  # Linear warm-up steps (at most a tenth of a run's steps).
    c.policy.end_lr_fraction = 1.0  # Constant after warm-up, as the paper's policy runs.
    c.policy.weight_decay = 0.0  # AdamW decoupled weight decay.
    c.policy.grad_clip = 1.0  # Global-norm gradient clipping (0: off).
    c.policy.temperature = 1.0  # Sampling temperature of the online policy and evaluations.
    c.policy.top_k = 0  # Online sampling: top-k (0: off).
    c.policy.top_p = 1.0  # Online sampling: nucleus mass (1: off).
    # Sequential slices per update (gradient accumulation; the same update). 4 runs the mini
    # update faster on CPU (slices fit cache); on accelerators raise it only to fit memory.
    c.policy.microbatches = 4
    c.online_learning_rates = (2e-4,)  # The online sweep: lr x beta per seed.
    c.online_betas = ()  # Empty: policy.beta alone (the hypotheses' online runs use it too).
    # The offline sweep: lr x beta x steps per seed. Online's learning rate (its first
    # checkpoints fall below KL 1, where 5e-4 and 1e-3 have none) and a fast one that reaches
    # online's KL range.
    c.offline_learning_rates = (2e-4, 1e-3)
    c.offline_betas = (0.1,)
    c.offline_steps = (300,)
    c.opponent = "sft"  # sft | golden_policy: whom win rates are against.
    c.golden_policy_steps = 300  # golden_policy: online IPO steps against the golden model.
    c.sweep = ml_collections.ConfigDict()  # Fan the runs out over hosts sharing the workdir:
    c.sweep.shard = 0  # this host's share (runs round-robin; shared stages and report: 0),
    c.sweep.shards = 1  # out of this many jobs (launch/local_multiprocess.py --sweep, slurm_sweep).
    c.sweep.poll_s = 5.0  # How often a host looks for stages other hosts are finishing.
    c.sweep.wait_timeout_s = 86_400.0  # Give up (clear error) waiting this long for them.
    # One id shared by the shards of one launch, new at each (the launchers set it): a stage
    # failed in this launch stops the shards waiting for it even if they start after it
    # failed; one failed in another launch is awaited (its shard retries it). "": unknown.
    c.sweep.launch = ""
    # Train up to this many offline runs of one seed and length (they differ in learning rate,
    # beta or loss) as one stacked program (train/policy_stack.py); 1: each run alone.
    c.sweep.stack_runs = 1
    c.eval = ml_collections.ConfigDict()
    c.eval.prompts = 256  # Fixed test prompts per evaluation (paper: 2048).
    c.eval.kl_prompts = 256  # Prompts whose samples measure the KL budget (paper: 256).
    c.eval.pairs = 256  # Held-out D_golden pairs for classifier accuracy and drift.
    # > 0: the evaluations above only choose checkpoints; a test stage scores the candidates
    # (within candidate_margin of the best selection win rate at their KL) on this many other
    # test-split prompts. 0: the evaluation prompts' halves choose and score.
    c.eval.test_prompts = 0
    c.eval.candidate_margin = 0.03
    c.data.train_pairs = 20_000
    c.data.label_temperature = 0.15  # Label noise: the proxy must find a learnable signal.
    for m in (c.model, c.golden_model, c.proxy_model):
        m.max_len = c.data.prompt_len + 2 * c.data.response_len
    if variant in ("smoke", "tiny"):
        c.seeds = [0]
        c.data.train_pairs, c.data.validation_pairs, c.data.test_pairs = 400, 64, 64
        c.sft, c.golden, c.proxy = (_sft_stage(60, 16, 3e-3), _golden_stage(60, 16, 1e-3),
                                    _proxy_stage(40, 16, 1e-3))
        c.batch_size = 8
        c.policy.microbatches = 1  # Slices of 2 pairs would be dispatch-bound.
        c.policy.early_checkpoints = []  # 12-step runs: their two evaluations suffice
        c.policy.steps, c.policy.checkpoint_every = 12, 6
        c.offline_learning_rates, c.offline_steps = [5e-4], [12]
        c.golden_policy_steps = 6
        c.eval.prompts, c.eval.kl_prompts, c.eval.pairs = 32, 16, 32
        c.eval.test_prompts = 32
    elif variant in ("paper", "paper_v1", "paper_wide", "paper_low_beta"):
        _paper(c)
        if variant == "paper_v1":  # the protocol docs/paper_study{,_amd,_intel_2026-12-04} ran
            c.policy.stop_margin = 0.0  # any fall below the best counts
        if variant == "paper_wide":  # the offline grid's top edge moved out: is it under-tuned?
            c.offline_learning_rates = [*c.offline_learning_rates, 2e-3]
        if variant == "paper_low_beta":  # online let past beta 0.1's 3.5-nat plateau: a turn?
            c.online_betas = [*c.online_betas, 0.03, 0.01]
    elif variant == "mini_chains":  # the upstream's share of the variance (issue 17, item 3)
        c.upstream_chains = 3
    elif variant in ("mini_large_golden", *WEAK_PROXY_STEPS):  # golden larger than the proxy
        c.golden_model = models.get_config("small")  # 3 layers of width 96: 3.0x mini's params
        c.golden_model.max_len = c.data.prompt_len + 2 * c.data.response_len
        if variant in WEAK_PROXY_STEPS:  # and a proxy to exploit: can online overshoot?
            steps = WEAK_PROXY_STEPS[variant]  # 100: 3,200 pairs (16% of D_golden), seen once
            c.proxy = _preference_stage(steps, 32, 1e-3, warmup_steps=steps // 10)
            c.proxy.checkpoint_every = 50
            # Online runs twice as long, no stop rule (it needs a test stage: eval.test_prompts
            # re-keys every run): a turn shows in the curves. Beta 0.01 runs further out.
            c.policy.steps = 600
            c.online_betas = [0.1, 0.01]
        if variant.endswith("_chains"):  # does the weak proxy's verdict hold in
            c.upstream_chains = 3  # other worlds, with their own golden, proxy and SFT?
            c.sweep.stack_runs = 2
    elif variant == "mini_golden_opponent":
        c.opponent = "golden_policy"
    elif variant == "tpu_v5p_3b":  # Same study, bigger models, on a v5p-64 (fsdp 8 x tensor 4).
        c.model, c.proxy_model, c.golden_model = (models.get_config(s) for s in
                                                  ("3b", "770m", "11b"))
        c.mesh = meshes.get_config("fsdp_tp4")
    elif variant == "gpu_h100_770m":
        c.model, c.proxy_model, c.golden_model = (models.get_config(s) for s in
                                                  ("770m", "770m", "3b"))
        c.mesh = meshes.get_config("fsdp")
    elif variant in PRETRAINED_STUDIES:
        _pretrained_study(c, variant)
    elif variant != "mini":
        raise ValueError(f"study variant {variant!r} is unknown; use smoke, mini, paper, "
                         "paper_v1, paper_wide, paper_low_beta, mini_chains, mini_large_golden, "
                         "mini_weak_proxy, mini_medium_proxy, mini_weak_proxy_chains, "
                         "mini_medium_proxy_chains, mini_golden_opponent, tpu_v5p_3b, "
                         "gpu_h100_770m, "
                         f"{', '.join(PRETRAINED_STUDIES)}, hypotheses, "
                         f"one of {HYPOTHESES} or smoke_<that>")
    if variant.startswith(("tpu", "gpu")) or variant in ("tldr_gemma3_270m", "hh_gemma3_270m"):
        c.policy.microbatches = 1
        for m in (c.model, c.golden_model, c.proxy_model):
            m.dtype = "bfloat16"
            m.scan_layers = True  # compile time flat in depth (README, "Scale without hardware")
            m.max_len = c.data.prompt_len + 2 * c.data.response_len
    _hypothesis_sections(c)
    return c
