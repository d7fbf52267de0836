"""End-to-end tests of the `vit` command: eval, predict, attention, convert, train forwarding."""

import importlib.util
import json
import os
import pathlib
import sys
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_evaluate import save_tiny_checkpoint, tiny_config

from vit import cli
from vit.checkpoint import load_checkpoint
from vit.evaluate import load_inference_model
from vit.predict import model_inputs
from vit.weight_formats import flatten_params, read_weights

predict_module = importlib.import_module("vit.predict")  # vit.predict is also the function

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint (mocked CIFAR-10 of 101 test examples) and two images."""
    root = tmp_path_factory.mktemp("cli")
    with tfds.testing.mock_data(num_examples=101):
        save_tiny_checkpoint(str(root / "run"), tiny_config(str(root / "tfds")))
    for name, size in (("a.png", (40, 24)), ("b.jpg", (32, 32))):
        pixels = np.random.default_rng(len(name)).integers(0, 256, (*size, 3), np.uint8)
        Image.fromarray(pixels).save(root / name)
    return root


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_eval_prints_metrics_and_writes_json(run, capsys, tmp_path):
    out = tmp_path / "m.json"
    with tfds.testing.mock_data(num_examples=101):
        code = cli.main(["eval", "--workdir", str(run / "run"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "examples 101" in printed and "per-class accuracy" in printed and "images/s" in printed
    assert json.loads(out.read_text())["num_examples"] == 101


def test_eval_plots_writes_pngs_beside_the_json(run, capsys, tmp_path):
    out = tmp_path / "report"
    with tfds.testing.mock_data(num_examples=101):
        code = cli.main(["eval", "--workdir", str(run / "run"), "--plots", str(out)])
    assert code == 0
    assert f"wrote {out / 'metrics.json'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png", "metrics.json", "per_class_accuracy.png"]
    assert json.loads((out / "metrics.json").read_text())["num_examples"] == 101
    for name in ("confusion_matrix.png", "per_class_accuracy.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300
            assert np.asarray(image.convert("RGB")).std() > 10  # a drawn figure, not blank


def test_out_of_device_memory_is_one_line_in_both_commands(run, capsys, monkeypatch):
    """An accelerator's RESOURCE_EXHAUSTED (pages of buffer assignment) is one line naming the
    batch size, for `vit eval` and train.py; another runtime error still raises."""
    from test_error_text import OUT_OF_MEMORY

    from vit import train_cli

    evaluate = sys.modules["vit.evaluate"]  # `vit.evaluate` is also the package's function

    def fail(*args, **kwargs):
        raise OUT_OF_MEMORY

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", fail)
    assert cli.main(["eval", "--workdir", str(run / "run")]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "error: out of device memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
        "9663676416 bytes.): lower --batch-size, or run on a device with more memory")
    assert train_cli._one_line(OUT_OF_MEMORY).endswith(
        "bytes.): lower config.batch_size, or keep it with config.grad_accum_steps "
        "(micro-batches) or config.model.remat=block")

    monkeypatch.setattr(cli, "_run_predict", fail)  # predict has no --batch-size
    assert cli.main(["predict", "--checkpoint", str(run / "run"), str(run / "a.png")]) == 1
    assert _one_error_line(capsys.readouterr().err).endswith(
        "bytes.): run on a device with more memory, or give fewer images at once")

    def other(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", other)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["eval", "--workdir", str(run / "run")])


def test_convert_unreadable_class_names_file_is_one_line(run, capsys, tmp_path):
    for bad in (str(run / "a.png"), str(tmp_path / "missing.txt")):
        argv = ["convert", str(run / "run"), str(tmp_path / "out"), "--class-names", bad]
        assert cli.main(argv) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: --class-names {bad!r} cannot be read as text ("), line
        assert line.endswith("): give a UTF-8 text file with one class name per line"), line
        assert not (tmp_path / "out").exists()


def test_eval_bad_inputs_exit_2_with_one_line(run, capsys, tmp_path):
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    with tfds.testing.mock_data(num_examples=20):
        code = cli.main(["eval", "--workdir", str(run / "run"), "--dataset", "cifar100"])
    assert code == 2
    assert "100 classes" in _one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval"])
    assert exit_info.value.code == 2
    assert "--workdir" in _one_error_line(capsys.readouterr().err)


def test_predict_reports_bad_files_and_predicts_the_rest(run, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "p.json"
    code = cli.main(["predict", "--checkpoint", str(run / "run"), str(run / "a.png"), str(bad),
                     str(run / "b.jpg"), "--top-k", "2", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in _one_error_line(captured.err)
    lines = captured.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(run / "a.png"), str(run / "b.jpg")]
    payload = json.loads(out.read_text())
    assert [len(p["top_k"]) for p in payload["predictions"]] == [2, 2]
    assert payload["errors"][0]["file"] == str(bad)


def test_predict_empty_directory_is_an_error(run, capsys, tmp_path):
    assert cli.main(["predict", "--checkpoint", str(run / "run"), str(tmp_path)]) == 1
    assert "holds no" in _one_error_line(capsys.readouterr().err)


def test_attention_writes_maps_for_each_image(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "att"
    code = cli.main(["attention", "--checkpoint", str(run / "run"), str(run / "a.png"),
                     str(run / "b.jpg"), "--out", str(out), "--head", "1"])
    assert code == 0, capsys.readouterr().err
    written = sorted(os.listdir(out))
    assert "a_rollout.png" in written and "b_layers.npy" in written
    assert np.load(out / "a_attention.npy").shape == (1, 2, 65, 65)  # depth, heads, 1 + 8x8
    # one image at a time (as 32 at a time for a large folder): the same files and maps
    monkeypatch.setattr(predict_module, "BATCH", 1)
    (run / "broken.png").write_bytes(b"not an image")
    code = cli.main(["attention", "--checkpoint", str(run / "run"), str(run / "a.png"),
                     str(run / "broken.png"), str(run / "b.jpg"), "--out", str(tmp_path / "one"),
                     "--head", "1"])
    assert code == 1 and "broken.png" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "one")) == written
    np.testing.assert_allclose(np.load(tmp_path / "one" / "b_attention.npy"),
                               np.load(out / "b_attention.npy"), rtol=1e-6, atol=1e-7)


def test_convert_vit_jax_npz_then_predict(tmp_path, capsys):
    meta = json.loads(pathlib.Path(FIXTURES, "vit_jax_ti.json").read_text())
    spec = importlib.util.spec_from_file_location(
        "random_weights", os.path.join(FIXTURES, "random_weights.py"))
    random_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(random_weights)
    src = str(tmp_path / "vit_jax_ti.npz")  # vit_jax naming: Ti/16, depth 2, 64 px, 10 classes
    np.savez(src, **random_weights.build(meta["token"]["manifest"], meta["seed"]))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(10)))
    assert cli.main(["convert", src, str(tmp_path / "conv"), "--class-names", str(names)]) == 0
    contents = load_checkpoint(str(tmp_path / "conv"))
    assert contents.config["model"]["depth"] == 2 and contents.config["image_size"] == 64
    expected = read_weights(src)
    got = flatten_params(contents.params)
    assert set(got) == set(expected)
    np.testing.assert_array_equal(got["head/kernel"], expected["head/kernel"])
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(image)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "conv"), str(image)]) == 0
    # The top class and its probability, from the converted model applied by hand.
    loaded = load_inference_model(str(tmp_path / "conv"))
    inputs = model_inputs([np.zeros((50, 70, 3), np.uint8)], loaded.config)
    logits = loaded.model.apply({"params": loaded.params}, inputs)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
    best = int(np.argmax(probs))
    assert capsys.readouterr().out.split(": ", 1)[1].startswith(f"c{best} {probs[best]:.4f}")


def test_convert_missing_source_is_one_line(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "none.npz"), str(tmp_path / "out")]) == 2
    assert "no weights at" in _one_error_line(capsys.readouterr().err)


def test_train_help_lists_the_training_flags(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith("usage: vit train --config=FILE[:VARIANT] --workdir=DIR")
    for flag in ("--config:", "--workdir:", "--init_from:", "--[no]multihost:", "--[no]wandb:"):
        assert flag in out, flag


def test_train_forwards_its_flags(monkeypatch):
    seen = []
    fake = types.ModuleType("vit.train_cli")
    fake.main = seen.append
    monkeypatch.setitem(sys.modules, "vit.train_cli", fake)
    monkeypatch.setattr("vit.train_cli", fake, raising=False)
    assert cli.main(["train", "--config=configs/smoke.py", "--workdir=/tmp/w"]) == 0
    assert seen == [["vit train", "--config=configs/smoke.py", "--workdir=/tmp/w"]]


def test_output_paths_are_checked_before_any_work(run, capsys, tmp_path, monkeypatch):
    """A --json that is a directory, an --out under a file, an output workdir holding another
    run's checkpoints: one line, exit 2, and the evaluation / export / fine-tuning never starts."""
    for module, name in (("vit.evaluate", "evaluate_checkpoint"), ("vit.export", "export"),
                         ("vit.prune", "prune_checkpoint"),
                         ("vit.quantize", "quantize_checkpoint")):
        monkeypatch.setattr(importlib.import_module(module), name,
                            lambda *a, **k: pytest.fail("work began"))
    (tmp_path / "file.txt").write_text("x")
    workdir = str(run / "run")
    cases = [
        (["eval", "--workdir", workdir, "--json", str(tmp_path)],
         f"--json {tmp_path} is a directory; give a file name in it, e.g. {tmp_path / 'out.json'}"),
        (["eval", "--workdir", workdir, "--plots", str(tmp_path / "file.txt")],
         f"--plots {tmp_path / 'file.txt'} is a file; give a directory"),
        (["eval", "--workdir", workdir, "--reliability", str(tmp_path / "file.txt" / "r.png")],
         f"--reliability {tmp_path / 'file.txt' / 'r.png'}: {tmp_path / 'file.txt'} is a file, "
         "not a directory; give a path under a directory"),
        (["export", "--checkpoint", workdir, "--format", "saved_model", "--out",
          str(tmp_path / "file.txt")],
         f"--out {tmp_path / 'file.txt'} is a file; give a directory"),
        (["quantize", "--checkpoint", workdir, "--out", workdir],
         f"--out {workdir} already holds checkpoints (steps ["),
        (["prune", "--checkpoint", workdir, "--out", workdir, "--sparsity", "0.5",
          "--finetune-steps", "3"], f"--out {workdir} already holds checkpoints (steps ["),
        (["convert", str(tmp_path / "w.npz"), workdir], f"DST {workdir} already holds checkpoints"),
        (["eval", "--workdir", workdir, "--reliability", str(tmp_path / "r.xyz")],
         f"--reliability {tmp_path / 'r.xyz'}: matplotlib cannot write .xyz files; use .png, "
         ".pdf, .svg or .jpg"),
        (["plot", workdir, "--out", str(tmp_path / "c.docx")],
         f"--out {tmp_path / 'c.docx'}: matplotlib cannot write .docx files"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        assert _one_error_line(capsys.readouterr().err).startswith(f"error: {expected}"), argv
    # an existing folder, or file, that this user may not write (os.access answers as on a
    # read-only file system: a chmod would not stop root)
    (tmp_path / "locked").mkdir()
    (tmp_path / "old.json").write_text("{}")
    real = os.access
    locked = {tmp_path / "locked", tmp_path / "old.json"}
    monkeypatch.setattr(os, "access", lambda target, mode, **kw: not (
        mode & os.W_OK and pathlib.Path(target).absolute() in locked) and real(target, mode, **kw))
    for argv, expected in (
            (["eval", "--workdir", workdir, "--json", str(tmp_path / "locked" / "m.json")],
             f"--json {tmp_path / 'locked' / 'm.json'}: cannot write in {tmp_path / 'locked'}"),
            (["eval", "--workdir", workdir, "--plots", str(tmp_path / "locked")],
             f"--plots {tmp_path / 'locked'}: cannot write in {tmp_path / 'locked'}"),
            (["eval", "--workdir", workdir, "--json", str(tmp_path / "old.json")],
             f"--json {tmp_path / 'old.json'}: the file is read-only")):
        assert cli.main(argv) == 2, argv
        assert _one_error_line(capsys.readouterr().err).startswith(f"error: {expected}"), argv


def test_a_closed_pipe_ends_quietly_as_a_pipe_tool_does(monkeypatch, capsys):
    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_run_eval", reader_gone)
    assert cli.main(["eval", "--workdir", "anything"]) == cli.SIGPIPE_STATUS == 141
    assert capsys.readouterr().err == ""


def test_missing_output_folders_are_made_and_a_bare_reliability_name_gets_png(run, capsys,
                                                                               tmp_path):
    deep = tmp_path / "a" / "b"
    with tfds.testing.mock_data(num_examples=101):
        code = cli.main(["eval", "--workdir", str(run / "run"), "--json",
                         str(deep / "m.json"), "--reliability", str(deep / "rel")])
    assert code == 0
    assert f"wrote {deep / 'rel.png'}\n" in capsys.readouterr().out
    assert sorted(p.name for p in deep.iterdir()) == ["m.json", "rel.png"]


def test_attention_output_names_never_collide():
    files = ["x/a.png", "y/a.jpg", "a_2.png", "b.png", "z/a.jpeg"]
    taken = set()
    stems = cli._unique_stems(files[:2], taken) + cli._unique_stems(files[2:], taken)  # 2 batches
    assert stems == ["a", "a_2", "a_2_2", "b", "a_3"]
    assert len(set(stems)) == len(files) and taken == set(stems)


def test_eval_on_another_dataset_needs_only_the_split_it_reads(run, capsys, tmp_path):
    """A CIFAR-10 run evaluated on an image folder that has only a `val` split: the run's
    train split ('train') is not looked for there."""
    for label in range(10):
        (tmp_path / "val" / f"c{label}").mkdir(parents=True)
        pixels = np.full((32, 32, 3), 20 * label, np.uint8)
        Image.fromarray(pixels).save(tmp_path / "val" / f"c{label}" / "0.png")
    code = cli.main(["eval", "--workdir", str(run / "run"), "--dataset", f"folder:{tmp_path}",
                     "--split", "val"])
    assert code == 0, capsys.readouterr().err
    assert "examples 10" in capsys.readouterr().out


def test_a_broken_link_among_the_inputs_is_named_and_the_rest_predicted(run, capsys, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes((run / "a.png").read_bytes())
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "also.png").symlink_to(tmp_path / "missing2.png")
    code = cli.main(["predict", "--checkpoint", str(run / "run"), str(folder),
                     str(tmp_path / "also.png")])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith(f"{folder / 'a.png'}: ")
    assert captured.err.splitlines() == [
        f"error: {str(folder / 'gone.png')!r} is a link to {str(tmp_path / 'missing.png')!r}, "
        "which does not exist; fix or remove it",
        f"error: {str(tmp_path / 'also.png')!r} is a link to {str(tmp_path / 'missing2.png')!r}, "
        "which does not exist; fix or remove it"]


@pytest.mark.parametrize("argv", [
    ["eval", "--workdir", "w", "--batch-size", "0"], ["predict", "--checkpoint", "w", "x.png",
                                                     "--top-k", "-1"],
    ["prune", "--checkpoint", "w", "--out", "o", "--sparsity", "0.5", "--finetune-steps", "-3"],
    ["robustness", "--checkpoint", "w", "--seed", "-3"]])
def test_counts_below_their_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "must be a positive integer" in line or "must be 0 or more, got -3" in line


def test_json_outputs_are_strict_json_with_null_for_nan_and_inf(tmp_path):
    from vit.output_paths import write_json

    path = tmp_path / "out" / "metrics.json"
    write_json(str(path), {"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None}}
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
