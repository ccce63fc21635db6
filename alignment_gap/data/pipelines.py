"""grain pipelines: text records -> tokenised, padded, shuffled, process-sharded batches.

    it = iter(preference_pipeline(source, tokenizer, shape, seed=0))
    batch = next(it)                       # PreferenceBatch of numpy arrays, this process's rows
    state = it.get_state()                 # checkpointable (see alignment_gap/checkpoint.py)

Global order is fixed by the seed alone: global batch k holds records `[k*B, (k+1)*B)` of the
shuffled (and, across epochs, reshuffled) source, and each process reads only the rows of that
batch its devices hold (`sharding.process_rows`). So the global batch is identical however the
devices are split over processes, and restoring an iterator's state continues with exactly the
next batch.
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import numpy as np

from alignment_gap.batches import PreferenceBatch, PromptBatch, SFTBatch
from alignment_gap.errors import DataError
from alignment_gap.sharding import ProcessRows


@dataclasses.dataclass(frozen=True)
class BatchShape:
    global_batch_size: int
    prompt_len: int
    response_len: int
    rows: ProcessRows | None = None  # This process's rows of each global batch (None: all).

    @property
    def local_rows(self) -> ProcessRows:
        return self.rows if self.rows is not None else ProcessRows.every(self.global_batch_size)


class Window:
    """Records `[start, start + count)` of a random-access source, itself random access (the
    test stage's prompts: the ones after those every evaluation reads)."""

    def __init__(self, source, start: int, count: int):
        if start < 0 or count < 0 or start + count > len(source):
            raise ValueError(f"records [{start}, {start + count}) are not all in a source of "
                             f"{len(source)}")
        self.source, self.start, self.count = source, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        if not 0 <= i < self.count:
            raise IndexError(f"record {i} of a window of {self.count}")
        return self.source[self.start + int(i)]


def as_text(value) -> str:
    """A record field as text (TFDS Text features come back as bytes). None is never a text
    field's value: only a damaged file reads so, and its records must not train as "None"."""
    if value is None:
        raise DataError("a record's text field read as None: its dataset file is damaged; "
                        "delete the dataset and run the same command to build it again")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_prompt(tokenizer, text: str, length: int):
    """Left-padded ids and mask; a long prompt keeps its end (where `TL;DR:` is).

    Pretrained tokenizers that ask for BOS (`add_bos`) get it first, also when the prompt is cut
    (the models saw BOS at position 0 of every document); the ones we train have none.
    """
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    keep = max(length - len(bos), 0)
    ids = (bos + (tokenizer.encode(text)[-keep:] if keep else []))[:length]
    out = np.full(length, tokenizer.pad_id, np.int32)
    mask = np.zeros(length, bool)
    if ids:
        out[length - len(ids):] = ids
        mask[length - len(ids):] = True
    return out, mask


def encode_response(tokenizer, text: str, length: int):
    """Right-padded ids + EOS (dropped only when the response fills the whole length)."""
    ids = (tokenizer.encode(text) + [tokenizer.eos_id])[:length]
    out = np.full(length, tokenizer.pad_id, np.int32)
    out[: len(ids)] = ids
    mask = np.zeros(length, bool)
    mask[: len(ids)] = True
    return out, mask


def shuffle_seed(seed: int) -> int:
    """The seed grain's shuffle gets for a run's `seed`. grain shuffles epoch e with seed + e,
    so passing run seeds straight in would give seed s's second epoch seed s + 1's first: the
    seed replicates of a study would share data orders. A hash of the seed cannot collide so."""
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def _global_order(source, seed: int, shuffle: bool, num_epochs: int | None):
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed(seed))
    return ds.repeat(num_epochs)


def local_records(ordered, shape: BatchShape):
    """This process's records of every global batch, batch after batch."""
    rows, b = shape.local_rows.indices, shape.global_batch_size
    local_b = len(rows)
    if len(ordered) == sys.maxsize:
        count = sys.maxsize // b * local_b
    else:
        count = len(ordered) // b * local_b  # drop the last partial global batch
    return grain.MapDataset.range(count).map(
        lambda i: ordered[(i // local_b) * b + rows[i % local_b]]), local_b


def _finish(ds, local_b: int, to_batch, num_threads: int, prefetch: int):
    ds = ds.batch(local_b, drop_remainder=True).map(lambda d: to_batch(**d))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=prefetch))


def preference_pipeline(source, tokenizer, shape: BatchShape, *, seed: int, shuffle: bool = True,
                        num_epochs: int | None = None, num_threads: int = 2, prefetch: int = 8):
    """`{prompt, chosen, rejected}` records -> PreferenceBatch."""
    def encode(record):
        prompt, prompt_mask = encode_prompt(tokenizer, as_text(record["prompt"]), shape.prompt_len)
        chosen, chosen_mask = encode_response(tokenizer, as_text(record["chosen"]),
                                              shape.response_len)
        rejected, rejected_mask = encode_response(tokenizer, as_text(record["rejected"]),
                                                  shape.response_len)
        return {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen,
                "chosen_mask": chosen_mask, "rejected": rejected, "rejected_mask": rejected_mask}

    records, local_b = local_records(_global_order(source, seed, shuffle, num_epochs), shape)
    return _finish(records.map(encode), local_b, PreferenceBatch, num_threads, prefetch)


def sft_pipeline(source, tokenizer, shape: BatchShape, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, num_threads: int = 2, prefetch: int = 8,
                 responses=("response",)):
    """Records -> SFTBatch, one example per named response field.

    `responses=("chosen", "rejected")` trains on both sides of a comparison dataset, as the
    paper's SFT does.
    """
    expanded = grain.MapDataset.source(source)
    if len(responses) > 1:
        n = len(responses)
        expanded = grain.MapDataset.range(len(source) * n).map(
            lambda i: {"prompt": source[i // n]["prompt"],
                       "response": source[i // n][responses[i % n]]})
        source_like = expanded
    else:
        field = responses[0]
        source_like = expanded.map(lambda r: {"prompt": r["prompt"], "response": r[field]})

    def encode(record):
        prompt, prompt_mask = encode_prompt(tokenizer, as_text(record["prompt"]), shape.prompt_len)
        response, response_mask = encode_response(tokenizer, as_text(record["response"]),
                                                  shape.response_len)
        return {"prompt": prompt, "prompt_mask": prompt_mask, "response": response,
                "response_mask": response_mask}

    records, local_b = local_records(_global_order(source_like, seed, shuffle, num_epochs),
                                      shape)
    return _finish(records.map(encode), local_b, SFTBatch, num_threads, prefetch)


def prompt_pipeline(source, tokenizer, shape: BatchShape, *, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, num_threads: int = 2, prefetch: int = 8):
    """Records with a `prompt` -> PromptBatch (for online sampling and evaluation)."""
    def encode(record):
        prompt, prompt_mask = encode_prompt(tokenizer, as_text(record["prompt"]), shape.prompt_len)
        return {"prompt": prompt, "prompt_mask": prompt_mask}

    records, local_b = local_records(_global_order(source, seed, shuffle, num_epochs), shape)
    return _finish(records.map(encode), local_b, PromptBatch, num_threads, prefetch)
