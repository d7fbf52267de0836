"""The JAX settings of the test processes and of the runs they start: a persistent compilation
cache they share, and XLA's fastest-compiling backend optimisation level.

The suite starts train.py and the `vit` command dozens of times on the same tiny configs; each
start compiled the same programs again (about half of a smoke run's 18 s). JAX keys an entry by
the program, the compile options, the devices and the JAX version, so a hit runs the executable
the compiler would have built. The finite size turns on JAX's file lock, so the two pytest workers
and their subprocesses never read an entry while another writes it.

The programs the cache cannot save, the first compile of each, are most of a cold suite's
extra time: LLVM at level 0 compiles them in about half the time (a smoke run's programs in
4.0-4.8 s against 8.0-8.5 s), and on tiny models the slower code costs less than that. Every
process of the suite must use the same level, or a resumed run and its uninterrupted reference
would round differently: subprocesses take `subprocess_env()`.
"""

from __future__ import annotations

import os
import tempfile

CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "vit-tests-jax-cache"),
    # The big programs, not eager ops: with a maximum size, each write lists the whole cache
    # and reads every entry's access time (JAX's LRU eviction), so keeping the thousands of
    # eager ops too (threshold 0) made the suite slower, not faster.
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.3",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30),
}
FAST_COMPILE = "--xla_backend_optimization_level=0"


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a run a test starts: this one without its JAX_* variables, plus the
    shared cache, the CPU platform, XLA_FLAGS of the suite's optimisation level (and `devices`
    CPU devices when given) and `extra`."""
    count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(CACHE_ENV, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*count, FAST_COMPILE]))
    env.update(extra)
    return env


def enable() -> None:
    """Sets the cache variables and the optimisation level in this process's environment
    (before JAX is imported); an XLA_FLAGS already set is kept, with the level added."""
    for key, value in CACHE_ENV.items():
        os.environ.setdefault(key, value)
    given = os.environ.get("XLA_FLAGS", "")
    if FAST_COMPILE not in given:
        os.environ["XLA_FLAGS"] = f"{given} {FAST_COMPILE}".strip()
