"""bench/train_memory.py: the real train step compiled on abstract inputs, and its byte counts."""

import sys
from pathlib import Path

import vit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_memory import load_config, measure  # noqa: E402


def test_smoke_config_memory_counts_the_exact_state_bytes():
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    config.model.dtype = "bfloat16"  # compute dtype only: parameters stay float32
    config.ema_decay = 0.999
    result = measure(config, devices=1, platform="cpu")
    model = vit.model_from_config(config.model, num_classes=10, image_size=config.image_size)
    count = vit.count_params(model)
    assert result["param_count"] == count and result["param_bytes"] == count * 4
    assert result["param_dtypes"] == ["float32"] and result["dtype"] == "bfloat16"
    # AdamW: float32 mu and nu per parameter, plus int32 step counters.
    assert 0 <= result["opt_state_bytes"] - 2 * result["param_bytes"] < 64
    assert result["ema_bytes"] == result["param_bytes"]
    assert result["attention_impl"] == "explicit" and result["per_device_batch"] == 32
    # The state is donated, as in the trainer: its input buffers are reused for the output.
    state_bytes = result["param_bytes"] + result["opt_state_bytes"] + result["ema_bytes"]
    assert result["alias_bytes"] >= state_bytes
    assert result["argument_bytes"] >= state_bytes + 32 * 32 * 32 * 3  # + the uint8 batch
    assert result["temp_bytes"] > 0
    assert result["peak_bytes"] >= result["argument_bytes"] + result["temp_bytes"]
