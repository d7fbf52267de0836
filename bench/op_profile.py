"""Per-op profile of a training step: where a step's time goes; one JSON line.

Traces `--steps` calls of bench/model_throughput.py's step with the JAX profiler, reads the
trace back (`jax.profiler.ProfileData`), and matches every op event to its instruction in the
compiled HLO by the event's `hlo_op` (XLA:CPU's thunks on the host, or a GPU's kernels on its
device plane). Each instruction gets a category: `dense matmul` and `attention matmul` (dots,
fusions around a dot, cuBLAS calls and the BLAS custom calls of `matmul_impl="blas"`, without
and with batch dimensions; the BLAS's work runs as tasks on XLA's pool after its call returns,
so the trace undercounts it), `attention kernel` (cuDNN's fused attention, the BLAS's fused
attention forward and gradient), `convolution` (the
patch embedding, conv stems), `layout copy`
(transposes and copies), `elementwise` (every other fusion: norms, GELU, softmax, bias,
residuals), split into forward, backward (`transpose(jvp(...))` in the op name) and
`optimizer`. Times are summed event durations per step; ops that run side by side both count,
so the shares are of the summed time, and the wall time per step is reported beside it.
bench/train_mfu.py `--profile` runs the same on a config's real step on any device.
Run: `python bench/op_profile.py [--variant Ti/4] [--batch 128] [--matmul-dtype float32]`.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
from machine import cpu_description
from model_throughput import add_step_arguments, make_train_step, step_inputs

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\([^)]*\)|\S+) ([\w-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", re.M | re.S)


def _kind(opcode: str, name: str, rest: str, body: str) -> str:
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    target = target.group(1) if target else ""
    if "fmha" in target or "flash" in target or "attention" in target:
        return "attention kernel"
    if opcode == "dot" or " dot(" in body or "gemm" in target or "matmul" in target:
        batched = ("lhs_batch_dims" in (body or rest) or "batched" in target
                   or re.search(r'"lhs_batch_dimensions":\["', rest) is not None)
        return "attention matmul" if batched else "dense matmul"
    if opcode == "convolution" or " convolution(" in body or "$conv" in target:
        return "convolution"
    if opcode in ("copy", "transpose") or name.startswith(("transpose", "copy")):
        return "layout copy"
    return "elementwise"


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
        where = ("backward" if "transpose(jvp" in op_name else
                 "forward" if "jvp(" in op_name else "optimizer")
        source = re.sub(r"^(jit|pmap)\([^)]*\)/|(transpose\()?jvp\(|\)", "", op_name)
        result[name] = (f"{where} {_kind(opcode, name, rest, body)}",
                        re.sub(r"_\d+/", "_*/", source, count=1))
    return result


def op_events(data: jax.profiler.ProfileData) -> list[tuple[str, float]]:
    """[(HLO instruction or kernel name, ns)] of every op event in a trace: a device's kernels
    (its "Stream" lines, not the profiler's derived op lines) where the trace has a device
    plane, as a GPU's does, else XLA:CPU's thunks on the host."""
    found = []
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = [line for line in plane.lines if line.name.startswith("Stream")]
        for line in lines or plane.lines:
            for event in line.events:
                found.append((str(dict(event.stats).get("hlo_op", event.name)),
                              event.duration_ns))
    if found:
        return found
    return [(str(stats["hlo_op"]), event.duration_ns) for plane in data.planes
            for line in plane.lines for event in line.events
            if "hlo_op" in (stats := dict(event.stats))]


def traced(run: Callable[[], None], steps: int, trace_dir: str | None = None
           ) -> tuple[list[tuple[str, float]], float]:
    """The op events of `steps` calls of `run` (which waits for its step), and the wall
    seconds per step; the trace stays in `trace_dir` when one is given."""
    with tempfile.TemporaryDirectory() as scratch:
        where = trace_dir or scratch
        jax.profiler.start_trace(where)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        trace = max(Path(where).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
        return op_events(jax.profiler.ProfileData.from_file(str(trace))), wall


def profile(compiled, state: list, batch_args: tuple, steps: int) -> tuple[list, float]:
    """Every traced op event [(name, ns)] over `steps` calls of bench/model_throughput.py's
    compiled step, and the wall seconds per step."""
    def run() -> None:
        state[0], state[1], loss = compiled(state[0], state[1], *batch_args)
        loss.block_until_ready()

    return traced(run, steps)


def summary(events: list[tuple[str, float]], kinds: dict[str, tuple[str, str]], steps: int,
            wall_s: float, top: int = 15) -> dict:
    """Per-step op time by category and the top ops, as the JSON line reports them; events
    that match no instruction (a kernel the trace does not tie to its op) are listed apart."""
    by_category: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    unmatched: dict[str, float] = collections.defaultdict(float)
    for name, ns in events:
        ms = ns / 1e6 / steps
        if name in kinds:
            category, source = kinds[name]
            by_category[category] += ms
            by_op[f"{source} ({category})"] += ms
        else:
            unmatched[name] += ms
    total = sum(by_category.values())
    ranked = lambda d: sorted(d.items(), key=lambda kv: -kv[1])
    return {
        "wall_ms_per_step": round(wall_s * 1e3, 1), "op_ms_per_step": round(total, 1),
        "share_by_category": {k: round(v / total, 3) for k, v in ranked(by_category)} if total
        else {},
        "top_ops_ms": {op: round(ms, 2) for op, ms in ranked(by_op)[:top]},
        "unmatched_ms_per_step": round(sum(unmatched.values()), 1),
        "top_unmatched_ms": {name[:120]: round(ms, 2) for name, ms in ranked(unmatched)[:top]
                             if ms >= 0.005},
    }


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
    result = summary(events, kinds, args.steps, wall, args.top)
    result.pop("top_unmatched_ms")
    print(json.dumps({
        "bench": "op_profile", "variant": args.variant, "image_size": args.image_size,
        "batch": args.batch, "matmul_dtype": args.matmul_dtype, **cpu_description(), **result}))


if __name__ == "__main__":
    main()
