"""Dense and attention matmuls by a BLAS (MKL's) as jax.ffi custom calls, summed in float32.

This is `matmul_impl="blas"`. On the Intel Xeons measured here XLA:CPU's own GEMM runs at
0.82-0.85x of MKL's, which is most of what separated this toolkit from PyTorch there (README,
*Speed on CPU: MKL matmuls*). The handler, vit/blas_gemm.cc, is compiled with g++ against
jaxlib's FFI headers the first time a model asks for it, and kept in the cache directory
(`VIT_CACHE_DIR`, else `$XDG_CACHE_HOME/vit`, else `~/.cache/vit`) under a name that hashes the
source and jaxlib's version. The BLAS is MKL's `libmkl_rt` from the `mkl` wheel
(`pip install "vit[mkl]"`; `make setup` adds it on Intel CPUs), or any library with
`cblas_sgemm` that `VIT_BLAS_LIB` names. Float32 operands go to `cblas_sgemm`, bfloat16 ones to
`cblas_gemm_bf16bf16f32` (MKL; OpenBLAS calls it `cblas_sbgemm`), which runs on the AMX tiles
of the CPUs that have them: 3.5-4.6x sgemm per core on the Xeon measured here. It runs
single-threaded (MKL's sequential layer); the handler cuts each product into one slab per
thread of XLA's own pool. The element-wise work is compiled for this CPU's widest vectors
(`handler_isa`; `VIT_BLAS_ISA` picks a narrower one). The library's LayerNorm and GELU calls
need no BLAS (`handler_unavailable_reason`): they also serve XLA's matmuls (vit/elementwise.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCES = tuple(Path(__file__).with_name(name)  # compiled together into one library
                for name in ("blas_gemm.cc", "blas_attention.cc", "blas_layer_norm.cc",
                             "blas_gelu.cc", "blas_kernels.h", "blas_lanes.h"))
TARGET = "vit_blas_gemm"
BATCHED_TARGET = "vit_blas_batched_gemm"
ATTENTION_TARGET = "vit_blas_attention"
ATTENTION_GRAD_TARGET = "vit_blas_attention_grad"
LAYER_NORM_TARGET = "vit_layer_norm"
LAYER_NORM_GRAD_TARGET = "vit_layer_norm_grad"
BIAS_GELU_TARGET = "vit_bias_gelu"
BIAS_GELU_GRAD_TARGET = "vit_bias_gelu_grad"
CHUNK_ROWS = 128  # vit/blas_kernels.h's kChunkRows: rows per partial sum of a column gradient
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # the element-wise calls' dtypes
MKL_THREADING_SEQUENTIAL = 1  # mkl_service.h's MKL_THREADING_SEQUENTIAL
BF16_GEMMS = ("cblas_gemm_bf16bf16f32", "cblas_sbgemm")  # MKL's name, OpenBLAS's
# The ISAs the handler compiles for, widest first: g++'s flags (-mavx512f brings FMA) and the
# /proc/cpuinfo flags each needs.
ISA_FLAGS = {"avx512": ["-mavx512f"], "avx2": ["-mavx2", "-mfma"], "baseline": []}
ISA_NEEDS = {"avx512": {"avx512f"}, "avx2": {"avx2", "fma"}, "baseline": set()}

Array = jax.Array


def cache_dir() -> Path:
    """Where the compiled handler is kept: VIT_CACHE_DIR, else XDG_CACHE_HOME/vit, else
    ~/.cache/vit."""
    if os.environ.get("VIT_CACHE_DIR"):
        return Path(os.environ["VIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vit"


def blas_library() -> Path | None:
    """The BLAS to load: VIT_BLAS_LIB if set, else MKL's libmkl_rt in this environment's lib/
    (where the `mkl` wheel puts it); None if neither."""
    if os.environ.get("VIT_BLAS_LIB"):
        return Path(os.environ["VIT_BLAS_LIB"])
    found = sorted(Path(sys.prefix, "lib").glob("libmkl_rt.so*"))
    return found[0] if found else None


def build_handler() -> Path:
    """The handler's shared library, compiled into `cache_dir()` unless already there (then
    replacing the builds of other sources or jaxlibs); RuntimeError naming the fix (or g++'s
    first error) if it cannot be built."""
    source = b"".join(path.read_bytes() for path in SOURCES)
    isa = handler_isa()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + isa.encode()).hexdigest()[:16]
    out = cache_dir() / f"blas_gemm-{key}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name, then renamed: concurrent processes never load half a file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=out.parent)
    except OSError as e:
        raise RuntimeError(f"cannot write the custom-call handler (vit/blas_gemm.py) to "
                           f"{out.parent} ({e.strerror}): set VIT_CACHE_DIR to a writable "
                           "directory") from None
    os.close(fd)
    compiled = [path for path in SOURCES if path.suffix == ".cc"]  # the rest are headers
    flags = ["-O3", *ISA_FLAGS[isa], "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}"]
    try:
        with tempfile.TemporaryDirectory(dir=out.parent) as objects:
            built = [str(Path(objects, f"{path.stem}.o")) for path in compiled]
            error = _gxx([["g++", *flags, "-c", str(path), "-o", obj]
                          for path, obj in zip(compiled, built, strict=True)])
            error = error or _gxx([["g++", "-shared", *built, "-o", partial]])
    except FileNotFoundError:
        os.unlink(partial)
        raise RuntimeError("g++ is not installed: install it (e.g. apt-get install g++) to "
                           "build the custom-call handler (vit/blas_gemm.py)") from None
    if error:
        os.unlink(partial)
        first = next((line for line in error.splitlines() if "error" in line), error)
        raise RuntimeError(f"g++ failed to build {', '.join(p.name for p in compiled)}: "
                           f"{first.strip()}")
    os.replace(partial, out)
    for stale in out.parent.glob("blas_gemm-*.so"):  # other sources', jaxlibs' or ISAs' builds
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def handler_isa() -> str:
    """The ISA the handler is compiled for (a key of ISA_FLAGS): `VIT_BLAS_ISA` where set, else
    the widest this CPU has; RuntimeError in one line for a name it does not know or an ISA the
    CPU lacks."""
    flags = cpu_flags()
    forced = os.environ.get("VIT_BLAS_ISA", "")
    if not forced:
        return next(isa for isa, needs in ISA_NEEDS.items() if needs <= flags)
    if forced not in ISA_FLAGS:
        raise RuntimeError(f"VIT_BLAS_ISA={forced!r} is not one of {', '.join(ISA_FLAGS)}: "
                           "set one of them, or unset it for this CPU's widest")
    missing = ISA_NEEDS[forced] - flags
    if missing:
        raise RuntimeError(f"VIT_BLAS_ISA={forced} needs {', '.join(sorted(missing))}, which this "
                           "CPU lacks: set a narrower one, or unset it")
    return forced


def _gxx(commands: list[list[str]]) -> str:
    """Runs the g++ `commands` side by side (one per source: the build takes the longest one's
    time); the first failure's error output, or "" if all succeed."""
    jobs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for command in commands]
    errors = [job.communicate()[1] for job in jobs]  # read to the end: a full pipe stalls g++
    return next((error or "g++ failed" for error, job in zip(errors, jobs, strict=True)
                 if job.returncode), "")


