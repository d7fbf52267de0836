"""Few-shot linear evaluation (vit/fewshot.py): features, shot sampling, the ridge solve, the
whole evaluation through the API and `vit fewshot`."""

import contextlib
import json

import in_process
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_evaluate import (
    CIFAR_DIR,
    MOCK_EXAMPLES,
    cli_on_cpu_devices,
    save_tiny_checkpoint,
    tiny_config,
)

import vit
from vit import cli, fewshot
from vit.fewshot import FewshotError, ridge_accuracy, ridge_weights, sample_shots


@pytest.mark.parametrize("options", [
    dict(classifier="token"), dict(classifier="gap"), dict(classifier="map"),
    dict(classifier="token", representation_size=24),
])
def test_the_features_are_what_the_head_reads(options):
    model = vit.create_model("Ti/4", num_classes=7, image_size=16, width=32, depth=1,
                             num_heads=2, mlp_dim=64, **options)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    head = {"kernel": jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape),
            "bias": jax.random.normal(jax.random.PRNGKey(2), (7,))}
    params = dict(params, head=head)
    images = jax.random.normal(jax.random.PRNGKey(3), (5, 16, 16, 3))
    feats = fewshot.head_input(model, params, images)
    assert feats.shape == (5, options.get("representation_size", 32))
    np.testing.assert_allclose(feats @ head["kernel"] + head["bias"],
                               model.apply({"params": params}, images), rtol=1e-5, atol=1e-5)


def test_shots_are_k_distinct_examples_of_each_class_and_the_seed_decides_them():
    labels = np.repeat(np.arange(4), [3, 7, 5, 9])
    first = sample_shots(labels, 4, 3, seed=0)
    assert len(first) == len(set(first)) == 12
    assert np.array_equal(np.bincount(labels[first]), [3, 3, 3, 3])
    np.testing.assert_array_equal(first, sample_shots(labels, 4, 3, seed=0))
    assert not np.array_equal(first, sample_shots(labels, 4, 3, seed=1))
    with pytest.raises(FewshotError, match=r"^class 0 has 3 example\(s\) in the train split, "
                                           r"fewer than 4 shots: use a larger train split"):
        sample_shots(labels, 4, 4, seed=0)


@pytest.mark.parametrize("n", [5, 40])  # fewer and more examples than feature dimensions
def test_the_ridge_solve_is_the_regularised_least_squares_minimum(n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 12)), rng.integers(0, 3, n)
    w, mean, std = ridge_weights(x, y, 3, l2_reg=0.7)
    z = np.concatenate([(x - mean) / std, np.full((n, 1), 100.0)], axis=1)
    targets = 2.0 * np.eye(3)[y] - 1.0
    # The gradient of |zw - t|^2 + l2 |w|^2 vanishes at the minimum.
    np.testing.assert_allclose(z.T @ (z @ w - targets) + 0.7 * w, 0.0, atol=1e-8)
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(std, x.std(0) + 1e-5)


def test_separable_classes_are_found_from_one_shot_and_noise_is_at_chance():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 64)) * 4.0
    labels = np.tile(np.arange(5), 200)
    feats = centres[labels] + rng.normal(size=(1000, 64))
    one_shot = sample_shots(labels[:500], 5, 1, seed=0)
    test = (feats[500:], labels[500:])
    assert ridge_accuracy((feats[one_shot], labels[one_shot]), test, 5) == 1.0
    noise = rng.normal(size=(1000, 64))
    shots = sample_shots(labels[:500], 5, 25, seed=0)
    chance = ridge_accuracy((noise[shots], labels[shots]), (noise[500:], labels[500:]), 5)
    assert 0.1 < chance < 0.3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        model, params = save_tiny_checkpoint(str(root / "run"), tiny_config(str(root / "tfds")))
    return root, model, params


def test_split_features_cover_the_split_once_in_order(run):
    root, model, params = run
    config = tiny_config(str(root / "tfds"))
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        feats, labels = fewshot.split_features(model, params, config, "test")
        from vit import data

        images = np.concatenate([b["image"][0][b["mask"][0]] for b in
                                 data.eval_iterator(config, "test", num_devices=1)])
    assert feats.shape == (MOCK_EXAMPLES, 32) and labels.shape == (MOCK_EXAMPLES,)
    expected = fewshot.head_input(model, params, vit.preprocess.normalize_on_device(
        images[:64], config.pp.normalize))
    np.testing.assert_allclose(feats[:64], expected, rtol=1e-5, atol=1e-5)


