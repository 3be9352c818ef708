"""Record what `python -m engine.train` prints today, for the layer redesign (issue 11) to match.

    python tests/golden/record.py          # rewrites tests/golden/engine_train.json and hybrid_step20.npz

Run once, on the engine *before* a redesign; tests/test_golden.py then checks every later
engine against it: bit for bit on the same OpenCL device (name, platform, driver), within a
tolerance on another. Each case is a named experiment's overrides at small sizes; one hybrid
checkpoint at step 20 checks that a checkpoint written before the redesign still resumes.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))

from experiments import presets  # noqa: E402

CASES = ("hybrid", "seed", "ablation_no_spikes", "ablation_no_proto", "ablation_no_hebb", "gradient_only",
         "control_modulate")
SMALL = {"model.embedding_dim": 16, "model.hidden_dim": 32, "model.num_prototypes": 8, "train.batch_size": 8,
         "train.seq_len": 16, "train.steps": 40, "train.eval_every": 10, "train.log_every": 5,
         "train.checkpoint_every": 20, "train.eval_batches": 3, "optim.warmup_steps": 5}


# the reference sizes (the engine's own defaults: E128 H384 T72 B64 S64), a few steps: the kernel paths
# of real runs (folded embedding with N > V, tiled and K-split products) that small sizes may not take
FULL = {"train.steps": 20, "train.eval_every": 10, "train.log_every": 5, "train.eval_batches": 2,
        "optim.warmup_steps": 5}
FULL_CASES = ("hybrid", "seed")


def case_args(name: str, sizes: dict = SMALL) -> list[str]:
    sets = {**presets.get(name).overrides, **sizes}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def train(args, cwd) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return r.stdout.splitlines()


def device() -> dict:
    from engine.device import Device
    d = Device("")
    return {"name": d.name, "platform": d.platform_name, "driver": d.driver_version}


def main():
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "device": device(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            args = case_args(name)
            out["cases"][name] = {"args": args, "stdout": train(args, tmp)}
        for name in FULL_CASES:
            args = case_args(name, FULL)
            out["cases"][f"{name}@reference_size"] = {"args": args, "stdout": train(args, tmp)}
        train(case_args("hybrid") + ["--set", "train.steps=20", "--out", "ck"], tmp)
        shutil.copyfile(Path(tmp) / "ck" / "checkpoint.npz", HERE / "hybrid_step20.npz")
        resume = ["--set", "train.steps=40"]   # the old engine's own continuation of that checkpoint
        out["resume"] = {"checkpoint": "hybrid_step20.npz", "args": resume,
                         "stdout": train(["--resume", str(HERE / "hybrid_step20.npz"), *resume], tmp)}
    (HERE / "engine_train.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"recorded {len(out['cases'])} cases at {commit[:12]} on {out['device']['name']}")


if __name__ == "__main__":
    main()
