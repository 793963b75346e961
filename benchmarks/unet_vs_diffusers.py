r"""Our image diffuser against diffusers' PyTorch `UNet2DConditionModel`, in one run, one device.

  .venv/bin/python benchmarks/unet_vs_diffusers.py --size tiny|small|full [--resolution 256] \
      [--batch 16] [--dtype float32|bfloat16] [--steps 10] [--ddim_steps 50] \
      [--attention xla|cudnn] [--torch_compile on|off] [--json out.json]

Needs the `bench` extra (pip install -e '.[bench]': torch and diffusers); no weights are
downloaded (random init on both sides).

Both sides build the image diffuser of a `configs/codi.py` preset (`--size`) without CoDi's
video and connector layers: SD-1.x's UNet topology with the preset's channels, levels, res blocks
per level, attention levels, heads and context width. The parameter counts must be equal (checked,
printed). Both run, on the same batch shape (`--batch` latents of `--resolution`/8 squared, 4
channels; a [B, 1, context] condition token as CoDi uses), in the same compute dtype with float32
master weights (ours: the model dtype; PyTorch: autocast):
  train step  epsilon-MSE at uniform timesteps on fresh noise, AdamW (lr 1e-4, weight decay 0.01);
              ours is `codi_jax.diffusion.losses.epsilon_loss` + optax inside one jitted step.
  sampling    DDIM (eta 0) with classifier-free guidance 7.5: one network call on the doubled
              batch per step; ours is `codi_jax.diffusion.ddim.DDIMSampler` (one lax.scan),
              PyTorch's a Python loop over `DDIMScheduler` (as diffusers' pipelines run it).
PyTorch runs eager (SDPA attention, torch 2's default) and, unless --torch_compile off, under
`torch.compile` (its failure, if any, is reported, not fatal). Reported per side: train steps/s,
examples/s, sampling seconds per DDIM step and per image, compile (or first-call) seconds,
TFLOP/s and MFU from XLA's FLOP count of our programs (the same model FLOPs on both sides), and
ours / PyTorch ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any, Callable

# PyTorch's OpenMP threads spin while they wait; on a CPU shared with other work (or with XLA's
# own thread pool, in this same process) that spinning starved its kernels: 5 GFLOP/s instead of
# 100 for a 3x3 convolution on the 2-core machine of RESULTS.md. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_RESOLUTION = {"tiny": 64, "small": 128, "full": 256}
DEFAULT_BATCH = {"tiny": 4, "small": 2, "full": 16}
LEARNING_RATE, WEIGHT_DECAY, GUIDANCE = 1e-4, 0.01, 7.5


def unet_config(size: str):
  """The preset's image diffuser as a plain 2-D UNet (no video or connector layers)."""
  from codi_jax.models.unet import UNetConfig
  from configs.codi import get_config

  config = get_config(size)
  return dataclasses.replace(UNetConfig(**dict(config.model.image)), video=False), config


def _timed(fn: Callable[[], Any], sync: Callable[[Any], Any], steps: int, warmup: int
           ) -> tuple[float, float]:
  """(seconds of the first call, seconds per call over `steps` calls after `warmup` more)."""
  start = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - start
  for _ in range(warmup):
    sync(fn())
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  sync(out)
  return first, (time.perf_counter() - start) / steps


# --- ours ---------------------------------------------------------------------------------------

