"""Knowledge distillation (vit/distill.py): the loss, the teacher's view of the batch, the train
step with a teacher, and train.py distilling from a checkpoint."""

import json
import os

import in_process
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_faults import DATA_DIR, _smoke_config, _train
from tiny_checkpoints import SMALL, write

import vit
from vit import distill, parallel, trainer
from vit.checkpoint import load_checkpoint
from vit.config_schema import default_config
from vit.normalization import normalize_on_device
from vit.train_step import fresh_state, make_train_step, train_optimizer


def _distill(**kw) -> ml_collections.ConfigDict:
    c = distill.default_config()
    c.update(kw)
    return c


def _logits(seed: int, shape=(6, 5)) -> jax.Array:
    return 3.0 * jax.random.normal(jax.random.PRNGKey(seed), shape)


def _cross_entropy(logits, probs) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -(np.asarray(probs, np.float64) * log_p).sum(-1)


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.3, 2.0), (1.0, 4.0)])
def test_the_soft_loss_is_the_weighted_label_and_tempered_teacher_cross_entropies(alpha,
                                                                                 temperature):
    student, teacher = _logits(0), _logits(1)
    targets = jax.nn.one_hot(jnp.arange(6) % 5, 5)
    got = distill.distillation_loss(student, targets, teacher,
                                    _distill(alpha=alpha, temperature=temperature))
    soft_teacher = np.asarray(jax.nn.softmax(teacher / temperature))
    expected = ((1 - alpha) * _cross_entropy(student, targets)
                + alpha * temperature**2 * _cross_entropy(student / temperature, soft_teacher))
    np.testing.assert_allclose(got, expected.mean(), rtol=1e-5)


def test_the_hard_loss_takes_the_teachers_argmax_as_a_label():
    student, teacher = _logits(0), _logits(1)
    targets = jax.nn.one_hot(jnp.arange(6) % 5, 5)
    got = distill.distillation_loss(student, targets, teacher, _distill(mode="hard",
                                                                         temperature=9.0))
    taught = jax.nn.one_hot(jnp.argmax(teacher, -1), 5)
    expected = 0.5 * _cross_entropy(student, targets) + 0.5 * _cross_entropy(student, taught)
    np.testing.assert_allclose(got, expected.mean(), rtol=1e-5)


def test_a_sigmoid_run_takes_its_loss_for_the_labels_and_the_softmax_for_the_teacher():
    student, teacher = _logits(0), _logits(1)
    targets = jax.nn.one_hot(jnp.arange(6) % 5, 5)
    probs = 1 / (1 + np.exp(-np.asarray(student, np.float64)))
    bce = lambda y: -(y * np.log(probs) + (1 - y) * np.log(1 - probs)).sum(-1)
    labels = np.asarray(targets, np.float64)
    soft = distill.distillation_loss(student, targets, teacher, _distill(temperature=2.0),
                                     "sigmoid_xent")
    expected = 0.5 * bce(labels) + 0.5 * 4.0 * _cross_entropy(
        student / 2.0, np.asarray(jax.nn.softmax(teacher / 2.0)))
    np.testing.assert_allclose(soft, expected.mean(), rtol=1e-5)
    hard = distill.distillation_loss(student, targets, teacher, _distill(mode="hard"),
                                     "sigmoid_xent")
    taught = np.eye(5)[np.argmax(np.asarray(teacher), -1)]
    np.testing.assert_allclose(hard, (0.5 * bce(labels) + 0.5 * bce(taught)).mean(), rtol=1e-5)
    assert distill.training_loss(student, targets, None, _distill(), "sigmoid_xent") == \
        pytest.approx(bce(labels).mean(), rel=1e-5)


def test_at_temperature_one_the_gradient_is_that_of_labels_mixed_with_the_teacher():
    """Function matching: (1 - a) CE(y) + a CE(p_teacher) is CE against (1 - a) y + a p."""
    student, teacher = _logits(0), _logits(1)
    targets = jax.nn.one_hot(jnp.arange(6) % 5, 5)
    grad = jax.grad(lambda s: distill.distillation_loss(s, targets, teacher,
                                                        _distill(alpha=0.25)))(student)
    mixed = 0.75 * targets + 0.25 * jax.nn.softmax(teacher)
    np.testing.assert_allclose(
        grad, jax.grad(lambda s: optax.softmax_cross_entropy(s, mixed).mean())(student),
        atol=1e-7)


@pytest.mark.parametrize("source, target", [("minus_one_to_one", "imagenet"),
                                            ("cifar10", "minus_one_to_one")])
