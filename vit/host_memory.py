"""Keep glibc malloc from handing XLA:CPU's per-step buffers back to the kernel.

XLA:CPU mallocs an executable's temporary buffers on every call: 2.1 GB for a Ti/4 training
step at batch 128. By default glibc serves blocks that large with mmap, or from per-thread
arenas whose heaps it unmaps once they are empty, so every step touches fresh pages: about
620,000 page faults and 1.1 s of kernel time per step on two cores, a quarter of the step.
One arena, no mmap and no trimming keep those pages mapped and reused: no faults.

The cost: a process keeps its peak heap until it exits, and that peak can hold two steps'
buffers when one is allocated before the other is freed. Arena settings only bind threads that
have not allocated yet, so `vit/__init__.py` calls this before anything else.

It applies only to a process that will compute on the CPU, decided before any backend starts
from what JAX itself will read: `JAX_PLATFORMS` when set (its first entry), else whether a GPU
or TPU plugin for jaxlib, or any other PJRT plugin JAX discovers, is installed (then JAX picks
the accelerator, whose memory XLA allocates itself, and the host heap is left alone).
`VIT_HOST_MALLOC=system` leaves malloc as it is everywhere; `VIT_HOST_MALLOC=retain` applies it
whatever the platform.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

ENV_VAR = "VIT_HOST_MALLOC"

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Each is (parameter, value); a trim threshold of -1 becomes SIZE_MAX inside glibc: never trim.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
MODES = ("auto", "retain", "system")
# jaxlib's accelerator plugins (and libtpu): with one installed, JAX's default is not the CPU.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu")


def computes_on_cpu() -> bool:
    """Whether this process's JAX will run on the CPU, read before any backend starts."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not (any(_installed(name) for name in ACCELERATOR_PLUGINS) or _pjrt_plugin_installed())


def _pjrt_plugin_installed() -> bool:
    """Whether any PJRT plugin JAX discovers is installed: a module of the `jax_plugins`
    namespace package, or a `jax_plugins` entry point (Intel's, Apple's, a vendor's own)."""
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and any(pkgutil.iter_modules(list(spec.submodule_search_locations or []))):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _glibc_mallopt() -> ctypes._CFuncPtr | None:
    """glibc's `mallopt`, or None on another C library or platform."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (present in glibc only; musl has no arenas)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def retain_host_memory() -> bool:
    """Make glibc malloc reuse freed memory (one arena, no mmap, no trim) in a CPU process;
    True if it applied. An unknown VIT_HOST_MALLOC is named on stderr and read as "auto"."""
    mode = os.environ.get(ENV_VAR, "auto")
    if mode not in MODES:  # at import time: one line, not a traceback out of `import vit`
        sys.stderr.write(f"warning: {ENV_VAR}={mode!r} is not one of {MODES}; using 'auto'\n")
        mode = "auto"
    if mode == "system" or (mode == "auto" and not computes_on_cpu()):
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # A list, not a generator inside all(): one refused setting must not skip the others.
    applied = [mallopt(param, value) == 1 for param, value in _SETTINGS]
    return all(applied)
