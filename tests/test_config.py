"""engine/config.py: defaults, JSON round trip, overrides and error messages (pure Python).

    python -m pytest tests/test_config.py -q
"""
import dataclasses
import json

import numpy as np
import pytest

from engine.config import (Config, ConfigError, OptimConfig, TrainConfig, apply_overrides,
                           dotted_keys, parse_override, with_overrides)


def test_defaults_match_the_spec():
    c = Config()
    assert (c.seed, c.device) == (0, "")
    assert (c.data.path, c.data.val_fraction, c.data.test_fraction) == ("", 0.1, 0.0)
    assert (c.model.embedding_dim, c.model.hidden_dim, c.model.num_prototypes) == (128, 384, 72)
    assert (c.hebb.mode, c.hebb.lr, c.hebb.decay, c.hebb.post) == ("fast_weights", 1.0, 0.5, "spikes")
    assert (c.proto.mode, c.proto.similarity, c.proto.init) == ("feature", "cosine", "kmeans++")
    assert (c.optim.lr, c.optim.beta2, c.optim.warmup_steps, c.optim.schedule) == (3e-3, 0.99, 100, "cosine")
    assert (c.train.batch_size, c.train.seq_len, c.train.steps, c.train.eval_batches) == (64, 64, 2000, 0)
    assert c.train.profile is True and c.train.patience == 0


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optim.lr = 1.0


def test_json_round_trip_is_equal_and_sorted():
    c = apply_overrides(Config(), ["hebb.mode=modulate", "optim.lr=3e-4", "train.profile=false",
                                   "data.path=/tmp/a b.txt", "seed=7"])
    text = c.to_json()
    assert Config.from_json(text) == c
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert text.startswith('{\n  "data": {')          # indent 2, sorted keys
    assert Config.from_dict(c.to_dict()) == c


def test_flat_has_dotted_keys_and_values():
    f = apply_overrides(Config(), ["proto.lr=0.25"]).flat()
    assert f["proto.lr"] == 0.25 and f["seed"] == 0 and f["train.profile"] is True
    # seed device tune, data, model, hebb, proto, optim, train, transformer, memnet, lattice
    assert len(f) == 3 + 3 + 7 + 7 + 7 + 12 + 9 + 9 + 11 + 19 == len(dotted_keys())
    assert all(not isinstance(v, dict) for v in f.values())


def test_from_dict_partial_keeps_defaults_and_coerces_int_to_float():
    c = Config.from_dict({"optim": {"lr": 1}, "train": {"steps": 5}})
    assert c.optim.lr == 1.0 and type(c.optim.lr) is float
    assert c.train.steps == 5 and c.optim.beta1 == 0.9
    assert json.loads(c.to_json())["optim"]["lr"] == 1.0


@pytest.mark.parametrize("text, key, value", [
    ("hebb.lr=0.5", "hebb.lr", 0.5),
    ("optim.lr=3e-4", "optim.lr", 3e-4),
    ("optim.lr=1", "optim.lr", 1.0),
    ("train.steps=10", "train.steps", 10),
    ("train.steps= +10 ", "train.steps", 10),
    ("train.profile=no", "train.profile", False),
    ("train.profile=YES", "train.profile", True),
    ("train.profile=0", "train.profile", False),
    ("train.profile=true", "train.profile", True),
    ("device=0:1", "device", "0:1"),
    ("data.path=a=b.txt", "data.path", "a=b.txt"),
    ("hebb.mode=off", "hebb.mode", "off"),
])
def test_override_produces_typed_value(text, key, value):
    got = apply_overrides(Config(), [text]).flat()[key]
    assert got == value and type(got) is type(value)


def test_overrides_apply_in_order_and_do_not_mutate():
    base = Config()
    c = apply_overrides(base, ["train.steps=10", "train.steps=20"])
    assert c.train.steps == 20 and base.train.steps == 2000


