"""Generate text from a checkpoint, one character at a time on the device.

    python -m engine.generate --checkpoint runs/demo/checkpoint.npz --prompt "The " --length 200 --temperature 0.8

The memory network carries each GRU layer's hidden state (RecurrentGenerator).
The transformer family (without local rules in its blocks) runs with a key-value cache
(KVCacheGenerator, kernels/gpt_generate.cl): one launch per character through every block, the
prompt and each refill of the cache by the training forward; --keep sets how many tokens a
full cache keeps (block_size − 1: nanoGPT's generate exactly). Every other family member and
the multi-layer hybrids run the window path (the training forward over the last window).
The one-layer hybrid:

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
import time

import numpy as np

from . import ops
from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError
from .data import Vocab
from .device import Device, DeviceError
from .model import Model, device_buffers


GEN_WG = 64  # work-group of the fused generation kernel (CPU variant: one work-group is one core)
GEN_WG_GPU = 256  # GPU variant: one item per column of H and Vp, tree sums (kernels/generate.cl)
KV_WG = 1  # CPU variant of gpt_step: one work-item (kernels/gpt_generate.cl says why); 1, 2, 4 and
           # 16 items ran a baseline-size token at the same speed (~80 µs, noise ±20)


def generation_wg(dev) -> int:
    """Work-group size of the fused kernel on dev: GEN_WG_GPU for the GPU variant, capped at the
    device's largest work-group (a power of two: the tree sums pair items l and l + WG/2)."""
    if dev.variant != "gpu":
        return GEN_WG
    cap = int(dev.device.max_work_group_size)
    return min(GEN_WG_GPU, 1 << (cap.bit_length() - 1))


