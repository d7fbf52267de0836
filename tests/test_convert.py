"""Tests for vit.convert and vit.weights_out: weights in exactly, weights out, round trips."""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from test_pretrained import fixture, images, random_weights
from tiny_checkpoints import PLAIN, RECIPE, write

import vit
from vit import cli
from vit.convert import convert_weights, export_weights
from vit.evaluate import load_inference_model
from vit.fewshot import head_input
from vit.pretrained import load_pretrained
from vit.weight_formats import POSEMB, WeightsError, flatten_params


def _logits(checkpoint: str, x: np.ndarray) -> np.ndarray:
    loaded = load_inference_model(checkpoint)
    return np.asarray(loaded.model.apply({"params": loaded.params}, x))


def _source(tmp_path, stem: str) -> tuple[str, dict, dict]:
    meta, ref = fixture(stem)
    state = random_weights.build(meta["manifest"], meta["seed"])
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "model.safetensors"
    safetensors.numpy.save_file(state, str(path))
    return str(path), meta, ref


def test_timm_converts_with_exact_gelu_and_stated_normalisation(tmp_path):
    src, meta, ref = _source(tmp_path, "timm_vit_tiny")
    path, notes = convert_weights(src, str(tmp_path / "ours"))
    np.testing.assert_allclose(_logits(path, images(meta)), ref["logits_gelu_erf"], atol=1e-5,
                               rtol=0)
    loaded = load_inference_model(path)
    assert loaded.model.gelu_approximate is False and loaded.model.num_heads == 3
    assert loaded.config.pp.normalize == "minus_one_to_one"
    assert any("--normalize" in n for n in notes) and any("3 heads assumed" in n for n in notes)
    path, _ = convert_weights(src, str(tmp_path / "deit"), normalize="imagenet", gelu="tanh",
                              num_heads=6)
    loaded = load_inference_model(path)
    assert loaded.config.pp.normalize == "imagenet" and loaded.model.gelu_approximate
    assert loaded.model.num_heads == 6


@pytest.mark.parametrize("how", ["flag", "config.json"])
def test_hf_gelu_from_the_flag_or_its_config(tmp_path, how):
    src, meta, ref = _source(tmp_path, "hf_vit_tiny")  # made with tanh GELU
    if how == "config.json":
        config = {"model_type": "vit", "hidden_act": "gelu_pytorch_tanh",
                  "num_attention_heads": 3, "id2label": {str(i): f"n{i}" for i in range(10)}}
        (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    path, _ = convert_weights(src, str(tmp_path / "ours"), gelu="tanh" if how == "flag" else None)
    np.testing.assert_allclose(_logits(path, images(meta)), ref["logits_gelu_tanh"], atol=1e-5,
                               rtol=0)
    names = load_inference_model(path).info.class_names
    assert names[1] == ("n1" if how == "config.json" else "class_1")


@pytest.mark.parametrize("stem,target", [("timm_vit_tiny", "timm"), ("hf_vit_tiny", "hf")])
def test_file_to_ours_to_file_gives_the_same_arrays(tmp_path, stem, target):
    src, meta, _ = _source(tmp_path, stem)
    convert_weights(src, str(tmp_path / "ours"), gelu="tanh" if target == "hf" else None)
    export_weights(str(tmp_path / "ours"), target, str(tmp_path / "out"))
    want = random_weights.build(meta["manifest"], meta["seed"])
    got = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out" / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask
    before = (tmp_path / "out" / "config.json").read_text()
    with pytest.raises(ValueError) as info:  # a second export does not overwrite the first
        export_weights(str(tmp_path / "ours"), target, str(tmp_path / "out"))
    assert str(info.value).startswith(f"{tmp_path / 'out'} already holds model.safetensors, "
                                      f"config.json")
    assert (tmp_path / "out" / "config.json").read_text() == before


@pytest.mark.parametrize("target,model", [
    ("timm", dict(PLAIN, gelu_approximate=True)), ("timm", dict(PLAIN, classifier="gap")),
    ("hf", PLAIN), ("npz", dict(RECIPE, num_registers=2)), ("timm", dict(PLAIN, layer_scale=0.5)),
    ("npz", dict(PLAIN, layer_scale=0.5)),
    ("timm", dict(PLAIN, classifier="gap", num_registers=2)), ("hf", dict(PLAIN, quick_gelu=True)),
    ("npz", dict(PLAIN, pre_norm=True, quick_gelu=True)),
    ("timm", dict(PLAIN, swiglu=True, layer_scale=0.5)), ("npz", dict(PLAIN, swiglu=True)),
    ("timm", dict(PLAIN, swiglu=True, mlp_dim=40)), ("timm", dict(PLAIN, qk_norm=True)),
    ("npz", dict(PLAIN, qk_norm=True, classifier="map")),
    ("npz", dict(PLAIN, rope="dinov3", posemb="none", key_bias=False, norm_epsilon=1e-5)),
    ("timm", dict(PLAIN, rope="dinov3", posemb="none", key_bias=False, gelu_approximate=False,
                  swiglu=True, classifier="gap", layer_scale=0.5, norm_epsilon=1e-5)),
    ("hf", dict(PLAIN, norm_epsilon=1e-12)),
    ("npz", dict(PLAIN, rope="eva02", rope_grid=(8, 8), swiglu=True, mlp_norm=True,
                 classifier="gap", class_token=True, fc_norm=True)),
    ("timm", dict(PLAIN, classifier="gap", class_token=True, fc_norm=True)),
    ("timm", dict(PLAIN, rope="eva02", rope_grid=(8, 8), swiglu=True, mlp_norm=True,
                  key_bias=False, gelu_approximate=False, layer_scale=0.5))])
def test_ours_to_file_to_ours_is_exact(tmp_path, target, model):
    _, params = write(str(tmp_path / "run"), model, normalize="imagenet")
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "out"), "--to", target]) == 0
    weights = "model.npz" if target == "npz" else "model.safetensors"
    assert cli.main(["convert", str(tmp_path / "out" / weights), str(tmp_path / "back")]) == 0
    before, after = load_inference_model(str(tmp_path / "run")), load_inference_model(
        str(tmp_path / "back"))
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(after.model.apply({"params": after.params}, x)),
        np.asarray(before.model.apply({"params": before.params}, x)))
    assert after.config.pp.normalize == "imagenet" and after.info.class_names[4] == "c4"
    assert after.model.mlp_activation == before.model.mlp_activation
    assert after.model.pre_norm == before.model.pre_norm
    assert after.model.mlp_dim == before.model.mlp_dim
    assert after.model.qk_norm == before.model.qk_norm
    for option in ("rope", "rope_grid", "norm_epsilon", "class_token", "fc_norm", "mlp_norm"):
        assert getattr(after.model, option) == getattr(before.model, option), option
    got, want = flatten_params(after.params), flatten_params(params)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


