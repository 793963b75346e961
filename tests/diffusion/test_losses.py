"""Epsilon loss: one shared timestep per sample, per-modality MSE, mean over modalities."""

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.diffusion.losses import add_noise, epsilon_loss
from codi_jax.diffusion.schedule import ddpm_schedule
from codi_jax.modality import Modality


def test_add_noise_matches_schedule():
  s = ddpm_schedule()
  x0, noise = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
  t = jnp.array([0, 999])
  out = add_noise(x0, noise, t)
  idx = [0, 999]
  expected = s.sqrt_alphas_cumprod[idx, None] + 2 * s.sqrt_one_minus_alphas_cumprod[idx, None]
  np.testing.assert_allclose(out, np.broadcast_to(expected, (2, 3)), rtol=1e-6)


def test_loss_is_zero_for_a_perfect_denoiser_and_shares_t():
  x0 = {Modality.IMAGE: jnp.ones((4, 2, 2, 4)), Modality.TEXT: jnp.zeros((4, 8))}
  s = ddpm_schedule()
  seen = []

  def oracle(params, x_t, t, ctx):
    seen.append(t)
    # Recover eps exactly from x_t and the known x0.
    out = {}
    for m, x in x_t.items():
      shape = (-1,) + (1,) * (x.ndim - 1)
      a = jnp.asarray(s.sqrt_alphas_cumprod)[t].reshape(shape)
      b = jnp.asarray(s.sqrt_one_minus_alphas_cumprod)[t].reshape(shape)
      out[m] = (x - a * x0[m]) / b
    return out

  loss, per = epsilon_loss(oracle, None, x0, jnp.zeros((4, 1, 8)),
                           jax.random.split(jax.random.key(0), 4))
  assert len(seen) == 1 and seen[0].shape == (4,)  # one t per sample for every modality
  assert float(loss) < 1e-8 and set(per) == set(x0)


def test_loss_of_zero_prediction_is_noise_power():
  x0 = {Modality.AUDIO: jnp.zeros((64, 8, 8, 8))}
  zero = lambda p, x, t, c: {m: jnp.zeros_like(v) for m, v in x.items()}
  loss, _ = epsilon_loss(zero, None, x0, jnp.zeros((64, 1, 8)),
                         jax.random.split(jax.random.key(0), 64))
  assert abs(float(loss) - 1.0) < 0.05


def test_each_example_draws_from_its_own_key():
  """Rows permuted with their keys give the same per-row terms: a loss is batch-independent."""
  x0 = {Modality.IMAGE: jax.random.normal(jax.random.key(1), (6, 4, 4, 4))}
  keys = jax.random.split(jax.random.key(2), 6)
  ident = lambda p, x, t, c: {m: x[m] * 0.5 + t.reshape((-1, 1, 1, 1)) * 1e-3 for m in x}
  loss, _ = epsilon_loss(ident, None, x0, jnp.zeros((6, 1, 8)), keys)
  perm = jnp.array([3, 0, 5, 1, 4, 2])
  loss_perm, _ = epsilon_loss(ident, None, {Modality.IMAGE: x0[Modality.IMAGE][perm]},
                              jnp.zeros((6, 1, 8)), keys[perm])
  assert abs(float(loss) - float(loss_perm)) < 1e-6
  try:
    epsilon_loss(ident, None, x0, jnp.zeros((6, 1, 8)), jax.random.key(0))
  except ValueError as e:
    assert "one key per example" in str(e)
  else:
    raise AssertionError("a single key must be refused")
