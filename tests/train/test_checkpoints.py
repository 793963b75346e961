"""Train checkpoints: keep-N, exact restores (values, dtypes, iterator), unusable steps skipped
with a warning, restores onto another mesh, and a save killed midway."""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from codi_jax.data import pipeline, synthetic
from codi_jax.parallel.mesh import create_mesh
from codi_jax.train.checkpoints import CheckpointStore
from tests import procs
from tests.conftest import REPO
from tests.cpu_devices import xla_flags


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def make_state(seed: int = 0, step: int = 0) -> TrainState:
  rng = np.random.default_rng(seed)
  # 64 x 64 random floats do not compress below OCDBT's inline limit: they go to data files.
  params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)}
  opt_state = optax.adamw(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + 1 if x.dtype != jnp.int32 else x + step, opt_state)
  return TrainState(jnp.int32(step), params, opt_state)


def abstract(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def stage_iterator():
  config = synthetic.SyntheticConfig(train_size=12, validation_size=4, test_size=4,
                                     audio_seconds=0.5)
  spec = pipeline.stage_data("diffuse_image", [pipeline.SyntheticSource(config)], image_size=16)
  return iter(pipeline.build_pipeline(spec, batch_size=2, seed=0, process_index=0,
                                      process_count=1))


def on_one_device(tree):
  return abstract(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def test_keeps_newest_steps_and_restores_exactly(tmp_path):
  config = ml_collections.ConfigDict({"stage": "diffuse_image", "lr": 1e-4, "sizes": (2, 3)})
  with CheckpointStore(tmp_path, keep=2) as store:
    for step in (1, 2, 3):
      assert store.save(step, make_state(step, step), config=config)
    assert not store.save(3, make_state(9, 9), config=config)  # never overwritten
    store.wait()
    assert store.all_steps() == [2, 3]
    assert store.latest_valid_step() == 3
    target = on_one_device(make_state())
    state, restored_config = store.restore(3, target)
    assert_trees_equal(state, make_state(3, 3))
    assert isinstance(state, TrainState) and int(state.step) == 3
    assert restored_config == {"stage": "diffuse_image", "lr": 1e-4, "sizes": [2, 3]}

    wrong = target.replace(params={**target.params, "b": jax.ShapeDtypeStruct(
        (64,), jnp.float32, sharding=target.params["b"].sharding)})
    with pytest.raises(ValueError, match=r"params/b: saved bfloat16\[64\], target float32\[64\]"):
      store.restore(3, wrong)
    unsharded = target.replace(step=jax.ShapeDtypeStruct((), jnp.int32))
    with pytest.raises(ValueError, match="step: no sharding in the target"):
      store.restore(3, unsharded)
    with pytest.raises(ValueError, match="no data iterator state"):
      store.restore(3, target, iterator=stage_iterator())
    with pytest.raises(ValueError, match="JSON-serialisable"):
      store.save(4, make_state(), config={"bad": object()})


def test_restored_iterator_continues_exactly(tmp_path):
  it = stage_iterator()
  for _ in range(3):
    next(it)
  with CheckpointStore(tmp_path) as store:
    store.save(5, make_state(), iterator=it)
    # The iterator state is taken before save returns: advancing now changes nothing saved.
    expected = [next(it) for _ in range(3)]
    it.close()
    fresh = stage_iterator()
    state, config = store.restore(5, on_one_device(make_state()), iterator=fresh)
  assert config is None
  assert_trees_equal(state, make_state())
  for want in expected:
    got = next(fresh)
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
  fresh.close()


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


CORRUPTIONS = {
    "array_file_deleted": (lambda d: _largest_file(d / "state/ocdbt.process_0").unlink(),
                           "array data file state/ocdbt.process_0/d/.* is missing"),
    "array_file_truncated": (lambda d: os.truncate(_largest_file(d / "state/ocdbt.process_0"),
                                                   1000),
                             "array data file .* is truncated: 1000 bytes"),
    "btree_node_deleted": (lambda d: [p.unlink() for p in (d / "state/d").iterdir()],
                           "unreadable: NOT_FOUND: .*state/d/"),
    "ocdbt_manifest_deleted": (lambda d: (d / "state/manifest.ocdbt").unlink(),
                               "state/manifest.ocdbt is missing"),
    "no_commit_marker": (lambda d: (d / "commit_success.txt").unlink(), "no commit marker"),
    "step_metadata_deleted": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
                              "unreadable _CHECKPOINT_METADATA"),
    "item_missing": (lambda d: shutil.rmtree(d / "data"),
                     "item folder data/ is missing"),
    "config_unreadable": (lambda d: (d / "config/metadata").write_text("{\"stage\": "),
                          "unreadable: config/metadata is not valid JSON"),
    "iterator_state_unreadable": (lambda d: (d / "data/process_0-of-1.json").write_text("{"),
                                  "unreadable: data/process_0-of-1.json is not valid JSON"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unusable_newest_step_is_skipped_then_replaced(tmp_path, caplog, corruption):
  corrupt, reason = CORRUPTIONS[corruption]
  it = stage_iterator()
  with CheckpointStore(tmp_path) as store:
    for step in (2, 3):
      store.save(step, make_state(step, step), iterator=it, config={"step": step})
    store.wait()
    assert store.check(3) is None
    corrupt(store.step_dir(3))
    with caplog.at_level(logging.WARNING):
      assert store.latest_valid_step() == 2
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("checkpoint step 3 ") and re.search(reason, m) for m in warning), \
        warning
    with pytest.raises(ValueError, match="checkpoint step 3 .* is not usable"):
      store.restore(3, on_one_device(make_state()))
    assert_trees_equal(store.restore(2, on_one_device(make_state()))[0], make_state(2, 2))
    # Resumed from step 2, the run reaches step 3 again: the bad step is moved aside.
    assert store.save(3, make_state(7, 3), iterator=it, config={"step": 3})
    store.wait()
    assert store.latest_valid_step() == 3
    assert_trees_equal(store.restore(3, on_one_device(make_state()))[0], make_state(7, 3))
  it.close()
  assert [p.name.split(".")[0] for p in (tmp_path / "rejected_checkpoints").iterdir()] == ["3"]


@pytest.mark.parametrize("direction", ["1_to_8", "8_to_1"])
def test_restore_onto_another_mesh(tmp_path, direction):
  one = create_mesh({}, devices=jax.devices()[:1])
  eight = create_mesh({"data": 2, "fsdp": 2, "context": 1, "tensor": 2})
  specs = {"w": PartitionSpec("fsdp", "tensor"), "b": PartitionSpec("tensor"),
           "step": PartitionSpec()}
  rng = np.random.default_rng(0)
  values = {"w": rng.normal(size=(64, 32)).astype(np.float32),
            "b": rng.normal(size=(32,)).astype(np.float32), "step": np.int32(11)}
  src, dst = (one, eight) if direction == "1_to_8" else (eight, one)
  state = {k: jax.device_put(v, NamedSharding(src, specs[k])) for k, v in values.items()}
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(dst, specs[k]))
            for k, v in values.items()}
  with CheckpointStore(tmp_path) as store:
    store.save(1, state)
    restored, _ = store.restore(1, target)
  for k, v in values.items():
    assert restored[k].sharding == target[k].sharding
    assert len(restored[k].sharding.device_set) == len(dst.devices.flat)
    np.testing.assert_array_equal(np.asarray(restored[k]), v)
  assert restored["w"].addressable_shards[0].data.shape == ((32, 16) if dst is eight else (64, 32))


