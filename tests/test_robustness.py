"""vit.robustness: the report's invariants (eps 0 = clean, monotone in eps, PGD <= FGSM, mCE of a
model against itself = 1), exact counts on 1 and 2 devices, a prepared cifar10_corrupted
directory read and counted, the CLI and its option errors."""

import json
import os
import subprocess
import sys

import jax_env
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from test_evaluate import CIFAR_DIR, save_tiny_checkpoint, tiny_config
from tiny_checkpoints import SMALL as SMALL_MODEL
from tiny_checkpoints import write

from vit import adversarial, cli, data, parallel, preprocess, robustness
from vit.checkpoint import load_checkpoint
from vit.corruptions import TFDS_NAMES, corrupt, corrupt_batch, psnr
from vit.evaluate import evaluate_checkpoint, load_inference_model
from vit.robustness import RobustnessError, parse_corruptions, parse_eps, parse_severities

EXAMPLES = 37  # odd: the last batch of 16 is padded
EPS = parse_eps("0,2/255,16/255")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random checkpoint on the first 37 real CIFAR-10 test images, and its reports."""
    if not os.path.isdir(os.path.join(CIFAR_DIR, "cifar10")):
        pytest.skip(f"shipped CIFAR-10 not found at {CIFAR_DIR}")
    root = tmp_path_factory.mktemp("robust")
    config = tiny_config(CIFAR_DIR, eval_split=f"test[:{EXAMPLES}]", eval_batch_size=16)
    save_tiny_checkpoint(str(root / "run"), config)
    workdir = str(root / "run")
    pgd = robustness.robustness_report(workdir, severities=(1, 5), attack="pgd", eps=EPS,
                                       steps=2, baseline=workdir)
    fgsm = robustness.robustness_report(workdir, corruption_names=(), attack="fgsm", eps=EPS)
    return dict(workdir=workdir, config=config, pgd=pgd, fgsm=fgsm,
                eval=evaluate_checkpoint(workdir))


def test_counts_every_example_once_and_clean_matches_vit_eval(run):
    report, result = run["pgd"], run["eval"]
    assert report.num_examples == EXAMPLES == result.num_examples
    assert report.clean_accuracy == result.top1
    assert report.ece == pytest.approx(result.ece, abs=1e-6)
    assert 0 < report.clean_accuracy < 1


def test_the_python_api_takes_attack_none_and_radii_as_numbers(run):
    report = robustness.robustness_report(run["workdir"], corruption_names=(), attack="none",
                                          eps=[0.0, 16 / 255])
    assert report.attack is None
    numbers = robustness.robustness_report(run["workdir"], corruption_names=(), attack="fgsm",
                                           eps=[0.0, 16 / 255, ("2/255", 2 / 255)])
    assert numbers.attack["accuracy"]["0.0"] == numbers.clean_accuracy
    assert numbers.attack["accuracy"][repr(16 / 255)] == run["fgsm"].attack["accuracy"]["16/255"]
    assert numbers.attack["eps"]["2/255"] == 2 / 255


def test_eps_zero_gives_the_clean_accuracy_exactly(run):
    for report in (run["pgd"], run["fgsm"]):
        assert report.attack["accuracy"]["0"] == report.clean_accuracy


def test_robust_accuracy_does_not_increase_with_eps(run):
    """Monotone by the report's design (an example is robust at eps only if it survives every
    listed eps' <= eps); the next test checks that design against independent per-eps attacks,
    tests/test_adversarial.py the raw attack's own monotonicity."""
    for report in (run["pgd"], run["fgsm"]):
        values = [report.attack["accuracy"][label] for label, _ in EPS]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False)), values
        assert values[-1] < values[0]  # the attack does something


def test_the_report_ands_independent_per_eps_attacks_in_order_of_eps(run):
    loaded = load_inference_model(load_checkpoint(run["workdir"]))
    step = adversarial.make_attack_step(loaded.model, loaded.config.pp.normalize, "fgsm", "linf",
                                        1)
    params = parallel.replicate(loaded.params)
    survived = {label: 0 for label, _ in EPS}
    raw = dict(survived)
    for batch in data.eval_iterator(run["config"]):
        robust = batch["mask"].copy()
        for label, eps in sorted(EPS, key=lambda x: x[1]):
            flags = np.asarray(step(params, batch["image"], batch["label"], np.float32(eps)))
            raw[label] += int((flags & batch["mask"]).sum())
            robust &= flags
            survived[label] += int(robust.sum())
    assert run["fgsm"].attack["accuracy"] == {k: v / EXAMPLES for k, v in survived.items()}
    assert raw["0"] == survived["0"] and all(raw[k] >= survived[k] for k in raw)


def test_pgd_is_no_better_for_the_model_than_fgsm(run):
    """By construction here (PGD's first step is FGSM's and every iterate must be survived);
    tests/test_adversarial.py compares the losses of independent PGD and FGSM runs."""
    for label, _ in EPS:
        assert run["pgd"].attack["accuracy"][label] <= run["fgsm"].attack["accuracy"][label]


