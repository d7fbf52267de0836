"""Run the CIFAR-10 lever ablation: one short run per row, each a change to one base recipe.

Each row is `python train.py --config=configs/cifar10.py:<base> <overrides>` in its own workdir
under --root; the script prints one JSON line per finished row (test top-1 with and without
flip TTA, EMA top-1, wall minutes) and skips rows whose workdir already holds a result.
    python tools/cifar10_ablation.py --root runs/ablation --rows base,conv_stem
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> overrides of the base recipe (configs/cifar10.py:ablation-base)
ROWS: dict[str, list[str]] = {
    "base": [],
    "patchify_stem": ["--config.model.stem=patchify"],
    "token_head": ["--config.model.classifier=token"],
    "no_crop": ["--config.pp.train_crop=resize"],
    "lr_1e-3": ["--config.lr=0.001"],
    "no_label_smoothing": ["--config.label_smoothing=0.0"],
    "deep_conv_stem": ["--config.model.stem_channels=(32,64,64,128)",
                       "--config.model.stem_strides=(1,2,1,2)"],
    "stem_groupnorm": ["--config.model.stem_norm=groupnorm"],
    "sincos_posemb": ["--config.model.posemb=sincos2d"],
    "b2_0.99": ["--config.b2=0.99"],
    "batch_32": ["--config.batch_size=32", "--config.total_steps=1200",
                 "--config.warmup_steps=120"],
    "lr_5e-4": ["--config.lr=0.0005"],
    "randaugment_2_5": ["--config.pp.randaugment_num_ops=2",
                        "--config.pp.randaugment_magnitude=5"],
    "mixup_0.2": ["--config.mixup_alpha=0.2"],
    "token_keep_0.75": ["--config.model.token_keep_ratio=0.75"],
    "token_keep_0.5": ["--config.model.token_keep_ratio=0.5"],
    "map_head": ["--config.model.classifier=map"],
    "depth_6": ["--config.model.depth=6"],
    "no_weight_decay": ["--config.weight_decay=0.0"],
    "registers_4": ["--config.model.num_registers=4"],
    "ema_0.999": ["--config.ema_decay=0.999"],
    "tta_flip": ["--config.eval_tta=flip"],
    "warmup_0": ["--config.warmup_steps=0"],
    "width_192": ["--config.model.width=192", "--config.model.mlp_dim=576",
                  "--config.model.num_heads=3"],
    "bf16_matmul": ["--config.model.matmul_dtype=bfloat16"],
    "sigmoid_xent": ["--config.loss=sigmoid_xent", "--config.model.head_bias_init=-2.3"],
    "random_erase_0.25": ["--config.random_erase=0.25"],
    "three_augment": ["--config.pp.three_augment=True"],
}


def _last_eval(workdir: Path) -> dict:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return [r for r in records if "eval/top1" in r][-1]


def run_row(name: str, overrides: list[str], root: Path, base: str) -> dict:
    """Train one row to the end (or reuse its finished workdir) and return its figures."""
    workdir = root / name
    result_file = workdir / "ablation.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    start = time.perf_counter()
    cmd = [sys.executable, "train.py", f"--config=configs/cifar10.py:{base}",
           f"--workdir={workdir}", *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ))
    minutes = (time.perf_counter() - start) / 60
    last = _last_eval(workdir)
    row = {"row": name, "overrides": overrides, "top1": last["eval/top1"],
           "ema_top1": last.get("eval_ema/top1"), "minutes": round(minutes, 2)}
    result_file.write_text(json.dumps(row))
    return row


def main() -> None:
    """Parse the flags and run the chosen rows in order."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs/ablation")
    parser.add_argument("--base", default="ablation-base")
    parser.add_argument("--rows", default=",".join(ROWS))
    args = parser.parse_args()
    for name in args.rows.split(","):
        print(json.dumps(run_row(name, ROWS[name], Path(args.root), args.base)), flush=True)


if __name__ == "__main__":
    main()
