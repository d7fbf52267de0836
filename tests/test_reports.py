"""vit.reports: the confusion-matrix and per-class figures (also `vit eval --plots`, tested in
test_cli.py) and the attention example the trainer logs, on the shipped CIFAR-10."""

from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from test_evaluate import tiny_config

import vit
from vit import reports
from vit.evaluate import EvalResult

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = str((ROOT.parent / "shared" / "data" / "tfds").resolve())
NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _result(confusion: np.ndarray) -> EvalResult:
    per_class = np.diag(confusion) / confusion.sum(axis=1)
    return EvalResult(top1=float(np.trace(confusion) / confusion.sum()), top5=0.9, loss=1.0,
                      num_examples=int(confusion.sum()),
                      per_class=dict(zip(NAMES, per_class.tolist(), strict=True)),
                      confusion_matrix=confusion.tolist(), images_per_s=1.0)


def test_write_report_draws_both_pngs_and_the_json(tmp_path):
    confusion = np.random.default_rng(0).integers(0, 20, (10, 10)) + 60 * np.eye(10, dtype=int)
    paths = reports.write_report(_result(confusion), str(tmp_path / "report"))
    assert [Path(p).name for p in paths] == ["metrics.json", "confusion_matrix.png",
                                             "per_class_accuracy.png"]
    for path in paths[1:]:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert min(pixels.shape[:2]) >= 300 and pixels.std() > 10  # a drawn figure


def test_class_names_the_font_lacks_draw_without_a_warning_per_glyph(tmp_path):
    import warnings

    names = ("cat", "émile_猫", "犬")
    confusion = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 4]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pixels = reports.figure_pixels(reports.confusion_figure(confusion, names))
        result = EvalResult(top1=0.6, top5=1.0, loss=1.0, num_examples=12,
                            per_class=dict(zip(names, (0.75, 2 / 3, 0.8), strict=True)),
                            confusion_matrix=confusion.tolist(), images_per_s=1.0)
        reports.write_report(result, str(tmp_path / "report"))
    assert pixels.std() > 10 and not [w for w in caught if "Glyph" in str(w.message)]
    with warnings.catch_warnings(record=True) as unquiet:  # the font does lack them here
        warnings.simplefilter("always")
        reports.confusion_figure(confusion, names).savefig(tmp_path / "plain.png")
    assert [w for w in unquiet if "Glyph" in str(w.message)]


def test_figures_check_their_input_and_scale_to_many_classes():
    with pytest.raises(ValueError, match="does not fit 3 class names"):
        reports.confusion_figure(np.eye(4, dtype=int), ["a", "b", "c"])
    many = np.random.default_rng(0).integers(0, 5, (100, 100))
    pixels = reports.figure_pixels(reports.confusion_figure(many, [str(i) for i in range(100)]))
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    per_class = {str(i): i / 100 for i in range(100)} | {"absent": float("nan")}
    assert reports.figure_pixels(reports.per_class_figure(per_class, top1=0.5)).std() > 0


def test_eval_images_are_the_confusion_matrix_and_the_attention_example():
    config = tiny_config(DATA_DIR, eval_split="test[:16]", eval_images=3)
    model = vit.model_from_config(config.model.to_dict(), num_classes=10,
                                  image_size=config.image_size)
    params = jax.device_get(vit.init_params(model, jax.random.PRNGKey(0)))
    confusion = np.eye(10, dtype=int)
    images = reports.eval_images(model, params, config, _result(confusion))
    assert sorted(images) == ["eval/attention", "eval/confusion_matrix"]
    for pixels in images.values():
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and pixels.std() > 10
    height, width, _ = images["eval/attention"].shape
    assert width > height  # three images side by side, their rollout below
    inputs, pictures, labels = reports.eval_examples(config, 3)
    assert inputs.shape[0] == pictures.shape[0] == labels.shape[0] == 3
    assert pictures.dtype == np.uint8 and pictures.max() > 100  # real pictures, back in [0, 255]