def run_ours(args, cfg, latent: int, schedule_config) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import optax

  from codi_jax.train.step import cost_flops
  from codi_jax.diffusion.ddim import DDIMSampler
  from codi_jax.diffusion.losses import epsilon_loss
  from codi_jax.modality import Modality
  from codi_jax.models.unet import UNet2D
  from codi_jax.parallel.sharding import unbox

  unet = UNet2D(cfg, attention_impl=args.attention, dtype=jnp.dtype(args.dtype), remat=args.remat)
  b, image = args.batch, Modality.IMAGE
  x0 = jax.random.normal(jax.random.key(1), (b, latent, latent, cfg.in_channels))  # [B, H, W, 4]
  context = jax.random.normal(jax.random.key(2), (b, 1, cfg.context_dim))  # [B, 1, D]
  params = jax.jit(lambda: unbox(unet.init(jax.random.key(0), x0, jnp.zeros((b,), jnp.int32),
                                           context)["params"]))()
  count = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
  model_fn = lambda p, x, t, c: {m: unet.apply({"params": p}, v, t, c) for m, v in x.items()}
  optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

  def train_step(params, opt_state, step):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(jax.random.key(3), step), i)
                    )(jnp.arange(b))
    loss_fn = lambda p: epsilon_loss(model_fn, p, {image: x0}, context, keys, schedule_config)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, step + 1, loss

  start = time.perf_counter()
  step_fn = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, optimizer.init(params), jnp.zeros((), jnp.int32)).compile()
  train_compile = time.perf_counter() - start
  train_flops = cost_flops(step_fn)
  state = [params, optimizer.init(params), jnp.zeros((), jnp.int32)]
  sample_params = jax.tree_util.tree_map(jnp.copy, params)

  def one_step():
    state[0], state[1], state[2], loss = step_fn(*state)
    return loss

  _, train_s = _timed(one_step, jax.block_until_ready, args.steps, args.warmup)

  sampler = DDIMSampler(model_fn, args.ddim_steps, 0.0, schedule=schedule_config)
  x_T = {image: jax.random.normal(jax.random.key(4), x0.shape)}
  uncond = jnp.zeros_like(context)
  start = time.perf_counter()
  sample_fn = jax.jit(lambda p, x, c, u: sampler(p, x, c, u, GUIDANCE).samples).lower(
      sample_params, x_T, context, uncond).compile()
  sample_compile = time.perf_counter() - start
  # XLA counts the scan body once: FLOPs of sampling = ddim_steps guided calls (2B rows each).
  call = jax.jit(lambda p, x, t, c: model_fn(p, x, t, c)).lower(
      sample_params, {image: jnp.concatenate([x0, x0])}, jnp.zeros((2 * b,), jnp.int32),
      jnp.concatenate([context, context]))
  call_flops = cost_flops(call)
  _, sample_s = _timed(lambda: sample_fn(sample_params, x_T, context, uncond),
                       jax.block_until_ready, max(1, args.sample_steps), 0)
  device = jax.devices()[0]
  memory = (device.memory_stats() or {}).get("peak_bytes_in_use")
  return dict(params=count, device=f"{device.platform}: {device.device_kind}",
              train_compile_s=train_compile, train_step_s=train_s,
              train_flops_per_step=train_flops, sample_compile_s=sample_compile,
              sample_s=sample_s, sample_flops=call_flops and call_flops * args.ddim_steps,
              memory_peak_bytes=memory, final_loss=float(one_step()))


# --- PyTorch ------------------------------------------------------------------------------------

def torch_unet(cfg, resolution_latent: int):
  from diffusers import UNet2DConditionModel

  down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
  up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
  # attention_head_dim is diffusers' (historically misnamed) number of heads for SD-1.x layouts.
  return UNet2DConditionModel(
      sample_size=resolution_latent, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
      layers_per_block=cfg.num_res_blocks, down_block_types=down, up_block_types=up,
      mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cfg.context_dim,
      attention_head_dim=cfg.num_heads, norm_num_groups=32, act_fn="silu",
      flip_sin_to_cos=True, freq_shift=0)


