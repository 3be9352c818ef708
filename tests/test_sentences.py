"""engine.sentences: the prose splitter (exact outputs on small texts, the default corpus's
count) and the seeded train/validation/test split of sentences. Pure Python + numpy."""
import pytest

from engine.data import DataError, default_corpus
from engine.sentences import split_sentence_set, split_sentences


def test_wrapped_lines_are_joined_and_sentence_ends_split():
    text = ("The first sentence is wrapped\nover two lines.  The second one\nhas odd   spacing! "
            "Is this the third one? \"Quoted starts count as starts too.\" 42 apples make a digit start.")
    assert split_sentences(text) == [
        "The first sentence is wrapped over two lines.",
        "The second one has odd spacing!",
        "Is this the third one?",
        "\"Quoted starts count as starts too.\"",
        "42 apples make a digit start.",
    ]


def test_no_split_before_lower_case_or_after_abbreviations():
    text = "Use a helper, e.g. Foo or Bar, when needed. The value 3.5 is kept whole. See os.path here too."
    assert split_sentences(text, min_words=3) == [
        "Use a helper, e.g. Foo or Bar, when needed.",
        "The value 3.5 is kept whole.",
        "See os.path here too.",
    ]


def test_a_line_followed_by_a_deeper_line_is_a_term():
    text = "Super Binding\n   A dotted lookup searches the base classes in order.\n"
    assert split_sentences(text) == ["A dotted lookup searches the base classes in order."]


def test_blank_line_ends_a_sentence_and_fragments_without_an_end_are_dropped():
    text = "This paragraph has no final stop and\n\ncontinues here after a blank line. A real sentence ends here."
    # neither half of the broken sentence is kept: the first has no end, the second starts lower case
    assert split_sentences(text) == ["A real sentence ends here."]


def test_code_grammar_headings_and_sessions_are_dropped():
    text = """The "assert" statement
**********************

Assert statements are a convenient way to insert assertions:

   assert_stmt ::= "assert" expression ["," expression]

The simple form is equivalent to the following code here.

   if __debug__:
       if not expression: raise AssertionError

>>> print("This is a doctest line.")

   Called when an attribute lookup fails in the usual places.

* A bullet item that wraps
  onto a second line is one sentence.
* Another bullet item is also kept here.
"""
    assert split_sentences(text) == [
        "The simple form is equivalent to the following code here.",
        "Called when an attribute lookup fails in the usual places.",
        "A bullet item that wraps onto a second line is one sentence.",
        "Another bullet item is also kept here.",
    ]


def test_word_bounds_symbols_and_duplicates():
    text = ("Too short here. This has exactly five words. "
            "Exactly six words are in this. This has exactly five words. "
            "The call \"x.__getattr__(y)\" is \"a.b[c]\" ok.")
    assert split_sentences(text, min_words=5, max_words=5) == ["This has exactly five words."]
    assert split_sentences(text, min_words=3, max_words=6) == [
        "Too short here.", "This has exactly five words.", "Exactly six words are in this."]
    with pytest.raises(DataError, match="min_words <= max_words"):
        split_sentences(text, min_words=6, max_words=5)


def test_default_corpus_count_and_determinism():
    a = split_sentences(default_corpus())
    # 1,715 on CPython 3.11.7 (the module docstring); another CPython's help text differs a little
    assert 1400 <= len(a) <= 2100
    assert a == split_sentences(default_corpus())
    assert len(set(a)) == len(a)
    assert all(5 <= len(s.split()) <= 25 for s in a)
    assert "Assignments to \"__debug__\" are illegal." in a
    assert not any("::=" in s or s.startswith(">>>") for s in a)


SENTS = [f"Sentence number {i} is here." for i in range(100)]


def test_split_is_deterministic_disjoint_covering_and_seeded():
    train, val, test = split_sentence_set(SENTS, 0.1, 0.2, seed=0)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == sorted(SENTS)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert split_sentence_set(SENTS, 0.1, 0.2, seed=0) == (train, val, test)
    assert split_sentence_set(SENTS, 0.1, 0.2, seed=1)[2] != test
    for part in (train, val, test):  # the input order is kept
        assert part == sorted(part, key=SENTS.index)


def test_split_matches_the_documented_permutation():
    import numpy as np
    perm = np.random.default_rng(7).permutation(10)
    _, val, test = split_sentence_set(SENTS[:10], 0.2, 0.1, seed=7)
    assert test == [SENTS[perm[0]]]
    assert val == [SENTS[i] for i in sorted(perm[1:3])]


def test_split_errors():
    with pytest.raises(DataError, match="no sentences found"):
        split_sentence_set([], 0.1, 0.1, seed=0)
    with pytest.raises(DataError, match=r"3 sentences are too few .*validation 0"):
        split_sentence_set(SENTS[:3], 0.1, 0.3, seed=0)
    with pytest.raises(DataError, match="sum below 1"):
        split_sentence_set(SENTS, 0.5, 0.5, seed=0)


def test_no_test_split_when_its_fraction_is_zero():
    train, val, test = split_sentence_set(SENTS, 0.2, 0.0, seed=0)
    assert test == [] and len(val) == round(0.2 * len(SENTS)) and len(train) + len(val) == len(SENTS)
    assert val == split_sentence_set(SENTS, 0.2, 0.0, seed=0)[1]
