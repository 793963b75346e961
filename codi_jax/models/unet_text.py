"""CoDi's text diffuser: `UNet0D`, the fully connected "0-D" UNet on [C, S] features.

Ported from the original `UNetModel0D_MultiDim` (`latent_diffusion/diffusion_unet.py`,
CODI_REFERENCE §2.4). Same block layout as `UNet2D` with every conv replaced by a Linear on the
flattened [C, S] feature (C-major, `c * S + s`), ResBlocks by FCBlocks, and SpatialTransformers
attending over the S "positions". The 768-d Optimus latent enters as [B, 768].

B batch, S positions per level (`second_dim`), C channels. Features are held as [B, S, C].
"""

from __future__ import annotations

import jax

from codi_jax.models.unet import UNet2D


class UNet0D(UNet2D):
  """Text diffuser. x [B, in_channels] -> predicted noise [B, out_channels]."""

  def _fold(self, x: jax.Array) -> tuple[jax.Array, None]:
    if x.ndim != 2:
      raise ValueError(f"{self.name}: expected a text latent [B, C], got shape {x.shape}")
    return x[:, None, :], None  # [B, 1, C]

  def _unfold(self, h: jax.Array, num_frames: None) -> jax.Array:
    return h[:, 0, :]  # [B, C]
