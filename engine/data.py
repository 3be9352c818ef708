"""Corpus, character vocabulary, train/validation/test split and batches.

    python -c "from engine.data import *; t = load_text(''); print(len(t), Vocab.from_text(t).size)"

The default corpus (`data.path = ""`) is CPython's own help text: the values
of `pydoc_data.topics.topics` joined with "\\n\\n" in sorted key order, about
465k characters of English that every CPython install has offline. Files
are read as strict UTF-8 bytes (no newline translation; a leading BOM is
dropped). Validation is the END of the text (followed by the test split, when
data.test_fraction > 0); the vocabulary is built from the training split only
(id 0 = UNK for characters unseen in training).
Letters: B batch, S sequence length, L number of ids.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

PAD = -1   # target id ignored by the loss (docs/model.md)
UNK = 0    # id of characters not in the training split
UNK_CHAR = "\ufffd"


class DataError(ValueError):
    """A corpus, split, vocabulary or batching problem; the message is one line."""


@functools.lru_cache(maxsize=1)
def default_corpus() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(path: str) -> str:
    """The corpus text: `default_corpus()` for "", else the UTF-8 file at `path`."""
    if path == "":
        return default_corpus()
    where = f"data.path {path!r}"
    if not os.path.exists(path):
        raise DataError(f"{where} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{where} is a directory, not a text file")
    try:
        raw = _read_bytes(path)
    except OSError as exc:
        raise DataError(f"{where} cannot be read ({exc.strerror or exc})") from None
    if not raw:
        raise DataError(f"{where} is empty")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{where} is binary, not text (NUL byte at offset {nul})")
    try:
        text = raw.decode("utf-8-sig")  # strict; -sig drops a leading BOM
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not UTF-8 text "
                        f"(invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if not text.strip():
        raise DataError(f"{where} contains only whitespace")
    return text


def _read_bytes(path: str) -> bytes:
    """The file's bytes. A pipe or device is read by a helper thread while this (main) thread
    waits in short slices: a Ctrl+C or SIGTERM that the kernel hands to another thread of the
    process (numpy's BLAS threads, say) still interrupts the wait, where a blocking read in the
    main thread would not be woken and would hang."""
    import stat
    import threading
    if stat.S_ISREG(os.stat(path).st_mode):
        with open(path, "rb") as fh:
            return fh.read()
    box: dict = {}

    def read():
        try:
            with open(path, "rb") as fh:
                box["raw"] = fh.read()
        except OSError as exc:
            box["error"] = exc
    t = threading.Thread(target=read, name="read-corpus", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["raw"]


def text_digest(path: str, text: str) -> str:
    """sha256 of the corpus: the file's bytes, or the text as UTF-8 (the embedded corpus, or a
    pipe, which cannot be read twice)."""
    import hashlib
    import stat
    h = hashlib.sha256()
    if path and stat.S_ISREG(os.stat(path).st_mode):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the last `val_fraction` of the characters."""
    train, val, _ = split_corpus(text, val_fraction, 0.0)
    return train, val