def _single_threaded(lib: ctypes.CDLL) -> None:
    """Make the BLAS compute on the calling thread only: the handler brings the parallelism."""
    if hasattr(lib, "MKL_Set_Threading_Layer"):
        layer = lib.MKL_Set_Threading_Layer(MKL_THREADING_SEQUENTIAL)
        if layer != MKL_THREADING_SEQUENTIAL:
            raise RuntimeError(f"MKL already runs threaded in this process (layer {layer}): "
                               "set MKL_THREADING_LAYER=SEQUENTIAL before starting it")
    elif hasattr(lib, "openblas_set_num_threads"):
        lib.openblas_set_num_threads(1)


# The registry: the handler once built and registered, and every BLAS it was pointed at (kept
# loaded for as long as compiled code may call into it; the last is the one in use).
_handler: list[ctypes.CDLL] = []
_libraries: list[ctypes.CDLL] = []


def _bf16_gemm(lib: ctypes.CDLL) -> Any:
    """`lib`'s bfloat16 GEMM (one of BF16_GEMMS), or None."""
    return next((getattr(lib, name) for name in BF16_GEMMS if hasattr(lib, name)), None)


def _registered_handler() -> ctypes.CDLL:
    """The handler library, built and its custom calls registered on first use; RuntimeError
    naming the fix if it cannot be built. Its GEMM calls need a BLAS (`load`) before they run;
    the LayerNorm and GELU calls need none."""
    if not _handler:
        handler = ctypes.CDLL(str(build_handler()))
        for target, function in ((TARGET, handler.VitBlasGemm),
                                 (BATCHED_TARGET, handler.VitBlasBatchedGemm),
                                 (ATTENTION_TARGET, handler.VitBlasAttention),
                                 (ATTENTION_GRAD_TARGET, handler.VitBlasAttentionGrad),
                                 (LAYER_NORM_TARGET, handler.VitLayerNorm),
                                 (LAYER_NORM_GRAD_TARGET, handler.VitLayerNormGrad),
                                 (BIAS_GELU_TARGET, handler.VitBiasGelu),
                                 (BIAS_GELU_GRAD_TARGET, handler.VitBiasGeluGrad)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(function), platform="cpu")
        _handler.append(handler)
    return _handler[0]


