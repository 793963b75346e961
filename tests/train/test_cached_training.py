"""Training on `codi-jax cache` output: the diffusion and latent-alignment losses on cached
latents and tokens equal those on the media they were cached from, a run reads the cache end to
end, and a cache that does not fit the run is refused."""

import pathlib

import jax
import numpy as np
import pytest

from codi_jax import checkpoint
from codi_jax.data import cache, preprocess, synthetic
from codi_jax.modality import Modality
from codi_jax.train import data as train_data
from codi_jax.train import objectives as obj
from codi_jax.train import stages
from codi_jax.train.loop import train
from configs.codi import get_config

ROWS = 8  # one row per simulated CPU device


def _config(stage: str, init_from, cache_dir="", **train_settings):
  config = get_config("tiny")
  config.stage = stage
  config.init_from = str(init_from)
  config.data.cache = str(cache_dir)
  config.train.update(dict(batch_size=ROWS, warmup_steps=0, decay="constant",
                           async_checkpoints=False, sample_every=0, quality_examples=0),
                      **train_settings)
  return config


def _build(config, out: pathlib.Path, ckpt=None, seed=0) -> pathlib.Path:
  """The first ROWS training examples of `config` cached with the encoders of `ckpt` (random
  ones of `seed` without it), as `codi-jax cache` does."""
  source = synthetic.SplitSource(train_data.synthetic_config(config), "train")
  train_data.cache_examples(config, [str(ckpt)] if ckpt else None, source, {}, out,
                            name="train", seed=seed, batch_size=ROWS, limit=ROWS, progress=False)
  return out


@pytest.fixture(scope="module")
def cached(random_model, tmp_path_factory):
  return _build(_config("diffuse_image", random_model), tmp_path_factory.mktemp("cache"),
                random_model)


def _media_batch(config, tokenizers) -> dict[str, np.ndarray]:
  """The same ROWS examples as the training pipeline preprocesses them (centre crops)."""
  source = synthetic.SplitSource(train_data.synthetic_config(config), "train")
  examples = [source[i] for i in range(ROWS)]
  d = config.data
  host = {"text": [e.text for e in examples],
          "image": np.stack([preprocess.preprocess_image(e.image, d.image_size) for e in examples]),
          "video": np.stack([preprocess.preprocess_video(e.video, d.image_size, d.num_frames)
                             for e in examples]),
          "audio": np.stack([preprocess.fit_audio(e.audio, d.audio_samples) for e in examples])}
  return train_data.arrays(host, tokenizers, config)


@pytest.mark.parametrize("stage,conditions", [
    ("diffuse_image", ""), ("diffuse_video", ""), ("diffuse_audio", ""),
    ("diffuse_text", "image,text"), ("latent_align", "")])
def test_losses_on_cached_features_equal_those_on_media(stage, conditions, random_model, cached):
  config = _config(stage, random_model, diffusion_conditions=conditions)
  tokenizers = train_data.load_tokenizers("")
  spec = stages.get_stage(config)
  phase = spec.phases[0]
  models = obj.Models.from_config(config.model)
  _, params = checkpoint.load_model(random_model, spec.parts)
  params = jax.tree_util.tree_map(np.asarray, params)
  nulls = train_data.null_inputs(config, tokenizers)
  index = np.arange(ROWS, dtype=np.int64)
  media = dict(_media_batch(config, tokenizers), index=index, **nulls)
  records = [cache.read_cache(cached)[i] for i in range(ROWS)]
  features = [f"{m.value}_{kind}" for m in phase.modalities for kind in ("latent", "token")]
  stored = {f: np.stack([r[f] for r in records]).astype(np.float32) for f in features}
  from_cache = dict(train_data.arrays(stored, tokenizers, config), index=index, **nulls)
  assert set(from_cache) == set(features) | {"index"} | set(nulls)
  keys = obj.row_keys(jax.random.key(3), index)
  loss = jax.jit(lambda batch: spec.loss(phase, models, params, batch, keys, config)[0])
  np.testing.assert_allclose(float(loss(from_cache)), float(loss(media)), rtol=2e-4)
  # The cached features are what the encoders give: the loss is not merely insensitive to them.
  for m in phase.outputs:
    np.testing.assert_allclose(stored[f"{m.value}_latent"],
                               obj.latent(models, params, media, m), atol=2e-4, rtol=1e-3)


def test_a_run_trains_on_the_cache(random_model, cached, tmp_path):
  config = _config("diffuse_image", random_model, cached, steps=2)
  summary = train(config, str(tmp_path / "run"), progress=False)
  assert summary.end_step == 2 and np.isfinite(summary.final_loss)


def test_a_cache_that_does_not_fit_the_run_is_refused(random_model, cached, tmp_path):
  with pytest.raises(ValueError, match="trains encoders, so it cannot read"):
    train(_config("autoencoders", random_model, cached, steps=1), str(tmp_path / "a"),
          progress=False)
  foreign = _build(_config("diffuse_image", random_model), tmp_path / "foreign", seed=5)
  with pytest.raises(ValueError, match="other autokl weights than this run's"):
    train(_config("diffuse_image", random_model, foreign, steps=1), str(tmp_path / "b"),
          progress=False)
  small = _config("diffuse_image", random_model, cached, steps=1)
  small.data.audio_samples = 8000
  with pytest.raises(ValueError, match="audio_samples=10000"):
    train(small, str(tmp_path / "c"), progress=False)
  dropped = _config("diffuse_image", random_model, cached, steps=1)
  dropped.data.caption_dropout = 0.5  # the cache holds full captions' tokens
  with pytest.raises(ValueError, match="caption_dropout=0.0; this run trains on caption_dropout"):
    train(dropped, str(tmp_path / "d"), progress=False)
