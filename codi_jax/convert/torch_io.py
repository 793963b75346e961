"""Reading released CoDi weight files one tensor at a time, and writing safetensors.

`open_state(path)` gives a lazy `Mapping[key, float32 array]` over a PyTorch pickle (`.pth`,
`.pt`, `.ckpt`, `.bin`) or a `.safetensors` file: keys and shapes come from the file's index, and
a tensor is read (and cast to float32, integers kept) only when asked for, so converting a model
holds about one model copy plus one tensor. PyTorch files are opened with
`torch.load(weights_only=True, mmap=True)`: tensors stay in the memory-mapped file until read, and
a pickle that would run code or build objects other than tensors and plain containers is refused.
torch is needed only for PyTorch files (`pip install codi-jax[torch]`); safetensors needs numpy.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, Sequence

import numpy as np
import safetensors
import safetensors.numpy

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFileError(ValueError):
  """A weight file that cannot be read safely (unknown format, code in a pickle, not a flat
  state dict)."""


def _as_float32(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32, copy=False) if np.issubdtype(x.dtype, np.floating) else x


class SafetensorsState(Mapping):
  """Lazy {key: array} of a .safetensors file (floating tensors read as float32)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    try:
      self._file = safetensors.safe_open(str(self.path), framework="numpy")
    except Exception as e:  # the Rust reader raises SafetensorError / OSError
      raise WeightFileError(f"{self.path}: not a readable safetensors file ({e})") from e
    self._keys = tuple(self._file.keys())

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._keys:
      raise KeyError(key)
    return _as_float32(self._file.get_tensor(key))

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys)

  def __len__(self) -> int:
    return len(self._keys)

  def __contains__(self, key: object) -> bool:
    return key in self._keys


class TorchState(Mapping):
  """Lazy {key: array} of a PyTorch state-dict pickle, loaded without running any code."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    try:
      import torch
    except ImportError as e:
      raise WeightFileError(f"{self.path}: reading PyTorch files needs torch "
                            "(pip install 'codi-jax[torch]'), or pass a .safetensors file") from e
    self._torch = torch
    try:
      state = torch.load(self.path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
      raise WeightFileError(f"{self.path}: refusing to load: the pickle holds code or objects "
                            f"other than tensors ({str(e).splitlines()[0]})") from e
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise WeightFileError(f"{self.path}: not a readable PyTorch file ({e})") from e
      # Files from torch < 1.6 (legacy, not zip) cannot be memory-mapped.
      logging.warning("%s: legacy PyTorch format, loading it whole (no mmap)", self.path)
      state = torch.load(self.path, weights_only=True, map_location="cpu")
    if not isinstance(state, Mapping):
      raise WeightFileError(f"{self.path}: expected a state dict, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
      raise WeightFileError(f"{self.path}: expected a flat {{name: tensor}} state dict; "
                            f"entries {bad[:3]} are not")
    self._state = state

  def __getitem__(self, key: str) -> np.ndarray:
    t = self._state[key]
    if t.is_floating_point():
      t = t.to(self._torch.float32)  # also bfloat16, which numpy lacks
    return t.numpy()

  def __iter__(self) -> Iterator[str]:
    return iter(self._state)

  def __len__(self) -> int:
    return len(self._state)

  def __contains__(self, key: object) -> bool:
    return key in self._state


def open_state(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """A lazy state dict of one weight file, chosen by its suffix."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise WeightFileError(f"weight file {path} does not exist")
  if path.suffix == SAFETENSORS_SUFFIX:
    return SafetensorsState(path)
  if path.suffix in TORCH_SUFFIXES:
    return TorchState(path)
  raise WeightFileError(f"{path}: unknown weight file type {path.suffix!r}; expected "
                        f"{SAFETENSORS_SUFFIX} or one of {TORCH_SUFFIXES}")


class MergedState(Mapping):
  """Several state dicts read as one; a key in a later file wins, as when the original loads its
  checkpoint files one after another with `load_state_dict`."""

  def __init__(self, states: Sequence[Mapping[str, np.ndarray]]):
    self._owner: dict[str, Mapping[str, np.ndarray]] = {}
    overridden = 0
    for state in states:
      for key in state:
        overridden += key in self._owner
        self._owner[key] = state
    if overridden:
      logging.warning("%d keys appear in more than one weight file; the later file wins",
                      overridden)

  def __getitem__(self, key: str) -> np.ndarray:
    return self._owner[key][key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._owner)

  def __len__(self) -> int:
    return len(self._owner)

  def __contains__(self, key: object) -> bool:
    return key in self._owner


def open_states(paths: Sequence[str | os.PathLike]) -> Mapping[str, np.ndarray]:
  if not paths:
    raise WeightFileError("no weight files given")
  return MergedState([open_state(p) for p in paths])


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes {name: array} to `path` atomically (temporary file in the same folder, renamed)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
