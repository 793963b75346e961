"""Released-weights conversion: weight files -> checkpoint -> export, on reference fixtures."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from codi_jax import checkpoint, components
from codi_jax.convert import torch_io
from codi_jax.convert.original import codi_config_from_original
from codi_jax.models.autoencoder import autoencoder_config_from_original
from codi_jax.models.vocoder import vocoder_config_from_original
from codi_jax.parity.fixtures import load_fixture
from configs.codi import get_config
from tests.conftest import FIXTURES, REPO

# The parts the fixtures hold; the others are absent from the test files.
ABSENT = ("audioldm.encoder.", "audioldm.decoder.", "audioldm.quant_conv.",
          "audioldm.post_quant_conv.", "optimus.", "clip.model.", "clap.model.")


@pytest.fixture(scope="module")
def reference():
  """(config whose diffusers, image VAE and vocoder are the fixtures' models, their weights
  under the released CoDi key names, float32 values on the float16 grid)."""
  unet, autokl, vocoder = (load_fixture(FIXTURES / f"{n}.npz")
                           for n in ("unet_codi", "autokl", "hifigan_vocoder"))
  config = get_config("tiny")
  with config.unlocked():
    diffusers = codi_config_from_original(unet.config["unet_config"])
    for branch in ("image", "text", "audio"):
      sub = getattr(diffusers, branch)
      config.model[branch] = None if sub is None else dataclasses.asdict(sub)
    config.model.alignment = diffusers.alignment.value
    config.model.image_vae = dataclasses.asdict(autoencoder_config_from_original(
        autokl.config["config"]["args"], float(autokl.config["vision_scale_factor"])))
    config.model.vocoder = dataclasses.asdict(vocoder_config_from_original(
        vocoder.config["hifigan_config"]))
  state = {}
  for fx, prefix in ((unet, "model.diffusion_model."), (autokl, "autokl."),
                     (vocoder, "audioldm.vocoder.")):
    state.update({prefix + k: v for k, v in fx.weights.items()})
  return config, state


def _save(path: pathlib.Path, state: dict, dtype=np.float32) -> pathlib.Path:
  safetensors.numpy.save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in
                               state.items()}, str(path))
  return path


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_convert_then_export_is_bit_exact(reference, tmp_path, dtype):
  config, state = reference
  src = _save(tmp_path / "codi.safetensors", {**state, "betas": np.ones(4)}, dtype)
  result = checkpoint.convert_files([src], config, tmp_path / "ckpt", allow_missing=ABSENT)
  assert result.parts == ["diffusers", "autokl", "hifigan_vocoder"]
  assert result.schedule_buffers == 1
  assert checkpoint.saved_parts(tmp_path / "ckpt") == tuple(result.parts)
  # The diffusers come back with the DDPM schedule buffers (tests/convert/test_export.py).
  count = len(state) + len(checkpoint.SCHEDULE_BUFFERS)
  assert checkpoint.export_file(tmp_path / "ckpt", tmp_path / "out.safetensors") == count
  back = safetensors.numpy.load_file(str(tmp_path / "out.safetensors"))
  assert set(back) == set(state) | checkpoint.SCHEDULE_BUFFERS
  for key, value in state.items():
    assert back[key].dtype == np.float32
    np.testing.assert_array_equal(back[key], value.astype(dtype).astype(np.float32), err_msg=key)


def test_export_flax_names(reference, tmp_path):
  config, state = reference
  src = _save(tmp_path / "codi.safetensors", state)
  checkpoint.convert_files([src], config, tmp_path / "ckpt", allow_missing=ABSENT)
  checkpoint.export_file(tmp_path / "ckpt", tmp_path / "flax.safetensors", names="flax",
                parts=["autokl"])
  back = safetensors.numpy.load_file(str(tmp_path / "flax.safetensors"))
  assert all(k.startswith("autokl/") for k in back)
  # Conv2d [O, I, kh, kw] -> our [kh, kw, I, O].
  np.testing.assert_array_equal(back["autokl/encoder/conv_in/kernel"],
                                state["autokl.encoder.conv_in.weight"].transpose(2, 3, 1, 0))


def _failure(config, state, tmp_path, allow=ABSENT) -> str:
  src = _save(tmp_path / "bad.safetensors", state)
  with pytest.raises(checkpoint.ConversionError) as e:
    checkpoint.convert_files([src], config, tmp_path / "ckpt", allow_missing=allow)
  assert not (tmp_path / "ckpt").exists()
  return str(e.value)


def test_failure_while_writing_leaves_nothing(reference, tmp_path, monkeypatch):
  """Parts are written one by one into a staging folder: a failure after the first leaves
  neither --out nor the staging folder."""
  config, state = reference
  src = _save(tmp_path / "codi.safetensors", state)
  written = []

  def save_part(directory, part, tree):
    if written:
      raise OSError("disk full")
    written.append(part)

  monkeypatch.setattr(checkpoint, "_save_part", save_part)
  with pytest.raises(OSError, match="disk full"):
    checkpoint.convert_files([src], config, tmp_path / "out" / "ckpt", allow_missing=ABSENT)
  assert written == ["diffusers"]
  assert list((tmp_path / "out").iterdir()) == []


def test_unknown_prefix_fails(reference, tmp_path):
  config, state = reference
  message = _failure(config, {**state, "ema.decay": np.ones(())}, tmp_path)
  assert "1 keys under no known prefix" in message and "ema.decay" in message


def test_unexpected_key_in_a_part_fails(reference, tmp_path):
  config, state = reference
  message = _failure(config, {**state, "autokl.encoder.extra.weight": np.ones(2)}, tmp_path)
  assert "autokl: 1 unexpected" in message


def test_missing_key_fails(reference, tmp_path):
  config, state = reference
  key = "autokl.decoder.conv_out.bias"
  message = _failure(config, {k: v for k, v in state.items() if k != key}, tmp_path)
  assert f"autokl: 1 missing:\n    {key}" in message
  # Allowing it cannot help: the part would be incomplete.
  message = _failure(config, {k: v for k, v in state.items() if k != key}, tmp_path,
                     allow=ABSENT + ("autokl.decoder.",))
  assert "autokl: loaded in part" in message


def test_absent_part_needs_allow_missing(reference, tmp_path):
  config, state = reference
  state = {k: v for k, v in state.items() if not k.startswith("audioldm.vocoder.")}
  message = _failure(config, state, tmp_path)
  assert "hifigan_vocoder: absent (194 keys missing)" in message
  src = _save(tmp_path / "ok.safetensors", state)
  result = checkpoint.convert_files([src], config, tmp_path / "ok",
                                 allow_missing=ABSENT + ("audioldm.vocoder.",))
  assert result.parts == ["diffusers", "autokl"]


def test_mismatched_shape_fails(reference, tmp_path):
  config, state = reference
  key = "autokl.encoder.conv_in.weight"
  message = _failure(config, {**state, key: state[key][:, :2]}, tmp_path)
  assert "autokl: 1 mismatched" in message and key in message


def test_later_file_wins(reference, tmp_path):
  config, state = reference
  key = "autokl.encoder.conv_in.bias"
  first = _save(tmp_path / "a.safetensors", state)
  second = _save(tmp_path / "b.safetensors", {key: state[key] + 1})
  merged = torch_io.open_states([first, second])
  assert len(merged) == len(state)
  np.testing.assert_array_equal(merged[key], state[key] + 1)


@pytest.mark.parametrize("name, match", [("w.npz", "unknown weight file type"),
                                         ("w.safetensors", "not a readable safetensors"),
                                         ("absent.pth", "does not exist")])
def test_unreadable_files(tmp_path, name, match):
  if name != "absent.pth":
    (tmp_path / name).write_bytes(b"not weights")
  with pytest.raises(torch_io.WeightFileError, match=match):
    torch_io.open_state(tmp_path / name)


def test_safetensors_reader(tmp_path):
  """dtypes (bfloat16 widened, int64 kept), 0-d tensors, shapes from the header, and a
  truncated file named."""
  torch = pytest.importorskip("torch")
  import safetensors.torch

  wide = np.array([[1.5, -2.25], [3.0, 0.0078125]], np.float32)  # exact in bfloat16
  tensors = {"b": torch.from_numpy(wide).to(torch.bfloat16), "i": torch.arange(5),
             "s": torch.tensor(2.5), "h": torch.ones(3, dtype=torch.float16)}
  path = tmp_path / "w.safetensors"
  safetensors.torch.save_file(tensors, str(path))
  state = torch_io.open_state(path)
  assert state.shapes() == {"b": (2, 2), "i": (5,), "s": (), "h": (3,)}
  assert state["b"].dtype == np.float32
  np.testing.assert_array_equal(state["b"], wide)
  assert state["i"].dtype == np.int64 and state["i"].tolist() == [0, 1, 2, 3, 4]
  assert state["s"].shape == () and state["s"] == 2.5
  assert state["h"].dtype == np.float32
  path.write_bytes(path.read_bytes()[:-4])
  with pytest.raises(torch_io.WeightFileError, match="not a readable safetensors file.*inside"):
    torch_io.open_state(path)


def test_pth_reads_survive_releasing_pages(tmp_path):
  """Reading a tensor releases its pages of the mapped file; a tensor sharing that storage (a
  tied weight) still reads right, as does a second read."""
  torch = pytest.importorskip("torch")
  wte = torch.randn(3000, 64)
  path = tmp_path / "tied.pth"
  torch.save({"wte": wte, "lm_head": wte, "bias": torch.arange(7)}, path)
  state = torch_io.open_state(path)
  assert state.shapes() == {"wte": (3000, 64), "lm_head": (3000, 64), "bias": (7,)}
  for key in ("wte", "lm_head", "wte"):
    np.testing.assert_array_equal(state[key], wte.numpy())
  assert state["bias"].dtype == np.int64


def test_pth_fp16_converts(reference, tmp_path):
  torch = pytest.importorskip("torch")
  config, state = reference
  path = tmp_path / "codi.pth"
  torch.save({k: torch.from_numpy(v.astype(np.float16)) for k, v in state.items()}, path)
  loaded = torch_io.open_state(path)
  key = "autokl.encoder.conv_in.weight"
  assert loaded[key].dtype == np.float32
  np.testing.assert_array_equal(loaded[key], state[key])
  checkpoint.convert_files([path], config, tmp_path / "ckpt", allow_missing=ABSENT)
  _, params = checkpoint.load_model(tmp_path / "ckpt", ["autokl"])
  np.testing.assert_array_equal(params["autokl"]["encoder"]["conv_in"]["bias"],
                                state["autokl.encoder.conv_in.bias"])


class _Payload:
  """An object a pickle rebuilds by running a shell command (which creates `marker`)."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path, marker = tmp_path / "evil.pth", tmp_path / "payload-ran"
  torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
  with pytest.raises(torch_io.WeightFileError,
                     match=r"evil.pth: refusing to load: the pickle holds code .*posix.system"):
    torch_io.open_state(path)
  assert not marker.exists()
  # The payload is live: an unrestricted load runs it.
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_pickle_of_a_non_state_dict_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "list.pth"
  torch.save({"w": torch.zeros(2), "n": 3}, path)
  with pytest.raises(torch_io.WeightFileError, match="flat"):
    torch_io.open_state(path)


