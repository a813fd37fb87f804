"""Checkpoint files: round trips, corruption, hostile files, atomic saving, the kind registry."""

import errno
import hashlib
import json
import math
import os
import pickle
import struct
import tempfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xrnn
from xrnn import checkpoint as ck
from xrnn.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointKindError,
    CheckpointVersionError,
    ConfigError,
    DeviceError,
    DTypeError,
    SaveError,
)

# ---------------------------------------------------------------------------
# helpers: build files by hand, independently of the writer
# ---------------------------------------------------------------------------


def seal(body: bytes) -> bytes:
    """Append the SHA-256 trailer, as a forger who knows the format would."""
    return body + hashlib.sha256(body).digest()


def forge(header, data: bytes = b"", version: int = 1, raw_header: bytes | None = None) -> bytes:
    """A checkpoint with a valid checksum and whatever header we like."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    body = b"XRNNCKPT" + struct.pack("<IQ", version, len(h)) + h
    body += bytes(-len(body) % 64) + data
    return seal(body)


def good_header(tensors=None, meta=None, kind="fake"):
    return {"format": 1, "kind": kind, "xrnn_version": "0.0", "meta": meta or {}, "tensors": tensors or {}}


def write(tmp_path, blob: bytes, name="f.xrnn"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def sample_file(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "ids": np.arange(5, dtype=np.int64),
        "flag": np.array(True),
    }
    meta = {"step": 7, "rng": np.random.default_rng(1).bit_generator.state, "loss": [1.5, float("nan")]}
    p = tmp_path / "good.xrnn"
    ck.write_container(p, "fake", meta, tensors)
    return p, meta, tensors


def same_json(a, b):
    """Equality that treats NaN as equal to NaN (JSON values)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4), (1, 1, 1, 1, 5)]


@pytest.mark.parametrize("dtype", ck.TENSOR_DTYPES)
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    rng = np.random.default_rng(42)
    tensors = {}
    for i, shape in enumerate(SHAPES):
        if dtype == "bool":
            a = rng.integers(0, 2, size=shape).astype(bool)
        elif dtype.startswith(("int", "uint")):
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        else:
            a = rng.standard_normal(shape).astype(dtype)
            if a.size >= 3:
                a.reshape(-1)[:3] = [np.nan, np.inf, -np.inf]
        tensors[f"t{i}"] = a
    p = tmp_path / "x.xrnn"
    ck.write_container(p, "fake", {}, tensors)
    kind, meta, back = ck.read_container(p)
    assert kind == "fake" and meta == {}
    assert list(back) == list(tensors)
    for k, a in tensors.items():
        b = back[k]
        assert b.dtype == np.dtype(dtype) and b.shape == a.shape
        assert b.dtype.isnative and b.flags.c_contiguous and b.flags.writeable
        assert b.tobytes() == a.tobytes()  # bit-exact, NaN payloads included


def test_round_trip_layouts_and_large_tensor(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 30))
    tensors = {
        "fortran": np.asfortranarray(base),
        "strided": base[::3, ::2],
        "big_endian": base.astype(">f8"),
        "large": rng.standard_normal(300_000).astype(np.float32),  # 1.2 MB, more than one read chunk
        "uni\u00e7ode name / with spaces": np.arange(3, dtype=np.uint16),
    }
    p = tmp_path / "x.xrnn"
    ck.write_container(p, "fake", {}, tensors)
    c = ck.read_container(p)
    for k, a in tensors.items():
        np.testing.assert_array_equal(c.tensors[k], a)
        assert c.tensors[k].dtype.isnative
    # every tensor starts 64-byte aligned from the start of the data region
    info = ck.peek(p)
    assert info.checksum_ok and info.file_size == os.path.getsize(p)
    assert info.tensors["large"] == ck.TensorInfo("float32", (300_000,), 1_200_000)
    raw = p.read_bytes()
    hlen = struct.unpack("<Q", raw[12:20])[0]
    header = json.loads(raw[20:20 + hlen])
    assert all(e["offset"] % 64 == 0 for e in header["tensors"].values())


