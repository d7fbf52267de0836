"""Tests for vit.prune: importance scores, structured and magnitude pruning, fine-tuning."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_checkpoints import RECIPE, write

from vit import cli
from vit.evaluate import load_inference_model
from vit.prune import (
    head_scores,
    mlp_scores,
    prune_checkpoint,
    prune_magnitude,
    prune_structured,
    removed_fraction,
)
from vit.weight_formats import flatten_params

BLOCK = "Transformer/encoderblock_0/"
ATTN = BLOCK + "MultiHeadDotProductAttention_1/"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    model, params = write(str(root / "run"), dict(RECIPE, num_heads=4))
    return root, model, params


def test_structured_drops_the_least_important_heads_and_channels(run):
    _, model, params = run
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    heads, channels = head_scores(flat, BLOCK), mlp_scores(flat, BLOCK)
    pruned, masks, mlp_dim = prune_structured(params, 0.5)
    p = flatten_params(pruned)
    assert mlp_dim == 32 and p[BLOCK + "MlpBlock_3/Dense_0/kernel"].shape == (32, 32)
    gone = set(np.argsort(heads)[:2])
    for h in range(4):
        zero = not np.any(p[ATTN + "value/kernel"][:, h]) and not np.any(p[ATTN + "out/kernel"][h])
        assert zero == (h in gone)
    kept = np.sort(np.argsort(-channels)[:32])
    np.testing.assert_array_equal(p[BLOCK + "MlpBlock_3/Dense_1/kernel"],
                                  flat[BLOCK + "MlpBlock_3/Dense_1/kernel"][kept])
    smaller = model.clone(mlp_dim=mlp_dim)
    x = np.zeros((1, 16, 16, 3), np.float32)
    assert smaller.apply({"params": pruned}, x).shape == (1, 5)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.75])
def test_magnitude_zeroes_the_smallest_share(run, sparsity):
    _, _, params = run
    pruned, masks = prune_magnitude(params, sparsity)
    assert abs(removed_fraction(pruned, params) - sparsity) < 1e-3
    p, orig = flatten_params(pruned), flatten_params(params)
    np.testing.assert_array_equal(p["head/kernel"], orig["head/kernel"])  # only attention / MLP


def test_prune_with_finetune_keeps_pruned_weights_at_zero(tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=16):
        write(str(tmp_path / "run"), RECIPE, num_classes=10, image_size=32, dataset="cifar10",
              data_dir=str(tmp_path / "tfds"), batch_size=8)
        result = prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "mag"),
                                  method="magnitude", sparsity=0.5, finetune_steps=2)
        assert abs(result.removed_fraction - 0.5) < 0.01  # fine-tuning kept the zeros
        code = cli.main(["prune", "--checkpoint", str(tmp_path / "run"), "--out",
                         str(tmp_path / "st"), "--sparsity", "0.25"])
        assert code == 0 and "mlp_dim 48" in capsys.readouterr().out
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "st")]) == 0
    assert load_inference_model(str(tmp_path / "st")).model.mlp_dim == 48
    with pytest.raises(ValueError, match="sparsity"):
        prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "x"), method="magnitude",
                         sparsity=1.0)
