"""Prose sentences from any UTF-8 text, and a seeded train/validation/test split of them.

    python -c "from engine.sentences import *; from engine.data import default_corpus; print(len(split_sentences(default_corpus())))"

`split_sentences(text)` is a pure function of the text (no randomness, no locale): the default
corpus (CPython 3.11.7's pydoc topics, 465,126 characters) gives 1,715 sentences of 5-25 words
(a different CPython ships a different help text, hence a different count).

The steps, in order:

1. Blocks. "\\r\\n" and "\\r" become "\\n"; a blank line (only spaces or tabs) ends a block,
   so no sentence runs across a blank line. Inside a block a new segment starts at a line
   that starts a list item ("* ", "- ", "1. ", "(a) ", "[1] ", "IV. ") and after a
   definition-list term (a line followed by a deeper-indented line).
2. Non-prose blocks are dropped whole:
   - a heading: a block holding an underline line ("*****", "=====", "-----", "~~~~");
   - a grammar production: any line with "::=";
   - an interactive session or table: a line starting with ">>>", "... ", "+--" or "|";
   - an indented code block: indented deeper than the block before it AND its first
     character is not an upper-case letter, a digit, a quote or a list marker (code after
     "is equivalent to" starts "if", "def", "class", "x = ", "#", "@", ...);
   - mostly symbols: fewer than 60 % of its non-space characters are letters.
3. The lines of a segment are stripped and joined with one space (wrapped lines become one
   line); all runs of whitespace become one space; a list marker at the start is removed.
4. Sentence ends: ". ", "! " or "? " (optionally with closing quotes/brackets before the
   space) followed by an upper-case letter, a digit, an opening quote or bracket. The
   abbreviations "e.g.", "i.e.", "cf.", "vs.", "Mr.", "Mrs.", "Dr.", "St." and single-letter
   initials ("J.") do not end a sentence.
5. A sentence is kept when it starts with an upper-case letter, a digit or an opening quote,
   ends with ".", "!" or "?" (optionally followed by closing quotes/brackets; a lead-in
   ending in ":" is dropped, as is a heading or fragment with no end), has
   min_words..max_words words (whitespace-separated tokens), and at least 75 % of its
   non-space characters are letters (a "sentence" that is mostly identifiers is code).
6. Exact duplicates are dropped, the first occurrence kept (order is the text's order).

`split_sentence_set(sentences, val_fraction, test_fraction, seed)`: a permutation
`numpy.random.default_rng(seed).permutation(n)` of the sentence indices; the first
n_test = round(n·test_fraction) indices are the test set, the next n_val = round(n·val_fraction)
the validation set, the rest the training set; each set keeps the sentences' original order
(the indices are sorted), so the split depends only on (n, fractions, seed), not on the text.
"""
from __future__ import annotations

import re

import numpy as np

from engine.data import DataError

_UNDERLINE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$")
_TABLE_OR_SESSION = re.compile(r"^\s*(>>>|\.\.\. |\+[-=+]|\|)")
_LIST_MARKER = re.compile(r"^\s*(?:[*\-•]\s+|\d{1,2}[.)]\s+|\([a-z0-9]\)\s+|\[\d{1,2}\]\s+|[IVX]{1,4}\.\s+)")
_PROSE_START = re.compile(r"^[A-Z0-9\"'“‘(\[]|^[*\-•]\s|^\d{1,2}[.)]\s|^\([a-z0-9]\)\s")
_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"'“‘(\[]*[A-Z0-9])")
_KEEP_START = re.compile(r"^[\"'“‘(\[]*[A-Z0-9]")
_KEEP_END = re.compile(r"[.!?][\"'”’)\]]*$")
_ABBREVIATIONS = {"e.g.", "i.e.", "cf.", "vs.", "mr.", "mrs.", "dr.", "st."}
_INITIAL = re.compile(r"^[A-Z]\.$")