def test_corruption_table_families_and_mce_against_itself(run):
    report = run["pgd"]
    assert list(report.corruptions) == list(robustness.corruptions.CORRUPTIONS)
    assert all(list(v) == ["1", "5"] for v in report.corruptions.values())
    table = np.array([list(v.values()) for v in report.corruptions.values()])
    assert report.mean_corruption_accuracy == pytest.approx(table.mean())
    assert set(report.families) == {"noise", "blur", "weather", "digital"}
    assert report.corruption_source == "generate"
    assert any("frost" in note for note in report.notes)
    # a model against itself: every CE is 1 (where the baseline makes errors at all)
    ce = [v for v in report.baseline["ce"].values() if np.isfinite(v)]
    assert ce and np.allclose(ce, 1.0)
    assert report.baseline["clean_accuracy"] == report.clean_accuracy


def _write_prepared(root, name: str, severity: int, images: np.ndarray, labels: np.ndarray):
    """A prepared TFDS `cifar10_corrupted/<name>_<severity>` (test split, in this order) as
    `tfds build` would leave it, written with TFDS' own builder API."""
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)})
    examples = [(i, {"image": image, "label": int(label)})
                for i, (image, label) in enumerate(zip(images, labels, strict=True))]
    tfds.dataset_builders.store_as_tfds_dataset(
        "cifar10_corrupted", "1.0.0", features, {"test": examples},
        config=f"{TFDS_NAMES.get(name, name)}_{severity}", data_dir=str(root),
        disable_shuffling=True)


def test_a_prepared_cifar10_corrupted_directory_is_chosen_and_counted(run, tmp_path):
    """glass_blur (prepared as frosted_glass_blur) at severity 1 holds the images we generate,
    at severity 5 the clean images; each split holds the 37 evaluated examples twice, so
    reading more than `test[:37]` or counting an example twice shows."""
    root = tmp_path / "tfds"
    root.mkdir()
    (root / "cifar10").symlink_to(os.path.join(CIFAR_DIR, "cifar10"))
    batch = next(data.eval_iterator(run["config"], batch_size=64, num_devices=1))
    mask = batch["mask"][0]
    images, labels = batch["image"][0][mask], batch["label"][0][mask]
    assert len(images) == EXAMPLES
    twice = lambda x: np.concatenate([x, x])
    _write_prepared(root, "glass_blur", 1, twice(corrupt_batch(images, "glass_blur", 1)),
                    twice(labels))
    _write_prepared(root, "glass_blur", 5, twice(images), twice(labels))

    report = robustness.robustness_report(
        run["workdir"], corruption_names=("glass_blur",), severities=(1, 5), attack=None,
        baseline=run["workdir"], data_dir=str(root))
    generated = run["pgd"]
    assert report.corruption_source == "tfds" and report.num_examples == EXAMPLES
    assert report.clean_accuracy == generated.clean_accuracy
    assert report.corruptions["glass_blur"]["1"] == generated.corruptions["glass_blur"]["1"]
    assert report.corruptions["glass_blur"]["5"] == report.clean_accuracy
    assert report.clean_accuracy != generated.corruptions["glass_blur"]["5"]
    assert report.baseline["corruptions"] == report.corruptions  # the baseline reads them too
    assert not any("generated on the fly" in note for note in report.notes)
    # severity 3 is not prepared (an interrupted build left its directory): auto generates
    # all, tfds refuses
    (root / "cifar10_corrupted" / "frosted_glass_blur_3" / "incomplete.X_1.0.0").mkdir(
        parents=True)
    partial = dict(corruption_names=("glass_blur",), severities=(1, 3), attack=None,
                   data_dir=str(root))
    fallback = robustness.robustness_report(run["workdir"], **partial)
    assert fallback.corruption_source == "generate"
    assert fallback.corruptions["glass_blur"]["1"] == generated.corruptions["glass_blur"]["1"]
    with pytest.raises(RobustnessError, match="no prepared cifar10_corrupted"):
        robustness.robustness_report(run["workdir"], source="tfds", **partial)
    # cifar10_corrupted holds the test split alone: another split is generated, or refused
    prepared = dict(partial, severities=(1,))
    on_train = robustness.robustness_report(run["workdir"], split="train[:8]", **prepared)
    assert on_train.corruption_source == "generate" and on_train.num_examples == 8
    with pytest.raises(RobustnessError, match=r"cifar10_corrupted holds the test split only, "
                                              r"not 'train\[:8\]'; use --split test"):
        robustness.robustness_report(run["workdir"], split="train[:8]", source="tfds", **prepared)