class Generator:
    """Step-wise inference with carried state (B = S = 1), for the character models of the
    hybrid family (the transformer's with a key-value cache: KVCacheGenerator).

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
        # the window: the transformer's block (its positions), the hybrid's training window
        self.window = cfg.transformer.block_size if cfg.model.family == "transformer" else cfg.train.seq_len
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

    def prime(self, tokens) -> np.ndarray:
        """Feed tokens in order; the logits after the last."""
        for t in tokens:
            logits = self.feed(int(t))
        return logits

    def sample(self, prompt: str, length: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> str:
        rng = np.random.default_rng(seed)
        self.reset()
        ids = self.vocab.encode(prompt) if prompt else np.array([0], np.int32)
        logits = self.prime(ids)
        out = []
        for _ in range(length):
            nxt = pick(logits, temperature, top_k, rng)
            out.append(nxt)
            logits = self.feed(nxt)
        return self.vocab.decode(np.array(out, np.int32))


class KVCacheGenerator(Generator):
    """The transformer family (transformer.hybrid none) with a key-value cache: each character
    is one launch of gpt_step (kernels/gpt_generate.cl), which runs it through every block,
    appends its keys and values to the cache (L, block_size, C) and returns its logits; the
    prompt is one launch. The context is the cache: positions 0 … w−1 of the last w tokens.
    When it is full (w = block_size) the next token first refills it with the last `keep`
    tokens it held (one launch), then goes on at position keep. keep = block_size − 1 is
    nanoGPT's generate exactly (the last block_size tokens, every step past the window a full
    forward); the default block_size // 2 re-runs the window once every block_size/2
    characters, every prediction still seeing ≥ block_size/2 tokens at the positions training
    used. The logits after each token equal the training forward over `self.history` (the
    cached window), which tests/test_generate.py checks."""

    def __init__(self, model: Model, vocab: Vocab, keep: int | None = None):
        self.model, self.vocab, self.dev = model, vocab, model.dev
        t, dev = model.cfg.transformer, model.dev
        self.C, self.L, self.T, self.nh = t.n_embd, t.n_layer, t.block_size, t.n_head
        self.keep = self.T // 2 if keep is None else int(keep)
        if not 0 <= self.keep < self.T:
            raise ValueError(f"keep must be in [0, block_size) = [0, {self.T}), got {keep}")
        self.history: list[int] = []
        self.fused, self.carried = True, True
        gpu = dev.variant == "gpu"
        self._wg = generation_wg(dev) if gpu else KV_WG
        d = self.C // self.nh
        defines = (("WG", self._wg), ("TREE", int(gpu)), ("VEC8", int(not gpu and self.C % 32 == 0 and d % 8 == 0)),
                   ("BIAS", int(t.bias)), ("TIED", int(t.tie_weights)), ("C", self.C), ("NH", self.nh),
                   ("D", d), ("L", self.L), ("T", self.T), ("VP", model.Vp))
        self._defines = defines
        self._kernel = dev.kernel("gpt_generate.cl", "gpt_step_wg" if gpu else "gpt_step", defines)
        self._offs = dev.to_device(kv_offsets(model))
        self.K = dev.zeros((self.L * self.T * self.C,))
        self.Vc = dev.zeros((self.L * self.T * self.C,))
        self._tokens = dev.zeros((self.T,), np.int32)
        self._logits = dev.zeros((model.Vp,))
        self._row = np.zeros((1, model.Vp), np.float32)
        self._host = np.zeros((0, model.Vp), np.float32)
        self.checked = self.self_check()

    def self_check(self, n: int = 3) -> float:
        """The step kernel against the training forward on n tokens (positions 0 … n−1, one
        launch): the largest difference of the last logits, relative to the largest logit. A
        kernel compiler that miscompiles gpt_step (PoCL 3 did, at some sizes, before the CPU
        variant ran one work-item) gives O(1); this float32 kernel gives ~1e-6. Over 1e-4:
        GenerateError, so that no wrong text is ever sampled from the cache."""
        ids = [i % self.model.V for i in range(1, n + 1)]
        self.reset()
        got = self._step(ids).copy()
        self.reset()
        ws = self.model.workspace(1, n)
        ws.x.set(np.array(ids, np.int32))
        self.model.forward(ws, loss=False, training=False)
        want = ws.logits.get()[-1, :self.model.V]
        err = float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))
        if not err <= 1e-4:
            raise GenerateError(f"the key-value cache kernel (kernels/gpt_generate.cl, {self._kernel.function_name}) "
                                f"disagrees with the training forward on {self.dev.name} by {err:.2g} of the largest "
                                f"logit: a kernel compiler fault; generate with --no-cache (the window path)")
        return err

    def reset(self):
        self.history = []   # cache rows at positions >= len(history) are never read

    def feed(self, token: int) -> np.ndarray:
        return self.prime([token])

    def prime(self, tokens) -> np.ndarray:
        """Feed tokens in order; the logits after the last."""
        pending = [int(t) for t in tokens]
        if not pending:
            raise ValueError("prime needs at least one token")
        logits = None
        while pending:
            if len(self.history) == self.T:          # full: refill with the last `keep` tokens
                kept, self.history = self.history[len(self.history) - self.keep:], []
                if kept:
                    self._prefill(kept)
            room = self.T - len(self.history)
            chunk, pending = pending[:room], pending[room:]
            logits = self._prefill(chunk) if not self.history and len(chunk) > 1 else self._step(chunk)
        return logits

    def _prefill(self, chunk) -> np.ndarray:
        """An empty cache filled with chunk at positions 0 … len−1 by the training forward over
        it (the products on every core): each block's keys and values are copied from its qkv
        (AttnBlock.kv) into the cache; the logits of its last position."""
        m, dev, C, S = self.model, self.dev, self.C, len(chunk)
        ws = m.workspace(1, S)
        ws.x.set(np.array(chunk, np.int32))
        m.forward(ws, loss=False, training=False)
        for l in range(self.L):
            qkv = m.layer(f"attn{l}").kv(ws.ctx[f"attn{l}"])
            for part, cache in ((1, self.K), (2, self.Vc)):   # rows (S, 3C) → the cache's (S, C) at layer l
                dev.cl.enqueue_copy(dev.queue, cache.data, qkv.data, src_origin=(part * C * 4, 0),
                                    dst_origin=(0, l * self.T), region=(C * 4, S), src_pitches=(3 * C * 4,),
                                    dst_pitches=(C * 4,))
        self.history = list(chunk)
        ws.logits.get(ary=self._rows(S))
        return self._rows(S)[-1, :m.V]

    def _rows(self, S):
        if self._host.shape[0] != S:
            self._host = np.zeros((S, self.model.Vp), np.float32)
        return self._host

    def _step(self, chunk) -> np.ndarray:
        """chunk through gpt_step at positions len(history) …, one launch."""
        i32, dev = np.int32, self.dev
        if len(chunk) > 1:
            dev.cl.enqueue_copy(dev.queue, self._tokens.data, np.array(chunk, np.int32))
        dev.launch(self._kernel, (self._wg,), (self._wg,), i32(chunk[0]), self._tokens.data, i32(len(chunk)),
                   i32(len(self.history)), self.model.theta.data, self._offs.data, self.K.data, self.Vc.data,
                   self._logits.data)
        self.history += chunk
        self._logits.get(ary=self._row.reshape(-1))
        return self._row[0, :self.model.V]


class RecurrentGenerator(Generator):
    """The memory network (model.family memnet): one character at a time (B = S = 1) through the
    training kernels, each GRU layer's hidden state carried from character to character (its
    fw_state, engine/layers/gru.py): the logits after each character equal the training forward
    over everything fed since reset, which tests/test_memnet.py checks. The memory is read, never
    written (the local write belongs to training)."""

    def __init__(self, model: Model, vocab: Vocab):
        self.model, self.vocab, self.dev = model, vocab, model.dev
        self.fused, self.carried, self.history = False, True, []
        self.grus = [layer for layer in model.layers if layer.kind == "gru"]
        self.state = {g.name: self.dev.zeros((1, g.Hd)) for g in self.grus}
        self.ws = model.workspace(1, 1)
        self._row = np.zeros((1, model.Vp), np.float32)

    def reset(self):
        self.history = []
        for a in self.state.values():
            self.dev.cl.enqueue_fill_buffer(self.dev.queue, a.data, np.zeros(1, np.float32), 0, a.nbytes)

    def feed(self, token: int) -> np.ndarray:
        m, ws, dev = self.model, self.ws, self.dev
        ws.x.set(np.array([token], np.int32))
        m.forward(ws, fw_state=self.state, loss=False, training=False)
        for g in self.grus:   # h_0 of the next character = this one's last state
            last = g.last_state(ws.ctx[g.name])
            dev.cl.enqueue_copy(dev.queue, self.state[g.name].data, last.base_data, src_offset=last.offset,
                                byte_count=self.state[g.name].nbytes)
        self.history.append(int(token))
        ws.logits.get(ary=self._row)
        return self._row[0, :m.V]


KV_GLOBALS = ("wte", "wpe", "ln_f.gamma", "ln_f.beta", "lm_head.W", "lm_head.b")
KV_BLOCK = ("ln_1.gamma", "ln_1.beta", "attn.W_qkv", "attn.b_qkv", "attn.W_proj", "attn.b_proj",
            "ln_2.gamma", "ln_2.beta", "mlp.W_fc", "mlp.b_fc", "mlp.W_proj", "mlp.b_proj")


def kv_offsets(model) -> np.ndarray:
    """gpt_step's table of parameter offsets in θ (kernels/gpt_generate.cl), −1 where absent."""
    off = model.layout.offsets
    names = list(KV_GLOBALS) + [f"h{l}.{n}" for l in range(model.cfg.transformer.n_layer) for n in KV_BLOCK]
    return np.array([off.get(n, -1) for n in names], np.int32)