@functools.cache
def handler_unavailable_reason() -> str | None:
    """None once the handler is built and registered, without a BLAS (what the LayerNorm and
    GELU calls need); else why it cannot be, in one line that names the fix."""
    try:
        _registered_handler()
    except RuntimeError as e:
        return str(e)
    return None


def load(library: Path) -> None:
    """Point the custom call at `library`'s cblas_sgemm (and its bfloat16 GEMM, if it has one),
    building and registering the handler on first use; RuntimeError in one line naming the
    fix."""
    if not library.is_file():
        raise RuntimeError(f"BLAS library {library} does not exist: set VIT_BLAS_LIB to a "
                           "library with cblas_sgemm, or pip install 'vit[mkl]'")
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as e:
        raise RuntimeError(f"cannot load BLAS library {library} ({e}): set VIT_BLAS_LIB to a "
                           "library with cblas_sgemm") from None
    if not hasattr(lib, "cblas_sgemm"):
        raise RuntimeError(f"{library} has no cblas_sgemm: set VIT_BLAS_LIB to a BLAS such as "
                           "MKL's libmkl_rt")
    _single_threaded(lib)
    handler = _registered_handler()
    bf16_gemm = _bf16_gemm(lib)
    handler.VitBlasGemmUse(ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p),
                           None if bf16_gemm is None else ctypes.cast(bf16_gemm, ctypes.c_void_p))
    _libraries.append(lib)


@functools.cache
def unavailable_reason() -> str | None:
    """None once the BLAS (`blas_library()`) is loaded and the handler registered, done once per
    process; else why it cannot be, in one line that names the fix."""
    library = blas_library()
    if library is None:
        return ("no BLAS found: pip install 'vit[mkl]' (MKL, x86-64 Linux), or set VIT_BLAS_LIB "
                "to a library with cblas_sgemm")
    try:
        load(library)
    except RuntimeError as e:
        return str(e)
    return None


def bf16_unavailable_reason() -> str | None:
    """None if the BLAS is loaded and multiplies bfloat16 operands; else why not, in one line."""
    reason = unavailable_reason()
    if reason is None and _bf16_gemm(_libraries[-1]) is None:
        reason = (f"the BLAS loaded has none of {', '.join(BF16_GEMMS)}: use MKL "
                  "(pip install 'vit[mkl]')")
    return reason


def unavailable_reason_for(bf16: bool) -> str | None:
    """`bf16_unavailable_reason()` for bfloat16 operands (`bf16`), else `unavailable_reason()`."""
    return bf16_unavailable_reason() if bf16 else unavailable_reason()


def _call(target: str, shape: tuple[int, ...], x: Array, w: Array, trans_a: bool,
          trans_b: bool) -> Array:
    """The custom call `target` on x, w, returning a float32 array of `shape`."""
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    return call(x, w, trans_a=bool(trans_a), trans_b=bool(trans_b))


