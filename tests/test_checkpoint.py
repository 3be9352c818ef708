"""engine/checkpoint.py: bit-exact round trip, corruption detection, atomic writes (numpy).

    python -m pytest tests/test_checkpoint.py -q
"""
import json
import os
import zipfile

import numpy as np
import pytest

import engine.checkpoint as ckpt
from engine.checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint


def _arrays():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    w[0, 0] = np.float32(np.nan)           # NaN payload and -0.0 must survive bit-exactly
    w[0, 1] = np.float32(-0.0)
    return {"W1": w,
            "b1": np.zeros(7, np.float32),
            "adam.m.W1": rng.standard_normal((5, 7)),                 # float64
            "step": np.array(42, np.int64),                           # 0-d
            "ids": np.arange(12, dtype=np.int32).reshape(3, 4).T,     # non-contiguous view
            "empty": np.zeros((0, 3), np.float32)}


META = {"step": 42, "config": {"model": {"hidden_dim": 384, "embedding_dim": 128}},
        "vocab": "abc\u2603", "loss": 2.5, "rng": {"state": 2**127 + 5}}


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "run" / "deep" / "ckpt.npz"         # parent dirs are created
    arrays = _arrays()
    save_checkpoint(path, arrays, META)
    got, meta = load_checkpoint(path)
    assert meta == META
    assert set(got) == set(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape
        assert got[name].tobytes() == a.tobytes(), name
    assert os.listdir(path.parent) == ["ckpt.npz"]          # no temp file left


def test_file_is_a_plain_uncompressed_npz_without_pickle(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"W": np.ones((2, 2), np.float32)}, {"a": 1})
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["W.npy", "__meta__.npy"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with np.load(path, allow_pickle=False) as z:
        assert z["W"].tolist() == [[1, 1], [1, 1]]
        header = json.loads(z["__meta__"].tobytes())
    assert header["format"] == "engine-checkpoint" and header["version"] == 1
    assert header["meta"] == {"a": 1} and header["arrays"]["W"]["shape"] == [2, 2]


def test_overwrite_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"x": np.zeros(3)}, {"step": 1})
    save_checkpoint(path, {"y": np.ones(2)}, {"step": 2})
    arrays, meta = load_checkpoint(path)
    assert list(arrays) == ["y"] and meta == {"step": 2}


def _expect(path, reason):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(f"checkpoint {str(path)!r} ") and "\n" not in msg
    assert reason in msg, msg


def test_missing_garbage_and_directory(tmp_path):
    _expect(tmp_path / "nope.npz", "does not exist")
    _expect(tmp_path, "is a directory")
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    _expect(garbage, "is not a checkpoint (not a zip/npz file)")
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    _expect(npy, "not a zip/npz file")


