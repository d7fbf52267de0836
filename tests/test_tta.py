"""Test-time augmentation (tta="flip"): exact counts with padding, the averaged-probability
reference, flip-invariant inputs, the trainer's eval_tta key and `vit eval --tta`."""

import json
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_evaluate import MODEL, save_tiny_checkpoint, tiny_config

import vit
from vit import cli, config_schema, data, parallel, preprocess, trainer
from vit.evaluate import EvalError, evaluate, evaluate_checkpoint
from vit.metrics import MetricWriter

EXAMPLES, EVAL_BATCH = 37, 16  # 37 = 2 x 16 + 5: the last batch is mostly padding


def _masked_images(config) -> tuple[np.ndarray, np.ndarray]:
    """The split's preprocessed images (normalised on the host) and labels, padding dropped."""
    images, labels = [], []
    for batch in data.eval_iterator(config, num_devices=1):
        mask = batch["mask"][0]
        images.append(batch["image"][0][mask])
        labels.append(batch["label"][0][mask])
    images = preprocess.normalize(np.concatenate(images), config.pp.normalize).numpy()
    return images, np.concatenate(labels)


def _flip_reference(model, params, config) -> dict:
    """Top-1, loss and confusion from the mean softmax of each image and its mirror image."""
    images, labels = _masked_images(config)
    probs = [np.asarray(jax.nn.softmax(model.apply({"params": params}, x)), np.float64)
             for x in (images, images[:, :, ::-1])]  # [N, H, W, C]: reverse the width
    mean = (probs[0] + probs[1]) / 2
    pred = mean.argmax(-1)
    confusion = np.zeros((model.num_classes,) * 2, np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return dict(top1=float(np.mean(pred == labels)), confusion=confusion,
                loss=float(-np.mean(np.log(mean[np.arange(len(labels)), labels]))))


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory):
    """A tiny random checkpoint on mocked CIFAR-10 (37 test examples, eval batch 16)."""
    root = tmp_path_factory.mktemp("tta")
    config = tiny_config(str(root / "tfds"), eval_batch_size=EVAL_BATCH)
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        model, params = save_tiny_checkpoint(str(root / "run"), config)
        return dict(workdir=str(root / "run"), config=config, model=model, params=params,
                    reference=_flip_reference(model, params, config),
                    flip=evaluate(model, params, config, tta="flip"),
                    plain=evaluate(model, params, config))


def test_flip_counts_each_example_once_and_matches_the_mean_of_probabilities(mock_run):
    r, ref = mock_run["flip"], mock_run["reference"]
    assert r.tta == "flip" and r.num_examples == EXAMPLES
    assert np.array(r.confusion_matrix).sum() == EXAMPLES
    np.testing.assert_array_equal(np.array(r.confusion_matrix), ref["confusion"])
    assert r.top1 == pytest.approx(ref["top1"], abs=0)
    assert r.loss == pytest.approx(ref["loss"], rel=1e-5)
    assert r.top1 <= r.top5 <= 1.0
    assert r.loss != pytest.approx(mock_run["plain"].loss, rel=1e-4)  # the flip mattered


def test_trainer_evaluation_uses_eval_tta(mock_run, tmp_path):
    config = config_schema.default_config()
    config.update(mock_run["config"].to_dict())
    config.eval_tta = "flip"
    state = types.SimpleNamespace(params=parallel.replicate(mock_run["params"]), ema_params=None)
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        scalars = trainer._evaluate(mock_run["model"], state, config, 5,
                                    MetricWriter(str(tmp_path), enabled=False))
    assert scalars["eval/top1"] == mock_run["flip"].top1
    assert scalars["eval/loss"] == pytest.approx(mock_run["flip"].loss, rel=1e-6)
    assert config_schema.default_config().eval_tta == "none"


def _symmetric_folder(root, classes: int = 3, per_class: int = 3) -> str:
    """root/test/<class>/*.png of 32x32 images equal to their own mirror image."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / "test" / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            half = rng.integers(0, 256, (32, 16, 3), np.uint8)
            Image.fromarray(np.concatenate([half, half[:, ::-1]], 1)).save(
                root / "test" / f"c{c}" / f"{i}.png")
    return f"{data.FOLDER_PREFIX}{root}"


def test_flip_invariant_inputs_give_the_same_result(tmp_path):
    config = tiny_config("", dataset=_symmetric_folder(tmp_path), train_split="test",
                         eval_split="test", eval_batch_size=4)  # 9 images: one padded batch
    images, _ = _masked_images(config)
    np.testing.assert_array_equal(images, images[:, :, ::-1])  # the pipeline kept the symmetry
    model = vit.model_from_config(MODEL, num_classes=3, image_size=32)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    head = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
    params = dict(params, head=dict(params["head"], kernel=head))
    plain, flip = evaluate(model, params, config), evaluate(model, params, config, tta="flip")
    assert flip.num_examples == plain.num_examples == 9
    assert flip.confusion_matrix == plain.confusion_matrix
    assert flip.top1 == plain.top1 and flip.top5 == plain.top5
    assert flip.loss == pytest.approx(plain.loss, rel=1e-6)


def test_unknown_tta_is_one_line_naming_the_valid_values(mock_run, capsys):
    with pytest.raises(EvalError) as err:
        evaluate_checkpoint(mock_run["workdir"], tta="mirror")
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert "'mirror'" in str(err.value) and "none, flip" in str(err.value)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--workdir", mock_run["workdir"], "--tta", "mirror"])
    assert exit_info.value.code == 2
    assert "--tta" in capsys.readouterr().err


def test_cli_tta_flag_end_to_end(mock_run, capsys, tmp_path):
    out = tmp_path / "m.json"
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        code = cli.main(["eval", "--workdir", mock_run["workdir"], "--tta", "flip",
                         "--json", str(out)])
    assert code == 0
    assert "tta flip" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["tta"] == "flip" and d["num_examples"] == EXAMPLES
    assert d["top1"] == mock_run["reference"]["top1"]
    assert d["loss"] == pytest.approx(mock_run["reference"]["loss"], rel=1e-5)
    assert d["confusion_matrix"] == mock_run["reference"]["confusion"].tolist()
