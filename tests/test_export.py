"""Tests for vit.export and vit.onnx_export: every format matches the JAX model on write."""

import dataclasses
import importlib.util
import json
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tiny_checkpoints import PLAIN, RECIPE, image_files, write

from vit import cli, data
from vit import export as export_module
from vit.evaluate import load_inference_model
from vit.export import (
    ExportError,
    check_images,
    crops,
    export,
    load_stablehlo,
)
from vit.predict import model_inputs, read_images
from vit.tf_export import tflite_runner

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A conv-stem GAP sin-cos checkpoint with registers, and three image files."""
    root = tmp_path_factory.mktemp("export")
    write(str(root / "run"), dict(RECIPE, num_registers=2))
    return root / "run", image_files(root / "images")


def _reference(run, files):
    loaded = load_inference_model(str(run))
    _, images, _ = read_images(files)
    x = model_inputs(images, loaded.config)
    return loaded, images, np.asarray(loaded.model.apply({"params": loaded.params}, x))


def test_stablehlo_matches_and_loads_without_model_code(recipe, tmp_path):
    run, files = recipe
    result = export(str(run), "stablehlo", tmp_path, images=files, measure_speed=False)
    assert result.max_abs_diff <= 1e-4 and result.size_bytes > 0
    loaded, _, want = _reference(run, files)
    _, images, _ = read_images(files)
    got = np.asarray(load_stablehlo(tmp_path)(model_inputs(images, loaded.config)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    meta = json.loads((tmp_path / "export.json").read_text())["stablehlo"]
    assert meta["normalize"] == "cifar10" and meta["class_names"][0] == "c0"
    assert meta["use_ema"] is False
    assert meta["check"]["images_per_s"] is None  # not measured: null, not NaN
    assert "speed not measured" in result.summary()


def test_a_bfloat16_model_exports_as_its_float32_model(tmp_path):
    """dtype="bfloat16" (activations in bf16): the export and its check both run in float32."""
    model, params = write(str(tmp_path / "run"), dict(PLAIN, dtype="bfloat16"))
    files = image_files(tmp_path / "images")
    result = export(str(tmp_path / "run"), "stablehlo", tmp_path / "out", images=files,
                    measure_speed=False)
    assert result.max_abs_diff <= 1e-4
    loaded = load_inference_model(str(tmp_path / "run"))
    _, images, _ = read_images(files)
    x = model_inputs(images, loaded.config)
    got = np.asarray(load_stablehlo(tmp_path / "out")(x))
    float32 = model.clone(dtype=jax.numpy.float32).apply({"params": params}, x)
    np.testing.assert_allclose(got, float32, atol=1e-5, rtol=0)
    bf16 = np.asarray(model.apply({"params": params}, x), np.float32)
    assert np.abs(bf16 - float32).max() > 1e-3  # the bfloat16 model itself is another model


def test_saved_model_serving_takes_uint8_of_any_size_and_batch(recipe, tmp_path):
    import tensorflow as tf

    run, files = recipe
    result = export(str(run), "saved_model", tmp_path, images=files, measure_speed=False)
    assert result.max_abs_diff <= 1e-4
    _, images, want = _reference(run, files)
    serving = tf.saved_model.load(str(tmp_path / "saved_model")).signatures["serving_default"]
    out = serving(images=tf.constant(images[2][None]))  # 30x22 pixels, batch 1
    np.testing.assert_allclose(out["logits"].numpy(), want[2:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)


def test_a_model_with_eval_resize_exports_to_every_format(tmp_path):
    """The batch check feeds evaluation crops to `pixels`, not to `serving_default`, which
    would resize and crop them a second time."""
    write(str(tmp_path / "run"), PLAIN, pp={"eval_resize": 20})
    files = image_files(tmp_path / "images")
    for fmt in ("saved_model", "stablehlo", "tflite", *(("onnx",) if HAS_ONNX else ())):
        result = export(str(tmp_path / "run"), fmt, tmp_path / "out", images=files,
                        measure_speed=False)
        assert result.max_abs_diff <= 1e-4, fmt
    meta = json.loads((tmp_path / "out" / "export.json").read_text())
    assert meta["saved_model"]["checkpoint"] == str(tmp_path / "run")


def test_tflite_from_the_saved_model_matches(recipe, tmp_path, capfd):
    run, files = recipe
    result = export(str(run), "tflite", tmp_path, images=files, measure_speed=False)
    assert result.max_abs_diff <= 1e-4 and result.path.endswith("model.tflite")
    loaded, _, want = _reference(run, files)
    _, images, _ = read_images(files)
    got = tflite_runner(result.path)(crops(images, loaded.config))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert "XNNPACK" not in capfd.readouterr().err  # the interpreter's INFO line is kept quiet


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed: pip install -e '.[onnx]'")
@pytest.mark.parametrize("model", [
    dict(PLAIN, num_registers=1, representation_size=16, gelu_approximate=False),
    dict(RECIPE, stem_norm="layernorm"),
    RECIPE,
    dict(PLAIN, matmul_dtype="bfloat16"),
    dict(PLAIN, dtype="bfloat16"),
    dict(PLAIN, layer_scale=0.5),
    dict(PLAIN, pre_norm=True, quick_gelu=True, classifier="gap"),
    dict(PLAIN, swiglu=True, layer_scale=0.5),
    dict(PLAIN, qk_norm=True),
    dict(PLAIN, rope="dinov3", posemb="none", key_bias=False, num_registers=2,
         norm_epsilon=1e-5, layer_scale=0.5),
    dict(PLAIN, rope="dinov3", classifier="gap", qk_norm=True),
    dict(PLAIN, rope="eva02", rope_grid=(16, 16), swiglu=True, mlp_norm=True, classifier="gap",
         class_token=True, fc_norm=True, key_bias=False),
], ids=["token-registers-prelogits-erf", "convstem-layernorm", "recipe", "bf16-matmuls",
        "bf16-dtype", "layer-scale", "clip-prenorm-quickgelu-gap", "swiglu", "qk-norm",
        "rope-dinov3-registers", "rope-learned-posemb-gap-qknorm", "eva02"])
def test_onnx_matches_with_onnxruntime(tmp_path, model):
    write(str(tmp_path / "run"), model, normalize="imagenet")
    result = export(str(tmp_path / "run"), "onnx", tmp_path / "out", measure_speed=False)
    assert result.max_abs_diff <= 1e-4
    assert result.verified_on.startswith("7 synthetic images (no evaluation images: ")


def test_cli_export_prints_the_check_and_names_bad_input(recipe, tmp_path, capsys):
    run, files = recipe
    out = tmp_path / "check.json"
    code = cli.main(["export", "--checkpoint", str(run), "--format", "stablehlo", "--out",
                     str(tmp_path / "e"), "--images", *files, "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "max |logit diff|" in capsys.readouterr().out
    assert json.loads(out.read_text())["max_abs_diff"] <= 1e-4
    write(str(tmp_path / "map"), dict(PLAIN, classifier="map"))
    code = cli.main(["export", "--checkpoint", str(tmp_path / "map"), "--format", "onnx",
                     "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "does not support a MAP head" in err[0]  # refused before the onnx extra is needed
    assert not (tmp_path / "m").exists()


def test_onnx_refuses_weights_one_protobuf_cannot_hold(tmp_path, capsys, monkeypatch):
    """ViT-H and larger hold over 2 GiB of float32 weights, more than one ONNX protobuf takes:
    refused in one line naming the other formats (the limit lowered here to a tiny model's)."""
    from vit import onnx_export

    model, params = write(str(tmp_path / "run"), PLAIN)
    size = sum(4 * np.size(v) for v in jax.tree_util.tree_leaves(params))
    monkeypatch.setattr(onnx_export, "WEIGHT_BYTES_LIMIT", size - 1)
    code = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "onnx",
                     "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: the onnx exporter does not support weights of 0.00 GiB (one "
                             "ONNX protobuf holds at most 2 GiB); export this model with "
                             "--format saved_model or stablehlo instead"), err
    assert not (tmp_path / "m").exists()


