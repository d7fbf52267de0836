"""W&B logging in WANDB_MODE=offline: the offline run holds the config, the scalars at the logged
steps and the evaluation images, and a resumed workdir continues the same run id."""

from __future__ import annotations

import json
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_finetune import _smoke

from vit import trainer, wandb_logger

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (only with the wandb extra)

BLOCK, HEADER = 32768, 7  # the .wandb file: a LevelDB-style log of Record protos


def _records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The Record protos of an offline run's .wandb file (7-byte file header, 32 KiB blocks)."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:8]
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(raw):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        pending += raw[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def _offline_run(run_dir: Path) -> dict:
    """Config, history rows by step and image files of one offline run directory."""
    [store] = run_dir.glob("*.wandb")
    config, history, run_ids = {}, {}, set()
    for record in _records(store):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_ids.add(record.run.run_id)
            config.update({item.key: json.loads(item.value_json)
                           for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":  # an image is a nested item: {"_type": "image-file", "path"...}
            row: dict = {}
            for item in record.history.item:
                key, *field = [item.key] if item.key else list(item.nested_key)
                value = json.loads(item.value_json)
                if field:
                    row.setdefault(key, {})[field[0]] = value
                else:
                    row[key] = value
            history.setdefault(int(row["step"]), {}).update(row)  # the training step
    images = sorted(p.relative_to(run_dir / "files" / "media" / "images").as_posix()
                    for p in (run_dir / "files" / "media" / "images").rglob("*.png"))
    return {"config": config, "history": history, "run_ids": run_ids, "images": images}


def test_offline_run_holds_config_scalars_images_and_resumes_the_same_id(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = tmp_path / "run"
    config = _smoke(total_steps=4, log_every=2, eval_every=4, checkpoint_every=4,
                    train_split="train[:128]", eval_images=2)
    config.wandb.enabled = True
    config.wandb.tags = ("test",)
    trainer.train(config, str(workdir))
    run_id = (workdir / wandb_logger.RUN_ID_FILE).read_text().strip()
    [first_dir] = (workdir / "wandb").glob("offline-run-*")
    assert first_dir.name.endswith(run_id)

    config.total_steps = 6  # the same workdir again: resumes from step 4 and the same W&B run
    config.eval_every = 6
    trainer.train(config, str(workdir))
    dirs = sorted((workdir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs)
    assert (workdir / wandb_logger.RUN_ID_FILE).read_text().strip() == run_id

    first, resumed = _offline_run(dirs[0]), _offline_run(dirs[1])
    assert first["run_ids"] == resumed["run_ids"] == {run_id}
    assert first["config"]["model"]["variant"] == "Ti/8"
    assert first["config"]["total_steps"] == 4 and resumed["config"]["total_steps"] == 6
    assert sorted(first["history"]) == [2, 4] and sorted(resumed["history"]) == [6]
    for step, row in first["history"].items():
        assert {"train/loss", "train/lr", "train/accuracy", "train/grad_norm"} <= row.keys(), step
    assert {"eval/top1", "eval/top5", "eval/loss", "eval/attention",
            "eval/confusion_matrix"} <= first["history"][4].keys()
    assert "eval/top1" in resumed["history"][6]
    with open(workdir / "metrics.jsonl") as f:
        jsonl = {r["step"]: r for r in map(json.loads, f)}
    assert first["history"][4]["train/loss"] == pytest.approx(jsonl[4]["train/loss"])
    for name in ("eval/attention", "eval/confusion_matrix"):
        image = first["history"][4][name]
        assert image["_type"] == "image-file" and image["format"] == "png"
        assert (dirs[0] / "files" / image["path"]).is_file()
        assert resumed["history"][6][name]["_type"] == "image-file"
    assert [n.split("_")[0] for n in first["images"]] == ["eval/attention", "eval/confusion"]

    for path in (workdir / "checkpoints").iterdir():  # nothing to resume: a new W&B run
        if path.name.isdigit():
            shutil.rmtree(path)
    config.total_steps = config.eval_every = 2
    trainer.train(config, str(workdir))
    fresh_id = (workdir / wandb_logger.RUN_ID_FILE).read_text().strip()
    assert fresh_id != run_id
    [fresh_dir] = (workdir / "wandb").glob(f"offline-run-*-{fresh_id}")
    assert sorted(_offline_run(fresh_dir)["history"]) == [2]


class _FakeRun:
    """What WandbLogger uses of a wandb Run, resumed online: 7 rows, training step 6 last."""

    offline = disabled = False
    url = "https://wandb.example/run"
    step, summary = 7, {"step": 6}

    def __init__(self, **kwargs):
        self.init, self.rows, self.axes, self.exit_code = kwargs, [], [], None

    def define_metric(self, name, step_metric=None):
        self.axes.append((name, step_metric))

    def log(self, row, step=None):
        assert step is None  # the x-axis is the row's own "step"
        self.rows.append(row)

    def finish(self, exit_code=None):
        self.exit_code = exit_code


def test_a_resumed_run_logs_new_steps_and_its_restored_steps_evaluation(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(Settings=lambda **kw: kw, Image=lambda pixels: pixels.shape,
                                 init=lambda **kw: _FakeRun(**kw))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = _smoke()
    config.wandb.enabled = True
    (tmp_path / wandb_logger.RUN_ID_FILE).write_text("abc123\n")
    logger = wandb_logger.WandbLogger(config, str(tmp_path), start_step=4)
    run = logger._run
    assert run.init["id"] == "abc123" and run.init["resume"] == "allow"
    assert run.axes == [("step", None), ("*", "step")]
    logger.write_scalars(4, {"eval/top1": 0.5})  # the restored step's evaluation, run again
    logger.write_scalars(5, {"train/loss": 1.0})  # replayed: W&B has it
    logger.write_scalars(7, {"train/loss": 0.9})
    logger.write_images(7, {"eval/attention": np.zeros((4, 4, 3), np.uint8)})
    assert run.rows == [{"eval/top1": 0.5, "step": 4}, {"train/loss": 0.9, "step": 7},
                        {"eval/attention": (4, 4, 3), "step": 7}]
    logger.close(failed=True)
    assert run.exit_code == 1
    fresh = wandb_logger.WandbLogger(config, str(tmp_path), start_step=0)
    assert fresh.run_id != "abc123" and fresh._run.init["id"] == fresh.run_id
    assert (tmp_path / wandb_logger.RUN_ID_FILE).read_text().strip() == fresh.run_id
    fresh.close()
    assert fresh._run is None


def test_asking_for_wandb_without_it_fails_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    config = _smoke()
    config.wandb.enabled = True
    with pytest.raises(wandb_logger.WandbError, match=r'pip install -e "\.\[wandb\]"') as err:
        trainer.train(config, str(tmp_path / "run"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was built or written
    config.wandb.mode = "sometimes"
    with pytest.raises(wandb_logger.WandbError, match="online, offline, disabled"):
        wandb_logger.require_wandb(config)