def test_deit3_and_a_headless_dinov2_convert_and_go_back_out(tmp_path, capsys):
    """DeiT III (position embedding of the patches only) converts with its grid found; a
    DINOv2-reg backbone has no head, so convert asks for --num-classes, gives it a zero head, and
    `--to timm` writes its arrays back as they came (plus that head)."""
    src, meta, ref = _source(tmp_path, "timm_deit3_tiny")
    path, _ = convert_weights(src, str(tmp_path / "deit3"))
    assert load_inference_model(path).config.image_size == 64
    np.testing.assert_allclose(_logits(path, images(meta)), ref["logits_gelu_erf"], atol=1e-4,
                               rtol=0)
    with pytest.raises(WeightsError, match="--num-classes 7 contradicts the weights, whose head "
                                           "has 1000 classes"):
        convert_weights(src, str(tmp_path / "x"), num_classes=7)

    meta, ref = fixture("timm_dinov2_reg_tiny")
    (tmp_path / "dino").mkdir()
    src = str(tmp_path / "dino" / "model.safetensors")
    want = random_weights.build(meta["manifest"], meta["seed"])
    safetensors.numpy.save_file(want, src)
    assert cli.main(["convert", src, str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no classification head" in err[0] and "--num-classes N" in err[0]
    assert not (tmp_path / "bare").exists()
    # timm's official Hub config.json: no model_args, the input size and statistics in
    # pretrained_cfg
    (tmp_path / "dino" / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0,
        "pretrained_cfg": {"input_size": [3, 56, 56], "crop_pct": 1.0, "crop_mode": "center",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    assert cli.main(["convert", src, str(tmp_path / "ours"), "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "a zero-initialised head of 3 classes added" in out and "assumed" not in out.replace(
        "3 heads assumed", "")
    loaded = load_inference_model(str(tmp_path / "ours"))
    assert loaded.model.num_registers == 4 and loaded.model.layer_scale is not None
    assert loaded.model.num_classes == 3 and tuple(loaded.model.patch_size) == (14, 14)
    assert loaded.config.pp.normalize == "imagenet"
    np.testing.assert_allclose(np.asarray(head_input(loaded.model, loaded.params, images(meta))),
                               ref["features_gelu_erf"], atol=1e-4, rtol=0)

    export_weights(str(tmp_path / "ours"), "timm", str(tmp_path / "out"))
    got = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(got) == set(want) | {"head.weight", "head.bias"}
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    args = json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]
    assert args["reg_tokens"] == 4 and args["no_embed_class"] is True


def test_convert_rebuilds_the_model_for_another_image_size(tmp_path, capsys):
    """--image-size resamples the position embedding (a DINOv2 backbone trained at 518 px is run
    at 224, say), as loading the weights into a model of that size does; the evaluation resize
    keeps its ratio to the image size."""
    src, meta, _ = _source(tmp_path, "timm_dinov2_reg_tiny")  # 56 px: a 4x4 grid of 14 px
    assert cli.main(["convert", src, str(tmp_path / "small"), "--num-classes", "2",
                     "--image-size", "28"]) == 0
    assert "posemb resampled 4x4 -> 2x2 (bilinear)" in capsys.readouterr().out
    loaded = load_inference_model(str(tmp_path / "small"))
    assert loaded.config.image_size == 28 and tuple(loaded.model.grid) == (2, 2)
    model = loaded.model
    want, _ = load_pretrained(src, model, vit.init_params(model, jax.random.PRNGKey(0)))
    x = images(meta, 28)
    np.testing.assert_array_equal(np.asarray(head_input(model, loaded.params, x)),
                                  np.asarray(head_input(model, want, x)))
    with pytest.raises(WeightsError, match="image size 30x30 is not a multiple of the weights' "
                                           "14x14 patches: pass a multiple, e.g. 28"):
        convert_weights(src, str(tmp_path / "x"), num_classes=2, image_size=30)
    with pytest.raises(SystemExit):  # a usage error, as argparse reports it
        cli.main(["convert", src, str(tmp_path / "y"), "--image-size", "big"])
    assert "--image-size: must be an int or rows,cols, got 'big'" in capsys.readouterr().err
    write(str(tmp_path / "run"), PLAIN, pp={"eval_resize": 20})  # 16 px, resize 20
    path, _ = convert_weights(str(tmp_path / "run"), str(tmp_path / "big"), image_size=32)
    assert load_inference_model(path).config.pp.eval_resize == 40


def test_registers_go_to_timm_with_the_class_position_folded_in(tmp_path):
    """A trained class-token position embedding has no slot in timm's no_embed_class layout; it is
    added to the class token, which gives the same outputs."""
    write(str(tmp_path / "run"), dict(PLAIN, num_registers=2))
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    path, _ = convert_weights(str(tmp_path / "out" / "model.safetensors"), str(tmp_path / "back"))
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_logits(path, x), _logits(str(tmp_path / "run"), x), atol=1e-6,
                               rtol=0)
    before = flatten_params(load_inference_model(str(tmp_path / "run")).params)
    after = flatten_params(load_inference_model(path).params)
    np.testing.assert_array_equal(after["cls"], before["cls"] + before[POSEMB][:, :1])
    np.testing.assert_array_equal(after[POSEMB][:, 0], 0)


def test_a_clip_model_goes_to_timm_with_its_patch_bias_in_the_position_embedding(tmp_path):
    """timm's pre-norm patch embedding has no bias: the trained bias joins the patches' position
    embedding (the class token's stays), which gives the same outputs."""
    write(str(tmp_path / "run"), dict(PLAIN, pre_norm=True, quick_gelu=True))
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_args"]["pre_norm"] and config["model_args"]["act_layer"] == "quick_gelu"
    state = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "patch_embed.proj.bias" not in state and "norm_pre.weight" in state
    before = flatten_params(load_inference_model(str(tmp_path / "run")).params)
    np.testing.assert_array_equal(state["pos_embed"][:, 0], before[POSEMB][:, 0])
    np.testing.assert_array_equal(state["pos_embed"][:, 1:],
                                  before[POSEMB][:, 1:] + before["embedding/bias"])
    path, notes = convert_weights(str(tmp_path / "out" / "model.safetensors"),
                                  str(tmp_path / "back"))
    loaded = load_inference_model(path)
    assert loaded.model.pre_norm and loaded.model.mlp_activation == "quick_gelu"
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_logits(path, x), _logits(str(tmp_path / "run"), x), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("model,first_layer", [(dict(PLAIN, width=56, mlp_dim=61), 61),
                                               (dict(PLAIN, swiglu=True), 128)])
def test_timms_mlp_ratio_rebuilds_the_first_mlp_layer(tmp_path, model, first_layer):
    """timm sizes the first MLP layer int(embed_dim * mlp_ratio): 61 / 56 * 56 is 60.99...,
    so the written ratio is nudged up; a SwiGLU layer is twice mlp_dim wide."""
    write(str(tmp_path / "run"), model)
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    args = json.loads((tmp_path / "out" / "config.json").read_text())["model_args"]
    assert int(args["embed_dim"] * args["mlp_ratio"]) == first_layer


def test_timm_and_hf_refuse_what_they_cannot_hold(tmp_path, capsys):
    write(str(tmp_path / "run"), RECIPE)
    with pytest.raises(WeightsError, match="--to npz"):
        export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "o"), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conv stem" in err[0] and "GAP" in err[0]
    assert not (tmp_path / "o").exists()  # refused before any folder was made
    write(str(tmp_path / "ls"), dict(PLAIN, layer_scale=0.5))
    with pytest.raises(WeightsError, match="LayerScale, which HF ViT lacks"):
        export_weights(str(tmp_path / "ls"), "hf", str(tmp_path / "ls-hf"))
    write(str(tmp_path / "reg"), dict(PLAIN, num_registers=2))
    with pytest.raises(WeightsError, match="register tokens, which HF ViT lacks"):
        export_weights(str(tmp_path / "reg"), "hf", str(tmp_path / "reg-hf"))
    write(str(tmp_path / "qk"), dict(PLAIN, qk_norm=True))
    with pytest.raises(WeightsError, match="qk-norm, which HF ViT lacks"):
        export_weights(str(tmp_path / "qk"), "hf", str(tmp_path / "qk-hf"))
    write(str(tmp_path / "swiglu"), dict(PLAIN, swiglu=True))
    with pytest.raises(WeightsError, match="SwiGLU MLPs, which HF ViT lacks"):
        export_weights(str(tmp_path / "swiglu"), "hf", str(tmp_path / "swiglu-hf"))
    write(str(tmp_path / "clip"), dict(PLAIN, pre_norm=True))
    with pytest.raises(WeightsError, match="a pre-norm \\(CLIP\\), which HF ViT lacks"):
        export_weights(str(tmp_path / "clip"), "hf", str(tmp_path / "clip-hf"))


def test_heads_from_the_kernel_shape_overrule_a_wrong_flag(tmp_path):
    write(str(tmp_path / "run"), PLAIN)
    export_weights(str(tmp_path / "run"), "npz", str(tmp_path / "out"))
    (tmp_path / "out" / "config.json").unlink()  # a bare vit_jax .npz
    with pytest.raises(WeightsError, match="holds 2 heads"):
        convert_weights(str(tmp_path / "out" / "model.npz"), str(tmp_path / "b"), num_heads=4)
    path, notes = convert_weights(str(tmp_path / "out" / "model.npz"), str(tmp_path / "c"))
    assert load_inference_model(path).model.num_heads == 2
    assert not any("heads assumed" in n for n in notes)
    # a bare vit_jax .npz at another size: resampled as vit_jax's own code does, as fine-tuning
    _, notes = convert_weights(str(tmp_path / "out" / "model.npz"), str(tmp_path / "d"),
                               image_size=32)
    assert "posemb resampled 4x4 -> 8x8 (zoom)" in notes
    # timm fuses the heads ([D, D]), but qk-norm's [head_dim] scales tell them: 32 / 16 = 2
    write(str(tmp_path / "qk"), dict(PLAIN, qk_norm=True))
    export_weights(str(tmp_path / "qk"), "timm", str(tmp_path / "qk-out"))
    (tmp_path / "qk-out" / "config.json").unlink()
    path, notes = convert_weights(str(tmp_path / "qk-out" / "model.safetensors"),
                                  str(tmp_path / "qk-back"))
    assert load_inference_model(path).model.num_heads == 2
    assert not any("heads assumed" in n for n in notes)


@pytest.mark.parametrize("name,content,reason", [
    ("model.npz", b"not a zip archive", "ValueError: "),
    ("model.safetensors", b"\xff" * 16, "SafetensorError: "),
    ("model.npz", b"", "EOFError: No data left in file"),
])
def test_damaged_weight_file_is_one_line_and_writes_nothing(tmp_path, capsys, name, content,
                                                            reason):
    src = tmp_path / name
    src.write_bytes(content)
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) == cli.USAGE_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    suffix = name.rpartition(".")[2]
    assert err.startswith(f"error: cannot read '{src}' as a .{suffix} weight file ({reason}")
    assert err.endswith("): the file is damaged or not what its name says; download or write it "
                        "again")
    assert not (tmp_path / "out").exists()


def test_what_a_sidecar_config_cannot_mean_is_refused_in_one_line(tmp_path):
    """A config.json that is not JSON, a non-GELU activation, a normalisation this toolkit does
    not know: each is one WeightsError, never a silent guess."""
    src, _, _ = _source(tmp_path, "timm_vit_tiny")
    config = tmp_path / "src" / "config.json"
    config.write_text("{not json")
    with pytest.raises(WeightsError, match=r"config.json beside the weights cannot be read as "
                                           r"JSON \(.*\): it says how to rebuild the model"):
        convert_weights(src, str(tmp_path / "a"))
    config.write_text(json.dumps({"model_type": "vit", "hidden_act": "relu"}))
    with pytest.raises(WeightsError, match="config.json's hidden_act is 'relu': this toolkit's "
                                           "ViT computes GELU"):
        convert_weights(src, str(tmp_path / "b"))
    timm_cfg = {"model_args": {"num_heads": 3},
                "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    config.write_text(json.dumps(timm_cfg))
    with pytest.raises(WeightsError) as info:
        convert_weights(src, str(tmp_path / "c"))
    assert str(info.value) == (
        "the file's input normalisation (mean [0.1, 0.2, 0.3], std [0.4, 0.5, 0.6]) is none of "
        "minus_one_to_one, imagenet, cifar10, clip: pass --normalize NAME to convert with that one "
        "instead")
    path, _ = convert_weights(src, str(tmp_path / "d"), normalize="imagenet")  # the user chose
    assert load_inference_model(path).config.pp.normalize == "imagenet"
    assert not any((tmp_path / name).exists() for name in "abc")


def _same_model(before, after, x: np.ndarray | None = None) -> None:
    """`after` (a loaded checkpoint) computes exactly what `before` does on `x` (default: two
    16x16 images), with the same params."""
    if x is None:
        x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(after.model.apply({"params": after.params}, x)),
        np.asarray(before.model.apply({"params": before.params}, x)))
    got, want = flatten_params(after.params), flatten_params(before.params)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), name)


