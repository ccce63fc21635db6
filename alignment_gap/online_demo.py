"""A few online IPO steps on a pretrained model, judged by a rule you can read (notebooks).

    demo = OnlineDemo("gguf:/path/gemma-3-270m.gguf", prompts, judge=shorter_first_line)
    before = demo.responses()           # the pretrained model's samples
    for _ in range(4):
        demo.step()                     # sample 2 per prompt, judge, one IPO update
    demo.win_rate(), demo.history       # against the pretrained model; KL per step

The same pieces as a study's online run (KV-cache sampler, `make_policy_loss`, the jitted
update step), with the proxy preference model replaced by `judge(prompt, a, b)`: 1 when `a` is
better, 0 when `b` is, 0.5 for a tie. The frozen reference is the pretrained model itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from alignment_gap import pretrained, sharding
from alignment_gap.batches import PreferenceBatch
from alignment_gap.data.pipelines import encode_prompt
from alignment_gap.data.pretrained_tokenizers import load_tokenizer
from alignment_gap.presets import meshes
from alignment_gap.sampling import Sampler, SamplingConfig, per_sample, stop_ids_beyond_eos
from alignment_gap.train.policy import make_policy_loss
from alignment_gap.train.state import init_train_state, make_update_step


def shorter_first_line(prompt: str, a: str, b: str) -> float:
    """Prefers the response whose first line is shorter but not empty (a brevity judge)."""
    length = lambda text: len(text.strip().split("\n")[0]) or 10**6
    return 0.5 if length(a) == length(b) else float(length(a) < length(b))


class OnlineDemo:
    def __init__(self, checkpoint: str, prompts: list[str], judge=shorter_first_line, *,
                 prompt_len: int = 64, response_len: int = 16, learning_rate: float = 3e-6,
                 beta: float = 0.1, temperature: float = 1.0, seed: int = 0):
        mesh_cfg = meshes.get_config("cpu")
        mesh_cfg.data = 1
        self.mesh, self.rules = sharding.make_mesh(mesh_cfg, jax.devices()[:1]), mesh_cfg.rules
        source = pretrained.open_checkpoint(checkpoint)
        cfg = source.model_config(max_len=prompt_len + 2 * response_len, scan_layers=True)
        reference = pretrained.load_language_model(source, cfg, self.mesh, self.rules)
        graphdef, weights = nnx.split(reference)
        policy = nnx.merge(graphdef, jax.tree.map(jnp.copy, weights))  # trained (donated)
        self.tokenizer = load_tokenizer(pretrained.checkpoint_path(checkpoint))
        self.prompts, self.judge = prompts, judge
        rows = [encode_prompt(self.tokenizer, p, prompt_len) for p in prompts]
        self.prompt = jnp.asarray(np.stack([t for t, _ in rows]))
        self.prompt_mask = jnp.asarray(np.stack([m for _, m in rows]))
        tx = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.adamw(learning_rate, b1=0.9, b2=0.95))
        self.graphdef, self.state, shardings = init_train_state(policy, tx, self.mesh, self.rules)
        ref_graphdef, self.reference = nnx.split(reference)
        loss = make_policy_loss("ipo", beta, self.tokenizer.stop_ids, ref_graphdef)
        with sharding.use(self.mesh, self.rules):
            ref_shardings = sharding.state_shardings(self.reference, self.mesh)
        rows_sharding = sharding.batch_sharding(self.mesh, self.rules, 2)
        self.update = make_update_step(self.graphdef, tx, loss, self.mesh, self.rules, shardings,
                                       PreferenceBatch(*[rows_sharding] * 6),
                                       {"reference": ref_shardings}, name="policy_update",
                                       row_mean_loss=True)
        sampling = SamplingConfig(max_new_tokens=response_len, temperature=temperature,
                                  eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                  stop_ids=stop_ids_beyond_eos(self.tokenizer))
        self.pair_sampler = Sampler(reference, self.mesh, self.rules, sampling,
                                    samples_per_prompt=2, name="online_sample")
        self.sampler = Sampler(reference, self.mesh, self.rules, sampling, name="eval_sample")
        self.key, self.eval_key = jax.random.split(jax.random.key(seed))
        self._reference_texts = None
        self.history: list[dict] = []

    def _next_key(self):
        self.key, key = jax.random.split(self.key)
        return key

    def _texts(self, tokens) -> list[str]:
        return [self.tokenizer.decode(row) for row in np.asarray(tokens)]

    def responses(self, params=None) -> list[str]:
        """One sample per prompt from `params` (default: the current policy)."""
        params = self.state.params if params is None else params
        out = self.sampler(params, self.prompt, self.prompt_mask, self._next_key())
        return self._texts(out.tokens)

    def step(self) -> dict:
        """Sample two responses per prompt, let the judge order them, one IPO update."""
        out = self.pair_sampler(self.state.params, self.prompt, self.prompt_mask,
                                self._next_key())
        a, b = zip(per_sample(out.tokens, 2), per_sample(out.mask, 2), strict=True)
        first_wins = jnp.asarray([self.judge(p, y1, y2) >= 0.5 for p, y1, y2 in zip(
            self.prompts, self._texts(a[0]), self._texts(b[0]), strict=True)])[:, None]
        pick = lambda x, y: jnp.where(first_wins, x, y)
        batch = PreferenceBatch(self.prompt, self.prompt_mask, pick(a[0], b[0]),
                                pick(a[1], b[1]), pick(b[0], a[0]), pick(b[1], a[1]))
        self.state, metrics = self.update(self.state, batch, {"reference": self.reference})
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.history.append(record)
        return record

    def win_rate(self) -> float:
        """The judge's mean verdict for the current policy's samples against the pretrained
        model's, one pair per prompt (ties count a half). Both are drawn with the same fixed
        key (common random numbers: the untrained policy ties exactly, and the pretrained
        model's samples are drawn once)."""
        ours = self._texts(self.sampler(self.state.params, self.prompt, self.prompt_mask,
                                        self.eval_key).tokens)
        if self._reference_texts is None:
            self._reference_texts = self._texts(self.sampler(
                self.reference, self.prompt, self.prompt_mask, self.eval_key).tokens)
        return float(np.mean([self.judge(p, a, b) for p, a, b in zip(
            self.prompts, ours, self._reference_texts, strict=True)]))
