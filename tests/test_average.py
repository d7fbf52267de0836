"""vit/average.py and `vit average`: the mean of checkpoints' parameters exactly, a run's last N,
the EMA parameters, and one-line refusals (another model, other classes, int8, too few)."""

import jax
import numpy as np
import pytest
from tiny_checkpoints import PLAIN, SMALL, write

from vit import cli
from vit.average import AverageError, average_checkpoints
from vit.checkpoint import CheckpointError, load_checkpoint, write_params
from vit.evaluate import load_inference_model
from vit.weight_formats import flatten_params


def _flat(path: str, step: int | None = None) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_params(load_checkpoint(path, step).params).items()}


def test_the_mean_of_three_runs_and_the_cli(tmp_path, capsys):
    runs = [str(tmp_path / f"run{i}") for i in range(3)]
    for i, run in enumerate(runs):
        write(run, PLAIN, seed=i)
    result = average_checkpoints(runs, str(tmp_path / "soup"))
    assert result.sources == [f"{run}@3" for run in runs]
    got, each = _flat(str(tmp_path / "soup")), [_flat(run) for run in runs]
    assert set(got) == set(each[0])
    for name, value in got.items():
        want = (each[0][name].astype(np.float64) + each[1][name] + each[2][name]) / 3
        np.testing.assert_array_equal(value, want.astype(np.float32), name)
    assert load_inference_model(str(tmp_path / "soup")).model.width == 32  # an ordinary checkpoint
    assert cli.main(["average", *runs[:2], "--out", str(tmp_path / "two")]) == 0
    assert capsys.readouterr().out.startswith("averaged 2 checkpoints (")
    assert cli.main(["average", runs[0], "--out", str(tmp_path / "two")]) == 2  # not empty
    assert "--out" in capsys.readouterr().err


def test_the_last_n_of_one_run_and_its_ema(tmp_path):
    run = str(tmp_path / "run")
    _, params = write(run, PLAIN)
    contents = load_checkpoint(run)
    for step, scale in ((5, 2.0), (7, 4.0)):
        scaled = jax.tree_util.tree_map(lambda v, s=scale: np.asarray(v) * s, params)
        write_params(run, step, scaled, contents.config, contents.dataset_info)
    average_checkpoints([run], str(tmp_path / "last2"), last=2)
    for name, value in _flat(str(tmp_path / "last2")).items():
        np.testing.assert_allclose(value, _flat(run, 3)[name] * 3.0, rtol=1e-6)
    assert load_checkpoint(str(tmp_path / "last2")).step == 7  # the newest averaged step
    with pytest.raises(AverageError, match=r"holds 3 checkpoint\(s\) \(\[3, 5, 7\]\), fewer "
                                           r"than --last 4"):
        average_checkpoints([run], str(tmp_path / "x"), last=4)
    with pytest.raises(CheckpointError, match="holds no EMA params"):
        average_checkpoints([run], str(tmp_path / "y"), last=2, use_ema=True)


def test_checkpoints_of_other_models_or_classes_are_refused_in_one_line(tmp_path):
    write(str(tmp_path / "a"), PLAIN)
    write(str(tmp_path / "wide"), dict(PLAIN, width=48, num_heads=2))
    write(str(tmp_path / "gap"), dict(SMALL, classifier="gap", posemb="learn"))
    write(str(tmp_path / "six"), PLAIN, num_classes=6)
    write(str(tmp_path / "imagenet"), PLAIN, normalize="imagenet")
    write(str(tmp_path / "regularised"), dict(PLAIN, drop_path_rate=0.1, remat="block"))
    average_checkpoints([str(tmp_path / "a"), str(tmp_path / "regularised")],
                        str(tmp_path / "out-regularised"))  # training-only keys may differ
    for other, words in (("wide", "another model \\(model.width=48 against 32\\)"),
                         ("gap", "another model"),
                         ("six", "other classes"),
                         ("imagenet", "another input normalisation \\(pp.normalize='imagenet' "
                                      "against 'cifar10'\\)")):
        with pytest.raises(AverageError, match=words) as info:
            average_checkpoints([str(tmp_path / "a"), str(tmp_path / other)],
                                str(tmp_path / f"out-{other}"))
        assert "\n" not in str(info.value)
        assert not (tmp_path / f"out-{other}").exists()
    with pytest.raises(AverageError, match="two or more checkpoints"):
        average_checkpoints([str(tmp_path / "a")], str(tmp_path / "z"))
    from vit.quantize import quantize_checkpoint

    quantize_checkpoint(str(tmp_path / "a"), str(tmp_path / "int8"))
    with pytest.raises(AverageError, match="is an int8 checkpoint: average the float"):
        average_checkpoints([str(tmp_path / "int8"), str(tmp_path / "a")], str(tmp_path / "q"))


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line_by_every_command(tmp_path, capsys):
    run = str(tmp_path / "run")
    _, params = write(run, PLAIN)
    contents = load_checkpoint(run)
    params["Transformer"]["encoder_norm"]["scale"] = np.full_like(
        params["Transformer"]["encoder_norm"]["scale"], np.nan)
    write_params(run, 5, params, contents.config, contents.dataset_info)
    for args in (["average", run, "--last", "2", "--out", str(tmp_path / "soup")],
                 ["quantize", "--checkpoint", run, "--out", str(tmp_path / "int8")],
                 ["prune", "--checkpoint", run, "--sparsity", "0.5", "--out",
                  str(tmp_path / "pruned")],
                 ["export", "--checkpoint", run, "--format", "stablehlo", "--out",
                  str(tmp_path / "export")]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.endswith("checkpoint of step 5 holds NaN or inf in Transformer/encoder_norm/"
                            "scale: its weights diverged before they were saved; use an earlier "
                            "checkpoint"), (args, err)
        assert "\n" not in err and not any((tmp_path / d).exists()
                                           for d in ("soup", "int8", "pruned", "export"))
    assert cli.main(["quantize", "--checkpoint", f"{run}/checkpoints/3", "--out",
                     str(tmp_path / "int8")]) == 0
