"""Multi-host runs with JAX's multi-controller runtime (``jax.distributed``).

A multi-host jaxdec job is the single-host program started once per process: every
process calls :func:`initialize` first, then builds the same mesh
(:func:`jaxdec.sharding.worker_mesh` spans all processes' devices), places the same
full arrays with :func:`jaxdec.sharding.shard_workers` (each process keeps only the
blocks of its own devices) and calls ``jd.run``; gossip between workers on different
hosts becomes cross-process collectives. Per-step summaries and evaluations come
back replicated on every process; :func:`jaxdec.sharding.gather` collects a final
state on every process.

Start the processes with your cluster's launcher (SLURM, Kubernetes, ...; then
``initialize()`` with no arguments lets JAX detect the cluster), by hand with the
environment variables below, or on one machine with :func:`launch_local` /
``python -m jaxdec.launch``:

    python -m jaxdec.launch --num-processes 2 --local-devices 4 my_job.py --steps 100

Environment read by :func:`initialize` (set by :func:`launch_local`):
``JAXDEC_COORDINATOR`` (``host:port`` of process 0), ``JAXDEC_NUM_PROCESSES``,
``JAXDEC_PROCESS_ID``, ``JAXDEC_LOCAL_DEVICES`` (CPU devices per process).

Example (``my_job.py``):
  >>> from jaxdec import launch, sharding
  >>> launch.initialize()                  # first, before any JAX computation
  >>> mesh = sharding.worker_mesh()         # all devices of all processes
  >>> state = sharding.shard_workers(algo.init(params), mesh)
  >>> state, hist = jd.run(algo, state, sharding.shard_workers(sampler, mesh), key, T)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import jax

__all__ = ["initialize", "is_initialized", "launch_local", "free_port", "main"]

_ENV = {
    "coordinator": "JAXDEC_COORDINATOR",
    "num_processes": "JAXDEC_NUM_PROCESSES",
    "process_id": "JAXDEC_PROCESS_ID",
    "local_devices": "JAXDEC_LOCAL_DEVICES",
}
_state = {"initialized": False}


def is_initialized() -> bool:
    """Whether :func:`initialize` ran in this process."""
    return _state["initialized"]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_devices: int | None = None,
    cpu_collectives: str = "gloo",
    timeout_s: int = 300,
) -> None:
    """Join a multi-process JAX job (``jax.distributed.initialize``).

    Call first, before any JAX computation. Arguments default to the
    ``JAXDEC_*`` environment variables (see the module docstring); with none set
    and no arguments, ``jax.distributed.initialize()`` auto-detects a cluster
    (SLURM, Open MPI, Cloud TPU, Kubernetes). On CPU, ``local_devices`` fake
    devices per process are created (``jax_num_cpu_devices``) and the cross-process
    collectives use ``cpu_collectives`` (``"gloo"``).

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: number of processes ``P``.
      process_id: this process's index in ``0..P-1``.
      local_devices: CPU devices per process (ignored on GPU/TPU).
      cpu_collectives: CPU collectives implementation (``"gloo"`` or ``"mpi"``).
      timeout_s: how long to wait for the other processes at startup.

    Raises:
      ValueError: an incomplete or inconsistent configuration, or a second call.
    """
    if _state["initialized"]:
        raise ValueError("launch.initialize: already initialized in this process.")
    env = os.environ
    coordinator_address = coordinator_address or env.get(_ENV["coordinator"])
    if num_processes is None and env.get(_ENV["num_processes"]):
        num_processes = int(env[_ENV["num_processes"]])
    if process_id is None and env.get(_ENV["process_id"]):
        process_id = int(env[_ENV["process_id"]])
    if local_devices is None and env.get(_ENV["local_devices"]):
        local_devices = int(env[_ENV["local_devices"]])
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "launch.initialize: give all of coordinator_address, num_processes and "
            f"process_id (or {_ENV['coordinator']}, {_ENV['num_processes']}, "
            f"{_ENV['process_id']}), or none of them to let JAX detect the cluster; "
            f"got {given}."
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"launch.initialize: process_id={process_id} must lie in "
            f"[0, num_processes={num_processes})."
        )
    if local_devices is not None:
        if int(local_devices) < 1:
            raise ValueError(
                f"launch.initialize: local_devices must be >= 1, got {local_devices}."
            )
        jax.config.update("jax_num_cpu_devices", int(local_devices))
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {"initialization_timeout": int(timeout_s)}
    if coordinator_address is not None:
        kwargs.update(
            coordinator_address=coordinator_address,
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
    jax.distributed.initialize(**kwargs)
    _state["initialized"] = True


def free_port() -> int:
    """A free TCP port on localhost (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(
    argv: Sequence[str],
    num_processes: int = 2,
    *,
    local_devices: int = 1,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    cwd: str | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``python argv...`` as ``num_processes`` cooperating processes on this
    machine (coordinator on ``127.0.0.1:port``), wait for all, return their results.

    Each process sees ``JAXDEC_COORDINATOR``, ``JAXDEC_NUM_PROCESSES``,
    ``JAXDEC_PROCESS_ID`` and ``JAXDEC_LOCAL_DEVICES``; the program must call
    :func:`initialize`. ``JAX_PLATFORMS`` defaults to ``cpu``. If one process
    fails or the timeout passes, the others are stopped.

    Returns:
      One ``CompletedProcess`` per process (stdout and stderr captured as text).

    Raises:
      RuntimeError: a process exited with a non-zero status (its stderr attached).
    """
    num_processes = int(num_processes)
    if num_processes < 1:
        raise ValueError(
            f"launch_local: num_processes must be >= 1, got {num_processes}."
        )
    port = free_port() if port is None else int(port)
    base = dict(os.environ)
    base.setdefault("JAX_PLATFORMS", "cpu")
    base.update(env or {})
    with contextlib.ExitStack() as stack:
        procs, files = [], []
        for pid in range(num_processes):
            e = dict(base)
            e[_ENV["coordinator"]] = f"127.0.0.1:{port}"
            e[_ENV["num_processes"]] = str(num_processes)
            e[_ENV["process_id"]] = str(pid)
            e[_ENV["local_devices"]] = str(int(local_devices))
            out = stack.enter_context(tempfile.TemporaryFile("w+"))
            err = stack.enter_context(tempfile.TemporaryFile("w+"))
            files.append((out, err))
            cmd = [sys.executable, *argv]
            procs.append(subprocess.Popen(cmd, env=e, cwd=cwd, stdout=out, stderr=err))
        timed_out, killed = _wait_all(procs, timeout_s)
        results = []
        for p, (out, err) in zip(procs, files, strict=True):
            out.seek(0)
            err.seek(0)
            results.append(
                subprocess.CompletedProcess(
                    p.args, p.returncode, out.read(), err.read()
                )
            )
    if timed_out:
        raise RuntimeError(f"launch_local: timed out after {timeout_s} s.")
    failed = [i for i, r in enumerate(results) if r.returncode != 0]
    for i in sorted(failed, key=lambda i: i in killed):  # the cause first
        r = results[i]
        if r.returncode != 0:
            raise RuntimeError(
                f"launch_local: process {i} failed (exit {r.returncode}):\n"
                f"{r.stderr[-3000:]}"
            )
    return results


def _wait_all(
    procs: list[subprocess.Popen], timeout_s: float | None
) -> tuple[bool, set[int]]:
    """Wait for every process; stop all once one fails or the timeout passes
    (so no process waits forever for a dead peer). Returns ``(timed_out,
    indices of the processes stopped here)``."""
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    timed_out = False
    try:
        while True:
            codes = [p.poll() for p in procs]  # poll every process each round
            if all(c is not None for c in codes) or any(c for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
    finally:
        killed = set()
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
                killed.add(i)
    return timed_out, killed


def main(args: Sequence[str] | None = None) -> int:
    """``python -m jaxdec.launch [-n P] [--local-devices k] script.py [args...]``."""
    p = argparse.ArgumentParser(
        prog="python -m jaxdec.launch",
        description="Run a jaxdec program as P cooperating JAX processes on this "
        "machine (the program calls jaxdec.launch.initialize()).",
    )
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("--local-devices", type=int, default=1)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("program", nargs=argparse.REMAINDER)
    a = p.parse_args(args)
    if not a.program:
        p.error("give the program to run, e.g. my_job.py --steps 100")
    res = launch_local(
        a.program,
        a.num_processes,
        local_devices=a.local_devices,
        port=a.port,
        timeout_s=a.timeout,
    )
    for i, r in enumerate(res):
        sys.stdout.write(f"--- process {i} ---\n{r.stdout}")
        sys.stderr.write(r.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
