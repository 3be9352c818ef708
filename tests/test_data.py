"""engine/data.py: corpus loading, split, vocabulary, training and validation batches (numpy).

    python -m pytest tests/test_data.py -q
"""
import json

import numpy as np
import pytest

from engine.data import (PAD, UNK, Batches, DataError, Vocab, default_corpus, load_text,
                         split_corpus, split_text, val_batches)


# ---- corpus ---------------------------------------------------------------------------

def test_default_corpus_is_pydoc_topics_and_deterministic():
    from pydoc_data.topics import topics
    text = load_text("")
    assert len(text) > 400_000
    assert text == "\n\n".join(topics[k] for k in sorted(topics))
    default_corpus.cache_clear()
    assert load_text("") == text
    assert text.startswith(topics[sorted(topics)[0]])


def test_load_text_reads_utf8_exactly(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("h\u00e9llo\r\nw\u00f6rld \u2603\n".encode("utf-8"))
    assert load_text(str(p)) == "h\u00e9llo\r\nw\u00f6rld \u2603\n"     # no newline translation
    p.write_bytes(b"\xef\xbb\xbfabc")
    assert load_text(str(p)) == "abc"                                   # BOM dropped


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


@pytest.mark.parametrize("name, data, reason", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b" \n\t\n", "contains only whitespace"),
    ("nul.bin", b"abc\x00def", "is binary, not text (NUL byte at offset 3)"),
    ("latin1.txt", b"0123456789ab\xff rest", "is not UTF-8 text (invalid byte 0xff at offset 12)"),
    ("cut.txt", "ab\u00e9".encode()[:-1], "is not UTF-8 text (invalid byte 0xc3 at offset 2)"),
])
def test_bad_files_give_one_line_data_errors(tmp_path, name, data, reason):
    path = _write(tmp_path, name, data)
    with pytest.raises(DataError) as exc:
        load_text(path)
    assert str(exc.value) == f"data.path {path!r} {reason}"


def test_missing_file_and_directory(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError) as exc:
        load_text(missing)
    assert str(exc.value) == f"data.path {missing!r} does not exist"
    with pytest.raises(DataError) as exc:
        load_text(str(tmp_path))
    assert str(exc.value) == f"data.path {str(tmp_path)!r} is a directory, not a text file"


# ---- split ----------------------------------------------------------------------------

def test_split_point_is_exact():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text, 0.1)
    assert (len(train), len(val)) == (900, 100)
    assert train + val == text and val == text[900:]
    train, val = split_text(text[:7], 0.5)                # int(7 * 0.5) = 3
    assert (train, val) == ("abc", "defg")
    train, val = split_text(text[:101], 0.25)             # int(101 * 0.75) = int(75.75) = 75
    assert len(train) == 75 and len(val) == 26


def test_split_too_small_or_bad_fraction():
    with pytest.raises(DataError, match=r"^text of 10 characters is too small .*\(train 9, validation 1 "):
        split_text("abcdefghij", 0.1)
    with pytest.raises(DataError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        split_text("abcdefghij", 1.0)


def test_three_way_split_is_contiguous_from_the_end():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val, test = split_corpus(text, 0.1, 0.1)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert train + val + test == text and test == text[900:] and val == text[800:900]
    train, val, test = split_corpus(text[:101], 0.25, 0.125)  # int(101·0.625) = 63, int(101·0.875) = 88
    assert (len(train), len(val), len(test)) == (63, 25, 13)
    for n, f in [(1000, 0.1), (7, 0.5), (101, 0.25), (465_917, 0.1)]:   # no test split: split_text's cut
        t = text * (n // 1000 + 1)
        assert split_corpus(t[:n], f, 0.0) == (*split_text(t[:n], f), "")


def test_three_way_split_errors_are_one_line():
    with pytest.raises(DataError, match=r"^text of 20 characters is too small to split with val_fraction=0.2, "
                                        r"test_fraction=0.05 \(train 15, validation 4, test 1 characters; each "
                                        r"needs at least 2\)$"):
        split_corpus("abcdefghijklmnopqrst", 0.2, 0.05)
    with pytest.raises(DataError, match=r"^data.test_fraction must be in \[0, 1 - val_fraction\), got 0.5 "
                                        r"with val_fraction=0.5$"):
        split_corpus("abcdefghij" * 10, 0.5, 0.5)


# ---- vocabulary -----------------------------------------------------------------------

def test_vocab_ids_are_sorted_chars_after_unk():
    v = Vocab.from_text("banana!")
    assert v.chars == ["!", "a", "b", "n"] and v.size == 5
    assert v.encode("ban!").tolist() == [3, 2, 4, 1]
    assert v.encode("ban!").dtype == np.int32
    assert v.decode(v.encode("banana!")) == "banana!"


def test_unseen_char_maps_to_unk_and_decodes_to_replacement():
    v = Vocab.from_text("abc")
    ids = v.encode("aZc\u2603")
    assert ids.tolist() == [1, UNK, 3, UNK]
    assert v.decode(ids) == "a\ufffdc\ufffd"
    assert v.encode("").shape == (0,) and v.decode([]) == ""
    with pytest.raises(DataError, match=r"ids must be in \[0, 4\)"):
        v.decode([4])


def test_vocab_on_the_default_corpus_round_trips_and_matches_a_dict():
    train, val = split_text(load_text(""), 0.1)
    v = Vocab.from_text(train)
    table = {c: i + 1 for i, c in enumerate(sorted(set(train)))}
    ids = v.encode(val)
    assert ids.tolist() == [table.get(c, 0) for c in val]
    assert v.decode(v.encode(train)) == train


def test_vocab_json_round_trip():
    v = Vocab.from_text("h\u00e9llo \"w\\orld\"\n\t\u2603")
    w = Vocab.from_json(v.to_json())
    assert w == v and w.chars == v.chars and w.size == v.size
    assert w.encode("\u2603\n").tolist() == v.encode("\u2603\n").tolist()
    with pytest.raises(DataError):
        Vocab.from_json('{"format": "other"}')
    with pytest.raises(DataError):
        Vocab.from_json(json.dumps({"format": "char-vocab", "version": 1, "chars": "ba"}))


# ---- training batches -----------------------------------------------------------------

IDS = np.arange(1000, dtype=np.int32) * 7 % 101   # distinct neighbours, easy to check shifts


def test_batches_shapes_ranges_and_shift():
    b = Batches(IDS, batch_size=8, seq_len=16, seed=3)
    for _ in range(50):
        o = b.next_offsets()
        assert o.dtype == np.int32 and o.shape == (8,)
        assert o.min() >= 0 and o.max() <= len(IDS) - 16 - 1
    x, y = b.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_batches_windows_come_from_offsets():
    a, b = Batches(IDS, 4, 10, seed=5), Batches(IDS, 4, 10, seed=5)
    o = a.next_offsets()
    x, y = b.next_batch()
    for i, start in enumerate(o):
        assert np.array_equal(x[i], IDS[start:start + 10])
        assert np.array_equal(y[i], IDS[start + 1:start + 11])


def test_last_offset_is_reachable():
    b = Batches(np.arange(6, dtype=np.int32), batch_size=256, seq_len=4, seed=0)
    assert set(b.next_offsets().tolist()) == {0, 1}      # L - S - 1 = 1


def test_batches_deterministic_per_seed_and_differ_across_seeds():
    def draw(seed):
        b = Batches(IDS, 8, 16, seed)
        return np.stack([b.next_offsets() for _ in range(3)])
    assert np.array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))
    # the stream is numpy's PCG64 seeded with [seed, 1]
    want = np.random.default_rng([1, 1]).integers(0, len(IDS) - 16, size=8, dtype=np.int64)
    assert Batches(IDS, 8, 16, 1).next_offsets().tolist() == want.tolist()