def test_meta_round_trip_big_ints_nan_nested(tmp_path):
    meta = {
        "big": 2**200 + 1,
        "neg": -(2**100),
        "floats": [0.1, -0.0, 1e-310, float("nan"), float("inf"), -float("inf")],
        "nested": {"a": [1, {"b": None, "c": [True, False]}], "s": "Ω\n\"quoted\" \u0000 nul"},
        "tuple": (1, 2),
        "np": {"i": np.int64(-5), "f": np.float32(0.5), "b": np.bool_(True), "u": np.uint64(2**64 - 1)},
        "empty": {},
    }
    p = tmp_path / "m.xrnn"
    ck.write_container(p, "fake", meta, {})
    back = ck.read_container(p).meta
    expected = dict(meta, tuple=[1, 2], np={"i": -5, "f": 0.5, "b": True, "u": 2**64 - 1})
    assert same_json(back, expected)
    assert math.copysign(1, back["floats"][1]) == -1  # -0.0 kept
    assert back["floats"][2] == 1e-310  # subnormal kept exactly


def test_bit_generator_state_restores_the_same_stream(tmp_path):
    rng = np.random.default_rng(1234)
    rng.standard_normal(17)
    p = tmp_path / "r.xrnn"
    ck.write_container(p, "fake", {"rng": rng.bit_generator.state}, {})
    expected = rng.standard_normal(5)
    fresh = np.random.default_rng()
    fresh.bit_generator.state = ck.read_container(p).meta["rng"]
    np.testing.assert_array_equal(fresh.standard_normal(5), expected)


def test_file_bytes_do_not_depend_on_the_backend(tmp_path, device):
    """What is written from torch/strict/(CuPy) arrays is byte-identical to NumPy's: no conversion on load."""
    host = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "i": np.arange(3, dtype=np.int64)}
    ck.write_container(tmp_path / "np.xrnn", "fake", {"a": 1}, host)
    on_dev = {"w": device.asarray(host["w"]), "i": device.asarray(host["i"])}
    ck.write_container(tmp_path / "dev.xrnn", "fake", {"a": 1}, on_dev)
    assert (tmp_path / "np.xrnn").read_bytes() == (tmp_path / "dev.xrnn").read_bytes()


def test_unstorable_meta_and_tensors_write_nothing(tmp_path):
    p = tmp_path / "x.xrnn"
    with pytest.raises(ConfigError, match="keys must be str"):
        ck.write_container(p, "fake", {"a": {1: 2}}, {})
    with pytest.raises(ConfigError, match="tensors dict"):
        ck.write_container(p, "fake", {"a": np.zeros(3)}, {})
    with pytest.raises(ConfigError, match="set"):
        ck.write_container(p, "fake", {"a": {1, 2}}, {})
    with pytest.raises(DTypeError, match="complex"):
        ck.write_container(p, "fake", {}, {"c": np.zeros(2, complex)})
    with pytest.raises(DTypeError):
        ck.write_container(p, "fake", {}, {"o": np.array(["x"], dtype=object)})
    with pytest.raises(ConfigError, match="kind"):
        ck.write_container(p, "", {}, {})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------

def test_every_truncation_is_reported_as_corrupt(tmp_path):
    p, _, _ = sample_file(tmp_path)
    blob = p.read_bytes()
    t = tmp_path / "t.xrnn"
    for n in range(len(blob)):
        t.write_bytes(blob[:n])
        with pytest.raises(CheckpointCorruptError):
            ck.read_container(t)


def test_every_single_byte_change_is_reported_as_corrupt(tmp_path):
    p, _, _ = sample_file(tmp_path)
    blob = bytearray(p.read_bytes())
    t = tmp_path / "t.xrnn"
    for i in range(len(blob)):
        for mask in (0x01, 0x80) if i % 5 == 0 else (0x01,):
            bad = bytearray(blob)
            bad[i] ^= mask
            t.write_bytes(bytes(bad))
            with pytest.raises(CheckpointCorruptError) as ei:
                ck.read_container(t)
            assert str(t) in str(ei.value)


def test_appended_garbage_is_corrupt(tmp_path):
    p, _, _ = sample_file(tmp_path)
    t = write(tmp_path, p.read_bytes() + b"\0", "t.xrnn")
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        ck.read_container(t)


@pytest.mark.parametrize(
    "blob, words",
    [
        (b"", "empty"),
        (b"XRNN", "truncated"),
        (b"NOTACKPT" + bytes(100), "not an xrnn checkpoint"),
        (b"\x93NUMPY" + bytes(100), "NumPy"),
        (b"PK\x03\x04" + bytes(100), "zip"),
    ],
)
def test_not_a_checkpoint(tmp_path, blob, words):
    with pytest.raises(CheckpointCorruptError, match=words):
        ck.read_container(write(tmp_path, blob))


