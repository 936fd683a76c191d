"""Multi-host: a D-SGD job run as 2 cooperating JAX processes (2 CPU devices each,
gloo collectives, jax.distributed) matches the same job in one process, and its
checkpoints (each process writes the shards it holds; nothing is gathered) resume it
exactly."""

import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxdec as jd
from jaxdec import launch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import FAST, problem  # noqa: E402

N, STEPS = 16, 6

JOB = r"""
import sys
from jaxdec import launch
launch.initialize()                       # before any JAX computation
import jax, numpy as np
import jaxdec as jd
from jaxdec import sharding, topology
sys.path.insert(0, sys.argv[2])
from test_multihost import N, STEPS
from test_sharding import problem

assert jax.process_count() == 2 and len(jax.devices()) == 4
assert len(jax.local_devices()) == 2
mesh = sharding.worker_mesh()             # 4 devices over 2 processes
W = topology.mixing_matrix(topology.ring(N))
algo, state, sampler, ev = problem("dsgd", W, mesh, n=N)
state0 = state
ck = sys.argv[3]
# checkpoints never gather the state: each process writes its own shards (orbax's
# barriers all-gather small host values; a state gather would pass global arrays)
from jax.experimental import multihost_utils
gathers, real_allgather = [], multihost_utils.process_allgather
def spy(tree, *a, **k):
    gathers.extend(x.shape for x in jax.tree.leaves(tree)
                   if isinstance(x, jax.Array) and not x.is_fully_addressable)
    return real_allgather(tree, *a, **k)
multihost_utils.process_allgather = spy
state, hist = jd.run(algo, state, sampler, jax.random.key(5), STEPS, eval_every=3,
                     eval_fn=ev, progress=False, checkpoint_dir=ck)
assert not gathers, f"the checkpoints gathered global arrays {gathers}"
assert jd.checkpoint.all_steps(ck) == [3, 6]
params = sharding.gather(state.params)    # full arrays on every process
keys = sharding.shard_workers(jax.random.split(jax.random.key(0), N), mesh)
keys = sharding.gather(keys)              # typed keys sharded over both processes
# resume from the step-STEPS checkpoint (sharded over both processes) with a
# scrambled initial state: only a real restore reproduces the one-process run
junk = jax.tree.map(lambda x: x * 0 + 7, state0)
state2, hist2 = jd.run(algo, junk, sampler, jax.random.key(5), STEPS + 3,
                       eval_every=3, progress=False, checkpoint_dir=ck, resume=True)
assert state2.params["w1"].sharding == state.params["w1"].sharding
resumed = sharding.gather(state2.params)
if jax.process_index() == 0:
    np.savez(sys.argv[1], loss=hist.train["loss"],
             acc=hist.eval["local_acc_mean"], loss2=hist2.train["loss"], **params,
             keys=jax.random.key_data(keys),
             **{"resumed_" + k: v for k, v in resumed.items()})
print("process", jax.process_index(), "done", flush=True)
"""


def test_two_process_dsgd_matches_single_process(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(JOB)
    out = tmp_path / "out.npz"
    env = {"PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST}
    res = launch.launch_local(
        [str(job), str(out), str(Path(__file__).parent), str(tmp_path / "ckpt")],
        2,
        local_devices=2,
        env=env,
        timeout_s=300,
    )
    assert [r.stdout.strip().splitlines()[-1] for r in res] == [
        "process 0 done",
        "process 1 done",
    ]
    got = dict(np.load(out))
    # both processes wrote array data into the checkpoint (their own shards)
    writers = {p.name for p in (tmp_path / "ckpt" / "6" / "state").glob("ocdbt.*")}
    assert writers == {"ocdbt.process_0", "ocdbt.process_1"}
    # the same job in this process: one device, gossip.sparse, metrics.evaluator
    W = jd.topology.mixing_matrix(jd.topology.ring(N))
    algo, state, sampler, ev = problem("dsgd", W, None, n=N)
    state, hist = jd.run(
        algo,
        state,
        sampler,
        jax.random.key(5),
        STEPS,
        eval_every=3,
        eval_fn=ev,
        progress=False,
    )
    for k, v in state.params.items():
        np.testing.assert_allclose(got[k], np.asarray(v), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(got["loss"], hist.train["loss"], rtol=2e-5)
    np.testing.assert_allclose(got["acc"], hist.eval["local_acc_mean"], atol=1e-6)
    assert got["loss"][-1] < got["loss"][0]
    # typed keys sharded over both processes gather into the same keys
    want = jax.random.key_data(jax.random.split(jax.random.key(0), N))
    np.testing.assert_array_equal(got["keys"], np.asarray(want))
    # the resumed multi-host run continues the one-process run exactly
    state, hist = jd.run(
        algo, state, sampler, jax.random.key(5), 3, start_step=STEPS, progress=False
    )
    for k, v in state.params.items():
        np.testing.assert_allclose(
            got["resumed_" + k], np.asarray(v), rtol=2e-5, atol=2e-6
        )
    assert got["loss2"].shape == (STEPS + 3,)
    np.testing.assert_allclose(got["loss2"][STEPS:], hist.train["loss"], rtol=2e-5)


def test_initialize_rejects_partial_config(monkeypatch):
    monkeypatch.setenv("JAXDEC_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("JAXDEC_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAXDEC_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match="give all of coordinator_address"):
        launch.initialize()
    with pytest.raises(ValueError, match="process_id=3 must lie in"):
        launch.initialize("127.0.0.1:1234", 2, 3)


def test_launch_local_reports_a_failing_process(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os, sys, time\n"
        "if os.environ['JAXDEC_PROCESS_ID'] == '1': sys.exit('boom')\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(RuntimeError, match="process 1 failed"):
        launch.launch_local([str(bad)], 2, timeout_s=30, env={"PYTHONPATH": ""})
    assert os.environ.get("JAXDEC_PROCESS_ID") is None
