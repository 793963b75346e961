"""`codi-jax bench train|sample` run as users run them, the peak table, and the side-by-side
benchmark's model equivalence (when diffusers is installed)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from codi_jax.bench import peak_tflops
from tests.conftest import REPO
from tests.cpu_devices import xla_flags


def bench(tmp_path, *args, devices=2, check=True):
  """Runs `codi-jax bench ...` on `devices` simulated CPU devices; returns (process, JSON)."""
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices))
  proc = subprocess.run([sys.executable, "-m", "codi_jax.cli", "bench", *args, "--json",
                         str(out), "--quiet"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc, (json.loads(out.read_text()) if out.is_file() else None)


def positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# The autoencoders stage with only the image VAE is the cheapest real train step to compile.
TRAIN = ("train", "--config", "configs/codi.py:tiny", "--config.stage=autoencoders",
         "--config.train.autoencoders=autokl", "--config.data.image_size=32",
         "--config.train.batch_size=2", "--steps", "2", "--warmup", "0")


def test_bench_train_json_and_mfu(tmp_path):
  proc, r = bench(tmp_path, *TRAIN)
  assert "steps/s" in proc.stdout and "MFU" in proc.stdout
  assert r["kind"] == "train" and r["stage"] == "autoencoders" and r["devices"] == 2
  for key in ("steps_per_s", "examples_per_s", "compile_s", "flops_per_step_per_device",
              "tflops_per_s_per_device", "memory_peak_bytes", "trainable_params"):
    assert positive(r[key]), (key, r[key])
  assert r["examples_per_s"] == pytest.approx(2 * r["steps_per_s"])
  assert r["examples_per_s_per_device"] == pytest.approx(r["steps_per_s"])  # batch 2, 2 devices
  assert r["tflops_per_s_per_device"] == pytest.approx(
      r["flops_per_step_per_device"] * r["steps_per_s"] / 1e12)
  assert math.isfinite(r["final_loss"])
  assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # CPU: no known peak

  # With a peak, MFU is achieved / peak (the compiled step comes from the persistent cache).
  _, given = bench(tmp_path, *TRAIN, "--peak_tflops", "0.5")
  assert given["peak_tflops_per_device"] == 0.5 and given["peak_basis"] == "given"
  assert given["mfu"] == pytest.approx(given["tflops_per_s_per_device"] / 0.5)
  assert positive(given["compile_s"])


def test_bench_sample_json(tmp_path):
  proc, r = bench(tmp_path, "sample", "--config", "configs/codi.py:tiny", "--outputs",
                  "image,audio", "--ddim_steps", "2", "--steps", "1", "--warmup", "0",
                  "--peak_tflops", "2")
  assert "items/s" in proc.stdout
  assert r["kind"] == "sample" and r["outputs"] == ["audio", "image"]
  assert r["batch_items"] == 2  # default: one item per batch shard
  for key in ("items_per_s", "batches_per_s", "compile_s", "flops_per_item",
              "flops_per_batch_per_device", "mfu", "memory_peak_bytes"):
    assert positive(r[key]), (key, r[key])
  assert r["ddim_steps_per_s"] == pytest.approx(2 * r["batches_per_s"])
  assert r["items_per_s_per_device"] == pytest.approx(r["items_per_s"] / 2)
  assert r["mfu"] == pytest.approx(r["tflops_per_s_per_device"] / 2)
  assert any("DDIM loop" in n for n in r["notes"])  # the loop's uncounted step was added


@pytest.mark.parametrize("args, message", [
    (("frobnicate",), "expected one of train | sample after `bench`, got frobnicate"),
    ((), "got nothing"),
    (("train", "sample"), "got train sample"),
])
def test_bench_needs_one_subcommand(tmp_path, args, message):
  proc, r = bench(tmp_path, *args, check=False)
  assert proc.returncode != 0 and message in proc.stderr and r is None


def test_bench_sample_rejects_a_batch_the_mesh_cannot_split(tmp_path):
  proc, _ = bench(tmp_path, "sample", "--batch", "3", check=False)
  assert proc.returncode != 0 and "--batch 3 must be a positive multiple" in proc.stderr


@pytest.mark.parametrize("kind, dtype, peak, basis", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0, "h100 bf16"),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0, "h100 pcie bf16"),
    ("NVIDIA H200", "float32", 495.0, "h200 tf32"),
    ("NVIDIA A100-SXM4-80GB", "float32", 156.0, "a100 tf32"),
    ("TPU v5 lite", "bfloat16", 197.0, "tpu v5 lite bf16"),
    ("TPU v5", "bfloat16", 459.0, "tpu v5 bf16"),
    ("TPU v6 lite", "float32", 918.0, "tpu v6 lite bf16"),
    ("cpu", "bfloat16", None, "unknown"),
])
def test_peak_table(kind, dtype, peak, basis):
  value, what = peak_tflops(kind, dtype)
  assert value == peak and what.startswith(basis)


def test_peak_fp32_when_matmuls_run_at_highest_precision():
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  try:
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float32") == (67.0, "h100 fp32 dense")
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.0
  finally:
    jax.config.update("jax_default_matmul_precision", None)


def test_peak_given_wins_and_must_be_positive():
  assert peak_tflops("cpu", "float32", 1.5) == (1.5, "given")
  with pytest.raises(ValueError, match="peak_tflops must be positive"):
    peak_tflops("cpu", "float32", 0.0)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None
                    or importlib.util.find_spec("torch") is None,
                    reason="the side-by-side benchmark needs the bench extra (torch, diffusers)")
@pytest.mark.parametrize("size", ["tiny", "small", "full"])
def test_side_by_side_models_have_equal_parameter_counts(size):
  """benchmarks/unet_vs_diffusers.py compares like with like: diffusers' UNet2DConditionModel
  built from a preset has exactly our image UNet's parameter count (no memory used)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  sys.path.insert(0, str(REPO / "benchmarks"))
  try:
    import unet_vs_diffusers as side
  finally:
    sys.path.pop(0)
  from codi_jax.models.unet import UNet2D

  cfg, _ = side.unet_config(size)
  unet = UNet2D(cfg)
  shapes = jax.eval_shape(lambda: unet.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, 1, cfg.context_dim)))["params"])
  ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  with torch.device("meta"):
    theirs = sum(p.numel() for p in side.torch_unet(cfg, 8).parameters())
  assert ours == theirs
  assert size != "full" or ours == 859_520_964  # SD-1.x's UNet
