"""Tests for vit.evaluate: exact counts with padding, agreement with a plain forward pass, errors.

`save_tiny_checkpoint` is shared with test_predict.py and test_cli.py.
"""

import json
import os
import subprocess
import sys
import types

import jax
import jax_env
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import vit
from vit import config_schema, data, parallel, preprocess, trainer
from vit.checkpoint import Checkpointer, CheckpointError

# Not `from vit import evaluate`: vit exports the function `evaluate` under that name.
from vit.evaluate import EvalError, _eval_step, evaluate, evaluate_checkpoint, evaluate_variants

MODEL = dict(variant="Ti/4", width=32, depth=1, num_heads=2, mlp_dim=64)
MOCK_EXAMPLES = 1001  # odd: the last batch is padded on any device count
CIFAR_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../shared/data/tfds"))


def tiny_config(data_dir: str, **overrides):
    """A run config for the tiny model on CIFAR-10 (mocked when data_dir is empty)."""
    config = data.default_config()
    config.data_dir = data_dir
    config.eval_batch_size = 64
    config.model = dict(MODEL)
    config.update(overrides)
    return config


def save_tiny_checkpoint(workdir: str, config, *, ema: bool = False, step: int = 5) -> tuple:
    """Save a random tiny ViT with a random head (so predictions vary); returns (model, params)."""
    info = data.dataset_info(config)
    model = vit.model_from_config(config.model.to_dict(), num_classes=info.num_classes,
                                  image_size=config.image_size)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    head = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
    params = dict(params, head=dict(params["head"], kernel=head))
    state = {"step": step, "params": params}
    if ema:
        state["ema_params"] = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
    ckpt = Checkpointer(workdir)
    ckpt.save(step, state, config=config.to_dict(), dataset_info=info.to_dict(), force=True)
    ckpt.close()
    return model, params


def reference_logits(model, params, config, split=None):
    """Logits and labels from a plain model.apply over the same preprocessed images, normalised
    on the host (`preprocess.normalize`, as the pipeline did before it yielded uint8)."""
    images, labels = [], []
    for batch in data.eval_iterator(config, split, num_devices=1):
        mask = batch["mask"][0]
        images.append(batch["image"][0][mask])
        labels.append(batch["label"][0][mask])
    images, labels = np.concatenate(images), np.concatenate(labels)
    images = preprocess.normalize(images, config.pp.normalize).numpy()
    logits = np.concatenate([np.asarray(model.apply({"params": params}, images[i:i + 256]))
                             for i in range(0, len(images), 256)])
    return logits, labels


def reference_metrics(model, params, config, split=None):
    """Top-1 and per-example labels from a plain model.apply over the same preprocessed images."""
    logits, labels = reference_logits(model, params, config, split)
    log_probs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                       keepdims=True)) - logits.max(-1, keepdims=True)
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])
    pred = logits.argmax(-1)
    return float(np.mean(pred == labels)), float(loss), labels, pred


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory):
    """A tiny checkpoint on mocked CIFAR-10 (1001 test examples) and the reference metrics."""
    root = tmp_path_factory.mktemp("mock")
    config = tiny_config(str(root / "tfds"))
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        model, params = save_tiny_checkpoint(str(root / "run"), config, ema=True)
        top1, loss, labels, pred = reference_metrics(model, params, config)
        logits, _ = reference_logits(model, params, config)
        result = evaluate_checkpoint(str(root / "run"))
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]  # numpy's, not lax.top_k
    top5 = float(np.mean(np.any(top5 == labels[:, None], axis=-1)))
    return dict(workdir=str(root / "run"), config=config, model=model, params=params,
                top1=top1, top5=top5, loss=loss, labels=labels, pred=pred, result=result)


