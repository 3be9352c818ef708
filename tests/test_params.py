"""engine.params: the declarations the flat buffers, weight-decay mask, checkpoints and the
initialisation are built from (numpy only, but for the last test, which builds a Trainer)."""
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


@pytest.mark.parametrize("init, std", [("lecun", lambda i, o: 1 / math.sqrt(i)),
                                       ("xavier", lambda i, o: math.sqrt(2 / (i + o))),
                                       ("kaiming", lambda i, o: math.sqrt(2 / i))])
def test_model_init_selects_the_scheme_of_the_linear_layers(init, std):
    V, E, H = 30, 16, 24
    p = init_params(char_lm_params(V, E, H, init), seed=5, dtype=np.float64)
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(p["W_emb"], rng.standard_normal((V, E)))          # the embedding: N(0,1) always
    np.testing.assert_allclose(p["W1"], rng.standard_normal((E, H)) * std(E, H), rtol=1e-15)
    np.testing.assert_allclose(p["W2"], rng.standard_normal((H, V)) * std(H, V), rtol=1e-15)


@pytest.mark.opencl
def test_model_init_reaches_the_trainer(dev):
    from engine.config import Config, apply_overrides
    from engine.train import Trainer
    small = ["model.embedding_dim=16", "model.hidden_dim=32", "model.num_prototypes=8", "train.batch_size=4",
             "train.seq_len=8", "train.eval_batches=1"]
    W1 = {i: Trainer(apply_overrides(Config(), small + [f"model.init={i}"]), device=dev).model.get_params()["W1"]
          for i in ("lecun", "kaiming")}
    np.testing.assert_allclose(W1["kaiming"], W1["lecun"] * math.sqrt(2), rtol=1e-6)   # same draws, scale √2

