"""grain pipelines: padding, order fixed by the seed, process sharding, exact resume via orbax."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alignment_gap import sharding
from alignment_gap.batches import PreferenceBatch, PromptBatch, SFTBatch
from alignment_gap.data import builders, pipelines, tokenizer
from alignment_gap.data import world as W

WORLD = W.WorldConfig(seed=2)
SHAPE = pipelines.BatchShape(global_batch_size=8, prompt_len=48, response_len=12)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    source = builders.prepare(builders.synthetic_builder(
        "comparisons", root, WORLD, train=40, validation=0, test=0))["train"]
    tok = tokenizer.synthetic_tokenizer(root, WORLD, vocab_size=256, corpus_posts=300)
    return source, tok


def test_batches_are_padded_the_way_the_models_expect(data):
    source, tok = data
    batch = next(iter(pipelines.preference_pipeline(source, tok, SHAPE, seed=0)))
    assert isinstance(batch, PreferenceBatch)
    assert batch.prompt.shape == (8, 48) and batch.chosen.shape == (8, 12)
    for row in range(8):
        m = batch.prompt_mask[row]
        assert m[-1] and (np.diff(m.astype(int)) >= 0).all()  # left-padded: pads, then text
        assert (batch.prompt[row][~m] == tok.pad_id).all()
        assert tok.decode(batch.prompt[row]).endswith(W.TLDR)  # long prompts keep their end
        for tokens, mask in ((batch.chosen[row], batch.chosen_mask[row]),
                             (batch.rejected[row], batch.rejected_mask[row])):
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()  # right-padded
            assert tokens[n - 1] == tok.eos_id or n == 12  # EOS-terminated unless truncated


def test_order_is_fixed_by_the_seed_and_epochs_reshuffle(data):
    source, tok = data
    def chosen(seed, epochs=None, n=5):
        it = iter(pipelines.preference_pipeline(source, tok, SHAPE, seed=seed,
                                                num_epochs=epochs))
        return [b.chosen for b in (next(it) for _ in range(n))]
    a, b, c = chosen(0), chosen(0), chosen(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    two_epochs = list(pipelines.preference_pipeline(source, tok, SHAPE, seed=0, num_epochs=2))
    assert len(two_epochs) == 10  # 80 records / 8
    first = {r.tobytes() for b in two_epochs[:5] for r in b.prompt}
    second = {r.tobytes() for b in two_epochs[5:] for r in b.prompt}
    assert len(first) == 40 and first == second  # every record once per epoch
    assert not np.array_equal(two_epochs[0].prompt, two_epochs[5].prompt)  # new order
    # Seed replicates share no epoch's order (grain shuffles epoch e with its seed + e).
    seed_one = list(pipelines.preference_pipeline(source, tok, SHAPE, seed=1, num_epochs=1))
    assert not np.array_equal(seed_one[0].prompt, two_epochs[5].prompt)


@pytest.mark.parametrize("shares", [
    [((0, 4),), ((4, 8),)],  # one block each
    [((0, 2), (4, 6)), ((2, 4), (6, 8))],  # interleaved, as a torus-ordered mesh can make them
])
def test_processes_read_their_rows_of_the_same_global_batch(data, shares):
    source, tok = data
    whole = iter(pipelines.preference_pipeline(source, tok, SHAPE, seed=0))
    parts_of = [iter(pipelines.preference_pipeline(
        source, tok, pipelines.BatchShape(8, 48, 12, rows=sharding.ProcessRows(blocks)), seed=0))
        for blocks in shares]
    for _ in range(3):
        expected = next(whole)
        parts = [next(p) for p in parts_of]
        assert parts[0].chosen.shape == (4, 12)
        for blocks, part in zip(shares, parts, strict=True):
            want = sharding.ProcessRows(blocks).select(expected.chosen)
            np.testing.assert_array_equal(part.chosen, want)


def test_orbax_restores_the_iterator_to_exactly_the_next_batch(data, tmp_path):
    source, tok = data
    make = lambda: iter(pipelines.preference_pipeline(source, tok, SHAPE, seed=0))
    it = make()
    for _ in range(3):
        next(it)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    restored = make()
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(got.prompt, want.prompt)
        np.testing.assert_array_equal(got.rejected, want.rejected)


def test_sft_reads_both_sides_and_prompts_pipeline(data):
    source, tok = data
    sft = next(iter(pipelines.sft_pipeline(source, tok, SHAPE, seed=0, shuffle=False,
                                           responses=("chosen", "rejected"))))
    assert isinstance(sft, SFTBatch) and sft.response.shape == (8, 12)
    first = source[0]
    assert tok.decode(sft.response[0]) == first["chosen"].decode()
    assert tok.decode(sft.response[1]) == first["rejected"].decode()
    prompts = next(iter(pipelines.prompt_pipeline(source, tok, SHAPE, seed=0, shuffle=False)))
    assert isinstance(prompts, PromptBatch)
    assert tok.decode(prompts.prompt[0]) == tok.decode(tok.encode(first["prompt"].decode())[-48:])


def test_a_window_of_a_source_reads_its_records_and_nothing_past_them(data):
    """The test stage's prompts: records [start, start + count) of the test split."""
    source, tok = data
    window = pipelines.Window(source, 16, 8)
    prompts = next(iter(pipelines.prompt_pipeline(window, tok, SHAPE, seed=0, shuffle=False,
                                                  num_epochs=1)))
    want = [tok.decode(tok.encode(source[16 + i]["prompt"].decode())[-48:]) for i in range(8)]
    assert [tok.decode(p) for p in prompts.prompt] == want
    with pytest.raises(IndexError):
        window[8]
    with pytest.raises(ValueError, match=r"records \[36, 44\) are not all in a source of 40"):
        pipelines.Window(source, 36, 8)