def gemm(x: Array, w: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """x @ w in float32 by the BLAS, x [M, K] (read as [K, M] if trans_a), w [K, N] ([N, K] if
    trans_b), both float32 or both bfloat16; the BLAS must be loaded (`unavailable_reason()`,
    for bfloat16 `bf16_unavailable_reason()`, is None)."""
    rows = x.shape[1] if trans_a else x.shape[0]
    cols = w.shape[0] if trans_b else w.shape[1]
    return _call(TARGET, (rows, cols), x, w, trans_a, trans_b)


def _matrix_shape(x: Array) -> tuple[int, int]:
    """The [rows, cols] of each matrix of a batched operand: [G, R, C] or [B, R, H, C]."""
    return (x.shape[1], x.shape[-1])


def batched_gemm(x: Array, w: Array, trans_a: bool = False, trans_b: bool = False, *,
                 heads_out: bool = False) -> Array:
    """`gemm` for each matrix of a batch, in float32. An operand is [G, R, C] (G matrices) or
    [B, R, H, C] (B * H matrices read in place: attention's q, k, v with the heads in the
    middle); x's read as [K, M] if trans_a, w's as [N, K] if trans_b. The product is [G, M, N],
    or with `heads_out` [B, M, H, N], B and H those of the 4-D operand."""
    rows = _matrix_shape(x)[1 if trans_a else 0]
    cols = _matrix_shape(w)[0 if trans_b else 1]
    if heads_out:
        b, _, h, _ = next(a.shape for a in (x, w) if a.ndim == 4)
        shape = (b, rows, h, cols)
    else:
        shape = (x.shape[0] * (x.shape[2] if x.ndim == 4 else 1), rows, cols)
    return _call(BATCHED_TARGET, shape, x, w, trans_a, trans_b)


def attention(q: Array, k: Array, v: Array, *, heads: int, head_dim: int, scale: float,
              columns: tuple[int, int, int] = (0, 0, 0), bias: Array | None = None,
              with_weights: bool = False) -> Array | tuple[Array, Array]:
    """Softmax attention's forward pass in one call (vit/blas_attention.cc): q [B, Tq, Cq], k and
    v [B, Tk, Ck or Cv], head h's `head_dim` features at columns[i] + h * head_dim of each; the
    fused q/k/v projection's [B, T, 3 * width] is passed as q, k and v with columns (0, width,
    2 * width) and its `bias` [3 * width] added inside (q * scale and the sum rounded to q's
    dtype as XLA rounds them). The output is [B, Tq, heads, head_dim] in q's dtype (float32 or
    bfloat16); `with_weights` returns the float32 weights [B, heads, Tq, Tk] beside it, for
    `attention_grad`. No gradient of its own."""
    batch, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    weights_shape = (batch, heads, tq, tk) if with_weights else (0,)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, (
        jax.ShapeDtypeStruct((batch, tq, heads, head_dim), q.dtype),
        jax.ShapeDtypeStruct(weights_shape, jnp.float32)), vmap_method="sequential")
    bias = jnp.zeros((0,), q.dtype) if bias is None else bias.astype(q.dtype)
    y, weights = call(q, k, v, bias, heads=np.int64(heads), head_dim=np.int64(head_dim),
                      q_col=np.int64(columns[0]), k_col=np.int64(columns[1]),
                      v_col=np.int64(columns[2]), scale=np.float32(scale))
    return (y, weights) if with_weights else y


def attention_grad(qkv: Array, bias: Array, dy: Array, weights: Array, *, heads: int,
                   head_dim: int, scale: float) -> Array:
    """The gradient [B, T, 3 * width] of self-attention's fused q/k/v projection `qkv` [B, T,
    3 * width] (q, k, v side by side, `bias` [3 * width] added as `attention` adds it) from the
    output's gradient dy [B, T, heads, head_dim] and `attention`'s float32 `weights`, in one call
    (vit/blas_attention.cc), in qkv's dtype: vit/attention.py's `_attend_bwd`."""
    call = jax.ffi.ffi_call(ATTENTION_GRAD_TARGET, jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                            vmap_method="sequential")
    return call(qkv, bias.astype(qkv.dtype), dy.astype(qkv.dtype), weights,
                heads=np.int64(heads), head_dim=np.int64(head_dim), scale=np.float32(scale))


def partial_sums(x: Array) -> jax.ShapeDtypeStruct:
    """The float32 [ceil(rows / CHUNK_ROWS), C] partial column sums that a row-wise call's
    gradient (LayerNorm's, the GELU's) returns for x [..., C]; the caller adds them."""
    chunks = -(-int(np.prod(x.shape[:-1])) // CHUNK_ROWS)
    return jax.ShapeDtypeStruct((chunks, x.shape[-1]), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def blas_matmul(x: Array, w: Array, operand_dtype: Any = jnp.float32) -> Array:
    """x [M, K] @ w [K, N] into float32 by the BLAS on operands rounded to `operand_dtype`
    (float32 or bfloat16), and both gradients by it too, in x's and w's dtypes."""
    return gemm(x.astype(operand_dtype), w.astype(operand_dtype))


def _blas_matmul_fwd(x: Array, w: Array, operand_dtype: Any) -> tuple[Array, tuple[Array, ...]]:
    xo, wo = x.astype(operand_dtype), w.astype(operand_dtype)
    # Empty arrays carry the inputs' dtypes: residuals must be arrays.
    return gemm(xo, wo), (xo, wo, jnp.zeros(0, x.dtype), jnp.zeros(0, w.dtype))


def _blas_matmul_bwd(operand_dtype: Any, res: tuple[Array, ...],
                     g: Array) -> tuple[Array, Array]:
    xo, wo, x_like, w_like = res  # the gradients read an operand transposed in place
    go = g.astype(operand_dtype)
    return (gemm(go, wo, trans_b=True).astype(x_like.dtype),
            gemm(xo, go, trans_a=True).astype(w_like.dtype))


blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)


@functools.cache
def _cpuinfo_field(name: str) -> str:
    """The first value of field `name` in /proc/cpuinfo; "" if there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """This CPU's vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...); "" if
    unknown."""
    return _cpuinfo_field("vendor_id")


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo ("avx512f", "amx_bf16", ...); empty if
    unknown."""
    return frozenset(_cpuinfo_field("flags").split())