@pytest.mark.parametrize("model", [dict(PLAIN, gelu_approximate=False), RECIPE],
                         ids=["erf-gelu", "convstem-sincos"])
def test_a_checkpoint_converts_with_its_own_run_config(tmp_path, model):
    """GELU, normalisation, eval_resize and class names come from the run, not from guesses;
    conv-stem and sin-cos checkpoints (nothing to infer them from) convert too."""
    write(str(tmp_path / "run"), model, normalize="imagenet", pp={"eval_resize": 20})
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    before, after = (load_inference_model(str(tmp_path / n)) for n in ("run", "back"))
    _same_model(before, after)
    assert after.config.model.to_dict() == before.config.model.to_dict()
    assert after.model.gelu_approximate == model.get("gelu_approximate", True)
    assert after.config.pp.normalize == "imagenet" and after.config.pp.eval_resize == 20
    assert after.info.class_names == ("c0", "c1", "c2", "c3", "c4")


def test_a_converted_checkpoint_keeps_its_dataset_and_a_weight_file_names_none(tmp_path,
                                                                               capsys):
    write(str(tmp_path / "run"), PLAIN, classes=[4, 1, 0, 2, 3], eval_split="test[:7]")
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "back")]) == 0
    back = load_inference_model(str(tmp_path / "back"))
    assert back.config.dataset == "tiny" and back.config.eval_split == "test[:7]"
    assert list(back.config.classes) == [4, 1, 0, 2, 3]
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "npz"), "--to", "npz"]) == 0
    os.remove(tmp_path / "npz" / "config.json")  # a bare weight file: nothing says its data
    assert cli.main(["convert", str(tmp_path / "npz" / "model.npz"), str(tmp_path / "bare"),
                     "--num-heads", "2"]) == 0
    capsys.readouterr()
    assert load_inference_model(str(tmp_path / "bare")).config.dataset == ""
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "bare")]) != 0
    assert capsys.readouterr().err.strip() == (
        "error: this run names no dataset (weights converted from a file have none): pass "
        "--dataset NAME (vit eval, robustness, fewshot, prune), or set config.dataset")
    for classes in (5, 3):  # robustness takes --dataset too, whose labels are the head's
        for c in range(classes):
            (tmp_path / f"folder{classes}" / "test" / f"c{c}").mkdir(parents=True)
            Image.fromarray(np.full((16, 16, 3), 40 * c, np.uint8)).save(
                tmp_path / f"folder{classes}" / "test" / f"c{c}" / "a.png")
    args = ["robustness", "--checkpoint", str(tmp_path / "bare"), "--split", "test",
            "--corruptions", "none", "--attack", "none", "--json", str(tmp_path / "r.json")]
    assert cli.main([*args, "--dataset", f"folder:{tmp_path / 'folder5'}"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["num_examples"] == 5
    capsys.readouterr()
    assert cli.main([*args, "--dataset", f"folder:{tmp_path / 'folder3'}"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "has 3 classes, the head of '" + str(tmp_path / "bare") + "' 5: pass a dataset whose "
        "labels are the head's classes")


def test_a_hub_folder_converts_as_its_weight_file(tmp_path):
    """The folder HF's from_pretrained takes: model.safetensors beside config.json."""
    write(str(tmp_path / "run"), PLAIN)
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "hub"), "--to", "hf"]) == 0
    assert cli.main(["convert", str(tmp_path / "hub"), str(tmp_path / "back")]) == 0
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(_logits(str(tmp_path / "back"), x),
                               _logits(str(tmp_path / "run"), x), atol=1e-5)


