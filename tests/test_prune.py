"""Tests for vit.prune: importance scores, structured and magnitude pruning, fine-tuning."""

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_checkpoints import PLAIN, RECIPE, write

from vit import cli
from vit.checkpoint import load_checkpoint
from vit.evaluate import load_inference_model
from vit.model import model_from_config
from vit.prune import (
    METHODS,
    finetune,
    finetune_schedule,
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


def test_structured_finetune_keeps_heads_and_channels_removed_and_sees_every_token(tmp_path):
    with tfds.testing.mock_data(num_examples=16):
        _, params = write(str(tmp_path / "run"), dict(RECIPE, num_heads=4), num_classes=10,
                          image_size=32, dataset="cifar10", data_dir=str(tmp_path / "tfds"),
                          batch_size=8)
        result = prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "st"),
                                  method="structured", sparsity=0.5, finetune_steps=3, lr=1e-2)
        pruned, masks, _ = prune_structured(params, 0.5)
        config = ml_collections.ConfigDict(load_checkpoint(str(tmp_path / "st")).config)
        all_tokens = model_from_config(dict(config.model, token_keep_ratio=1.0),
                                       num_classes=10, image_size=32)
        again = finetune(all_tokens, pruned, masks, config, 3, lr=1e-2)
    tuned = flatten_params(load_inference_model(str(tmp_path / "st")).params)
    assert config.model.token_keep_ratio == 0.5 and result.mlp_dim == 32
    for name, mask in flatten_params(masks).items():
        assert tuned[name].shape == mask.shape  # the cut MLP channels stay cut
        assert not np.any(tuned[name][mask == 0]), name  # the pruned heads stay exactly zero
    gone = int((flatten_params(masks)[ATTN + "out/kernel"] == 0).all(axis=(1, 2)).sum())
    assert gone == 2 and result.removed_fraction == removed_fraction(pruned, params)
    before = flatten_params(pruned)
    assert not np.array_equal(tuned[ATTN + "query/kernel"], before[ATTN + "query/kernel"])
    # PatchDropout is off in the fine-tune: the run's token_keep_ratio=0.5 changes nothing.
    for name, value in flatten_params(again).items():
        np.testing.assert_array_equal(tuned[name], value, err_msg=name)


def test_finetune_schedule_warms_up_then_decays_towards_zero():
    lr = finetune_schedule(2e-3, 100)  # 10 warmup steps from 0, then cosine over 90 steps
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(1e-3)
    assert float(lr(10)) == pytest.approx(2e-3)
    assert float(lr(55)) == pytest.approx(1e-3)
    assert 0 < float(lr(99)) < 2e-3 * (1 - np.cos(np.pi / 90))
    assert float(finetune_schedule(1e-3, 1)(0)) == pytest.approx(1e-3)  # too short to warm up


@pytest.mark.parametrize("method,model,message", [
    ("structured", dict(PLAIN, classifier="map"),
     "structured pruning cuts config.model.mlp_dim, which the MAP head's MLP "
     "(MAPHead_0/MlpBlock_0) shares with the encoder, so the pruned model could not be built; "
     "prune a MAP-head model with --method magnitude"),
    ("structured", dict(PLAIN, depth=0), "the model has no encoder blocks (depth 0), so there "
     "are no attention heads or MLP channels to prune; prune a model with depth >= 1"),
    ("magnitude", dict(PLAIN, depth=0), "the model has no encoder blocks (depth 0)"),
    ("structured", dict(PLAIN, swiglu=True), "structured pruning cuts MLP channels one Dense_0 "
     "column at a time, and a SwiGLU MLP's channel is two (gate and value); prune it with "
     "--method magnitude"),
], ids=["map-structured", "depth0-structured", "depth0-magnitude", "swiglu-structured"])
def test_what_pruning_cannot_do_is_one_line_and_writes_nothing(tmp_path, capsys, method, model,
                                                               message):
    write(str(tmp_path / "run"), model)
    code = cli.main(["prune", "--checkpoint", str(tmp_path / "run"), "--out",
                     str(tmp_path / "out"), "--method", method, "--sparsity", "0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_magnitude_pruning_of_a_swiglu_model_reports_its_mlp_dim(tmp_path):
    write(str(tmp_path / "run"), dict(PLAIN, swiglu=True))
    result = prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), method="magnitude",
                              sparsity=0.5)
    loaded = load_inference_model(str(tmp_path / "out"))
    assert result.mlp_dim == 64 and loaded.model.swiglu
    kernel = np.asarray(loaded.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"][
        "kernel"])
    assert kernel.shape == (32, 128) and 0.2 < (kernel == 0).mean() < 0.8


def test_magnitude_pruning_of_a_map_model_loads_and_exports(tmp_path):
    write(str(tmp_path / "run"), dict(PLAIN, classifier="map"))
    result = prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), method="magnitude",
                              sparsity=0.5)
    loaded = load_inference_model(str(tmp_path / "out"))
    assert result.mlp_dim == 64 and loaded.model.classifier == "map"
    head = [np.asarray(v) for k, v in flatten_params(loaded.params).items()
            if k.startswith("MAPHead_0/") and k.endswith("/kernel")
            and ("MlpBlock_0" in k or "MultiHeadDotProductAttention_0" in k)]
    assert len(head) == 6  # the head's query, key, value, out and its MLP's two kernels
    zeros = sum(int((x == 0).sum()) for x in head) / sum(x.size for x in head)
    assert 0.2 < zeros < 0.8  # pruned with the encoder's kernels, by one global threshold
    assert loaded.model.apply({"params": loaded.params},
                              np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 5)