def split_corpus(text: str, val_fraction: float, test_fraction: float = 0.0) -> tuple[str, str, str]:
    """(train, val, test), contiguous in that order: test is the last `test_fraction` of the
    characters, val the `val_fraction` before it (cut at int(L·(1 − val − test)) and
    int(L·(1 − test)); test_fraction = 0: an empty test and exactly split_text's cut). Each
    non-empty split needs 2 characters: one input and one target."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"data.test_fraction must be in [0, 1 - val_fraction), got {test_fraction!r} "
                        f"with val_fraction={val_fraction!r}")
    n = len(text)
    cut = int(n * (1 - (val_fraction + test_fraction)))
    cut_test = int(n * (1 - test_fraction)) if test_fraction else n
    train, val, test = text[:cut], text[cut:cut_test], text[cut_test:]
    if len(train) < 2 or len(val) < 2 or (test_fraction and len(test) < 2):
        if not test_fraction:   # the message split_text has always given
            raise DataError(f"text of {n} characters is too small to split with "
                            f"val_fraction={val_fraction} (train {len(train)}, validation {len(val)} "
                            f"characters; each needs at least 2)")
        raise DataError(f"text of {n} characters is too small to split with val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction} (train {len(train)}, validation {len(val)}, test "
                        f"{len(test)} characters; each needs at least 2)")
    return train, val, test


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class Vocab:
    """Characters <-> int32 ids. Id 0 is UNK; `chars[i]` has id i + 1 (sorted)."""

    def __init__(self, chars):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise DataError("vocabulary must be a non-empty list of single characters")
        if chars != sorted(set(chars)):
            raise DataError("vocabulary characters must be distinct and sorted")
        self._chars = chars
        self._cps = _code_points("".join(chars))           # sorted, for searchsorted
        self._table = np.array([UNK_CHAR] + chars, dtype=object)

    @classmethod
    def from_text(cls, train: str) -> Vocab:
        if not train:
            raise DataError("cannot build a vocabulary from empty text")
        return cls(sorted(set(train)))

    @property
    def size(self) -> int:
        """V: number of ids, UNK included."""
        return len(self._chars) + 1

    @property
    def chars(self) -> list[str]:
        return list(self._chars)

    def encode(self, text: str) -> np.ndarray:
        """(L,) int32 ids; characters outside the vocabulary map to UNK (0)."""
        cps = _code_points(text)
        idx = np.searchsorted(self._cps, cps)
        hit = self._cps[np.minimum(idx, len(self._cps) - 1)] == cps
        return np.where(hit, idx + 1, UNK).astype(np.int32)

    def decode(self, ids) -> str:
        """Text of (L,) ids; UNK decodes to U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise DataError(f"ids must be in [0, {self.size}), got min {ids.min()} max {ids.max()}")
        return "".join(self._table[ids.astype(np.int64)])

    def to_json(self) -> str:
        return json.dumps({"format": "char-vocab", "version": 1, "unk_id": UNK,
                           "chars": "".join(self._chars)})

    @classmethod
    def from_json(cls, s: str) -> Vocab:
        try:
            d = json.loads(s)
            ok = d.get("format") == "char-vocab" and d.get("version") == 1
        except (json.JSONDecodeError, AttributeError):
            ok = False
        if not ok or not isinstance(d.get("chars"), str):
            raise DataError("vocabulary JSON is not a char-vocab version 1 document")
        return cls(list(d["chars"]))

    def __eq__(self, other):
        return isinstance(other, Vocab) and self._chars == other._chars

    def __repr__(self):
        return f"Vocab(size={self.size})"


class Batches:
    """Random training windows from a seeded generator whose state can be saved and restored."""

    def __init__(self, train_ids: np.ndarray, batch_size: int, seq_len: int, seed: int):
        ids = np.asarray(train_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"train ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(ids) < seq_len + 1:
            raise DataError(f"training split has {len(ids)} characters; "
                            f"train.seq_len={seq_len} needs at least {seq_len + 1}")
        self.ids = ids.astype(np.int32, copy=False)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rng = np.random.default_rng([seed, 1])

    def next_offsets(self) -> np.ndarray:
        """(B,) int32 window starts o in [0, L - S - 1]: x = ids[o:o+S], y = ids[o+1:o+S+1]."""
        high = len(self.ids) - self.seq_len   # exclusive
        return self.rng.integers(0, high, size=self.batch_size, dtype=np.int64).astype(np.int32)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both (B,S) int32, from the next offsets (host convenience)."""
        idx = self.next_offsets()[:, None].astype(np.int64) + np.arange(self.seq_len)
        return self.ids[idx], self.ids[idx + 1]

    def state(self) -> dict:
        """The generator state, JSON-able (PCG64's 128-bit integers are plain Python ints)."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(f"batch generator state is invalid ({exc})") from None


def val_batches(val_ids: np.ndarray, batch_size: int, seq_len: int,
                max_batches: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(x, y)] of (B,S) int32: windows tiling val_ids from the start, each target once.

    Window i has inputs val_ids[i*S : i*S+S] and targets shifted by one, so
    the L - 1 targets val_ids[1:] are each counted exactly once. Positions
    past the end have x = 0 and y = PAD, and the last batch is filled with
    all-PAD windows. max_batches > 0 keeps only the first max_batches.
    """
    ids = np.asarray(val_ids).astype(np.int32, copy=False)
    if ids.ndim != 1 or len(ids) < 2:
        raise DataError(f"validation split needs at least 2 characters, got {len(ids)}")
    if batch_size < 1 or seq_len < 1 or max_batches < 0:
        raise DataError(f"batch_size, seq_len must be >= 1 and max_batches >= 0, "
                        f"got {batch_size}, {seq_len}, {max_batches}")
    targets = len(ids) - 1
    windows = -(-targets // seq_len)
    batches = -(-windows // batch_size)
    if max_batches:
        batches = min(batches, max_batches)
    x = np.zeros(batches * batch_size * seq_len, dtype=np.int32)
    y = np.full(batches * batch_size * seq_len, PAD, dtype=np.int32)
    n = min(targets, len(x))          # windows tile the ids contiguously, so flat copies do
    x[:n], y[:n] = ids[:n], ids[1:n + 1]
    x, y = x.reshape(batches, batch_size, seq_len), y.reshape(batches, batch_size, seq_len)
    return [(x[b], y[b]) for b in range(batches)]
