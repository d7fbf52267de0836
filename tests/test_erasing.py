"""vit/erasing.py: random erasing's boxes (rate, area, aspect, placement) against timm's
algorithm written out in NumPy, the noise it writes, and `config.random_erase` end to end."""

import json
import math
import random

import in_process
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_faults import _train

from vit import erasing

H, W = 24, 40


def _timm_box(rng: random.Random, prob: float) -> tuple[int, int, int, int] | None:
    """timm's RandomErasing._erase for one image (count 1): (top, left, height, width)."""
    if rng.random() > prob:
        return None
    for _ in range(erasing.ATTEMPTS):
        area = H * W * rng.uniform(*erasing.AREA)
        aspect = math.exp(rng.uniform(math.log(erasing.ASPECT_MIN),
                                      -math.log(erasing.ASPECT_MIN)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if w < W and h < H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    return None


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of a mask that must be one filled rectangle, or None."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    top, left = rows.min(), cols.min()
    h, w = rows.max() - top + 1, cols.max() - left + 1
    assert mask.sum() == h * w, "the erased pixels are not one rectangle"
    return int(top), int(left), int(h), int(w)


def test_boxes_follow_timms_distribution():
    n, prob = 6000, 0.4
    masks = np.asarray(erasing.erase_boxes(jax.random.PRNGKey(0), n, H, W, prob))
    ours = [_box_of(m) for m in masks]
    rng = random.Random(0)
    timm = [_timm_box(rng, prob) for _ in range(n)]

    def stats(boxes):
        drawn = [b for b in boxes if b is not None]
        area = np.array([h * w / (H * W) for _, _, h, w in drawn])
        aspect = np.log([h / w for _, _, h, w in drawn])
        centre = np.array([(t + h / 2) / H for t, _, h, _ in drawn])
        return len(drawn) / len(boxes), area.mean(), aspect.mean(), aspect.std(), centre.mean()

    for got, want, tol in zip(stats(ours), stats(timm), (0.02, 0.01, 0.05, 0.03, 0.01),
                              strict=True):
        assert got == pytest.approx(want, abs=tol)
    for top, left, h, w in filter(None, ours):
        assert top >= 0 and top + h <= H and left >= 0 and left + w <= W
        assert h < H and w < W
        # Rounding of the sides widens the drawn area range by at most a row and a column.
        assert erasing.AREA[0] * H * W - (h + w) <= h * w <= erasing.AREA[1] * H * W + h + w + 1


def test_noise_fills_the_box_and_nothing_else():
    images = jnp.asarray(np.random.default_rng(1).normal(size=(64, H, W, 3)), jnp.float32) + 5
    out = np.asarray(erasing.random_erase(jax.random.PRNGKey(3), images, 1.0))
    changed = np.any(out != np.asarray(images), axis=-1)
    assert changed.reshape(64, -1).any(axis=1).all()  # probability 1: every image erased
    masks = np.asarray(erasing.erase_boxes(jax.random.split(jax.random.PRNGKey(3))[0], 64, H,
                                           W, 1.0))
    np.testing.assert_array_equal(changed, masks)
    noise = out[masks]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # N(0, 1), not the +5 images
    again = erasing.random_erase(jax.random.PRNGKey(3), images, 1.0)
    np.testing.assert_array_equal(np.asarray(again), out)
    assert erasing.random_erase(jax.random.PRNGKey(3), images, 0.0) is images




def test_a_run_with_random_erasing_trains_and_a_bad_value_is_one_line(tmp_path):
    # The head starts at zero (every first loss is log 10): compare the third step's loss.
    third_loss = {}
    for prob in (0.0, 1.0):
        args = (f"--config.random_erase={prob}", "--config.total_steps=3",
                "--config.warmup_steps=0", "--config.log_every=1")
        if prob:  # train.py end to end
            run = _train(tmp_path / str(prob), *args)
            assert run.returncode == 0, run.stderr[-3000:]
        else:  # the reference run, in this process
            assert not in_process.train(tmp_path / str(prob), *args).preempted
        lines = (tmp_path / str(prob) / "metrics.jsonl").read_text().splitlines()
        third_loss[prob] = [json.loads(x)["train/loss"] for x in lines if "train/loss" in x][2]
    assert third_loss[0.0] != pytest.approx(third_loss[1.0], rel=1e-4)  # erased images
    assert in_process.refusal_line(tmp_path / "bad", "--config.random_erase=1.5") == (
        "error: config.random_erase=1.5 must be a probability in [0, 1] (0 = off; DeiT uses "
        "0.25)")
