"""Fine-tuning end to end on the shipped CIFAR-10: pretrain on classes [0, 1, 2], then fine-tune
on classes [3, 4] through `train.py --init-from` (new head, new image size), head-only, and
with layer-wise lr decay."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax_env
import numpy as np
import pytest
from flax import traverse_util

from vit import checkpoint, pretrained, trainer
from vit.model import init_params, model_from_config

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = str((ROOT.parent / "shared" / "data" / "tfds").resolve())
HEAD = ("head/kernel", "head/bias")


def _config_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke(**overrides):
    c = _config_module("smoke").get_config()
    c.data_dir = DATA_DIR
    c.eval_split = "test[:64]"
    c.update(overrides)
    return c


def _flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _fresh_init(config, num_classes: int):
    """The params the trainer initialises before loading weights (same seed, same split)."""
    model = model_from_config(config.model, num_classes=num_classes, image_size=config.image_size)
    init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    return model, init_params(model, init_rng)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A smoke model trained 4 steps on classes [0, 1, 2]: (workdir, flat params).

    Seed 1, so its weights differ from the seed-0 fresh init of the fine-tuning runs.
    """
    workdir = tmp_path_factory.mktemp("source")
    trainer.train(_smoke(classes=[0, 1, 2], total_steps=4, seed=1), str(workdir))
    return workdir, _flat(checkpoint.load_checkpoint(str(workdir)).params)


def test_cli_finetune_new_classes_new_size(source, tmp_path):
    src_dir, src = source
    env = jax_env.subprocess_env(TFDS_DATA_DIR=DATA_DIR, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/smoke.py",
           f"--workdir={tmp_path}", f"--init-from={src_dir}", "--config.classes=[3,4]",
           "--config.image_size=48", "--config.eval_split=test[:64]",
           "--config.total_steps=4", "--config.warmup_steps=2", "--config.checkpoint_every=1",
           "--config.keep_checkpoints=4"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    final = checkpoint.load_checkpoint(str(tmp_path))
    assert final.step == 4
    assert final.dataset_info["class_names"] == ["cat", "deer"]
    assert final.params["head"]["kernel"].shape == (32, 2)

    # Linear warmup gives lr 0 at step 0, so checkpoint 1 holds exactly the step-0 params:
    # the source weights adapted to 48 px (6x6 patches of 8: posemb 1 + 16 -> 1 + 36 tokens).
    config = _smoke(image_size=48)
    model, fresh = _fresh_init(config, num_classes=2)
    expected, _ = pretrained.adapt_params(src, fresh, model)
    step1 = _flat(checkpoint.load_checkpoint(str(tmp_path), step=1).params)
    expected, fresh = _flat(expected), _flat(fresh)
    assert step1.keys() == expected.keys()
    pos = "Transformer/posembed_input/pos_embedding"
    assert src[pos].shape == (1, 17, 32) and step1[pos].shape == (1, 37, 32)
    for name in step1:
        np.testing.assert_allclose(step1[name], expected[name], atol=1e-7, err_msg=name)
    block = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    np.testing.assert_array_equal(step1[block], src[block])
    assert np.abs(step1[block] - fresh[block]).max() > 0.05  # not a fresh init
    np.testing.assert_array_equal(step1["head/kernel"], fresh["head/kernel"])  # new head

    # After 3 more steps the encoder has moved, but stays near the source, far from a fresh init.
    last = _flat(final.params)
    moved = np.abs(last[block] - src[block]).max()
    assert 0 < moved < 0.02 < np.abs(last[block] - fresh[block]).max()


def test_head_only_leaves_encoder_unchanged(source, tmp_path):
    src_dir, src = source
    config = _smoke(classes=[3, 4], init_from=str(src_dir), trainable="head", lr=0.1,
                    warmup_steps=0, total_steps=3)
    result = trainer.train(config, str(tmp_path))
    params = _flat(result.state.params)
    assert params["head/kernel"].shape == (32, 2)
    for name in params:
        if name not in HEAD:
            np.testing.assert_array_equal(params[name], src[name], err_msg=name)
    _, fresh = _fresh_init(config, num_classes=2)
    assert np.abs(params["head/kernel"] - _flat(fresh)["head/kernel"]).max() > 1e-3


def test_layer_decay_scales_updates_by_depth(source, tmp_path):
    src_dir, src = source
    config = _smoke(classes=[3, 4], init_from=str(src_dir), layer_decay=0.5, warmup_steps=0,
                    total_steps=2, weight_decay=0.0)
    result = trainer.train(config, str(tmp_path))
    assert np.isfinite(result.metrics["train/loss"])
    params = _flat(result.state.params)
    # The new head starts at zero, so step 1 moves only the head; at step 2 Adam moves each
    # encoder weight by about (the same constant) x lr x its layer's multiplier, and depth 2
    # gives the patch embedding 0.5^3 and block 1 0.5^1 of the base rate.
    embed = np.abs(params["embedding/kernel"] - src["embedding/kernel"]).max()
    block = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    top = np.abs(params[block] - src[block]).max()
    assert embed / top == pytest.approx(0.25, rel=0.05)


def test_weights_that_do_not_fit_leave_no_workdir_behind(source, tmp_path):
    """The init_from failure comes after the checkpoints folder was opened: it is removed."""
    src_dir, _ = source
    config = _smoke(init_from=str(src_dir), total_steps=2)
    config.model.width = 64
    with pytest.raises(ValueError, match="weights do not fit the model"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_head_only_fine_tune_refuses_a_fresh_pre_logits_layer(source, tmp_path):
    """It would stay at its random initialisation, frozen with the encoder."""
    src_dir, _ = source
    config = _smoke(init_from=str(src_dir), trainable="head", total_steps=2)
    config.model.representation_size = 16
    with pytest.raises(ValueError, match="trainable='head' trains the head alone, but the "
                                         "pre_logits layer is freshly initialised"):
        trainer.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_head_of_other_classes_is_re_initialised_even_when_its_shape_fits(source, tmp_path):
    """The source's head scores airplane, automobile, bird; a run on cat, deer, dog starts a
    fresh head (same shape), unless init_keep_head=True; the same classes keep it."""
    src_dir, src = source
    heads = {}
    for name, classes, keep in (("other", [3, 4, 5], None), ("kept", [3, 4, 5], True),
                                ("same", [0, 1, 2], None)):
        config = _smoke(classes=classes, init_from=str(src_dir), init_keep_head=keep)
        model, fresh = _fresh_init(config, num_classes=3)
        params = trainer.initial_params(config, model, jax.random.split(
            jax.random.PRNGKey(config.seed))[0], class_names=tuple(
                ("airplane", "automobile", "bird", "cat", "deer", "dog")[c] for c in classes))
        heads[name] = _flat(params)["head/kernel"]
    np.testing.assert_array_equal(heads["other"], _flat(fresh)["head/kernel"])
    np.testing.assert_array_equal(heads["kept"], src["head/kernel"])
    np.testing.assert_array_equal(heads["same"], src["head/kernel"])


def test_weights_learned_on_another_normalisation_are_named(source):
    src_dir, _ = source
    model, fresh = _fresh_init(_smoke(), num_classes=3)
    _, notes = pretrained.load_pretrained(str(src_dir), model, fresh, normalize="cifar10")
    assert ("the weights learned on inputs normalised as 'minus_one_to_one' and this run "
            "normalises as 'cifar10': set pp.normalize=minus_one_to_one to feed them what they "
            "learned on") in notes
    _, same = pretrained.load_pretrained(str(src_dir), model, fresh,
                                         normalize="minus_one_to_one")
    assert not any("normalised as" in note for note in same)