WIDE = (16, 24)  # 4x6 patches of Ti/4


def _wide_images(count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, *WIDE, 3)).astype(np.float32)


def test_a_checkpoint_of_rectangular_images_loads_and_converts(tmp_path):
    """A run of 16x24 images loads at its size and converts into the same model, kept at it."""
    model, params = write(str(tmp_path / "run"), PLAIN, image_size=WIDE, pp={"eval_resize": 20})
    loaded = load_inference_model(str(tmp_path / "run"))
    x = _wide_images()
    assert tuple(loaded.model.image_size) == WIDE and tuple(loaded.model.grid) == (4, 6)
    np.testing.assert_array_equal(_logits(str(tmp_path / "run"), x),
                                  np.asarray(model.apply({"params": params}, x)))
    path, _ = convert_weights(str(tmp_path / "run"), str(tmp_path / "back"))
    after = load_inference_model(path)
    assert list(after.config.image_size) == [16, 24] and after.config.pp.eval_resize == 20
    assert tuple(after.info.image_shape) == (16, 24, 3)
    np.testing.assert_array_equal(_logits(path, x), _logits(str(tmp_path / "run"), x))


@pytest.mark.parametrize("target,model", [("timm", PLAIN), ("timm", dict(PLAIN, classifier="gap")),
                                          ("hf", PLAIN), ("npz", dict(RECIPE, num_registers=2))])
