"""The from-scratch recipe's mechanics: phase shares, per-part optimisation, latent statistics."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import components
from codi_jax.models import autoencoder
from codi_jax.train import latent_stats, stages, state
from codi_jax.train.state import learning_rate_schedule, make_optimizer
from configs.codi import get_config


def _phases(stage, total):
  return [stage.phase_at(step, total) for step in range(total)]


def test_phases_split_the_steps_by_their_shares():
  config = get_config("tiny")
  config.stage = "autoencoders"
  config.train.autoencoders = "autokl:2,optimus"
  stage = stages.get_stage(config)
  assert [p.name for p in stage.phases] == ["autokl", "optimus"]
  assert _phases(stage, 9) == [0] * 6 + [1] * 3
  # Each part's learning rate warms up and decays over its own phase.
  assert stage.part_spans(9) == {"autokl": (0, 6), "optimus": (6, 3)}
  t = config.train
  t.update(steps=9, warmup_steps=1, decay="cosine", end_learning_rate_fraction=0.1)
  rate = learning_rate_schedule(t, 1.0, (6, 3))
  np.testing.assert_allclose([float(rate(s)) for s in (0, 5, 6, 7, 8)], [0, 0, 0, 1, 0.55],
                             atol=1e-6)
  # Each phase moves only its own part and reads only its modality.
  assert stage.phases[1].updates("optimus", ("x",)) and not stage.phases[1].updates("autokl", ())
  assert [m.value for m in stage.phases[0].modalities] == ["image"]
  # Equal shares keep the even split: phase i starts at ceil(i * total / n).
  config.stage = "latent_align"
  stage = stages.get_stage(config)
  assert _phases(stage, 10) == [0] * 4 + [1] * 3 + [2] * 3
  assert _phases(stage, 2) == [0, 1]


@pytest.mark.parametrize("value", ["", "autokl:0", "autokl:x", "vae", "autokl,autokl"])
def test_bad_shares_are_refused(value):
  config = get_config("tiny")
  config.stage = "autoencoders"
  config.train.autoencoders = value
  with pytest.raises(ValueError, match="config.train.autoencoders"):
    stages.get_stage(config)


def test_each_part_is_clipped_and_stepped_on_its_own():
  t = get_config("tiny").train
  t.update(grad_clip=1.0, learning_rate=0.1, warmup_steps=0, decay="constant", weight_decay=0.0,
           part_learning_rates="b=0.01")
  params = {"a": {"w": jnp.zeros(3)}, "b": {"w": jnp.zeros(3)}}
  grads = {"a": {"w": jnp.full(3, 1e6)}, "b": {"w": jnp.array([0.3, 0.0, 0.0])}}
  opt = make_optimizer(t, ("a", "b"))
  updates, _ = opt.update(grads, opt.init(params), params)
  alone = make_optimizer(t, ("b",))
  b_alone, _ = alone.update({"b": grads["b"]}, alone.init({"b": params["b"]}), {"b": params["b"]})
  # b's update does not feel a's huge gradient, and takes b's own rate (Adam's first step is
  # -lr * sign).
  np.testing.assert_allclose(updates["b"]["w"], b_alone["b"]["w"])
  np.testing.assert_allclose(updates["b"]["w"][0], -0.01, rtol=1e-4)
  np.testing.assert_allclose(updates["a"]["w"], -0.1, rtol=1e-4)
  t.part_learning_rates = "c=0.1"
  with pytest.raises(ValueError, match="names \\['c'\\]"):
    make_optimizer(t, ("a", "b"))
  t.part_learning_rates = "a=fast"
  with pytest.raises(ValueError, match="part=value"):
    make_optimizer(t, ("a", "b"))


def test_a_part_trained_in_a_later_phase_starts_its_optimiser_there():
  """Steps of other phases leave a part's Adam state alone: its first step is Adam's first step
  (-lr * sign), not one skewed by a step count that ran on while its moments stayed empty."""
  t = get_config("tiny").train
  t.update(learning_rate=0.1, warmup_steps=0, decay="cosine", weight_decay=0.0,
           part_learning_rates="b=0.01")
  params = {"a": {"w": jnp.zeros(3)}, "b": {"w": jnp.zeros(3)}}
  opt = make_optimizer(t, ("a", "b"), {"a": (0, 50), "b": (50, 50)})
  opt_state = opt.init(params)
  for _ in range(50):  # phase 1 trains a alone
    grads = {"a": {"w": jnp.ones(3)}, "b": {"w": jnp.zeros(3)}}
    _, new = opt.update(grads, opt_state, params)
    opt_state = state.keep_idle_parts(new, opt_state, ["b"])
  grads = {"a": {"w": jnp.zeros(3)}, "b": {"w": jnp.array([0.3, 0.0, 0.0])}}
  updates, _ = opt.update(grads, opt_state, params)
  np.testing.assert_allclose(updates["b"]["w"][0], -0.01, rtol=1e-4)  # the peak, not decayed
  _, idle_state = opt.update(grads, opt_state, params)
  kept = state.keep_idle_parts(idle_state, opt_state, ["a"])
  for x, y in zip(jax.tree_util.tree_leaves(kept.inner_states["a"]),
                  jax.tree_util.tree_leaves(opt_state.inner_states["a"])):
    np.testing.assert_array_equal(x, y)


def test_a_part_can_have_its_own_decay():
  t = get_config("tiny").train
  t.update(learning_rate=1.0, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=1e9,
           end_learning_rate_fraction=0.0, part_decays="b=cosine")
  params = {"a": {"w": jnp.zeros(1)}, "b": {"w": jnp.zeros(1)}}
  opt = make_optimizer(t, ("a", "b"), spans={"a": (0, 10), "b": (10, 10)})
  opt_state = opt.init(params)
  grads = {"a": {"w": jnp.ones(1)}, "b": {"w": jnp.ones(1)}}
  for _ in range(5):  # the 5th update runs at count 4 of each part's own span of 10
    updates, opt_state = opt.update(grads, opt_state, params)
  # Adam's update is -rate * sign here: a keeps its constant rate, b follows its cosine.
  np.testing.assert_allclose(updates["a"]["w"], -1.0, rtol=1e-4)
  np.testing.assert_allclose(updates["b"]["w"], -0.5 * (1 + np.cos(np.pi * 4 / 10)), rtol=1e-4)
  t.part_decays = "c=cosine"
  with pytest.raises(ValueError, match=r"part_decays names \['c'\]"):
    make_optimizer(t, ("a", "b"))


def test_a_part_trained_alone_can_have_its_own_batch():
  config = get_config("tiny")
  config.stage = "autoencoders"
  config.train.update(autoencoders="autokl,optimus", batch_size=8, part_batch_sizes="optimus=64")
  stage = stages.get_stage(config)
  assert [p.batch(config) for p in stage.phases] == [8, 64]
  for bad, match in (("clip=64", "names \\['clip'\\]"), ("optimus=0", "positive int"),
                     ("optimus=1.5", "positive int"), ("optimus", "part=value")):
    config.train.part_batch_sizes = bad
    with pytest.raises(ValueError, match=match):
      stages.get_stage(config)
  config.stage, config.train.part_batch_sizes = "align_encoders", "optimus=64"
  with pytest.raises(ValueError, match="no phase of stage align_encoders"):
    stages.get_stage(config)


def test_latent_statistics_are_exact_whatever_the_batching(monkeypatch):
  rng = np.random.default_rng(0)
  z = rng.normal(3.0, 0.5, size=(37, 4, 4, 2)).astype(np.float32)
  monkeypatch.setattr(latent_stats, "_unscaled", lambda models, params, batch, part: batch["z"])
  for cuts in ([37], [5, 32], [1, 17, 19]):
    edges = np.cumsum([0] + cuts)
    batches = [{"z": jnp.asarray(z[a:b])} for a, b in zip(edges[:-1], edges[1:])]
    stats = latent_stats.measure(None, {}, batches, ["autokl"])["autokl"]
    np.testing.assert_allclose(stats["shift_factor"], z.astype(np.float64).mean(), rtol=1e-6)
    np.testing.assert_allclose(1.0 / stats["scale_factor"], z.astype(np.float64).std(),
                               rtol=1e-5)
  # The calibrated latent of these data has mean 0 and std 1.
  config = latent_stats.calibrate(get_config("tiny"), {"autokl": stats})
  vae = components.image_vae_config(config.model)
  scaled = np.asarray(autoencoder.scale_latent(vae, z), np.float64)
  np.testing.assert_allclose([scaled.mean(), scaled.std()], [0.0, 1.0], atol=1e-5)
  np.testing.assert_allclose(autoencoder.unscale_latent(vae, scaled), z, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="constant"):
    latent_stats.measure(None, {}, [{"z": jnp.ones((4, 2))}], ["autokl"])
  with pytest.raises(ValueError, match="no latent statistics"):
    latent_stats.measure(None, {}, [], ["clip"])


def test_parts_bring_their_statistics_from_init_from(tmp_path):
  def model(name, parts, shift):
    d = tmp_path / name
    for p in parts:
      (d / p).mkdir(parents=True)
    config = get_config("tiny")
    for field in ("image_vae", "optimus"):
      config.model[field].shift_factor = shift
      config.model[field].scale_factor = 10.0 + shift
    (d / "config.json").write_text(config.to_json())
    return d

  first, second = model("a", ["autokl", "optimus"], 1.0), model("b", ["optimus"], 2.0)
  config = latent_stats.adopt(get_config("tiny"), [first, second],
                              ["autokl", "optimus", "diffusers"])
  assert (config.model.image_vae.shift_factor, config.model.image_vae.scale_factor) == (1.0, 11.0)
  assert (config.model.optimus.shift_factor, config.model.optimus.scale_factor) == (2.0, 12.0)
  # A part the stage does not load keeps the preset's factors.
  config = latent_stats.adopt(get_config("tiny"), [first], ["optimus"])
  assert config.model.image_vae.scale_factor == 0.18215
  assert json.loads((first / "config.json").read_text())["model"]["image_vae"]["shift_factor"] == 1


def test_the_released_constants_are_untouched():
  model = get_config("full").model
  assert (model.image_vae.scale_factor, model.audio_vae.scale_factor,
          model.optimus.scale_factor) == (0.18215, 0.9228, 4.3108)
  assert model.image_vae.shift_factor == model.audio_vae.shift_factor == 0.0
  assert model.optimus.shift_factor == 0.0
  # With shift 0 the diffusion latent is bit for bit the original's scale * z.
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
  vae = components.image_vae_config(model)
  np.testing.assert_array_equal(autoencoder.scale_latent(vae, z), 0.18215 * z)
  np.testing.assert_array_equal(autoencoder.unscale_latent(vae, z), z / 0.18215)


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps must be a positive integer, got 0"),
    ("steps", -5, "steps must be a positive integer"),
    ("checkpoint_every", 0, "checkpoint_every must be a positive integer, got 0"),
    ("env_contrastive_max_timestep", 0, "env_contrastive_max_timestep must be a positive"),
    ("batch_size", -4, "batch_size must be a positive integer"),
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("optimus_softmax_candidates", -1, "optimus_softmax_candidates must be an integer >= 0"),
    ("learning_rate", 0.0, "learning_rate must be a finite number positive"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number"),
    ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
    ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
    ("decay", "linear", r"decay must be one of \['cosine', 'constant'\]"),
    ("part_learning_rates", "optimus", "part=value"),
    ("part_learning_rates", "optimus=-1", "part=value items with a positive number"),
    ("part_decays", "optimus=linear", r"part=value items with a decay in \['cosine'"),
])
def test_training_settings_are_checked_before_anything_runs(field, value, match):
  t = get_config("tiny").train
  state.check_train_settings(t)  # the presets pass
  t[field] = value
  with pytest.raises(ValueError, match=match):
    state.check_train_settings(t)


def test_contrast_weights_count_the_object_and_what_is_painted_over_the_background():
  from codi_jax.train.objectives import contrast_weights
  x = np.full((1, 4, 4, 3), -0.5, np.float32)  # a grey background
  x[0, 0, 0] = (1.0, -1.0, -1.0)  # one red object pixel
  recon = x.copy()
  recon[0, 3, 3] = (0.5, -0.5, -0.5)  # colour painted over the background
  weights = np.asarray(contrast_weights(jnp.asarray(x), jnp.asarray(recon), 10.0))[0, ..., 0]
  assert weights[0, 0] == pytest.approx(1 + 10 * 1.5)  # the object, by the input
  assert weights[3, 3] == pytest.approx(1 + 10 * 1.0)  # the spill, by the reconstruction
  assert weights[1, 1] == pytest.approx(1.0)  # background reconstructed as background


def test_uniformity_loss_closed_forms():
  from codi_jax.train.objectives import uniformity_loss
  same = jnp.ones((3, 4)) / 2.0
  assert float(uniformity_loss(same)) == pytest.approx(0.0, abs=1e-6)  # collapsed: exp(0)
  assert float(uniformity_loss(jnp.eye(4))) == pytest.approx(-4.0, abs=1e-5)  # |z_i - z_j|^2 = 2
  spread = jnp.array([[1.0, 0.0], [-1.0, 0.0]])  # antipodal: |z_i - z_j|^2 = 4
  assert float(uniformity_loss(spread, t=0.5)) == pytest.approx(-2.0, abs=1e-5)


def test_optimus_batch_softmax_candidates_cap():
  """A cap at or above the batch's distinct ids changes nothing; a smaller cap keeps the smallest
  ids and drops the other targets from the loss, reporting their share."""
  import flax.linen as nn
  from codi_jax.models import optimus
  from codi_jax.train.objectives import optimus_loss
  config = components.optimus_config(get_config("tiny").model)
  model = optimus.Optimus(config)
  params = nn.unbox(optimus.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)
  bert = jnp.asarray(rng.integers(1000, 1010, (4, 8)), jnp.int32)
  gpt2 = jnp.asarray(rng.integers(1000, 1010, (4, 8)), jnp.int32)
  keys = jax.random.split(jax.random.key(1), 4)
  loss = lambda **kw: optimus_loss(model, params, bert, gpt2, keys, 0.5, 0.5, softmax="batch",
                                   posterior_noise=0.0, bow_weight=1.0, **kw)
  exact, exact_metrics = loss()
  capped, capped_metrics = loss(candidates=10)  # 10 distinct ids at most
  np.testing.assert_allclose(capped, exact, rtol=1e-6)
  assert float(exact_metrics["candidate_miss"]) == 0.0
  assert float(capped_metrics["candidate_miss"]) == 0.0
  _, short_metrics = loss(candidates=3)
  targets = np.asarray(gpt2[:, 1:])
  kept = np.sort(np.unique(targets))[:3]
  np.testing.assert_allclose(short_metrics["candidate_miss"], np.mean(~np.isin(targets, kept)),
                             rtol=1e-6)
  assert 0.0 <= float(short_metrics["token_accuracy"]) <= 1.0


def test_a_shorter_clip_length_gives_the_same_text_token():
  """CLIP's text tower is causal and read at the first end-of-text, so a caption that fits in
  `config.data.clip_length` gets the token it gets at CLIP's 77."""
  import flax.linen as nn
  from codi_jax.models import clip
  from codi_jax.train.data import load_tokenizers
  config = get_config("tiny")
  clip_config = components.clip_config(config.model)
  params = nn.unbox(clip.init_params(clip_config, jax.random.key(0)))
  tokenizer = load_tokenizers(None).clip
  texts = ["A small red square in the top left corner, moving up.", ""]
  encode = lambda ids: clip.CLIPModel(clip_config).apply(
      {"params": params}, jnp.asarray(ids), method=clip.CLIPModel.encode_text)
  short = encode(tokenizer.encode_batch(texts, config.data.clip_length))
  full = encode(tokenizer.encode_batch(texts))
  assert config.data.clip_length < 77
  np.testing.assert_allclose(short, full, atol=1e-6)


