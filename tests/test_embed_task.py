"""The sentence-embedding task (engine/tasks/embed_regression.py): its metrics, baselines, batches,
and the lattice family trained end to end on it (deterministic, resumable, tracked).

    python -m pytest tests/test_embed_task.py -q
"""
import json

import numpy as np
import pytest

from engine.config import apply_overrides
from engine.tasks import EMBED, task_of
from engine.tasks.embed_regression import (SentenceBatches, pca_fit, pca_reconstruct, regression_metrics,
                                           specialisation)
from experiments import presets


def _unit(rng, n, d=384):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_metrics_by_hand():
    Y = np.eye(3, 4)                                  # three unit targets
    Z = np.array([[2.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0]])   # right, the third's, the second's
    m = regression_metrics(Z, Y, 1.0, 0.5, "val")
    cos = np.array([1.0, 0.0, 0.0])
    mse = np.array([1 / 4, 2 / 4, 2 / 4])
    assert m["val_cos"] == pytest.approx(cos.mean(), abs=1e-15)
    assert m["val_mse"] == pytest.approx(mse.mean(), abs=1e-15)
    assert m["val_loss"] == pytest.approx(np.mean(mse + 0.5 * (1 - cos)), abs=1e-15)
    assert m["val_r1"] == pytest.approx(1 / 3) and m["val_r5"] == 1.0   # only the first finds its own


def test_retrieval_ranks_among_the_whole_split():
    rng = np.random.default_rng(0)
    Y = _unit(rng, 50)
    Z = np.roll(Y, 1, axis=0)                          # each output is the previous sentence's target
    m = regression_metrics(Z, Y, 1.0, 0.5, "test")
    # the nearest target is always the previous sentence's; its own is one of 49 others near cos 0
    assert m["test_r1"] == 0.0 and m["test_r5"] <= 0.2 and m["test_cos"] < 0.2
    m = regression_metrics(Y + 0.003 * rng.standard_normal(Y.shape), Y, 1.0, 0.5, "test")   # noise norm ~0.06
    assert m["test_r1"] == 1.0 and m["test_cos"] > 0.99


def test_pca_is_exact_at_full_rank_and_the_linear_optimum_below():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    mu, comps = pca_fit(X, 12)
    np.testing.assert_allclose(pca_reconstruct(X, mu, comps), X, atol=1e-10)   # every axis kept
    mu, comps = pca_fit(X, 4)
    err = ((pca_reconstruct(X, mu, comps) - X) ** 2).sum()
    q, _ = np.linalg.qr(rng.standard_normal((12, 4)))   # any other rank-4 projection does worse
    other = ((mu + (X - mu) @ q @ q.T - X) ** 2).sum()
    assert err < other


def test_specialisation_of_alike_and_unrelated_cells():
    rng = np.random.default_rng(2)
    base = rng.random(40) + 0.5
    alike = np.stack([base * (k + 1) for k in range(6)], axis=1)[:, :, None]   # (N, cells, 1): proportional
    assert specialisation(alike) == pytest.approx(0.0, abs=1e-12)
    unrelated = rng.random((4000, 6, 3))
    assert specialisation(unrelated) > 0.95
    constant = np.ones((10, 5, 2))
    assert np.isnan(specialisation(constant))


def test_batches_are_epochs_of_a_seeded_permutation_and_resume_exactly():
    a = SentenceBatches(10, 4, seed=3)
    first = np.concatenate([a.next_indices() for _ in range(5)])     # 20 = two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    b = SentenceBatches(10, 4, seed=3)
    b.next_indices()
    st = b.state()
    c = SentenceBatches(10, 4, seed=3)
    c.set_state(json.loads(json.dumps(st)))
    np.testing.assert_array_equal(np.concatenate([c.next_indices() for _ in range(4)]), first[4:])
    assert not np.array_equal(SentenceBatches(10, 4, seed=4).next_indices(), first[:4])


def test_the_lattice_families_train_the_embedding_task():
    for name in ("lattice", "lattice_moe", "lattice_no_steps", "lattice_37", "linear_ae"):
        assert task_of(presets.get(name).config()) is EMBED
    assert task_of(apply_overrides(presets.get("hybrid").config(), [])).name == "char_lm"
