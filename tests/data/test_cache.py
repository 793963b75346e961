"""The latent/condition cache: cached features equal the encoders' direct outputs; resumable,
shardable across processes, and bad media is counted, not fatal."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import checkpoint, components, io_utils
from codi_jax.audio.mel import fbank_frames
from codi_jax.data import cache, media, preprocess, records, synthetic
from codi_jax.models import autoencoder, optimus
from codi_jax.models.clap import clap_encode_audio
from codi_jax.train import data as train_data
from configs.codi import get_config
from tests.conftest import REPO

SIZE, FRAMES, AUDIO_FRAMES, BATCH = 32, 4, 32, 2


@pytest.fixture(scope="module")
def setup():
  run = get_config("tiny")
  config = cache.cache_config_from(run, image_size=SIZE, audio_frames=AUDIO_FRAMES,
                                   audio_samples=AUDIO_FRAMES * 160, batch_size=BATCH)
  params = cache.load_encoder_params(run.model, seed=1)
  tokenizers = cache.load_tokenizers()
  encoders = cache.FrozenEncoders(run.model, params, tokenizers, config)
  source = synthetic.SplitSource(synthetic.SyntheticConfig(image_size=SIZE, num_frames=FRAMES),
                                 "train")
  return run, encoders, source


def test_config_from_run_and_errors():
  config = cache.cache_config_from(get_config("tiny"))
  # tiny: 8x8 image latents through the f4 VAE, 4 frames, 16 audio latent frames through f4.
  assert (config.image_size, config.num_frames, config.audio_frames) == (32, 4, 64)
  assert fbank_frames(config.audio_time) == config.audio_frames
  with pytest.raises(ValueError, match="batch_size must be positive"):
    cache.CacheConfig(batch_size=0)
  with pytest.raises(ValueError, match="'median' is not a valid LatentMode"):
    cache.CacheConfig(latent_mode="median")


def test_given_params_are_checked():
  model = get_config("tiny").model
  params = cache.random_encoder_params(model, seed=0)
  assert cache.load_encoder_params(model, params)["clap"]["batch_stats"]
  with pytest.raises(ValueError, match="exactly"):
    cache.load_encoder_params(model, {k: v for k, v in params.items() if k != "clip"})
  bad = dict(params, autokl=dict(params["autokl"], quant_conv=dict(
      params["autokl"]["quant_conv"], bias=np.zeros(3, np.float32))))
  with pytest.raises(ValueError, match=r"'autokl': \['quant_conv'\]\['bias'\] has shape \(3,\)"):
    cache.load_encoder_params(model, bad)


def test_cached_features_equal_direct_encoder_outputs(setup, tmp_path):
  run, encoders, source = setup
  summary = cache.build_cache(source, tmp_path, encoders, name="train", limit=3, shard_size=2,
                              progress=False)
  assert (summary.written, summary.shards_written, summary.failures) == (3, 2, {})
  cached = cache.read_cache(tmp_path)
  assert len(cached) == 3
  params, tok, config = encoders.params, encoders.tokenizers, encoders.config
  image_vae = autoencoder.AutoencoderKL(components.image_vae_config(run.model))
  audio_vae = autoencoder.AutoencoderKL(components.audio_vae_config(run.model))
  text_vae = optimus.Optimus(components.optimus_config(run.model))
  encode_image = jax.jit(lambda p, x: autoencoder.encode_image(image_vae, p, x))
  encode_audio = jax.jit(lambda p, w: autoencoder.encode_audio(audio_vae, p, w,
                                                               time=config.audio_time))
  encode_text = jax.jit(lambda p, ids: text_vae.apply({"params": p}, ids,
                                                      method=optimus.Optimus.codi_encode))
  for i in (0, 2):  # first of shard 0, the lone (zero-padded) example of shard 1
    ex, got = source[i], cached[i]
    assert str(got["key"]) == ex.key and str(got["caption"]) == ex.text
    image = jnp.asarray(preprocess.preprocess_image(ex.image, SIZE))[None]
    video = jnp.asarray(preprocess.preprocess_video(ex.video, SIZE, FRAMES))[None]
    wave = preprocess.fit_audio(ex.audio, AUDIO_FRAMES * 160)[None]
    expected = dict(  # one example at a time (jitted: op-by-op dispatch is slow)
        image_latent=encode_image(params["autokl"], image),
        video_latent=encode_image(params["autokl"], video),
        audio_latent=encode_audio(params["audioldm_vae"], wave),
        text_latent=encode_text(params["optimus"], tok.bert.codi_token_ids([ex.text])),
        text_token=encoders.clip.encode_text(tok.clip.encode_batch([ex.text]))[:, 0],
        image_token=encoders.clip.encode_vision(image)[:, 0],
        video_token=encoders.clip.encode_vision(video)[:, 0],
        audio_token=clap_encode_audio(params["clap"], wave[:, None],
                                      encoders.clap_config)[:, 0])
    assert set(got) == set(expected) | {"key", "source", "caption"}
    assert got["image_latent"].shape == (SIZE // 4, SIZE // 4, 4)
    assert got["audio_latent"].shape == (AUDIO_FRAMES // 4, 16, 8)
    for name, want in expected.items():
      # Bound atol + rtol * max|want| as in the parity checks: the batch of 2 rounds differently
      # from a batch of 1 (the STFT's matmul), and log-mel amplifies it near its 1e-5 clamp.
      want = np.asarray(want)[0]
      assert got[name].dtype == np.float32 and got[name].shape == want.shape
      assert np.abs(got[name] - want).max() <= 1e-5 + 1e-4 * np.abs(want).max(), name


def test_posterior_samples_are_per_example_and_seeded(setup):
  run, encoders, source = setup
  sampling = cache.FrozenEncoders(run.model, encoders.params, encoders.tokenizers,
                                  dataclasses.replace(encoders.config,
                                                      latent_mode=cache.LatentMode.SAMPLE))
  prepared = [cache.prepare(source[i], sampling.config, sampling.tokenizers) for i in (0, 1)]
  images = [dataclasses.replace(p, caption=None, video=None, audio=None) for p in prepared]
  together = sampling(images)
  alone = sampling(images[1:])  # another batch position: the same sample
  np.testing.assert_allclose(alone[0]["image_latent"], together[1]["image_latent"], atol=1e-6)
  vae = autoencoder.AutoencoderKL(components.image_vae_config(run.model))
  direct = autoencoder.encode_image(vae, encoders.params["autokl"], images[1].image[None],
                                    cache.example_rng(sampling.config.seed, images[1].key, "image"))
  np.testing.assert_allclose(together[1]["image_latent"], direct[0], rtol=1e-4, atol=2e-5)
  mode = encoders(images)[1]["image_latent"]
  assert np.abs(together[1]["image_latent"] - mode).max() > 1e-3


def test_resume_skips_finished_shards(setup, tmp_path):
  _, encoders, source = setup
  first = cache.build_cache(source, tmp_path, encoders, limit=3, shard_size=2, progress=False)
  assert (first.shards_written, first.shards_skipped) == (2, 0)
  shard0 = tmp_path / cache.shard_name("cache", 0, 2)
  stamp = shard0.stat().st_mtime_ns
  # A shard without its sidecar was interrupted: only that one is redone.
  (tmp_path / (cache.shard_name("cache", 1, 2) + cache.SIDECAR_SUFFIX)).unlink()
  again = cache.build_cache(source, tmp_path, encoders, limit=3, shard_size=2, progress=False)
  assert (again.shards_written, again.shards_skipped, again.written) == (1, 1, 3)
  assert shard0.stat().st_mtime_ns == stamp
  assert json.loads((tmp_path / "summary-00000-of-00001.json").read_text())["written"] == 3
  with pytest.raises(ValueError, match=r"other settings \(differing: \['store_dtype'\]\)"):
    cache.build_cache(source, tmp_path, encoders, limit=3, shard_size=2, store_dtype="float16",
                      progress=False)


def test_two_processes_cover_every_key_once(setup, tmp_path):
  _, encoders, source = setup
  summaries = [cache.build_cache(source, tmp_path, encoders, limit=5, shard_size=2,
                                 store_dtype=cache.StoreDtype.FLOAT16, process_index=p,
                                 process_count=2, progress=False) for p in (0, 1)]
  assert [s.written for s in summaries] == [3, 2]  # shards {0, 2} and {1}
  cached = cache.read_cache(str(tmp_path / "*.array_record"))
  keys = [str(cached[i]["key"]) for i in range(len(cached))]
  assert sorted(keys) == sorted(source[i].key for i in range(5))
  assert cached[0]["image_latent"].dtype == np.float16
  with pytest.raises(IndexError):
    cached[5]


def test_bad_media_is_counted_not_fatal(setup, tmp_path):
  _, encoders, source = setup
  ex = source[0]
  png, wav = media.encode_png(ex.image), media.encode_wav(ex.audio, 16000)
  examples = [
      records.Example("good", "test", text=ex.text, image=png, audio=wav),
      records.Example("bad-image", "test", text=ex.text, image=b"not a png"),
      records.Example("bad-video", "test", image=png, video=b"\x00\x00\x00\x18ftypmp42"),
      records.Example("bad-text", "test", text="\x07\x08", audio=wav),
      records.Example("only-bad", "test", audio=b"RIFF....WAVE"),
  ]
  records.write_records(tmp_path / "in.array_record", examples)
  summary = cache.build_cache(records.read_records(tmp_path / "in.array_record"),
                              tmp_path / "out", encoders, progress=False)
  assert summary.failures == {"corrupt_image": 1, "corrupt_video": 1, "empty_text": 1,
                              "corrupt_audio": 1}
  assert (summary.examples, summary.written, summary.dropped) == (5, 4, 1)
  cached = cache.read_cache(tmp_path / "out")
  by_key = {str(cached[i]["key"]): cached[i] for i in range(len(cached))}
  assert set(by_key) == {"good", "bad-image", "bad-video", "bad-text"}
  assert {"image_latent", "audio_latent", "text_latent", "caption"} <= set(by_key["good"])
  assert set(by_key["bad-image"]) == {"key", "source", "caption", "text_latent", "text_token"}
  assert "video_latent" not in by_key["bad-video"] and "image_latent" in by_key["bad-video"]
  assert set(by_key["bad-text"]) == {"key", "source", "audio_latent", "audio_token"}
  assert str(by_key["good"]["source"]) == "test"


def test_read_cache_errors(tmp_path):
  with pytest.raises(ValueError, match="no cache shards"):
    cache.read_cache(tmp_path)
  with pytest.raises(ValueError, match="do not exist"):
    cache.read_cache([tmp_path / "missing.array_record"])


def test_cache_command_end_to_end_and_resume(tmp_path):
  args = [sys.executable, "-m", "codi_jax.cli", "cache", "--config", "configs/codi.py:tiny",
          "--config.sample.image_latent_size=8", "--config.sample.audio_latent_frames=8",
          "--source", "synthetic", "--split", "validation", "--limit", "3", "--shard_size", "2",
          "--batch_size", "2", "--store_dtype", "float16", "--out", str(tmp_path)]
  run = lambda: subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  proc = run()
  assert proc.returncode == 0, proc.stderr
  assert "3 records written" in proc.stdout
  assert "RANDOM weights" in proc.stderr and "for testing only" in proc.stderr
  cached = cache.read_cache(tmp_path)
  keys = sorted(str(cached[i]["key"]) for i in range(len(cached)))
  want = synthetic.SyntheticConfig(image_size=32)
  assert keys == sorted(synthetic.generate(want, "validation", i).key for i in range(3))
  assert cached[0]["image_latent"].shape == (8, 8, 4)
  assert cached[0]["image_latent"].dtype == np.float16
  spec = json.loads((tmp_path / cache.SPEC_FILE).read_text())
  assert spec["cache_config"]["image_size"] == 32 and spec["encoder_weights"] == "random"
  again = run()
  assert again.returncode == 0 and "0 shards written, 2 already done" in again.stdout


def test_cache_command_uses_checkpoint_weights(setup, tmp_path):
  """--ckpt: the encoders run with the checkpoint's weights (not the random default), and a
  checkpoint without the encoder parts is refused by name."""
  run, encoders, _ = setup
  ckpt = tmp_path / "ckpt"
  checkpoint.save_model(ckpt, checkpoint.random_params(run.model, 7, cache.ENCODERS), run)
  args = [sys.executable, "-m", "codi_jax.cli", "cache", "--config", "configs/codi.py:tiny",
          "--config.sample.image_latent_size=8", "--config.sample.audio_latent_frames=8",
          "--source", "synthetic", "--split", "validation", "--limit", "2", "--shard_size", "2",
          "--batch_size", "2", "--ckpt", str(ckpt), "--out", str(tmp_path / "cache")]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "RANDOM" not in proc.stderr
  spec = json.loads((tmp_path / "cache" / cache.SPEC_FILE).read_text())
  assert spec["encoder_weights"] == f"checkpoints {ckpt.resolve()}"
  cached = cache.read_cache(tmp_path / "cache")
  # The command's examples and settings, as `codi-jax cache` builds them (= the setup's).
  source = synthetic.SplitSource(train_data.synthetic_config(run), "validation")
  config = dataclasses.replace(encoders.config, audio_samples=run.data.audio_samples)
  prepared = [cache.prepare(source[i], config, encoders.tokenizers) for i in range(2)]
  features = lambda params: cache.FrozenEncoders(run.model, params, encoders.tokenizers,
                                                 config)(prepared)
  with_ckpt = features(cache.load_encoder_params(run.model, ckpt=ckpt))
  default = features(cache.load_encoder_params(run.model, seed=run.seed))
  for i in range(2):
    assert str(cached[i]["key"]) == source[i].key
    names = set(cached[i]) - {"key", "source", "caption"}
    assert names == set(with_ckpt[i]) and len(names) == 8
    for name in names:
      want = with_ckpt[i][name]
      assert np.abs(cached[i][name] - want).max() <= 1e-5 + 1e-4 * np.abs(want).max(), name
      assert np.abs(cached[i][name] - default[i][name]).max() > 1e-3, name
  (tmp_path / "partial").mkdir()
  checkpoint.save_model(tmp_path / "partial" / "ckpt",
                        checkpoint.random_params(run.model, 7, ["clip"]), run)
  bad = subprocess.run(args[:-4] + ["--ckpt", str(tmp_path / "partial" / "ckpt"), "--out",
                                    str(tmp_path / "bad")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "holds ['autokl', 'audioldm_vae', 'optimus', 'clap']" in bad.stderr, bad.stderr


def test_records_read_back_exactly_without_np_load():
  """`io_utils.read_array_bytes` parses the .npy headers itself (np.load's `ast.literal_eval` is not
  thread-safe on CPython 3.11, and grain reads with threads): every dtype and layout round-trips,
  and concurrent reads do not fail."""
  import io
  import threading
  rng = np.random.default_rng(0)
  features = {"key": np.asarray("synthetic-s0-train-0000001"), "caption": np.asarray("A red é."),
              "f32": rng.normal(size=(3, 4, 2)).astype(np.float32),
              "f16": rng.normal(size=(2, 3)).astype(np.float16), "i64": np.arange(5),
              "scalar": np.asarray(np.float32(2.5)),
              "fortran": np.asfortranarray(rng.normal(size=(3, 2)))}
  data = io_utils.array_bytes(features)
  with np.load(io.BytesIO(data), allow_pickle=False) as want:
    got = io_utils.read_array_bytes(data)
    assert set(got) == set(want.files) == set(features)
    for name in features:
      assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
      np.testing.assert_array_equal(got[name], want[name])
  errors = []

  def read():
    try:
      for _ in range(200):
        io_utils.read_array_bytes(data)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  threads = [threading.Thread(target=read) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  with pytest.raises(ValueError, match="not a .npy array"):
    io_utils._read_npy(b"garbage")
