"""Device listing and choice: by index, by name, by $PYOPENCL_CTX; a missing
runtime or an unknown device is a one-line error, never a prompt."""
import os
import subprocess
import sys

import pytest

from engine.device import DeviceError, device_type_name, list_devices, select_device

pytestmark = pytest.mark.opencl


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "engine.devices", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, timeout=120)


def test_devices_lists_every_device_with_index_and_type(dev):
    r = _cli()
    assert r.returncode == 0
    for p, d, _, device in list_devices():
        line = next(ln for ln in r.stdout.splitlines() if f" {p}:{d} " in ln)
        assert device.name.strip() in line and device_type_name(device) in line
    assert sum(ln.startswith("*") for ln in r.stdout.splitlines()) == 1  # exactly one default


def test_choice_by_index_name_and_env(dev, monkeypatch):
    p, d, _, first = list_devices()[0]
    assert select_device(f"{p}:{d}") == first
    assert select_device(first.name.strip()[:6]) == first
    monkeypatch.setenv("PYOPENCL_CTX", f"{p}:{d}")
    assert select_device("") == first
    with pytest.raises(DeviceError, match="no OpenCL device '0:99'"):
        select_device("0:99")
    with pytest.raises(DeviceError, match="no OpenCL device matches 'no-such-device'"):
        select_device("no-such-device")


def test_missing_runtime_is_one_line_with_install_hint():
    r = _cli(env={"OCL_ICD_VENDORS": "/nonexistent", "OCL_ICD_FILENAMES": ""})
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert "pip install pocl-binary-distribution" in r.stderr
