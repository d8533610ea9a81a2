"""memzoo's GGUF header reader against the ``gguf`` package: every metadata type, skipped and decoded arrays,
custom alignment and the tensor table equal what ``gguf.GGUFWriter`` wrote and ``gguf.GGUFReader`` reads; other
formats, versions, big-endian files, truncated headers and duplicate tensor names fail with errors that say so."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from memzoo.model.gguf_header import GGUFDamagedError, GGUFFormatError, read_gguf_header  # noqa: E402

TOKENS = [f"tok{i}" for i in range(300)] + ["naïve", ""]


def write(path, alignment=None, endian=gguf.GGUFEndian.LITTLE, tensors=None):
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 250)
    writer.add_int8("t.i8", -7)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 0.1)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve ✓")
    writer.add_array("t.ints", [3, 1, 4, 1, 5])
    writer.add_array("t.floats", [0.5, -2.0])
    writer.add_token_list(TOKENS)
    tensors = tensors if tensors is not None else {
        "a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "b.weight": np.ones((5,), dtype=np.float16),
        "c.weight": gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)}
    for name, array in tensors.items():
        kind = gguf.GGMLQuantizationType.Q8_0 if name.startswith("c.") else None
        writer.add_tensor(name, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_tensor_table_equal_what_gguf_wrote_and_reads(tmp_path, alignment):
    path = write(tmp_path / "m.gguf", alignment)
    header = read_gguf_header(path, decode_array=lambda key: key in ("t.ints", "t.floats"))
    meta = header.metadata
    assert (meta["t.u8"], meta["t.i8"], meta["t.u16"], meta["t.i16"]) == (250, -7, 65000, -30000)
    assert (meta["t.u32"], meta["t.i32"], meta["t.u64"], meta["t.i64"]) == (4_000_000_000, -2_000_000_000,
                                                                            2**63 + 5, -(2**62))
    assert meta["t.f32"] == pytest.approx(0.1, rel=1e-7) and meta["t.f64"] == 1e-300
    assert meta["t.bool"] is True and meta["t.str"] == "naïve ✓" and meta["general.architecture"] == "llama"
    assert meta["t.ints"] == [3, 1, 4, 1, 5] and meta["t.floats"] == [0.5, -2.0]
    # the vocabulary was not asked for: skipped, its length kept
    assert "tokenizer.ggml.tokens" not in meta and header.array_lengths["tokenizer.ggml.tokens"] == len(TOKENS)
    assert header.version == 3
    reference = gguf.GGUFReader(str(path))
    assert [(t.name, t.shape, t.ggml_type, t.offset) for t in header.tensors] == [
        (t.name, tuple(reversed(t.shape.tolist())), int(t.tensor_type), t.data_offset) for t in reference.tensors]
    assert header.tensors[0].shape == (2, 3, 4) and header.tensors[2].shape == (2, 64)
    if alignment:
        assert all(t.offset % alignment == 0 for t in header.tensors)
    decoded = read_gguf_header(path, decode_array=lambda key: key == "tokenizer.ggml.tokens")
    assert decoded.metadata["tokenizer.ggml.tokens"] == TOKENS


def test_other_formats_versions_and_byte_orders_are_refused(tmp_path):
    path = write(tmp_path / "m.gguf")
    data = path.read_bytes()
    other = tmp_path / "zip.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFFormatError, match=r"starts with b'PK\\x03\\x04', not b'GGUF'"):
        read_gguf_header(other)
    old = tmp_path / "v1.gguf"
    old.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFFormatError, match=r"GGUF version 1; memzoo reads versions \(2, 3\)"):
        read_gguf_header(old)
    big = write(tmp_path / "big.gguf", endian=gguf.GGUFEndian.BIG, tensors={})
    with pytest.raises(GGUFFormatError, match="big-endian"):
        read_gguf_header(big)


@pytest.mark.parametrize("keep", [10, 30, 200, 2000])
def test_a_truncated_header_is_damaged_not_misread(tmp_path, keep):
    data = write(tmp_path / "m.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(GGUFDamagedError, match="truncated"):
        read_gguf_header(cut)


def test_a_tensor_named_twice_is_refused(tmp_path):
    path = write(tmp_path / "m.gguf", tensors={"a.weight": np.zeros(4, np.float32), "b.weight": np.zeros(4, np.float32)})
    data = path.read_bytes()
    twice = tmp_path / "twice.gguf"
    twice.write_bytes(data.replace(b"b.weight", b"a.weight"))
    with pytest.raises(GGUFFormatError, match=r"names a tensor twice \(\['a.weight'\]\)"):
        read_gguf_header(twice)