def test_a_rectangular_model_goes_out_and_comes_back(tmp_path, target, model):
    """timm's img_size and HF's image_size state [rows, cols] (input_size [3, rows, cols]), and
    the crop the eval resize makes; converting the files back gives the same model."""
    write(str(tmp_path / "run"), model, image_size=WIDE, pp={"eval_resize": 20})
    files = export_weights(str(tmp_path / "run"), target, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if target == "timm":
        assert config["model_args"]["img_size"] == [16, 24]
        assert config["pretrained_cfg"]["input_size"] == [3, 16, 24]
        assert config["pretrained_cfg"]["crop_pct"] == 0.8  # the shorter side 16 / 20
    if target == "hf":
        pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
        assert config["image_size"] == [16, 24] and pre["size"] == {"shortest_edge": 20}
        assert pre["crop_size"] == {"height": 16, "width": 24}
    if target == "npz":
        assert config["vit"]["image_size"] == [16, 24]
    path, notes = convert_weights(files[0], str(tmp_path / "back"))
    before, after = load_inference_model(str(tmp_path / "run")), load_inference_model(path)
    assert list(after.config.image_size) == [16, 24] and after.config.pp.eval_resize == 20
    assert not any("posemb" in note for note in notes)
    _same_model(before, after, _wide_images())


def test_timms_input_size_states_the_grid_where_model_args_do_not(tmp_path):
    write(str(tmp_path / "run"), PLAIN, image_size=WIDE)
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "out"))
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    del config["model_args"]["img_size"]  # pretrained_cfg.input_size [3, 16, 24] remains
    config_path.write_text(json.dumps(config))
    path, _ = convert_weights(str(tmp_path / "out" / "model.safetensors"), str(tmp_path / "back"))
    _same_model(load_inference_model(str(tmp_path / "run")), load_inference_model(path),
                _wide_images())


