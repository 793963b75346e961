"""Reading released CoDi weight files one tensor at a time, and writing safetensors.

`open_state(path)` gives a lazy `Mapping[key, float32 array]` over a PyTorch pickle (`.pth`,
`.pt`, `.ckpt`, `.bin`) or a `.safetensors` file: keys and shapes come from the file's index
(`shapes()`, nothing read), and a tensor is read (and cast to float32, integers kept) only when
asked for, into an array of its own. What was read is not kept resident: safetensors tensors are
read with positioned reads (no memory map), and PyTorch files, opened with
`torch.load(weights_only=True, mmap=True)`, have each tensor's pages of the mapping released once
it is copied out. So converting a model holds what the converter keeps plus about one tensor. A
pickle that would run code or build objects other than tensors and plain containers is refused.
torch is needed only for PyTorch files (`pip install codi-jax[torch]`); safetensors needs numpy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import pathlib
import pickle
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Sequence

import numpy as np
import safetensors.numpy

from codi_jax.convert.keymap import state_shapes
from codi_jax.io_utils import temp_file

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"


class WeightFileError(ValueError):
  """A weight file that cannot be read safely (unknown format, code in a pickle, not a flat
  state dict)."""


def _as_float32(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32, copy=False) if np.issubdtype(x.dtype, np.floating) else x


# safetensors dtype names -> little-endian numpy dtypes ("BF16" is read as its uint16 bits).
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
    "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
# Reads of at most this many bytes (Linux caps one read at a little under 2 GiB).
_READ_CHUNK = 1 << 30


class SafetensorsState(Mapping):
  """Lazy {key: array} of a .safetensors file (floating tensors read as float32).

  The header (8-byte little-endian length, then JSON: dtype, shape and byte range of every
  tensor) is parsed and checked once; each tensor is then read with positioned reads straight
  into a new array, so nothing read stays mapped in this process.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, bool]] = {}
    try:
      size = self.path.stat().st_size
      with open(self.path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
          raise ValueError(f"header length {length} does not fit in {size} bytes")
        header = json.loads(f.read(length))
      if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
      header.pop("__metadata__", None)
      for key, entry in header.items():
        self._entries[key] = self._entry(key, entry, 8 + length, size)
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise WeightFileError(f"{self.path}: not a readable safetensors file ({e})") from e

  @staticmethod
  def _entry(key: str, entry: Any, data_start: int, size: int
             ) -> tuple[np.dtype, tuple[int, ...], int, bool]:
    try:
      name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
      raise ValueError(f"tensor {key!r} has a malformed entry {entry!r}") from e
    if name not in _SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {key!r} has dtype {name!r}, which is not supported")
    dtype = np.dtype(_SAFETENSORS_DTYPES[name])
    if not all(isinstance(d, int) and d >= 0 for d in shape):
      raise ValueError(f"tensor {key!r} has a bad shape {list(shape)}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
      raise ValueError(f"tensor {key!r}: bytes [{begin}, {end}) do not hold {name} {list(shape)} "
                       "inside the file")
    return dtype, shape, data_start + begin, name == "BF16"

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: e[1] for k, e in self._entries.items()}

  def __getitem__(self, key: str) -> np.ndarray:
    dtype, shape, offset, bfloat16 = self._entries[key]
    out = np.empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.path, "rb", buffering=0) as f:
      done = 0
      while done < len(view):
        got = os.preadv(f.fileno(), [view[done:done + _READ_CHUNK]], offset + done)
        if got <= 0:
          raise WeightFileError(f"{self.path}: tensor {key!r} ends early (file truncated?)")
        done += got
    if bfloat16:  # the upper half of a float32
      return (out.astype(np.uint32) << 16).view(np.float32)
    return _as_float32(out)

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: object) -> bool:
    return key in self._entries


_MADV_PAGEOUT = 21  # Linux >= 5.4; an older kernel answers EINVAL and nothing happens.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _LIBC is not None:
  _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _page_out(address: int, nbytes: int) -> None:
  """Releases the resident pages of a read-only file mapping in [address, address + nbytes).

  MADV_PAGEOUT never changes the data: a released page is read again from the file if touched.
  Without it every tensor read from a memory-mapped file would stay resident until the whole file
  is closed, i.e. converting would hold the input next to the output.
  """
  if _LIBC is None:
    return
  page = mmap.PAGESIZE
  start, stop = -(-address // page) * page, (address + nbytes) // page * page
  if stop > start:
    _LIBC.madvise(start, stop - start, _MADV_PAGEOUT)


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
    self._mapped = True
    try:
      state = self._load(mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise WeightFileError(f"{self.path}: not a readable PyTorch file ({e})") from e
      # Files from torch < 1.6 (legacy, not zip) cannot be memory-mapped.
      logging.warning("%s: legacy PyTorch format, loading it whole (no mmap)", self.path)
      try:
        state = self._load(mmap=False)
      except RuntimeError as e2:
        raise WeightFileError(f"{self.path}: not a readable PyTorch file ({e2})") from e2
      self._mapped = False
    if not isinstance(state, Mapping):
      raise WeightFileError(f"{self.path}: expected a state dict, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
      raise WeightFileError(f"{self.path}: expected a flat {{name: tensor}} state dict; "
                            f"entries {bad[:3]} are not")
    self._state = state

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: tuple(t.shape) for k, t in self._state.items()}

  def __getitem__(self, key: str) -> np.ndarray:
    t = self._state[key]
    # A copy of our own (float32 also covers bfloat16, which numpy lacks), then the source pages
    # can go.
    out = t.to(self._torch.float32, copy=True) if t.is_floating_point() else t.clone()
    if self._mapped:
      storage = t.untyped_storage()
      _page_out(storage.data_ptr(), storage.nbytes())
    return out.numpy()

  def __iter__(self) -> Iterator[str]:
    return iter(self._state)

  def _load(self, mmap: bool):
    """torch.load with weights_only=True; a pickle holding code, and bytes that are no pickle at
    all, become WeightFileErrors (RuntimeError passes, for the legacy-format retry)."""
    kwargs = dict(weights_only=True, map_location="cpu", **({"mmap": True} if mmap else {}))
    try:
      return self._torch.load(self.path, **kwargs)
    except pickle.UnpicklingError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["?"]
      if any("GLOBAL" in line for line in lines):
        # torch's message opens with advice to retry with weights_only=False; name the culprit.
        detail = next(line for line in lines if "GLOBAL" in line)
        raise WeightFileError(f"{self.path}: refusing to load: the pickle holds code or objects "
                              f"other than tensors ({detail})") from e
      detail = next((line for line in lines if "nsupported" in line), lines[0])
      raise WeightFileError(f"{self.path}: not a readable PyTorch file ({detail})") from e
    except (EOFError, ValueError, OSError) as e:
      raise WeightFileError(f"{self.path}: not a readable PyTorch file "
                            f"({str(e) or type(e).__name__})") from e

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

  def shapes(self) -> dict[str, tuple[int, ...]]:
    per_file: dict[int, dict[str, tuple[int, ...]]] = {}
    for state in self._owner.values():
      if id(state) not in per_file:
        per_file[id(state)] = state_shapes(state)
    return {key: per_file[id(state)][key] for key, state in self._owner.items()}

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
  arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # 0-d stays 0-d
  tmp = temp_file(path)
  try:
    safetensors.numpy.save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
