"""engine.gpucheck: what it says and writes on a machine without a GPU, its benchmark step on
a given device, and bad arguments.

    python -m pytest tests/test_gpucheck.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.gpucheck import platforms

pytestmark = pytest.mark.opencl
REPO = Path(__file__).resolve().parent.parent
TINY = ["--bench-set", "model.hidden_dim=32", "--bench-set", "model.embedding_dim=16", "--bench-set",
        "train.batch_size=4", "--bench-set", "train.seq_len=8", "--bench-set", "model.num_prototypes=4"]


def gpucheck(*args):
    return subprocess.run([sys.executable, "-m", "engine.gpucheck", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_without_a_gpu_it_says_what_is_missing_and_fails(dev, tmp_path):
    found, _ = platforms()
    if any(d["type"] == "GPU" for d in found):
        pytest.skip("this machine has an OpenCL GPU")
    out = tmp_path / "summary.json"
    r = gpucheck("--out", str(out))
    assert r.returncode == 1, r.stderr
    summary = json.loads(out.read_text())
    assert summary["device"] is None and summary["tests"] is None
    assert [d["index"] for d in summary["platforms"]] == [d["index"] for d in found] and found
    assert "nvidia.icd" in summary["missing"] and "libnvidia-opencl.so.1" in summary["missing"]
    assert "ROCm" in summary["missing"] and "no OpenCL GPU device" in r.stderr


def test_benchmark_step_on_a_named_device(dev, tmp_path):
    """--device runs the steps on that device (here the CPU): the benchmark's tokens/s per wiring."""
    out = tmp_path / "summary.json"
    r = gpucheck("--out", str(out), "--device", "0:0", "--skip-tests", "--sizes", "reference", *TINY)
    assert r.returncode == 0, r.stderr
    bench = json.loads(out.read_text())["bench"]["reference"]
    assert bench["ok"] and bench["config"]["H"] == 32
    assert bench["seed"]["engine_tokens_per_s"] > 0 and bench["hybrid"]["engine_tokens_per_s"] > 0


@pytest.mark.parametrize("args,message", [(["--sizes", "huge"], "--sizes takes"),
                                          (["--device", "9:9"], "no OpenCL device '9:9'"),
                                          (["--out", "/nonexistent/dir/x.json"], "cannot write the summary")])
def test_bad_arguments_are_one_line(dev, args, message):
    r = gpucheck(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and message in lines[-1], r.stderr