def test_generated_corruptions_hit_each_image_at_its_own_size_before_the_resize(run):
    """A 64 px model on 32 px CIFAR images: the images are corrupted at 32 px, then resized,
    as the prepared cifar10_corrupted images are; corrupting after the resize is much milder."""
    config = run["config"].copy_and_resolve_references()
    config.image_size = 64
    corrupting = robustness._corrupting("defocus_blur", 5, seed=0)
    got = next(data.eval_iterator(config, batch_size=8, num_devices=1, before_crop=corrupting))
    native = next(data.eval_iterator(run["config"], batch_size=8, num_devices=1))
    expected = np.stack([preprocess.eval_crop(tf.constant(corrupt(im, "defocus_blur", 5)),
                                              config).numpy() for im in native["image"][0]])
    np.testing.assert_array_equal(got["image"][0], expected)
    resized = next(data.eval_iterator(config, batch_size=8, num_devices=1))["image"][0]
    after = corrupt_batch(resized, "defocus_blur", 5)
    assert psnr(after, resized) > psnr(expected, resized) + 6  # 64 px blurred: 4x less error


def test_two_devices_give_the_same_counts(run, tmp_path):
    out = tmp_path / "two.json"
    env = jax_env.subprocess_env(2)
    args = ["robustness", "--checkpoint", run["workdir"], "--corruptions", "noise",
            "--severities", "1,5", "--attack", "fgsm", "--eps", "0,2/255,16/255",
            "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", f"import sys; from vit import cli; "
                           f"sys.exit(cli.main({args!r}))"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = json.loads(out.read_text())
    assert two["num_examples"] == EXAMPLES
    assert two["clean_accuracy"] == run["pgd"].clean_accuracy
    assert two["corruptions"]["gaussian_noise"] == run["pgd"].corruptions["gaussian_noise"]
    assert two["attack"]["accuracy"] == run["fgsm"].attack["accuracy"]


def test_cli_writes_json_and_reliability_diagram(run, tmp_path, capsys):
    code = cli.main(["robustness", "--checkpoint", run["workdir"], "--corruptions", "contrast",
                     "--severities", "2", "--attack", "none", "--json", str(tmp_path / "r.json"),
                     "--reliability", str(tmp_path / "r.png")])
    assert code == 0
    out = capsys.readouterr().out
    assert "clean accuracy" in out and "contrast" in out
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["attack"] is None and list(d["corruptions"]) == ["contrast"]
    assert (tmp_path / "r.png").stat().st_size > 0
    assert cli.main(["eval", "--workdir", run["workdir"], "--reliability",
                     str(tmp_path / "e.png")]) == 0
    assert "ECE" in capsys.readouterr().out and (tmp_path / "e.png").exists()


def test_options_parse_and_bad_ones_are_one_line_errors(run, capsys, tmp_path):
    assert parse_severities("1-5") == (1, 2, 3, 4, 5) and parse_severities("1,3") == (1, 3)
    assert parse_corruptions("noise,fog,fog") == ("gaussian_noise", "shot_noise",
                                                  "impulse_noise", "fog")
    assert parse_corruptions("none") == () and len(parse_corruptions("all")) == 15
    assert parse_eps("2/255,0.1") == (("2/255", 2 / 255), ("0.1", 0.1))
    assert parse_eps("0.5,3", "l2") == (("0.5", 0.5), ("3", 3.0))  # L2: the whole image's norm
    with pytest.raises(RobustnessError, match="bad epsilon '3'; use values in"):
        parse_eps("0.5,3")
    with pytest.raises(RobustnessError, match="bad epsilon '-1'; an L2 radius is a number >= 0"):
        parse_eps("-1", "l2")
    for norm, fix in (("linf", "use values in"), ("l2", "an L2 radius is")):
        with pytest.raises(RobustnessError, match=f"bad epsilon '1e400'; {fix}"):
            parse_eps("1e400", norm)  # a Fraction no float holds
    with pytest.raises(RobustnessError, match="severity 0 in '0-5' is the clean images"):
        parse_severities("0-5")
    for bad in (lambda: parse_severities("1-7"), lambda: parse_eps("8/0"),
                lambda: parse_corruptions("rain")):
        with pytest.raises(RobustnessError):
            bad()
    with pytest.raises(RobustnessError, match="no prepared cifar10_corrupted"):
        robustness.robustness_report(run["workdir"], corruption_names=("fog",), severities=(1,),
                                     attack=None, source="tfds")
    with pytest.raises(RobustnessError, match="a baseline is what the corruption errors are "
                                              "relative to"):
        robustness.robustness_report(run["workdir"], corruption_names=(), baseline="elsewhere")
    with pytest.raises(RobustnessError, match="bad epsilon '2.0'; use values in"):
        robustness.robustness_report(run["workdir"], eps=[2.0])
    with pytest.raises(RobustnessError, match="seed -1 must be an integer >= 0"):
        robustness.robustness_report(run["workdir"], seed=-1)
    other = str(tmp_path / "other_classes")  # 10 classes at 32 px, named c0..c9
    write(other, SMALL_MODEL, num_classes=10, image_size=32)
    with pytest.raises(RobustnessError, match="names its classes otherwise than"):
        robustness.robustness_report(run["workdir"], corruption_names=("fog",), severities=(1,),
                                     attack=None, baseline=other)
    code = cli.main(["robustness", "--checkpoint", run["workdir"], "--eps", "x"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: bad epsilon 'x'; use values in [0, 1] such as 8/255 or 0.03, comma-separated")