def test_truncated_file(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _arrays(), META)
    data = path.read_bytes()
    for keep in (len(data) - 10, len(data) // 2, 100):
        path.write_bytes(data[:keep])
        _expect(path, "is truncated or corrupt")


def test_flipped_byte_in_an_array_is_detected(tmp_path):
    path = tmp_path / "c.npz"
    arrays = {"W": np.arange(1000, dtype=np.float32)}
    save_checkpoint(path, arrays, {})
    data = bytearray(path.read_bytes())
    i = bytes(data).find(np.arange(1000, dtype=np.float32)[500:504].tobytes())
    assert i > 0
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    _expect(path, "is corrupt")


def test_digest_mismatch_with_consistent_zip_is_detected(tmp_path):
    """An array rewritten with a valid zip CRC but not its record: only the sha256 catches it."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"W": np.zeros(4, np.float32)}, {"step": 1})
    with np.load(path) as z:
        meta_bytes = z["__meta__"]
    np.savez(path, W=np.array([0, 0, 1, 0], np.float32), __meta__=meta_bytes)
    _expect(path, "is corrupt (array 'W' does not match its sha256)")
    np.savez(path, W=np.zeros(5, np.float32), __meta__=meta_bytes)     # shape changed
    _expect(path, "array 'W' does not match")


def _rewrite_header(path, arrays, edit):
    header = {"format": "engine-checkpoint", "version": 1, "meta": {},
              "arrays": {k: {"dtype": a.dtype.str, "shape": list(a.shape),
                             "sha256": ckpt._digest(a)} for k, a in arrays.items()}}
    edit(header)
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays, __meta__=raw)


def test_header_problems(tmp_path):
    path = tmp_path / "c.npz"
    a = {"W": np.zeros(3, np.float32)}
    _rewrite_header(path, a, lambda h: h.update(version=2))
    _expect(path, "has format version 2; this engine reads version 1")
    _rewrite_header(path, a, lambda h: h.update(format="other"))
    _expect(path, "has an unreadable __meta__")
    _rewrite_header(path, a, lambda h: h["arrays"].update(b1=h["arrays"]["W"]))
    _expect(path, "is missing array 'b1'")
    _rewrite_header(path, a, lambda h: h["arrays"].clear())
    _expect(path, "has array 'W' not listed in __meta__")
    np.savez(path, W=np.zeros(3))
    _expect(path, "has no __meta__ entry")
    np.savez(path, W=np.zeros(3), __meta__=np.frombuffer(b"{not json", np.uint8))
    _expect(path, "has an unreadable __meta__")


def test_crash_during_write_keeps_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"W": np.ones(3, np.float32)}, {"step": 1})
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"W": np.full(3, 7, np.float32)}, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.npz"]
    assert path.read_bytes() == before
    arrays, meta = load_checkpoint(path)
    assert meta == {"step": 1} and arrays["W"].tolist() == [1, 1, 1]


def test_save_rejects_bad_inputs_without_touching_the_target(tmp_path):
    path = tmp_path / "c.npz"
    with pytest.raises(CheckpointError, match="meta is not JSON-serialisable"):
        save_checkpoint(path, {"W": np.zeros(2)}, {"f": object()})
    with pytest.raises(CheckpointError, match="invalid array name '__meta__'"):
        save_checkpoint(path, {"__meta__": np.zeros(2)}, {})
    with pytest.raises(CheckpointError, match="array 'o' must be a numeric numpy array"):
        save_checkpoint(path, {"o": np.array([{}], dtype=object)}, {})
    with pytest.raises(CheckpointError, match="array 'l' must be a numeric numpy array, got list"):
        save_checkpoint(path, {"l": [1, 2]}, {})
    assert os.listdir(tmp_path) == []


def test_check_compatible_names_the_first_mismatch():
    meta = {"config": {"model": {"hidden_dim": 384, "embedding_dim": 128}}, "vocab": "abc", "step": 9}
    check_compatible(meta, {"config": {"model": {"hidden_dim": 384}}, "vocab": "abc"})
    with pytest.raises(CheckpointError) as exc:
        check_compatible(meta, {"vocab": "abc", "config": {"model": {"embedding_dim": 64,
                                                                     "hidden_dim": 10}}})
    assert str(exc.value) == ("checkpoint is incompatible: 'config.model.embedding_dim' is 128 "
                              "in the checkpoint but 64 in this run")
    with pytest.raises(CheckpointError, match=r"^checkpoint 'x.npz' is incompatible: 'vocab' is 'abc'"):
        check_compatible(meta, {"vocab": "abd"}, path="x.npz")
    with pytest.raises(CheckpointError, match=r"^checkpoint has no 'config.proto' \(this run expects"):
        check_compatible(meta, {"config": {"proto": {"mode": "feature"}}})
    check_compatible({"shape": [3, 4]}, {"shape": (3, 4)})        # tuples compare as JSON lists


def _flips(path, offsets):
    """{offset: message or None (loaded, equal to the original)} for each single flipped byte."""
    data = path.read_bytes()
    arrays, meta = load_checkpoint(path)
    bad = path.with_name("flipped.npz")
    out = {}
    for i in offsets:
        raw = bytearray(data)
        raw[i] ^= 0xFF
        bad.write_bytes(bytes(raw))
        try:
            got, got_meta = load_checkpoint(bad)
        except CheckpointError as exc:       # any other exception type fails the test
            out[i] = str(exc)
            continue
        assert got_meta == meta and all(got[k].tobytes() == a.tobytes() for k, a in arrays.items()), i
        out[i] = None                        # a field zipfile does not read (time, attributes, ...)
    return out


def test_every_flipped_byte_is_a_one_line_checkpoint_error_or_harmless(tmp_path):
    """Each byte of a small checkpoint flipped in turn: member data, npy headers, local headers,
    the central directory and its end record."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"W": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3)}, {"step": 3})
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos, start = zf.infolist(), zf.start_dir
    names = []   # offsets of every member name, in the local headers and in the central directory
    for info in infos:
        names += range(info.header_offset + 30, info.header_offset + 30 + len(info.filename))
    pos = start
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, extra, comment = (int.from_bytes(data[pos + k:pos + k + 2], "little") for k in (28, 30, 32))
        names += range(pos + 46, pos + 46 + n)
        pos += 46 + n + extra + comment
    assert len(names) == 2 * sum(len(i.filename) for i in infos)
    result = _flips(path, range(len(data)))
    errors = {i: m for i, m in result.items() if m is not None}
    for i, msg in errors.items():
        assert msg.startswith(f"checkpoint {str(path.with_name('flipped.npz'))!r} ") and "\n" not in msg, (i, msg)
    for i in names:
        assert result[i] is not None and "corrupt" in result[i], (i, result[i])
    data_bytes = [i for i in range(len(data)) if i < start and i not in names]
    assert sum(result[i] is not None for i in data_bytes) > len(data_bytes) * 0.6   # CRCs and sha256s
    assert all("corrupt" in m for m in errors.values()), {m for m in errors.values() if "corrupt" not in m}


def test_damaged_directory_is_corrupt_not_foreign(tmp_path):
    """Flips that used to read as 'not written by save_checkpoint' or as a missing array."""
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"W": np.zeros(3, np.float32)}, {})
    data = path.read_bytes()
    start = data.index(b"PK\x01\x02")
    meta_name = data.index(b"__meta__.npy", start)
    w_name = data.index(b"W.npy", start)
    comment_len = start + 32             # the first directory entry's comment length
    result = _flips(path, [meta_name, meta_name + 3, w_name, comment_len])
    for i, msg in result.items():
        assert msg is not None and " is corrupt (" in msg and "save_checkpoint" not in msg, (i, msg)
    assert "File name in directory" in result[meta_name]
    np.savez(path, W=np.zeros(3))        # a valid zip without the meta member stays "foreign"
    _expect(path, "has no __meta__ entry (not written by save_checkpoint)")


