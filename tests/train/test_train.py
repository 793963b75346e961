"""Training: every stage learns, sharding does not change the numbers, runs survive kills.

The tiny config on CPU; parts start from a host-random model checkpoint (`init_from`), so no test
pays for compiling the modules' initialisers except the one that checks them.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from codi_jax import checkpoint
from codi_jax.parallel.mesh import create_mesh
from codi_jax.train import data as train_data
from codi_jax.train import stages
from codi_jax.train.checkpoints import CheckpointStore
from codi_jax.train.state import load_params
from codi_jax.train.step import Trainer
from configs.codi import get_config
from tests import procs
from tests.cpu_devices import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny(stage: str, init_from: pathlib.Path, **train):
  config = get_config("tiny")
  config.stage = stage
  config.init_from = str(init_from)
  config.train.update(dict(batch_size=4, learning_rate=1e-3, warmup_steps=0, decay="constant",
                           async_checkpoints=False), **train)
  return config


@pytest.fixture(scope="module")
def tokenizers():
  return train_data.load_tokenizers("")


def first_batch(config, trainer, tokenizers, mesh, phase=0):
  it = iter(train_data.build(config, trainer.stage.phases[phase].modalities, seed=0))
  return train_data.place(train_data.arrays(next(it), tokenizers, config), mesh,
                          config.sharding_rules)


def run_steps(config, mesh, tokenizers, steps, phase=0):
  """(losses, state, trainable0, frozen) of `steps` steps on one repeated batch."""
  trainer = Trainer(config, mesh)
  params, _ = load_params(config, trainer.stage.parts, mesh)
  trainable, frozen = trainer.split(params)
  before = jax.tree_util.tree_map(np.asarray, trainable)
  state = trainer.create_state(trainable)
  batch = first_batch(config, trainer, tokenizers, mesh, phase)
  step = trainer.jitted_step(phase, state.params, frozen,
                             train_data.null_inputs(config, tokenizers))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics["loss"]))
  return losses, state, before, frozen


def _picked(stage, config):
  from codi_jax.train.state import abstract_part
  return [(part, p) for part in stage.parts
          for p in map(lambda k: tuple(k.split("/")), abstract_part(config.model, part))
          if stage.trainable(part, p)]


def test_stage_selectors_split_the_model_as_designed():
  config = get_config("tiny")
  from codi_jax.train.state import abstract_part
  diffusers = [tuple(k.split("/")) for k in abstract_part(config.model, "diffusers")]
  temporal = [p for p in diffusers if stages.is_temporal(p)]
  assert temporal and all(p[0] == "unet_image" for p in temporal)
  # The video-only leaves are exactly what video=True adds (spatial leaves only move).
  no_video = config.copy_and_resolve_references()
  no_video.model.image.video = False
  n_image = sum(p[0] == "unet_image" for p in diffusers)
  n_plain = sum(k.startswith("unet_image/") for k in abstract_part(no_video.model, "diffusers"))
  assert len(temporal) == n_image - n_plain
  for name in stages.STAGES:
    config.stage = name
    stage = stages.get_stage(config)
    picked = _picked(stage, config)
    assert picked, name
    if name.startswith("diffuse_") or name == "latent_align":
      assert all(part == "diffusers" for part, _ in picked)
    if name == "diffuse_image":
      assert all(p[0] == "unet_image" and not stages.is_temporal(p)
                 and not stages.is_connector(p) for _, p in picked)
    if name == "diffuse_video":
      assert all(stages.is_temporal(p) for _, p in picked)
    if name == "latent_align":
      assert all(stages.is_connector(p) for _, p in picked)
      assert [ph.name for ph in stage.phases] == [
          "latent_align_text_image", "latent_align_audio_text", "latent_align_audio_video"]
    if name == "align_encoders":  # tiny trains from scratch: the text tower trains too
      assert any(part == "clip" and p[0].startswith("text") for part, p in picked)
      frozen_text = config.copy_and_resolve_references()
      frozen_text.train.align_text_encoder = False  # a pretrained text tower is the bridge
      assert not any(part == "clip" and path[0].startswith("text")
                     for part, path in _picked(stages.get_stage(frozen_text), config))
  config.stage = "nope"
  with pytest.raises(ValueError, match="unknown stage 'nope'"):
    stages.get_stage(config)


@pytest.mark.parametrize("stage", stages.STAGES)
def test_every_stage_learns_on_a_repeated_batch(stage, random_model, tokenizers):
  config = tiny(stage, random_model)
  mesh = create_mesh({"data": 1}, devices=jax.devices()[:1])
  losses, state, before, frozen = run_steps(config, mesh, tokenizers, 6)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  trainer_stage = stages.get_stage(config)
  phase = trainer_stage.phases[0]
  moved = still = 0
  for part, leaves in state.params.items():
    for k, v in leaves.items():
      same = np.array_equal(np.asarray(v), before[part][k])
      if phase.updates(part, tuple(k.split("/"))):
        moved += not same
      else:  # trainable in the stage, but not in this phase (latent_align's other pairs)
        assert same, (part, k)
        still += 1
  assert moved > 0
  if stage == "latent_align":  # the text-image phase leaves the audio connectors alone
    assert still > 0
  # Nothing frozen is in the optimiser state.
  for part, leaves in frozen.items():
    assert not set(leaves) & set(state.params.get(part, {}))


def eight_devices_give_the_losses_of_one(random_model: str) -> None:
  """Data x fsdp = (2, 4), FSDP-sharded parameters and optimiser state: the numbers of one
  device. Run by the test below in a process of its own with 8 simulated devices."""
  config = tiny("diffuse_text", pathlib.Path(random_model), batch_size=8)
  tokenizers = train_data.load_tokenizers("")
  one = create_mesh({"data": 1}, devices=jax.devices()[:1])
  eight = create_mesh({"data": 2, "fsdp": 4, "context": 1, "tensor": 1})
  losses_1, state_1, _, _ = run_steps(config, one, tokenizers, 3)
  losses_8, state_8, _, _ = run_steps(config, eight, tokenizers, 3)
  # Step 1 sees identical parameters; later steps differ only by reduction order (Adam's
  # normalised updates turn 1e-7 gradient differences on near-zero gradients into small steps).
  assert losses_8[0] == pytest.approx(losses_1[0], rel=1e-6)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
  sharded = [v.sharding.spec for leaves in state_8.params.values() for v in leaves.values()]
  assert any(any(axis is not None for axis in spec) for spec in sharded)  # really sharded
  diffs = np.concatenate([np.abs(np.asarray(state_8.params[p][k]) - np.asarray(v)).ravel()
                          for p, leaves in state_1.params.items() for k, v in leaves.items()])
  assert np.median(diffs) < 1e-6 and diffs.max() < 3e-3  # 3 steps of lr 1e-3 at most

  # A checkpoint written on the 1-device mesh restores onto the 8-device mesh.
  store = CheckpointStore(pathlib.Path(config.init_from).parent / "mesh_ckpt", async_save=False)
  store.save(3, state_1)
  target = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state_8)
  restored, _ = store.restore(3, target)
  store.close()
  for a, b, t in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state_1),
                     jax.tree_util.tree_leaves(target)):
    assert a.sharding == t.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  print("eight devices: same numbers")


def test_eight_devices_give_the_losses_of_one(random_model):
  """In its own process, bounded in time, tried twice: XLA:CPU's in-process collectives can
  deadlock when simulated devices reach different collectives (seen in a full suite run here:
  6 devices in a collective-permute, one in an all-reduce, one in an all-gather, forever); a
  deadlock there is the simulator's, not a difference in the numbers, which fail at once."""
  code = ("from tests.train.test_train import eight_devices_give_the_losses_of_one as check; "
          f"check({str(random_model)!r})")
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  for attempt in range(2):
    proc = procs.start([sys.executable, "-c", code], cwd=REPO, env=env)
    try:
      out, = procs.finish([proc], 420)
    except pytest.fail.Exception:
      if attempt == 0:
        continue
      raise
    assert proc.returncode == 0 and "eight devices: same numbers" in out, out[-3000:]
    return


