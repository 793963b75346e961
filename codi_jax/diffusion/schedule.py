"""The DDPM noise schedule and CoDi's DDIM discretisation (CODI_REFERENCE §4).

Plain numpy, computed once per configuration (host constants, not traced): the original builds
the scaled-linear betas in float64, derives every buffer in float64 and stores float32
(`DDPM.register_schedule`); its DDIM sampler then selects from the float32 `alphas_cumprod`
(`make_ddim_timesteps`, `make_ddim_sampling_parameters`). We reproduce both, including the quirks:
timesteps `arange(0, T, T // S) + 1` (which gives more than S steps when S does not divide T) and
`alphas_prev[0] = alphas_cumprod[0]` (not 1).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  num_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012

  def __post_init__(self):
    if self.num_timesteps < 2:
      raise ValueError(f"num_timesteps must be at least 2, got {self.num_timesteps}")
    if not 0 < self.beta_start < self.beta_end < 1:
      raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, "
                       f"{self.beta_end}")


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
  """Every buffer of the original `DDPM.register_schedule` (float32), plus float64 sources."""

  betas_float64: np.ndarray
  alphas_cumprod_float64: np.ndarray
  betas: np.ndarray
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  log_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


@functools.lru_cache(maxsize=8)
def ddpm_schedule(config: ScheduleConfig = ScheduleConfig()) -> DDPMSchedule:
  """Scaled-linear ("linear" in the original) schedule: linspace(sqrt(b0), sqrt(b1), T) ** 2."""
  betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_timesteps,
                      dtype=np.float64) ** 2
  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.append(1.0, ac[:-1])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  f32 = lambda a: np.asarray(a, np.float32)
  return DDPMSchedule(
      betas_float64=betas,
      alphas_cumprod_float64=ac,
      betas=f32(betas),
      alphas_cumprod=f32(ac),
      alphas_cumprod_prev=f32(ac_prev),
      sqrt_alphas_cumprod=f32(np.sqrt(ac)),
      sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
      log_one_minus_alphas_cumprod=f32(np.log(1.0 - ac)),
      sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
      sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1)),
      posterior_variance=f32(post_var),
      posterior_log_variance_clipped=f32(np.log(np.maximum(post_var, 1e-20))),
      posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
      posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
  )


@dataclasses.dataclass(frozen=True)
class DDIMParameters:
  """Per-step arrays, in the order the original stores them (ascending timesteps)."""

  timesteps: np.ndarray  # int64 [n]
  alphas: np.ndarray  # [n], float32 values (stored float64 like the original's)
  alphas_prev: np.ndarray  # [n]
  sigmas: np.ndarray  # [n] float32
  sqrt_one_minus_alphas: np.ndarray  # [n] float32

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


def ddim_parameters(num_steps: int, eta: float = 0.0,
                    schedule: DDPMSchedule | None = None) -> DDIMParameters:
  """`make_ddim_timesteps('uniform')` + `make_ddim_sampling_parameters`, as the original."""
  schedule = schedule or ddpm_schedule()
  total = schedule.num_timesteps
  if not 1 <= num_steps <= total:
    raise ValueError(f"DDIM steps must be in [1, {total}], got {num_steps}")
  if eta < 0:
    raise ValueError(f"eta must be >= 0, got {eta}")
  timesteps = np.arange(0, total, total // num_steps, dtype=np.int64) + 1
  if timesteps[-1] >= total:  # e.g. S=3: 999 + 1; the original fails here with an IndexError
    raise ValueError(f"{num_steps} DDIM steps over {total} timesteps select timestep {total}, "
                     "which does not exist")
  ac = schedule.alphas_cumprod  # float32, as the sampler sees it
  alphas = ac[timesteps].astype(np.float64)
  alphas_prev = np.asarray([ac[0]] + ac[timesteps[:-1]].tolist(), np.float64)
  sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  return DDIMParameters(
      timesteps=timesteps,
      alphas=alphas,
      alphas_prev=alphas_prev,
      sigmas=sigmas.astype(np.float32),
      sqrt_one_minus_alphas=np.sqrt(1.0 - ac[timesteps]).astype(np.float32),
  )
