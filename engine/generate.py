"""Generate text from a checkpoint, one character at a time on the device.

    python -m engine.generate --checkpoint runs/demo/checkpoint.npz --prompt "The " --length 200 --temperature 0.8

The fast-weight memory is carried from character to character as the matrix
Aᵀ (H,H): m_t = A_{t−1}·k_t, then A_t = λ·A_{t−1} + η·post_t ⊗ k_t — the
recurrent form of the causal sum the training pass computes for a whole
sequence at once (docs/model.md), so the prompt's context reaches every
generated character. Each character is one launch of the fused kernel
`generate_step` (kernels/generate.cl) and one read of its logits. Sampling
(temperature, top-k) is on the host with a seeded numpy generator: the same
seed gives the same text on one device. Bad arguments, a missing or corrupt
checkpoint and a model too large for the device are one-line errors (exit 2).
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from . import ops
from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError
from .data import Vocab
from .device import Device, DeviceError
from .model import Model, device_buffers


GEN_WG = 64  # work-group of the fused generation kernel (CPU variant: one work-group is one core)
GEN_WG_GPU = 256  # GPU variant: one item per column of H and Vp, tree sums (kernels/generate.cl)


def generation_wg(dev) -> int:
    """Work-group size of the fused kernel on dev: GEN_WG_GPU for the GPU variant, capped at the
    device's largest work-group (a power of two: the tree sums pair items l and l + WG/2)."""
    if dev.variant != "gpu":
        return GEN_WG
    cap = int(dev.device.max_work_group_size)
    return min(GEN_WG_GPU, 1 << (cap.bit_length() - 1))


