"""XLA's own float32 matmuls against a BLAS's `cblas_sgemm` called through a jax.ffi custom call.

A probe of the one lever the Intel Xeon left (README, *Against timm on the Intel Xeon*): every
float32 dense matmul of the model (vit/matmul.py) is routed to bench/ffi_gemm.cc, which g++
builds here against jaxlib's FFI headers, and its gradients to the same GEMM with transposed
operands (no transpose in memory). Both versions of B/16 inference (224 px, batch 16) and of the
Ti/4 train step (32 px, batch 128, AdamW) are compiled in one process and called in turn, round
after round; one JSON line gives each side's median images/s and the ratio (ffi / xla). The BLAS
is not a dependency of the package: pass its library (`--blas`, else `VIT_BLAS_LIB`), e.g. MKL's:
    python3.11 -m pip download --no-deps -d /tmp/mkl mkl==2026.2.1
    python3.11 -m zipfile -e /tmp/mkl/mkl-2026.2.1-*.whl /tmp/mkl
    python bench/ffi_gemm.py --blas /tmp/mkl/mkl-2026.2.1.data/data/lib/libmkl_rt.so.3
MKL runs on GNU OpenMP (`MKL_THREADING_LAYER=GNU`, passive waits, one thread per core), set here
before the library loads.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from machine import cpu_description
from model_throughput import make_train_step, step_inputs

import vit
from vit import attention
from vit import matmul as vit_matmul

SOURCE = Path(__file__).with_name("ffi_gemm.cc")
TARGET = "vit_bench_ffi_gemm"


def build_handler(out_dir: str) -> Path:
    """Compile bench/ffi_gemm.cc into a shared library in `out_dir`; RuntimeError with g++'s
    first error line if it fails."""
    out = Path(out_dir) / "ffi_gemm.so"
    command = ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
    try:
        run = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError("g++ is not installed: the FFI handler is built with it") from e
    if run.returncode:
        first = next((line for line in run.stderr.splitlines() if "error" in line), run.stderr)
        raise RuntimeError(f"g++ failed to build {SOURCE.name}: {first.strip()}")
    return out


def load(blas: str, handler: Path) -> None:
    """Load the BLAS (for its `cblas_sgemm`) into the process and register the handler."""
    if not Path(blas).is_file():
        raise RuntimeError(f"BLAS library {blas} does not exist: pass --blas PATH to a library "
                           "with cblas_sgemm, e.g. MKL's libmkl_rt.so.3")
    lib = ctypes.CDLL(blas, mode=ctypes.RTLD_GLOBAL)
    if not hasattr(lib, "cblas_sgemm"):
        raise RuntimeError(f"{blas} has no cblas_sgemm: pass a BLAS library, e.g. libmkl_rt")
    gemm_lib = ctypes.cdll.LoadLibrary(str(handler))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(gemm_lib.FfiGemm), platform="cpu")


def gemm(x: jax.Array, w: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """x @ w in float32 by the custom call, x read as [K, M] if trans_a, w as [N, K] if trans_b."""
    rows = x.shape[1] if trans_a else x.shape[0]
    cols = w.shape[0] if trans_b else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows, cols), jnp.float32))
    return call(x, w, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b))


@jax.custom_vjp
def ffi_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] through the custom call, with gradients through it too."""
    return gemm(x, w)


def _ffi_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return gemm(x, w), (x, w)


def _ffi_matmul_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    return gemm(g, w, trans_b=True), gemm(x, g, trans_a=True)


ffi_matmul.defvjp(_ffi_matmul_fwd, _ffi_matmul_bwd)


@contextlib.contextmanager
def routed_to_ffi() -> Iterator[None]:
    """Within: models built and traced send their float32 dense matmuls to the custom call."""
    xla_matmul = vit_matmul.matmul

    def matmul(x: jax.Array, w: jax.Array, matmul_dtype: str, out_dtype: object) -> jax.Array:
        if matmul_dtype != "float32" or jnp.dtype(out_dtype) != jnp.float32:
            return xla_matmul(x, w, matmul_dtype, out_dtype)
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return ffi_matmul(flat, w.astype(jnp.float32)).reshape(*x.shape[:-1], w.shape[-1])

    vit_matmul.matmul = attention.typed_matmul = matmul
    try:
        yield
    finally:
        vit_matmul.matmul = attention.typed_matmul = xla_matmul


