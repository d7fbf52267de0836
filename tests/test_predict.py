"""Tests for vit.predict: PNG/JPEG of any size, preprocessing identical to eval, bad inputs."""

import importlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_evaluate import save_tiny_checkpoint, tiny_config

from vit import preprocess
from vit.checkpoint import CheckpointError, load_checkpoint
from vit.predict import expand_paths, predict

predict_module = importlib.import_module("vit.predict")  # vit.predict is also the function

SIZES = [(32, 32), (17, 45), (120, 80)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint and a folder of PNG and JPEG images of several sizes."""
    root = tmp_path_factory.mktemp("predict")
    config = tiny_config(str(root / "tfds"))
    with tfds.testing.mock_data(num_examples=20):
        model, params = save_tiny_checkpoint(str(root / "run"), config)
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(SIZES):
        for ext in ("png", "jpg"):
            path = images / f"img{i}.{ext}"
            colour = rng.integers(0, 256, 3)  # a distinct colour per image, plus noise
            pixels = np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            files.append(str(path))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "nested" / "deep.png")
    _write_hidden_files(images)
    return dict(root=root, workdir=str(root / "run"), config=config, model=model,
                params=params, images=str(images), files=sorted(files))


def _write_hidden_files(directory):
    """What Jupyter and macOS leave beside images: a hidden image and AppleDouble ._ files."""
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(directory / ".hidden.png")
    (directory / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (directory / "._img0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (directory / ".ipynb_checkpoints").mkdir()


def _reference_probs(run, path):
    x = preprocess.eval_image(preprocess.decode_image_file(path), run["config"])
    logits = run["model"].apply({"params": run["params"]}, np.asarray(x)[None])
    return np.asarray(jax.nn.softmax(logits))[0]


def test_directory_expands_one_level_sorted(run):
    """Only the visible image files: not nested/, .hidden.png nor macOS's ._ files."""
    files, errors = expand_paths([run["images"]])
    assert files == run["files"] and errors == []


def test_a_directory_of_hidden_files_only_holds_no_images(tmp_path):
    _write_hidden_files(tmp_path)
    files, errors = expand_paths([str(tmp_path)])
    assert files == [] and errors == [(str(tmp_path), f"directory {str(tmp_path)!r} holds no "
                                       ".jpg/.jpeg/.png files; pass image files or a directory "
                                       "that has some")]


def test_predicts_png_and_jpeg_of_any_size_as_eval_preprocesses(run):
    result = predict(run["workdir"], [run["images"]], top_k=3)
    assert result.errors == []
    assert [p["file"] for p in result.predictions] == run["files"]
    names = [str(i) for i in range(10)]
    tops = set()
    for p in result.predictions:
        probs = _reference_probs(run, p["file"])
        best = np.argsort(-probs)[:3]
        assert [name for name, _ in p["top_k"]] == [names[i] for i in best]
        np.testing.assert_allclose([prob for _, prob in p["top_k"]], probs[best], rtol=1e-5)
        tops.add(p["top_k"][0][0])
    assert len(tops) > 1  # the random head tells different images apart


def test_accepts_loaded_contents_and_caps_top_k(run):
    contents = load_checkpoint(run["workdir"])
    result = predict(contents, run["files"][:1], top_k=50)
    assert len(result.predictions[0]["top_k"]) == 10
    assert sum(prob for _, prob in result.predictions[0]["top_k"]) == pytest.approx(1.0, 1e-5)


def test_one_path_and_path_objects_are_taken_as_paths(run):
    """A string is one path, not a list of one-letter paths (".", "/", ... would be found)."""
    import pathlib

    one = predict(run["workdir"], run["files"][0])
    objects = predict(pathlib.Path(run["workdir"]), [pathlib.Path(run["files"][0])])
    assert one.errors == objects.errors == []
    assert [p["file"] for p in one.predictions] == [p["file"] for p in objects.predictions] \
        == run["files"][:1]
    assert one.predictions[0]["top_k"] == objects.predictions[0]["top_k"]


def test_bad_inputs_are_named_and_the_rest_still_predicted(run, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    folders_only = tmp_path / "folders_only"
    (folders_only / "sub.png").mkdir(parents=True)  # named like an image, but a folder
    missing = str(tmp_path / "missing.png")
    inputs = [str(corrupt), run["files"][0], str(text), str(empty), str(folders_only), missing]
    result = predict(run["workdir"], inputs)
    assert [p["file"] for p in result.predictions] == [run["files"][0]]
    bad = dict(result.errors)
    assert set(bad) == {str(corrupt), str(text), str(empty), str(folders_only), missing}
    assert all("\n" not in m for m in bad.values())
    assert "corrupt" in bad[str(corrupt)] and "holds no" in bad[str(empty)]
    assert "holds no" in bad[str(folders_only)]
    assert "does not exist" in bad[missing]


def test_files_are_read_and_predicted_a_batch_at_a_time_alike(run, tmp_path, monkeypatch):
    """A large folder is decoded BATCH images at a time; batches of one give the same answers."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    inputs = [run["files"][0], str(corrupt), *run["files"][1:]]
    whole = predict(run["workdir"], inputs)
    monkeypatch.setattr(predict_module, "BATCH", 1)
    one_by_one = predict(run["workdir"], inputs)
    assert [p["file"] for p in one_by_one.predictions] == run["files"]
    assert one_by_one.errors == whole.errors and len(whole.errors) == 1
    for a, b in zip(one_by_one.predictions, whole.predictions, strict=True):
        assert [name for name, _ in a["top_k"]] == [name for name, _ in b["top_k"]]
        np.testing.assert_allclose([p for _, p in a["top_k"]], [p for _, p in b["top_k"]],
                                   rtol=1e-5)


def test_top_k_must_be_positive(run):
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        predict(run["workdir"], run["files"], top_k=0)


def test_a_model_with_non_finite_parameters_is_one_line(run, tmp_path):
    contents = load_checkpoint(run["workdir"])
    contents.params["head"]["bias"] = np.full_like(contents.params["head"]["bias"], np.nan)
    with pytest.raises(CheckpointError, match=r"checkpoint of step \d+ holds NaN or inf in "
                                              "head/bias: its weights diverged"):
        predict(contents, run["files"])


def test_logits_that_overflow_are_one_line(run, tmp_path):
    contents = load_checkpoint(run["workdir"])
    contents.params["head"]["kernel"] = np.full_like(contents.params["head"]["kernel"], 3e38)
    with pytest.raises(ValueError, match=r"the model gives non-finite probabilities for .* "
                                         "although its parameters are finite"):
        predict(contents, run["files"])
