"""bench/vs_timm.py without torch: interleaving, the JSON line on fake figures, our worker,
and the timing loop its workers share (bench/timing.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import vit_worker  # noqa: E402
import vs_timm  # noqa: E402

import vit  # noqa: E402


def _fake_run(calls: list[list[str]]):
    """A worker stand-in: ours is 2x timm in round 1, 3x in round 2; records the commands."""

    def run(command: list[str]) -> dict:
        calls.append(command)
        side, workload, _ = command
        rnd = calls.count(command)
        value = 10.0 * (1 + rnd if side == "ours" else 1)
        unit = "GFLOP/s" if workload == "matmul" else "images/s"
        extra = {} if workload == "matmul" else {"model": f"{side}-m", "params": 7}
        if side == "ours":  # what our worker adds: the implementations the model chose
            extra.update(matmul_impl="blas", elementwise_impl="fused")
        return {"value": value, "unit": unit, **extra, "env": {"side": side}}

    return run


def test_rounds_interleave_ours_then_timm_and_report_ratios_of_medians():
    calls: list[list[str]] = []
    jobs = [("train", "float32"), ("matmul", "bfloat16")]
    runs = vs_timm.run_rounds(jobs, 2, lambda *job: list(job), _fake_run(calls))
    assert [c[:2] for c in calls] == [["ours", "train"], ["timm", "train"], ["ours", "matmul"],
                                      ["timm", "matmul"]] * 2
    line = vs_timm.report(runs, {"rounds": 2})
    json.dumps(line)  # one JSON line
    train = line["results"]["train_float32"]
    assert train["ours"] == {"median": 25.0, "min": 20.0, "max": 30.0, "runs": [20.0, 30.0],
                             "model": "ours-m", "params": 7, "matmul_impl": "blas",
                             "elementwise_impl": "fused"}
    assert train["timm"]["median"] == 10.0 and train["unit"] == "images/s"
    assert line["ratios_ours_over_timm"] == {"train_float32": 2.5, "matmul_bfloat16": 2.5}
    assert line["results"]["matmul_bfloat16"]["unit"] == "GFLOP/s"
    assert line["ours_env"] == {"side": "ours"} and line["timm_env"] == {"side": "timm"}
    assert list(line["workloads"]) == ["train", "matmul"] and "cpu" in line and "isa" in line


def test_what_names_an_unknown_workload():
    assert vs_timm.parse_what("train, matmul") == ["train", "matmul"]
    with pytest.raises(SystemExit, match="unknown --what 'speed'"):
        vs_timm.parse_what("train,speed")


def test_a_missing_peer_python_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.delenv("VIT_PEER_PYTHON", raising=False)
    with pytest.raises(SystemExit, match="pip install torch"):
        vs_timm.peer_python(str(tmp_path / "nope/python"))


def test_our_worker_times_a_tiny_train_step_and_inference():
    model = vit.create_model("Ti/4", num_classes=10, image_size=8, width=16, depth=1,
                             num_heads=2, mlp_dim=32)
    assert vit_worker.train_images_per_s(model, batch=4, steps=1, warmup=0) > 0
    assert vit_worker.infer_images_per_s(model, batch=4, steps=1, warmup=0) > 0
    env = vit_worker.environment()
    assert env["host_memory_retained"] == vit.HOST_MEMORY_RETAINED and "jax" in env


def test_timed_calls_count_the_pages_each_call_faults_in():
    """The benchmarks' timing loop counts each call's minor page faults: a call that touches
    every 4 KiB page of a fresh 8 MB mapping faults at least those 2,048 pages, one that
    touches nothing new faults none of them."""
    import mmap

    import timing

    def touch_fresh_pages() -> None:
        with mmap.mmap(-1, 8 << 20) as fresh:
            for offset in range(0, 8 << 20, 4096):
                fresh[offset] = 1

    calls = timing.timed_calls(touch_fresh_pages, 3)
    assert len(calls) == 3 and all(seconds > 0 and faults >= 2048 for seconds, faults in calls)
    assert all(faults < 2048 for _, faults in timing.timed_calls(lambda: None, 3))
    assert timing.median_seconds(lambda: None, 3) < min(seconds for seconds, _ in calls)
