"""Tests for vit.parallel: run in subprocesses that fake 4 CPU devices (or two hosts of 2)."""

import socket
import subprocess
import sys
import textwrap

import jax_env
import pytest

from vit import parallel

TIMEOUT = 180

FOUR_DEVICES = textwrap.dedent("""
    import jax, numpy as np, pytest
    from vit import parallel
    assert jax.local_device_count() == 4

    tree = {"w": np.arange(6.0).reshape(2, 3), "step": np.int32(7)}
    rep = parallel.replicate(tree)
    assert rep["w"].shape == (4, 2, 3) and rep["step"].shape == (4,)
    assert len(rep["w"].addressable_shards) == 4
    assert {sh.device for sh in rep["w"].addressable_shards} == set(jax.local_devices())
    for sh in rep["w"].addressable_shards:  # every device holds the whole value, once
        assert sh.data.shape == (1, 2, 3)
        np.testing.assert_array_equal(np.asarray(sh.data)[0], tree["w"])
    back = parallel.unreplicate(rep)
    assert isinstance(back["w"], np.ndarray)
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["step"] == 7 and back["step"].dtype == np.int32

    batch = {"image": np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3),
             "label": np.arange(8).reshape(4, 2)}
    sharded = parallel.shard(batch)
    assert sharded["image"].shape == (4, 2, 3)
    rows = [s.data.shape for s in sharded["image"].addressable_shards]
    assert rows == [(1, 2, 3)] * 4
    total = jax.pmap(lambda x: jax.lax.psum(x.sum(), parallel.AXIS),
                     axis_name=parallel.AXIS)(sharded["label"])
    assert total.tolist() == [28] * 4
    with pytest.raises(parallel.ParallelError, match=r"leading axis must equal .* 4"):
        parallel.shard({"image": np.zeros((8, 3))})

    batches = [{"x": np.full((4, 1), i)} for i in range(5)]
    got = [int(b["x"][2, 0]) for b in parallel.prefetch_to_device(iter(batches), size=2)]
    assert got == [0, 1, 2, 3, 4]

    assert parallel.per_device_batch(32) == 8
    with pytest.raises(parallel.ParallelError, match=r"batch size 30 .* 4 devices .* of 4"):
        parallel.per_device_batch(30)
    parallel.sync_global_devices("noop")
    print("OK")
""")

WORKER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from vit import parallel
    parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
    pid = jax.process_index()
    x = parallel.shard({"x": np.array([[1.0 + 2 * pid], [2.0 + 2 * pid]])})["x"]
    y = jax.pmap(lambda v: jax.lax.psum(v, parallel.AXIS), axis_name=parallel.AXIS)(x)
    parallel.sync_global_devices("done")
    # To a file: Gloo's C++ logging shares stdout and has landed inside a line written there.
    with open(sys.argv[3], "w") as out:
        out.write(f"RESULT {jax.process_count()} {jax.device_count()} "
                  f"{parallel.unreplicate(y)[0]} {parallel.per_device_batch(8)}")
""")


def test_four_device_plumbing():
    out = subprocess.run([sys.executable, "-c", FOUR_DEVICES], env=jax_env.subprocess_env(4),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_two_processes_psum_over_all_devices(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results_at = [tmp_path / f"result-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(i),
                               str(results_at[i])],
                              env=jax_env.subprocess_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr), result in zip(procs, results, results_at, strict=True):
        assert p.returncode == 0 and result.exists(), stdout + stderr[-3000:]
        # 2 processes, 4 devices, psum of 1+2+3+4, per-device batch 8 / 4.
        assert result.read_text() == "RESULT 2 4 10.0 2"


@pytest.mark.parametrize("address", ["nohost", "host:", ":1234", "127.0.0.1:abc"])
def test_a_coordinator_address_that_is_not_host_port_is_one_line(address):
    with pytest.raises(parallel.ParallelError, match=f"coordinator address {address!r} is not "
                                                     r"host:port \(e.g. 10.0.0.1:1234\)"):
        parallel.initialize_distributed(address, 2, 0)


def test_initialize_distributed_rejects_partial_arguments(monkeypatch):
    with pytest.raises(parallel.ParallelError, match="pass all three or none"):
        parallel.initialize_distributed("127.0.0.1:1234", num_processes=2)
    # The address alone: the rest is left to JAX's cluster detection (SLURM, Open MPI, TPU)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    calls = []

    def no_cluster(*args):
        calls.append(args)
        raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(parallel.jax.distributed, "initialize", no_cluster)
    with pytest.raises(parallel.ParallelError, match=r"\(Number of processes must be defined\.\)"
                       r".*; JAX_NUM_PROCESSES, JAX_PROCESS_ID unset and not found by JAX's "
                       r"cluster detection \(SLURM, Open MPI, TPU\): set all of "):
        parallel.initialize_distributed()
    assert calls == [("127.0.0.1:1234", None, None)]
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(parallel.ParallelError, match="^JAX_NUM_PROCESSES='two' is not an "
                                                     "integer: set it to the number of"):
        parallel.initialize_distributed()


def test_per_device_batch_single_process():
    n = parallel.jax.local_device_count()
    assert parallel.per_device_batch(3 * n) == 3
    with pytest.raises(parallel.ParallelError, match="^batch size must be >= 1, got 0$"):
        parallel.per_device_batch(0)
    with pytest.raises(parallel.ParallelError, match="^config.batch_size must be >= 1, got -32$"):
        parallel.per_device_batch(-32, "config.batch_size")
