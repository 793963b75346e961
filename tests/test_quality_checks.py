"""Stage quality checks: stand-ins that must score 1.0 and ones that must fail each check."""

import dataclasses

import numpy as np
import pytest

from codi_jax.data import synthetic as syn
from codi_jax.evaluate import load_examples
from codi_jax.modality import Modality
from codi_jax.quality import checks
from codi_jax.train import data as train_data
from configs.codi import get_config


@pytest.fixture(scope="module")
def ctx():
  config = get_config("tiny")
  return checks.Context(config, {"autokl": {}}, train_data.load_tokenizers(""),
                        test=load_examples(config, "test", 16),
                        train=load_examples(config, "train", 64))


def test_image_round_trip_scores_a_perfect_and_a_blind_autoencoder(ctx, monkeypatch):
  monkeypatch.setattr(checks.autoencoder, "encode_image", lambda vae, params, x: x)
  monkeypatch.setattr(checks.autoencoder, "decode_image", lambda vae, params, z: z)
  perfect = checks.image_round_trip(ctx)
  assert len(perfect) == 4 + 5 and all(c.value == 1.0 and c.met for c in perfect.values())
  # A decoder that draws the background only: nothing to read, every attribute wrong.
  monkeypatch.setattr(checks.autoencoder, "decode_image", lambda vae, params, z: z * 0 - 0.7)
  blind = checks.image_round_trip(ctx)
  assert all(c.value == 0.0 and not c.met for c in blind.values())


def _oracle_tokens(examples, noise=1e-3):
  """Unit tokens holding every attribute one-hot, plus a little per-example noise."""
  rng = np.random.default_rng(len(examples))
  rows = []
  for e in examples:
    values = e.attributes.as_dict()
    rows.append(np.concatenate([np.eye(len(kind))[list(kind).index(kind(values[name]))]
                                for name, kind in syn.VISUAL_ATTRIBUTES.items()]))
  tokens = np.stack(rows) + noise * rng.normal(size=(len(rows), len(rows[0])))
  return tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)


def test_encoder_checks_pass_an_oracle_and_fail_a_constant_encoder(ctx, monkeypatch):
  ctx = dataclasses.replace(ctx, test=load_examples(ctx.config, "test", 64),
                            train=load_examples(ctx.config, "train", 256))
  monkeypatch.setattr(checks, "prompt_tokens",
                      lambda c, examples: {m: _oracle_tokens(examples) for m in Modality})
  oracle = checks.encoder_checks(ctx)
  assert {k for k in oracle if k.startswith("retrieval/")} == {
      "retrieval/image", "retrieval/video", "retrieval/audio"}
  assert len([k for k in oracle if k.startswith("probe/text/")]) == 8
  assert all(c.value == 1.0 and c.met for c in oracle.values()), checks.format_table(oracle)
  constant = lambda c, examples: {m: np.ones((len(examples), 4)) / 2 for m in Modality}
  monkeypatch.setattr(checks, "prompt_tokens", constant)
  assert not any(c.met for c in checks.encoder_checks(ctx).values())


def test_probe_and_retrieval_can_score_zero():
  tokens = np.eye(4)[[0, 1, 2, 3] * 16]
  values = list("abcd") * 16
  assert checks.probe(tokens, values, tokens, values) == 1.0
  assert checks.probe(tokens, values, tokens, list("bcda") * 16) == 0.0
  assert checks.retrieval(tokens, tokens) < 0.1  # ties go to the first of 16 equal captions
  unique = np.eye(64)
  assert checks.retrieval(unique, unique) == 1.0
  assert checks.retrieval(unique, unique[::-1]) == 0.0
  with pytest.raises(ValueError, match="at least 64"):
    checks.retrieval(unique[:10], unique[:10])


def test_checks_report_their_bars():
  table = {"a": checks.Check(0.96, 0.95), "b": checks.Check(1.5, (0.7, 1.4)),
           "c": checks.Check(1.0, (0.7, 1.4))}
  assert [c.met for c in table.values()] == [True, False, True]
  assert checks.as_json(table)["b"] == {"value": 1.5, "bar": [0.7, 1.4], "met": False}
  text = checks.format_table(table)
  assert "2 of 3 checks met" in text and "NO" in text
  with pytest.raises(ValueError, match="no quality checks"):
    checks.run_stage_checks(None, ["sample"])


def test_latent_align_checks_pass_coupled_outputs_and_fail_independent_ones():
  """Stand-ins for the joint diffuser: codes that are the noisy latents themselves retrieve
  their pair; a constant code cannot. A noise prediction that reads x0 off its partner gains;
  one that ignores the partner gains exactly 0."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from codi_jax.diffusion.schedule import ScheduleConfig, ddpm_schedule  # pylint: disable=import-outside-toplevel
  from codi_jax.quality import alignment  # pylint: disable=import-outside-toplevel

  image, audio = Modality.IMAGE, Modality.AUDIO
  shared = jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 4))
  x0 = {image: shared, audio: shared}  # a pair that is one latent twice
  abar = jnp.asarray(ddpm_schedule().alphas_cumprod)
  flat = lambda x: x.reshape(x.shape[0], -1)

  def from_partner(x_t, t):  # x_a - x_b = sqrt(1 - abar) (eps_a - eps_b) when the pair matches
    (a, xa), (b, xb) = x_t.items()
    scale = jnp.sqrt(1.0 - abar[t])[:, None, None, None]
    return {a: (xa - xb) / scale, b: (xb - xa) / scale}

  coupled = alignment.score((image, audio), _rows(alignment.measure_pair(
      lambda x_t, t: {m: flat(x) for m, x in x_t.items()}, from_partner, x0, ScheduleConfig())))
  assert all(c.met for c in coupled.values()), checks.format_table(coupled)
  independent = alignment.score((image, audio), _rows(alignment.measure_pair(
      lambda x_t, t: {m: jnp.ones((x.shape[0], 4)) for m, x in x_t.items()},
      lambda x_t, t: {m: 0.5 * x for m, x in x_t.items()}, x0, ScheduleConfig())))
  assert not any(c.met for c in independent.values())
  assert all(c.value == 0.0 for k, c in independent.items() if k.startswith("partner/"))


def _rows(measured):
  """`measure_pair`'s arrays as one row per example, as `checks.batched` returns them."""
  size = next(iter(measured.values())).shape[0]
  return [{k: np.asarray(v[i]) for k, v in measured.items()} for i in range(size)]