def test_newer_format_version(tmp_path):
    p, _, _ = sample_file(tmp_path)
    blob = bytearray(p.read_bytes()[:-32])
    blob[8:12] = struct.pack("<I", 2)
    t = write(tmp_path, seal(bytes(blob)), "v2.xrnn")
    with pytest.raises(CheckpointVersionError) as ei:
        ck.read_container(t)
    msg = str(ei.value)
    assert "format version 2" in msg and "up to 1" in msg and "upgrade" in msg
    # the same bytes without a valid checksum are damage, not a newer file (and say both)
    t.write_bytes(bytes(blob) + bytes(32))
    with pytest.raises(CheckpointCorruptError, match="format 2"):
        ck.read_container(t)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        ck.read_container(tmp_path / "nope.xrnn")
    assert type(ei.value) is CheckpointError and isinstance(ei.value.__cause__, FileNotFoundError)
    with pytest.raises(CheckpointError, match="directory"):
        ck.read_container(tmp_path)


# ---------------------------------------------------------------------------
# hostile files with a valid checksum
# ---------------------------------------------------------------------------

def test_forged_file_reads_back(tmp_path):
    """The hand-built format in these tests is the real one (so the forgeries below test the validator)."""
    data = np.arange(4, dtype="<i4").tobytes()
    hdr = good_header({"a": {"dtype": "int32", "shape": [2, 2], "offset": 0, "nbytes": 16}}, meta={"k": 1})
    c = ck.read_container(write(tmp_path, forge(hdr, data)))
    assert c.kind == "fake" and c.meta == {"k": 1}
    np.testing.assert_array_equal(c.tensors["a"], [[0, 1], [2, 3]])


def test_huge_declared_shape_is_refused_before_allocating(tmp_path):
    n = 10**6
    hdr = good_header({"a": {"dtype": "float64", "shape": [n, n], "offset": 0, "nbytes": 8 * n * n}})
    p = write(tmp_path, forge(hdr, bytes(64)))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointCorruptError, match="extends past the end"):
            ck.read_container(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes while refusing an 8 TB tensor"


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}, "dtype"),
        ({"dtype": "complex128", "shape": [1], "offset": 0, "nbytes": 16}, "dtype"),
        ({"dtype": "float32", "shape": [-1], "offset": 0, "nbytes": 4}, "shape"),
        ({"dtype": "float32", "shape": [True], "offset": 0, "nbytes": 4}, "shape"),
        ({"dtype": "float32", "shape": 3, "offset": 0, "nbytes": 12}, "shape"),
        ({"dtype": "float32", "shape": [1.0], "offset": 0, "nbytes": 4}, "shape"),
        ({"dtype": "float32", "shape": [1] * 40, "offset": 0, "nbytes": 4}, "shape"),
        ({"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 4}, "needs 8 bytes"),
        ({"dtype": "float32", "shape": [1], "offset": -4, "nbytes": 4}, "offset"),
        ({"dtype": "float32", "shape": [1], "offset": 64, "nbytes": 4}, "extends past"),
        ({"dtype": "float64", "shape": [0, 2**62], "offset": 0, "nbytes": 0}, "impossibly large"),
        ({"dtype": "float32", "shape": [1]}, "offset"),
        ([1, 2], "must be an object"),
    ],
)
def test_invalid_tensor_entries(tmp_path, entry, words):
    p = write(tmp_path, forge(good_header({"a": entry}), bytes(64)))
    with pytest.raises(CheckpointCorruptError, match=words):
        ck.read_container(p)


def test_overlapping_tensors(tmp_path):
    e = {"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}
    hdr = good_header({"a": e, "b": dict(e, offset=8)})
    with pytest.raises(CheckpointCorruptError, match="overlap"):
        ck.read_container(write(tmp_path, forge(hdr, bytes(64))))


def test_bool_tensor_with_bytes_other_than_0_1(tmp_path):
    hdr = good_header({"b": {"dtype": "bool", "shape": [2], "offset": 0, "nbytes": 2}})
    with pytest.raises(CheckpointCorruptError, match="bool"):
        ck.read_container(write(tmp_path, forge(hdr, b"\x01\x07")))


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"[" * 100_000 + b"]" * 100_000, "JSON values .* forged"),  # too costly: refused before parsing
        (b"[" * 65 + b"]" * 65, "nested more than 64 levels"),
        (b'{"format": 1, "kind": "x", "meta": {"n": ' + b"9" * 5000 + b'}, "tensors": {}}', "malformed"),
        (b"\xff\xfe not utf-8", "malformed"),
        (b"{not json", "malformed"),
        (b"[]", "JSON object"),
        (b'{"format": 2, "kind": "x", "meta": {}, "tensors": {}}', "disagrees"),
        (b'{"format": 1, "kind": 5, "meta": {}, "tensors": {}}', "kind"),
        (b'{"format": 1, "kind": "x", "meta": [], "tensors": {}}', "meta"),
        (b'{"format": 1, "kind": "x", "meta": {}, "tensors": []}', "tensors"),
    ],
)
def test_malformed_headers(tmp_path, raw, words):
    with pytest.raises(CheckpointCorruptError, match=words):
        ck.read_container(write(tmp_path, forge(None, raw_header=raw)))


