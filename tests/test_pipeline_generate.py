"""Any-to-any generation (`codi_jax.pipeline`, `codi_jax.outputs`, `codi-jax generate`) on the tiny
preset with host-side random weights (no compiled init)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from codi_jax import checkpoint
from codi_jax.data import media
from codi_jax.outputs import write_outputs
from codi_jax.pipeline import CoDiPipeline, Generated, load_tokenizers, required_parts
from codi_jax.pipeline_options import ORIGINAL
from configs.codi import get_config
from tests.conftest import REPO

STEPS = 2


@pytest.fixture(scope="module")
def model():
  config = get_config("tiny")
  return config, checkpoint.random_model_params(config, seed=0)


@pytest.fixture(scope="module")
def pipe(model):
  return CoDiPipeline(*model, load_tokenizers())


def _image(seed=0, shape=(40, 48, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _audio(seed=0, seconds=0.5):
  return (0.3 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(
      np.float32)


def test_joint_generation_shapes_and_seeds(pipe):
  inputs = {"text": "a dog barks in the rain", "image": _image()}
  kw = dict(ddim_steps=STEPS, num_samples=2, audio_seconds=0.5)
  outputs = ["image", "video", "audio", "text"]
  g = pipe.generate(inputs, outputs, seed=3, **kw)
  assert g.image.dtype == np.uint8 and g.image.shape == (2, 32, 32, 3)
  assert g.video.dtype == np.uint8 and g.video.shape == (2, 4, 32, 32, 3)
  assert g.audio.dtype == np.float32 and g.audio.shape == (2, 8000)  # trimmed to 0.5 s
  assert np.all(np.abs(g.audio) <= 1) and g.audio.std() > 0
  assert len(g.text) == 2 and all(isinstance(t, str) and t for t in g.text)
  assert g.image.std() > 0 and not np.array_equal(g.image[0], g.image[1])
  s = g.settings
  assert (s.seed, s.ddim_steps, s.num_samples, s.alignment) == (3, STEPS, 2, "others")
  assert s.weights == {"image": 0.5, "text": 0.5}
  assert s.latent_shapes["audio"] == [2, 14, 16, 8]  # 50 mel frames / 4 -> 13, even for the UNet

  same = pipe.generate(inputs, outputs, seed=3, **kw)
  for m in ("image", "video", "audio"):
    np.testing.assert_array_equal(getattr(g, m), getattr(same, m))
  assert same.text == g.text
  other = pipe.generate(inputs, outputs, seed=4, **kw)
  for m in ("image", "video", "audio"):
    assert not np.array_equal(getattr(g, m), getattr(other, m))


@pytest.mark.parametrize("inputs, output, weights", [
    ({"audio": _audio()}, "text", None),
    ({"video": _image(1, (3, 24, 24, 3)), "audio": _audio(2)}, "image", {"video": 2, "audio": 1}),
])
def test_single_output_from_other_inputs(pipe, inputs, output, weights):
  g = pipe.generate(inputs, [output], weights=weights, ddim_steps=STEPS, image_size=32,
                    alignment="self", seed=1)
  assert g.settings.alignment == "self" and g.settings.outputs == (output,)
  assert all(getattr(g, m) is None for m in ("image", "video", "audio", "text") if m != output)
  if output == "text":
    assert len(g.text) == 1 and isinstance(g.text[0], str)
  else:
    assert g.image.shape == (1, 32, 32, 3) and g.image.dtype == np.uint8
    assert g.settings.weights == pytest.approx({"audio": 1 / 3, "video": 2 / 3})


def test_initial_noise_replaces_the_seeded_draw(pipe):
  inputs, kw = {"text": "a red apple"}, dict(ddim_steps=STEPS, image_size=32, num_samples=2)
  shape = pipe.plan(inputs, ["image"], **kw).latent_shapes["image"]  # channels last
  assert shape == [2, 8, 8, 4]
  noise = {"image": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
  a = pipe.generate(inputs, ["image"], seed=1, initial_noise=noise, **kw)
  b = pipe.generate(inputs, ["image"], seed=2, initial_noise=noise, **kw)
  np.testing.assert_array_equal(a.image, b.image)  # eta 0: the seed no longer matters
  assert not np.array_equal(a.image, pipe.generate(inputs, ["image"], seed=1, **kw).image)


@pytest.mark.parametrize("noise, match", [
    ({"image": np.zeros((1, 8, 8, 3), np.float32)},
     r"initial_noise\[image\] must be a float latent \[1, 8, 8, 4\] \(channels last\)"),
    ({"audio": np.zeros((1, 8, 8, 4), np.float32)}, r"given for \['audio'\], the outputs are"),
    ({"image": np.full((1, 8, 8, 4), np.nan, np.float32)}, "NaN"),
    ({"image": np.zeros((1, 8, 8, 4), np.int32)}, "must be a float latent"),
])
def test_bad_initial_noise_raises(pipe, noise, match):
  settings = pipe.plan(["text"], ["image"], image_size=32)
  with pytest.raises(ValueError, match=match):
    pipe.prepare(settings, {"text": "a"}, initial_noise=noise)


def test_greedy_text_is_the_same_for_every_seed(pipe):
  noise = {"text": np.random.default_rng(6).standard_normal((1, 32)).astype(np.float32)}
  kw = dict(ddim_steps=STEPS, text_decoding="greedy", initial_noise=noise)
  a = pipe.generate({"text": "a cat"}, ["text"], seed=1, **kw)
  b = pipe.generate({"text": "a cat"}, ["text"], seed=2, **kw)
  assert a.text == b.text and a.settings.text_decoding == "greedy"
  with pytest.raises(ValueError, match="text_decoding must be one of"):
    pipe.plan(["text"], ["text"], text_decoding="beam")


@pytest.fixture(scope="module")
def original_pipe(model):
  """The tiny model with the original's inference behaviour (`pipeline_options.ORIGINAL`), image
  inputs regularised to 64 instead of 512 to stay cheap."""
  config, params = model
  config = config.copy_and_resolve_references()
  config.sample.update(ORIGINAL.as_config())
  config.sample.image_prompt_size = 64
  return CoDiPipeline(config, params, load_tokenizers())


def test_image_inputs_are_regularised_and_mirrored_as_configured(pipe, original_pipe):
  square = _image(3, (40, 40, 3))
  plan = lambda seed, flip=None: original_pipe.plan(["image"], ["text"], seed=seed,
                                                    image_flip=flip)
  prompt = lambda settings, x=square: original_pipe.condition_input(settings, "image", x)
  straight, mirrored = prompt(plan(0, False)), prompt(plan(0, True))
  assert straight.shape == (1, 64, 64, 3) and straight.dtype == np.float32
  np.testing.assert_array_equal(mirrored, straight[:, :, ::-1])
  flips = sum(np.array_equal(prompt(plan(seed)), mirrored) for seed in range(40))
  assert 8 <= flips <= 32  # the original's RandomHorizontalFlip(p=0.5), drawn from the seed
  wide = _image(4, (40, 56, 3))  # the original's RandomCrop: a seeded 40 x 40 window
  assert len({prompt(plan(seed, False), wide).tobytes() for seed in range(8)}) > 1
  assert pipe.condition_input(plan(0), "image", wide).shape == (1, 40, 56, 3)  # ours: as given
  cropped = original_pipe.plan(["image"], ["text"], image_flip=False, image_crop=16)
  np.testing.assert_array_equal(prompt(cropped, wide), prompt(plan(0, False), wide[:, 16:]))
  with pytest.raises(ValueError, match="crop offset 17 is outside"):
    prompt(original_pipe.plan(["image"], ["text"], image_crop=17), wide)
  for name in ("image_flip", "image_crop"):
    with pytest.raises(ValueError, match=f"{name} is given, but this config does not"):
      pipe.plan(["image"], ["text"], **{name: 1 if name == "image_crop" else True})


def test_audio_is_trimmed_only_where_configured(pipe, original_pipe):
  raw = {"audio": np.ones((1, 1000), np.float32)}
  assert pipe.finish(pipe.plan(["text"], ["audio"], audio_seconds=0.05), raw).audio.shape == (
      1, 800)
  assert original_pipe.finish(original_pipe.plan(["text"], ["audio"], audio_seconds=0.05),
                              raw).audio.shape == (1, 1000)  # the vocoder's whole output


@pytest.mark.parametrize("inputs, outputs, kw, match", [
    ({"text": "  "}, ["image"], {}, "text input is empty"),
    ({"smell": "x"}, ["image"], {}, "unknown modality 'smell'"),
    ({"text": "a"}, ["smell"], {}, "unknown modality 'smell'"),
    ({"text": "a", "image": _image()}, ["image"], {"weights": {"image": 0}},
     "weight of image must be positive"),
    ({"image": _image().astype(np.float32)}, ["text"], {}, "image input must be non-empty uint8"),
    ({"audio": np.zeros((2, 100), np.float32)}, ["text"], {}, "mono wave"),
    ({"text": "a"}, ["image"], {"image_size": 36}, "multiple of 8"),
    ({"text": "a"}, [], {}, "at least one output"),
])
def test_bad_inputs_raise(pipe, inputs, outputs, kw, match):
  with pytest.raises(ValueError, match=match):
    pipe.generate(inputs, outputs, ddim_steps=STEPS, **kw)


def test_pipeline_needs_every_part_it_reads(model):
  config, params = model
  partial = {k: v for k, v in params.items() if k != "clap"}
  with pytest.raises(ValueError, match=r"needs parameters for \['clap'\]"):
    CoDiPipeline(config, partial, load_tokenizers())
  assert "hifigan_vocoder" not in required_parts(config.model)  # Griffin-Lim decodes audio
  hifigan = config.copy_and_resolve_references()
  hifigan.model.audio_decoder = "hifigan"
  assert required_parts(hifigan.model) == checkpoint.PARTS
  with pytest.raises(ValueError, match=r"needs parameters for \['hifigan_vocoder'\]"):
    CoDiPipeline(hifigan, {k: v for k, v in params.items() if k != "hifigan_vocoder"},
                 load_tokenizers())


def test_failed_write_leaves_nothing(pipe, tmp_path):
  g = pipe.generate({"text": "a"}, ["image"], ddim_steps=STEPS)
  bad = Generated(g.settings, image=g.image, video=np.zeros((1, 2, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="video must be"):
    write_outputs(tmp_path / "run", bad)
  assert list(tmp_path.iterdir()) == []
  # What a killed write left (a staging folder, a half-written file) goes with the next write;
  # another output's leftovers stay.
  (tmp_path / ".run.k1ll3d.tmp").mkdir()
  (tmp_path / ".run.k1ll3d.tmp" / "image_0.png").write_bytes(b"half")
  (tmp_path / ".run.x.old").mkdir()
  (tmp_path / ".other.k1ll3d.tmp").mkdir()
  first = write_outputs(tmp_path / "run", g, input_text="a")
  assert first["output_files"] == {"image": ["image_0.png"]}
  assert sorted(p.name for p in tmp_path.iterdir()) == [".other.k1ll3d.tmp", "run"]


# --- the command ---------------------------------------------------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "codi_jax.cli", "generate", *args], cwd=REPO,
                        check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def media_dir(model, tmp_path_factory):
  folder = tmp_path_factory.mktemp("generate")
  config, params = model
  # As the tiny preset's training leaves it: no vocoder (its audio decoder is Griffin-Lim).
  assert config.model.audio_decoder == "griffin_lim"
  checkpoint.save_model(folder / "ckpt", {k: v for k, v in params.items()
                                          if k != "hifigan_vocoder"}, config)
  (folder / "in.png").write_bytes(media.encode_png(_image()))
  stereo = np.stack([_audio(0, 0.3), _audio(1, 0.3)], axis=-1)  # [S, 2] at 22.05 kHz
  soundfile.write(folder / "in.wav", stereo[: int(0.3 * 22050)], 22050)
  (folder / "in.mp4").write_bytes(media.encode_mp4(_image(2, (5, 16, 16, 3)), 8))
  (folder / "bad.png").write_bytes(media.encode_png(_image())[:60])
  (folder / "notes.txt").write_text("not an image")
  return folder


def test_cli_end_to_end(media_dir, tmp_path):
  out = tmp_path / "gen"
  proc = _cli("--ckpt", str(media_dir / "ckpt"), "--text", "a dog", "--image",
              str(media_dir / "in.png"), "--audio", str(media_dir / "in.wav"), "--video",
              str(media_dir / "in.mp4"), "--outputs", "image,video,audio,text", "--out", str(out),
              "--weights", "text=2,image=1,audio=1,video=1", "--ddim_steps", str(STEPS),
              "--seed", "5", "--audio_seconds", "0.4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mixed to mono and resampled to 16000 Hz" in proc.stdout
  result = json.loads((out / "result.json").read_text())
  s = result["settings"]
  assert (s["seed"], s["ddim_steps"], s["audio_seconds"]) == (5, STEPS, 0.4)
  assert s["weights"] == {"audio": 0.2, "image": 0.2, "text": 0.4, "video": 0.2}
  assert result["inputs"] == {"text": "a dog", "image": "inputs/image.png",
                              "audio": "inputs/audio.wav", "video": "inputs/video.mp4"}
  assert result["output_files"] == {"image": ["image_0.png"], "video": ["video_0.mp4"],
                                    "audio": ["audio_0.wav"], "text": ["text_0.txt"]}
  assert media.decode_image((out / "image_0.png").read_bytes()).shape == (32, 32, 3)
  assert media.decode_video((out / "video_0.mp4").read_bytes()).shape == (4, 32, 32, 3)
  wave, rate = media.read_audio((out / "audio_0.wav").read_bytes())
  assert (rate, wave.shape) == (16000, (6400,))
  page = (out / "index.html").read_text()
  referenced = set(re.findall(r'(?:src|href)="([^"]+)"', page))
  assert referenced == {"inputs/image.png", "inputs/audio.wav", "inputs/video.mp4",
                        "image_0.png", "video_0.mp4", "audio_0.wav", "text_0.txt"}
  assert all((out / f).is_file() for f in referenced)
  assert "a dog" in page and "<audio" in page and "<video" in page


@pytest.mark.parametrize("args, match", [
    (["--image", "missing.png"], "--image file missing.png does not exist"),
    (["--image", "{dir}/bad.png"], "corrupt|truncated"),
    (["--image", "{dir}/notes.txt"], "cannot identify|unsupported|not recognised"),
    (["--text", " "], "--text is empty"),
    (["--text", "a", "--weights", "text=0"], "weight of text must be positive"),
    (["--text", "a", "--num_frames", "0"], "num_frames must be a positive integer, got 0"),
    (["--text", "a", "--image_size", "0"], "image_size must be a positive integer, got 0"),
])
def test_cli_errors_leave_no_output(media_dir, tmp_path, args, match):
  out = tmp_path / "gen"
  args = [a.format(dir=media_dir) for a in args]
  proc = _cli("--ckpt", str(media_dir / "ckpt"), *args, "--outputs", "image", "--out", str(out),
              "--ddim_steps", "1")
  assert proc.returncode != 0
  assert "codi-jax generate: error:" in proc.stderr
  assert re.search(match, proc.stderr, re.IGNORECASE), proc.stderr[-2000:]
  assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_out_that_is_a_file_before_generating(media_dir, tmp_path):
  out = tmp_path / "a_file"
  out.write_text("mine")
  proc = _cli("--ckpt", str(media_dir / "ckpt"), "--text", "a", "--outputs", "image",
              "--out", str(out))
  assert proc.returncode != 0 and f"--out {out} exists and is not a folder" in proc.stderr
  assert out.read_text() == "mine" and "Traceback" not in proc.stderr
