"""This toolkit against timm (PyTorch) on the same CPU, side by side; prints one JSON line.

Workloads (`--what`): `train`, a Ti/4 training step (forward + cross-entropy + backward +
AdamW) at 32x32 px, batch 128; `infer`, B/16 inference at 224 px, batch 16; `matmul`, the GFLOP/s
of a 4096 x 4096 matmul in each framework. All float32; `--bf16` adds each in bfloat16 (ours:
`matmul_dtype="bfloat16"`, vit/matmul.py; timm: `torch.autocast("cpu", torch.bfloat16)`).
Every figure comes from a fresh process (bench/vit_worker.py, bench/timm_worker.py: warm-up,
then the median of the steps), and the sides are interleaved, ours then timm, workload by
workload, round after round, so a drift in the machine's load hits both alike. Reported: the
median, min and max over `--rounds` of each side and the ratio of the medians (ours / timm).
The models are equal layer for layer (bench/timm_worker.py lists the few differences).
timm runs in its own environment (`--peer-python`, else `VIT_PEER_PYTHON`, else .peer/): torch
is no dependency of this package. Set it up once:
    python3.11 -m venv .peer && .peer/bin/pip install torch==2.13.0 timm
Run: `.venv/bin/python bench/vs_timm.py [--rounds 5] [--what train,infer,matmul] [--bf16]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from machine import cpu_description

BENCH = Path(__file__).resolve().parent
SIDES = {"ours": BENCH / "vit_worker.py", "timm": BENCH / "timm_worker.py"}
# Each workload: batch, image side (or matmul n), and what a step is.
WORKLOADS = {
    "train": dict(batch=128, size=32, step="Ti/4 forward + cross-entropy + backward + AdamW"),
    "infer": dict(batch=16, size=224, step="B/16 forward"),
    "matmul": dict(size=4096, step="n x n matmul; bfloat16: operands cast in the timed call"),
}
MATMUL_REPEATS = 5

Job = tuple[str, str]  # (workload, dtype)
Runs = dict[str, dict[str, list[dict]]]  # "train_float32" -> side -> one worker result per round


def peer_python(flag: str | None) -> str:
    """The timm environment's python: --peer-python, else VIT_PEER_PYTHON, else .peer/."""
    path = flag or os.environ.get("VIT_PEER_PYTHON") or str(BENCH.parent / ".peer/bin/python")
    if not Path(path).exists():
        raise SystemExit(f"no peer python at {path}: pass --peer-python or set VIT_PEER_PYTHON, "
                         "or create it: python3.11 -m venv .peer && "
                         ".peer/bin/pip install torch==2.13.0 timm")
    return path


def run_worker(command: list[str]) -> dict:
    """Run one worker process; its last stdout line is its JSON result."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_rounds(jobs: list[Job], rounds: int, command: Callable[[str, str, str], list[str]],
               run: Callable[[list[str]], dict] = run_worker) -> Runs:
    """Each round: for each job, ours then timm, each in its own process via `run`."""
    runs: Runs = {f"{w}_{d}": {side: [] for side in SIDES} for w, d in jobs}
    for _ in range(rounds):
        for workload, dtype in jobs:
            for side in SIDES:
                runs[f"{workload}_{dtype}"][side].append(run(command(side, workload, dtype)))
    return runs


def _sig(value: float) -> float:
    return float(f"{value:.4g}")  # four significant figures: 0.4123 images/s and 1234 GFLOP/s


def _stats(values: list[float]) -> dict[str, object]:
    return {"median": _sig(statistics.median(values)), "min": _sig(min(values)),
            "max": _sig(max(values)), "runs": [_sig(v) for v in values]}


def summarize(runs: Runs) -> dict[str, dict]:
    """Per figure: unit, each side's median / min / max / runs, and median ours / timm."""
    out = {}
    for key, sides in runs.items():
        values = {side: [r["value"] for r in results] for side, results in sides.items()}
        first = {side: results[0] for side, results in sides.items()}
        out[key] = {"unit": first["ours"]["unit"],
                    **{side: _stats(v) for side, v in values.items()},
                    "ours_over_timm": round(statistics.median(values["ours"])
                                            / statistics.median(values["timm"]), 3)}
        for side, r in first.items():
            if "params" in r:
                out[key][side]["model"], out[key][side]["params"] = r["model"], r["params"]
            for impl in ("matmul_impl", "elementwise_impl"):
                if impl in r:
                    out[key][side][impl] = r[impl]
    return out


def report(runs: Runs, settings: dict[str, object]) -> dict[str, object]:
    """The JSON line: settings, the machine, each side's environment, figures and ratios."""
    results = summarize(runs)
    first = next(iter(runs.values()))
    return {"bench": "vs_timm", **settings, **cpu_description(),
            "workloads": {w: WORKLOADS[w] for w in dict.fromkeys(k.split("_")[0] for k in runs)},
            "ours_env": first["ours"][0]["env"], "timm_env": first["timm"][0]["env"],
            "ratios_ours_over_timm": {k: r["ours_over_timm"] for k, r in results.items()},
            "results": results}


def parse_what(what: str) -> list[str]:
    """`--what` as a list of workloads; SystemExit naming an unknown one."""
    names = [w.strip() for w in what.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        raise SystemExit(f"unknown --what {', '.join(unknown) or what!r}; use a comma list of "
                         f"{', '.join(WORKLOADS)}")
    return names


def main() -> None:
    """Run the interleaved rounds and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--infer-steps", type=int, default=10, help="timed batches per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (after compiling)")
    parser.add_argument("--what", default="train,infer,matmul")
    parser.add_argument("--bf16", action="store_true", help="also measure each in bfloat16")
    parser.add_argument("--peer-python", help="python of the torch + timm environment")
    args = parser.parse_args()
    workloads = parse_what(args.what)
    pythons = {"ours": sys.executable, "timm": peer_python(args.peer_python)}
    dtypes = ["float32", "bfloat16"] if args.bf16 else ["float32"]
    steps = {"train": args.train_steps, "infer": args.infer_steps, "matmul": MATMUL_REPEATS}

    def command(side: str, workload: str, dtype: str) -> list[str]:
        spec = WORKLOADS[workload]
        return [pythons[side], str(SIDES[side]), workload, dtype,
                "--batch", str(spec.get("batch", 1)), "--size", str(spec["size"]),
                "--steps", str(steps[workload]), "--warmup", str(args.warmup)]

    runs = run_rounds([(w, d) for w in workloads for d in dtypes], args.rounds, command)
    settings = {"rounds": args.rounds, "train_steps": args.train_steps,
                "infer_steps": args.infer_steps, "matmul_repeats": MATMUL_REPEATS,
                "warmup": args.warmup, "dtypes": dtypes}
    print(json.dumps(report(runs, settings)))


if __name__ == "__main__":
    main()
