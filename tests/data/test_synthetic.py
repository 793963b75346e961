"""The procedural paired dataset and its analyzers: determinism, disjoint splits, exact reading of
clean examples and robust reading of perturbed ones, at the default and a larger configuration."""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np
import pytest

from codi_jax.data import analyzers as an
from codi_jax.data import synthetic as syn
from codi_jax.modality import Modality

CONFIG = syn.SyntheticConfig()
LARGER = syn.SyntheticConfig(image_size=64, num_frames=8, sample_rate=22050, audio_seconds=2.0,
                             seed=3)
PER_SPLIT = 200


@pytest.fixture(scope="module")
def examples() -> dict[str, list[syn.SyntheticExample]]:
  return {split: [syn.generate(CONFIG, split, i) for i in range(PER_SPLIT)] for split in syn.SPLITS}


def _content_hash(example: syn.SyntheticExample) -> str:
  digest = hashlib.sha256(example.text.encode())
  for array in (example.image, example.video, example.audio):
    digest.update(array.tobytes())
  return digest.hexdigest()


def _read_all(example: syn.SyntheticExample, config: syn.SyntheticConfig) -> dict[Modality, dict]:
  return {Modality.TEXT: an.analyze_text(example.text),
          Modality.IMAGE: an.analyze_image(example.image),
          Modality.VIDEO: an.analyze_video(example.video),
          Modality.AUDIO: an.analyze_audio(example.audio, config.sample_rate)}


# ---------------------------------------------------------------------------------------------
# Generator.


@pytest.mark.parametrize("config", [CONFIG, LARGER], ids=["default", "larger"])
def test_example_layout(config):
  example = syn.generate(config, "validation", 7)
  size, frames, samples = config.image_size, config.num_frames, config.num_samples
  assert example.key == f"synthetic-s{config.seed}-validation-0000007"
  assert example.image.dtype == np.uint8 and example.image.shape == (size, size, 3)
  assert example.video.dtype == np.uint8 and example.video.shape == (frames, size, size, 3)
  assert example.audio.dtype == np.float32 and example.audio.shape == (samples,)
  assert 0.4 < np.abs(example.audio).max() <= 1.0
  assert samples == round(config.audio_seconds * config.sample_rate)
  assert config.fps * config.audio_seconds == pytest.approx(frames)
  # Frames differ (the object moves) and the image is not blank.
  assert len({f.tobytes() for f in example.video}) == frames
  assert np.ptp(example.image) > 100


def test_generate_is_a_pure_function_of_seed_split_index():
  forward = [syn.generate(CONFIG, "train", i) for i in (5, 3, 9)]
  backward = [syn.generate(CONFIG, "train", i) for i in (9, 3, 5)][::-1]
  for a, b in zip(forward, backward):
    assert a.key == b.key and a.text == b.text and a.attributes == b.attributes
    for name in ("image", "video", "audio"):
      np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
  # The split sizes do not change an example; the seed does.
  resized = syn.SyntheticConfig(train_size=10, validation_size=1, test_size=1)
  assert _content_hash(syn.generate(resized, "train", 9)) == _content_hash(forward[2])
  reseeded = syn.generate(syn.SyntheticConfig(seed=1), "train", 9)
  assert _content_hash(reseeded) != _content_hash(forward[2])
  assert reseeded.key != forward[2].key


def test_splits_never_share_an_example(examples):
  keys = collections.Counter(e.key for split in examples.values() for e in split)
  assert len(keys) == len(syn.SPLITS) * PER_SPLIT
  hashes = {split: {_content_hash(e) for e in split_examples}
            for split, split_examples in examples.items()}
  assert all(len(h) == PER_SPLIT for h in hashes.values())
  assert not hashes["train"] & hashes["validation"]
  assert not hashes["train"] & hashes["test"]
  assert not hashes["validation"] & hashes["test"]


