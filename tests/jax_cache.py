"""A persistent XLA compilation cache shared by the test processes and the runs they start.

The suite starts train.py and the `vit` command dozens of times on the same tiny configs; each
start compiled the same programs again (about half of a smoke run's 18 s). JAX keys an entry by
the program, the compile options, the devices and the JAX version, so a hit runs the executable
the compiler would have built. The finite size turns on JAX's file lock, so the two pytest workers
and their subprocesses never read an entry while another writes it.
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


def enable() -> None:
    """Sets the cache variables in this process's environment (before JAX is imported)."""
    for key, value in CACHE_ENV.items():
        os.environ.setdefault(key, value)