def test_header_length_beyond_the_file(tmp_path):
    body = b"XRNNCKPT" + struct.pack("<IQ", 1, 2**63) + b"{}"
    with pytest.raises(CheckpointCorruptError, match="header"):
        ck.read_container(write(tmp_path, seal(body)))


def test_planted_pickle_is_never_unpickled(tmp_path):
    class Payload:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (os.mkdir, (self.target,))

    # the payload is live: unpickling it really does create a directory
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(str(probe))))
    assert probe.exists()

    marker = tmp_path / "pwned"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        p = write(tmp_path, pickle.dumps({"state": Payload(str(marker))}, protocol=protocol), "evil.xrnn")
        with pytest.raises(CheckpointCorruptError, match="not an xrnn checkpoint"):
            ck.read_container(p)
        with pytest.raises(CheckpointCorruptError):
            ck.load(p)
        with pytest.raises(CheckpointCorruptError):
            ck.peek(p)
        assert not marker.exists()


def test_torch_save_file_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, p)
    with pytest.raises(CheckpointCorruptError, match="zip"):
        ck.read_container(p)


# ---------------------------------------------------------------------------
# property-based: only documented errors, whatever the bytes
# ---------------------------------------------------------------------------

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read_or_checkpoint_error(blob: bytes):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.xrnn")
        with open(p, "wb") as f:
            f.write(blob)
        try:
            ck.read_container(p)
        except CheckpointError:
            pass
        try:
            ck.peek(p, verify=False)
        except CheckpointError:
            pass