def test_state_resumes_the_exact_same_windows():
    a = Batches(IDS, 8, 16, seed=11)
    for _ in range(3):
        a.next_offsets()
    saved = json.loads(json.dumps(a.state()))       # must survive a JSON checkpoint
    expected = [a.next_offsets() for _ in range(5)]
    b = Batches(IDS, 8, 16, seed=999)
    b.set_state(saved)
    assert all(np.array_equal(b.next_offsets(), e) for e in expected)
    with pytest.raises(DataError, match="batch generator state is invalid"):
        b.set_state({"bit_generator": "MT19937"})


def test_batches_errors():
    with pytest.raises(DataError, match=r"training split has 16 characters; train.seq_len=16 needs at least 17"):
        Batches(np.zeros(16, np.int32), 2, 16, 0)
    Batches(np.zeros(17, np.int32), 2, 16, 0).next_batch()


# ---- validation batches ---------------------------------------------------------------

@pytest.mark.parametrize("L, B, S, n_batches", [
    (300, 4, 16, 5),     # 299 targets -> 19 windows (18 full + 11) -> 5 batches, 1 all-PAD window
    (257, 2, 64, 2),     # 256 targets -> exactly 4 full windows, no padding at all
    (2, 3, 5, 1),        # 1 target
])
def test_val_batches_cover_every_target_exactly_once(L, B, S, n_batches):
    ids = (np.arange(L, dtype=np.int32) * 13 + 5) % 97 + 1
    out = val_batches(ids, B, S)
    assert len(out) == n_batches
    assert all(x.shape == y.shape == (B, S) and x.dtype == y.dtype == np.int32 for x, y in out)
    ys = np.concatenate([y.reshape(-1) for _, y in out])
    xs = np.concatenate([x.reshape(-1) for x, _ in out])
    valid = ys != PAD
    assert valid.sum() == L - 1
    assert np.array_equal(ys[valid], ids[1:]) and np.array_equal(xs[valid], ids[:-1])
    assert np.all(xs[~valid] == 0)
    assert valid[:L - 1].all()                        # valid targets come first, in order


def test_val_batches_window_layout_and_all_pad_filler():
    ids = np.arange(1, 300, dtype=np.int32)       # L = 299, 298 targets, S = 16: 19 windows (18 full)
    out = val_batches(ids, 4, 16)
    x, y = out[1]                                 # windows 4..7
    assert x[0].tolist() == ids[64:80].tolist() and y[0].tolist() == ids[65:81].tolist()
    x, y = out[4]                                 # windows 16, 17, 18 (10 targets), 19 (all PAD)
    assert (y[2] != PAD).sum() == 298 - 18 * 16 == 10
    assert np.all(y[3] == PAD) and np.all(x[3] == 0)


def test_val_batches_max_batches():
    ids = np.arange(1, 1001, dtype=np.int32)
    out = val_batches(ids, 4, 16, max_batches=2)
    assert len(out) == 2
    assert sum(int((y != PAD).sum()) for _, y in out) == 2 * 4 * 16
    assert np.array_equal(out[1][1][-1], ids[113:129])
    assert len(val_batches(ids, 4, 16, max_batches=99)) == 16   # ceil(ceil(999/16)/4) = 16


def test_val_batches_too_short():
    with pytest.raises(DataError, match="validation split needs at least 2 characters, got 1"):
        val_batches(np.array([3], np.int32), 2, 4)
