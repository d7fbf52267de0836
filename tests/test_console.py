"""A quiet console: `vit --help`, a `vit eval` and a failing `train.py` (in subprocesses) print
no TensorFlow, absl or XLA start-up lines; a failure prints one line; `--verbose` (or
VIT_VERBOSE=1) shows what the quiet import held back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluate import save_tiny_checkpoint, tiny_config

from vit import console

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = str((ROOT.parent / "shared" / "data" / "tfds").resolve())
_SCRIPT = Path(sys.executable).with_name("vit")  # the installed console script
VIT = ([str(_SCRIPT)] if _SCRIPT.exists() else
       [sys.executable, "-c", "import sys; from vit.cli import main; sys.exit(main())"])
# What TensorFlow, absl and XLA print at start-up when nobody silences them.
STARTUP_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN|cpu_feature_guard|TF_ENABLE_ONEDNN_OPTS|This TensorFlow binary"
    r"|Logging before flag parsing|^[IWEF]\d{4} \d\d:\d\d:\d\d|^[IWEF]0000 |tensorflow/core|xla/",
    re.MULTILINE)


def _run(cmd: list[str], tmp_path: Path, **env: str) -> tuple[int, str, str]:
    unset = ("VIT_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")  # the defaults of the entry points
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), str(ROOT)]),
                   TFDS_DATA_DIR=DATA_DIR, **env)
    done = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint of a model for the shipped CIFAR-10."""
    workdir = tmp_path_factory.mktemp("quiet") / "run"
    save_tiny_checkpoint(str(workdir), tiny_config(DATA_DIR))
    return workdir


def test_vit_help_and_vit_eval_print_no_startup_lines(checkpoint_dir, tmp_path):
    code, out, err = _run([*VIT, "--help"], tmp_path)
    assert code == 0 and "usage: vit" in out
    assert err == "" and not STARTUP_NOISE.search(out)

    code, out, err = _run([*VIT, "eval", "--workdir", str(checkpoint_dir), "--split",
                           "test[:64]"], tmp_path)
    assert code == 0, err
    assert "examples 64" in out
    assert not STARTUP_NOISE.search(out + err), out + err
    assert err == ""


def test_failing_train_prints_one_line_without_wandb(tmp_path):
    # Without the wandb package, asking for W&B fails at start-up: shadow it with a module
    # whose import fails, as on a machine without the extra.
    (tmp_path / "shadow" / "wandb").mkdir(parents=True)
    (tmp_path / "shadow" / "wandb" / "__init__.py").write_text(
        "raise ImportError('No module named wandb')\n")
    train = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/smoke.py",
             f"--workdir={tmp_path / 'run'}", "--wandb"]
    code, out, err = _run(train, tmp_path)
    assert code == 1
    assert out == "" and not STARTUP_NOISE.search(err), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: W&B logging"), err
    assert 'pip install -e ".[wandb]"' in lines[0]
    assert not (tmp_path / "run").exists()


def test_verbose_shows_what_the_quiet_import_kept(capfd, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    with console.quiet_native_output():
        os.write(2, b"I0000 a native start-up line\n")  # as TensorFlow's C++ code writes it
    assert capfd.readouterr().err == ""
    console.set_verbose(True)  # what --verbose does
    assert "I0000 a native start-up line" in capfd.readouterr().err
    console.set_verbose(False)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")  # VIT_VERBOSE=1: nothing is held back
    with console.quiet_native_output():
        os.write(2, b"shown at once\n")
    assert capfd.readouterr().err == "shown at once\n"


def test_a_corrupt_jpeg_in_an_image_folder_is_one_line_without_tensorflows_logs(checkpoint_dir,
                                                                                tmp_path):
    """TensorFlow logs "Premature end of JPEG data" and rendezvous warnings natively (JAX's
    import would have set TF_CPP_MIN_LOG_LEVEL=1, which shows them)."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "folder" / "test"
    for name in ("c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"):  # the head's 10
        (root / name).mkdir(parents=True)
        pixels = np.random.default_rng(len(name)).integers(0, 256, (40, 40, 3), np.uint8)
        Image.fromarray(pixels).save(root / name / "0.jpg")
    whole = (root / "c3" / "0.jpg").read_bytes()
    (root / "c3" / "0.jpg").write_bytes(whole[:len(whole) // 2])
    code, out, err = _run([*VIT, "eval", "--workdir", str(checkpoint_dir), "--dataset",
                           f"folder:{tmp_path / 'folder'}", "--split", "test",
                           "--match-classes", "order"], tmp_path)
    assert code == 2 and err.startswith("error: corrupt or unreadable image file "), err
    assert len(err.splitlines()) == 1, err