@pytest.mark.parametrize("sparsity,heads_cut,channels_kept", [
    (0.125, 1, 56), (0.375, 2, 40), (0.5, 2, 32), (0.625, 3, 24)])
def test_structured_counts_round_halves_up(run, sparsity, heads_cut, channels_kept):
    """4 heads, 64 channels: 0.125 x 4 = 0.5 heads is one head (Python's round gave 0)."""
    _, _, params = run
    pruned, _, mlp_dim = prune_structured(params, sparsity)
    value = np.asarray(flatten_params(pruned)[ATTN + "value/kernel"])
    assert sum(not np.any(value[:, h]) for h in range(4)) == heads_cut
    assert mlp_dim == channels_kept


@pytest.mark.parametrize("sparsity,message", [
    (0.9, "sparsity 0.9 would remove all 4 attention heads of each block; use a sparsity below "
     "0.875"),
    (0.875, "sparsity 0.875 would remove all 4 attention heads"),
])
def test_structured_pruning_that_removes_everything_is_refused(run, tmp_path, capsys, sparsity,
                                                                message):
    root, _, _ = run
    code = cli.main(["prune", "--checkpoint", str(root / "run"), "--out", str(tmp_path / "out"),
                     "--sparsity", str(sparsity)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_a_finetune_that_diverges_writes_nothing(tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=16):
        write(str(tmp_path / "run"), PLAIN, num_classes=10, image_size=32, dataset="cifar10",
              data_dir=str(tmp_path / "tfds"), batch_size=8)
        code = cli.main(["prune", "--checkpoint", str(tmp_path / "run"), "--out",
                         str(tmp_path / "out"), "--method", "magnitude", "--sparsity", "0.5",
                         "--finetune-steps", "2", "--lr", "1e38"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: the params became non-finite in the 2 --finetune-steps, so nothing was written "
        f"to {tmp_path / 'out'}: lower --lr (now 1e+38)"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", METHODS)
def test_a_rectangular_checkpoint_prunes_and_fine_tunes(tmp_path, method):
    """32x48 images: the pruned (and briefly fine-tuned) checkpoint loads at its size and gives
    [N, classes] logits."""
    with tfds.testing.mock_data(num_examples=16):
        write(str(tmp_path / "run"), dict(RECIPE, num_heads=4), num_classes=10,
              image_size=(32, 48), dataset="cifar10", data_dir=str(tmp_path / "tfds"),
              batch_size=8)
        result = prune_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), method=method,
                                  sparsity=0.5, finetune_steps=1)
    loaded = load_inference_model(str(tmp_path / "out"))
    assert tuple(loaded.model.image_size) == (32, 48) and loaded.model.mlp_dim == result.mlp_dim
    assert result.mlp_dim == (32 if method == "structured" else 64)
    logits = loaded.model.apply({"params": loaded.params}, np.zeros((2, 32, 48, 3), np.float32))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


@pytest.mark.fusion_emitters
def test_distilling_from_the_unpruned_model_replaces_the_labels_by_its_share(tmp_path, capsys):
    """At --distill 1 the labels carry no weight (the fine-tune is the same whatever their
    smoothing); at 0.5 they do; the command checks the share and that it fine-tunes."""
    from vit.distill import Teacher

    with tfds.testing.mock_data(num_examples=16):
        dense, params = write(str(tmp_path / "run"), dict(RECIPE, num_heads=4), num_classes=10,
                              image_size=32, dataset="cifar10", data_dir=str(tmp_path / "tfds"),
                              batch_size=8)
        config = ml_collections.ConfigDict(load_checkpoint(str(tmp_path / "run")).config)
        pruned, masks, mlp_dim = prune_structured(params, 0.5)
        student = model_from_config(dict(config.model, mlp_dim=mlp_dim, token_keep_ratio=1.0),
                                    num_classes=10, image_size=32)
        teacher = Teacher(dense, params, config.pp.normalize)
        tuned = {}
        for alpha in (1.0, 0.5):
            for smoothing in (0.0, 0.9):
                config.label_smoothing = smoothing
                tuned[alpha, smoothing] = flatten_params(finetune(
                    student, pruned, masks, config, 2, lr=1e-2, teacher=teacher,
                    distill_alpha=alpha))
        code = cli.main(["prune", "--checkpoint", str(tmp_path / "run"), "--out",
                         str(tmp_path / "st"), "--sparsity", "0.5", "--finetune-steps", "2",
                         "--distill", "0.5"])
        assert code == 0, capsys.readouterr().err
    for name, value in tuned[1.0, 0.0].items():
        np.testing.assert_array_equal(value, tuned[1.0, 0.9][name], err_msg=name)
    key = ATTN + "query/kernel"
    assert not np.array_equal(tuned[0.5, 0.0][key], tuned[0.5, 0.9][key])
    assert not np.array_equal(tuned[1.0, 0.0][key], flatten_params(pruned)[key])  # it trained
    for argv in (["--distill", "0.5"], ["--distill", "1.5", "--finetune-steps", "2"]):
        code = cli.main(["prune", "--checkpoint", str(tmp_path / "run"), "--out",
                         str(tmp_path / "x"), "--sparsity", "0.5", *argv])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: --distill ") and "needs --finetune-steps" \
            in err, err
    assert not (tmp_path / "x").exists()