_KILLED_SAVE = """
import os, signal
import jax.numpy as jnp
import numpy as np
from codi_jax.train.checkpoints import CheckpointStore
store = CheckpointStore({workdir!r}, keep=1)
store.save(1, {{"w": jnp.ones((4, 4))}})
store.wait()
big = np.random.default_rng(0).normal(size=(16, 1024, 1024)).astype(np.float32)  # 64 MiB
store.save(2, {{"w": jnp.asarray(big)}})
os.kill(os.getpid(), signal.SIGKILL)  # dies while the background thread writes step 2
"""


def test_killed_save_is_ignored(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_SAVE).format(
      workdir=str(tmp_path))], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
  assert "1" in leftovers and any(n.startswith("2.orbax-checkpoint-tmp") for n in leftovers), \
      leftovers
  # keep=1, yet step 1 survives: old steps go only once the new one is committed.
  with CheckpointStore(tmp_path, keep=1) as store:
    assert store.all_steps() == [1]
    assert store.latest_valid_step() == 1
    state, _ = store.restore(1, on_one_device({"w": jnp.ones((4, 4))}))
    np.testing.assert_array_equal(np.asarray(state["w"]), np.ones((4, 4)))
    assert store.save(2, {"w": jnp.zeros((4, 4))})
    store.wait()
    assert store.all_steps() == [2]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


