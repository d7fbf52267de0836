"""Rectangular images end to end: train.py with --config.image_size=H,W, resume, then the
`vit` command's eval, predict, attention and robustness on the checkpoint (real CIFAR-10,
smoke config)."""

import json

import in_process
import numpy as np
import pytest
from PIL import Image
from test_faults import DATA_DIR, _train

from vit import cli
from vit.checkpoint import load_checkpoint
from vit.evaluate import load_inference_model


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A smoke run on 24x40 images (patch 8: a 3x5 grid), in this process, resumed by train.py
    for 4 more steps."""
    workdir = tmp_path_factory.mktemp("wide") / "run"
    first = in_process.train(workdir, "--config.image_size=24,40", "--config.pp.eval_resize=32")
    assert not first.preempted
    resumed = _train(workdir, "--config.image_size=(24, 40)", "--config.pp.eval_resize=32",
                     "--config.total_steps=12")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "config.image_size changed" not in resumed.stderr  # the same pair, spelt otherwise
    return workdir


def test_a_rectangular_run_trains_resumes_and_records_its_size(wide_run):
    contents = load_checkpoint(str(wide_run))
    assert contents.step == 12
    assert contents.config["image_size"] == [24, 40]
    loaded = load_inference_model(contents)
    assert loaded.model.image_size == (24, 40) and loaded.model.grid == (3, 5)
    posemb = contents.params["Transformer"]["posembed_input"]["pos_embedding"]
    assert posemb.shape[1] == 1 + 3 * 5
    lines = [json.loads(line) for line in (wide_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/top1" in line] == [8, 12]


def test_eval_predict_attention_and_robustness_take_the_rectangular_checkpoint(
        wide_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", DATA_DIR)
    out = tmp_path / "m.json"
    assert cli.main(["eval", "--workdir", str(wide_run), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["num_examples"] == 256
    pixels = np.random.default_rng(0).integers(0, 256, (50, 30, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "tall.png")
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(wide_run), str(tmp_path / "tall.png"),
                     "--json", str(tmp_path / "p.json")]) == 0
    top = json.loads((tmp_path / "p.json").read_text())["predictions"][0]["top_k"]
    assert len(top) == 5 and 0.0 < sum(p for _, p in top) <= 1.0 + 1e-6
    maps = tmp_path / "maps"
    assert cli.main(["attention", "--checkpoint", str(wide_run), str(tmp_path / "tall.png"),
                     "--out", str(maps)]) == 0
    rollout = np.load(maps / "tall_rollout.npy")
    assert rollout.shape[-2:] == (3, 5)
    np.testing.assert_allclose(rollout.sum(axis=(-2, -1)), 1.0, rtol=1e-5)
    report = tmp_path / "r.json"
    assert cli.main(["robustness", "--checkpoint", str(wide_run), "--split", "test[:64]",
                     "--corruptions", "fog,pixelate", "--severities", "3", "--attack", "fgsm",
                     "--eps", "2/255", "--json", str(report)]) == 0
    robust = json.loads(report.read_text())
    assert robust["num_examples"] == 64 and set(robust["corruptions"]) == {"fog", "pixelate"}
    assert 0.0 <= robust["attack"]["accuracy"]["2/255"] <= robust["clean_accuracy"]




def test_a_pair_the_patch_does_not_divide_or_not_a_pair_is_one_line(tmp_path):
    wrong = in_process.refusal_line(tmp_path / "bad", "--config.image_size=24,40,8")
    assert wrong == ("error: config.image_size must be an int or a pair of ints "
                     "(height, width), got (24, 40, 8): use e.g. 32 or (32, 48)")
    run = in_process.refusal_line(tmp_path / "bad", "--config.image_size=24,44")
    assert run == (
        "error: image size 24x44 is not divisible by the patch size 8x8: use sides that are "
        "multiples of it (e.g. 24x40) or another patch size")
