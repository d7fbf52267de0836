"""vit.adversarial: eps 0 is the identity, perturbations stay in the ball, the raw attacks weaken
the model more as eps grows and PGD hurts at least as much as FGSM, adversarial training
perturbs within eps and resumes exactly (also through `trainer.train`), config errors are one
line."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_trainer import DATA_DIR, _assert_same_params, _params

from configs.smoke import get_config
from vit import adversarial, checkpoint, config_schema, optim, parallel, trainer
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


@pytest.fixture(scope="module")
def predicted(tiny):
    """32 random uint8 images labelled with the tiny model's own clean predictions (clean
    accuracy 1, so every change of the robust accuracy is the attack's doing)."""
    model, params, _, _ = tiny
    images = np.random.default_rng(2).integers(0, 256, size=(32, 16, 16, 3)).astype(np.uint8)
    logits = model.apply({"params": params},
                         adversarial.normalize(jnp.asarray(images) / 255.0, "minus_one_to_one"))
    return images, np.asarray(logits.argmax(-1), np.int32)


def _example_losses(model, params, labels):
    """pixels -> (per-example cross-entropy, logits) of the tiny model."""
    def losses(x):
        logits = model.apply({"params": params}, adversarial.normalize(x, "minus_one_to_one"))
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0], logits

    return losses


def _loss_fn(model, params, labels):
    losses = _example_losses(model, params, labels)

    def loss_fn(x):
        loss, logits = losses(x)
        return jnp.sum(loss), logits

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


@pytest.mark.parametrize(("attack", "norm", "grid"), [
    ("fgsm", "linf", (0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)),
    ("pgd", "l2", (0, 0.05, 0.1, 0.2, 0.4, 0.8)),
])
def test_raw_attack_accuracy_does_not_increase_with_eps(tiny, predicted, attack, norm, grid):
    """Each eps attacked on its own (no AND across epsilons, unlike the report): the attack
    itself leaves fewer examples correct as eps grows, from all at eps 0 to none."""
    model, params, _, _ = tiny
    images, labels = predicted
    step = adversarial.make_attack_step(model, "minus_one_to_one", attack, norm, 5)
    replicated = parallel.replicate(params)
    accuracy = [float(np.mean(step(replicated, images[None], labels[None], np.float32(eps))))
                for eps in grid]
    assert accuracy[0] == 1.0 and accuracy[-1] == 0.0, accuracy
    assert all(a >= b for a, b in zip(accuracy, accuracy[1:], strict=False)), accuracy
    assert len(set(accuracy)) >= 4, accuracy  # the grid resolves the fall, not one cliff


@pytest.mark.parametrize(("norm", "eps"), [("linf", 2 / 255), ("l2", 0.2)])
def test_pgd_run_on_its_own_hurts_each_example_at_least_as_much_as_fgsm(tiny, predicted, norm,
                                                                        eps):
    """Independent runs on the same examples: FGSM, plain PGD-5 (zero start, five steps of
    2.5 eps / 5, no FGSM step in it) and the report's PGD-5; compared by the loss of the final
    adversarial images, not by the report's robust flags (which AND in the FGSM step)."""
    model, params, _, _ = tiny
    images, labels = predicted
    pixels, labels = jnp.asarray(images) / 255.0, jnp.asarray(labels)
    eps = jnp.float32(eps)
    loss_fn, losses = _loss_fn(model, params, labels), _example_losses(model, params, labels)
    zero = jnp.zeros_like(pixels)

    def attacked(sizes):
        loss, logits = losses(adversarial.iterate(loss_fn, pixels, zero, eps, sizes, norm)[0])
        return np.asarray(loss), int(np.sum(np.asarray(logits.argmax(-1)) != labels))

    fgsm_loss, fgsm_fooled = attacked(adversarial.eval_step_sizes("fgsm", eps, 1))
    assert fgsm_loss.mean() > float(losses(pixels)[0].mean()) and fgsm_fooled > 0
    for sizes in (jnp.full((5,), 2.5 / 5, jnp.float32) * eps,
                  adversarial.eval_step_sizes("pgd", eps, 5)):
        pgd_loss, pgd_fooled = attacked(sizes)
        assert (pgd_loss >= fgsm_loss).all(), (pgd_loss - fgsm_loss).min()
        assert pgd_loss.mean() > fgsm_loss.mean() and pgd_fooled >= fgsm_fooled


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
    keys = jax.random.split(jax.random.PRNGKey(5), 8)
    out = adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images, targets, keys)
    again = adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images, targets,
                                             keys)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    # Each example's perturbation is its own: the halves perturbed apart give the whole.
    halves = [adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images[h],
                                               targets[h], keys[h])
              for h in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(np.concatenate(halves), np.asarray(out), atol=1e-6)
    moved = np.asarray(adversarial.denormalize(out, "cifar10") - pixels)
    assert np.abs(moved).max() <= adv_config.eps + 1e-5 and np.abs(moved).max() > 0
    adv_config.method = "none"
    assert adversarial.perturb_for_training(adv_config, "cifar10", logits_fn, images, targets,
                                            keys) is images


def test_training_perturbation_moves_out_of_range_pixels_no_further_than_eps(tiny):
    """Random erasing's noise boxes put pixels outside [0, 1]; the attack's clipping widens the
    range to hold them instead of pulling them in by far more than eps."""
    model, params, pixels, labels = tiny
    adv_config = adversarial.default_config()
    adv_config.method, adv_config.steps = "pgd", 3
    noisy = pixels.at[:, :8].set(jax.random.normal(jax.random.PRNGKey(3), (8, 8, 16, 3)) * 2)
    assert float(noisy.min()) < -1 and float(noisy.max()) > 2
    out = adversarial.perturb_for_training(
        adv_config, "cifar10", lambda x: model.apply({"params": params}, x),
        adversarial.normalize(noisy, "cifar10"), jax.nn.one_hot(labels, 10),
        jax.random.split(jax.random.PRNGKey(5), 8))
    moved = np.abs(np.asarray(adversarial.denormalize(out, "cifar10") - noisy))
    assert moved.max() <= adv_config.eps + 1e-5 and moved.max() > 0


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

    (The same through `trainer.train` with a real checkpoint: the next test.)
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


def _adv_smoke_config(total_steps: int):
    """configs/smoke.py (a width-32, depth-2 ViT on CIFAR-10) with FGSM adversarial training."""
    config = get_config()
    config.update(data_dir=DATA_DIR, total_steps=total_steps, schedule="constant",
                  checkpoint_every=100, log_every=100, eval_split="test[:64]")
    config.adv_train.method = "fgsm"
    return config


@pytest.mark.slow
def test_adversarial_training_resumes_exactly_through_the_trainer(tmp_path):
    """As tests/test_trainer.py checks resume: 2 steps, a real checkpoint, 2 more steps after
    a restart give bit for bit the parameters of 4 straight steps, adversarial training on
    (its random start draws from the per-step rng, which a resume must restore)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train(_adv_smoke_config(4), str(straight))
    trainer.train(_adv_smoke_config(2), str(resumed))
    first = checkpoint.load_checkpoint(str(resumed))
    assert first.step == 2 and first.config["adv_train"]["method"] == "fgsm"
    trainer.train(_adv_smoke_config(4), str(resumed))
    assert checkpoint.load_checkpoint(str(resumed)).step == 4
    _assert_same_params(_params(resumed), _params(straight))