# --- the command, killed and resumed ------------------------------------------------------------

ONE_DEVICE = dict(os.environ, XLA_FLAGS=xla_flags(1))


def _command(workdir, init_from, steps=6, extra=()):
  return [sys.executable, "-m", "codi_jax.cli", "train", "--config.stage=diffuse_text",
          f"--config.init_from={init_from}", f"--config.train.steps={steps}",
          "--config.train.batch_size=4", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.train.async_checkpoints=false",
          "--config.train.sample_every=0",  # sampling has its own tests (test_samples)
          "--config.train.quality_examples=0",  # so have the stage checks (tests/quality)
          f"--workdir={workdir}", *extra]


def _losses(workdir) -> dict[int, float]:
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      assert row["step"] not in out, f"step {row['step']} logged twice"
      out[row["step"]] = row["loss"]
  return out


def _run_until(cmd, workdir, step, sig):
  """Starts the command, sends `sig` once metrics.jsonl has a line for `step`."""
  proc = procs.start(cmd, cwd=REPO, env=ONE_DEVICE)
  deadline = time.time() + 600
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l).get("step", 0) >= step and "loss" in l
                                for l in metrics.read_text().splitlines() if l.strip()):
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  out, = procs.finish([proc], 600)
  return proc.returncode, out


def test_killed_and_preempted_runs_resume_exactly(random_model, tmp_path):
  full = tmp_path / "full"
  done = subprocess.run(_command(full, random_model), cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=ONE_DEVICE)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  reference = _losses(full)
  assert sorted(reference) == [1, 2, 3, 4, 5, 6]
  assert checkpoint.saved_parts(full / "model") == ("diffusers", "optimus", "clip")

  # kill -9 after step 4: the checkpoint at 3 survives, the rerun repeats 4..6 exactly.
  killed = tmp_path / "killed"
  code, out = _run_until(_command(killed, random_model), killed, 4, signal.SIGKILL)
  assert code == -signal.SIGKILL, out[-3000:]
  rerun = subprocess.run(_command(killed, random_model), cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert '"resumed_from": "checkpoint 3"' in rerun.stdout
  assert _losses(killed) == reference

  # SIGTERM (preemption) or a first Ctrl-C: a checkpoint at the step reached, a clean exit, no
  # model; then it resumes.
  for sig in (signal.SIGTERM, signal.SIGINT):
    term = tmp_path / sig.name
    code, out = _run_until(_command(term, random_model), term, 2, sig)
    assert code == 0, out[-3000:]
    assert "preempted at step" in out and f"{sig.name} received" in out
    store = CheckpointStore(term, async_save=False)
    stopped = store.latest_valid_step()
    store.close()
    assert stopped is not None and 2 <= stopped < 6
    assert not (term / "model").exists()
    rerun = subprocess.run(_command(term, random_model), cwd=REPO, capture_output=True,
                           text=True, timeout=600, env=ONE_DEVICE)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert _losses(term) == reference

  # A corrupt newest checkpoint is skipped with a message; the run redoes the steps after the
  # previous one, exactly.
  for f in (full / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:  # every array data file and B-tree node
      os.truncate(f, 1000)
  rerun = subprocess.run(_command(full, random_model), cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=ONE_DEVICE)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "checkpoint step 6" in rerun.stderr and "not usable" in rerun.stderr
  assert '"resumed_from": "checkpoint 3"' in rerun.stdout
  assert _losses(full) == reference

  # A non-finite loss stops the run, names the steps, writes no checkpoint and no model.
  nan_model = tmp_path / "nan_model"
  config, params = checkpoint.load_model(random_model)
  params["diffusers"]["unet_text"]["out"]["2"]["bias"][0] = np.nan
  checkpoint.save_model(nan_model, params, config)
  nan = tmp_path / "nan"
  done = subprocess.run(_command(nan, nan_model), cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=ONE_DEVICE)
  assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]
  assert "non-finite loss or gradient between steps 1 and 1" in done.stdout
  assert not (nan / "model").exists()
  store = CheckpointStore(nan, async_save=False)
  assert store.latest_valid_step() is None
  store.close()

  # Frozen parts of the exported model are the init_from weights, bit for bit.
  _, init = checkpoint.load_model(random_model, ["clip", "optimus"])
  _, trained = checkpoint.load_model(full / "model", ["clip", "optimus", "diffusers"])
  for part in ("clip", "optimus"):
    for a, b in zip(jax.tree_util.tree_leaves(init[part]),
                    jax.tree_util.tree_leaves(trained[part])):
      np.testing.assert_array_equal(a, b)


def test_two_processes_train_like_one(random_model, tmp_path):
  one = tmp_path / "one"
  cmd = _command(one, random_model, steps=2, extra=["--no_export"])
  code, out = procs.run(cmd, 600, cwd=REPO, env=ONE_DEVICE)
  assert code == 0, out[-3000:]
  two = tmp_path / "two"
  cmd = [str(REPO / "launch" / "local_processes.sh"), "2", "1",
         *_command(two, random_model, steps=2, extra=["--no_export"])]
  env = dict(os.environ, CODI_PORT=str(procs.free_port()))
  env.pop("XLA_FLAGS", None)
  code, out = procs.run(cmd, 600, cwd=REPO, env=env)
  assert code == 0, out[-3000:]
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == [1, 2]
  np.testing.assert_allclose([b[s] for s in (1, 2)], [a[s] for s in (1, 2)], rtol=2e-5)


def test_compile_check_for_a_small_topology(random_model, tmp_path):
  try:
    import libtpu  # noqa: F401
  except ImportError:
    pytest.skip("the tpu extra (libtpu) is not installed")
  out = tmp_path / "cc.json"
  cmd = [sys.executable, "-m", "codi_jax.cli", "compile-check", "--config.stage=diffuse_text",
         "--config.train.batch_size=8", "--topology=v5p:2x2x1", f"--json={out}"]
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["chips"] == 4 and result["fits"] is True
  assert 0 < result["per_chip_bytes"] < result["hbm_bytes"] == 95 * 1024 ** 3
  assert result["flops_per_step"] > 0
  assert "fits in 95 GiB" in done.stdout


def test_train_needs_a_workdir_and_a_known_stage(tmp_path):
  done = subprocess.run([sys.executable, "-m", "codi_jax.cli", "train"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--workdir is required" in done.stdout + done.stderr
  done = subprocess.run([sys.executable, "-m", "codi_jax.cli", "train", "--config.stage=bogus",
                         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode != 0 and "unknown stage 'bogus'" in done.stdout + done.stderr
  done = subprocess.run([sys.executable, "-m", "codi_jax.cli", "train", "--config.train.steps=0",
                         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode != 0 and "steps must be a positive integer, got 0" in done.stderr
  assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())  # nothing was made
  a_file = tmp_path / "file"
  a_file.write_text("")
  done = subprocess.run([sys.executable, "-m", "codi_jax.cli", "train", f"--workdir={a_file}"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "exists and is not a folder" in done.stderr
  assert "Traceback" not in done.stderr

