"""Per-op profile of the Ti/4 training step on this CPU: where a step's time goes; one JSON line.

Traces `--steps` calls of bench/model_throughput.py's step with the JAX profiler, reads the
trace back (`jax.profiler.ProfileData`), and matches every XLA:CPU thunk event to its instruction
in the compiled HLO. Each instruction gets a category: `dense matmul` and `attention matmul`
(fusions around a dot, without and with batch dimensions), `layout copy` (transposes and
copies), `elementwise` (every other fusion: norms, GELU, softmax, bias, residuals), split into
forward, backward (`transpose(jvp(...))` in the op name) and `optimizer`. Times are summed
event durations per step; ops that the thunk executor runs side by side both count, so the
shares are of the summed time, and the wall time per step is reported beside it.
Run: `python bench/op_profile.py [--variant Ti/4] [--batch 128] [--matmul-dtype float32]`.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from pathlib import Path

import jax
from machine import cpu_description
from model_throughput import add_step_arguments, make_train_step, step_inputs

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\w+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", re.M | re.S)


def categories(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (its category and pass, the op it comes from with any layer index
    starred) for the compiled module's text."""
    bodies = dict(_COMPUTATION.findall(hlo_text))
    result = {}
    for name, _shape, opcode, rest in _INSTRUCTION.findall(hlo_text):
        called = re.search(r"calls=%([^,\s]+)", rest)
        body = bodies.get(called.group(1), "") if called else ""
        op_name = re.search(r'op_name="([^"]+)"', rest)
        op_name = op_name.group(1) if op_name else ""
        if opcode == "dot" or " dot(" in body:
            batched = "lhs_batch_dims" in (body or rest)
            kind = "attention matmul" if batched else "dense matmul"
        elif opcode in ("copy", "transpose") or name.startswith(("transpose", "copy")):
            kind = "layout copy"
        else:
            kind = "elementwise"
        where = ("backward" if "transpose(jvp" in op_name else
                 "forward" if "jvp(" in op_name else "optimizer")
        source = re.sub(r"^jit\([^)]*\)/|(transpose\()?jvp\(|\)", "", op_name)
        result[name] = (f"{where} {kind}", re.sub(r"_\d+/", "_*/", source, count=1))
    return result


def profile(compiled, state: list, batch_args: tuple, steps: int) -> tuple[list, float]:
    """Every traced event [(name, ns)] over `steps` calls (thunks carry their HLO instruction's
    name, on whichever thread ran them), and the wall seconds per step."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        for _ in range(steps):
            state[0], state[1], loss = compiled(state[0], state[1], *batch_args)
            loss.block_until_ready()
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(trace))
        events = [(event.name, event.duration_ns) for plane in data.planes
                  for line in plane.lines for event in line.events]
    return events, wall


def main() -> None:
    """Profile the step and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_step_arguments(parser, steps=3)
    parser.add_argument("--top", type=int, default=15, help="how many ops to list")
    args = parser.parse_args()

    model, tx, params, opt_state, *batch_args = step_inputs(args)
    state = [params, opt_state]
    compiled = make_train_step(model, tx).lower(*state, *batch_args).compile()
    for _ in range(3):  # the host heap reaches its steady size
        state[0], state[1], loss = compiled(*state, *batch_args)
        loss.block_until_ready()

    kinds = categories(compiled.as_text())
    events, wall = profile(compiled, state, batch_args, args.steps)
    by_category: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for name, ns in events:
        if name in kinds:
            category, source = kinds[name]
            by_category[category] += ns / 1e6 / args.steps
            by_op[f"{source} ({category})"] += ns / 1e6 / args.steps
    total = sum(by_category.values())
    print(json.dumps({
        "bench": "op_profile", "variant": args.variant, "image_size": args.image_size,
        "batch": args.batch, "matmul_dtype": args.matmul_dtype, **cpu_description(),
        "wall_ms_per_step": round(wall * 1e3, 1), "op_ms_per_step": round(total, 1),
        "share_by_category": {k: round(v / total, 3)
                              for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": {op: round(ms, 1)
                       for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]},
    }))


if __name__ == "__main__":
    main()