def test_cli_convert_and_export(reference, tmp_path):
  config, state = reference
  small = {k: v for k, v in state.items() if k.startswith("audioldm.vocoder.")}
  src = _save(tmp_path / "voc.safetensors", small)
  env = dict(os.environ, CODI_JAX_CACHE="off")
  run = lambda *args: subprocess.run([sys.executable, "-m", "codi_jax.cli", *args], cwd=REPO,
                                     env=env, capture_output=True, text=True, timeout=120)
  # The tiny preset's vocoder is the fixture's; the other parts are absent.
  assert (components.vocoder_config(config.model)
          == components.vocoder_config(get_config("tiny").model))
  bad = run("convert", "--torch", str(src), "--out", str(tmp_path / "bad"))
  assert bad.returncode == 1 and "diffusers: absent (1144 keys missing)" in bad.stdout, bad.stdout
  prefixes = "model.diffusion_model.,autokl.,audioldm.,optimus.,clip.model.,clap.model."
  # Two files after one --torch; the later one overrides a tensor.
  first = sorted(small)[0]
  small = {**small, first: small[first] + 1}
  again = _save(tmp_path / "again.safetensors", {first: small[first]})
  ok = run("convert", "--torch", str(src), str(again), "--out", str(tmp_path / "ckpt"),
           f"--allow-missing={prefixes}")
  assert ok.returncode == 0, ok.stdout + ok.stderr
  assert "wrote" in ok.stdout and "hifigan_vocoder" in ok.stdout
  out = run("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "v.safetensors"))
  assert out.returncode == 0, out.stdout + out.stderr
  back = safetensors.numpy.load_file(str(tmp_path / "v.safetensors"))
  assert back.keys() == small.keys()
  for k in small:
    np.testing.assert_array_equal(back[k], small[k])


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 300, b"PK\x03\x04truncated zip"])
def test_a_file_that_is_no_pytorch_file_is_named_not_a_traceback(tmp_path, content):
  pytest.importorskip("torch")
  path = tmp_path / "weights.pth"
  path.write_bytes(content)
  with pytest.raises(torch_io.WeightFileError, match=r"weights.pth: not a readable PyTorch file"):
    torch_io.open_state(path)