def test_missing_images_are_one_error(recipe, tmp_path):
    run, _ = recipe
    with pytest.raises(ExportError, match="does not exist"):
        export(str(run), "stablehlo", tmp_path, images=[str(tmp_path / "none.png")])


def _files_in(directory):
    """{relative path: bytes} of every file under `directory` (names of directories too)."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def _writer_with_head_bias_moved_by(delta):
    """The real stablehlo writer, but writing the model with every head bias moved by `delta`:
    the written artefact's logits are then the model's + delta, exactly."""
    real = export_module._WRITERS["stablehlo"]

    def write_wrong(loaded, out):
        params = jax.tree_util.tree_map(np.asarray, loaded.params)
        params["head"]["bias"] = params["head"]["bias"] + np.float32(delta)
        return real(dataclasses.replace(loaded, params=params), out)

    return write_wrong


def test_a_wrong_export_fails_in_one_line_and_leaves_the_directory_as_it_was(
        recipe, tmp_path, monkeypatch, capsys):
    run, files = recipe
    out = tmp_path / "out"
    good = export(str(run), "stablehlo", out, images=files, measure_speed=False)
    before = _files_in(out)
    assert set(before) == {"model.stablehlo", "export.json"} and good.max_abs_diff <= 1e-5

    monkeypatch.setitem(export_module._WRITERS, "stablehlo", _writer_with_head_bias_moved_by(5e-5))
    within = export(str(run), "stablehlo", tmp_path / "within", images=files, measure_speed=False)
    assert 4e-5 < within.max_abs_diff <= 1e-4  # the check measures the artefact, not the model

    monkeypatch.setitem(export_module._WRITERS, "stablehlo", _writer_with_head_bias_moved_by(1e-3))
    code = cli.main(["export", "--checkpoint", str(run), "--format", "stablehlo", "--out",
                     str(out), "--images", *files, "--no-speed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert re.fullmatch(r"error: the stablehlo export differs from the model by 0\.001\d* "
                        r"\(> 0\.0001\) in its logits on 3 image files, so it was not written "
                        rf"to {re.escape(str(out))}; report the model config that caused it",
                        err[0]), err[0]
    assert _files_in(out) == before  # the earlier, verified export is untouched; no leftovers
    with pytest.raises(ExportError, match="differs from the model"):
        export(str(run), "stablehlo", tmp_path / "fresh" / "out", images=files,
               measure_speed=False)
    assert not (tmp_path / "fresh").exists()  # the folders this call made are gone again


def test_a_writer_that_crashes_leaves_nothing_behind(recipe, tmp_path, monkeypatch):
    run, files = recipe

    def crash_half_way(loaded, out):
        (out / "model.stablehlo").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setitem(export_module._WRITERS, "stablehlo", crash_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        export(str(run), "stablehlo", tmp_path / "out", images=files, measure_speed=False)
    assert not (tmp_path / "out").exists()


def test_export_checks_on_the_runs_evaluation_images_by_default(tmp_path, capsys):
    with tfds.testing.mock_data(num_examples=10):
        write(str(tmp_path / "run"), RECIPE, num_classes=10, image_size=32, dataset="cifar10",
              data_dir=str(tmp_path / "tfds"))
        loaded = load_inference_model(str(tmp_path / "run"))
        images, what = check_images(loaded, None)
        first = next(data.eval_iterator(loaded.config, batch_size=8,
                                        num_devices=1))["image"][0][:7]
        code = cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--format",
                         "stablehlo", "--out", str(tmp_path / "e"), "--no-speed"])
    assert what == "7 images of cifar10 test" and len(images) == 7
    np.testing.assert_array_equal(crops(images, loaded.config), first)
    assert code == 0 and "on 7 images of cifar10 test" in capsys.readouterr().out
    check = json.loads((tmp_path / "e" / "export.json").read_text())["stablehlo"]["check"]
    assert check["verified_on"] == "7 images of cifar10 test" and check["max_abs_diff"] <= 1e-4


def test_export_falls_back_to_synthetic_images_and_says_why(recipe):
    run, _ = recipe
    images, what = check_images(load_inference_model(str(run)), None)
    assert what.startswith("7 synthetic images (no evaluation images: unknown dataset 'tiny'")
    assert len(images) == 7 and {im.shape for im in images} == {(16, 16, 3), (25, 19, 3),
                                                                 (32, 16, 3)}


def test_a_second_format_adds_its_entry_to_export_json_and_keeps_the_first(tmp_path):
    from vit.export import _record_export

    path = tmp_path / "export.json"
    path.write_text(json.dumps({"format": "stablehlo", "step": 1}))  # an older flat file
    _record_export(path, "stablehlo", {"step": 2})
    _record_export(path, "saved_model", {"step": 3})
    _record_export(path, "stablehlo", {"step": 4})
    assert json.loads(path.read_text()) == {"stablehlo": {"step": 4}, "saved_model": {"step": 3}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.json"]


def test_an_unreadable_export_json_is_kept_aside_not_overwritten(tmp_path):
    from vit.export import _record_export

    path = tmp_path / "export.json"
    path.write_text('{"stablehlo": {"step": 1}')  # cut short
    _record_export(path, "saved_model", {"step": 2})
    assert json.loads(path.read_text()) == {"saved_model": {"step": 2}}
    assert (tmp_path / "export.json.unreadable").read_text() == '{"stablehlo": {"step": 1}'
    path.write_text("[]")  # a second bad one: kept beside the first
    _record_export(path, "stablehlo", {"step": 3})
    assert (tmp_path / "export.json.unreadable").read_text() == '{"stablehlo": {"step": 1}'
    assert (tmp_path / "export.json.unreadable.2").read_text() == "[]"


WIDE = (16, 24)  # 4x6 patches of Ti/4


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A conv-stem GAP sin-cos checkpoint with a register of 16x24 images (eval_resize 20), and
    three image files."""
    root = tmp_path_factory.mktemp("wide")
    write(str(root / "run"), dict(RECIPE, depth=1, num_registers=1), image_size=WIDE,
          pp={"eval_resize": 20})
    return root / "run", image_files(root / "images")


