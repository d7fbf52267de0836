"""Tests for vit.config_changes: which keys changed, and whether a checkpoint still fits."""

import math

import jax
import jax.numpy as jnp
import pytest

from vit import checkpoint, config_changes, nonfinite, optim, trainer


def _state(width: int = 3, ema: bool = True, skip: int = 0) -> trainer.TrainState:
    params = {"dense": {"kernel": jnp.ones((4, width)), "bias": jnp.zeros(width)}}
    config = optim.default_config()
    tx = nonfinite.wrap_optimizer(optim.make_optimizer(config, params), skip)
    return trainer.create_train_state(params, tx, jax.random.PRNGKey(0), use_ema=ema)


def test_changed_keys_are_dotted_and_json_normalised():
    stored = {"lr": 0.001, "model": {"width": 32, "variant": "Ti/8"}, "image_size": [32, 32]}
    new = {"lr": 0.002, "model": {"width": 64, "variant": "Ti/8"}, "image_size": (32, 32),
           "skip_nonfinite": 0}
    assert config_changes.changed_keys(stored, new) == {
        "lr": (0.001, 0.002), "model.width": (32, 64), "skip_nonfinite": ("<absent>", 0)}
    # A checkpoint written before a key existed: the key at its default is no change.
    new["full_tokens_fraction"] = 0.0
    assert config_changes.changed_keys(stored, new, {"full_tokens_fraction": 0.0,
                                                     "skip_nonfinite": 2}) == {
        "lr": (0.001, 0.002), "model.width": (32, 64), "skip_nonfinite": ("<absent>", 0)}


@pytest.mark.parametrize("skip", [0, 2])
def test_saved_structure_reads_back_as_the_built_one(tmp_path, skip):
    state = _state(skip=skip)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, jax.device_get(state), config={}, dataset_info={})  # host numpy, as trained
    ckpt.wait()
    saved = config_changes.structure(ckpt.saved_structure(1))
    ckpt.close()
    built = config_changes.structure(jax.eval_shape(lambda: state))
    assert saved == built and "params/dense/kernel" in built
    assert built["params/dense/kernel"] == ((4, 3), "float32")


def test_a_state_changing_key_fails_in_one_line_and_harmless_ones_pass():
    same = config_changes.structure(_state())
    wider = config_changes.structure(_state(width=5))
    stored = {"model": {"width": 3}, "total_steps": 8, "lr": 0.1}
    new = {"model": {"width": 5}, "total_steps": 12, "lr": 0.1}
    with pytest.raises(config_changes.ConfigChangeError) as info:
        config_changes.check_resume(stored, new, same, wider, where="w/checkpoints/8")
    message = str(info.value)
    assert "\n" not in message and "w/checkpoints/8" in message
    assert "model.width 3 -> 5" in message and "total_steps" not in message
    assert config_changes.check_resume(stored, dict(new, model={"width": 3}), same, same,
                                       where="x") == {"total_steps": (8, 12)}


def test_only_the_keys_that_change_the_state_are_named():
    stored, new = {"ema_decay": None, "lr": 0.001}, {"ema_decay": 0.9, "lr": 0.003}
    tried = []

    def structure_with(key, value):  # what the new config builds with `key` set to `value`
        tried.append((key, value))
        config = dict(new, **{key: value})
        return config_changes.structure(_state(ema=config["ema_decay"] is not None))

    with pytest.raises(config_changes.ConfigChangeError) as info:
        config_changes.check_resume(stored, new, config_changes.structure(_state(ema=False)),
                                    config_changes.structure(_state()), where="w/checkpoints/8",
                                    structure_with=structure_with)
    assert str(info.value) == ("the config changes the train state saved in w/checkpoints/8: "
                               "ema_decay null -> 0.9; resume with the stored values, or train "
                               "in a new --workdir")
    assert tried == [("ema_decay", None), ("lr", 0.001)]


def test_ema_or_skip_on_off_changes_the_structure():
    base = config_changes.structure(_state())
    assert config_changes.structure(_state(ema=False)) != base
    assert config_changes.structure(_state(skip=3)) != base
    with pytest.raises(config_changes.ConfigChangeError, match="yet no key that shapes it"):
        config_changes.check_resume({"total_steps": 1}, {"total_steps": 2}, base,
                                    config_changes.structure(_state(ema=False)), where="x")


def test_optimizer_state_of_adamw_is_part_of_the_structure():
    state = _state()
    paths = config_changes.structure(state)
    assert any(p.startswith("opt_state/") for p in paths)
    assert paths["step"] == ((), "int32") and paths["rng"] == ((2,), "uint32")


def test_a_longer_run_says_how_the_learning_rate_at_the_resumed_step_moves():
    """total_steps 100 -> 200 at step 50 of a cosine decay with 10 warmup steps: the rate goes
    from halfway down the old decay to a quarter of the way down the new one; a constant
    schedule, or the warmup (the same in both), moves nothing."""
    from vit.config_schema import default_config

    config = default_config()
    config.update(lr=1e-3, warmup_steps=10, total_steps=200, schedule="cosine")
    saved = config.to_dict() | {"total_steps": 100}
    line = config_changes.moved_learning_rate(config, saved, 50)
    before = 1e-3 * 0.5 * (1 + math.cos(math.pi * 40 / 90))
    after = 1e-3 * 0.5 * (1 + math.cos(math.pi * 40 / 190))
    assert line == (f"total_steps 100 -> 200 moves the learning rate at step 50 from "
                    f"{before:.4g} to {after:.4g}: the cosine decay now runs over the new length")
    assert config_changes.moved_learning_rate(config, saved, 5) is None  # in the warmup
    # warmup raised past the old length too: the saved keys still build the old schedule
    config.warmup_steps = 150
    assert "from 0.0005868 to 0.0003333" in config_changes.moved_learning_rate(config, saved, 50)
    assert config_changes.moved_learning_rate(config, dict(saved, warmup_steps=500), 50) is None
    config.schedule, saved["schedule"] = "constant", "constant"
    config.warmup_steps = saved["warmup_steps"]
    assert config_changes.moved_learning_rate(config, saved, 50) is None
