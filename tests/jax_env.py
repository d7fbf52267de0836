"""The JAX settings of the test processes and of the runs they start: a persistent compilation
cache they share, and XLA settings that compile fastest.

The suite starts train.py and the `vit` command dozens of times on the same tiny configs; each
start compiled the same programs again (about half of a smoke run's 18 s). JAX keys an entry by
the program, the compile options, the devices and the JAX version, so a hit runs the executable
the compiler would have built. The finite size turns on JAX's file lock, so the two pytest workers
and their subprocesses never read an entry while another writes it.

The programs the cache cannot save, the first compile of each, are most of a cold suite's
extra time: LLVM at level 0 compiles them in about half the time (a smoke run's programs in
4.0-4.8 s against 8.0-8.5 s), and XLA's older loop emitters for the element-wise fusions (instead
of its MLIR fusion emitters) about a third faster again, and small programs twice as fast (an
eager op: 16 ms against 35 ms); on tiny models the slower code costs less than that. Every
process of the suite must use the same settings, or a resumed run and its uninterrupted reference
would round differently: subprocesses take `subprocess_env()`.

The loop emitters round one element-wise formula differently in different fusions, so two
programs that compute the same values (a step with and without remat, on uint8 or on float
inputs) agree to the last bit only under the default emitters. The tests that compare such
programs bit for bit are marked `fusion_emitters` and run in a child pytest with the default
emitters (tests/conftest.py), as does what they start.
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
LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
FUSION_EMITTERS_VAR = "VIT_TESTS_FUSION_EMITTERS"  # "1": XLA's default fusion emitters


def fusion_emitters_on() -> bool:
    """Whether this process compiles with XLA's default fusion emitters (a marked test's child)."""
    return os.environ.get(FUSION_EMITTERS_VAR) == "1"


def _compile_flags(fusion_emitters: bool) -> list[str]:
    return [FAST_COMPILE] if fusion_emitters else [FAST_COMPILE, LOOP_EMITTERS]


def subprocess_env(devices: int | None = None, fusion_emitters: bool | None = None,
                   **extra: str) -> dict[str, str]:
    """The environment of a run a test starts: this one without its JAX_* variables, plus the
    shared cache, the CPU platform, XLA_FLAGS of the suite's compile settings (and `devices`
    CPU devices when given) and `extra`; `fusion_emitters` None keeps this process's emitters."""
    if fusion_emitters is None:
        fusion_emitters = fusion_emitters_on()
    count = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(CACHE_ENV, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([*count, *_compile_flags(fusion_emitters)]))
    env[FUSION_EMITTERS_VAR] = "1" if fusion_emitters else "0"
    env.update(extra)
    return env


def enable() -> None:
    """Sets the cache variables and the compile settings in this process's environment
    (before JAX is imported); an XLA_FLAGS already set is kept, with the settings added."""
    for key, value in CACHE_ENV.items():
        os.environ.setdefault(key, value)
    given = os.environ.get("XLA_FLAGS", "").split()
    wanted = _compile_flags(fusion_emitters_on())
    os.environ["XLA_FLAGS"] = " ".join([*given, *(f for f in wanted if f not in given)])
