"""Atomic, self-checking checkpoints: one uncompressed .npz file, never pickle.

    python -c "from engine.checkpoint import *; a, m = load_checkpoint('run/ckpt.npz'); print(m)"

The file is a zip of `<name>.npy` members (what `np.savez` writes) plus a
`__meta__.npy` member: a uint8 array holding UTF-8 JSON
`{"format", "version", "meta", "arrays": {name: {dtype, shape, sha256}}}`.
The sha256 covers each array's dtype, shape and C-order bytes, so any
corruption, or an array swapped without its record, is detected on load.
A save goes to a temp file in the same directory, is fsync'd and then
renamed over the target (os.replace), so a crash leaves the previous
checkpoint intact. `check_out_dir` tells before a run whether its checkpoint
folder can take them (a directory, writable, with room for two).
"""
from __future__ import annotations

import hashlib
import json
import os
import math
import re
import shutil
import tempfile
import zipfile

import numpy as np

FORMAT = "engine-checkpoint"
VERSION = 1
META = "__meta__"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or used; the message is one line."""


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}|{list(a.shape)}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_checkpoint(path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write `arrays` and the JSON-able `meta` to `path` atomically (parent dirs created)."""
    path = os.fspath(path)
    records = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == META:
            raise CheckpointError(f"checkpoint {path!r}: invalid array name {name!r}")
        if not isinstance(a, np.ndarray) or a.dtype.hasobject:
            raise CheckpointError(f"checkpoint {path!r}: array {name!r} must be a numeric "
                                  f"numpy array, got {type(a).__name__}")
        records[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _digest(a)}
    try:
        header = json.dumps({"format": FORMAT, "version": VERSION, "meta": meta,
                             "arrays": records}, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: meta is not JSON-serialisable ({exc})") from None
    members = {**arrays, META: np.frombuffer(header.encode("utf-8"), dtype=np.uint8)}

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, a in members.items():
                    with zf.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, a, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(parent)  # make the rename itself durable


MEMBER_BYTES = 512  # per member beyond its data: npy header (128), zip64 local and central headers
RECORD_BYTES = 256  # per array in the __meta__ JSON: dtype, shape, sha256


def checkpoint_size(arrays: dict[str, tuple], meta_bytes: int = 0) -> int:
    """Bytes (an upper estimate) of the file save_checkpoint writes for arrays {name: (shape,
    dtype)} and a meta of `meta_bytes` of JSON, computed from the shapes alone."""
    data = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return data + (MEMBER_BYTES + RECORD_BYTES) * (len(arrays) + 1) + meta_bytes


def check_out_dir(path, needed_bytes: int, files: int = 2) -> None:
    """Raise CheckpointError (one line) unless checkpoints of `needed_bytes` can be written under `path`.

    `path` must not be an existing non-directory; its nearest existing ancestor must be a
    directory in which a file can really be created (probed with a temp file, removed at
    once: permission bits say nothing when running as root); and that file system must have
    files × needed_bytes free (2: a save writes a temp file beside the previous checkpoint;
    3 with early stopping's best checkpoint beside them).
    Creates nothing: missing directories are made by the first save."""
    path = os.fspath(path)
    where = f"checkpoint folder {path!r}"
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{where} is an existing file, not a directory")
    base = os.path.abspath(path)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise CheckpointError(f"{where} cannot be created: {base!r} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f"{where} is not writable: cannot create a file in {base!r} "
                              f"({exc.strerror or exc})") from None
    free = shutil.disk_usage(base).free
    if free < files * needed_bytes:
        raise CheckpointError(f"{where} has too little free space: checkpoints need {_mib(files * needed_bytes)} "
                              f"({files} x {_mib(needed_bytes)}), {_mib(free)} free on {base!r}")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) from `path`, after checking format, version and every digest."""
    path = os.fspath(path)

    def fail(reason: str):
        return CheckpointError(f"checkpoint {path!r} {reason}".replace("\n", " "))

    if not os.path.exists(path):
        raise fail("does not exist")
    if os.path.isdir(path):
        raise fail("is a directory")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == b"PK\x03\x04":
            raise fail("is truncated or corrupt (the zip directory is missing)")
        raise fail("is not a checkpoint (not a zip/npz file)")
    try:
        with zipfile.ZipFile(path) as zf:
            _check_entry_count(zf)
            members = {}
            for info in zf.infolist():
                with zf.open(info):  # reads the local header: its name must match the directory's
                    pass
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if name in members:
                    raise ValueError(f"member {info.filename!r} appears twice")
                members[name] = info
            if META not in members:
                raise fail(f"has no {META} entry (not written by save_checkpoint)")
            header = _read_header(_read_member(zf, members[META]), fail)
            records = header["arrays"]
            for name in sorted(set(records) - set(members) - {META}):
                raise fail(f"is missing array {name!r}")
            for name in sorted(set(members) - set(records) - {META}):
                raise fail(f"has array {name!r} not listed in {META}")
            arrays = {name: _read_member(zf, members[name]) for name in records}
        for name, rec in records.items():
            a = arrays[name]
            if a.dtype.str != rec["dtype"] or list(a.shape) != rec["shape"] or _digest(a) != rec["sha256"]:
                raise fail(f"is corrupt (array {name!r} does not match its sha256)")
    except CheckpointError:
        raise
    except Exception as exc:  # any damage to the zip or npy structure, whatever numpy or zipfile raise
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise fail(f"is corrupt ({detail})") from None
    return arrays, header["meta"]


def _check_entry_count(zf: zipfile.ZipFile) -> None:
    """The end record's entry count must match the entries read from the central directory
    (a damaged length field there makes zipfile skip entries silently)."""
    end_record = getattr(zipfile, "_EndRecData", None)   # CPython's parser of that record
    if end_record is None:  # pragma: no cover - every CPython 3 has it
        return
    zf.fp.seek(0)
    rec = end_record(zf.fp)
    if rec is not None and rec[zipfile._ECD_ENTRIES_TOTAL] != len(zf.infolist()):
        raise ValueError(f"the zip directory lists {len(zf.infolist())} entries, its end record "
                         f"{rec[zipfile._ECD_ENTRIES_TOTAL]}")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member, read to its end (so zipfile checks its CRC-32)."""
    with zf.open(info) as fh:
        a = np.lib.format.read_array(fh, allow_pickle=False)
        if fh.read(1):
            raise ValueError(f"member {info.filename!r} has bytes after its array")
    return a


