"""Shared test fixtures: the OpenCL device and the reference wiring of a Config.

    python -m pytest tests -q            # CI=1 turns a missing OpenCL device into a failure

Tests that need a device take the `dev` fixture and carry `pytest.mark.opencl`.
"""
import os

import pytest

from engine.reference import Wiring


# Tiny model sizes and text shared by the model-level tests (test_model, test_bench).
# N = B·S = 40 > V = 31 (TEXT's vocabulary): the model folds the embedding into the first
# layer as at training sizes (engine.model.Workspace); tests/test_model.py also runs N < V.
E, H, T, B, S = 16, 24, 5, 5, 8
TEXT = ("the quick brown fox jumps over the lazy dog, and then it sleeps. "
        "a small cat sat on the mat near the door; the dog did not mind. ") * 6


def _device(**kwargs):
    from engine.device import Device

    try:
        return Device(profile=True, **kwargs)
    except Exception as exc:  # DeviceError, or a pyopencl error while creating the context
        reason = f"no OpenCL device could be created: {type(exc).__name__}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (OpenCL tests must never be skipped in CI)", pytrace=False)
        pytest.skip(reason)


def _session_env(name: str, value: str):
    """Set environment variable `name` for the session (the subprocesses inherit it), then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    yield
    if old is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = old


@pytest.fixture(scope="session", autouse=True)
def tune_cache(tmp_path_factory):
    """engine.tune's cache in a session folder ($HYBRID_TUNE_CACHE, inherited by the subprocesses):
    the tests never read or write the user's cache, and a GPU is tuned at most once per session."""
    path = tmp_path_factory.mktemp("tune") / "tune.json"
    for _ in _session_env("HYBRID_TUNE_CACHE", str(path)):
        yield path


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory):
    """engine.teacher's disk cache in a session folder ($HYBRID_TEACHER_CACHE, inherited by the
    subprocesses): the tests never read or write the user's cache of teacher embeddings."""
    path = tmp_path_factory.mktemp("teacher")
    for _ in _session_env("HYBRID_TEACHER_CACHE", str(path)):
        yield path


@pytest.fixture(scope="session")
def dev():
    """One profiled engine.device.Device for the whole session, with the kernel
    variant of its type. No device: a skip on a workstation, a failure in CI
    (the OpenCL tests are the point of CI and must never silently disappear there)."""
    return _device()


@pytest.fixture(scope="session")
def gpu_dev():
    """The same device building the GPU kernel variant (local-memory tiles), small
    tiles so that the edge cases appear at test sizes."""
    d = _device(variant="gpu")
    d.gemm_tile = 8
    return d


def wiring_of(cfg) -> Wiring:
    """The engine.reference.Wiring that reproduces the model part of an engine Config."""
    h, p = cfg.hebb, cfg.proto
    return Wiring(hebb_mode=h.mode, hebb_lr=h.lr, hebb_decay=h.decay, hebb_strength=h.strength,
                  hebb_post=h.post, proto_mode=p.mode, proto_lr=p.lr, proto_strength=p.strength,
                  proto_similarity=p.similarity, proto_usage_decay=p.usage_decay,
                  proto_reseed_threshold=p.reseed_threshold,
                  spike_threshold=cfg.model.spike_threshold)
