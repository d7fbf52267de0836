"""Training and evaluating on an image folder whose contents change or break: the class
folders changed before a resume (an error) or before an evaluation (matched by name), a single
class, and a corrupt file found mid-run (the steps trained so far are saved first)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.smoke import get_config
from vit import checkpoint, data, sources, trainer
from vit.evaluate import evaluate_checkpoint

CLASSES = ("cat", "dog", "emu")


def _write_folder(root: Path, classes=CLASSES, per_class: int = 6) -> None:
    """root/{train,test}/<class>/<i>.png: 8x8 images whose colour depends on class and index."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (8, 8, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


def _config(root: Path, total_steps: int = 2, **overrides):
    config = get_config()
    config.update({"dataset": f"folder:{root}", "train_split": "train", "eval_split": "test",
                   "image_size": 8, "batch_size": 4, "eval_batch_size": 4, "shuffle_buffer": 64,
                   "total_steps": total_steps, "warmup_steps": 0, "checkpoint_every": 2,
                   "log_every": 1, "eval_images": 0, **overrides})
    config.model.update(variant="Ti/4")
    config.pp.train_crop = "resize"
    return config


def test_changed_class_folders_stop_a_resume_and_are_matched_by_name_in_evaluation(tmp_path):
    root, run = tmp_path / "images", tmp_path / "run"
    _write_folder(root)
    trainer.train(_config(root), str(run))
    before = evaluate_checkpoint(str(run))
    # A new class folder: the sorted class list shifts every label id of the trained classes.
    for split in ("train", "test"):
        shutil.copytree(root / split / "cat", root / split / "ant")
    with pytest.raises(data.DataError) as info:
        trainer.train(_config(root, total_steps=4), str(run))
    assert str(info.value) == (
        f"the classes of 'folder:{root}' changed since checkpoint 2 (new: ant), so the head's "
        "label ids would change meaning; restore the dataset's classes to resume, or fine-tune "
        "on the new ones in a new workdir with --config.init_from=<this workdir>")
    assert checkpoint.load_checkpoint(str(run)).step == 2  # nothing trained, nothing lost
    after = evaluate_checkpoint(str(run))  # the head's three classes, found by name
    assert list(after.per_class) == list(CLASSES) and after.num_examples == before.num_examples
    assert (after.top1, after.loss) == (before.top1, before.loss)
    np.testing.assert_array_equal(after.confusion_matrix, before.confusion_matrix)


def test_a_single_class_is_refused_at_start_up(tmp_path):
    _write_folder(tmp_path / "images", classes=("cat",))
    with pytest.raises(data.DataError, match=r"has 1 class \(cat\): a classifier needs at "
                                             r"least 2; add class folders"):
        trainer.train(_config(tmp_path / "images"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_corrupt_eval_file_mid_run_saves_the_trained_step_first(tmp_path):
    root, run = tmp_path / "images", tmp_path / "run"
    _write_folder(root)
    (root / "test" / "dog" / "3.png").write_bytes(b"\x89PNG not an image")
    config = _config(root, total_steps=6, eval_every=3, checkpoint_every=100)
    with pytest.raises(data.DataError) as info:
        trainer.train(config, str(run))
    message = str(info.value)
    assert message.startswith(f"corrupt or unreadable image file '{root}/test/dog/3.png' (")
    assert message.endswith("remove or replace it, or set skip_corrupt=True to skip such files "
                            "(step 3 was saved first: rerun to resume)")
    assert checkpoint.load_checkpoint(str(run)).step == 3
    (root / "test" / "dog" / "3.png").unlink()
    assert int(trainer.train(config, str(run)).state.step) == 6  # resumed from step 3


def test_a_relative_folder_path_is_stored_absolute(tmp_path, monkeypatch):
    _write_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    trainer.train(_config(Path("images")), "run")
    assert checkpoint.load_checkpoint("run").config["dataset"] == f"folder:{tmp_path}/images"
    assert int(trainer.train(_config(Path("images"), total_steps=4), "run").state.step) == 4
    monkeypatch.chdir("/")  # `vit eval` from elsewhere finds the folder the run trained on
    assert evaluate_checkpoint(str(tmp_path / "run")).num_examples == 3 * 6


def test_a_corrupt_train_file_mid_run_saves_the_steps_trained_first(tmp_path):
    root, run = tmp_path / "images", tmp_path / "run"
    _write_folder(root)
    config = _config(root, total_steps=6, checkpoint_every=100, shuffle_buffer=1)
    first_epoch = sources.open_source(config).read("train", order_seed=data.read_order_seed(
        config.seed, 0, 0))  # the order the run reads its first epoch in
    order = [r["path"].decode() for r in first_epoch.as_numpy_iterator()]
    Path(order[12]).write_bytes(b"\x89PNG not an image")  # in the 4th batch of 4
    with pytest.raises(data.DataError) as info:
        trainer.train(config, str(run))
    assert str(info.value).endswith("(step 2 was saved first: rerun to resume)")
    assert order[12] in str(info.value)
    assert checkpoint.load_checkpoint(str(run)).step == 2