def _read_header(raw: np.ndarray, fail) -> dict:
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"{META} is {raw.dtype} {raw.shape}, not uint8 bytes")
        header = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise fail(f"has an unreadable {META} ({exc})") from None
    if header.get("version") != VERSION:
        raise fail(f"has format version {header.get('version')!r}; this engine reads version {VERSION}")
    if not isinstance(header.get("arrays"), dict) or "meta" not in header:
        raise fail(f"has an unreadable {META} (no arrays or meta)")
    return header


def check_compatible(meta: dict, expected: dict, path: str | None = None, note: str = "") -> None:
    """Raise CheckpointError naming the first key of `expected` whose value differs in `meta`.

    Nested dicts are compared key by key and reported with dotted keys
    (e.g. 'config.model.hidden_dim'); keys only in `meta` are ignored. `note`
    ends the message (e.g. "it cannot change on resume").
    """
    where = f"checkpoint {path!r}" if path else "checkpoint"
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as in the loaded meta
    mismatch = _first_mismatch(meta, expected, "")
    if mismatch:
        key, have, want = mismatch
        tail = f"; {note}" if note else ""
        if have is _MISSING:
            raise CheckpointError(f"{where} has no {key!r} (this run expects {_short(want)}){tail}")
        raise CheckpointError(f"{where} is incompatible: {key!r} is {_short(have)} in the "
                              f"checkpoint but {_short(want)} in this run{tail}")


_MISSING = object()


def _first_mismatch(have, want, prefix):
    for key, w in want.items():
        dotted = f"{prefix}{key}"
        h = have.get(key, _MISSING) if isinstance(have, dict) else _MISSING
        if isinstance(w, dict) and isinstance(h, dict):
            found = _first_mismatch(h, w, dotted + ".")
            if found:
                return found
        elif h is _MISSING or h != w:
            return dotted, h, w
    return None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
