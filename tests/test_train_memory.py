"""bench/train_memory.py: the real train step compiled on abstract inputs, and its byte counts."""

import sys
from pathlib import Path

import jax

import vit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_memory import load_config, measure, saved_activation_bytes  # noqa: E402


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


def test_gradient_accumulation_bounds_the_adversarial_attacks_memory_too():
    """The attack's forward and backward passes run per micro-batch: 4 of them need well under
    the whole batch's working set (before, the attack ran on the whole per-device batch)."""
    config = load_config(str(ROOT / "configs" / "smoke.py"))
    config.adv_train.update(method="pgd", steps=2)
    temp = {}
    for accum in (1, 4):
        config.grad_accum_steps = accum
        temp[accum] = measure(config, devices=1, platform="cpu")["temp_bytes"]
    assert temp[4] < 0.5 * temp[1], temp


def test_remat_keeps_far_fewer_activations_for_the_backward_pass():
    # Traced residuals (jax.vjp), the same on every backend. XLA:CPU's own buffer assignment
    # does not shrink with remat (README, "Activation rematerialisation"); GPUs' and TPUs' does.
    saved = {}
    for remat in ("none", "dots", "block"):
        model = vit.create_model("Ti/4", num_classes=10, image_size=32, width=64, depth=4,
                                 num_heads=2, mlp_dim=256, remat=remat)
        params = jax.eval_shape(lambda m=model: vit.init_params(m, jax.random.PRNGKey(0)))
        saved[remat] = saved_activation_bytes(model, params, micro_batch=8)
    # "block" keeps each block's input, [8, 64 tokens, 64] float32 = 128 KiB, and what the
    # embedding and head need; "dots" also the dense layers' outputs.
    assert saved["block"] < saved["dots"] < saved["none"]
    assert saved["none"] > 5 * saved["block"]
