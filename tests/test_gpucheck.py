"""engine.gpucheck: what it says and writes on a machine without a GPU (and without pyopencl, or
with NVIDIA's library but no ICD file), its benchmark step on a given device, and bad arguments.

    python -m pytest tests/test_gpucheck.py -q
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import gpucheck as gc
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
    """--device runs the steps on that device (here the CPU): tokens/s per wiring, the per-kernel
    table, the nominal peak and the measured bandwidth, in the JSON and in the printed summary."""
    out = tmp_path / "summary.json"
    r = gpucheck("--out", str(out), "--device", "0:0", "--skip-tests", "--sizes", "reference", *TINY)
    assert r.returncode == 0, r.stderr
    bench = json.loads(out.read_text())["bench"]
    assert bench["ok"] and list(bench["sizes"]) == ["reference"]
    ref_size = bench["sizes"]["reference"]
    assert ref_size["ok"] and ref_size["config"]["H"] == 32
    for name in ("seed", "hybrid"):
        w = ref_size["wirings"][name]
        assert w["engine_tokens_per_s"] > 0 and w["device_ms_per_step"] > 0
        if bench["torch"]["status"] == "ok":
            assert w["torch_tokens_per_s"] > 0 and w["engine_over_torch"] > 0
        else:
            assert w["torch_tokens_per_s"] is None and w["engine_over_torch"] is None
        rows = {k["kernel"]: k for k in ref_size["kernels"][name]}
        assert rows["gemm_nn"]["gflops"] > 0 and rows["gemm_nn"]["pct_peak"] > 0 and rows["adamw"]["gb_s"] > 0
    assert bench["device_peak"]["gflops"] > 0 and "lower bound" in bench["device_peak"]["assumption"]
    assert bench["bandwidth"]["gb_s"] > 0 and "enqueue_copy" in bench["bandwidth"]["method"]
    assert "gpucheck summary" in r.stdout and "slowest kernels, hybrid at reference" in r.stdout
    assert f"{bench['device_peak']['gflops']:,.1f} GFLOP/s" in r.stdout


def test_without_pyopencl_it_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pyopencl", None)         # `import pyopencl` raises ImportError
    out = tmp_path / "summary.json"
    assert gc.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pyopencl is not importable" in err[0] and "pip install pyopencl" in err[0], err
    assert "pyopencl" in json.loads(out.read_text())["error"]


def no_gpu_here(monkeypatch, tmp_path):
    """A machine whose only library is tmp_path/lib/libnvidia-opencl.so.1 (on $LD_LIBRARY_PATH), whose
    ICD directory is tmp_path/vendors, and whose OpenCL shows a CPU only."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / gc.NVIDIA_LIB).write_bytes(b"")
    vendors = tmp_path / "vendors"
    monkeypatch.setenv("LD_LIBRARY_PATH", str(lib))
    monkeypatch.delenv("OCL_ICD_VENDORS", raising=False)
    monkeypatch.setattr(gc, "LIB_DIRS", ())
    monkeypatch.setattr(gc, "_ldconfig", lambda name: None)
    monkeypatch.setattr(gc, "ICD_DIR", str(vendors))
    cpu = {"index": "0:0", "type": "CPU", "name": "a CPU", "platform": "p", "compute_units": 2, "global_mem_gib": 1,
           "version": "OpenCL 3.0"}
    monkeypatch.setattr(gc, "platforms", lambda: ([cpu], None))
    return lib, vendors


def test_nvidia_library_without_icd_prints_the_commands(monkeypatch, tmp_path, capsys):
    lib, vendors = no_gpu_here(monkeypatch, tmp_path)
    assert gc.main(["--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err
    assert f"mkdir -p {vendors} && echo libnvidia-opencl.so.1 > {vendors}/nvidia.icd" in err
    user = gc.USER_ICD_DIR
    assert (f"mkdir -p {user} && echo {lib}/libnvidia-opencl.so.1 > {user}/nvidia.icd && "
            f"export OCL_ICD_VENDORS={user}") in err
    assert "ROCm" in err and "no OpenCL GPU device" in err
    # with the ICD file written, the commands are gone and the check says where to look instead
    vendors.mkdir()
    (vendors / "nvidia.icd").write_text("libnvidia-opencl.so.1\n")
    assert gc.main(["--out", str(tmp_path / "s.json")]) == 1
    err = capsys.readouterr().err
    assert "mkdir -p" not in err and "nvidia.icd" in err and "nvidia-smi" in err


@pytest.mark.parametrize("args,message", [(["--sizes", "huge"], "--sizes takes"),
                                          (["--device", "9:9"], "no OpenCL device '9:9'"),
                                          (["--out", "/nonexistent/dir/x.json"], "cannot write the summary")])
def test_bad_arguments_are_one_line(dev, args, message):
    r = gpucheck(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and message in lines[-1], r.stderr