def test_diffusion_stages_can_learn_from_the_tokens_of_several_modalities():
  config = get_config("tiny")
  config.stage = "diffuse_image"
  own = stages.get_stage(config)
  assert own.phases[0].conditions == (stages.Modality.TEXT,) and own.parts == (
      "diffusers", "autokl", "clip")
  config.train.diffusion_conditions = "text,image,audio"
  mixed = stages.get_stage(config)
  assert mixed.phases[0].conditions == tuple(
      stages.Modality(m) for m in ("text", "image", "audio"))
  assert mixed.parts == ("diffusers", "autokl", "clip", "clap")
  assert mixed.phases[0].modalities == tuple(
      stages.Modality(m) for m in ("image", "text", "audio"))
  for bad, match in (("image", "must include them"), ("text,text", "twice"),
                     ("text,smell", "name modalities")):
    config.train.diffusion_conditions = bad
    with pytest.raises(ValueError, match=match):
      stages.get_stage(config)


def test_choose_conditions_picks_one_token_or_its_modalitys_null_per_row():
  from codi_jax.train import objectives
  batch = 4000
  tokens = [jnp.full((batch, 2), float(i + 1)) for i in range(3)]
  nulls = [jnp.full((2,), -float(i + 1)) for i in range(3)]
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  out = np.asarray(objectives.choose_conditions(tokens, nulls, keys, 0.1))[:, 0]
  values, counts = np.unique(out, return_counts=True)
  assert list(values) == [-3, -2, -1, 1, 2, 3]  # every token and every null, nothing else
  share = dict(zip(values, counts / batch))
  for v in (1, 2, 3):
    assert abs(share[v] - 0.3) < 0.03
  for v in (-1, -2, -3):
    assert abs(share[v] - 0.1 / 3) < 0.015
  with pytest.raises(ValueError, match="null tokens"):
    objectives.choose_conditions(tokens, nulls[:1], keys, 0.1)