@_FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(blob):
    _read_or_checkpoint_error(blob)


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_a_valid_prefix(tail):
    _read_or_checkpoint_error(b"XRNNCKPT" + struct.pack("<IQ", 1, len(tail) // 2) + tail)
    _read_or_checkpoint_error(seal(b"XRNNCKPT" + struct.pack("<IQ", 1, len(tail) // 2) + tail))


def _valid_blob():
    d = tempfile.mkdtemp()
    p = os.path.join(d, "v.xrnn")
    ck.write_container(p, "fake", {"a": [1, 2.5, None], "b": 2**70},
                       {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "z": np.zeros(0, np.int8)})
    with open(p, "rb") as f:
        blob = f.read()
    os.remove(p)
    os.rmdir(d)
    return blob


_VALID = _valid_blob()


@_FUZZ
@given(st.data())
def test_fuzz_mutated_valid_files(data):
    blob = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if op == "flip" and blob:
            blob[i] ^= data.draw(st.integers(1, 255))
        elif op == "set" and blob:
            blob[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and blob:
            del blob[i: i + data.draw(st.integers(1, 16))]
        elif op == "truncate":
            del blob[i:]
    reseal = data.draw(st.booleans())  # a forger who recomputes the checksum
    if reseal and len(blob) >= 32:
        blob = bytearray(seal(bytes(blob[:-32])))
    _read_or_checkpoint_error(bytes(blob))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(list(ck.TENSOR_DTYPES) + ["object", "float128", "<f4", ""]) | _json,
        "shape": st.lists(st.integers(-2, 2**64), max_size=4) | _json,
        "offset": st.integers(-8, 2**64) | _json,
        "nbytes": st.integers(-8, 2**64) | _json,
    },
)


@_FUZZ
@given(
    header=st.fixed_dictionaries(
        {},
        optional={
            "format": st.just(1) | _json,
            "kind": st.just("fuzzed") | _json,
            "xrnn_version": st.just("0") | _json,
            "meta": _json,
            "tensors": st.dictionaries(st.text(max_size=3), _entry | _json, max_size=3) | _json,
        },
    ),
    data=st.binary(max_size=200),
)
def test_fuzz_forged_headers_with_valid_checksum(header, data):
    """A hostile header behind a correct checksum: read and load still raise only CheckpointErrors."""
    blob = forge(header, data)
    _read_or_checkpoint_error(blob)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.xrnn")
        with open(p, "wb") as f:
            f.write(blob)
        ck.register_kind("fuzzed", _fussy_loader, replace=True)
        try:
            try:
                ck.load(p, kind="fuzzed")
            except CheckpointError:
                pass
        finally:
            ck._LOADERS.pop("fuzzed", None)


def _fussy_loader(meta, tensors, device):
    # what a real loader does with untrusted meta: index it, convert it, use it as sizes
    n = int(meta["n"])
    return device.zeros((n,), "float32") + float(tensors["w"].reshape(-1)[0])


# ---------------------------------------------------------------------------
# atomic saving
# ---------------------------------------------------------------------------

class _FailingFile:
    """A binary file whose writes fail with ENOSPC after ``budget`` bytes."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, b):
        n = memoryview(b).nbytes
        if n > self.budget:
            self.f.write(bytes(memoryview(b).cast("B")[: self.budget]))
            self.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= n
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("budget", [0, 10, 500, 5000])
def test_disk_full_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, budget):
    p, meta, tensors = sample_file(tmp_path)
    before = p.read_bytes()
    real_open = ck._open_for_write
    temps = []

    def failing_open(path):
        tmp, f = real_open(path)
        temps.append(tmp)
        return tmp, _FailingFile(f, budget)

    monkeypatch.setattr(ck, "_open_for_write", failing_open)
    big = {"w": np.ones(10_000, np.float32)}
    with pytest.raises(SaveError) as ei:
        ck.write_container(p, "fake", {"step": 8}, big)
    msg = str(ei.value)
    assert str(p) in msg and "disk is full" in msg and "untouched" in msg
    assert isinstance(ei.value, OSError) and isinstance(ei.value.__cause__, OSError)
    assert temps and os.path.dirname(temps[0]) == str(tmp_path)  # same directory, so rename is atomic
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.xrnn"]  # temp file removed
    assert ck.read_container(p).meta["step"] == 7


@pytest.mark.parametrize("target", ["fsync", "replace"])
def test_failure_at_fsync_or_rename_keeps_previous(tmp_path, monkeypatch, target):
    p, _, _ = sample_file(tmp_path)
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError(errno.ENOSPC if target == "fsync" else errno.EACCES, "simulated")

    monkeypatch.setattr(ck.os, target, boom)
    with pytest.raises(SaveError, match="untouched"):
        ck.write_container(p, "fake", {"step": 8}, {})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.xrnn"]


def test_interrupt_mid_write_propagates_and_cleans_up(tmp_path, monkeypatch):
    p, _, _ = sample_file(tmp_path)
    before = p.read_bytes()

    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.write_container(p, "fake", {}, {})
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.xrnn"]


def test_save_into_missing_directory_or_onto_a_directory(tmp_path):
    with pytest.raises(SaveError, match="does not exist"):
        ck.write_container(tmp_path / "no" / "x.xrnn", "fake", {}, {})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inside").write_text("keep")
    with pytest.raises(SaveError):
        ck.write_container(tmp_path / "d", "fake", {}, {})
    assert (tmp_path / "d" / "inside").read_text() == "keep"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"]


def test_overwrite_replaces_atomically(tmp_path):
    p = tmp_path / "x.xrnn"
    ck.write_container(p, "fake", {"v": 1}, {})
    ck.write_container(p, "fake", {"v": 2}, {})
    assert ck.read_container(p).meta == {"v": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["x.xrnn"]


# ---------------------------------------------------------------------------
# object level: registry, save, load, peek
# ---------------------------------------------------------------------------

class Affine:
    """A tiny saveable object: y = w * x + b."""

    checkpoint_kind = "test-affine"

    def __init__(self, w, b, step=0, device="cpu"):
        self.device = xrnn.resolve_device(device)
        self.w = self.device.asarray(np.asarray(w, dtype=np.float32))
        self.b = float(b)
        self.step = step

    def checkpoint_state(self):
        return {"b": self.b, "step": self.step}, {"w": self.w}

    @classmethod
    def from_checkpoint(cls, meta, tensors, device):
        return cls(tensors["w"], meta["b"], meta["step"], device=device)


@pytest.fixture
def affine_kind():
    ck.register_kind(Affine.checkpoint_kind, Affine.from_checkpoint)
    yield
    ck._LOADERS.pop(Affine.checkpoint_kind, None)


def test_registry_round_trip_across_devices(tmp_path, affine_kind, light_device):
    a = Affine([1.0, -2.0, 3.5], 0.25, step=12, device=light_device)
    p = tmp_path / "a.xrnn"
    ck.save(a, p)
    b = ck.load(p, device="cpu")
    assert isinstance(b, Affine) and b.device.name == "cpu"
    assert (b.b, b.step) == (0.25, 12)
    np.testing.assert_array_equal(xrnn.to_numpy(b.w), [1.0, -2.0, 3.5])
    c = ck.load(p, device=light_device, kind="test-affine")
    assert c.device == light_device and xrnn.backend.device_of(c.w) == light_device
    assert ck.load(p, kind=("other", "test-affine")).step == 12
    info = ck.peek(p)
    assert info.kind == "test-affine" and info.meta == {"b": 0.25, "step": 12}
    assert info.tensors == {"w": ck.TensorInfo("float32", (3,), 12)} and info.num_elements == 3
    assert "test-affine" in ck.registered_kinds()


def test_wrong_or_unknown_kind(tmp_path, affine_kind):
    p = tmp_path / "a.xrnn"
    ck.save(Affine([1.0], 0.0), p)
    with pytest.raises(CheckpointKindError, match="holds a 'test-affine', expected 'charlm'"):
        ck.load(p, kind="charlm")
    q = tmp_path / "u.xrnn"
    ck.write_container(q, "nobody-knows-me", {}, {})
    with pytest.raises(CheckpointKindError, match="nobody-knows-me.*known kinds:.*test-affine"):
        ck.load(q)


def test_loader_errors_on_hostile_meta_become_corrupt(tmp_path, affine_kind):
    q = tmp_path / "h.xrnn"
    ck.write_container(q, "test-affine", {"b": 1.0}, {"w": np.zeros(2, np.float32)})  # no "step"
    with pytest.raises(CheckpointCorruptError, match="does not describe a valid 'test-affine'.*KeyError"):
        ck.load(q)


def test_device_is_resolved_before_the_file_is_read(tmp_path):
    with pytest.raises(DeviceError):
        ck.load(tmp_path / "does-not-exist.xrnn", device="no-such-device")


def test_register_kind_rules(affine_kind):
    ck.register_kind("test-affine", Affine.from_checkpoint)  # same loader again: fine
    with pytest.raises(ConfigError, match="already registered"):
        ck.register_kind("test-affine", lambda m, t, d: None)
    ck.register_kind("test-affine", lambda m, t, d: "new", replace=True)
    with pytest.raises(ConfigError):
        ck.register_kind("", Affine.from_checkpoint)
    with pytest.raises(ConfigError):
        ck.register_kind("x", "not callable")


def test_save_refuses_objects_without_the_protocol(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint_kind"):
        ck.save({"w": np.zeros(3)}, tmp_path / "x.xrnn")
    assert list(tmp_path.iterdir()) == []


def test_peek_without_verification_skips_the_checksum(tmp_path):
    p, _, _ = sample_file(tmp_path)
    blob = bytearray(p.read_bytes())
    blob[-40] ^= 1  # inside the tensor data
    p.write_bytes(bytes(blob))
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        ck.peek(p)
    info = ck.peek(p, verify=False)
    assert info.kind == "fake" and not info.checksum_ok


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.xrnn"
    os.mkfifo(fifo)  # opening it for reading would block forever without a writer
    with pytest.raises(CheckpointError, match="not a regular file"):
        ck.read_container(fifo)


def test_refuses_to_save_over_a_file_that_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(SaveError, match="not an xrnn checkpoint"):
        ck.write_container(text, "fake", {}, {})
    assert text.read_text().startswith("First Citizen")
    empty = tmp_path / "empty.xrnn"
    empty.touch()
    ck.write_container(empty, "fake", {}, {})  # an empty placeholder may be replaced
    assert ck.read_container(empty).kind == "fake"


def test_meta_edge_cases(tmp_path):
    p = tmp_path / "x.xrnn"
    ck.write_container(p, "fake", {"s": "lone \ud800 surrogate", "k\u00e9y": "\u4e2d"}, {})
    assert ck.read_container(p).meta == {"s": "lone \ud800 surrogate", "k\u00e9y": "\u4e2d"}
    loop = {}
    loop["self"] = loop
    with pytest.raises(ConfigError, match="deeply"):
        ck.write_container(p, "fake", loop, {})
    with pytest.raises(ConfigError, match="JSON"):
        ck.write_container(p, "fake", {"n": 10**5000}, {})
    assert ck.read_container(p).meta["k\u00e9y"] == "\u4e2d"  # the failed saves left the file alone