def _onnx_logits(path, pixels: np.ndarray) -> tuple[np.ndarray, list]:
    """(logits of model.onnx on uint8 `pixels`, the dims of its input)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels})[0], session.get_inputs()[0].shape


def test_a_model_of_rectangular_images_exports_to_every_format(wide, tmp_path):
    """Each artefact takes [N, 16, 24, 3] (stablehlo floats, the others uint8 pixels) and
    gives the JAX model's logits on the same 16x24 crops; export.json says [16, 24]."""
    import tensorflow as tf

    run, files = wide
    loaded, images, want = _reference(run, files)
    pixels = crops(images, loaded.config)
    assert pixels.shape == (3, *WIDE, 3)
    out = tmp_path / "out"
    for fmt in ("stablehlo", "saved_model", "tflite", *(("onnx",) if HAS_ONNX else ())):
        result = export(str(run), fmt, out, images=files, measure_speed=False)
        assert result.max_abs_diff <= 1e-4, fmt
    got = load_stablehlo(out)(model_inputs(images, loaded.config))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
    saved = tf.saved_model.load(str(out / "saved_model")).signatures
    assert saved["pixels"].structured_input_signature[1]["pixels"].shape.as_list() == [
        None, *WIDE, 3]
    for i, image in enumerate(images):  # serving_default crops each file itself
        got = saved["serving_default"](images=tf.constant(image[None]))["logits"].numpy()
        np.testing.assert_allclose(got, want[i:i + 1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tflite_runner(out / "model.tflite")(pixels), want, atol=1e-4,
                               rtol=0)
    meta = json.loads((out / "export.json").read_text())
    if HAS_ONNX:
        got, dims = _onnx_logits(out / "model.onnx", pixels)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert dims == ["N", *WIDE, 3]
    assert [m["image_size"] for m in meta.values()] == [[16, 24]] * (4 if HAS_ONNX else 3)


def test_a_rectangular_model_checks_on_synthetic_images_of_its_shape(wide):
    run, _ = wide
    images, what = check_images(load_inference_model(str(run)), None)
    assert what.startswith("7 synthetic images")
    assert {im.shape for im in images} == {(16, 24, 3), (25, 27, 3), (32, 24, 3)}


def test_a_square_model_still_records_an_int_image_size(recipe, tmp_path):
    run, files = recipe
    export(str(run), "stablehlo", tmp_path, images=files, measure_speed=False)
    assert json.loads((tmp_path / "export.json").read_text())["stablehlo"]["image_size"] == 16
