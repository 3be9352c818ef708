"""Build the shipped teacher cache engine/assets/teacher_default.npz with the real teacher.

    PYTHONPATH=. python scripts/make_teacher_cache.py [--out engine/assets/teacher_default.npz]

Embeds every sentence of `split_sentences(default_corpus())` with all-MiniLM-L6-v2 in the
teacher subprocess (engine.teacher, batch 64; this process imports no torch) and writes a
compressed .npz with:
  sentences (N,) str, sha256 (N,) str (sha256 of each sentence's UTF-8 bytes),
  vectors (N, 384) float32 (unit norm), model_sha256 () str (of model.safetensors),
  versions () str (JSON: the teacher packages' versions), python () str (the CPython whose
  help text is the default corpus), seconds () float64 (wall time of the subprocess).
Needs the teacher: pip install torch==2.13.0 && pip install -e '.[teacher]'.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from engine import teacher
from engine.data import default_corpus
from engine.sentences import split_sentences


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(teacher.SHIPPED))
    args = ap.parse_args(argv)
    missing = teacher._missing_modules()
    if missing:
        print(f"error: the teacher is not installed (missing {', '.join(missing)}): {teacher.INSTALL}",
              file=sys.stderr)
        return 1
    sentences = split_sentences(default_corpus())
    t0 = time.perf_counter()
    vecs = teacher._subprocess_embed(sentences, progress=True)
    seconds = time.perf_counter() - t0
    norms = np.linalg.norm(vecs, axis=1)
    if vecs.shape != (len(sentences), teacher.DIM) or np.abs(norms - 1).max() > 1e-5:
        print(f"error: unexpected teacher output {vecs.shape}, norms {norms.min()}..{norms.max()}", file=sys.stderr)
        return 1
    info = teacher.teacher_info()
    tmp = args.out + ".tmp.npz"
    np.savez_compressed(tmp, sentences=np.array(sentences), sha256=np.array(
        [teacher.sentence_sha256(s) for s in sentences], dtype="U64"), vectors=vecs.astype(np.float32),
        model_sha256=np.array(info["model_sha256"]), versions=np.array(json.dumps(info["versions"])),
        python=np.array(platform.python_version()), seconds=np.array(seconds))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(sentences)} sentences, {os.path.getsize(args.out)} bytes, "
          f"{seconds:.1f} s ({len(sentences) / seconds:.1f} sentences/s including the model load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
