"""bench/train_mfu.py: the trainer's step timed, its model FLOPs, the peak it is held against."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax_env
import pytest
from test_flops import _vit_forward_by_hand

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_memory import load_config  # noqa: E402
from train_mfu import device_peak_tflops, measure, override  # noqa: E402
from train_mfu import main as train_mfu_main  # noqa: E402


def test_smoke_step_reports_model_flops_and_mfu_against_the_given_peak():
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    result = measure(config, per_device_batch=8, steps=2, warmup=0, peak_tflops=2.0)
    n = jax.local_device_count()
    # configs/smoke.py: Ti/8 at 32 px, width 32, depth 2, MLP 64, 10 classes, no token dropping
    assert result["model_flops_per_image"] == 3 * _vit_forward_by_hand(17, 16, 8, 32, 2, 64, 10)
    assert result["devices"] == n and result["per_device_batch"] == 8
    assert result["images_per_s"] == pytest.approx(8 * n / (result["step_ms"] / 1e3), rel=1e-9)
    achieved = result["model_flops_per_image"] * result["images_per_s"] / 1e12
    assert result["achieved_tflops_per_s"] == pytest.approx(achieved, rel=1e-9)
    assert result["peak_source"] == "--peak_tflops" and result["peak_tflops_per_s"] == 2.0
    assert result["mfu"] == pytest.approx(result["achieved_tflops_per_s"] / 2.0, rel=1e-9)
    assert result["platform"] == "cpu" and result["target_mfu"] == 0.5


def test_profile_keeps_the_trace_and_sorts_the_steps_op_time_into_categories(tmp_path):
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    result = measure(config, per_device_batch=8, steps=1, warmup=0, peak_tflops=2.0,
                     profile_dir=str(tmp_path), profile_steps=2)
    profile = result["profile"]
    assert list(tmp_path.rglob("*.xplane.pb"))
    shares = profile["share_by_category"]
    for category in ("forward dense matmul", "backward dense matmul", "forward convolution",
                     "forward elementwise", "optimizer elementwise"):
        assert category in shares, sorted(shares)
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    assert profile["op_ms_per_step"] > 0 and profile["wall_ms_per_step"] > 0
    assert profile["unmatched_ms_per_step"] == pytest.approx(0.0, abs=0.05)
    assert any("Transformer/encoderblock_*/" in op for op in profile["top_ops_ms"])


def test_a_batch_that_does_not_split_into_micro_batches_is_refused():
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    config.grad_accum_steps = 4
    with pytest.raises(ValueError, match="per-device batch 6 must be a positive multiple of "
                                         "grad_accum_steps=4"):
        measure(config, per_device_batch=6, steps=1)


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("TPU v5 lite", 197.0), ("TPU v5", 459.0)])
def test_accelerator_peaks_come_from_the_data_sheet_table(kind, peak):
    gpu = SimpleNamespace(platform="gpu", device_kind=kind)
    got, source = device_peak_tflops(gpu, config=None)
    assert got == peak and source.startswith("data sheet")


def test_an_unknown_accelerator_asks_for_its_peak():
    gpu = SimpleNamespace(platform="gpu", device_kind="Mystery Accelerator 9000")
    with pytest.raises(ValueError, match="no bfloat16 peak known for 'Mystery Accelerator "
                                         "9000': pass --peak_tflops"):
        device_peak_tflops(gpu, config=None)


def test_on_the_cpu_the_peak_is_a_matmul_measured_in_the_step_operand_dtype():
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    peak, source = device_peak_tflops(jax.devices("cpu")[0], config)
    assert peak > 0 and source == "measured 4096^2 float32 matmul"


def test_the_command_line_runs_the_step_on_every_device():
    env = jax_env.subprocess_env(2)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_mfu.py"), str(ROOT / "configs" / "smoke.py"),
         "--steps", "1", "--warmup", "0", "--peak_tflops", "1",
         "--set", "model.attention_impl=fused", "--set", "model.remat=block"],
        env=env, capture_output=True, text=True, timeout=300, check=True)
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["bench"] == "train_mfu" and line["devices"] == 2
    assert line["attention_impl"] == "fused" and line["set"][1] == "model.remat=block"
    assert line["per_device_batch"] == 16  # configs/smoke.py: batch 32 over 2 devices
    assert line["images_per_s"] == pytest.approx(32 / (line["step_ms"] / 1e3), rel=1e-9)
    assert line["peak_tflops_per_s"] == 1.0  # a CPU's measured or given peak is the machine's
    assert line["mfu"] == pytest.approx(line["achieved_tflops_per_s"], rel=1e-9)


def test_set_overrides_a_dotted_key_as_a_literal_and_refuses_unknown_keys():
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    override(config, "model.remat=block")
    override(config, "mixup_alpha=0.5")
    override(config, "grad_accum_steps=2")
    assert (config.model.remat, config.mixup_alpha, config.grad_accum_steps) == ("block", 0.5, 2)
    with pytest.raises(ValueError, match="the config has no key 'model.remats'"):
        override(config, "model.remats=block")
    with pytest.raises(ValueError, match="write KEY=VALUE"):
        override(config, "model.remat")


@pytest.mark.parametrize("args,message", [
    (["configs/smoke.py", "--set", "model.nope=1"],
     "train_mfu.py: error: configs/smoke.py: --set 'model.nope=1': the config has no key "
     "'model.nope'"),
    (["configs/smoke.py", "--per_device_batch", "0"],
     "train_mfu.py: error: --per_device_batch must be >= 1, got 0"),
    (["configs/nope.py"], "train_mfu.py: error: configs/nope.py: [Errno 2] No such file"),
])
def test_bad_command_lines_are_one_line(args, message, monkeypatch, capsys):
    """main() as `python bench/train_mfu.py ARGS` runs it, in this process (an uncaught
    exception, a traceback on the command line, would fail the test here)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "train_mfu.py"), *args])
    with pytest.raises(SystemExit) as exited:
        train_mfu_main()
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith(message)
