"""Tests for vit.export and vit.onnx_export: every format matches the JAX model on write."""

import importlib.util
import json

import numpy as np
import pytest
from tiny_checkpoints import PLAIN, RECIPE, image_files, write

from vit import cli
from vit.evaluate import load_inference_model
from vit.export import ExportError, export, load_stablehlo, tflite_runner
from vit.predict import model_inputs, read_images

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
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["normalize"] == "cifar10" and meta["class_names"][0] == "c0"


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


def test_tflite_from_the_saved_model_matches(recipe, tmp_path):
    run, files = recipe
    result = export(str(run), "tflite", tmp_path, images=files, measure_speed=False)
    assert result.max_abs_diff <= 1e-4 and result.path.endswith("model.tflite")
    loaded, _, want = _reference(run, files)
    from vit.export import crops

    _, images, _ = read_images(files)
    got = tflite_runner(result.path)(crops(images, loaded.config))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.skipif(not HAS_ONNX, reason="onnx extra not installed: pip install -e '.[onnx]'")
@pytest.mark.parametrize("model", [
    dict(PLAIN, num_registers=1, representation_size=16, gelu_approximate=False),
    dict(RECIPE, stem_norm="layernorm"),
    RECIPE,
], ids=["token-registers-prelogits-erf", "convstem-layernorm", "recipe"])
def test_onnx_matches_with_onnxruntime(tmp_path, model):
    write(str(tmp_path / "run"), model, normalize="imagenet")
    result = export(str(tmp_path / "run"), "onnx", tmp_path / "out", measure_speed=False)
    assert result.max_abs_diff <= 1e-4 and result.verified_on == "7 synthetic images"


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
    assert ("MAP head" in err[0]) if HAS_ONNX else ("onnx" in err[0])


def test_missing_images_are_one_error(recipe, tmp_path):
    run, _ = recipe
    with pytest.raises(ExportError, match="does not exist"):
        export(str(run), "stablehlo", tmp_path, images=[str(tmp_path / "none.png")])