def test_counts_every_example_once_and_matches_plain_apply(mock_run):
    r = mock_run["result"]
    assert r.num_examples == MOCK_EXAMPLES
    assert r.top1 == pytest.approx(mock_run["top1"], abs=0)
    assert 0.0 < r.top1 < 1.0  # the random head makes predictions vary
    assert r.loss == pytest.approx(mock_run["loss"], rel=1e-5)
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (mock_run["labels"], mock_run["pred"]), 1)
    np.testing.assert_array_equal(np.array(r.confusion_matrix), expected)
    assert r.top5 == pytest.approx(mock_run["top5"], abs=0)
    assert r.top1 < r.top5 < 1.0  # top-5 counts more than top-1, yet not everything
    counts = expected.sum(1)
    for i, name in enumerate(sorted(r.per_class, key=int)):
        assert r.per_class[name] == pytest.approx(expected[i, i] / counts[i])


def test_to_dict_is_json_with_the_issue_keys(mock_run):
    d = json.loads(json.dumps(mock_run["result"].to_dict()))
    assert {"top1", "top5", "loss", "num_examples", "per_class", "confusion_matrix"} <= set(d)
    assert sum(map(sum, d["confusion_matrix"])) == MOCK_EXAMPLES


def cli_on_cpu_devices(devices: int, argv: list[str]) -> None:
    """`vit ARGV` on mock CIFAR-10 in a subprocess with `devices` CPU devices; asserts it
    succeeds."""
    script = (
        "import sys, tensorflow_datasets as tfds\n"
        "from vit import cli\n"
        f"with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}):\n"
        f"    sys.exit(cli.main({argv!r}))\n")
    env = jax_env.subprocess_env(devices)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_four_devices_in_subprocess_give_the_same_counts(mock_run, tmp_path):
    out = tmp_path / "eval.json"
    cli_on_cpu_devices(4, ["eval", "--workdir", mock_run["workdir"], "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["num_examples"] == MOCK_EXAMPLES
    assert d["top1"] == pytest.approx(mock_run["top1"], abs=0)
    assert d["confusion_matrix"] == mock_run["result"].confusion_matrix


def test_ema_params_are_used_when_asked(mock_run):
    params = jax.tree_util.tree_map(lambda x: 0.5 * x, mock_run["params"])
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        ema = evaluate_checkpoint(mock_run["workdir"], use_ema=True, batch_size=128)
        top1, loss, _, _ = reference_metrics(mock_run["model"], params, mock_run["config"])
    assert ema.num_examples == MOCK_EXAMPLES
    assert ema.top1 == pytest.approx(top1, abs=0)
    assert ema.loss == pytest.approx(loss, rel=1e-5)


def test_eval_step_is_cached_per_model(mock_run):
    model = mock_run["model"]
    same = vit.model_from_config(MODEL, num_classes=10, image_size=32)
    assert _eval_step(model, "minus_one_to_one") is _eval_step(same, "minus_one_to_one")


def _counting_eval_iterator(monkeypatch) -> list:
    """Counts the calls of data.eval_iterator (each one is a pass over the split)."""
    calls, original = [], data.eval_iterator

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "eval_iterator", counting)
    return calls


def _assert_same_result(a, b) -> None:
    """Every metric equal, bit for bit (images_per_s aside: a timing)."""
    assert (a.top1, a.top5, a.loss, a.num_examples) == (b.top1, b.top5, b.loss, b.num_examples)
    assert a.confusion_matrix == b.confusion_matrix and a.per_class.keys() == b.per_class.keys()
    np.testing.assert_array_equal(list(a.per_class.values()), list(b.per_class.values()))
    assert a.ece == b.ece and a.calibration == b.calibration and a.tta == b.tta


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_variants_in_one_pass_equal_separate_evaluations(mock_run, monkeypatch, tta):
    model, config, params = mock_run["model"], mock_run["config"], mock_run["params"]
    variants = {"eval": params, "eval_ema": jax.tree_util.tree_map(lambda x: 0.5 * x, params)}
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        separate = {name: evaluate(model, p, config, tta=tta) for name, p in variants.items()}
        calls = _counting_eval_iterator(monkeypatch)
        together = evaluate_variants(model, variants, config, tta=tta)
    assert len(calls) == 1 and list(together) == ["eval", "eval_ema"]
    for name in variants:
        _assert_same_result(together[name], separate[name])
    assert together["eval"].top1 != together["eval_ema"].top1  # two different models
    if tta == "none":  # evaluate is the one-variant case (mock_run's result: evaluate_checkpoint)
        _assert_same_result(separate["eval"], mock_run["result"])
    with pytest.raises(EvalError, match="no parameter sets"):
        evaluate_variants(model, {}, config)


def test_trainer_evaluates_params_and_ema_in_one_pass(mock_run, monkeypatch):
    model, params = mock_run["model"], mock_run["params"]
    config = config_schema.default_config()
    config.update(mock_run["config"].to_dict())
    ema = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
    state = types.SimpleNamespace(params=parallel.replicate(params),
                                  ema_params=parallel.replicate(ema))
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        expected = {name: evaluate(model, p, config)
                    for name, p in (("eval", params), ("eval_ema", ema))}
        calls = _counting_eval_iterator(monkeypatch)
        scalars = trainer._evaluate(model, state, config, 5)
    assert len(calls) == 1
    assert scalars == {f"{name}/{key}": getattr(result, key) for name, result in expected.items()
                       for key in ("top1", "top5", "loss")}


def test_class_count_mismatch_is_one_clear_line(mock_run):
    with tfds.testing.mock_data(num_examples=20), pytest.raises(EvalError) as err:
        evaluate_checkpoint(mock_run["workdir"], dataset="cifar100")
    message = str(err.value)
    assert "100 classes" in message and "head has 10" in message and "\n" not in message


def _always_first_class_checkpoint(workdir: str, class_names: tuple[str, ...],
                                   classes: tuple[int, ...] | None = None) -> None:
    """A tiny checkpoint whose head always predicts its first class, named as given (trained,
    it says, on cifar10's label ids `classes`)."""
    config = tiny_config("", dataset="cifar10")
    config.classes = classes
    model = vit.model_from_config(config.model.to_dict(), num_classes=len(class_names),
                                  image_size=config.image_size)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    bias = np.zeros(len(class_names), np.float32)
    bias[0] = 10.0
    params = dict(params, head={"kernel": np.zeros_like(params["head"]["kernel"]), "bias": bias})
    info = data.DatasetInfo("cifar10", len(class_names), class_names, (32, 32, 3), {"test": 1})
    ckpt = Checkpointer(workdir)
    ckpt.save(1, {"step": 1, "params": params}, config=config.to_dict(),
              dataset_info=info.to_dict(), force=True)
    ckpt.close()


def _folder(root, counts: dict[str, int]) -> str:
    for name, n in counts.items():
        (root / "test" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                root / "test" / name / f"{i}.png")
    return f"folder:{root}"


def test_another_dataset_is_matched_to_the_head_by_class_name(tmp_path):
    """The head's classes are (dog, cat); a folder lists them sorted (cat = 0, dog = 1)."""
    _always_first_class_checkpoint(str(tmp_path / "run"), ("dog", "cat"))
    folder = _folder(tmp_path / "pets", {"cat": 2, "dog": 3})
    by_name = evaluate_checkpoint(str(tmp_path / "run"), dataset=folder, split="test")
    assert by_name.per_class == {"dog": 1.0, "cat": 0.0} and by_name.top1 == 3 / 5
    assert by_name.confusion_matrix == [[3, 0], [2, 0]]
    by_id = evaluate_checkpoint(str(tmp_path / "run"), dataset=folder, split="test",
                                match_classes="order")
    assert by_id.top1 == 2 / 5  # label 0 is "cat" in the folder: the head's "dog" predicted
    # A folder of some of the head's classes (cat) and others (fox, left out): the head's
    # "dog" is predicted for the cat, and the dog row stays empty.
    some = _folder(tmp_path / "wild", {"cat": 2, "fox": 1})
    partial = evaluate_checkpoint(str(tmp_path / "run"), dataset=some, split="test")
    assert partial.num_examples == 2 and partial.top1 == 0.0
    assert partial.confusion_matrix == [[0, 0], [2, 0]]
    assert np.isnan(partial.per_class["dog"]) and partial.per_class["cat"] == 0.0
    none = _folder(tmp_path / "farm", {"cow": 1, "fox": 1})
    with pytest.raises(EvalError, match=r"dataset 'folder:.*farm' has none of the checkpoint's "
                                        r"classes \(dog, cat\); evaluate on a dataset with some"):
        evaluate_checkpoint(str(tmp_path / "run"), dataset=none, split="test")
    with pytest.raises(EvalError, match="unknown match_classes='id'; use one of names, order"):
        evaluate_checkpoint(str(tmp_path / "run"), match_classes="id")


def test_a_class_subset_run_is_matched_by_name_on_a_dataset_with_more_classes(tmp_path):
    """Trained on cifar10's dog (5) and cat (3): the run's label ids mean nothing in a folder,
    whose extra class is left out."""
    _always_first_class_checkpoint(str(tmp_path / "run"), ("dog", "cat"), classes=(5, 3))
    folder = _folder(tmp_path / "zoo", {"cat": 2, "dog": 3, "emu": 4})
    result = evaluate_checkpoint(str(tmp_path / "run"), dataset=folder, split="test")
    assert result.num_examples == 5 and result.top1 == 3 / 5
    assert result.per_class == {"dog": 1.0, "cat": 0.0}
    two = _folder(tmp_path / "pets", {"cat": 2, "dog": 3})
    by_id = evaluate_checkpoint(str(tmp_path / "run"), dataset=two, split="test",
                                match_classes="order")
    assert by_id.num_examples == 5 and by_id.top1 == 2 / 5


@pytest.mark.parametrize("split,expected", [
    ("test[:0]", "split 'test[:0]' of 'cifar10' holds no examples; evaluate a split or slice "
     "with some (--split)"),
    ("test[5:2]", "bad split 'test[5:2]' for 'cifar10': the slice ends before it starts"),
])
def test_an_empty_or_reversed_split_names_the_split(tmp_path, split, expected):
    if not os.path.isdir(os.path.join(CIFAR_DIR, "cifar10")):
        pytest.skip(f"shipped CIFAR-10 not found at {CIFAR_DIR}")
    config = tiny_config(CIFAR_DIR, eval_split="test[:20]")
    save_tiny_checkpoint(str(tmp_path / "run"), config)
    with pytest.raises(ValueError) as err:
        evaluate_checkpoint(str(tmp_path / "run"), split=split)
    assert str(err.value).startswith(expected)


def test_missing_checkpoint_and_missing_ema(tmp_path, mock_run):
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_checkpoint(str(tmp_path / "nowhere"))
    plain = tmp_path / "plain"
    with tfds.testing.mock_data(num_examples=20):
        save_tiny_checkpoint(str(plain), mock_run["config"])
    with pytest.raises(CheckpointError, match="no EMA params"):
        evaluate_checkpoint(str(plain), use_ema=True)


def test_real_cifar10_slice(tmp_path):
    if not os.path.isdir(os.path.join(CIFAR_DIR, "cifar10")):
        pytest.skip(f"shipped CIFAR-10 not found at {CIFAR_DIR}")
    config = tiny_config(CIFAR_DIR, eval_split="test[:200]")
    model, params = save_tiny_checkpoint(str(tmp_path / "run"), config)
    result = evaluate_checkpoint(str(tmp_path / "run"))
    top1, loss, labels, _ = reference_metrics(model, params, config)
    assert result.num_examples == 200
    assert result.top1 == pytest.approx(top1, abs=0)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert list(result.per_class)[:2] == ["airplane", "automobile"]
    assert np.array(result.confusion_matrix).sum(1).tolist() == np.bincount(labels, minlength=10
                                                                            ).tolist()
