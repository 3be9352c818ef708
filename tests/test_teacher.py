"""engine.teacher: the caches with a fake embedder (no torch), the shipped cache, the errors, and
ONE test of the real teacher in its subprocess (skipped only outside CI when it is missing)."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import teacher
from engine.data import default_corpus
from engine.sentences import split_sentences
from engine.teacher import DIM, MINILM_SHA256, DiskCache, TeacherCacheWarning, TeacherError, embed

ROOT = Path(__file__).resolve().parents[1]


def fake_vector(s: str) -> np.ndarray:
    """A unit vector that is a function of the sentence only."""
    seed = int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class Fake:
    def __init__(self):
        self.calls = []

    def __call__(self, sentences):
        self.calls.append(list(sentences))
        return np.stack([fake_vector(s) for s in sentences])


def new(n, tag="x"):
    return [f"Made-up sentence {tag} number {i} for the cache tests." for i in range(n)]


def test_model_sha256_and_info():
    assert MINILM_SHA256.startswith("53aa5117") and MINILM_SHA256.endswith("d9db")
    assert teacher.model_sha256() == MINILM_SHA256   # installed (hashed from the file) or the constant
    info = teacher.teacher_info()
    assert info["model_sha256"] == MINILM_SHA256
    assert set(info["versions"]) == set(teacher.TEACHER_PACKAGES)


def test_hits_and_misses_are_counted_and_only_misses_computed(tmp_path, capsys):
    a, b, c = new(3)
    fake = Fake()
    out = embed([a, b, a], cache_dir=tmp_path, embedder=fake)
    assert fake.calls == [[a, b]]                      # the duplicate is computed once
    np.testing.assert_array_equal(out, np.stack([fake_vector(a), fake_vector(b), fake_vector(a)]))
    assert "3 sentences: 0 from the shipped cache, 0 from" in capsys.readouterr().err
    out = embed([b, c], cache_dir=tmp_path, embedder=fake)
    assert fake.calls[1] == [c]
    np.testing.assert_array_equal(out, np.stack([fake_vector(b), fake_vector(c)]))
    assert ", 1 to compute" in capsys.readouterr().err
    embed([a, b, c], cache_dir=tmp_path, embedder=fake, progress=False)
    assert len(fake.calls) == 2 and capsys.readouterr().err == ""
    assert embed([], cache_dir=tmp_path, embedder=fake).shape == (0, DIM)


def test_cap_zero_stores_nothing(tmp_path):
    fake = Fake()
    embed(new(2), cache_dir=tmp_path, cap_mb=0, embedder=fake)
    embed(new(2), cache_dir=tmp_path, cap_mb=0, embedder=fake)
    assert len(fake.calls) == 2 and list(tmp_path.iterdir()) == []


def test_a_write_is_atomic(tmp_path, monkeypatch):
    a, b = new(2, "atomic")
    cache = DiskCache(tmp_path, MINILM_SHA256, 256)
    cache.store({teacher.sentence_sha256(a): fake_vector(a)})
    shard = cache.shard(teacher.sentence_sha256(a))
    before = shard.read_bytes()

    def savez_dies(fh, **arrays):
        fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(teacher.np, "savez", savez_dies)
    key_b = teacher.sentence_sha256(b)
    with pytest.raises(KeyboardInterrupt):
        cache.store({teacher.sentence_sha256(a): fake_vector(b), key_b: fake_vector(b)})
    assert shard.read_bytes() == before                 # the old shard is untouched
    assert [p.name for p in shard.parent.iterdir()] == [shard.name]   # no temp file left behind


def _in_distinct_shards(n):
    picked, seen = [], set()
    for s in new(200, "lru"):
        k = teacher.sentence_sha256(s)[:2]
        if k not in seen:
            seen.add(k)
            picked.append(s)
        if len(picked) == n:
            return picked


def test_least_recently_used_shards_are_evicted_under_the_cap(tmp_path):
    a, b, c = _in_distinct_shards(3)
    fake = Fake()
    embed([a], cache_dir=tmp_path, embedder=fake)
    cache = DiskCache(tmp_path, MINILM_SHA256, 1)
    sa, sb, sc = (cache.shard(teacher.sentence_sha256(s)) for s in (a, b, c))
    cap_mb = 2.5 * sa.stat().st_size / 2**20           # room for two one-sentence shards
    embed([b], cache_dir=tmp_path, cap_mb=cap_mb, embedder=fake)
    os.utime(sa, (1000, 1000))
    os.utime(sb, (2000, 2000))                          # b is newer than a ...
    embed([a], cache_dir=tmp_path, cap_mb=cap_mb, embedder=fake)   # ... until a hit touches a
    assert len(fake.calls) == 2
    embed([c], cache_dir=tmp_path, cap_mb=cap_mb, embedder=fake)
    assert sa.exists() and sc.exists() and not sb.exists()
    embed([a, b, c], cache_dir=tmp_path, cap_mb=cap_mb, embedder=fake)
    assert fake.calls[-1] == [b]                        # only the evicted one is recomputed


def test_a_corrupt_shard_is_ignored_with_a_warning_and_rewritten(tmp_path):
    a, = new(1, "corrupt")
    fake = Fake()
    embed([a], cache_dir=tmp_path, embedder=fake)
    shard = DiskCache(tmp_path, MINILM_SHA256, 1).shard(teacher.sentence_sha256(a))
    shard.write_bytes(b"not an npz file")
    with pytest.warns(TeacherCacheWarning, match="ignoring corrupt shard .*" + shard.name):
        out = embed([a], cache_dir=tmp_path, embedder=fake)
    assert len(fake.calls) == 2
    np.testing.assert_array_equal(out[0], fake_vector(a))
    with np.load(shard) as z:                           # the next write replaced it with a good one
        assert list(z["sha256"]) == [teacher.sentence_sha256(a)]


def test_a_failed_store_is_a_warning_not_an_error(tmp_path, monkeypatch):
    def full(path, entries):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(teacher, "_write_atomic", full)
    a, = new(1, "full")
    with pytest.warns(TeacherCacheWarning, match="could not store 1 embeddings .*No space left"):
        out = embed([a], cache_dir=tmp_path, embedder=Fake())
    np.testing.assert_array_equal(out[0], fake_vector(a))


WRITER = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_teacher import Fake, new
from engine.teacher import embed
sents = new(300, {tag!r})
for i in range(0, 300, 50):   # six writes each, so that the two processes' writes interleave
    embed(sents[i:i + 50], cache_dir={cache!r}, embedder=Fake(), progress=False)
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(ROOT / "tests"), tag=tag,
                                                                    cache=str(tmp_path))], env=env)
             for tag in ("p", "q")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]

    def never(sentences):
        raise AssertionError(f"{len(sentences)} sentences were lost")
    both = new(300, "p") + new(300, "q")
    out = embed(both, cache_dir=tmp_path, embedder=never, progress=False)
    np.testing.assert_array_equal(out, np.stack([fake_vector(s) for s in both]))


def test_missing_teacher_is_a_one_line_error_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher, "_missing_modules", lambda: ["torch", "sentence_transformers"])
    corpus = split_sentences(default_corpus())[:20]
    with pytest.raises(TeacherError) as e:
        embed(corpus + new(2, "missing"), cache_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("2 of 22 sentences have no cached teacher embedding")
    assert "pip install torch==2.13.0 && pip install -e '.[teacher]'" in msg
    out = embed(corpus, cache_dir=tmp_path)             # the shipped cache needs no teacher
    assert out.shape == (20, DIM) and list(tmp_path.iterdir()) == []


def test_a_failing_subprocess_reports_its_last_stderr_line(tmp_path):
    with pytest.raises(TeacherError, match=r"exit 2\): teacher: model dir .*nowhere does not exist$"):
        teacher._subprocess_embed(["One sentence here."], progress=False, model_dir=str(tmp_path / "nowhere"))


def test_a_wrong_shape_from_the_embedder_is_an_error(tmp_path):
    with pytest.raises(TeacherError, match=r"shape \(1, 3\) .* expected \(1, 384\)"):
        embed(new(1, "shape"), cache_dir=tmp_path, embedder=lambda s: np.zeros((1, 3)))


def test_the_shipped_cache_covers_the_default_corpus_with_unit_vectors():
    with np.load(teacher.SHIPPED) as z:
        sents, keys, vecs = list(z["sentences"]), list(z["sha256"]), z["vectors"]
        assert str(z["model_sha256"]) == MINILM_SHA256
        assert json.loads(str(z["versions"]))["sentence-transformers"] == "6.2.0"
        python = str(z["python"])
    assert vecs.dtype == np.float32 and vecs.shape == (len(sents), DIM)
    assert keys == [teacher.sentence_sha256(s) for s in sents]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    if ".".join(python.split(".")[:2]) != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the shipped cache holds CPython {python}'s help text; this is {sys.version.split()[0]}")
    assert sents == split_sentences(default_corpus())


REAL = """
import json, sys, numpy as np
from engine.teacher import embed
v = embed(json.loads(sys.argv[1]), cache_dir=sys.argv[2], shipped=False, progress=False)
np.save(sys.argv[3], v)
print(json.dumps({{"torch": "torch" in sys.modules, "st": "sentence_transformers" in sys.modules}}))
"""


def test_the_real_teacher_in_its_subprocess(tmp_path):
    """The real MiniLM on 2 default-corpus sentences + 1 new one, in a clean engine process
    (so that no other test's import of torch can hide an import by embed)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        reason = f"the teacher is not installed: {teacher.INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (the real-teacher test must not be skipped in CI)", pytrace=False)
        pytest.skip(reason)
    with np.load(teacher.SHIPPED) as z:
        shipped = dict(zip(z["sentences"], z["vectors"]))
    corpus = split_sentences(default_corpus())
    picks = [corpus[0], corpus[len(corpus) // 2], "A lattice of cells learns to copy a teacher."]
    out = tmp_path / "v.npy"
    r = subprocess.run([sys.executable, "-c", REAL.format(), json.dumps(picks), str(tmp_path / "c"), str(out)],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == {"torch": False, "st": False}
    v = np.load(out)
    assert v.shape == (3, DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v[0], shipped[picks[0]], atol=1e-5)
    np.testing.assert_allclose(v[1], shipped[picks[1]], atol=1e-5)
    assert abs(float(v[2] @ v[0])) < 0.9               # the new sentence is not a copy of another