def test_parse_override():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", "3e-4")
    assert parse_override(" a.b =x=y") == ("a.b", "x=y")
    for bad in ["optim.lr", "=3"]:
        with pytest.raises(ConfigError, match="not of the form key=value"):
            parse_override(bad)


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["trian.steps=3"], "unknown config key 'trian.steps' (did you mean 'train.steps'?)"),
    (["lr=1"], "unknown config key 'lr' (did you mean 'hebb.lr' or 'proto.lr' or 'optim.lr'?)"),
    (["zzz=1"], "unknown config key 'zzz'"),
    (["optim.lr.x=1"], "unknown config key 'optim.lr.x' (did you mean 'optim.lr'?)"),
    (["optim=1"], "config key 'optim' is a section; set one of its keys, e.g. 'optim.lr'"),
    (["train.steps=1.5"], "config key 'train.steps' expects an int, got '1.5'"),
    (["train.steps=1e3"], "config key 'train.steps' expects an int, got '1e3'"),
    (["optim.lr=fast"], "config key 'optim.lr' expects a float, got 'fast'"),
    (["train.profile=maybe"], "config key 'train.profile' expects a bool, got 'maybe'"),
    (["optim.lr=-1"], "config key 'optim.lr' must be > 0, got -1.0"),
    (["optim.lr=0"], "config key 'optim.lr' must be > 0, got 0.0"),
    (["optim.lr=nan"], "config key 'optim.lr' must be finite, got nan"),
    (["optim.beta1=1"], "config key 'optim.beta1' must be in [0, 1), got 1.0"),
    (["hebb.decay=1.5"], "config key 'hebb.decay' must be in [0, 1], got 1.5"),
    (["data.val_fraction=0"], "config key 'data.val_fraction' must be in (0, 1), got 0.0"),
    (["data.test_fraction=-0.1"], "config key 'data.test_fraction' must be in [0, 1), got -0.1"),
    (["data.val_fraction=0.5", "data.test_fraction=0.5"],
     "config keys 'data.val_fraction' + 'data.test_fraction' must be < 1 (the rest is the training split), "
     "got 0.5 + 0.5"),
    (["train.patience=-1"], "config key 'train.patience' must be >= 0, got -1"),
    (["proto.usage_decay=1"], "config key 'proto.usage_decay' must be in [0, 1), got 1.0"),
    (["optim.weight_decay=-0.1"], "config key 'optim.weight_decay' must be >= 0, got -0.1"),
    (["model.num_prototypes=0"], "config key 'model.num_prototypes' must be >= 1, got 0"),
    (["train.seq_len=1"], "config key 'train.seq_len' must be >= 2 for model.family='hybrid' (the memory needs a "
                          "past), got 1"),
    (["model.family=lattice"], "config key 'train.seq_len' must be 1 for model.family='lattice' (one sentence "
                               "embedding per row), got 64"),
    (["lattice.neighbours=7"], "config key 'lattice.neighbours' must be one of 6, 26; got 7"),
    (["lattice.loss_mse=0", "lattice.loss_cos=0"], "config keys 'lattice.loss_mse' and 'lattice.loss_cos' are both "
                                                   "0: nothing to learn"),
    (["train.batch_size=0"], "config key 'train.batch_size' must be >= 1, got 0"),
    (["train.checkpoint_every=-1"], "config key 'train.checkpoint_every' must be >= 0, got -1"),
    (["seed=-1"], "config key 'seed' must be in [0, 4294967296), got -1"),
    (["hebb.mode=fast"],
     "config key 'hebb.mode' must be one of off, shadow, modulate, fast_weights; got 'fast'"),
    (["proto.similarity=l2"], "config key 'proto.similarity' must be one of cosine, dot; got 'l2'"),
    (["optim.schedule=linear"], "config key 'optim.schedule' must be one of cosine, constant; got 'linear'"),
])
def test_override_errors_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(Config(), overrides)
    assert str(exc.value) == message


def test_zero_means_off_values_are_valid():
    c = apply_overrides(Config(), ["optim.clip_norm=0", "optim.warmup_steps=0", "hebb.lr=0",
                                   "train.checkpoint_every=0", "train.eval_every=99999",
                                   "proto.reseed_threshold=0"])
    assert (c.optim.clip_norm, c.train.checkpoint_every, c.train.eval_every) == (0.0, 0, 99999)


def test_from_dict_errors():
    with pytest.raises(ConfigError, match=r"^unknown config key 'optm' \(did you mean 'optim'\?\)$"):
        Config.from_dict({"optm": {"lr": 1.0}})
    with pytest.raises(ConfigError, match=r"^unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)$"):
        Config.from_dict({"train": {"stepz": 1}})
    with pytest.raises(ConfigError, match=r"^config section 'optim' expects a dict, got 3$"):
        Config.from_dict({"optim": 3})
    with pytest.raises(ConfigError, match=r"^config key 'seed' expects an int, got True$"):
        Config.from_dict({"seed": True})
    with pytest.raises(ConfigError, match=r"^config key 'train.profile' expects a bool, got 1$"):
        Config.from_dict({"train": {"profile": 1}})
    with pytest.raises(ConfigError, match=r"^config key 'train.steps' expects an int, got 1.5$"):
        Config.from_dict({"train": {"steps": 1.5}})
    with pytest.raises(ConfigError, match=r"^config JSON is invalid"):
        Config.from_json("{nope")


def test_direct_construction_is_validated():
    with pytest.raises(ConfigError, match=r"^config key 'optim.lr' must be > 0, got -1.0$"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"^config key 'train' expects a TrainConfig section"):
        Config(train={"steps": 3})
    assert Config(train=TrainConfig(steps=3)).train.steps == 3


def test_with_overrides_typed_values_validated_and_numpy_scalars_converted():
    c = with_overrides(Config(), {"hebb.lr": np.float32(0.5), "train.steps": np.int64(7)})
    assert c.hebb.lr == 0.5 and type(c.hebb.lr) is float
    assert c.train.steps == 7 and type(c.train.steps) is int
    json.loads(c.to_json())                            # plain JSON types only
    with pytest.raises(ConfigError, match=r"^config key 'train.steps' expects an int, got 1.5$"):
        with_overrides(Config(), {"train.steps": 1.5})
    with pytest.raises(ConfigError, match=r"did you mean 'proto.lr'"):
        with_overrides(Config(), {"proto.lrr": 0.1})


def test_apply_overrides_rejects_a_bare_string():
    with pytest.raises(ConfigError, match="list of 'key=value' strings"):
        apply_overrides(Config(), "optim.lr=1")
