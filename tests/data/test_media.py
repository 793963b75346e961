"""Media codecs: round trips, resampling, even frame sampling and the reason of every failure."""

from __future__ import annotations

import numpy as np
import pytest

from codi_jax.audio.resample import resample
from codi_jax.data import media


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
  t = np.arange(int(seconds * rate)) / rate
  return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 1), (9, 7), (32, 32)])
def test_png_round_trip_is_exact(shape):
  image = _image(*shape)
  np.testing.assert_array_equal(media.decode_image(media.encode_png(image)), image)


def test_jpeg_keeps_a_smooth_image_close():
  ramp = np.linspace(0, 255, 32, dtype=np.float32)
  image = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), -1).astype(np.uint8)
  decoded = media.decode_image(media.encode_jpeg(image))
  assert decoded.shape == image.shape and decoded.dtype == np.uint8
  assert np.abs(decoded.astype(int) - image).max() <= 4


def test_decode_image_converts_grey_and_alpha_to_rgb():
  import io

  from PIL import Image

  buf = io.BytesIO()
  Image.fromarray(np.full((4, 5, 4), 200, np.uint8), mode="RGBA").save(buf, format="PNG")
  np.testing.assert_array_equal(media.decode_image(buf.getvalue()), np.full((4, 5, 3), 200))


@pytest.mark.parametrize("encode", [media.encode_wav, media.encode_flac])
def test_audio_round_trip_within_16_bit_quantisation(encode):
  wave = _tone(0.25, 16000)
  wave[:3] = [1.5, -2.0, 0.0]  # Out of range samples clip to full scale.
  decoded = media.decode_audio(encode(wave, 16000))
  expected = np.clip(wave, -1.0, 1.0)
  assert decoded.shape == wave.shape and decoded.dtype == np.float32
  np.testing.assert_allclose(decoded, expected, atol=1.0 / 32768)


def test_decode_audio_mixes_channels_and_resamples_like_resample():
  import io

  import soundfile

  rate = 22050
  left, right = _tone(0.3, rate, 300.0), _tone(0.3, rate, 500.0)
  buf = io.BytesIO()
  soundfile.write(buf, np.stack([left, right], 1), rate, format="WAV", subtype="FLOAT")
  native, native_rate = media.read_audio(buf.getvalue())
  assert native_rate == rate
  np.testing.assert_allclose(native, (left + right) / 2, atol=1e-7)
  decoded = media.decode_audio(buf.getvalue(), target_rate=16000)
  direct = np.asarray(resample(native, rate, 16000))
  assert decoded.shape == direct.shape == (int(np.ceil(len(native) * 16000 / rate)),)
  np.testing.assert_allclose(decoded, direct, atol=1e-6)  # Zero padding changes nothing.
  np.testing.assert_array_equal(media.decode_audio(buf.getvalue(), target_rate=None), native)


def test_mp4_lossless_round_trip_and_even_frame_sampling():
  frames = np.stack([np.full((6, 10, 3), 40 * i, np.uint8) for i in range(5)])  # [5, 6, 10, 3]
  frames[:, 1:3, 2:5] = _image(2, 3)
  data = media.encode_mp4(frames, fps=8)
  assert data == media.encode_mp4(frames, fps=8)  # Deterministic bytes.
  decoded = media.decode_video(data)
  assert decoded.shape == frames.shape
  assert np.abs(decoded.astype(int) - frames).max() <= 2
  sampled = media.decode_video(data, num_frames=3)  # Frames 0, 2, 4.
  np.testing.assert_array_equal(sampled, decoded[[0, 2, 4]])
  assert media.decode_video(data, num_frames=7).shape[0] == 7  # Short clips repeat frames.


def test_mp4_lossy_is_close_and_needs_even_sizes():
  frames = np.full((3, 16, 16, 3), 90, np.uint8)
  decoded = media.decode_video(media.encode_mp4(frames, fps=4, lossless=False))
  assert np.abs(decoded.astype(int) - 90).max() <= 3
  with pytest.raises(ValueError, match="even frame sizes"):
    media.encode_mp4(np.zeros((2, 5, 6, 3), np.uint8), fps=4, lossless=False)


def _bad_cases():
  png = media.encode_png(_image(16, 16))
  wav = media.encode_wav(_tone(0.1, 16000), 16000)
  mp4 = media.encode_mp4(np.zeros((4, 8, 8, 3), np.uint8), fps=4)
  return [
      (media.decode_image, b"", "empty_data"),
      (media.decode_image, b"not an image", "corrupt_image"),
      (media.decode_image, png[:len(png) // 2], "corrupt_image"),
      (media.decode_audio, b"not audio at all", "unsupported_format"),
      (media.decode_audio, wav[:44], "empty_audio"),  # The header alone: zero samples.
      (media.decode_video, b"\x00" * 64, "corrupt_video"),
      (media.decode_video, mp4[:len(mp4) // 2], "corrupt_video"),
      (media.decode_video, media.encode_png(_image(8, 8)), "unsupported_format"),
  ]


@pytest.mark.parametrize("case", range(8))
def test_undecodable_media_raise_media_error_with_reason(case):
  decode, data, reason = _bad_cases()[case]
  with pytest.raises(media.MediaError, match=reason) as info:
    decode(data)
  assert info.value.reason == reason
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("call, match", [
    (lambda: media.encode_png(np.zeros((4, 4), np.uint8)), r"uint8 \[H, W, 3\]"),
    (lambda: media.encode_png(np.zeros((4, 4, 3), np.float32)), r"uint8 \[H, W, 3\]"),
    (lambda: media.encode_jpeg(np.zeros((4, 4, 3), np.uint8), quality=0), "quality"),
    (lambda: media.encode_wav(np.zeros((2, 8), np.float32), 16000), r"waveform \[S\]"),
    (lambda: media.encode_wav(np.array([np.nan], np.float32), 16000), "NaN"),
    (lambda: media.encode_flac(np.zeros(8, np.float32), 0), "sample_rate"),
    (lambda: media.encode_mp4(np.zeros((4, 4, 3), np.uint8), fps=4), r"\[F, H, W, 3\]"),
    (lambda: media.encode_mp4(np.zeros((1, 4, 4, 3), np.uint8), fps=0), "fps"),
    (lambda: media.encode_mp4(np.zeros((1, 4, 4, 3), np.uint8), fps=float("nan")), "fps"),
    (lambda: media.decode_video(b"x", num_frames=0), "num_frames"),
    (lambda: media.decode_image("text"), "expected bytes"),
])
def test_bad_arguments_raise_value_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_video_cut_off_after_good_frames_is_truncated(tmp_path):
  import av

  # Index first ("faststart", as web video is served), so a cut keeps the decodable head.
  path = tmp_path / "clip.mp4"
  frames = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
    stream = container.add_stream("libx264", rate=8)
    stream.width = stream.height = 16
    stream.pix_fmt, stream.options = "yuv444p", {"qp": "0"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  data = path.read_bytes()
  assert media.decode_video(data).shape == frames.shape
  with pytest.raises(media.MediaError, match="truncated_video"):
    media.decode_video(data[:len(data) * 3 // 4])
