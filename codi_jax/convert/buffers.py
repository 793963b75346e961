"""The original's non-parameter tensors, regenerated for `codi-jax export --names torch`.

The PyTorch CoDi's state dict holds constants our models compute instead: index tables, masks,
DFT bases, mel filters, the DDPM schedule, and one tied weight under a second name. Conversion
recognises and skips them (`KeyMap.buffers`, `checkpoint.SCHEDULE_BUFFERS`); export writes them
back with the original's values and dtypes (int64 index tables), so the file loads into the
PyTorch CoDi with `load_state_dict(strict=True)`. Each is a `Buffer` (shape, dtype, how to make
it), so key sets and shapes can be listed at full size without allocating anything. Keys are
relative to the part's state-dict prefix (`components`); the schedule's are top-level.

Where the values come from (CODI_REFERENCE §6.2, fixture README):
  CLIP        `*.embeddings.position_ids` = arange(positions)[None], int64
  Optimus     GPT-2 `h.<i>.attn.bias` = tril(ones(n_ctx, n_ctx))[None, None], float32 (this GPT-2
              registers no `masked_bias`); `lm_head.weight` is `transformer.wte.weight`
  CLAP        Swin `relative_position_index` (int64), shifted-window `attn_mask` (float32), bn0's
              `num_batches_tracked` (0; eval never reads it); `lazy`: torchlibrosa's STFT conv
              weights and `melW`, which HTSAT's `init_spec` creates at its first forward call,
              so a freshly built CoDi (and `manifest_full.json`) lacks them
  AudioLDM    `fn_STFT` (TacotronSTFT): `mel_basis`, `stft_fn.forward_basis` / `inverse_basis`
  diffusers   the DDPM wrapper's `register_schedule` buffers (`diffusion.schedule`)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import numpy as np

from codi_jax.audio import mel
from codi_jax.audio.stft import hann_window
from codi_jax.diffusion.schedule import ScheduleConfig, ddpm_schedule
from codi_jax.models.clap import ClapConfig, relative_position_index, shifted_window_mask
from codi_jax.models.clip import CLIPConfig
from codi_jax.models.optimus import OptimusConfig

INT64, FLOAT32 = np.dtype(np.int64), np.dtype(np.float32)

# The top-level buffers of the original's DDPM (`register_schedule`), in its order.
SCHEDULE = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2")


@dataclasses.dataclass(frozen=True)
class Buffer:
  """One tensor of the original's state dict that is not one of our parameters."""

  shape: tuple[int, ...]
  dtype: np.dtype
  make: Callable[[], np.ndarray] | None = None  # its value; None for a tied copy
  tied_to: str | None = None  # the parameter key (same prefix) it is a second name of
  lazy: bool = False  # created at the original's first forward call, absent when freshly built

  def value(self, part_state: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensor, from the part's own tensors (keys without prefix) for a tied copy."""
    v = np.asarray(part_state[self.tied_to] if self.tied_to else self.make())
    if v.shape != self.shape or v.dtype != self.dtype:
      raise ValueError(f"buffer made as {v.dtype}{list(v.shape)}, declared "
                       f"{self.dtype}{list(self.shape)}")
    return v


def _position_ids(n: int) -> Buffer:
  return Buffer((1, n), INT64, lambda: np.arange(n, dtype=np.int64)[None])


def clip_buffers(config: CLIPConfig) -> dict[str, Buffer]:
  return {"text_model.embeddings.position_ids": _position_ids(config.text.max_positions),
          "vision_model.embeddings.position_ids": _position_ids(config.vision.num_positions)}


@functools.lru_cache(maxsize=4)
def _causal_mask(n: int) -> np.ndarray:
  mask = np.tril(np.ones((n, n), np.float32))[None, None]  # [1, 1, n, n]
  mask.flags.writeable = False
  return mask


def optimus_buffers(config: OptimusConfig) -> dict[str, Buffer]:
  """GPT-2's causal masks (n_ctx = n_positions in every original config) and the tied head."""
  d = config.decoder
  n = d.n_positions
  out = {f"decoder.transformer.h.{i}.attn.bias": Buffer((1, 1, n, n), FLOAT32,
                                                        functools.partial(_causal_mask, n))
         for i in range(d.n_layer)}
  out["decoder.lm_head.weight"] = Buffer((d.vocab_size, d.n_embd), FLOAT32,
                                         tied_to="decoder.transformer.wte.weight")
  return out


def _windowed_dft(n_fft: int, win_length: int) -> tuple[np.ndarray, np.ndarray]:
  """torchlibrosa `DFTBase` rows k < n_fft/2 + 1 times the centred periodic Hann window: the real
  and imaginary parts [K, n_fft] (float64)."""
  window = np.zeros(n_fft)
  left = (n_fft - win_length) // 2  # librosa `pad_center`
  window[left:left + win_length] = hann_window(win_length, periodic=True)
  k = np.arange(n_fft // 2 + 1)[:, None]
  n = np.arange(n_fft)[None, :]
  angle = 2.0 * np.pi * ((k * n) % n_fft) / n_fft  # exact phase, as omega ** (k n)
  return np.cos(angle) * window, -np.sin(angle) * window


def clap_buffers(config: ClapConfig) -> dict[str, Buffer]:
  h, a = config.htsat, config.audio
  out = {"audio_branch.bn0.num_batches_tracked": Buffer((), INT64,
                                                        lambda: np.zeros((), np.int64))}
  for i, depth in enumerate(h.depths):
    size, window, shift = h.stage_window(i)
    n = window * window
    for j in range(depth):
      block = f"audio_branch.layers.{i}.blocks.{j}."
      out[block + "attn.relative_position_index"] = Buffer(
          (n, n), INT64, lambda w=window: relative_position_index(w).astype(np.int64))
      if j % 2 and shift:  # odd blocks shift their windows, unless one window covers the grid
        out[block + "attn_mask"] = Buffer(
            ((size // window) ** 2, n, n), FLOAT32,
            lambda s=size, w=window, t=shift: shifted_window_mask(s, w, t))
  k = a.window_size // 2 + 1
  dft = functools.lru_cache(maxsize=1)(lambda: _windowed_dft(a.window_size, a.window_size))
  stft = "audio_branch.spectrogram_extractor.stft."
  for name, part in (("conv_real", 0), ("conv_imag", 1)):
    out[f"{stft}{name}.weight"] = Buffer(
        (k, 1, a.window_size), FLOAT32, lambda p=part: dft()[p].astype(np.float32)[:, None, :],
        lazy=True)
  out["audio_branch.logmel_extractor.melW"] = Buffer(
      (k, a.mel_bins), FLOAT32, lazy=True, make=lambda: np.ascontiguousarray(mel.mel_filterbank(
          a.sample_rate, a.window_size, a.mel_bins, a.fmin, a.fmax).T))
  return out


@functools.lru_cache(maxsize=1)
def _tacotron_bases() -> tuple[np.ndarray, np.ndarray]:
  """AudioLDM's `STFT(filter_length=1024, hop_length=160, win_length=1024)` buffers, computed
  as it does: float64 DFT rows, cast to float32, times the float32 window in float32."""
  n_fft, hop = mel.N_FFT, mel.HOP
  fourier = np.fft.fft(np.eye(n_fft))
  cutoff = n_fft // 2 + 1
  fourier = np.vstack([np.real(fourier[:cutoff]), np.imag(fourier[:cutoff])])  # [2K, n_fft]
  inverse = np.linalg.pinv(n_fft / hop * fourier).T  # [2K, n_fft]
  window = np.zeros(n_fft)
  left = (n_fft - mel.WIN_LENGTH) // 2
  window[left:left + mel.WIN_LENGTH] = hann_window(mel.WIN_LENGTH, periodic=True)
  window = window.astype(np.float32)
  bases = tuple((b.astype(np.float32) * window)[:, None, :] for b in (fourier, inverse))
  for b in bases:
    b.flags.writeable = False
  return bases


def audioldm_buffers() -> dict[str, Buffer]:
  """TacotronSTFT's constants (fixed sizes: `codi_jax.audio.mel`)."""
  k2 = 2 * (mel.N_FFT // 2 + 1)
  return {
      "fn_STFT.mel_basis": Buffer(
          (mel.N_MELS, mel.N_FFT // 2 + 1), FLOAT32, lambda: mel.mel_filterbank(
              mel.SAMPLE_RATE, mel.N_FFT, mel.N_MELS, mel.FMIN, mel.FMAX)),
      "fn_STFT.stft_fn.forward_basis": Buffer((k2, 1, mel.N_FFT), FLOAT32,
                                              lambda: _tacotron_bases()[0]),
      "fn_STFT.stft_fn.inverse_basis": Buffer((k2, 1, mel.N_FFT), FLOAT32,
                                              lambda: _tacotron_bases()[1]),
  }


def schedule_buffers(config: ScheduleConfig) -> dict[str, Buffer]:
  """The DDPM schedule (float32 [num_timesteps] each), top-level keys."""
  schedule = functools.lru_cache(maxsize=1)(lambda: ddpm_schedule(config))
  return {name: Buffer((config.num_timesteps,), FLOAT32,
                       lambda n=name: getattr(schedule(), n).astype(np.float32, copy=False))
          for name in SCHEDULE}
