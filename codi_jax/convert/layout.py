"""Tensor layouts at the PyTorch boundary: the original is channels-first, we are channels-last.

Per-sample torch layouts: image [C, H, W], video [C, F, H, W], audio [C, T, M], text [C].
Any number of leading axes (batch, DDIM step) is allowed.
"""

from __future__ import annotations

import numpy as np

from codi_jax.modality import Modality

_SAMPLE_NDIM = {Modality.IMAGE: 3, Modality.VIDEO: 4, Modality.AUDIO: 3, Modality.TEXT: 1}


def to_channels_last(modality: Modality, x: np.ndarray) -> np.ndarray:
  """Original layout -> ours (moves the channel axis to the end)."""
  nd = _SAMPLE_NDIM[Modality.parse(modality)]
  if nd == 1:
    return x
  return np.moveaxis(x, x.ndim - nd, -1)


def to_channels_first(modality: Modality, x: np.ndarray) -> np.ndarray:
  """Our layout -> the original's."""
  nd = _SAMPLE_NDIM[Modality.parse(modality)]
  if nd == 1:
    return x
  return np.moveaxis(x, -1, x.ndim - nd)