def inference_call(batch: int) -> Callable[[], None]:
    """One compiled B/16 forward pass of `batch` images at 224 px, ready to time."""
    model = vit.create_model("B/16", num_classes=1000, image_size=224)
    params = vit.init_params(model, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, 224, 224, 3))
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
    return lambda: compiled(params, images).block_until_ready()


def train_call(batch: int) -> Callable[[], None]:
    """One compiled Ti/4 train step (`batch` images at 32 px, AdamW), ready to time."""
    options = argparse.Namespace(variant="Ti/4", image_size=32, batch=batch,
                                 matmul_dtype="float32", remat="none", rope="none")
    model, tx, params, opt_state, *batch = step_inputs(options)
    compiled = make_train_step(model, tx).lower(params, opt_state, *batch).compile()
    state = [params, opt_state]

    def run() -> None:
        state[0], state[1], loss = compiled(state[0], state[1], *batch)
        loss.block_until_ready()

    return run


WORKLOADS = {"infer": (inference_call, 16), "train": (train_call, 128)}  # builder, batch


def check_against_xla() -> float:
    """The largest relative difference of the custom call's product and gradients from XLA's on
    a small odd-shaped case; RuntimeError if it is not float32 rounding."""
    x, w = (jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
            enumerate([(37, 19), (19, 23)]))
    loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()
    ours = [ffi_matmul(x, w), *jax.grad(loss(ffi_matmul), (0, 1))(x, w)]
    xla = [x @ w, *jax.grad(loss(jnp.matmul), (0, 1))(x, w)]
    worst = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                for a, b in zip(ours, xla, strict=True))
    if worst > 1e-5:
        raise RuntimeError(f"the custom call's matmul differs from XLA's by {worst:.2g}")
    return worst


def measure(workloads: list[str], rounds: int, calls: int) -> dict[str, dict]:
    """Each workload's images/s with XLA's matmuls and with the custom call, in turn."""
    results = {}
    for name in workloads:
        build, batch = WORKLOADS[name]
        sides = {"xla": build(batch)}
        with routed_to_ffi():
            sides["ffi"] = build(batch)
        for run in sides.values():
            run()
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(rounds):
            for side, run in sides.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    run()
                    rates[side].append(batch / (time.perf_counter() - start))
        medians = {side: statistics.median(r) for side, r in rates.items()}
        results[name] = {"images_per_s": {s: round(m, 2) for s, m in medians.items()},
                         "ffi_over_xla": round(medians["ffi"] / medians["xla"], 3),
                         "runs": {s: [round(r, 2) for r in v] for s, v in rates.items()}}
    return results


def main() -> None:
    """Build, load, check, measure; print one JSON line (or one `error:` line, exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blas", default=os.environ.get("VIT_BLAS_LIB"),
                        help="a library with cblas_sgemm (else VIT_BLAS_LIB)")
    parser.add_argument("--what", default="infer,train", help="infer, train or both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per side per round")
    args = parser.parse_args()
    workloads = args.what.split(",")
    if not args.blas or any(w not in WORKLOADS for w in workloads):
        parser.exit(2, "error: pass --blas PATH (a library with cblas_sgemm, e.g. MKL's "
                       f"libmkl_rt.so.3) and --what among {', '.join(WORKLOADS)}\n")
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("MKL_NUM_THREADS", str(os.cpu_count()))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            load(args.blas, build_handler(scratch))
        worst = check_against_xla()
    except RuntimeError as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps({"bench": "ffi_gemm", "blas": args.blas, "rounds": args.rounds,
                      **cpu_description(), "max_relative_difference": worst,
                      **measure(workloads, args.rounds, args.calls)}))


if __name__ == "__main__":
    sys.exit(main())
