"""Model checkpoints: save/load round trip, random parameters, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from codi_jax import checkpoint
from codi_jax.data import cache
from configs.codi import get_config
from tests.conftest import REPO
from tests.cpu_devices import xla_flags

PARTS = ("hifigan_vocoder", "clap")  # small, and clap has batch_stats


@pytest.fixture(scope="module")
def config():
  return get_config("tiny")


@pytest.fixture(scope="module")
def params(config):
  return checkpoint.random_model_params(config, seed=3, parts=PARTS)


def test_random_params_match_the_shapes(config, params):
  assert set(params) == set(PARTS)
  assert set(params["clap"]) == {"params", "batch_stats"}
  for part in PARTS:
    shapes = checkpoint.part_shapes(config.model, part)
    assert jax.tree_util.tree_structure(params[part]) == jax.tree_util.tree_structure(shapes)
    for leaf, want in zip(jax.tree_util.tree_leaves(params[part]),
                          jax.tree_util.tree_leaves(shapes)):
      assert leaf.shape == want.shape and leaf.dtype == np.float32
  again = checkpoint.random_model_params(config, seed=3, parts=PARTS)
  other = checkpoint.random_model_params(config, seed=4, parts=PARTS)
  leaves = lambda p: jax.tree_util.tree_leaves(p["hifigan_vocoder"])
  assert all(np.array_equal(a, b) for a, b in zip(leaves(params), leaves(again)))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(params), leaves(other)))


def test_cache_uses_the_same_random_params(config):
  got = cache.random_encoder_params(config.model, seed=1)
  want = checkpoint.random_params(config.model, 1, cache.ENCODERS)
  assert set(got) == set(cache.ENCODERS)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_save_load_round_trip(config, params, tmp_path):
  checkpoint.save_model(tmp_path / "ckpt", params, config)
  assert checkpoint.saved_parts(tmp_path / "ckpt") == ("hifigan_vocoder", "clap")
  assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary left
  loaded_config, loaded = checkpoint.load_model(tmp_path / "ckpt")
  assert loaded_config.to_dict() == json.loads(config.to_json_best_effort())  # tuples -> lists
  assert checkpoint.part_shapes(loaded_config.model, "clap") == checkpoint.part_shapes(
      config.model, "clap")
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, b)
  _, only = checkpoint.load_model(tmp_path / "ckpt", ["clap"])
  assert set(only) == {"clap"}
  checkpoint.check_params(config.model, "clap", only["clap"])


def test_an_older_checkpoint_config_gains_the_fields_added_since(config, tmp_path):
  """A config.json written before a field existed loads with the preset's default for it; the
  stored values win."""
  stored = json.loads(config.to_json_best_effort())
  del stored["data"]["caption_dropout"]
  stored["train"]["learning_rate"] = 0.125
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(stored))
  loaded = checkpoint.load_config(tmp_path)
  assert loaded.data.caption_dropout == config.data.caption_dropout
  assert loaded.train.learning_rate == 0.125
  unknown = {"preset": "not-a-preset", "seed": 1}
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(unknown))
  assert checkpoint.load_config(tmp_path).to_dict() == unknown


def test_a_model_trained_on_eight_devices_loads_in_a_one_device_process(config, params,
                                                                         tmp_path):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from codi_jax.train.loop import export_model

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  spread = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
      mesh, PartitionSpec("data") if a.ndim and a.shape[0] % 8 == 0 else PartitionSpec())), params)
  export_model(tmp_path / "ckpt", spread, config)  # as training writes it: sharded arrays
  code = ("import sys, jax, numpy as np; from codi_jax import checkpoint; "
          "_, p = checkpoint.load_model(sys.argv[1]); assert jax.device_count() == 1; "
          "print(sum(a.size for a in jax.tree.leaves(p)))")
  env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) == sum(a.size for a in jax.tree.leaves(params))


def test_outputs_get_the_permissions_the_umask_gives(config, params, tmp_path):
  """Written through a private temporary name, yet readable by others when the umask says so
  (a gallery served by a web server, a checkpoint a colleague loads)."""
  import os

  from codi_jax import io_utils

  previous = os.umask(0o022)  # the most common umask
  io_utils._umask.cache_clear()
  try:
    checkpoint.save_model(tmp_path / "ckpt", params, config)
    io_utils.atomic_write_text(tmp_path / "page.html", "<p>")
  finally:
    os.umask(previous)
    io_utils._umask.cache_clear()
  assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
  assert (tmp_path / "page.html").stat().st_mode & 0o777 == 0o644
  files = [p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()]
  assert files and all(p.stat().st_mode & 0o044 == 0o044 for p in files)


def test_save_refuses_to_overwrite_unless_asked(config, params, tmp_path):
  one = {"hifigan_vocoder": params["hifigan_vocoder"]}
  checkpoint.save_model(tmp_path / "ckpt", one, config)
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save_model(tmp_path / "ckpt", {"clap": params["clap"]}, config)
  checkpoint.save_model(tmp_path / "ckpt", {"clap": params["clap"]}, config, overwrite=True)
  assert checkpoint.saved_parts(tmp_path / "ckpt") == ("clap",)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("bad, match", [({}, "no parts"), ({"unet": {}}, "unknown model parts")])
def test_save_rejects_bad_parts(config, tmp_path, bad, match):
  with pytest.raises(ValueError, match=match):
    checkpoint.save_model(tmp_path / "ckpt", bad, config)


def test_a_part_cut_short_is_one_clear_error_without_stray_tracebacks(config, tmp_path):
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, checkpoint.random_model_params(config, 0, ["diffusers"]), config)
  biggest = max((f for f in (ckpt / "diffusers").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
  # In a process of its own: the reads still in flight after the failed one report into orbax's
  # closed event loop (`checkpoint._silence_closed_loop_reports` drops those reports).
  code = ("import sys; from codi_jax import checkpoint\n"
          "try:\n  checkpoint.load_model(sys.argv[1])\n"
          "except ValueError as e:\n  print('ERROR', e, file=sys.stderr)\n"
          "import time; time.sleep(2)\n")  # late reports would come meanwhile
  proc = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True,
                        timeout=300, cwd=REPO)
  assert "ERROR corrupt checkpoint part 'diffusers'" in proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr


def test_load_errors(config, params, tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    checkpoint.load_model(tmp_path / "nothing")
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, {"hifigan_vocoder": params["hifigan_vocoder"]}, config)
  with pytest.raises(ValueError, match=r"has no \['clap'\]"):
    checkpoint.load_model(ckpt, ["clap"])
  with pytest.raises(ValueError, match="unknown model parts"):
    checkpoint.load_model(ckpt, ["vae"])
  # Corrupt every data file of the part: orbax cannot read it.
  for f in (ckpt / "hifigan_vocoder").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="corrupt checkpoint part 'hifigan_vocoder'"):
    checkpoint.load_model(ckpt)
  (ckpt / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt checkpoint config"):
    checkpoint.load_model(ckpt)
  (ckpt / "config.json").unlink()
  with pytest.raises(ValueError, match="config.json is missing"):
    checkpoint.load_model(ckpt)


def test_check_params_names_the_bad_leaf(config, params):
  tree = jax.tree_util.tree_map(np.copy, params["hifigan_vocoder"])
  tree["conv_pre"]["bias"] = np.zeros(3, np.float32)
  match = r"'hifigan_vocoder': \['conv_pre'\]\['bias'\] has shape \(3,\)"
  with pytest.raises(ValueError, match=match):
    checkpoint.check_params(config.model, "hifigan_vocoder", tree)


def test_route_takes_the_longest_prefix():
  assert checkpoint.route("audioldm.vocoder.conv_pre.weight") == "hifigan_vocoder"
  assert checkpoint.route("audioldm.encoder.conv_in.weight") == "audioldm_vae"
  assert checkpoint.route("model.diffusion_model.unet_text.out.0.weight") == "diffusers"
  assert checkpoint.route("clip.logit_scale") is None
