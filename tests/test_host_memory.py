"""Host allocator set-up: applied on import, opt-out, and a no-op without glibc.

The page faults it saves are a performance figure: bench/host_memory_faults.py measures them."""


import pytest

import vit
from vit import host_memory

glibc_only = pytest.mark.skipif(host_memory._glibc_mallopt() is None,
                                reason="mallopt settings exist only in glibc")


@glibc_only
def test_importing_vit_applies_the_allocator_settings_in_a_cpu_process():
    assert host_memory.computes_on_cpu()  # the test machine: no accelerator plugin
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


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", True), ("cuda", False), ("tpu", False), ("cuda,cpu", False), ("CPU,cuda", True),
])
def test_jax_platforms_decides_where_computation_runs(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.computes_on_cpu() is expected


def test_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_memory, "_installed", lambda name: name == "jax_cuda12_plugin")
    assert host_memory.computes_on_cpu() is False
    monkeypatch.setattr(host_memory, "_installed", lambda name: False)
    assert host_memory.computes_on_cpu() is True


def test_any_pjrt_plugin_in_the_jax_plugins_namespace_means_not_cpu(monkeypatch, tmp_path):
    """A vendor's plugin (e.g. Intel's jax_plugins.intel_extension_for_openxla) JAX would load."""
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(host_memory, "_installed", lambda name: False)
    assert host_memory.computes_on_cpu() is True
    (tmp_path / "jax_plugins" / "vendor_xpu").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "vendor_xpu" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert host_memory.computes_on_cpu() is False


@pytest.mark.parametrize("mode, platforms, applied", [
    ("auto", "cuda", False), ("auto", "cpu", True), ("retain", "cuda", True),
    ("system", "cpu", False),
])
def test_mode_and_platform_decide_whether_malloc_changes(monkeypatch, mode, platforms, applied):
    monkeypatch.setenv(host_memory.ENV_VAR, mode)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: mallopt)
    assert host_memory.retain_host_memory() is applied
    assert calls == (list(host_memory._SETTINGS) if applied else [])


def test_unknown_mode_is_one_warning_line_then_auto(monkeypatch, capsys):
    monkeypatch.setenv(host_memory.ENV_VAR, "keep")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: lambda param, value: 1)
    assert host_memory.retain_host_memory() is False  # auto on a GPU process: not applied
    assert capsys.readouterr().err == (
        "warning: VIT_HOST_MALLOC='keep' is not one of ('auto', 'retain', 'system'); "
        "using 'auto'\n")
