"""engine/baseline.py: count-based character n-gram baselines (numpy only, fast).

    python -m pytest tests/test_baseline.py -q
"""
import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from engine.baseline import NGramModel, main, ngram_val_loss, run
from engine.data import DataError, Vocab, split_text


def test_bigram_loss_matches_hand_computation():
    vocab = Vocab.from_text("abcab")            # a=1 b=2 c=3, V=4 with UNK
    V, alpha = vocab.size, 0.5
    assert V == 4
    train, val = vocab.encode("abcab"), vocab.encode("abca")
    # bigram counts: ab x2, bc, ca  ->  C(a)=2, C(b)=1, C(c)=1
    want = -(math.log((2 + .5) / (2 + 4 * .5))      # b | a
             + math.log((1 + .5) / (1 + 4 * .5))    # c | b
             + math.log((1 + .5) / (1 + 4 * .5))) / 3   # a | c
    assert ngram_val_loss(train, val, V, 2, alpha) == pytest.approx(want, rel=1e-12)


def test_unigram_loss_matches_hand_computation():
    vocab = Vocab.from_text("aab")
    train, val = vocab.encode("aab"), vocab.encode("xab")      # x -> UNK, not a target
    # p(a) = (2 + 1) / (3 + 3), p(b) = (1 + 1) / (3 + 3)
    want = -(math.log(3 / 6) + math.log(2 / 6)) / 2
    assert ngram_val_loss(train, val, vocab.size, 1, 1.0) == pytest.approx(want, rel=1e-12)


def test_unk_target_and_unseen_context_back_off_to_unigram():
    vocab = Vocab.from_text("abcab")
    train = vocab.encode("abcab")
    val = np.array([1, 0, 2], dtype=np.int32)                   # a, UNK, b
    a = 0.5
    want = -(math.log(a / (2 + 4 * a))                           # UNK | a: alpha share only
             + math.log((2 + a) / (5 + 4 * a))) / 2              # b | UNK: unseen -> unigram
    assert ngram_val_loss(train, val, 4, 2, a) == pytest.approx(want, rel=1e-12)
    s = NGramModel(train, 4, 2, a).val_stats(val)
    assert s["targets"] == 2 and s["backoff_targets"] == 1


def _reference_loss(train, val, V, order, alpha):
    """Dictionary-based reference of the documented model (backoff on unseen contexts)."""
    train, val = list(map(int, train)), list(map(int, val))
    counts = {n: Counter(tuple(train[i:i + n]) for i in range(len(train) - n + 1))
              for n in range(1, order + 1)}
    ctx = {n: Counter() for n in range(1, order + 1)}
    for n in range(1, order + 1):
        for g, c in counts[n].items():
            ctx[n][g[:-1]] += c

    def p(hist, c):
        for n in range(min(order, len(hist) + 1), 0, -1):
            h = tuple(hist[len(hist) - (n - 1):]) if n > 1 else ()
            if ctx[n][h] > 0:
                return (counts[n][h + (c,)] + alpha) / (ctx[n][h] + alpha * V)
        raise AssertionError("unigram context is never empty")

    nll = [-math.log(p(val[max(0, i - order + 2):i + 1], val[i + 1])) for i in range(len(val) - 1)]
    return sum(nll) / len(nll)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_matches_reference_on_random_text(order):
    rng = np.random.default_rng(order)
    V = 6
    train = rng.integers(1, V, size=300)               # no UNK in training, like Vocab
    val = rng.integers(0, V, size=80)                  # some UNK in validation
    train[:50] = np.tile([1, 2, 3, 4, 5], 10)          # some repeated structure
    for alpha in (0.01, 1.0):
        got = ngram_val_loss(train, val, V, order, alpha)
        assert got == pytest.approx(_reference_loss(train, val, V, order, alpha), rel=1e-10)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_distributions_sum_to_one_over_V(order):
    rng = np.random.default_rng(7)
    V = 5
    train = rng.integers(1, V, size=200)
    m = NGramModel(train, V, order, 0.01)
    hists = [[]] + [[a] for a in range(V)] + [list(h) for h in itertools.product(range(V), repeat=2)]
    for h in hists:
        d = m.distribution(h)
        assert d.shape == (V,)
        assert np.all(d > 0)
        assert d.sum() == pytest.approx(1.0, abs=1e-12)


def test_structured_text_orders_improve():
    text = "the cat sat on the mat. " * 40 + "a dog sat on a log. " * 40
    train, val = split_text(text, 0.2)
    vocab = Vocab.from_text(train)
    tr, va = vocab.encode(train), vocab.encode(val)
    uni, bi, tri = (ngram_val_loss(tr, va, vocab.size, n, 0.01) for n in (1, 2, 3))
    assert uni >= bi >= tri
    assert uni - bi > 0.5


def test_periodic_text_bigram_near_zero():
    vocab = Vocab.from_text("abc")
    tr, va = vocab.encode("abc" * 200), vocab.encode("abc" * 20)
    uni = ngram_val_loss(tr, va, vocab.size, 1, 0.01)
    bi = ngram_val_loss(tr, va, vocab.size, 2, 0.01)
    assert uni == pytest.approx(math.log(3), abs=1e-3)
    assert bi < 1e-3 < uni


def test_trigram_first_target_uses_bigram():
    vocab = Vocab.from_text("abcab")
    train = vocab.encode("abcab")
    val = vocab.encode("ab")                 # one target: only one id of history
    assert ngram_val_loss(train, val, 4, 3, 0.5) == pytest.approx(ngram_val_loss(train, val, 4, 2, 0.5))
    assert NGramModel(train, 4, 3, 0.5).val_stats(val)["backoff_targets"] == 1


def test_bad_arguments():
    with pytest.raises(DataError):
        NGramModel(np.array([1, 2]), 3, 4, 0.01)
    with pytest.raises(DataError):
        NGramModel(np.array([1, 2]), 3, 2, 0.0)
    with pytest.raises(DataError):
        NGramModel(np.array([1, 5]), 3, 2, 0.01)
    with pytest.raises(DataError):
        ngram_val_loss(np.array([1, 2]), np.array([1]), 3, 2, 0.01)


def test_run_and_cli_use_engine_split(tmp_path, capsys):
    text = "hello world, hello there. " * 30 + "zq"
    p = tmp_path / "t.txt"
    p.write_bytes(text.encode("utf-8"))
    train, val = split_text(text, 0.1)
    vocab = Vocab.from_text(train)
    want = ngram_val_loss(vocab.encode(train), vocab.encode(val), vocab.size, 2, 0.01)
    (r,) = run(str(p), 0.1, [2], 0.01)
    assert r["val_loss_nats"] == pytest.approx(want, abs=1e-6)
    assert r["val_targets"] == len(val) - 1 and r["V"] == vocab.size
    assert r["val_unk_targets"] == 2                     # 'z' and 'q' are unseen in training
    assert main(["--data", str(p), "--order", "all"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(x) for x in lines]
    assert [x["order"] for x in rows] == [1, 2, 3]
    assert rows[1]["val_loss_nats"] == r["val_loss_nats"]
    assert rows[0]["val_bits_per_char"] == pytest.approx(rows[0]["val_loss_nats"] / math.log(2), abs=1e-5)
    assert main(["--data", str(tmp_path / "missing.txt")]) == 2