def run_torch(args, cfg, latent: int, compiled: bool) -> dict[str, Any]:
  import torch
  from diffusers import DDIMScheduler

  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
  sync = (lambda out: torch.cuda.synchronize()) if device.type == "cuda" else (lambda out: out)
  torch.manual_seed(0)
  model = torch_unet(cfg, latent).to(device)
  count = sum(p.numel() for p in model.parameters())
  # Static shapes: one specialised graph per batch shape (train B, sampling 2B), as a user
  # compiling for speed would ask; default mode (max-autotune compiles far longer).
  net = torch.compile(model, dynamic=False) if compiled else model
  autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                            beta_schedule="scaled_linear", clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1)
  alphas = scheduler.alphas_cumprod.to(device)
  b = args.batch
  x0 = torch.randn(b, cfg.in_channels, latent, latent, device=device)  # [B, 4, H, W]
  context = torch.randn(b, 1, cfg.context_dim, device=device)  # [B, 1, D]
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def train_step():
    t = torch.randint(0, 1000, (b,), device=device)
    noise = torch.randn_like(x0)
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with autocast():
      eps = net(x_t, t, encoder_hidden_states=context).sample
    loss = torch.nn.functional.mse_loss(eps.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  result: dict[str, Any] = dict(params=count, device=str(device), compiled=compiled)
  try:
    result["train_first_call_s"], result["train_step_s"] = _timed(train_step, sync, args.steps,
                                                                   args.warmup)
    result["final_loss"] = float(train_step().detach())
  except Exception as e:  # torch.compile failures surface at the first call
    result["error"] = f"train: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result

  uncond = torch.zeros_like(context)

  @torch.inference_mode()
  def sample():
    scheduler.set_timesteps(args.ddim_steps)
    x = torch.randn_like(x0)
    for t in scheduler.timesteps:
      with autocast():
        eps = net(torch.cat([x, x]), torch.full((2 * b,), int(t), device=device),
                  encoder_hidden_states=torch.cat([uncond, context])).sample.float()
      e_u, e_c = eps.chunk(2)
      x = scheduler.step(e_u + GUIDANCE * (e_c - e_u), t, x).prev_sample
    return x

  try:
    result["sample_first_call_s"], result["sample_s"] = _timed(sample, sync,
                                                               max(1, args.sample_steps), 0)
  except Exception as e:
    result["error"] = f"sampling: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
  if device.type == "cuda":
    result["memory_peak_bytes"] = int(torch.cuda.max_memory_allocated())
  return result


# --- the comparison -----------------------------------------------------------------------------

def derived(side: dict[str, Any], args, flops: dict[str, float | None], peak: float | None
            ) -> dict[str, Any]:
  """Rates of one side from its timings and our FLOP counts (the same model on both sides)."""
  out = {}
  if "train_step_s" in side:
    out["train_steps_per_s"] = 1.0 / side["train_step_s"]
    out["train_examples_per_s"] = args.batch / side["train_step_s"]
    if flops["train"]:
      out["train_tflops_per_s"] = flops["train"] / side["train_step_s"] / 1e12
  if "sample_s" in side:
    out["sample_s_per_ddim_step"] = side["sample_s"] / args.ddim_steps
    out["sample_s_per_image"] = side["sample_s"] / args.batch
    if flops["sample"]:
      out["sample_tflops_per_s"] = flops["sample"] / side["sample_s"] / 1e12
  if peak:
    for k in ("train", "sample"):
      if f"{k}_tflops_per_s" in out:
        out[f"{k}_mfu"] = out[f"{k}_tflops_per_s"] / peak
  return out


def table(result: dict[str, Any]) -> str:
  sides = result["sides"]
  names = list(sides)
  rows = [("parameters", lambda s: f"{s['params']:,}"),
          ("compile|1st call s (train/sample)", lambda s: "/".join(
              f"{s[k]:.1f}" for k in ("train_compile_s", "train_first_call_s",
                                       "sample_compile_s", "sample_first_call_s") if k in s)),
          ("train steps/s", lambda s: f"{s['train_steps_per_s']:.3f}"),
          ("train examples/s", lambda s: f"{s['train_examples_per_s']:.2f}"),
          ("train TFLOP/s", lambda s: f"{s['train_tflops_per_s']:.4f}"),
          ("train MFU", lambda s: f"{100 * s['train_mfu']:.1f} %"),
          ("sample s/DDIM step", lambda s: f"{s['sample_s_per_ddim_step']:.4f}"),
          ("sample s/image", lambda s: f"{s['sample_s_per_image']:.3f}"),
          ("sample TFLOP/s", lambda s: f"{s['sample_tflops_per_s']:.4f}"),
          ("sample MFU", lambda s: f"{100 * s['sample_mfu']:.1f} %"),
          ("memory peak GiB", lambda s: f"{s['memory_peak_bytes'] / 1024 ** 3:.2f}")]

  def cell(fn, side):
    try:
      return fn(side)
    except (KeyError, TypeError):
      return "-"

  body = [[label] + [cell(fn, sides[n]) for n in names] for label, fn in rows]
  body = [r for r in body if any(c != "-" for c in r[1:])]
  head = [""] + names
  widths = [max(len(r[i]) for r in body + [head]) for i in range(len(head))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths)))
  c = result["config"]
  lines = [f"image diffuser, {c['size']} ({c['channels']} ch, mult {c['channel_mult']}, "
           f"{c['num_res_blocks']} res blocks, attention {c['attention']}, {c['heads']} heads, "
           f"context {c['context_dim']}), latent {c['latent']}, batch {c['batch']}, "
           f"{c['dtype']}, {c['ddim_steps']} DDIM steps on {result['device']}",
           fmt(head)] + [fmt(r) for r in body]
  for name, ratio in result["ratios"].items():
    lines.append(f"ours / {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
  for name, side in sides.items():
    if "error" in side:
      lines.append(f"{name} failed: {side['error']}")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(DEFAULT_RESOLUTION), default="tiny")
  parser.add_argument("--resolution", type=int, help="image side in pixels (latent = /8)")
  parser.add_argument("--batch", type=int, help="latents per train step / images per sampling")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed train steps after the first")
  parser.add_argument("--ddim_steps", type=int, default=10)
  parser.add_argument("--sample_steps", type=int, default=1, help="timed sampling runs")
  parser.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                      help="our attention kernel (cudnn: the fused GPU kernel, bf16)")
  parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
  parser.add_argument("--torch_compile", choices=("on", "off"), default="on")
  parser.add_argument("--peak_tflops", type=float, help="peak per device for MFU (default: "
                      "by device kind, see codi_jax.bench.PEAKS)")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args()
  args.resolution = args.resolution or DEFAULT_RESOLUTION[args.size]
  args.batch = args.batch or DEFAULT_BATCH[args.size]
  try:
    import diffusers  # noqa: F401
    import torch
  except ImportError as e:
    raise SystemExit(f"unet_vs_diffusers: needs the bench extra (pip install -e '.[bench]'): {e}")
  import jax

  from codi_jax.bench import peak_tflops
  from codi_jax.diffusion.schedule import ScheduleConfig

  cfg, config = unet_config(args.size)
  if args.resolution % 8 or (args.resolution // 8) % 2 ** (len(cfg.channel_mult) - 1):
    raise SystemExit(f"--resolution {args.resolution} must be 8 x a multiple of "
                     f"{2 ** (len(cfg.channel_mult) - 1)} for the {args.size} UNet")
  latent = args.resolution // 8
  schedule = ScheduleConfig(**config.diffusion)
  ours = run_ours(args, cfg, latent, schedule)
  sides = {"ours (JAX)": ours}
  variants = [("PyTorch eager", False)] + ([("PyTorch compile", True)]
                                           if args.torch_compile == "on" else [])
  for name, compiled in variants:
    sides[name] = run_torch(args, cfg, latent, compiled)
    if sides[name]["params"] != ours["params"]:
      raise SystemExit(f"parameter counts differ: ours {ours['params']:,}, diffusers "
                       f"{sides[name]['params']:,}; the configurations do not match")
  kind = jax.devices()[0].device_kind
  peak, basis = peak_tflops(kind, args.dtype, args.peak_tflops)
  flops = {"train": ours["train_flops_per_step"], "sample": ours["sample_flops"]}
  for side in sides.values():
    side.update(derived(side, args, flops, peak))
  ratios = {}
  for name in list(sides)[1:]:
    r = {}
    for key, better in (("train_steps_per_s", "train throughput"),
                        ("sample_s_per_ddim_step", "sampling speed")):
      if key in ours and key in sides[name]:
        a, b = ours[key], sides[name][key]
        r[better] = a / b if key.endswith("per_s") else b / a
    ratios[name] = r
  result = dict(
      config=dict(size=args.size, channels=cfg.model_channels, channel_mult=list(cfg.channel_mult),
                  num_res_blocks=list(cfg.num_res_blocks), attention=list(cfg.attention),
                  heads=cfg.num_heads, context_dim=cfg.context_dim, resolution=args.resolution,
                  latent=[latent, latent, cfg.in_channels], batch=args.batch, dtype=args.dtype,
                  ddim_steps=args.ddim_steps, attention_impl=args.attention, remat=args.remat),
      device=f"{ours['device']}, {jax.device_count()} device(s)", peak_tflops=peak,
      peak_basis=basis, versions=dict(jax=jax.__version__, torch=torch.__version__,
                                      diffusers=diffusers.__version__),
      torch_threads=torch.get_num_threads(), omp_wait_policy=os.environ["OMP_WAIT_POLICY"],
      sides=sides, ratios=ratios)
  print(table(result))
  if args.json:
    from codi_jax.io_utils import atomic_write_json

    atomic_write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
