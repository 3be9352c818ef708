"""Generation time: N characters from a transformer with the key-value cache (kernels/gpt_generate.cl)
against the window path (the training forward over the last block_size tokens, what generation
cost before the cache), side by side in one process, rounds alternating.

    python -m benchmarks.generate                                # attention_baseline's size, initial weights
    python -m benchmarks.generate --checkpoint runs/<id>/checkpoint.npz --rounds 7 --json gen.json

Each round times `sample(prompt, N)` (prompt "The ", temperature 0.8, one seed per round) for: the cache with keep =
block_size // 2 (the default), the cache with keep = block_size − 1 (nanoGPT's crop exactly: a full
forward per character once the block is full), and the window path. Before the rounds each path
generates once untimed (kernel builds, workspaces); that first call's time is reported too, as
`first_s`, and the texts of that call are compared: keep = block_size − 1 sees the window path's
context, so its text must equal the window path's (`exact_equals_window`). Prints the median and
the spread (min–max) per path and the window/cache ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from engine.config import Config, apply_overrides
from engine.data import Vocab, default_corpus
from engine.device import Device
from engine.generate import Generator, KVCacheGenerator, load_generator
from engine.model import Model, param_specs
from engine.params import init_params

BASELINE = ["model.family=transformer", "transformer.n_layer=4", "transformer.n_head=4", "transformer.n_embd=128",
            "transformer.block_size=64", "train.seq_len=64"]


def _paths(args):
    """(name, generator) for each path over one model."""
    if args.checkpoint:
        kv = load_generator(args.checkpoint, args.device)
        model, vocab = kv.model, kv.vocab
    else:
        vocab = Vocab.from_text(default_corpus())
        model = Model(Device(args.device or ""), apply_overrides(Config(), BASELINE), vocab.size)
        model.set_params(init_params(param_specs(model.layers), 0))
        kv = KVCacheGenerator(model, vocab)
    if not isinstance(kv, KVCacheGenerator):
        raise SystemExit(f"error: {args.checkpoint} is not a transformer without local rules in its blocks")
    T = model.cfg.transformer.block_size
    return [("kv_cache", kv), (f"kv_cache_keep{T - 1}", KVCacheGenerator(model, vocab, keep=T - 1)),
            ("window", Generator(model, vocab, fused=False))], model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a transformer checkpoint (default: attention_baseline's size, "
                                         "initial weights, on the default corpus's vocabulary)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--length", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.length < 1 or args.rounds < 1:
        print("error: --length and --rounds must be >= 1", file=sys.stderr)
        return 2
    paths, model = _paths(args)
    first, times, texts = {}, {name: [] for name, _ in paths}, {}
    for name, g in paths:
        t0 = time.perf_counter()
        texts[name] = g.sample("The ", args.length, 0.8, seed=0)
        first[name] = time.perf_counter() - t0
    for r in range(args.rounds):
        order = paths if r % 2 == 0 else paths[::-1]
        for name, g in order:
            t0 = time.perf_counter()
            g.sample("The ", args.length, 0.8, seed=r + 1)
            times[name].append(time.perf_counter() - t0)
    t = model.cfg.transformer
    print(f"{args.length} characters, {t.n_layer} layers × {t.n_embd} wide, block {t.block_size}, "
          f"device {model.dev.name}, {args.rounds} rounds")
    out = {"length": args.length, "rounds": args.rounds, "device": model.dev.name, "paths": {}}
    for name, v in times.items():
        med = float(np.median(v))
        out["paths"][name] = {"median_s": med, "min_s": min(v), "max_s": max(v), "first_s": first[name], "all_s": v}
        print(f"  {name:<18} median {med:.4f} s  [{min(v):.4f}, {max(v):.4f}]  first call {first[name]:.3f} s")
    ratio = out["paths"]["window"]["median_s"] / out["paths"]["kv_cache"]["median_s"]
    out["window_over_kv_cache"] = ratio
    exact = paths[1][0]
    # the same context as the window path (keep = block_size − 1): the same text from the same seed
    out["exact_equals_window"] = texts[exact] == texts["window"]
    out["sample"] = texts["kv_cache"]
    print(f"  window / kv_cache: {ratio:.1f}×; {exact} text == window text: {out['exact_equals_window']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
