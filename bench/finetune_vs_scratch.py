"""Fine-tuning vs training from scratch on the shipped CIFAR-10: prints ONE JSON line.

    .venv/bin/python bench/finetune_vs_scratch.py [--pretrain_steps=600] [--finetune_steps=300]

(a) pretrains configs/finetune.py:c10-0to4 (a small ViT, classes 0-4) for P steps; (b) fine-tunes
it with configs/finetune.py:c10-5to9 (classes 5-9, new head) for F steps; (c) trains the same
model from scratch on classes 5-9 for F steps with the same recipe, and (d), as a stronger
baseline, from scratch with the pretraining recipe (AdamW). Accuracies are top-1 on the test
split restricted to classes 5-9 (5,000 images). About 11 minutes on a 2-core CPU.
"""

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

CIFAR_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../shared/data/tfds"))
if not os.path.isdir(CIFAR_DIR):
    CIFAR_DIR = "/work/shared/data/tfds"
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../configs/finetune.py")
TARGET_CLASSES = [5, 6, 7, 8, 9]


def finetune_config(variant: str):
    """configs/finetune.py:<variant> pointed at the shipped CIFAR-10."""
    spec = importlib.util.spec_from_file_location("finetune_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.data_dir = CIFAR_DIR
    config.checkpoint_every = 10_000  # only the final checkpoint
    return config


def timed_run(config, workdir: str) -> tuple[float, float]:
    """Train `config` in `workdir`: (test top-1, wall seconds)."""
    from vit.trainer import train

    start = time.perf_counter()
    result = train(config, workdir)
    return round(result.metrics["eval/top1"], 4), round(time.perf_counter() - start, 1)


def main(argv: list[str]) -> None:
    """Run the four trainings and print their accuracies and times as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--finetune_steps", type=int, default=300)
    args = parser.parse_args(argv)
    P, F = args.pretrain_steps, args.finetune_steps
    out = {"pretrain_steps": P, "finetune_steps": F}
    with tempfile.TemporaryDirectory() as root:
        pre = finetune_config("c10-0to4")
        pre.total_steps = P
        pre.warmup_steps = min(pre.warmup_steps, P // 10)
        out["pretrain_top1_classes_0to4"], out["pretrain_s"] = timed_run(pre, f"{root}/pre")

        ft = finetune_config("c10-5to9")
        ft.total_steps = F
        ft.warmup_steps = min(ft.warmup_steps, F // 10)
        ft.init_from = f"{root}/pre"
        out["finetune_top1"], out["finetune_s"] = timed_run(ft, f"{root}/ft")

        scratch = ft.copy_and_resolve_references()
        scratch.init_from = None
        scratch.init_required = False  # from scratch on purpose
        out["scratch_same_recipe_top1"], out["scratch_same_recipe_s"] = timed_run(
            scratch, f"{root}/scratch")

        adamw = finetune_config("c10-0to4")
        adamw.classes = TARGET_CLASSES
        adamw.total_steps = F
        adamw.warmup_steps = min(adamw.warmup_steps, F // 10)
        out["scratch_adamw_top1"], out["scratch_adamw_s"] = timed_run(adamw, f"{root}/adamw")
    out["finetune_beats_scratch"] = out["finetune_top1"] > max(
        out["scratch_same_recipe_top1"], out["scratch_adamw_top1"])
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
