"""train.py's runs inside the test process, for tests whose subject is the run, not the command.

A train.py subprocess imports TensorFlow and JAX again (about 5 s on the development machines)
and compiles in a fresh process; the same run here costs its training alone. `config_of` parses
the `--config.KEY=VALUE` overrides with the absl flag train.py defines, so a test's arguments
mean what they mean on the command line. Tests of the command itself (its exit status, its one
`error:` line, signals, several processes) still start train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = str((ROOT.parent / "shared" / "data" / "tfds").resolve())


def config_of(*overrides: str, config_file: str = "configs/smoke.py"
              ) -> ml_collections.ConfigDict:
    """The config `train.py --config=<config_file> <overrides>` runs, on the shared CIFAR-10."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
    argv = ["train.py", f"--config={ROOT / config_file}", *overrides]
    saved, sys.argv = sys.argv, argv  # ml_collections looks for the overrides in sys.argv
    try:
        flag_values(argv)
    finally:
        sys.argv = saved
    config = flag_values.config
    if not config.get("data_dir"):  # train.py's runs in the tests read TFDS_DATA_DIR
        config.data_dir = DATA_DIR
    return config


def train(workdir: Path, *overrides: str, config_file: str = "configs/smoke.py"):
    """vit.trainer.train on `config_of(*overrides)` in `workdir`; its TrainResult."""
    from vit import trainer

    return trainer.train(config_of(*overrides, config_file=config_file), str(workdir))


def refusal_line(workdir: Path, *overrides: str) -> str:
    """train.py's `error:` line for a run it refuses, from this process: the one line it prints
    for these exceptions (exit status 1); asserts that nothing was written."""
    import pytest

    from vit.train_cli import _one_line

    with pytest.raises((ValueError, OSError, RuntimeError)) as refused:
        train(workdir, *overrides)
    assert not workdir.exists()
    return f"error: {_one_line(refused.value)}"