class Generator:
    """Step-wise inference with carried state (B = S = 1).

    fused=True (default) runs each character as one `generate_step` launch
    (kernels/generate.cl); fused=False chains the training kernels, which is
    the reference the fused kernel is tested against."""

    def __init__(self, model: Model, vocab: Vocab, fused: bool | None = None):
        self.model, self.vocab, self.dev = model, vocab, model.dev
        cfg = model.cfg
        H = model.H
        # the carried-state paths know the one-layer hybrid with the sum rule; every other
        # character model runs the generic path (the window of the last seq_len characters)
        self.carried = carried_state_supported(cfg)
        self.fused = self.carried if fused is None else fused
        if self.fused and not self.carried:
            raise ValueError("the fused generation kernel covers the one-layer hybrid with the sum rule "
                             "and no norm (proto.mode off/shadow/feature)")
        self.window = cfg.train.seq_len
        self.history: list[int] = []
        self.fast = cfg.hebb.mode == "fast_weights" and self.carried
        self.At = self.dev.zeros((H, H)) if self.fast else None
        self._row = np.zeros((1, model.Vp), np.float32)  # W2 is stored with V padded to 8
        if self.carried:
            self.ws = model.workspace(1, 1)
        if self.fused:
            gpu = self.dev.variant == "gpu"
            self._wg = generation_wg(self.dev)
            # GPU: neighbouring items on neighbouring columns (no float8 columns), tree reductions
            defines = (("WG", self._wg), ("TREE", int(gpu)),
                       ("HEBB", {"modulate": 1, "fast_weights": 2}.get(cfg.hebb.mode, 0)),
                       ("PROTO", int(cfg.proto.mode == "feature")),
                       ("COSINE", int(cfg.proto.similarity == "cosine")),
                       ("VEC8", int(not gpu and model.E % 8 == 0 and H % 8 == 0)))   # float8 columns; Vp % 8 == 0
            self._kernel = self.dev.kernel("generate.cl", "generate_step_wg" if gpu else "generate_step", defines)
            self._scratch = self.dev.zeros((5 * H + model.E + self._wg + model.T,))
            self._logits = self.dev.zeros((model.Vp,))
            self._At = self.At if self.fast else self.dev.zeros((1,))

    def reset(self):
        self.history = []
        if self.fast:
            self.dev.cl.enqueue_fill_buffer(self.dev.queue, self.At.data, np.zeros(1, np.float32), 0, self.At.nbytes)

    def feed(self, token: int) -> np.ndarray:
        """Run one character through the model, update the memory, return its logits (V,)."""
        if self.fused:
            return self._feed_fused(token)
        if not self.carried:
            return self._feed_window(token)
        m, ws, dev = self.model, self.ws, self.dev
        ws.x.set(np.array([token], np.int32))
        m.forward(ws, fw_state=self.At, loss=False)
        if self.fast:  # Aᵀ ← λ·Aᵀ + η·k ⊗ post  (outer product as a K = 1 product)
            hc, c = m.cfg.hebb, ws.ctx["bio0"]
            ops.gemm(dev, c.b.k, c.post, self.At, m.H, m.H, 1, alpha=hc.lr, beta=1.0 - hc.decay, trans_a=True)
        ws.logits.get(ary=self._row)
        return self._row[0, :m.V]

    def _feed_window(self, token: int) -> np.ndarray:
        """Any character model: the forward pass over the last seq_len characters (one
        sequence, as in training, where every memory starts empty at a window's start),
        the logits of its last position."""
        m = self.model
        self.history = (self.history + [int(token)])[-self.window:]
        ws = m.workspace(1, len(self.history))
        ws.x.set(np.array(self.history, np.int32))
        m.forward(ws, loss=False)
        row = ws.logits.get()[-1]
        return row[:m.V]

    def _feed_fused(self, token: int) -> np.ndarray:
        m, cfg, p = self.model, self.model.cfg, self.model.p
        i32, f32 = np.int32, np.float32
        self.dev.launch(self._kernel, (self._wg,), (self._wg,),
                        i32(token), i32(m.E), i32(m.H), i32(m.T), i32(m.Vp),
                        p["W_emb"].data, p["W1"].data, p["b1"].data, p["W2"].data, p["b2"].data,
                        m.W_hebb.data, self._At.data, m.P.data,
                        f32(cfg.model.spike_threshold), i32(cfg.hebb.post == "activity"),
                        f32(cfg.hebb.strength), f32(cfg.hebb.lr), f32(1.0 - cfg.hebb.decay),
                        f32(cfg.proto.strength), self._scratch.data, self._logits.data)
        self._logits.get(ary=self._row.reshape(-1))
        return self._row[0, :m.V]

    def sample(self, prompt: str, length: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> str:
        rng = np.random.default_rng(seed)
        self.reset()
        ids = self.vocab.encode(prompt) if prompt else np.array([0], np.int32)
        for t in ids:
            logits = self.feed(int(t))
        out = []
        for _ in range(length):
            nxt = pick(logits, temperature, top_k, rng)
            out.append(nxt)
            logits = self.feed(nxt)
        return self.vocab.decode(np.array(out, np.int32))


def carried_state_supported(cfg) -> bool:
    """Whether the carried-state generation (fused kernel, or chained kernels with Aᵀ carried)
    computes this model: the one-layer hybrid with the sum rule, no norm, proto off/shadow/feature."""
    return (cfg.model.family == "hybrid" and cfg.model.num_layers == 1 and cfg.hebb.rule == "sum"
            and cfg.hebb.norm == "none" and cfg.proto.mode in ("off", "shadow", "feature"))


def pick(logits: np.ndarray, temperature: float, top_k: int, rng) -> int:
    """Sample an id from logits (V,): p ∝ exp((z − max z)/temperature) over the top_k largest
    logits (0 = all). temperature 0 = argmax. Subtracting the maximum first keeps every
    exponent ≤ 0, so a tiny temperature (even 1e-308) cannot overflow: it puts all the
    probability on the largest logit (shared equally among exact ties), i.e. greedy decoding."""
    z = logits.astype(np.float64)
    if temperature <= 0:
        return int(np.argmax(z))
    if 0 < top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    with np.errstate(over="ignore", under="ignore"):  # (z - max)/T -> -inf, exp -> 0: wanted
        p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def load_generator(path: str, device: str | None = None) -> Generator:
    arrays, meta = load_checkpoint(path)
    try:
        cfg = Config.from_dict(meta["config"])
        vocab = Vocab.from_json(meta["vocab"])
    except (KeyError, ConfigError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: no usable config/vocabulary ({exc})") from exc
    dev = Device(cfg.device if device is None else device)
    H = cfg.model.hidden_dim
    shape = (1, 1) if carried_state_supported(cfg) else (1, cfg.train.seq_len)
    dev.check_memory({**device_buffers(cfg, vocab.size, *shape, dev.variant),
                      "generate.At": ((H, H), np.float32)})
    model = Model(dev, cfg, vocab.size)
    try:
        model.load_state_arrays(arrays)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: arrays do not fit its config ({exc})") from exc
    return Generator(model, vocab)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a checkpoint written by engine.train")
    ap.add_argument("--prompt", default="The ", help="text fed first; characters outside the checkpoint's "
                                                     "vocabulary are read as unknown (a note on stderr)")
    ap.add_argument("--length", type=int, default=200, help="characters to generate (>= 0)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="finite, >= 0: p ∝ exp((z − max z)/T); 0 = greedy (argmax); a tiny T "
                         "approaches greedy without overflow (ties shared equally)")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k largest logits (0 = all; "
                                                         "k >= vocabulary size = all)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (>= 0)")
    ap.add_argument("--device", default=None, help="override the checkpoint's device choice")
    args = ap.parse_args(argv)
    bad = [f"--length must be >= 0, got {args.length}" if args.length < 0 else "",
           f"--temperature must be a finite number >= 0, got {args.temperature}"
           if not (math.isfinite(args.temperature) and args.temperature >= 0) else "",
           f"--top-k must be >= 0, got {args.top_k}" if args.top_k < 0 else "",
           f"--seed must be >= 0, got {args.seed}" if args.seed < 0 else ""]
    if any(bad):
        print(f"error: {'; '.join(b for b in bad if b)}", file=sys.stderr)
        return 2
    try:
        gen = load_generator(args.checkpoint, args.device)
    except (CheckpointError, DeviceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.prompt) - set(gen.vocab.chars))
    if unknown:
        print(f"note: prompt characters not in the checkpoint's vocabulary are read as unknown: "
              f"{''.join(unknown)!r}", file=sys.stderr)
    try:
        text = gen.sample(args.prompt, args.length, args.temperature, args.top_k, args.seed)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(args.prompt + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
