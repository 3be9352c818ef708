"""This tree's engine against another commit's, side by side: the speed ratio new/old.

    python -m benchmarks.versus 61ce7d8 [--rounds 4] [--wirings seed,hybrid] [--repeats 3] [--steps 20]

The old commit is exported (`git archive`) to a temporary folder; each round runs the
speed benchmark (`--quick --json`) once in each tree, one after the other, alternating
which goes first, so that the machine's drift hits both alike. Reports, per wiring, the
engine tokens/s of both and the median of the per-round ratios new/old with [min–max].
An old tree from before the benchmarks moved out of engine/ runs `python -m engine.bench`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export(commit: str, folder: Path) -> Path:
    try:
        data = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"error: cannot export {commit!r}: {exc.stderr.decode().strip()}") from None
    subprocess.run(["tar", "-x", "-C", str(folder)], input=data, check=True)
    return folder


def speed(tree: Path, args) -> dict:
    entry = "benchmarks.speed" if (tree / "benchmarks" / "speed.py").exists() else "engine.bench"
    cmd = [sys.executable, "-m", entry, "--quick", "--json", "--repeats", str(args.repeats),
           "--steps", str(args.steps), "--wirings", args.wirings, *[a for kv in args.set for a in ("--set", kv)],
           *(["--smoke"] if args.smoke else [])]
    r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin",
                                                                            "HOME": str(Path.home())})
    if r.returncode != 0:
        raise SystemExit(f"error: {entry} in {tree} failed: {r.stderr.strip().splitlines()[-1:]}")
    res = json.loads(r.stdout)
    return {w: v["engine"]["tokens_per_s"]["median"] for w, v in res["wirings"].items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__.splitlines()[0])
    ap.add_argument("commit", help="the old commit (anything git understands)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--wirings", default="seed,hybrid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to both benchmarks")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="for tests: pass --smoke to both benchmarks (no pauses; the old tree's must know it)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="versus-") as tmp:
        old_tree = export(args.commit, Path(tmp))
        rounds = []
        for r in range(args.rounds):
            order = [("new", REPO), ("old", old_tree)] if r % 2 == 0 else [("old", old_tree), ("new", REPO)]
            got = {name: speed(tree, args) for name, tree in order}
            rounds.append(got)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{w} {got['new'][w] / got['old'][w]:.3f}" for w in got["new"]), file=sys.stderr, flush=True)
    out = {}
    for w in rounds[0]["new"]:
        ratios = [x["new"][w] / x["old"][w] for x in rounds]
        out[w] = {"new_tokens_per_s": statistics.median(x["new"][w] for x in rounds),
                  "old_tokens_per_s": statistics.median(x["old"][w] for x in rounds),
                  "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    if args.json:
        print(json.dumps({"commit": args.commit, "rounds": args.rounds, "wirings": out}))
    else:
        for w, v in out.items():
            print(f"{w}: new {v['new_tokens_per_s']:,.0f} tok/s, old {v['old_tokens_per_s']:,.0f} tok/s, "
                  f"new/old {v['ratio_median']:.3f} [{v['ratio_min']:.3f}–{v['ratio_max']:.3f}] over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
