"""Host allocator set-up: freed XLA:CPU buffers are reused instead of page-faulted in again."""

import json
import os
import subprocess
import sys

import pytest

import vit
from vit import host_memory

# Runs a jitted function whose 32 MB temporaries are malloc'd and freed on every call, and
# prints the minor page faults of the calls after warm-up. The retained heap grows for up to
# about 20 calls (a call's buffers are sometimes allocated before the last call's are freed),
# hence the long warm-up. `import vit` comes first, as in any
# program that uses the library.
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

glibc_only = pytest.mark.skipif(host_memory._glibc_mallopt() is None,
                                reason="mallopt settings exist only in glibc")


def _probe(mode: str) -> dict:
    env = {**os.environ, host_memory.ENV_VAR: mode}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_importing_vit_applies_the_allocator_settings():
    assert vit.HOST_MEMORY_RETAINED is True


@glibc_only
def test_retained_memory_removes_per_call_page_faults():
    retained, system = _probe("retain"), _probe("system")
    assert retained["retained"] is True and system["retained"] is False
    # 40 calls with 2 x 16 MB of fresh temporaries each: glibc's default mmaps them anew,
    # 8192 faults of 4 KiB pages a call; once the retained heap has grown, it needs none.
    assert system["faults"] > 40 * 4096
    assert retained["faults"] < system["faults"] / 10


def test_opting_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "system")
    calls = []
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: calls.append(1))
    assert host_memory.retain_host_memory() is False
    assert calls == []


def test_without_glibc_it_reports_not_applied(monkeypatch):
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: None)
    assert host_memory.retain_host_memory() is False