def test_environment_codes_cannot_match_pairs_by_their_timestep():
  """Codes that see only the timestep carry nothing about the example: the contrastive loss of
  latent alignment must then stay at chance, log B (one timestep per row let it reach ~0)."""
  import types  # pylint: disable=import-outside-toplevel

  from codi_jax.diffusion.schedule import ScheduleConfig  # pylint: disable=import-outside-toplevel
  from codi_jax.modality import Modality  # pylint: disable=import-outside-toplevel
  from codi_jax.train import objectives  # pylint: disable=import-outside-toplevel

  def timestep_only_codes(variables, x_t, t, method=None):
    del variables, method
    return {m: jax.nn.one_hot(t % 64, 64) for m in x_t}

  models = types.SimpleNamespace(diffusers=types.SimpleNamespace(apply=timestep_only_codes))
  batch = 8
  x0 = {Modality.IMAGE: jnp.zeros((batch, 4, 4, 4)), Modality.AUDIO: jnp.zeros((batch, 4, 4, 8))}
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  loss = objectives.environment_contrastive(models, {}, x0, keys, ScheduleConfig(), 10.0)
  np.testing.assert_allclose(float(loss), np.log(batch), rtol=1e-5)


def test_environment_codes_are_told_apart_beside_a_common_component():
  """Mean-pooled codes share a component far larger than what tells examples apart. The loss
  centres them over the batch, so paired content well below that component still scores (and a
  constant code cannot lower the loss below chance)."""
  import types  # pylint: disable=import-outside-toplevel

  from codi_jax.diffusion.schedule import ScheduleConfig  # pylint: disable=import-outside-toplevel
  from codi_jax.modality import Modality  # pylint: disable=import-outside-toplevel
  from codi_jax.train import objectives  # pylint: disable=import-outside-toplevel

  batch = 8
  common = 100.0 * jnp.ones((64,))
  content = jax.nn.one_hot(jnp.arange(batch), 64)  # example b's content: its own direction

  def codes_with_common_part(variables, x_t, t, method=None):
    del variables, t, method
    return {m: common + content + 0.0 * jnp.sum(x) for m, x in x_t.items()}

  models = types.SimpleNamespace(diffusers=types.SimpleNamespace(apply=codes_with_common_part))
  x0 = {Modality.IMAGE: jnp.zeros((batch, 4, 4, 4)), Modality.AUDIO: jnp.zeros((batch, 4, 4, 8))}
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  loss = objectives.environment_contrastive(models, {}, x0, keys, ScheduleConfig(), 10.0)
  assert float(loss) < 0.5 * np.log(batch)
