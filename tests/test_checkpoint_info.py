"""Tests for vit.checkpoint_info and `vit info`: what a run's checkpoint or a weight file holds."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from test_pretrained import fixture, random_weights
from tiny_checkpoints import PLAIN, RECIPE, write

from vit import cli
from vit.checkpoint import CheckpointError
from vit.checkpoint_info import describe, model_overrides, param_groups
from vit.flops import forward_flops_per_image


def test_a_run_is_described_with_its_counts_classes_and_evaluation_at_that_step(tmp_path):
    model, params = write(str(tmp_path / "run"), dict(RECIPE, num_registers=2), num_classes=12)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "3", tmp_path / "run" / "checkpoints" / "7")
    lines = [{"step": 3, "eval/top1": 0.25, "eval/top5": 0.5, "eval/loss": 2.0},
             {"step": 5, "train/loss": 1.9},
             {"step": 7, "eval/top1": 0.5, "eval/top5": 0.75, "eval/loss": "nan"}]
    (tmp_path / "run" / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 8, "eval/to')  # a cut line

    info = describe(tmp_path / "run", step=3)
    flat_sizes = {k: v.size for k, v in _flat(params).items()}
    assert info.params == sum(flat_sizes.values())
    assert info.param_groups == {
        "embedding": sum(v for k, v in flat_sizes.items() if k.startswith(("stem/", "embedding/"))),
        "blocks": sum(v for k, v in flat_sizes.items() if k.startswith("Transformer/encoder")),
        "tokens": 2 * 32,  # the registers; a sin-cos position embedding has no parameters
        "head": 12 * 32 + 12}
    assert info.gflops_per_image == forward_flops_per_image(model) / 1e9
    assert (info.step, info.steps, info.source) == (3, [3, 7], "checkpoint")
    assert info.model == {"variant": "Ti/4", "width": 32, "depth": 2, "num_heads": 2,
                          "mlp_dim": 64, "stem": "conv", "stem_norm": "groupnorm",
                          "classifier": "gap", "posemb": "sincos2d", "token_keep_ratio": 0.5,
                          "num_registers": 2}
    assert info.num_classes == 12 and info.class_names[:2] == ["c0", "c1"]
    assert info.last_eval == {"step": 3, "eval/top1": 0.25, "eval/top5": 0.5, "eval/loss": 2.0}
    latest = describe(tmp_path / "run")  # the latest step by default
    assert latest.last_eval["step"] == 7 and np.isnan(latest.last_eval["eval/loss"])
    assert "eval/loss nan" in latest.summary()
    shutil.copytree(tmp_path / "run" / "checkpoints" / "3", tmp_path / "run" / "checkpoints" / "2")
    assert describe(tmp_path / "run", step=2).last_eval == {}  # no evaluation at or before 2
    write(str(tmp_path / "run" / "int8"), PLAIN)  # another run's output inside this workdir
    assert describe(tmp_path / "run" / "int8").last_eval == {}
    text = info.summary()
    assert "checkpoint, step 3 (complete steps: 3, 7)" in text
    assert "12 classes (c0, c1, c2, c3, c4, c5, c6, c7, ... (4 more))" in text
    assert "last eval  step 3: eval/top1 25.00%, eval/top5 50.00%, eval/loss 2" in text


def test_a_weight_file_is_described_as_convert_would_rebuild_it(tmp_path, capsys):
    meta, _ = fixture("timm_dinov2_reg_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    info = describe(path)
    assert info.source == "timm" and info.steps == [] and info.step is None
    assert info.num_classes == 0 and "head" not in info.param_groups
    # the file's arrays, plus the class token's position embedding added as zeros
    assert info.params == sum(v.size for v in state.values()) + 192
    assert info.model == {"variant": "Ti/14", "depth": 2, "gelu_approximate": False,
                          "layer_scale": 1e-5, "num_registers": 4}
    assert info.grid == [4, 4] and info.image_size == [56, 56]
    assert info.notes[-1].startswith("no classification head in the weights")
    with pytest.raises(ValueError, match="--step picks a checkpoint of a training run"):
        describe(path, step=3)

    assert cli.main(["info", str(path), "--json", str(tmp_path / "info.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: timm weights\nmodel      Ti/14 (depth 2,")
    assert "data       (no dataset: pass --dataset to vit eval): no head;" in out
    assert json.loads((tmp_path / "info.json").read_text())["params"] == info.params


def test_vit_info_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no weights at" in err[0] and "missing" in err[0]
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert cli.main(["info", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the file is damaged or not what its name says" in err[0]
    write(str(tmp_path / "run"), PLAIN)
    with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
        describe(tmp_path / "run", step=9)


def test_overrides_and_groups_of_a_plain_model():
    assert model_overrides({"variant": "S/16", "width": 384, "depth": 12, "classifier": "token",
                            "dtype": "bfloat16", "layer_scale": None}) == {
        "variant": "S/16", "dtype": "bfloat16"}
    groups = param_groups({"cls": np.zeros((1, 1, 8)), "embedding": {"kernel": np.zeros((4, 8))},
                           "head": {"kernel": np.zeros((8, 3)), "bias": np.zeros(3)},
                           "Transformer": {"encoder_norm": {"scale": np.zeros(8)}}})
    assert groups == {"embedding": 32, "blocks": 8, "tokens": 8, "head": 27}


def test_an_int8_model_counts_the_parameters_of_its_float_model():
    import jax

    from vit.model import create_model, init_params
    from vit.quantize import quantize_params

    model = create_model("Ti/4", num_classes=3, image_size=8, width=32, depth=1, num_heads=2,
                         mlp_dim=64)
    params = init_params(model, jax.random.PRNGKey(0))
    quantized, kernels = quantize_params(params)
    assert kernels == 7  # query, key, value, out, the block's two MLP kernels, and the head
    assert param_groups(quantized) == param_groups(params)


def _flat(params):
    from vit.weight_formats import flatten_params

    return {k: np.asarray(v) for k, v in flatten_params(params).items()}
