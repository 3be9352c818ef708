"""The engine's transformer family (engine/models/transformer.py) in PyTorch: the baseline it
is held against, for equality (tests/test_torch_transformer.py), speed (benchmarks/speed.py)
and a training run with the engine's data, seeds and schedule.

    python -m benchmarks.torch_transformer --train --data /work/studies/english.txt --steps 200
    python -m benchmarks.torch_transformer --train --set train.eval_every=100 --json out.json

nanoGPT's model (Karpathy, model.py) with the engine's parameter names: token and learned
positional embeddings, n_layer pre-LayerNorm blocks x + proj(attn(LN1 x)), x + proj(GELU(fc(LN2 x))),
a final LayerNorm and logits = x·wteᵀ when tied. The parameters are held in torch's layout
(Linear weights (out, in), F.linear); `from_engine` loads the engine's (in, out) arrays and
`grads_as_engine` hands the gradients back under the engine's names and shapes (NAMES maps one
to the other). The optimiser is torch.optim.AdamW configured as engine/optim.py: β1, β2, ε,
decoupled decay on the engine's decayed tensors only (2-D weights and embeddings), the global
norm before clipping (clip_value, then clip_norm with 1e-6 in the denominator, as torch's
clip_grad_norm_), the rate of engine.optim.lr_at. The loss is the mean over valid targets (PAD
ignored), as engine.layers.head. Letters: B batch, S sequence, C n_embd, V vocabulary, L n_layer.

Dropout is torch's (nanoGPT's places, not the engine's hashed masks): runs equal the engine's
only at dropout 0, the baseline's setting. torch is an optional dependency: it is imported on
first use, so this module imports without it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

torch = F = None       # imported on first use (_import_torch): torch is optional
PAD = -1               # the engine's ignored target (engine.data.PAD)
LN_EPS = 1e-5          # engine.layers.norm.LayerNorm's default, torch's too


def _import_torch():
    global torch, F
    if torch is None:
        import torch as _torch
        import torch.nn.functional as _F
        torch, F = _torch, _F
    return torch


def clipped_step(opt, params: list, o, lr: float):
    """engine/optim.py's step on torch: the global gradient norm before any clipping, clipping by
    value (o.clip_value) then by that norm (o.clip_norm), the optimiser at lr. -> the norm."""
    _import_torch()
    gnorm = torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
    if o.clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, o.clip_value)
    if o.clip_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, o.clip_norm, gnorm)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return gnorm


# -- names: engine (in, out) <-> torch (out, in) ----------------------------------------------------
def names(tc) -> list[tuple[str, str, bool]]:
    """[(engine name, nanoGPT's torch name, transposed)] of every parameter of the config section
    `tc` (cfg.transformer), in the engine's declaration order. tie_weights: no lm_head.W (the
    head reads wte); bias: the Linear biases and LayerNorm β (nanoGPT's LayerNorm(bias=bias))."""
    b = bool(tc.bias)
    out = [("wte", "transformer.wte.weight", False), ("wpe", "transformer.wpe.weight", False)]
    for l in range(tc.n_layer):
        e, t = f"h{l}.", f"transformer.h.{l}."
        out += [(e + "ln_1.gamma", t + "ln_1.weight", False)]
        out += [(e + "ln_1.beta", t + "ln_1.bias", False)] if b else []
        out += [(e + "attn.W_qkv", t + "attn.c_attn.weight", True)]
        out += [(e + "attn.b_qkv", t + "attn.c_attn.bias", False)] if b else []
        out += [(e + "attn.W_proj", t + "attn.c_proj.weight", True)]
        out += [(e + "attn.b_proj", t + "attn.c_proj.bias", False)] if b else []
        out += [(e + "ln_2.gamma", t + "ln_2.weight", False)]
        out += [(e + "ln_2.beta", t + "ln_2.bias", False)] if b else []
        out += [(e + "mlp.W_fc", t + "mlp.c_fc.weight", True)]
        out += [(e + "mlp.b_fc", t + "mlp.c_fc.bias", False)] if b else []
        out += [(e + "mlp.W_proj", t + "mlp.c_proj.weight", True)]
        out += [(e + "mlp.b_proj", t + "mlp.c_proj.bias", False)] if b else []
    out += [("ln_f.gamma", "transformer.ln_f.weight", False)]
    out += [("ln_f.beta", "transformer.ln_f.bias", False)] if b else []
    out += [] if tc.tie_weights else [("lm_head.W", "lm_head.weight", True)]
    out += [("lm_head.b", "lm_head.bias", False)] if b else []
    return out


def engine_init(cfg, V: int) -> dict[str, np.ndarray]:
    """The engine's initial parameters of cfg at vocabulary V: engine.params.init_params over the
    family's declarations, the draws the engine's own run starts from."""
    from engine.model import model_layers, param_specs
    from engine.params import init_params
    return init_params(param_specs(model_layers(cfg, V)), cfg.seed)


class TorchTransformer:
    """One model: parameters (torch layout, under nanoGPT's names), AdamW, the step count."""

    def __init__(self, cfg, vocab_size: int, params: dict | None = None, threads: int | None = None,
                 device: str = "cpu"):
        """params: engine-named (in, out) arrays (default: engine_init(cfg, V))."""
        _import_torch()
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.cfg, self.tc, self.V = cfg, cfg.transformer, vocab_size
        if getattr(self.tc, "hybrid", "none") != "none":
            raise ValueError(f"the twin is the plain transformer; transformer.hybrid={self.tc.hybrid!r} has local rules")
        self.device = torch.device(device)
        self.names = names(self.tc)
        self.p: dict = {}
        self.from_engine(engine_init(cfg, vocab_size) if params is None else params)
        o = cfg.optim
        decayed = [self.p[t] for e, t, _ in self.names if self.p[t].dim() >= 2]
        plain = [self.p[t] for e, t, _ in self.names if self.p[t].dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decayed, "weight_decay": o.weight_decay},
                                      {"params": plain, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                     fused=True)
        self.step = 0                                  # optimiser steps taken
        self.gnorm = torch.zeros((), device=self.device)

    # -- parameters in the engine's names --------------------------------------------------------
    def from_engine(self, params: dict):
        """Load engine-named (in, out) arrays; the optimiser's state is kept (call before training)."""
        for e, t, tr in self.names:
            a = np.asarray(params[e], np.float32)
            a = a.T if tr else a
            if t in self.p:
                with torch.no_grad():
                    self.p[t].copy_(torch.from_numpy(np.ascontiguousarray(a)))
            else:
                self.p[t] = torch.tensor(np.ascontiguousarray(a), device=self.device).requires_grad_(True)

    def _as_engine(self, get) -> dict[str, np.ndarray]:
        out = {}
        for e, t, tr in self.names:
            a = get(self.p[t]).detach().cpu().numpy()
            out[e] = np.ascontiguousarray(a.T if tr else a)
        return out

    def params_as_engine(self) -> dict[str, np.ndarray]:
        return self._as_engine(lambda q: q)

    def grads_as_engine(self) -> dict[str, np.ndarray]:
        """The last backward's gradients under the engine's names and (in, out) shapes."""
        return self._as_engine(lambda q: q.grad if q.grad is not None else torch.zeros_like(q))

    def lr_at(self, step: int) -> float:
        """The engine's schedule (engine.optim.lr_at) for optimiser step `step` (1-based)."""
        from engine.optim import lr_at
        return lr_at(self.cfg.optim, self.cfg.train.steps, step)

    # -- forward --------------------------------------------------------------------------------
    def _ids(self, a) -> torch.Tensor:
        if not isinstance(a, torch.Tensor):
            a = torch.from_numpy(np.ascontiguousarray(a, np.int64))
        return a.long().to(self.device)

    def logits(self, x, training: bool = True) -> torch.Tensor:
        """x (B,S) ids -> logits (B,S,V)."""
        p, tc = self.p, self.tc
        x = self._ids(x)
        B, S = x.shape
        C, nh = tc.n_embd, tc.n_head
        drop = float(tc.dropout) if training else 0.0
        ln = lambda h, t: F.layer_norm(h, (C,), p[t + ".weight"], p.get(t + ".bias"), LN_EPS)
        lin = lambda h, t: F.linear(h, p[t + ".weight"], p.get(t + ".bias"))
        h = F.embedding(x, p["transformer.wte.weight"]) + p["transformer.wpe.weight"][:S]
        h = F.dropout(h, drop, training) if drop else h
        for l in range(tc.n_layer):
            t = f"transformer.h.{l}."
            q, k, v = lin(ln(h, t + "ln_1"), t + "attn.c_attn").split(C, dim=2)       # (B,S,C) each
            q, k, v = (z.view(B, S, nh, C // nh).transpose(1, 2) for z in (q, k, v))    # (B,nh,S,d)
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
            a = lin(a.transpose(1, 2).reshape(B, S, C), t + "attn.c_proj")
            h = h + (F.dropout(a, drop, training) if drop else a)
            m = lin(F.gelu(lin(ln(h, t + "ln_2"), t + "mlp.c_fc"), approximate="none"), t + "mlp.c_proj")
            h = h + (F.dropout(m, drop, training) if drop else m)
        h = ln(h, "transformer.ln_f")
        W = p["transformer.wte.weight"] if tc.tie_weights else p["lm_head.weight"]
        return F.linear(h, W, p.get("lm_head.bias"))

    def loss(self, x, y, training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over non-PAD targets, 0 if none; the summed loss) of x, y (B,S)."""
        logits = self.logits(x, training)
        yv = self._ids(y).reshape(-1)
        total = F.cross_entropy(logits.reshape(-1, self.V), yv, ignore_index=PAD, reduction="sum")
        return total / (yv != PAD).sum().clamp(min=1), total

    # -- one training step ------------------------------------------------------------------------
    def backward(self, x, y) -> torch.Tensor:
        """Gradients of the mean loss of x, y into .grad (replacing the last ones); the loss."""
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.loss(x, y)
        loss.backward()
        return loss

    def optimizer_step(self, lr: float):
        """Clipping as engine/optim.py (the global norm before any clipping), then AdamW at lr."""
        self.gnorm = clipped_step(self.opt, list(self.p.values()), self.cfg.optim, lr)
        self.step += 1

    def train_step(self, x, y, lr: float, return_loss: bool = False):
        """Forward, backward, clipping, AdamW. Returns the loss as a Python float only if
        return_loss (else the detached loss tensor: no sync on a GPU)."""
        loss = self.backward(x, y)
        self.optimizer_step(lr)
        return float(loss.item()) if return_loss else loss.detach()

    def evaluate(self, batches) -> dict:
        """{val_loss, val_acc, val_bpc} over [(x, y)] (engine.data.val_batches): the summed loss
        over every valid target of the split divided by their count, as engine.tasks.char_lm."""
        total = hits = count = 0.0
        with torch.no_grad():
            for x, y in batches:
                logits = self.logits(x, training=False).reshape(-1, self.V)
                yv = self._ids(y).reshape(-1)
                valid = yv != PAD
                total += float(F.cross_entropy(logits, yv, ignore_index=PAD, reduction="sum"))
                hits += float(((logits.argmax(dim=1) == yv) & valid).sum())
                count += float(valid.sum())
        val_loss = total / max(count, 1.0)
        return {"val_loss": val_loss, "val_acc": hits / max(count, 1.0), "val_bpc": val_loss / math.log(2.0)}


# -- training with the engine's data, seeds and schedule ------------------------------------------
def train(cfg, threads: int | None = None, log=lambda msg: None) -> dict:
    """Train the twin as engine.train trains the family: the same corpus split and vocabulary,
    the same seeded training windows (engine.data.Batches), the same initial draws, the rate of
    engine.optim.lr_at, evaluations at the same steps over the same validation windows. Returns
    {history, final, train_time_s (steps only), wall_s, tokens_per_s, ...}."""
    from engine.data import Batches, Vocab, load_text, split_text, text_digest, val_batches
    t0 = time.perf_counter()
    _import_torch()
    torch.manual_seed(cfg.seed)                   # dropout only (0 in the baseline)
    text = load_text(cfg.data.path)
    train_text, val_text = split_text(text, cfg.data.val_fraction)
    vocab = Vocab.from_text(train_text)
    train_ids, val_ids = vocab.encode(train_text), vocab.encode(val_text)
    tc = cfg.train
    batches = Batches(train_ids, tc.batch_size, tc.seq_len, cfg.seed)
    val = val_batches(val_ids, tc.batch_size, tc.seq_len, tc.eval_batches)
    model = TorchTransformer(cfg, vocab.size, threads=threads)
    N = tc.batch_size * tc.seq_len
    history, losses, train_time = [], [], 0.0
    t = time.perf_counter()
    for step in range(1, tc.steps + 1):
        x, y = batches.next_batch()
        lr = model.lr_at(step)
        losses.append(model.train_step(x, y, lr))
        is_eval = step % tc.eval_every == 0 or step == tc.steps
        if step % tc.log_every and not is_eval:
            continue
        train_loss = float(torch.stack(losses).mean())    # the steps since the last log point, as the engine's
        losses = []
        if not is_eval:
            continue
        train_time += time.perf_counter() - t
        rec = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": float(model.gnorm),
               **model.evaluate(val), "train_time_s": train_time, "tokens_per_s": step * N / train_time}
        history.append(rec)
        log(f"step {step}: train {train_loss:.4f} val {rec['val_loss']:.4f} (lr {lr:.2e}, "
            f"{train_time:.1f} s, {rec['tokens_per_s']:,.0f} tokens/s)")
        t = time.perf_counter()
    return {"history": history, "final": history[-1], "train_time_s": train_time,
            "wall_s": time.perf_counter() - t0, "tokens_per_s": tc.steps * N / train_time,
            "vocab_size": vocab.size, "data_sha256": text_digest(cfg.data.path, text),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "config": cfg.to_dict()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.torch_transformer", description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="train the twin (the only action)")
    ap.add_argument("--experiment", default="attention_baseline", help="the engine experiment whose config to take")
    ap.add_argument("--data", help="text file (data.path)")
    ap.add_argument("--seed", type=int, help="seed of the init, the batches (seed)")
    ap.add_argument("--steps", type=int, help="optimiser steps (train.steps: also the cosine's length)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine config override (repeatable)")
    ap.add_argument("--threads", type=int, help="torch threads (default: every CPU)")
    ap.add_argument("--json", metavar="OUT", help="write the result (config, history, timings) here")
    args = ap.parse_args(argv)
    if not args.train:
        ap.error("nothing to do: pass --train")
    from engine.config import ConfigError, apply_overrides
    from engine.data import DataError
    from experiments import presets
    extra = [*args.set, *([f"data.path={args.data}"] if args.data is not None else []),
             *([f"seed={args.seed}"] if args.seed is not None else []),
             *([f"train.steps={args.steps}"] if args.steps is not None else [])]
    try:
        cfg = apply_overrides(presets.get(args.experiment).config(), extra)
        if cfg.model.family != "transformer":
            raise ConfigError(f"experiment {args.experiment!r} is of family {cfg.model.family!r}; "
                              "the twin is of the transformer family")
        res = train(cfg, args.threads, log=lambda msg: print(f"[torch] {msg}", file=sys.stderr, flush=True))
    except (ConfigError, DataError, presets.UnknownExperiment) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: torch is needed ({exc}); pip install torch", file=sys.stderr)
        return 2
    res["experiment"], res["overrides"] = args.experiment, extra
    f = res["final"]
    print(f"final (step {f['step']}): val_loss {f['val_loss']:.4f} val_bpc {f['val_bpc']:.4f}; "
          f"{res['train_time_s']:.1f} s training, {res['wall_s']:.1f} s wall, {res['tokens_per_s']:,.0f} tokens/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