def _letter_fraction(s: str) -> float:
    chars = [c for c in s if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _blocks(text: str) -> list[list[str]]:
    """Blocks of non-blank lines, separated by blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def _is_prose_block(lines: list[str], prev_indent: int | None) -> bool:
    if any(_UNDERLINE.match(l) or "::=" in l or _TABLE_OR_SESSION.match(l) for l in lines):
        return False
    first = lines[0].lstrip(" \t")
    if prev_indent is not None and _indent(lines[0]) > prev_indent and not _PROSE_START.match(first):
        return False
    return _letter_fraction(" ".join(lines)) >= 0.6


def _segments(lines: list[str]) -> list[str]:
    """A block's list items (a line starting with a list marker starts one), each joined into
    one whitespace-normalised line without its marker."""
    segs, cur = [], []
    for i, line in enumerate(lines):
        # a definition-list term: a line followed by a deeper-indented description
        term = i + 1 < len(lines) and _indent(lines[i + 1]) > _indent(line) and not _LIST_MARKER.match(line)
        if (_LIST_MARKER.match(line) or term) and cur:
            segs.append(cur)
            cur = []
        cur.append(line.strip())
        if term:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    out = []
    for seg in segs:
        s = " ".join(" ".join(seg).split())
        out.append(_LIST_MARKER.sub("", s, count=1))
    return out


def _split_ends(s: str) -> list[str]:
    """Cut a segment at its sentence ends (step 4 of the module docstring)."""
    parts, start = [], 0
    for m in _END.finditer(s):
        word = s[:m.start() + 1].rsplit(" ", 1)[-1]
        if word.lower() in _ABBREVIATIONS or _INITIAL.match(word):
            continue
        parts.append(s[start:m.end()].strip())
        start = m.end()
    parts.append(s[start:].strip())
    return [p for p in parts if p]


def split_sentences(text: str, min_words: int = 5, max_words: int = 25) -> list[str]:
    """The prose sentences of `text` with min_words..max_words words, first occurrences only,
    in the text's order (the rules are in the module docstring)."""
    if not 1 <= min_words <= max_words:
        raise DataError(f"sentence word bounds must satisfy 1 <= min_words <= max_words, "
                        f"got min_words={min_words!r}, max_words={max_words!r}")
    seen: set[str] = set()
    out: list[str] = []
    prev_indent = None
    for lines in _blocks(text):
        if not _is_prose_block(lines, prev_indent):
            continue
        prev_indent = _indent(lines[0])
        for seg in _segments(lines):
            for s in _split_ends(seg):
                n = len(s.split())
                if not (min_words <= n <= max_words and _KEEP_START.match(s) and _KEEP_END.search(s)
                        and _letter_fraction(s) >= 0.75) or s in seen:
                    continue
                seen.add(s)
                out.append(s)
    return out


def split_sentence_set(sentences: list[str], val_fraction: float, test_fraction: float,
                       seed: int) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test): a seeded permutation of the indices cut into test, val, train (the
    module docstring); each keeps the input order. Each set needs at least one sentence (the test
    set none when test_fraction = 0: no test split)."""
    n = len(sentences)
    if n == 0:
        raise DataError("no sentences found (the text has no prose sentences within the word bounds)")
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"data.val_fraction must be in (0, 1) and data.test_fraction in [0, 1) with a sum below 1, "
                        f"got val_fraction={val_fraction!r}, test_fraction={test_fraction!r}")
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    n_train = n - n_test - n_val
    if min(n_train, n_val) < 1 or (test_fraction > 0 and n_test < 1):
        raise DataError(f"{n} sentences are too few to split with val_fraction={val_fraction}, "
                        f"test_fraction={test_fraction} (train {n_train}, validation {n_val}, "
                        f"test {n_test}; each needs at least 1)")
    perm = np.random.default_rng(seed).permutation(n)
    test_i, val_i, train_i = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    pick = lambda idx: [sentences[i] for i in np.sort(idx)]  # noqa: E731
    return pick(train_i), pick(val_i), pick(test_i)
