"""vit.adversarial: eps 0 is the identity, perturbations stay in the ball, adversarial training
perturbs within eps and resumes exactly, config errors are one line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit import adversarial, config_schema, optim, parallel, trainer
from vit.model import init_params, model_from_config

MODEL = {"variant": "Ti/8", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}


@pytest.fixture(scope="module")
def tiny():
    """A random tiny ViT on 16x16 images, its params, and a batch of pixels and labels."""
    model = model_from_config(MODEL, num_classes=10, image_size=16)
    params = init_params(model, jax.random.PRNGKey(0))
    head = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
    params = dict(params, head=dict(params["head"], kernel=head))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(8, 16, 16, 3)).astype(np.float32) / 255
    labels = rng.integers(0, 10, size=8).astype(np.int32)
    return model, params, jnp.asarray(pixels), jnp.asarray(labels)


def _loss_fn(model, params, labels):
    def loss_fn(x):
        logits = model.apply({"params": params}, adversarial.normalize(x, "minus_one_to_one"))
        loss = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
        return loss, logits

    return loss_fn


@pytest.mark.parametrize(("attack", "norm"), [("fgsm", "linf"), ("pgd", "l2")])
def test_eps_zero_returns_the_clean_pixels_exactly(tiny, attack, norm):
    model, params, pixels, labels = tiny
    eps = jnp.float32(0.0)
    adv, correct = adversarial.iterate(
        _loss_fn(model, params, labels), pixels, jnp.zeros_like(pixels), eps,
        adversarial.eval_step_sizes(attack, eps, 4), norm, labels)
    np.testing.assert_array_equal(np.asarray(adv), np.asarray(pixels))
    clean = model.apply({"params": params}, adversarial.normalize(pixels, "minus_one_to_one"))
    np.testing.assert_array_equal(np.asarray(correct), np.asarray(clean.argmax(-1) == labels))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_the_ball_and_in_range_and_hurts(tiny, norm):
    model, params, pixels, labels = tiny
    eps = jnp.float32(8 / 255 if norm == "linf" else 0.5)
    loss_fn = _loss_fn(model, params, labels)
    adv, _ = adversarial.iterate(loss_fn, pixels, jnp.zeros_like(pixels), eps,
                                 adversarial.eval_step_sizes("pgd", eps, 5), norm, labels)
    delta = np.asarray(adv - pixels).reshape(8, -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert (size <= float(eps) * (1 + 1e-5) + 1e-7).all()
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float(loss_fn(adv)[0]) > float(loss_fn(pixels)[0])


def test_random_start_is_uniform_in_the_ball():
    key = jax.random.PRNGKey(3)
    linf = adversarial.random_start(key, (64, 4, 4, 3), jnp.float32(0.1), "linf")
    assert float(jnp.abs(linf).max()) <= 0.1 and float(jnp.abs(linf).max()) > 0.09
    l2 = adversarial.random_start(key, (64, 4, 4, 3), jnp.float32(0.1), "l2")
    norms = np.linalg.norm(np.asarray(l2).reshape(64, -1), axis=1)
    assert (norms <= 0.1 + 1e-6).all() and np.median(norms) > 0.09  # mass near the surface


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_training_perturbation_is_within_eps_and_deterministic(tiny, method):
    model, params, pixels, labels = tiny
    adv_config = adversarial.default_config()
    adv_config.method, adv_config.steps = method, 3
    images = adversarial.normalize(pixels, "cifar10")
    targets = jax.nn.one_hot(labels, 10)
    logits_fn = lambda x: model.apply({"params": params}, x)
    key = jax.random.PRNGKey(5)
    out = adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images, targets, key)
    again = adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images, targets,
                                             key)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    moved = np.asarray(adversarial.denormalize(out, "cifar10") - pixels)
    assert np.abs(moved).max() <= adv_config.eps + 1e-5 and np.abs(moved).max() > 0
    adv_config.method = "none"
    assert adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images, targets,
                                            key) is images


def test_bad_adv_train_settings_fail_at_start_up():
    config = config_schema.default_config()
    config.adv_train.method = "pgd2"
    with pytest.raises(config_schema.ConfigError, match="adv_train.method='pgd2' is unknown"):
        config_schema.validate_config(config)
    config.adv_train.method, config.adv_train.eps = "fgsm", 0.0
    with pytest.raises(config_schema.ConfigError, match="eps must be > 0"):
        config_schema.validate_config(config)
    config.adv_train.eps, config.adv_train.norm = 8 / 255, "l1"
    with pytest.raises(config_schema.ConfigError, match="unknown norm 'l1'"):
        config_schema.validate_config(config)
    with pytest.raises(adversarial.AttackError, match="unknown attack 'cw'"):
        adversarial.make_attack_step(None, "cifar10", "cw", "linf", 1)


def test_adversarial_train_step_is_a_function_of_the_state_so_resume_is_exact(tiny):
    """Two steps, a host round trip of the state (what a checkpoint holds), two more steps give
    the same parameters as four straight steps; the perturbation changes the update.

    (The same through `trainer.train` with a real checkpoint resume, 2 + 2 vs 4 steps of
    configs/smoke.py with adv_train.method=fgsm, passed too but takes minutes on a busy CPU.)
    """
    model, params, _, _ = tiny
    config = config_schema.default_config()
    config.update(total_steps=10, warmup_steps=0, schedule="constant", lr=1e-2)
    config.adv_train.method = "fgsm"
    rng = np.random.default_rng(1)
    batches = [{"image": rng.normal(size=(1, 8, 16, 16, 3)).astype(np.float32),
                "label": rng.integers(0, 10, size=(1, 8)).astype(np.int32)} for _ in range(4)]
    tx = optim.make_optimizer(config, params)
    start = trainer.create_train_state(params, tx, jax.random.PRNGKey(2), use_ema=False)

    def run(step, state, batches):
        state = parallel.replicate(state)
        for batch in batches:
            state, _ = step(state, parallel.shard(batch))
        return jax.device_get(parallel.unreplicate(state))

    adv_step = jax.pmap(trainer.make_train_step(model, tx, config, 10), axis_name=parallel.AXIS)
    straight = run(adv_step, start, batches)
    resumed = run(adv_step, run(adv_step, start, batches[:2]), batches[2:])
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    config.adv_train.method = "none"
    plain_step = jax.pmap(trainer.make_train_step(model, tx, config, 10), axis_name=parallel.AXIS)
    plain = run(plain_step, start, batches)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(plain.params),
        strict=True))