def test_attributes_cover_every_value_and_chance_is_uniform(examples):
  everything = [e.attributes for split in examples.values() for e in split]
  for name, kind in syn.ATTRIBUTE_VALUES.items():
    counts = collections.Counter(getattr(a, name) for a in everything)
    assert set(counts) == set(kind), name
    # Uniform: every value within 40% of its expected count (600 draws).
    expected = len(everything) / len(kind)
    assert all(abs(c - expected) < 0.4 * expected for c in counts.values()), (name, counts)
    assert an.CHANCE[name] == pytest.approx(1.0 / len(kind))
  # Captions vary: many wordings, and the same attributes get different captions.
  texts = [e.text for e in examples["train"]]
  assert len(set(texts)) > 0.9 * len(texts)


def test_objects_stay_inside_their_quadrant(examples):
  half = CONFIG.image_size // 2
  for example in examples["train"]:
    vertical, horizontal = example.attributes.position.value.split("-")
    rows = slice(0, half) if vertical == "top" else slice(half, None)
    cols = slice(0, half) if horizontal == "left" else slice(half, None)
    for frame in (example.image, *example.video):
      chroma = frame.max(-1).astype(int) - frame.min(-1)
      outside = chroma.copy()
      outside[rows, cols] = 0
      assert chroma[rows, cols].max() > 150 and outside.max() == 0, example.key