def test_the_teacher_sees_the_same_pixels_in_its_own_normalisation(source, target):
    pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8))
    moved = distill.renormalize(normalize_on_device(pixels, source), source, target)
    np.testing.assert_allclose(moved, normalize_on_device(pixels, target), atol=1e-5)


def _step_config(alpha: float) -> ml_collections.ConfigDict:
    config = default_config()
    config.update(optimizer="sgd", lr=0.5, warmup_steps=0, total_steps=10, weight_decay=0.0,
                  grad_clip_norm=None)
    config.distill.alpha = alpha
    return config


@pytest.mark.parametrize("alpha, moves", [(1.0, False), (0.0, True)])
def test_a_student_that_is_its_teacher_learns_nothing_from_it(alpha, moves):
    """At alpha = 1 the gradient is the KL divergence's, zero where student = teacher; the same
    step on the labels alone (alpha = 0) does move the parameters."""
    model = vit.create_model("Ti/4", num_classes=5, image_size=16, **{
        k: v for k, v in SMALL.items() if k != "variant"})
    params = vit.init_params(model, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(  # a non-zero head, so the teacher's outputs vary
        lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    config = _step_config(alpha)
    teacher = distill.Teacher(model, params, config.pp.normalize)
    tx = train_optimizer(config, params)
    state = fresh_state(config, params, tx, jax.random.PRNGKey(2))
    step = jax.pmap(make_train_step(model, tx, config, 5, teacher), axis_name=parallel.AXIS)
    batch = {"image": np.random.default_rng(0).integers(0, 256, (1, 8, 16, 16, 3), np.uint8),
             "label": np.arange(8, dtype=np.int32)[None] % 5}
    new, metrics = step(parallel.replicate(state), batch, parallel.replicate(params))
    moved = max(float(jnp.abs(a[0] - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(params), strict=True))
    assert (moved > 1e-3) if moves else (moved < 1e-6), moved
    assert np.isfinite(metrics["loss"][0])


def test_train_py_distils_from_a_checkpoint_and_refuses_what_cannot_be(tmp_path):
    """A 16 px teacher (resized to) for the 32 px smoke student; then the one-line errors."""
    write(str(tmp_path / "teacher"), dict(SMALL, classifier="gap"), num_classes=10,
          image_size=16, dataset="cifar10", data_dir=DATA_DIR)
    relative = os.path.relpath(tmp_path / "teacher")  # kept absolute: a resume reads it again
    run = _train(tmp_path / "student", f"--config.distill.teacher={relative}",
                 "--config.distill.temperature=2.0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "eval/top1: " in run.stdout
    saved = load_checkpoint(str(tmp_path / "student")).config["distill"]["teacher"]
    assert saved == str(tmp_path / "teacher")
    in_process.train(tmp_path / "plain")  # the same run without a teacher
    losses = [[json.loads(line)["train/loss"] for line in
               (tmp_path / name / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in line] for name in ("student", "plain")]
    assert len(losses[0]) == len(losses[1]) == 2 and losses[0] != losses[1]  # the teacher acts
    # The refusals, in this process (train.py prints each as its one `error:` line)
    def refused(name: str, **distill) -> str:
        config = _smoke_config(8)
        config.distill.update(distill)
        with pytest.raises(ValueError) as info:
            trainer.train(config, str(tmp_path / name))
        assert not (tmp_path / name).exists() and "\n" not in str(info.value)
        return str(info.value)

    write(str(tmp_path / "five"), SMALL, num_classes=5)
    assert refused("a", teacher=str(tmp_path / "five")) == (
        f"teacher {str(tmp_path / 'five')!r} has 5 classes but the student's dataset has "
        "10: distil from a teacher trained on the same classes")
    assert refused("b", alpha=2.0) == ("config.distill: alpha must be in [0, 1] (the teacher's "
                                       "share of the loss), got 2.0")
    assert refused("c", teacher=str(tmp_path / "nowhere")).startswith(
        f"config.distill.teacher: checkpoint path {tmp_path / 'nowhere'} does not exist")
    # The same number of classes, named in another order: it would teach wrong labels.
    write(str(tmp_path / "reversed"), SMALL, num_classes=10, dataset="cifar10",
          data_dir=DATA_DIR, classes=tuple(range(9, -1, -1)))
    assert refused("d", teacher=str(tmp_path / "reversed")) == (
        f"teacher {str(tmp_path / 'reversed')!r} was trained on other classes (truck, "
        "ship, horse, ...) than the student's (airplane, automobile, bird, ...): distil from a "
        "teacher of the same classes, in the same order")
    # A finished run is only evaluated: its teacher is not read (here it has moved away).
    again = in_process.train(tmp_path / "plain", f"--config.distill.teacher={tmp_path / 'nowhere'}")
    assert "eval/top1" in again.metrics