# ----------------------------------------------------------------------------- check_out_dir

def _check_out(path, needed=1000):
    with pytest.raises(CheckpointError) as exc:
        ckpt.check_out_dir(path, needed)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint folder {str(path)!r} ")
    return msg


def test_check_out_dir_accepts_new_and_existing_folders_and_creates_nothing(tmp_path):
    ckpt.check_out_dir(tmp_path, 1000)
    ckpt.check_out_dir(tmp_path / "a" / "b" / "c", 1000)
    ckpt.check_out_dir(str(tmp_path / "x"), 0)
    assert os.listdir(tmp_path) == []


def test_check_out_dir_refuses_files_and_unwritable_places(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    assert _check_out(f).endswith("is an existing file, not a directory")
    assert _check_out(f / "sub" / "dir").endswith(f"cannot be created: {str(f)!r} is a file, not a directory")

    def denied(**kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)
    assert _check_out(tmp_path / "new").endswith(
        f"is not writable: cannot create a file in {str(tmp_path)!r} (Permission denied)")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs (not writable, even by root)")
def test_check_out_dir_really_probes_writability():
    assert "is not writable: cannot create a file in '/sys'" in _check_out("/sys/no-such-dir/out")


def test_check_out_dir_needs_room_for_two_checkpoints(tmp_path, monkeypatch):
    from types import SimpleNamespace
    free = {"free": 3 * 2**20}
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: SimpleNamespace(total=2**40, used=0, **free))
    ckpt.check_out_dir(tmp_path / "out", 3 * 2**19)          # 2 x 1.5 MiB = 3 MiB: just fits
    msg = _check_out(tmp_path / "out", 2 * 2**20)
    assert msg.endswith(f"has too little free space: checkpoints need 4.0 MiB (2 x 2.0 MiB), "
                        f"3.0 MiB free on {str(tmp_path)!r}")
    ckpt.check_out_dir(tmp_path / "out", 2**20, files=3)        # early stopping's best.npz too: 3 x 1 MiB
    with pytest.raises(CheckpointError, match=r"checkpoints need 4\.5 MiB \(3 x 1\.5 MiB\), 3\.0 MiB free"):
        ckpt.check_out_dir(tmp_path / "out", 3 * 2**19, files=3)
    assert os.listdir(tmp_path) == []


def test_checkpoint_size_bounds_the_file(tmp_path):
    arrays = _arrays()
    path = tmp_path / "c.npz"
    save_checkpoint(path, arrays, META)
    estimate = ckpt.checkpoint_size({k: (a.shape, a.dtype) for k, a in arrays.items()}, len(json.dumps(META)))
    assert os.path.getsize(path) <= estimate <= os.path.getsize(path) + 8192


def test_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    import errno
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"W": np.ones(3, np.float32)}, {"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"W": np.zeros(3, np.float32)}, {"step": 2})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.npz"] and load_checkpoint(path)[1] == {"step": 1}