def test_attribute_maps():
  attributes = syn.Attributes(syn.Colour.CYAN, syn.Shape.DIAMOND, syn.Size.SMALL,
                              syn.Position.BOTTOM_LEFT, syn.Motion.UP)
  assert attributes.as_dict() == {
      "colour": "cyan", "shape": "diamond", "size": "small", "position": "bottom-left",
      "motion": "up", "pitch": "D#5", "timbre": "sawtooth", "rhythm": "pulsed"}
  assert syn.Attributes.from_dict(attributes.as_dict()) == attributes
  with pytest.raises(ValueError, match="colour='teal' is not one of"):
    syn.Attributes.from_dict({**attributes.as_dict(), "colour": "teal"})
  with pytest.raises(ValueError, match=r"missing \['motion'\]"):
    syn.Attributes.from_dict({k: v for k, v in attributes.as_dict().items() if k != "motion"})
  with pytest.raises(ValueError, match="Attributes.shape must be a Shape"):
    syn.Attributes(syn.Colour.RED, "circle", syn.Size.SMALL, syn.Position.TOP_LEFT,
                   syn.Motion.UP)
  # Every pitch, timbre and rhythm stands for exactly one colour, shape and size.
  for _, mapping in syn.SOUND_SOURCE.values():
    assert len(set(mapping.values())) == len(mapping)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 16}, "image_size must be >= 32"),
    ({"num_frames": 1}, "num_frames must be >= 2"),
    ({"sample_rate": 4000}, "sample_rate must be >= 8000"),
    ({"audio_seconds": 0.1}, "audio_seconds must be >= 0.5"),
    ({"seed": -1}, "seed must be non-negative"),
    ({"validation_size": 0}, "validation_size must be positive"),
    ({"image_size": 32.0}, "image_size must be an integer"),
    ({"minimal_pairs": 1}, "minimal_pairs must be a bool"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    syn.SyntheticConfig(**kwargs)


def test_minimal_pairs_differ_in_exactly_one_attribute():
  paired = dataclasses.replace(CONFIG, minimal_pairs=True)
  changed = collections.Counter()
  for index in range(0, 200, 2):
    first, second = (syn.generate(paired, "train", index + k, media=()) for k in (0, 1))
    plain = syn.generate(CONFIG, "train", index, media=())  # even ones are unchanged
    assert (first.text, first.attributes) == (plain.text, plain.attributes)
    differ = [name for name in syn.VISUAL_ATTRIBUTES
              if getattr(first.attributes, name) != getattr(second.attributes, name)]
    assert len(differ) == 1, (first.attributes, second.attributes)
    changed[differ[0]] += 1
    assert first.text != second.text
  assert set(changed) == set(syn.VISUAL_ATTRIBUTES)  # every attribute is the changed one
  assert min(changed.values()) >= 10


def test_bad_split_or_index():
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    syn.generate(CONFIG, "dev", 0)
  with pytest.raises(ValueError, match=r"index must be an integer in \[0, 256\)"):
    syn.generate(CONFIG, "test", 256)
  with pytest.raises(ValueError, match="index must be an integer"):
    syn.generate(CONFIG, "test", -1)
  assert syn.split_size(CONFIG, "train") == 4096


# ---------------------------------------------------------------------------------------------
# Analyzers: exact on clean output.


def test_analyzers_exact_on_clean_examples(examples):
  for split_examples in examples.values():
    for example in split_examples:
      truth = example.attributes.as_dict()
      for modality, read in _read_all(example, CONFIG).items():
        names = an.ATTRIBUTES_BY_MODALITY[modality]
        assert set(read) == set(names)
        assert read == {n: truth[n] for n in names}, (example.key, modality, example.text)


def test_analyzers_exact_at_a_larger_configuration():
  for index in range(24):
    example = syn.generate(LARGER, "train", index)
    truth = example.attributes.as_dict()
    for modality, read in _read_all(example, LARGER).items():
      assert read == {n: truth[n] for n in an.ATTRIBUTES_BY_MODALITY[modality]}, example.key


# ---------------------------------------------------------------------------------------------
# Analyzers: robust to perturbations.


def _noise(rng, pixels, sigma=0.1 * 255):
  return np.clip(np.round(pixels + rng.normal(0.0, sigma, pixels.shape)), 0, 255).astype(np.uint8)


def _blur(rng, pixels):
  """[1, 2, 1] / 4 blur over H and W (axes -3, -2), edges repeated."""
  out = pixels.astype(np.float64)
  for axis in (-3, -2):
    padded = np.concatenate([out.take([0], axis), out, out.take([-1], axis)], axis)
    n = out.shape[axis]
    out = sum(w * padded.take(range(i, i + n), axis) for i, w in enumerate((0.25, 0.5, 0.25)))
  return np.round(out).astype(np.uint8)


def _brighter(rng, pixels, shift=20):
  return np.clip(pixels.astype(int) + shift, 0, 255).astype(np.uint8)


def _darker(rng, pixels):
  return _brighter(rng, pixels, -20)


def _all_three(rng, pixels):
  return _noise(rng, _brighter(rng, _blur(rng, pixels), 15))


PICTURE_PERTURBATIONS = [_noise, _blur, _brighter, _darker, _all_three]


def _accuracy(pairs) -> dict[str, float]:
  """pairs: (read, truth Attributes, names) -> mean accuracy per attribute."""
  hits = collections.defaultdict(list)
  for read, truth, names in pairs:
    for name, ok in an.attribute_accuracy(read, truth, names).items():
      hits[name].append(ok)
  return {name: float(np.mean(v)) for name, v in hits.items()}


@pytest.fixture(scope="module")
def robustness_set() -> list[syn.SyntheticExample]:
  return [syn.generate(CONFIG, "test", i) for i in range(96)]


@pytest.mark.parametrize("perturb", PICTURE_PERTURBATIONS, ids=lambda f: f.__name__.strip("_"))
def test_image_and_video_analyzers_are_robust(robustness_set, perturb):
  rng = np.random.default_rng(0)
  images, videos = [], []
  for example in robustness_set:
    images.append((an.analyze_image(perturb(rng, example.image)), example.attributes,
                   an.ATTRIBUTES_BY_MODALITY[Modality.IMAGE]))
    videos.append((an.analyze_video(perturb(rng, example.video)), example.attributes,
                   an.ATTRIBUTES_BY_MODALITY[Modality.VIDEO]))
  for accuracy in (_accuracy(images), _accuracy(videos)):
    assert min(accuracy.values()) >= 0.95, accuracy


def _audio_noise(rng, wave, snr_db=10.0):
  power = np.mean(wave.astype(np.float64) ** 2)
  noise = rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), wave.shape)
  return (wave + noise).astype(np.float32)


