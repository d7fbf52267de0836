"""vit/losses.py: the two classification losses against NumPy, their evaluation loss with and
without flip TTA, and `config.loss` end to end (training, evaluation, a bad value)."""

import json

import in_process
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_faults import DATA_DIR, _train
from test_tta import _masked_images

from vit import config_schema, losses
from vit.evaluate import evaluate_checkpoint, load_inference_model

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(6, 5)).astype(np.float32) * 3
VIEWS = [LOGITS, RNG.normal(size=(6, 5)).astype(np.float32) * 3]
LABELS = np.array([0, 4, 2, 2, 1, 3])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def _bce(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-example binary cross-entropy summed over classes, from probabilities."""
    return -np.sum(targets * np.log(probs) + (1 - targets) * np.log(1 - probs), axis=-1)


def test_per_example_matches_numpy():
    targets = np.asarray(jax.nn.softmax(RNG.normal(size=(6, 5))), np.float32)  # soft targets
    np.testing.assert_allclose(losses.per_example(LOGITS, targets, "sigmoid_xent"),
                               _bce(_sigmoid(LOGITS), targets), rtol=1e-5)
    np.testing.assert_array_equal(losses.per_example(LOGITS, targets, "softmax_xent"),
                                  optax.softmax_cross_entropy(LOGITS, targets))
    # Zero logits: log 2 per class for sigmoid, log(classes) for softmax.
    one_hot = np.eye(5, dtype=np.float32)[LABELS]
    zeros = np.zeros_like(LOGITS)
    np.testing.assert_allclose(losses.per_example(zeros, one_hot, "sigmoid_xent"),
                               5 * np.log(2), rtol=1e-6)
    np.testing.assert_allclose(losses.per_example(zeros, one_hot, "softmax_xent"), np.log(5),
                               rtol=1e-6)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_label_loss_of_one_view_is_the_per_example_loss(name):
    one_hot = jax.nn.one_hot(LABELS, 5)
    np.testing.assert_allclose(losses.label_loss([LOGITS], jnp.asarray(LABELS), name),
                               losses.per_example(LOGITS, one_hot, name), rtol=1e-6)


def test_label_loss_of_two_views_uses_the_mean_probabilities():
    one_hot = np.eye(5)[LABELS]
    mean_sigmoid = (_sigmoid(VIEWS[0]) + _sigmoid(VIEWS[1])) / 2
    np.testing.assert_allclose(losses.label_loss(VIEWS, jnp.asarray(LABELS), "sigmoid_xent"),
                               _bce(mean_sigmoid, one_hot), rtol=1e-5)
    mean_softmax = sum(np.asarray(jax.nn.softmax(v), np.float64) for v in VIEWS) / 2
    np.testing.assert_allclose(losses.label_loss(VIEWS, jnp.asarray(LABELS), "softmax_xent"),
                               -np.log(mean_softmax[np.arange(6), LABELS]), rtol=1e-5)


def test_unknown_loss_is_one_line():
    with pytest.raises(ValueError, match=r"config.loss='focal' is unknown; use one of "
                                         r"softmax_xent, sigmoid_xent"):
        losses.per_example(LOGITS, LOGITS, "focal")
    config = config_schema.default_config()
    config.loss = "bce"
    with pytest.raises(config_schema.ConfigError, match="config.loss='bce' is unknown"):
        config_schema.validate_config(config)




def test_sigmoid_run_trains_and_evaluates_in_its_own_loss(tmp_path):
    run = _train(tmp_path / "run", "--config.loss=sigmoid_xent", "--config.total_steps=4",
                 "--config.log_every=1", "--config.checkpoint_every=4")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The head's kernel starts at zero: every logit is 0 and each of the 10 classes costs log 2.
    # To float32 summation: 320 terms summed in XLA's order (2e-6 off when not vectorised).
    first = next(line for line in lines if "train/loss" in line)
    assert first["step"] == 1 and first["train/loss"] == pytest.approx(10 * np.log(2), rel=1e-5)
    logged = next(line for line in lines if "eval/loss" in line)
    # The evaluation's loss is the summed binary cross-entropy of the labels, on every example.
    loaded = load_inference_model(str(tmp_path / "run"))
    config = loaded.config
    config.data_dir = DATA_DIR
    images, labels = _masked_images(config)
    probs = _sigmoid(np.asarray(loaded.model.apply({"params": loaded.params}, images)))
    expected = float(np.mean(_bce(probs, np.eye(10)[labels])))
    assert logged["eval/loss"] == pytest.approx(expected, rel=1e-5)
    again = evaluate_checkpoint(str(tmp_path / "run"), data_dir=DATA_DIR)
    assert again.loss == pytest.approx(expected, rel=1e-5) and again.num_examples == len(labels)
    assert in_process.refusal_line(tmp_path / "bad", "--config.loss=softmax") == (
        "error: config.loss='softmax' is unknown; use one of softmax_xent, sigmoid_xent")
