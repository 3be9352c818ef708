"""Sentence-embedding regression: the task the lattice (and its linear baselines) is trained and
judged on (docs/lattice.md).

The data are the corpus's sentences (engine/sentences.py: split_sentences, then a seeded split
of the sentences into train/validation/test by lattice.split_seed, the same for every run seed)
and their embeddings by the frozen teacher all-MiniLM-L6-v2 (engine/teacher.py: computed once
per sentence and model, in a subprocess, and cached on disk; the default corpus's ship with the
package). The student reads the teacher's embedding t and must give it back through its
bottleneck: input x = t, target y = t, both (N, 384) float32 rows (S = 1: one sentence a row).

Loss (engine/layers/embed_head.py), per sentence: lattice.loss_mse · mean_d (z_d − t_d)² +
lattice.loss_cos · (1 − cos(z, t)), the mean over the batch, plus lattice.loss_div · the batch's
mean squared cosine between different rows (training only).

Evaluation over every sentence of a split, in fixed batches (the last padded and the padding
dropped), metrics in float64 on the host from the student's outputs:
  <split>_loss   the head's loss without the diversity term, mean over sentences
  <split>_cos    mean cosine(student, teacher)
  <split>_mse    squared error per dimension: mean over the split's sentences and the 384 dimensions
                 (the teacher's vectors are unit-norm, so predicting 0 gives 1/384 = 0.0026)
  <split>_r1/r5  retrieval@1/@5: the student's output, compared by cosine with the teacher
                 embeddings of every sentence of the split, has its own sentence's first / in the 5 nearest
  <split>_specialisation   the lattice's cells (engine/layers/lattice.py): 1 − the mean |correlation|
                 across the evaluation's first batch of sentences between the cells' final state norms
                 (0: every cell responds to the sentences alike; 1: unrelated responses)
Baselines on the same split and bottleneck, closed form, logged with every run (`baselines`): PCA to
n² = lattice.n² dimensions fitted on the training sentences (mean-centred; the linear optimum of
the MSE), and the mean training vector.
Letters: B batch, D = 384 the teacher's width, F = n² the face.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from .. import ops
from ..data import DataError, load_text, text_digest
from ..models import LayerDecl
from ..models.lattice import TEACHER_DIM

D = TEACHER_DIM


def batch_buffers(B: int, S: int) -> dict:
    """x, y: (B·S, 384) float32 (the teacher's embeddings: input and target); offsets: (B,) the
    batch's training-sentence indices."""
    N = B * S
    return {"x": ((N, D), np.float32), "y": ((N, D), np.float32), "offsets": ((B,), np.int32)}


def head_layers(cfg, V: int) -> list:
    lc = cfg.lattice
    return [LayerDecl("embed_head", "head", "", dict(D=D, w_mse=lc.loss_mse, w_cos=lc.loss_cos, w_div=lc.loss_div))]


class SentenceSplit:
    """What a checkpoint keeps of the data in place of a vocabulary: the split's sizes and the
    digest of its sentences (a resumed run must see the same split). size: the output width."""
    size = D

    def __init__(self, train, val, test):
        h = hashlib.sha256()
        for part in (train, val, test):
            h.update(b"\x00split\x00")
            for s in part:
                h.update(s.encode("utf-8") + b"\n")
        self.counts = [len(train), len(val), len(test)]
        self.digest = h.hexdigest()

    def to_json(self) -> str:
        return json.dumps({"task": "embed_regression", "sentences": self.counts, "sha256": self.digest})


class SentenceBatches:
    """Training batches of B sentence indices: epoch e is the permutation default_rng([seed, 1, e])
    of the training sentences, batches read that stream in order (an epoch's tail continues into
    the next). State: the batch counter, so a resumed run draws exactly what the whole run would."""

    def __init__(self, n: int, B: int, seed: int):
        self.n, self.B, self.seed, self.k = n, B, seed, 0
        self._epoch, self._perm = -1, None

    def _order(self, e: int) -> np.ndarray:
        if e != self._epoch:
            self._epoch, self._perm = e, np.random.default_rng([self.seed, 1, e]).permutation(self.n)
        return self._perm

    def next_indices(self) -> np.ndarray:
        start = self.k * self.B
        out = np.empty(self.B, np.int32)
        for j in range(self.B):
            e, i = divmod(start + j, self.n)
            out[j] = self._order(e)[i]
        self.k += 1
        return out

    def state(self) -> dict:
        return {"batch": self.k}

    def set_state(self, st: dict):
        self.k = int(st["batch"])


def pca_fit(X: np.ndarray, k: int):
    """(mean, components (k', D)) of the training rows, k' = min(k, D, rows): the top principal axes."""
    mu = X.mean(axis=0)
    _, _, vt = np.linalg.svd(X - mu, full_matrices=False)
    return mu, vt[:min(k, vt.shape[0])]


def pca_reconstruct(X: np.ndarray, mu, comps) -> np.ndarray:
    return mu + ((X - mu) @ comps.T) @ comps


def regression_metrics(Z: np.ndarray, Y: np.ndarray, w_mse: float, w_cos: float, prefix: str) -> dict:
    """The task's metrics of outputs Z against targets Y (rows: sentences), float64."""
    Z, Y = np.asarray(Z, np.float64), np.asarray(Y, np.float64)
    nz, ny = np.linalg.norm(Z, axis=1), np.linalg.norm(Y, axis=1)
    cos = (Z * Y).sum(axis=1) / np.maximum(nz * ny, 1e-8)
    mse = ((Z - Y) ** 2).mean(axis=1)
    sim = (Z / np.maximum(nz, 1e-12)[:, None]) @ (Y / np.maximum(ny, 1e-12)[:, None]).T
    own = np.diag(sim)
    rank = (sim > own[:, None]).sum(axis=1)   # sentences strictly nearer than its own (ties count for it)
    return {f"{prefix}_loss": float(np.mean(w_mse * mse + w_cos * (1.0 - cos))), f"{prefix}_cos": float(cos.mean()),
            f"{prefix}_mse": float(mse.mean()), f"{prefix}_r1": float(np.mean(rank < 1)),
            f"{prefix}_r5": float(np.mean(rank < 5))}


def specialisation(states: np.ndarray) -> float:
    """1 − mean |corr| over pairs of cells of their final-state norms across the rows (sentences).
    states: (N, cells, C). Cells whose norm does not vary across the rows are left out; NaN if
    fewer than 2 vary (or fewer than 3 rows)."""
    a = np.linalg.norm(np.asarray(states, np.float64), axis=2)        # (N, cells)
    if a.shape[0] < 3:
        return float("nan")
    scale = max(float(np.abs(a).max()), 1e-30)
    a = a - a.mean(axis=0)
    sd = np.sqrt((a ** 2).mean(axis=0))
    keep = sd > 1e-7 * scale   # a cell whose norm varies by less than rounding is constant
    if keep.sum() < 2:
        return float("nan")
    a = a[:, keep] / sd[keep]
    corr = (a.T @ a) / a.shape[0]
    m = corr.shape[0]
    off = (np.abs(corr).sum() - np.abs(np.diag(corr)).sum()) / (m * (m - 1))
    return float(1.0 - off)


class EmbedRegression:
    """The sentences, their teacher embeddings, batches and evaluation of one run (nothing on the
    device until to_device)."""

    def __init__(self, cfg, vocab_json: str | None = None):
        from ..sentences import split_sentence_set, split_sentences
        from ..teacher import TeacherError, embed
        self.cfg = cfg
        lc, dc = cfg.lattice, cfg.data
        text = load_text(dc.path)
        where = f"data.path {dc.path!r}" if dc.path else "the default corpus"
        sentences = split_sentences(text)
        if not sentences:
            raise DataError(f"{where} has no sentences of 5-25 words (engine/sentences.py)")
        self.train_s, self.val_s, self.test_s = split_sentence_set(sentences, dc.val_fraction, dc.test_fraction,
                                                                   lc.split_seed)
        self.vocab = SentenceSplit(self.train_s, self.val_s, self.test_s)
        if vocab_json is not None:
            saved = json.loads(vocab_json)
            if saved.get("sha256") != self.vocab.digest:
                raise DataError(f"{where} gives another sentence split than the checkpoint's "
                                f"({self.vocab.counts} sentences now, {saved.get('sentences')} then)")
        try:
            E = embed(self.train_s + self.val_s + self.test_s, cap_mb=lc.cache_mb)
        except TeacherError as exc:
            raise DataError(str(exc)) from None
        E = np.ascontiguousarray(E, np.float32)
        n1, n2 = len(self.train_s), len(self.train_s) + len(self.val_s)
        self.train_y, self.val_y, self.test_y = E[:n1], E[n1:n2], E[n2:]
        self.train_ids = np.arange(n1, dtype=np.int32)   # the harness's "training items" (sentence indices)
        self.val_ids = np.arange(len(self.val_s), dtype=np.int32)
        self.n_chars = len(text)
        self.data_sha256 = text_digest(dc.path, text)
        self.batches = SentenceBatches(n1, cfg.train.batch_size, cfg.seed)
        self.X_dev = None
        self.last_outputs: dict = {}   # split -> the student's outputs of the last evaluation (host)
        self.last_states = None        # the lattice's states of the last evaluation's first batch
        self.baselines = self._baselines()

    def profile(self) -> dict:
        """The dataset's profile for MLflow (experiments.tracking.log_dataset)."""
        return {"characters": self.n_chars, "sentences": sum(self.vocab.counts), "train_sentences": self.vocab.counts[0],
                "val_sentences": self.vocab.counts[1], "test_sentences": self.vocab.counts[2], "teacher_dim": D}

    def _baselines(self) -> dict:
        """PCA to the face size and the mean vector on this split (closed form), as metrics."""
        lc = self.cfg.lattice
        out = {}
        mu, comps = pca_fit(self.train_y.astype(np.float64), lc.n * lc.n)
        for split, Y in (("val", self.val_y), ("test", self.test_y)):
            if len(Y):
                out.update(regression_metrics(pca_reconstruct(Y.astype(np.float64), mu, comps), Y, lc.loss_mse,
                                              lc.loss_cos, f"pca_{split}"))
                out.update(regression_metrics(np.broadcast_to(mu, Y.shape), Y, lc.loss_mse, lc.loss_cos,
                                              f"mean_{split}"))
        return out

    @property
    def output_size(self) -> int:   # what the model's input and output maps are sized by
        return D

    def device_buffers(self) -> dict:
        return {"train.embeddings": (self.train_y.shape, np.float32)}

    def to_device(self, dev):
        self.X_dev = dev.to_device(self.train_y)

    # -- batches ----------------------------------------------------------------------
    def next_batch(self, dev, ws):
        """The next B training sentences' embeddings into ws.x and ws.y (gathered on the device)."""
        ws.offsets.set(self.batches.next_indices())
        ops.embedding_forward(dev, self.X_dev, ws.offsets, ws.x, ws.B, D)
        dev.cl.enqueue_copy(dev.queue, ws.y.data, ws.x.data)

    def state(self) -> dict:
        return {"vocab": self.vocab.to_json(), "batches": self.batches.state()}

    def set_state(self, meta: dict):
        self.batches.set_state(meta["batches"])

    # -- evaluation ----------------------------------------------------------------------
    @property
    def has_test(self) -> bool:
        return len(self.test_y) > 0

    def outputs(self, model, ws, Y: np.ndarray, keep_states: bool = False) -> np.ndarray:
        """The student's outputs (n, 384) for the rows of Y, in evaluation mode, B rows a pass
        (the last pass padded with copies of the first row, dropped)."""
        B = ws.B
        out = np.empty((len(Y), D), np.float32)
        lattice = next((layer for layer in model.layers if layer.kind == "lattice"), None)
        for i in range(0, len(Y), B):
            chunk = Y[i:i + B]
            n = len(chunk)
            if n < B:
                chunk = np.concatenate([chunk, np.repeat(Y[:1], B - n, axis=0)])
            chunk = np.ascontiguousarray(chunk, np.float32)
            ws.x.set(chunk)
            ws.y.set(chunk)
            model.forward(ws, training=False)
            out[i:i + n] = model.layers[-1].outputs(ws.ctx[ws.head]).get()[:n]
            if keep_states and i == 0 and lattice is not None:
                self.last_states = lattice.states(ws.ctx[lattice.name])[:n]
        return out

    def evaluate(self, model, ws, split: str = "val") -> tuple[dict, None]:
        """({<split>_loss, _cos, _mse, _r1, _r5, _specialisation}, None) over every sentence of the split."""
        lc = self.cfg.lattice
        Y = self.val_y if split == "val" else self.test_y
        Z = self.outputs(model, ws, Y, keep_states=True)
        self.last_outputs[split] = Z
        metrics = regression_metrics(Z, Y, lc.loss_mse, lc.loss_cos, split)
        if self.last_states is not None:
            metrics[f"{split}_specialisation"] = specialisation(self.last_states[:, -1].reshape(
                len(self.last_states), -1, self.last_states.shape[-1]))
        return metrics, None

    # -- artifacts ---------------------------------------------------------------------------
    def decoding(self, split: str = "test", k: int = 10) -> str:
        """The design's decoding check, as text: for the first k sentences of the split, the
        split's sentence whose teacher embedding is nearest (cosine) to the student's output."""
        Y = self.test_y if split == "test" else self.val_y
        S = self.test_s if split == "test" else self.val_s
        Z = self.last_outputs.get(split)
        if Z is None or not len(Y):
            return ""
        Zn = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        Yn = Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)
        sim = Zn.astype(np.float64) @ Yn.T.astype(np.float64)
        lines = [f"# nearest {split} sentence (teacher embedding, cosine) to the student's output; "
                 f"{len(Y)} candidates", ""]
        for i in range(min(k, len(Y))):
            j = int(np.argmax(sim[i]))
            mark = "own sentence" if j == i else f"another sentence (own ranks {int((sim[i] > sim[i, i]).sum()) + 1})"
            lines += [f"[{i}] {S[i]}", f"  -> {S[j]}", f"     cos {sim[i, j]:.4f}, {mark}; cos to own {sim[i, i]:.4f}",
                      ""]
        return "\n".join(lines)

    def artifacts(self, history: list) -> dict:
        """{path: bytes or text} written at the end of a run: the decoding check, the cosine and
        MSE curves, the state norm per step and a slice of the lattice's cells for one sentence."""
        out = {}
        text = self.decoding("test") or self.decoding("val")
        if text:
            out["decoding/nearest_sentences.txt"] = text
        evals = [r for r in history if "val_cos" in r]
        if evals:
            out["embedding_curves.png"] = self._curves_png(evals)
        if self.last_states is not None:
            out["lattice/state_norm_per_step.png"] = self._state_norm_png(self.last_states)
            out["lattice/cells_slice.png"] = self._slice_png(self.last_states[0])
            out["lattice/state_norm_per_step.json"] = json.dumps(
                {"step_rms": [float(np.sqrt(np.mean(self.last_states[:, t].astype(np.float64) ** 2)))
                              for t in range(self.last_states.shape[1])]})
        return out

    @staticmethod
    def _png(fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return buf.getvalue()

    def _curves_png(self, evals) -> bytes:
        from matplotlib.figure import Figure
        steps = [r["step"] for r in evals]
        fig = Figure(figsize=(9, 3.4))
        ax = fig.add_axes((0.07, 0.15, 0.38, 0.75))
        ax.plot(steps, [r["val_cos"] for r in evals], "o-", label="student (validation)")
        for key, style, label in (("pca_val_cos", "--", "PCA to the face"), ("mean_val_cos", ":", "mean vector")):
            if key in self.baselines:
                ax.axhline(self.baselines[key], ls=style, color="grey", label=label)
        ax.axhline(0.9, ls="-.", color="C3", lw=0.8, label="design target 0.9")
        ax.set_xlabel("step")
        ax.set_ylabel("mean cosine to the teacher")
        ax.legend(fontsize=7)
        bx = fig.add_axes((0.57, 0.15, 0.38, 0.75))
        bx.plot(steps, [r["val_mse"] for r in evals], "o-", label="student (validation)")
        if "pca_val_mse" in self.baselines:
            bx.axhline(self.baselines["pca_val_mse"], ls="--", color="grey", label="PCA to the face")
        bx.set_yscale("log")
        bx.set_xlabel("step")
        bx.set_ylabel("MSE per dimension")
        bx.legend(fontsize=7)
        return self._png(fig)

    def _state_norm_png(self, states) -> bytes:
        from matplotlib.figure import Figure
        rms = np.sqrt(np.mean(states.astype(np.float64) ** 2, axis=(0, 2, 3, 4, 5)))
        fig = Figure(figsize=(5, 3.2))
        ax = fig.add_axes((0.14, 0.16, 0.8, 0.74))
        ax.plot(np.arange(len(rms)), rms, "o-")
        ax.set_xlabel("cell update step t")
        ax.set_ylabel("RMS of the cell states")
        ax.set_title("state norm per step (collapse or explosion)", fontsize=9)
        return self._png(fig)

    def _slice_png(self, s) -> bytes:
        """s: (K+1, D, n, n, C) of one sentence: the x-z slice at y = n/2 of the cells' state
        norm after the last step, and the back face."""
        from matplotlib.figure import Figure
        last = np.linalg.norm(s[-1].astype(np.float64), axis=-1)          # (D, n, n)
        fig = Figure(figsize=(8, 3.4))
        ax = fig.add_axes((0.06, 0.14, 0.38, 0.74))
        im = ax.imshow(last[:, last.shape[1] // 2, :], aspect="auto", origin="lower", cmap="viridis")
        ax.set_xlabel("x")
        ax.set_ylabel("z (0 = front face)")
        ax.set_title("|state| at y = n/2 after the last step", fontsize=9)
        fig.colorbar(im, ax=ax)
        bx = fig.add_axes((0.55, 0.14, 0.38, 0.74))
        im2 = bx.imshow(last[-1], origin="lower", cmap="viridis")
        bx.set_title("back face |state|", fontsize=9)
        fig.colorbar(im2, ax=bx)
        return self._png(fig)
