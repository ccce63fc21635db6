"""Our GGUF reader against the gguf package's: every field value and tensor byte of a file
holding each value type, float and quantised tensors; one line for a cut or foreign file."""

import gguf
import numpy as np
import pytest

from alignment_gap.errors import CheckpointError
from alignment_gap.gguf_file import GgufFile

Q8_0 = gguf.GGMLQuantizationType.Q8_0


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "every_type.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    for kind, value in (("uint8", 7), ("int8", -3), ("uint16", 60_000), ("int16", -300),
                        ("uint32", 4_000_000_000), ("int32", -5), ("float32", 0.5),
                        ("uint64", 2**40), ("int64", -(2**40)), ("float64", 1e-300),
                        ("bool", True), ("string", "h\u00e9llo \u2581 world")):
        getattr(w, f"add_{kind}")(f"test.{kind}", value)
    w.add_array("test.strings", ["a", "", "\u2581b", "<0x0A>", "\u00fc" * 40])
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.normal(size=(3, 8)).astype(np.float32))
    w.add_tensor("f16", rng.normal(size=(5,)).astype(np.float16))
    q = gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), Q8_0)
    w.add_tensor("q8_0", q, raw_shape=q.shape, raw_dtype=Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_field_and_tensor_byte_equals_the_gguf_packages_reader(written):
    ours, theirs = GgufFile(str(written)), gguf.GGUFReader(str(written))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.fields[key] == value, key  # the same bytes: equal, floats included
    assert ours.fields["test.strings"][4] == "\u00fc" * 40 and ours.fields["test.bool"] is True
    assert ours.tensors.keys() == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in t.shape) and mine.tensor_type == t.tensor_type
        assert mine.data.shape[:-1] == t.data.shape[:-1]
        assert mine.data.tobytes() == np.asarray(t.data).tobytes(), t.name
        np.testing.assert_array_equal(gguf.quants.dequantize(mine.data, mine.tensor_type),
                                      gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))


@pytest.mark.parametrize("damage,says", [
    (lambda b: b[: len(b) - 100], "past the file's end"),
    (lambda b: b[:200], "unpack_from requires a buffer"),
    (lambda b: b"GGML" + b[4:], "the magic is b'GGML'"),
    (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "version 1"),
    (lambda b: b"", "cannot mmap an empty file"),
])
def test_a_cut_or_foreign_file_is_one_line_naming_it(written, damage, says):
    written.write_bytes(damage(written.read_bytes()))
    with pytest.raises(CheckpointError) as error:
        GgufFile(str(written))
    message = str(error.value)
    assert message.startswith(f"{written}: not a readable GGUF file (") and says in message
    assert "\n" not in message and message.endswith("copy it again")
