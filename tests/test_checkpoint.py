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