AUDIO_PERTURBATIONS = {
    "noise_10db": _audio_noise,
    "quieter": lambda rng, w: w * np.float32(0.1),
    "louder": lambda rng, w: w * np.float32(1.25),
    "noise_and_gain": lambda rng, w: _audio_noise(rng, w) * np.float32(0.3),
}


@pytest.mark.parametrize("name", AUDIO_PERTURBATIONS)
def test_audio_analyzer_is_robust(robustness_set, name):
  rng = np.random.default_rng(1)
  accuracy = _accuracy(
      (an.analyze_audio(AUDIO_PERTURBATIONS[name](rng, e.audio), CONFIG.sample_rate),
       e.attributes, an.ATTRIBUTES_BY_MODALITY[Modality.AUDIO]) for e in robustness_set)
  assert min(accuracy.values()) >= 0.95, accuracy


TEXT_PERTURBATIONS = {
    "upper": str.upper,
    "title": str.title,
    "no_punctuation": lambda t: "".join(c for c in t if c.isalnum() or c.isspace()),
    "extra_punctuation": lambda t: " ..." + t.replace(" ", "  ,").replace("-", " - ") + "?!",
}


@pytest.mark.parametrize("name", TEXT_PERTURBATIONS)
def test_text_analyzer_is_robust(examples, name):
  perturb = TEXT_PERTURBATIONS[name]
  for example in examples["validation"]:
    assert an.analyze_text(perturb(example.text)) == example.attributes.as_dict(), example.text


def test_larger_configuration_is_robust():
  rng = np.random.default_rng(2)
  for index in range(12):
    example = syn.generate(LARGER, "test", index)
    truth = example.attributes.as_dict()
    read = an.analyze_video(_all_three(rng, example.video))
    assert read == {n: truth[n] for n in an.ATTRIBUTES_BY_MODALITY[Modality.VIDEO]}, example.key
    read = an.analyze_audio(_audio_noise(rng, example.audio), LARGER.sample_rate)
    assert read == {n: truth[n] for n in an.ATTRIBUTES_BY_MODALITY[Modality.AUDIO]}, example.key


# ---------------------------------------------------------------------------------------------
# Scores, unreadable inputs and bad inputs.


def test_cross_modal_agreement(examples):
  a, b = examples["validation"][:2]
  assert a.attributes.colour != b.attributes.colour  # the mismatch below is a real one
  read_a, read_b = _read_all(a, CONFIG), _read_all(b, CONFIG)
  image_audio = an.agreement(read_a[Modality.IMAGE], read_a[Modality.AUDIO])
  assert image_audio == {"colour": True, "shape": True, "size": True}
  text_video = an.agreement(read_a[Modality.TEXT], read_a[Modality.VIDEO])
  assert text_video == dict.fromkeys(syn.VISUAL_ATTRIBUTES, True)
  mixed = an.agreement(read_a[Modality.VIDEO], read_b[Modality.AUDIO])
  assert set(mixed) == {"colour", "shape", "size"} and mixed["colour"] is False
  for name in mixed:
    same = getattr(a.attributes, name) == getattr(b.attributes, name)
    assert mixed[name] is same
  assert an.agreement({"pitch": "A3"}, {"colour": "red"}) == {"colour": True}
  assert an.agreement({"pitch": an.UNKNOWN}, {"colour": an.UNKNOWN}) == {"colour": False}
  assert an.agreement({"motion": "up"}, {"pitch": "A3"}) == {}


def test_attribute_accuracy(examples):
  truth = examples["train"][0].attributes
  read = {**truth.as_dict(), "colour": an.UNKNOWN}
  del read["shape"]
  accuracy = an.attribute_accuracy(read, truth, ["colour", "shape", "size", "pitch"])
  assert accuracy == {"colour": False, "shape": False, "size": True, "pitch": True}
  with pytest.raises(ValueError, match="unknown attribute 'hue'"):
    an.attribute_accuracy(read, truth, ["hue"])


