"""timm's side of bench/vs_timm.py: one workload, one dtype, in a fresh process; one JSON line.

Run by the peer environment's python (torch + timm; never `vit`, never this package's venv).
The models are built to equal ours (bench/vit_worker.py) layer for layer and parameter for
parameter: class token, learned position embedding over class token and patches, pre-norm
blocks with LayerNorm eps 1e-6, tanh GELU (`act_layer="gelu_tanh"`; timm's default is the exact
GELU), final LayerNorm, class-token pooling, linear head. It runs eager PyTorch, as timm does by
default (no torch.compile), on NCHW images. `bfloat16` means `torch.autocast("cpu",
dtype=torch.bfloat16)`, which also casts the attention core (scaled_dot_product_attention),
where ours keeps it in float32.
Run: `.peer/bin/python bench/timm_worker.py train float32 --batch 128 --size 32 --steps 10`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import torch
import torch.nn.functional as F

# Each workload's model, as ours: Ti/4 for training (CIFAR-10 size), B/16 for inference.
MODELS = {"train": dict(name="vit_tiny_patch16_224", patch_size=4, num_classes=10),
          "infer": dict(name="vit_base_patch16_224", patch_size=16, num_classes=1000)}


def _load_torchvision_ops() -> bool:
    """Load torchvision's C ops before timm imports torchvision; False if they cannot load.

    The wheel index here has only CUDA builds of torchvision, whose ops cannot load into a
    +cpu torch; torchvision then fails at import, declaring a fake `nms` for an op that does
    not exist. timm's ViT uses none of these ops: declare their schemas so the import works.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        torch.ops.load_library(os.path.join(spec.submodule_search_locations[0], "_C.so"))
        return True
    except OSError:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}",
                                 "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return False


TORCHVISION_OPS = _load_torchvision_ops()
import timm  # noqa: E402  (after the torchvision ops are in place)
from timing import median_seconds, worker_arguments  # noqa: E402


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def create_model(workload: str, size: int) -> torch.nn.Module:
    """The timm model equal to ours for `workload` at `size` x `size` pixels."""
    spec = MODELS[workload]
    return timm.create_model(spec["name"], img_size=size, patch_size=spec["patch_size"],
                             num_classes=spec["num_classes"], act_layer="gelu_tanh")


def train_images_per_s(model: torch.nn.Module, dtype: str, batch: int, size: int, steps: int,
                       warmup: int) -> float:
    """Images/s of forward + cross-entropy + backward + AdamW: median after `warmup` steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)  # optax's defaults
    images = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % model.num_classes

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        run()
    return batch / median_seconds(run, steps)


def infer_images_per_s(model: torch.nn.Module, dtype: str, batch: int, size: int, steps: int,
                       warmup: int) -> float:
    """Images/s of `model(images)` under inference_mode: median after `warmup` batches."""
    model.eval()
    images = torch.randn(batch, 3, size, size)

    def run() -> None:
        with torch.inference_mode(), _autocast(dtype):
            model(images)

    for _ in range(warmup):
        run()
    return batch / median_seconds(run, steps)


def matmul_gflops(n: int, dtype: str, repeats: int) -> float:
    """GFLOP/s of torch.matmul on float32 n x n operands (under autocast for bfloat16)."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def run() -> None:
        with torch.inference_mode(), _autocast(dtype):
            torch.matmul(a, b)

    run()
    return 2 * n**3 / median_seconds(run, repeats) / 1e9


def environment() -> dict[str, object]:
    """Versions and the process settings a reader needs to reproduce this side."""
    import torchvision

    return {"torch": torch.__version__, "timm": timm.__version__,
            "torchvision": torchvision.__version__, "torchvision_c_ops": TORCHVISION_OPS,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main() -> None:
    """Measure one workload and print one JSON line."""
    a = worker_arguments(__doc__)
    if a.workload == "matmul":
        result = {"value": matmul_gflops(a.size, a.dtype, a.steps), "unit": "GFLOP/s"}
    else:
        model = create_model(a.workload, a.size)
        timed = train_images_per_s if a.workload == "train" else infer_images_per_s
        result = {"value": timed(model, a.dtype, a.batch, a.size, a.steps, a.warmup),
                  "unit": "images/s", "model": MODELS[a.workload]["name"],
                  "params": sum(p.numel() for p in model.parameters())}
    print(json.dumps({**result, "env": environment()}))


if __name__ == "__main__":
    main()