def test_vit_fewshot_prints_and_writes_what_the_api_returns(run, capsys, tmp_path):
    root, _, _ = run
    out = tmp_path / "fewshot.json"
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        code = cli.main(["fewshot", "--checkpoint", str(root / "run"), "--shots", "2,1",
                         "--seeds", "2", "--train-split", "train[:200]", "--json", str(out)])
        api = fewshot.fewshot_checkpoint(str(root / "run"), shots=(1, 2), seeds=2,
                                         train_split="train[:200]")
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("few-shot linear probe on cifar10 (10 classes, 32-d features")
    assert [line.split()[0] for line in printed[1:]] == ["1-shot", "2-shot"]
    written = json.loads(out.read_text())
    assert written["accuracy"] == {"1": api.accuracy[1], "2": api.accuracy[2]}
    assert len(api.accuracy[1]) == 2 and all(0.0 <= a <= 1.0 for a in api.accuracy[1])
    assert written["mean_accuracy"]["2"] == pytest.approx(np.mean(api.accuracy[2]))


@pytest.mark.parametrize("argv, message", [
    (["--shots", "0,5"], "shots must be counts >= 1, got [0, 5]"),
    (["--shots", "one"], "--shots 'one' must be comma-separated integers"),
    (["--l2-reg", "-1"], "l2_reg must be a positive number, got -1.0"),
    (["--shots", "500"], "in the train split, fewer than 500 shots: use a larger train split"),
    (["--test-split", "test[:0]", "--data-dir", CIFAR_DIR],
     "split 'test[:0]' of 'cifar10' holds no examples"),
])
def test_bad_requests_are_one_line(run, capsys, argv, message):
    root, _, _ = run
    mock = tfds.testing.mock_data(num_examples=MOCK_EXAMPLES)
    with contextlib.nullcontext() if CIFAR_DIR in argv else mock:  # mock data ignores slices
        code = cli.main(["fewshot", "--checkpoint", str(root / "run"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err




def test_training_logs_the_probe_at_each_evaluation(tmp_path):
    from test_faults import DATA_DIR, _train

    probe = ["--config.fewshot.shots=1,2", "--config.fewshot.train_split=train[:512]",
             "--config.fewshot.test_split=test[:256]"]
    run = _train(tmp_path / "run", *probe, "--config.eval_every=4", "--config.ema_decay=0.9")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "fewshot/1shot" in line]
    assert [line["step"] for line in logged] == [4, 8]
    # What training logged is the API's figure on the checkpoint of that step (and its EMA).
    for prefix, ema in (("fewshot", False), ("fewshot_ema", True)):
        api = fewshot.fewshot_checkpoint(
            str(tmp_path / "run"), step=8, data_dir=DATA_DIR, shots=(1, 2), seeds=1,
            train_split="train[:512]", test_split="test[:256]", use_ema=ema)
        assert (logged[-1][f"{prefix}/1shot"], logged[-1][f"{prefix}/2shot"]) == (api.mean(1),
                                                                                  api.mean(2))
    # The refusals, in this process (train.py prints each as its one `error:` line)
    assert in_process.refusal_line(tmp_path / "bad", "--config.fewshot.shots=0,5") == (
        "error: config.fewshot: shots must be counts >= 1, got [0, 5]: e.g. 1,5,10,25")
    # The probe's dataset and splits are checked at start-up, not at the first evaluation;
    # another dataset is read from the run's data_dir unless fewshot.data_dir says otherwise.
    empty = in_process.refusal_line(tmp_path / "empty", "--config.fewshot.shots=1",
                     "--config.fewshot.dataset=cifar10", "--config.fewshot.test_split=test[:0]")
    assert empty == ("error: config.fewshot.test_split 'test[:0]' of 'cifar10' holds no "
                     "examples: use a split or slice with some, e.g. 'train[:10000]'")
    unknown = in_process.refusal_line(tmp_path / "unknown", "--config.fewshot.shots=1",
                       "--config.fewshot.dataset=no_such_dataset")
    assert unknown.startswith("error: config.fewshot: ")
    from test_faults import _smoke_config

    few = _smoke_config(4)  # what the trainer checks at start-up, in this process
    few.fewshot.shots, few.fewshot.train_split = (10, 25), "train[:200]"
    with pytest.raises(FewshotError, match=r"^config.fewshot.train_split 'train\[:200\]' holds "
                                           r"200 examples, fewer than 10 classes x 25 shots: use "
                                           r"a larger split or fewer shots$"):
        fewshot.check_run_probe(few)
    few.eval_split = "validation"  # the run's own splits are not looked for in the probe's data
    few.fewshot.shots, few.fewshot.dataset = (2,), "cifar10"
    fewshot.check_run_probe(few)


def test_three_devices_give_the_same_probe_as_one(run, tmp_path):
    """Features are gathered from every device in the split's order: the shots drawn and the
    accuracies are those of one device (1001 examples: the last batch is padded)."""
    root, _, _ = run
    out = tmp_path / "three.json"
    cli_on_cpu_devices(3, ["fewshot", "--checkpoint", str(root / "run"), "--shots", "1,5",
                           "--batch-size", "96", "--json", str(out)])
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        one = fewshot.fewshot_checkpoint(str(root / "run"), shots=(1, 5))
    assert json.loads(out.read_text())["accuracy"] == {"1": one.accuracy[1], "5": one.accuracy[5]}