def test_a_square_model_still_states_an_int_size(tmp_path):
    write(str(tmp_path / "run"), PLAIN)
    export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "timm"))
    export_weights(str(tmp_path / "run"), "hf", str(tmp_path / "hf"))
    timm = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert timm["model_args"]["img_size"] == 16
    assert timm["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == 16
    path, _ = convert_weights(str(tmp_path / "hf" / "model.safetensors"), str(tmp_path / "back"))
    assert load_inference_model(path).config.image_size == 16


def test_a_stated_size_that_contradicts_the_position_embedding_is_one_line(tmp_path, capsys):
    """The token count of a rectangle says nothing of its rows without a stated size; a stated
    size whose grid does not hold the tokens is refused, never guessed around."""
    write(str(tmp_path / "run"), PLAIN, image_size=WIDE)
    export_weights(str(tmp_path / "run"), "hf", str(tmp_path / "out"))
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "image_size": 16}))
    src = str(tmp_path / "out" / "model.safetensors")
    capsys.readouterr()
    assert cli.main(["convert", src, str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: config.json beside the weights states image size 16, which 4-pixel patches do "
        "not cut into the position embedding's 24 patch tokens: fix its image size"]
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "image_size"}))
    assert cli.main(["convert", src, str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the position embedding has 24 patch tokens, not a square grid, and no "
        "config.json beside the weights states the image size: add the one it was written "
        "with, or fine-tune from these weights with configs/finetune.py"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("stated", [20, 18])  # a 5x5 grid; no whole number of 4-pixel patches
def test_a_stated_size_beside_square_weights_that_does_not_fit_is_noted_not_fatal(tmp_path,
                                                                                  capsys, stated):
    write(str(tmp_path / "run"), PLAIN, image_size=16)  # 4x4 patches of 4 pixels
    export_weights(str(tmp_path / "run"), "hf", str(tmp_path / "out"))
    config_path = tmp_path / "out" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "image_size": stated}))
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "out" / "model.safetensors"),
                     str(tmp_path / "a")]) == 0
    assert (f"config.json states image size {stated}, which does not fit the position "
            "embedding's 16 patch tokens: taken as 16x16, their square") in capsys.readouterr().out
    assert load_inference_model(str(tmp_path / "a")).model.image_size == (16, 16)


def test_convert_ema_and_flags_that_do_nothing(tmp_path, capsys):
    import jax

    from vit.checkpoint import Checkpointer, load_checkpoint

    write(str(tmp_path / "run"), PLAIN)
    contents = load_checkpoint(str(tmp_path / "run"))
    ema = jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, contents.params)
    ckpt = Checkpointer(str(tmp_path / "ema"))
    ckpt.save(3, {"step": 3, "params": contents.params, "ema_params": ema},
              config=contents.config, dataset_info=contents.dataset_info, force=True)
    ckpt.close()
    assert cli.main(["convert", str(tmp_path / "ema"), str(tmp_path / "e"), "--ema"]) == 0
    got = flatten_params(load_inference_model(str(tmp_path / "e")).params)
    for name, value in flatten_params(ema).items():
        np.testing.assert_array_equal(np.asarray(got[name]), value, name)
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "x"), "--ema"]) == 2
    assert "holds no EMA params: drop --ema / use_ema, or train with " \
        "ema_decay set" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "t"), "--to", "npz",
                     "--gelu", "erf", "--normalize", "imagenet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --normalize, --gelu describe weights read in, but --to writes the checkpoint's "
        "own model, classes and preprocessing: drop them")
    with pytest.raises(SystemExit) as usage:
        cli.main(["convert", str(tmp_path / "run"), str(tmp_path / "h"), "--num-heads", "0"])
    assert usage.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: vit convert: argument --num-heads: must be "
                                               "a positive integer, got 0 (see vit convert --help)")
    assert not any((tmp_path / n).exists() for n in ("x", "t", "h"))


def test_an_int8_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    from vit.quantize import quantize_checkpoint

    write(str(tmp_path / "run"), PLAIN)
    quantize_checkpoint(str(tmp_path / "run"), str(tmp_path / "int8"))
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "int8"), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'int8'} holds int8-quantised weights, which convert "
                   "cannot rebuild as a float model: convert the float checkpoint it was "
                   "quantised from"]
    assert not (tmp_path / "back").exists()


