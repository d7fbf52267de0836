"""Host allocator set-up: applied on import, opt-out, and a no-op without glibc.

The page faults it saves are a performance figure: bench/host_memory_faults.py measures them."""


import pytest

import vit
from vit import host_memory

glibc_only = pytest.mark.skipif(host_memory._glibc_mallopt() is None,
                                reason="mallopt settings exist only in glibc")


@glibc_only
def test_importing_vit_applies_the_allocator_settings():
    assert vit.HOST_MEMORY_RETAINED is True


# The page faults this saves are measured by bench/host_memory_faults.py, not asserted here.


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