def kv_cache_supported(cfg) -> bool:
    """The key-value cache path computes this model: the transformer family without local rules
    in its blocks (those run the window path)."""
    return cfg.model.family == "transformer" and cfg.transformer.hybrid == "none"


def make_generator(model: Model, vocab: Vocab, keep: int | None = None, cache: bool = True) -> Generator:
    """The key-value cache for the transformer without local rules (cache=True), else Generator."""
    if cache and kv_cache_supported(model.cfg):
        return KVCacheGenerator(model, vocab, keep)
    if model.cfg.model.family == "memnet":
        return RecurrentGenerator(model, vocab)
    return Generator(model, vocab)


class GenerateError(ValueError):
    """An argument that does not fit the checkpoint (one line, exit 2)."""


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
    # rng.choice(z.size, p=p)'s own steps (numpy's Generator.choice: the cdf normalised by its
    # last entry, one uniform draw, searchsorted right): the same index from the same stream,
    # without choice's argument checks (~40 µs → ~15 µs a character)
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def load_generator(path: str, device: str | None = None, keep: int | None = None, cache: bool = True) -> Generator:
    arrays, meta = load_checkpoint(path)
    try:
        cfg = Config.from_dict(meta["config"])
        vocab = Vocab.from_json(meta["vocab"])
    except (KeyError, ConfigError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: no usable config/vocabulary ({exc})") from exc
    dev = Device(cfg.device if device is None else device)
    H = cfg.model.hidden_dim
    if keep is not None and not kv_cache_supported(cfg):
        raise GenerateError("--keep applies to the transformer family's key-value cache (transformer.hybrid "
                            f"none); this checkpoint is {cfg.model.family!r}"
                            + (f" with hybrid {cfg.transformer.hybrid!r}" if cfg.model.family == "transformer" else ""))
    if keep is not None and not 0 <= keep < cfg.transformer.block_size:
        raise GenerateError(f"--keep must be in [0, block_size) = [0, {cfg.transformer.block_size}), got {keep}")
    shape = (1, 1) if carried_state_supported(cfg) or cfg.model.family == "memnet" else (1, cfg.train.seq_len)
    extra = {"generate.At": ((H, H), np.float32)}
    if kv_cache_supported(cfg):   # the prefill's training forward at up to block_size, the cache
        t = cfg.transformer
        shape = (1, t.block_size)
        extra = {f"generate.{n}": ((t.n_layer * t.block_size * t.n_embd,), np.float32) for n in ("K", "V")}
    dev.check_memory({**device_buffers(cfg, vocab.size, *shape, dev.variant), **extra})
    model = Model(dev, cfg, vocab.size)
    try:
        model.load_state_arrays(arrays)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: arrays do not fit its config ({exc})") from exc
    return make_generator(model, vocab, keep, cache)


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
    ap.add_argument("--keep", type=int, default=None,
                    help="transformer: the tokens a full key-value cache keeps (0 … block_size − 1; default "
                         "block_size // 2; block_size − 1 = nanoGPT's crop, a full forward per character)")
    ap.add_argument("--no-cache", action="store_true",
                    help="transformer: the window path (the training forward over the last block_size tokens "
                         "for every character) instead of the key-value cache")
    ap.add_argument("--timing", action="store_true", help="print the generation's time on stderr")
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
        gen = load_generator(args.checkpoint, args.device, args.keep, cache=not args.no_cache)
    except (CheckpointError, DeviceError, GenerateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.prompt) - set(gen.vocab.chars))
    if unknown:
        print(f"note: prompt characters not in the checkpoint's vocabulary are read as unknown: "
              f"{''.join(unknown)!r}", file=sys.stderr)
    try:
        t0 = time.perf_counter()
        text = gen.sample(args.prompt, args.length, args.temperature, args.top_k, args.seed)
        took = time.perf_counter() - t0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(args.prompt + text + "\n")
    if args.timing:   # the first call on a machine includes building the kernels (then cached)
        print(f"{args.length} characters in {took:.3f} s ({type(gen).__name__}, device {gen.dev.name})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