def _cudnn_checkpoint(tmp_path) -> str:
    """A checkpoint whose run config says attention_impl "cudnn" (as a GPU run writes)."""
    from vit.checkpoint import Checkpointer, load_checkpoint

    write(str(tmp_path / "cpu"), PLAIN)
    contents = load_checkpoint(str(tmp_path / "cpu"))
    contents.config["model"]["attention_impl"] = "cudnn"
    ckpt = Checkpointer(str(tmp_path / "gpu"))
    ckpt.save(3, {"step": 3, "params": contents.params}, config=contents.config,
              dataset_info=contents.dataset_info, force=True)
    ckpt.close()
    return str(tmp_path / "gpu")


@pytest.mark.parametrize("source", ["checkpoint", "npz"])
def test_a_cudnn_run_converts_on_a_cpu(tmp_path, source):
    src = _cudnn_checkpoint(tmp_path)
    if source == "npz":
        export_weights(src, "npz", str(tmp_path / "out"))
        src = str(tmp_path / "out" / "model.npz")
        assert json.loads((tmp_path / "out" / "config.json").read_text())["vit"]["model"][
            "attention_impl"] == "cudnn"
    path, _ = convert_weights(src, str(tmp_path / "back"))
    after = load_inference_model(path)
    assert after.config.model.attention_impl == "cudnn" and after.model.attention_impl == "explicit"
    _same_model(load_inference_model(str(tmp_path / "cpu")), after)