_PROCESS_SCRIPT = """
import json, os, sys
from codi_jax.parallel.distributed import initialize_from_env
initialize_from_env()
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from codi_jax.parallel.mesh import create_mesh
from codi_jax.train.checkpoints import CheckpointStore
from codi_jax.data import pipeline, synthetic
config = synthetic.SyntheticConfig(train_size=12, validation_size=4, test_size=4,
                                   audio_seconds=0.5)
spec = pipeline.stage_data("diffuse_image", [pipeline.SyntheticSource(config)], image_size=16)
build = lambda: iter(pipeline.build_pipeline(spec, batch_size=2, seed=0))  # split by process
values = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
src = NamedSharding(create_mesh({{"fsdp": 4}}), PartitionSpec("fsdp", None))
w = jax.make_array_from_callback(values.shape, src, lambda i: values[i])
it = build()
next(it)
store = CheckpointStore({workdir!r}, keep=2)
for step in (1, 2):
  store.save(step, {{"w": w * step}}, iterator=it, config={{"step": step}})
after = [next(it)["key"] for _ in range(2)]
store.wait()
if jax.process_index() == 0:  # step 2 now looks half-written to both processes
  os.remove(os.path.join({workdir!r}, "checkpoints", "2", "commit_success.txt"))
latest = store.latest_valid_step()
dst = NamedSharding(create_mesh({{"data": 2, "tensor": 2}}), PartitionSpec(None, "tensor"))
resumed = build()
state, config = store.restore(latest, {{"w": jax.ShapeDtypeStruct(values.shape, jnp.float32,
                                                                   sharding=dst)}},
                              iterator=resumed)
gathered = multihost_utils.process_allgather(state["w"], tiled=True)
print(json.dumps({{"latest": latest, "config": config,
                  "values": bool(np.array_equal(gathered, values * latest)),
                  "sharding": state["w"].sharding == dst,
                  "resumed": [next(resumed)["key"] for _ in range(2)] == after,
                  "saved_again": store.save(2, {{"w": w}}, iterator=resumed),
                  "data_files": sorted(os.listdir(os.path.join({workdir!r}, "checkpoints", "1",
                                                               "data")))}}))
store.close()
"""


def test_two_processes_save_check_and_restore_together(tmp_path):
  """Two JAX processes with 2 devices each: a collective save of a sharded array, per-process
  iterator states, process 0's verdict on a half-written step, a restore onto another mesh."""
  port = procs.free_port()
  script = _PROCESS_SCRIPT.format(workdir=str(tmp_path))
  started = []
  for pid in range(2):
    env = {**os.environ, "CODI_COORDINATOR": f"localhost:{port}", "CODI_NUM_PROCESSES": "2",
           "CODI_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    started.append(procs.start([sys.executable, "-c", script], cwd=REPO, env=env))
  outs = procs.finish(started, 300)
  for p, out in zip(started, outs):
    assert p.returncode == 0, out[-3000:]
  for out in outs:
    assert json.loads(procs.last_json_line(out)) == {
        "latest": 1, "config": {"step": 1}, "values": True, "sharding": True, "resumed": True,
        "saved_again": True,
        "data_files": ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]}
  assert [p.name.split(".")[0] for p in (tmp_path / "rejected_checkpoints").iterdir()] == ["2"]
