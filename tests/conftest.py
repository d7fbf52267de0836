"""Session-wide test settings: the shared compilation cache and the fast-compiling XLA settings
(tests/jax_env.py); tests marked `fusion_emitters` run in a child pytest with XLA's default
fusion emitters."""

import subprocess
import sys

import jax_env
import plain_blas as plain_blas_module
import pytest

jax_env.enable()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "fusion_emitters: compares two programs bit for bit, which holds under XLA's "
        "default fusion emitters (not the suite's loop emitters): runs in a child pytest")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A marked test runs in a child pytest compiling with the default emitters."""
    if pyfuncitem.get_closest_marker("fusion_emitters") is None or jax_env.fusion_emitters_on():
        return None
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath,  # where node ids are relative to
        env=jax_env.subprocess_env(fusion_emitters=True), capture_output=True, text=True)
    if child.returncode != 0:
        pytest.fail("in a child pytest with XLA's default fusion emitters:\n"
                    + child.stdout[-6000:] + child.stderr[-2000:], pytrace=False)
    return True


@pytest.fixture(scope="module")
def plain_blas(tmp_path_factory):
    """matmul_impl="blas" computing with a plain C sgemm for a test file (tests/plain_blas.py),
    then with this process's own BLAS again."""
    own = plain_blas_module.point_at_plain_blas(tmp_path_factory.mktemp("blas"))
    yield
    plain_blas_module.restore_own_blas(own)
