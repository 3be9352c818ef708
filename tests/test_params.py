"""engine.params: the declarations the flat buffers, weight-decay mask, checkpoints and the
initialisation are built from (no device needed)."""
import math

import numpy as np
import pytest

from engine.model import CHUNK, Layout
from engine.params import ParamSpec, char_lm_params, init_params


def test_char_lm_declarations_give_the_layout_and_decay_mask():
    V, E, H = 30, 16, 24
    lay = Layout.build(V, E, H)
    assert lay.names == ("W_emb", "W1", "b1", "W2", "b2")
    assert lay.shapes["W2"] == (H, 32) and lay.shapes["b2"] == (32,)      # V padded to 8 columns
    assert all(o % CHUNK == 0 for o in lay.offsets.values())
    owner = lay.chunk_owner()
    assert len(owner) == lay.total // CHUNK
    mask = lay.decay_mask()
    assert [m for m, o in zip(mask, owner) if o == "b1"] == [0.0] and {m for m, o in zip(mask, owner) if o == "W1"} == {1.0}
    assert mask.sum() == sum(-(-lay.size(n) // CHUNK) for n in ("W_emb", "W1", "W2"))


def test_init_draws_in_declaration_order_with_the_declared_scales():
    V, E, H = 30, 16, 24
    p = init_params(char_lm_params(V, E, H), seed=3, dtype=np.float64)
    rng = np.random.default_rng(3)           # docs/model.md: W_emb ~ N(0,1), then W1, then W2 (biases: no draw)
    np.testing.assert_array_equal(p["W_emb"], rng.standard_normal((V, E)))
    np.testing.assert_array_equal(p["W1"], rng.standard_normal((E, H)) / math.sqrt(E))
    np.testing.assert_array_equal(p["W2"], rng.standard_normal((H, V)) / math.sqrt(H))
    assert not p["b1"].any() and p["b2"].shape == (V,)


def test_a_bad_initialisation_is_refused_by_name():
    with pytest.raises(ValueError, match="W: init must be one of"):
        ParamSpec("W", (2, 2), init="xavier_typo")
