"""weights/gguf_reader.py reads what the ``gguf`` package's reader reads, fast, and refuses damaged files."""

from __future__ import annotations

import numpy as np
import pytest

from weights.gguf_reader import GGUFFile, GGUFFormatError


def _write(path, arrays: bool = True):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_int64("t.i64", -3)
    w.add_float32("t.f32", 0.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    if arrays:
        w.add_array("t.strs", ["a", "bé", ""])
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.floats", [0.25, -1.0])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 256)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _same_as_gguf(path) -> None:
    import gguf

    ref, ours = gguf.GGUFReader(str(path), "r"), GGUFFile(path)
    assert {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")} == ours.values
    assert len(ref.tensors) == len(ours.tensors)
    for a, b in zip(ref.tensors, ours.tensors):
        assert (a.name, tuple(a.shape.tolist()), a.tensor_type) == (b.name, b.shape, b.tensor_type)
        assert a.data.shape == b.data.shape and np.array_equal(a.data, b.data)
        np.testing.assert_array_equal(gguf.quants.dequantize(a.data, a.tensor_type),
                                      gguf.quants.dequantize(b.data, b.tensor_type))


def test_same_as_the_gguf_package_on_every_metadata_type(tmp_path):
    _write(tmp_path / "t.gguf")
    _same_as_gguf(tmp_path / "t.gguf")
    assert GGUFFile(tmp_path / "t.gguf").values["t.strs"] == ["a", "bé", ""]


def test_same_as_the_gguf_package_on_a_real_checkpoint(smollm2_path):
    _same_as_gguf(smollm2_path)


def test_damaged_files_are_format_errors(tmp_path):
    _write(tmp_path / "t.gguf")
    data = (tmp_path / "t.gguf").read_bytes()
    cases = {"magic": b"GGUX" + data[4:], "truncated": data[: len(data) - 100], "header cut": data[:40],
             "version": data[:4] + (9).to_bytes(4, "little") + data[8:]}
    rng = np.random.default_rng(1)
    for i in range(200):  # random byte flips in the header and metadata
        b = bytearray(data)
        for _ in range(3):
            b[int(rng.integers(0, 400))] = int(rng.integers(0, 256))
        cases[f"flip{i}"] = bytes(b)
    for name, blob in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(blob)
        try:
            GGUFFile(p)
        except GGUFFormatError:
            continue
        except (MemoryError, OverflowError) as e:  # a flipped length may ask for an absurd count
            pytest.fail(f"{name}: {type(e).__name__} instead of a format error")
        assert not name.startswith(("magic", "truncated", "header", "version")), name
