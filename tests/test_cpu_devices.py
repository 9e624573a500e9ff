"""In-process CPU devices (llmjax/cpu_devices.py): the thread pool that keeps their all-reduce
from deadlocking (issue 12)."""
import os
import subprocess
import sys
import textwrap

from conftest import ROOT
from llmjax import cpu_devices

# Two in-process devices, a chain of matmuls, then a psum: on a 2-core host with XLA's default
# pool (one thread per core) this aborted with "Termination timeout for all reduce" in every run
# (jax 0.10.2; 60 calls, not 20). configure_cpu_devices must size the pool before the client exists.
_PSUM_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from llmjax import config as cfglib
    from llmjax.cpu_devices import configure_cpu_devices
    c = cfglib.default_config()
    c.mesh.cpu_devices = 2
    assert configure_cpu_devices(c) == 2
    mesh = Mesh(jax.devices(), ("d",))
    def local(x):
      for _ in range(20):
        x = jnp.tanh(x @ x)
      return x + jax.lax.psum(x.sum(), "d")
    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    x = jax.device_put(jnp.full((512, 256), 0.01), NamedSharding(mesh, P("d")))
    for _ in range(60):   # several calls in flight: 20 passed even with the default pool
      x = f(x)
    print("ok", jax.device_count(), float(x.sum()))
""")


def test_pool_threads_two_per_device():
  assert cpu_devices.pool_threads(2, cores=2) == 4
  assert cpu_devices.pool_threads(3, cores=2) == 6
  assert cpu_devices.pool_threads(2, cores=16) == 16  # never fewer than the cores


def test_size_thread_pool_respects_the_user():
  env = {}
  assert cpu_devices.size_thread_pool(1, env) is None and env == {}   # one device: XLA's default
  assert cpu_devices.size_thread_pool(2, env) == cpu_devices.pool_threads(2)
  assert env["PJRT_NPROC"] == str(cpu_devices.pool_threads(2))
  for key in cpu_devices.POOL_ENVS:                                     # a user's choice stays
    env = {key: "3"}
    assert cpu_devices.size_thread_pool(2, env) is None and env == {key: "3"}


def test_two_in_process_devices_all_reduce_without_deadlock():
  env = {k: v for k, v in os.environ.items() if k not in cpu_devices.POOL_ENVS + ("XLA_FLAGS",)}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             # a deadlock aborts after 20 s instead of XLA's 40
             XLA_FLAGS="--xla_cpu_collective_call_terminate_timeout_seconds=20")
  proc = subprocess.run([sys.executable, "-c", _PSUM_SCRIPT], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("ok 2 ")
