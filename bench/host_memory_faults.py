"""Page faults of a jitted call whose temporaries are freed each time: prints ONE JSON line.

    .venv/bin/python bench/host_memory_faults.py

Runs the same probe in two subprocesses, with the retained host memory of vit/host_memory.py
(the default) and with glibc's own settings (VIT_HOST_MALLOC=system): 40 warm-up calls, then the
minor page faults of 40 more. Each call mallocs and frees 2 x 16 MB of temporaries; glibc's
default maps them afresh every time (about 8,192 faults of 4 KiB pages a call), while the
retained heap needs none once it has grown. This was an assertion of tests/test_host_memory.py
until it moved here: a performance figure, not a unit test.
"""

import argparse
import json
import os
import subprocess
import sys

from vit import host_memory

# `import vit` comes first, as in any program that uses the library.
_PROBE = """
import json, resource
import vit
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())
x = jnp.ones((2048, 2048))
for _ in range(40):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    f(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"retained": vit.HOST_MEMORY_RETAINED, "faults": faults}))
"""


def probe(mode: str) -> dict:
    """{"retained": bool, "faults": int} of the probe run with VIT_HOST_MALLOC=`mode`."""
    env = {**os.environ, host_memory.ENV_VAR: mode}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Print the minor page faults per call in both modes."""
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help
    retained, system = probe("retain"), probe("system")
    print(json.dumps({
        "calls": 40, "retained_applied": retained["retained"],
        "faults_per_call_retained": retained["faults"] / 40,
        "faults_per_call_system": system["faults"] / 40}))


if __name__ == "__main__":
    main()
