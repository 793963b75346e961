"""Audio front-ends in jnp: STFT, mel filterbanks and AudioLDM's log-mel features."""

from codi_jax.audio.mel import fbank_frames, mel_filterbank, mel_spectrogram, wav_to_fbank
from codi_jax.audio.stft import hann_window, stft

__all__ = ["fbank_frames", "hann_window", "mel_filterbank", "mel_spectrogram", "stft",
           "wav_to_fbank"]
