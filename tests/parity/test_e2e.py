"""End-to-end parity (`codi_jax.parity.e2e`) on the bundled development set
`tests/fixtures/codi_e2e`: the whole tiny CoDi through `CoDiPipeline` against the original's
recorded inference. The pipeline runs once per module (about two minutes on two CPU cores); the
tests that must fail tamper with its outputs, as a wrong pipeline would produce them."""

import dataclasses
import json

import numpy as np
import pytest

from codi_jax import parity
from codi_jax.modality import Modality
from codi_jax.parity import e2e
from codi_jax.parity.fixtures import E2E_KIND, Covered, load_fixture
from codi_jax.pipeline_options import PixelQuantization, quantize_pixels
from tests.conftest import REPO

E2E = REPO / "tests" / "fixtures" / "codi_e2e"


@pytest.fixture(scope="module")
def fixture():
  return load_fixture(E2E / "codi_e2e.npz")


@pytest.fixture(scope="module")
def produced(fixture):
  return e2e.e2e_outputs(fixture)


def _failed(rows):
  return {k: r for k, r in rows.items() if not r.passed}


def test_whole_pipeline_matches_the_original(fixture, produced):
  rows = parity.compare_outputs(fixture, produced)
  assert not _failed(rows), _failed(rows)
  assert set(fixture.outputs) <= set(rows)  # every stored output has its row
  assert "input/image_audio2image/image_regularized_uint8_chw" in rows
  assert {k for k in rows if k.startswith("meta/")} == {
      f"meta/text2text/text_{d}_{s}" for d in ("greedy", "sampled") for s in ("raw", "final")}
  for case in fixture.config["cases"]:
    assert rows[f"{case}/mixed_context"].max_abs < 1e-5
  sampled = rows["text2text/text_sampled_token_ids"]
  assert "teacher forcing" in sampled.note


def test_the_dispatch_finds_the_e2e_handler(fixture):
  assert fixture.kind == E2E_KIND and fixture.component == ""
  assert parity._handler(fixture) is e2e.e2e_outputs


def _tampered(produced, key, change):
  out = dict(produced)
  value, tol = out[key]
  out[key] = (change(np.array(value)), tol)
  return out


@pytest.mark.parametrize("key,change", [
    # the guidance halves swapped: [cond; uncond] instead of [uncond; cond]
    ("text2image/mixed_context", lambda x: np.concatenate(np.split(x, 2)[::-1])),
    # a missing latent scale factor before the image VAE
    ("text2image/final_latent_image", lambda x: x / 0.18215),
    # one DDIM step short
    ("text2audio/x_t_audio", lambda x: np.concatenate([x[:1], x[:-1]])),
    # a wrong weight when mixing two conditions
    ("image_audio2image/mixed_context", lambda x: x * 1.001),
    # the waveform clipped
    ("text2audio/waveform_audio", lambda x: np.clip(x, -0.2, 0.2)),
    # the unflipped image input
    ("input/image_audio2image/image_regularized_uint8_chw", lambda x: x[..., ::-1]),
    # a greedy token changed
    ("text2text/text_greedy_token_ids", lambda x: np.where(np.arange(x.shape[1]) == 3, 7, x)),
])
def test_a_wrong_pipeline_fails(fixture, produced, key, change):
  rows = parity.compare_outputs(fixture, _tampered(produced, key, change))
  assert list(_failed(rows)) == [key]


def test_rounded_pixels_are_not_the_originals(fixture, produced):
  # Ours (round) instead of the original's truncation: off by one almost everywhere it matters.
  decoded = np.moveaxis(produced["text2image/decoded_image"][0], 1, -1)
  rounded = np.asarray(quantize_pixels(decoded, PixelQuantization.ROUND))
  out = dict(produced)
  out["text2image/pixels_image_uint8_hwc"] = (rounded, produced[
      "text2image/pixels_image_uint8_hwc"][1])
  row = parity.compare_outputs(fixture, out)["text2image/pixels_image_uint8_hwc"]
  assert not row.passed and row.max_abs == 1  # within one level, but far too often


def test_strings_compare_exactly(fixture, produced):
  out = _tampered(produced, "meta/text2text/text_greedy_final",
                  lambda x: np.asarray([s + "!" for s in x[:1]] + list(x[1:])))
  row = parity.compare_outputs(fixture, out)["meta/text2text/text_greedy_final"]
  assert not row.passed and "1 of 2 differ" in row.note


def test_covered_output_fails_with_its_covering_outputs(fixture, produced):
  key = "text2text/text_sampled_logits_logsumexp"
  rows = parity.compare_outputs(fixture, _tampered(produced, key, lambda x: x + 0.01))
  covered = rows["text2text/text_sampled_token_ids"]
  assert not covered.passed and key in covered.error
  out = dict(produced)
  out["text2text/text_sampled_token_ids"] = (Covered("stand-in", ("no/such/output",)), (0, 0))
  assert not parity.compare_outputs(fixture, out)["text2text/text_sampled_token_ids"].passed


def test_video_conditions_are_refused(fixture):
  with pytest.raises(ValueError, match="video conditions are not covered"):
    e2e._inputs(fixture, "text2image", [Modality.VIDEO])


def test_handler_reads_sizes_from_the_fixture(fixture):
  # Nothing is hard-coded: the latent shapes the pipeline plans are checked against the
  # fixture's own, and a case the model cannot produce is an error naming it.
  pipe = e2e.build_pipeline(fixture)
  spec = json.loads(json.dumps(fixture.config["cases"]["text2image"]))
  spec["latent_shapes"] = [[2, 4, 16, 16]]
  with pytest.raises(ValueError, match=r"text2image: our image latent is \[2, 8, 8, 4\]"):
    e2e._plan(pipe, fixture, "text2image", spec, [Modality.TEXT])


def test_a_non_square_image_crop_is_recovered_from_the_stored_input(fixture):
  # The original's RandomCrop offset is not recorded; the one offset that reproduces the stored
  # regularised image is passed as `image_crop` (a square image has nothing to cut).
  pipe = e2e.build_pipeline(fixture)
  case = "image_audio2image"
  assert e2e._crop_offset(pipe, fixture, case, flip=True) is None
  square = fixture.inputs[f"{case}/image_uint8"]  # [64, 64, 3]
  noise = np.random.default_rng(0).integers(0, 256, (64, 8, 3), dtype=np.uint8)
  wide = np.concatenate([noise[:, :5], square, noise[:, 5:]], axis=1)  # the square at offset 5
  stand_in = dataclasses.replace(fixture, inputs={**fixture.inputs, f"{case}/image_uint8": wide})
  assert e2e._crop_offset(pipe, stand_in, case, flip=True) == 5
  assert e2e._crop_offset(pipe, stand_in, case, flip=False) is None  # nothing reproduces it