def test_unreadable_inputs_are_unknown():
  grey = np.full((32, 32, 3), 50, np.uint8)
  assert an.analyze_image(grey) == dict.fromkeys(an.ATTRIBUTES_BY_MODALITY[Modality.IMAGE],
                                                 an.UNKNOWN)
  assert set(an.analyze_video(np.stack([grey] * 3)).values()) == {an.UNKNOWN}
  assert set(an.analyze_audio(np.zeros(16000, np.float32), 16000).values()) == {an.UNKNOWN}
  read = an.analyze_text("A photograph of a cat on a sofa.")
  assert set(read.values()) == {an.UNKNOWN}
  # Two colours named: colour (and the pitch it implies) is ambiguous, the rest still read.
  read = an.analyze_text("A small red and blue square in the top left, moving up.")
  assert read["colour"] == read["pitch"] == an.UNKNOWN
  assert (read["shape"], read["size"], read["position"], read["motion"]) == (
      "square", "small", "top-left", "up")


def test_analyzer_input_validation():
  with pytest.raises(ValueError, match=r"must be \[H, W, 3\]"):
    an.analyze_image(np.zeros((32, 32), np.uint8))
  with pytest.raises(ValueError, match="must be uint8"):
    an.analyze_image(np.zeros((32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"frames must be \[F, H, W, 3\]"):
    an.analyze_video(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="wave must be mono"):
    an.analyze_audio(np.zeros((2, 16000), np.float32), 16000)
  with pytest.raises(ValueError, match="sample_rate must be an integer >= 8000"):
    an.analyze_audio(np.zeros(16000, np.float32), 16000.0)
  with pytest.raises(ValueError, match="need at least 0.25 s"):
    an.analyze_audio(np.zeros(100, np.float32), 16000)
  with pytest.raises(ValueError, match="caption is empty"):
    an.analyze_text("  ")


def test_only_the_requested_media_are_rendered_and_they_do_not_change():
  config = syn.SyntheticConfig()
  full = syn.generate(config, "train", 3)
  audio = syn.generate(config, "train", 3, ("audio",))
  assert audio.text == full.text and audio.attributes == full.attributes
  np.testing.assert_array_equal(audio.audio, full.audio)
  assert audio.image.size == 0 and audio.video.size == 0
  np.testing.assert_array_equal(syn.SplitSource(config, "train", ("video",))[3].video, full.video)
  with pytest.raises(ValueError, match="unknown media"):
    syn.generate(config, "train", 3, ("smell",))


def test_caption_dropout_names_a_subset_and_keeps_the_scene():
  base = syn.SyntheticConfig()
  dropped = syn.SyntheticConfig(caption_dropout=0.5)
  sizes = set()
  for i in range(40):
    full, partial = syn.generate(base, "train", i), syn.generate(dropped, "train", i)
    assert full.named == tuple(syn.VISUAL_ATTRIBUTES)
    assert partial.named and set(partial.named) <= set(syn.VISUAL_ATTRIBUTES)
    sizes.add(len(partial.named))
    # The same scene and media: only the caption changes.
    assert partial.attributes == full.attributes
    assert np.array_equal(partial.image, full.image) and np.array_equal(partial.audio, full.audio)
    if partial.named == full.named:
      assert partial.text == full.text
    read, truth = an.analyze_text(partial.text), partial.attributes.as_dict()
    for name in syn.VISUAL_ATTRIBUTES:
      want = truth[name] if name in partial.named else an.UNKNOWN
      assert read[name] == want, (partial.text, name)
  assert len(sizes) >= 3  # subsets of several sizes
  # Held-out splits keep full captions.
  assert syn.generate(dropped, "test", 3).text == syn.generate(base, "test", 3).text
  with pytest.raises(ValueError, match="caption_dropout must lie in"):
    syn.SyntheticConfig(caption_dropout=1.0)
  with pytest.raises(ValueError, match="named must be a non-empty subset"):
    syn.caption(full.attributes, np.random.default_rng(0), ())
