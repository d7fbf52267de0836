"""`vit plot`: curves of a real (tiny) training run, old metrics files without wall-clock times,
resumed runs, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_finetune import _smoke

from vit import cli, plot, trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_SIZE = (int(plot.FIGSIZE[0] * plot.DPI), int(plot.FIGSIZE[1] * plot.DPI))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The smoke model trained 6 steps on the shipped CIFAR-10: loss every 2, eval every 3."""
    workdir = tmp_path_factory.mktemp("plot") / "smoke"
    trainer.train(_smoke(total_steps=6, log_every=2, eval_every=3, train_split="train[:192]"),
                  str(workdir))
    return workdir


def _write_jsonl(workdir: Path, records: list[dict]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return workdir


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == PNG_SIZE


def test_real_run_has_steps_and_wall_clock_minutes(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curves = plot.load_run(str(run))
    assert curves.has_wall_clock
    loss, top1 = curves.curves[plot.TRAIN_LOSS], curves.curves[plot.EVAL_TOP1]
    assert loss.steps.tolist() == [2, 4, 6] and top1.steps.tolist() == [3, 6]
    assert top1.values.tolist() == [r["eval/top1"] for r in records if "eval/top1" in r]
    minutes = np.concatenate([loss.minutes, top1.minutes])
    assert minutes.min() == 0.0 and np.all(np.diff(loss.minutes) >= 0)
    assert minutes.max() < 30  # seconds of training, in minutes


def test_vit_plot_writes_a_png_for_new_and_old_runs(run, tmp_path, capsys):
    # An old-style run: no tensorboard/ folder and no times, resumed at step 20 after step 30.
    old = _write_jsonl(tmp_path / "old", [
        {"step": 10, "train/loss": 2.3}, {"step": 20, "train/loss": 2.2},
        {"step": 20, "eval/top1": 0.1}, {"step": 30, "train/loss": 2.5},
        {"step": 30, "train/loss": 2.1}, {"step": 40, "train/loss": 2.0},
        {"step": 40, "eval/top1": 0.2, "eval/loss": 2.0}])
    out = tmp_path / "figs" / "curves.png"
    code = cli.main(["plot", str(run), str(old), "--out", str(out), "--labels", "smoke, old"])
    assert code == 0, capsys.readouterr().err
    assert f"wrote {out} (2 runs)" in capsys.readouterr().out
    _check_png(out)
    old_curves = plot.load_run(str(old))
    assert not old_curves.has_wall_clock and old_curves.curves[plot.TRAIN_LOSS].minutes is None
    loss = old_curves.curves[plot.TRAIN_LOSS]
    assert loss.steps.tolist() == [10, 20, 30, 40]
    assert loss.values.tolist() == [2.3, 2.2, 2.1, 2.0]  # the resumed step 30 wins


def test_vit_plot_writes_the_format_its_extension_names(run, tmp_path, capsys):
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "bare")]) == 0
    assert f"wrote {tmp_path / 'bare.png'} (1 run)" in capsys.readouterr().out
    _check_png(tmp_path / "bare.png")


def test_a_time_key_in_the_records_gives_minutes(tmp_path):
    workdir = _write_jsonl(tmp_path / "timed", [
        {"step": 1, "train/loss": 2.0, "time": 1000.0},
        {"step": 2, "train/loss": 1.0, "time": 1090.0}])
    assert plot.load_run(str(workdir)).curves[plot.TRAIN_LOSS].minutes.tolist() == [0.0, 1.5]
    out = plot.plot_runs([str(workdir)], str(tmp_path / "one.png"))
    _check_png(Path(out))


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_metrics_and_bad_labels_are_one_line_errors(run, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert cli.main(["plot", str(tmp_path), "--out", out]) == 2
    assert "no metrics.jsonl in" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["plot", str(run), str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["plot", str(run), "--out", out, "--labels", "a,b"]) == 2
    assert "2 labels for 1 workdirs" in _one_error_line(capsys.readouterr().err)
    assert not Path(out).exists()