@pytest.mark.parametrize("target", ["timm", "hf", "npz"])
@pytest.mark.parametrize("eval_resize", [20, None])
def test_eval_resize_goes_out_and_comes_back(tmp_path, target, eval_resize):
    """timm: crop_pct = size / eval_resize, crop_mode "center" ("squash" for a plain resize);
    HF: BitImageProcessor resizing the shorter side, then a central crop."""
    write(str(tmp_path / "run"), PLAIN, pp={"eval_resize": eval_resize})
    files = export_weights(str(tmp_path / "run"), target, str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if target == "timm":
        crop = {k: config["pretrained_cfg"][k] for k in ("crop_pct", "crop_mode")}
        assert crop == ({"crop_pct": 0.8, "crop_mode": "center"} if eval_resize else
                        {"crop_pct": 1.0, "crop_mode": "squash"})
    if target == "hf":
        pre = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
        if eval_resize:
            assert pre["image_processor_type"] == "BitImageProcessor"
            assert pre["size"] == {"shortest_edge": 20} and pre["do_center_crop"] is True
            assert pre["crop_size"] == {"height": 16, "width": 16}
        else:
            assert pre["image_processor_type"] == "ViTImageProcessor"
            assert pre["size"] == {"height": 16, "width": 16} and "do_center_crop" not in pre
    path, _ = convert_weights(files[0], str(tmp_path / "back"))
    assert load_inference_model(path).config.pp.eval_resize == eval_resize


def test_timm_hub_crop_pct_becomes_eval_resize(tmp_path):
    src, _, _ = _source(tmp_path, "timm_vit_tiny")  # 64 px
    cfg = {"model_args": {"num_heads": 3}, "pretrained_cfg": {"crop_pct": 0.9}}
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    path, _ = convert_weights(src, str(tmp_path / "a"))
    assert load_inference_model(path).config.pp.eval_resize == 71  # timm: floor(64 / 0.9)


@pytest.mark.parametrize("target,swiglu", [("timm", False), ("hf", False), ("timm", True)])
def test_a_depth_0_model_round_trips(tmp_path, target, swiglu):
    """Without blocks the MLP size comes from the config.json: timm's mlp_ratio of a SwiGLU
    model (its giant architecture) describes the first layer, twice mlp_dim."""
    write(str(tmp_path / "run"), dict(PLAIN, depth=0, swiglu=swiglu), normalize="imagenet")
    files = export_weights(str(tmp_path / "run"), target, str(tmp_path / "out"))
    path, _ = convert_weights(files[0], str(tmp_path / "back"))
    before, after = load_inference_model(str(tmp_path / "run")), load_inference_model(path)
    _same_model(before, after)
    assert (after.model.depth, after.model.num_heads, after.model.mlp_dim) == (0, 2, 64)


def _npz(tmp_path, drop: str = "", **arrays) -> str:
    """A bare vit_jax .npz of a tiny model, without `drop`, with `arrays` replacing its own."""
    write(str(tmp_path / "run"), PLAIN)
    export_weights(str(tmp_path / "run"), "npz", str(tmp_path / "out"))
    (tmp_path / "out" / "config.json").unlink()
    path = tmp_path / "out" / "model.npz"
    with np.load(path) as f:
        state = {k: f[k] for k in f.files if k != drop}
    np.savez(path, **{**state, **arrays})
    return str(path)


def _scanned(tmp_path) -> str:
    """A damaged big_vision *scanned* checkpoint: Transformer/encoderblock/... arrays stacked
    over different numbers of layers."""
    state = {"params/embedding/kernel": np.zeros((4, 4, 3, 32), np.float32),
             "params/head/kernel": np.zeros((32, 5), np.float32),
             "params/Transformer/encoderblock/LayerNorm_0/scale": np.ones((2, 32), np.float32),
             "params/Transformer/encoderblock/LayerNorm_0/bias": np.ones((3, 32), np.float32)}
    np.savez(tmp_path / "scanned.npz", **state)
    return str(tmp_path / "scanned.npz")


def _hf_tower(tmp_path, **arrays) -> str:
    """An HF image-tower file: the CLIP fixture's arrays with `arrays` added or replaced (None
    removes one)."""
    meta, _ = fixture("hf_clip_tiny")
    state = {**random_weights.build(meta["manifest"], meta["seed"]), **arrays}
    path = tmp_path / "tower.safetensors"
    safetensors.numpy.save_file({k: v for k, v in state.items() if v is not None}, str(path))
    return str(path)


def _hf_half_swiglu(tmp_path) -> str:
    meta, _ = fixture("hf_dinov2_swiglu_tiny")
    state = random_weights.build(meta["manifest"], meta["seed"])
    del state["encoder.layer.1.mlp.gate_proj.weight"]
    safetensors.numpy.save_file(state, str(tmp_path / "half.safetensors"))
    return str(tmp_path / "half.safetensors")


def _scanned_scalar(tmp_path) -> str:
    state = {"params/embedding/kernel": np.zeros((4, 4, 3, 32), np.float32),
             "params/Transformer/encoderblock/LayerNorm_0/scale": np.float32(1.0)}
    np.savez(tmp_path / "scalar.npz", **state)
    return str(tmp_path / "scalar.npz")


def _with_config(tmp_path, edit) -> str:
    """A .npz with the config.json `--to npz` writes, changed by `edit`."""
    write(str(tmp_path / "run"), PLAIN)
    export_weights(str(tmp_path / "run"), "npz", str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    edit(config["vit"])
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "out" / "model.npz")


def _timm_mean_only(tmp_path) -> str:
    src, _, _ = _source(tmp_path, "timm_vit_tiny")
    config = {"model_args": {"num_heads": 3}, "pretrained_cfg": {"mean": [0.5, 0.5, 0.5]}}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    return src


MLP = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"


@pytest.mark.parametrize("make,message", [
    (_scanned, "scanned encoder blocks (Transformer/encoderblock/...) of different depths [2, "
               "3]: the file is damaged or not one model"),
    (lambda p: _npz(p, drop=MLP), f"the weights have no {MLP}, so the model cannot be inferred"),
    (lambda p: _npz(p, **{"embedding/kernel": np.zeros((48, 32), np.float32)}),
     "embedding/kernel has shape (48, 32), not [patch, patch, channels, width]"),
    (lambda p: _with_config(p, lambda c: c["model"].pop("variant")),
     'the "vit" entry of config.json beside the weights has no model.variant'),
    (lambda p: _with_config(p, lambda c: c.pop("image_size")),
     'the "vit" entry of config.json beside the weights has no image_size'),
    (_timm_mean_only, "config.json's pretrained_cfg gives mean but no std, so the input "
                      "normalisation is unknown; add it, or pass --normalize NAME"),
    (lambda p: _hf_tower(p, **{"classifier.weight": np.zeros((3, 192), np.float32)}),
     "HF CLIPForImageClassification / SiglipForImageClassification pool by a mean over the "
     "tokens"),
    (lambda p: _hf_tower(p, **{"vision_model.embeddings.patch_embedding.weight":
                               np.zeros((192, 768), np.float32)}),
     "embeddings.patch_embedding.weight has shape (192, 768), not a convolution's "
     "[out, in, patch, patch]: linear patch embeddings (SigLIP 2's NaFlex) cannot be loaded"),
    (_hf_half_swiglu, "Transformer/encoderblock_1/MlpBlock_3: a SwiGLU MLP has gate_proj and "
                      "up_proj kernels in pairs, and the gate one is missing"),
    (_scanned_scalar, "Transformer/encoderblock/LayerNorm_0/scale is a scalar, not stacked over "
                      "the layers"),
], ids=["scanned", "no-mlp-kernel", "2d-embedding", "no-variant", "no-image-size", "no-std",
        "hf-image-classification", "linear-patch-embedding", "half-swiglu", "scanned-scalar"])
def test_weights_that_cannot_be_mapped_are_one_line(tmp_path, capsys, make, message):
    src = make(tmp_path)
    capsys.readouterr()
    assert cli.main(["convert", src, str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "back").exists()


def test_a_failed_write_leaves_no_folder_and_no_partial_files(tmp_path, monkeypatch):
    from vit import convert

    write(str(tmp_path / "run"), PLAIN)

    def disk_full(state, path):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert, "_save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_weights(str(tmp_path / "run"), "hf", str(tmp_path / "new" / "out"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    with pytest.raises(OSError, match="No space left"):
        export_weights(str(tmp_path / "run"), "timm", str(tmp_path / "there"))
    assert list((tmp_path / "there").iterdir()) == []  # kept, and as empty as it was


def test_a_timm_config_with_a_null_pretrained_cfg_reads_as_empty():
    from vit.weight_sidecars import what_the_file_says

    said = what_the_file_says({"architecture": "vit_base_patch16_clip_224",
                               "pretrained_cfg": None}, {})
    assert said == {"gelu": "erf", "norm_epsilon": 1e-5}  # timm's CLIP LayerNorms
