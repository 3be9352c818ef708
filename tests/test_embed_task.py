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


# -- on the device: the lattice trained on the task ------------------------------------------------
SMOKE = ["train.steps=12", "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=3"]


def _cfg(*extra, name="lattice_smoke"):
    return apply_overrides(presets.get(name).config(), [*SMOKE, *extra])


def _losses(summary):
    return [(r["step"], r["train_loss"], r["val_loss"], r["val_cos"]) for r in summary["history"]]


@pytest.mark.opencl
def test_lattice_training_is_deterministic_and_resumes_bit_for_bit(dev, tmp_path):
    from engine.train import Trainer
    cfg = _cfg("optim.schedule=constant")   # a 6-step run then has the 12-step run's learning rates
    whole = Trainer(cfg, str(tmp_path / "a"), device=dev).train()
    again = Trainer(cfg, device=dev).train()
    assert _losses(whole) == _losses(again)                     # bit-identical, not approximately
    assert whole["test"]["test_cos"] == again["test"]["test_cos"]
    half = Trainer(apply_overrides(cfg, ["train.steps=6"]), str(tmp_path / "b"), device=dev).train()
    resumed = Trainer(cfg, str(tmp_path / "b"), resume=half["checkpoint"], device=dev).train()
    assert _losses(resumed) == _losses(whole)
    assert resumed["test"] == whole["test"]
    first, last = whole["history"][0], whole["history"][-1]
    assert last["val_loss"] < first["val_loss"]                  # it learns something in 12 steps


@pytest.mark.opencl
def test_the_device_head_loss_is_the_task_metric(dev):
    """The head's loss on an evaluation batch (kernels) equals the task's val_loss formula (host,
    float64) on the same outputs: the metric reported is the loss trained."""
    from engine.train import Trainer
    tr = Trainer(_cfg(), device=dev)
    data, ws, m = tr.data, tr.ws, tr.model
    Y = data.val_y[:ws.B]
    Z = data.outputs(m, ws, Y)            # the last forward is exactly these B rows
    head = ws.buf[ws.head]
    mean_loss, sum_cos = head.loss_out.get()[:2]
    ref = regression_metrics(Z, Y, 1.0, 0.5, "val")
    assert mean_loss == pytest.approx(ref["val_loss"], rel=2e-6)        # float32 reductions
    assert sum_cos / ws.B == pytest.approx(ref["val_cos"], rel=2e-6)
    np.testing.assert_allclose(head.rows_cos.get(), [float(z @ y / np.linalg.norm(z) / np.linalg.norm(y))
                                                     for z, y in zip(Z.astype(np.float64), Y.astype(np.float64))],
                               atol=2e-6)


@pytest.mark.opencl
def test_the_baselines_are_pca_and_the_mean_on_the_runs_split(dev):
    from engine.train import Trainer
    tr = Trainer(_cfg(), device=dev)
    d = tr.data
    X = d.train_y.astype(np.float64)
    mu = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mu, full_matrices=False)
    W = vt[:16]                                                  # lattice_smoke: n = 4, a face of 16
    rec = mu + (d.test_y - mu) @ W.T @ W
    assert d.baselines["pca_test_cos"] == pytest.approx(regression_metrics(rec, d.test_y, 1, 0.5, "t")["t_cos"],
                                                        abs=1e-9)
    assert d.baselines["mean_test_cos"] < d.baselines["pca_test_cos"] < 1.0
    assert len(d.train_s) + len(d.val_s) + len(d.test_s) == sum(d.vocab.counts)
    assert not set(d.train_s) & set(d.test_s) and not set(d.val_s) & set(d.test_s)
    assert len(d.test_s) == pytest.approx(0.1 * sum(d.vocab.counts), abs=1)


@pytest.mark.opencl
def test_three_experts_and_the_gate_train_with_their_own_rates(dev):
    from engine.train import Trainer
    cfg = _cfg("lattice.experts=local+functional+distant", "lattice.lr_functional=0", "lattice.lr_gate=0.006")
    tr = Trainer(cfg, device=dev)
    before = tr.model.get_params()
    summary = tr.train()
    after = tr.model.get_params()
    moved = {k: not np.array_equal(before[k], after[k]) for k in before}
    assert not moved["lat.Wq"] and not moved["lat.Wk"] and not moved["lat.Wv"]   # lr_functional = 0
    assert moved["lat.Wg"] and moved["lat.W1"] and moved["lat.W1d"] and moved["face_in.W"]
    tel = tr.model.telemetry(tr.ws)
    gates = [tel[f"lattice/gate/{e}"] for e in ("local", "distant", "functional")]
    assert sum(gates) == pytest.approx(1.0, abs=1e-5) and min(gates) > 0   # a softmax over the three
    scale = tr.model.layout.lr_mask()
    assert sorted(set(np.round(scale, 6))) == [0.0, 1.0, 2.0]
    assert summary["history"][-1]["val_cos"] > 0


def _run(module, *args, cwd):
    import subprocess
    import sys
    from pathlib import Path
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.opencl
def test_experiment_logs_metrics_baselines_and_the_decoding_check(tmp_path):
    r = _run("experiments.run", "lattice_smoke", "--set", "train.steps=10", "--set", "train.eval_every=5",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip().splitlines()[-1]
    assert "test_cos" in r.stderr and "sent/s" in r.stderr
    from mlflow.tracking import MlflowClient
    cl = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = cl.get_run(run_id)
    m = run.data.metrics
    for key in ("val_cos", "val_mse", "val_r1", "val_r5", "test_cos", "test_r1", "pca_test_cos", "mean_test_cos",
                "lattice/state_norm/t0", "lattice/state_norm/t4", "val_specialisation"):
        assert key in m, key
    assert 0 < m["test_cos"] < 1 and 0 <= m["test_r1"] <= m["test_r5"] <= 1
    art = tmp_path / "mlruns"
    text = next(art.rglob("nearest_sentences.txt")).read_text()
    assert text.count("\n  -> ") == 10 and "cos to own" in text
    norms = json.loads(next(art.rglob("state_norm_per_step.json")).read_text())["step_rms"]
    assert len(norms) == 5 and all(v > 0 for v in norms)        # K = 4 steps: s_0 .. s_4
    for name in ("embedding_curves.png", "cells_slice.png", "state_norm_per_step.png"):
        assert next(art.rglob(name)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _run("experiments.reproduce", run_id, cwd=tmp_path)
    assert r.returncode == 0 and "MATCH" in r.stdout, r.stdout + r.stderr


@pytest.mark.opencl
def test_a_text_without_sentences_is_one_line_and_creates_nothing(tmp_path):
    bad = tmp_path / "code.txt"
    bad.write_text("x = 1\nfor i in range(3):\n    print(i)\n")
    r = _run("experiments.run", "lattice_smoke", "--set", f"data.path={bad}", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "sentences" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.txt"]
