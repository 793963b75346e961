"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader (or a resumed job) never sees a half-written output under its final name. Temporary
files and folders are private while they are written (tempfile makes them 0600 / 0700) and get
the permissions the user's umask gives once they are made, as files written in place would.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pathlib
import re
import shutil
import tempfile
import zipfile
from glob import escape as glob_escape
from typing import Any, Mapping

import numpy as np


@functools.cache
def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def temp_file(path: pathlib.Path) -> str:
  """A new empty file beside `path` (to be renamed to it), with the umask's permissions."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.fchmod(fd, 0o666 & ~_umask())
  os.close(fd)
  return tmp


def temp_dir(directory: pathlib.Path, suffix: str = ".tmp") -> pathlib.Path:
  """A new empty folder beside `directory` (to be renamed to it), with the umask's permissions."""
  tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.",
                                      suffix=suffix))
  tmp.chmod(0o777 & ~_umask())
  return tmp


def remove_stale_temps(target: pathlib.Path) -> None:
  """Removes what a killed writer of `target` left beside it (`temp_file` / `temp_dir` names)."""
  for path in target.parent.glob(f".{glob_escape(target.name)}.*"):
    if path.name.endswith((".tmp", ".old")):
      if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
      else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_file(path)
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_png(path: str | os.PathLike, image: np.ndarray) -> pathlib.Path:
  """image: uint8 [H, W] or [H, W, 3]."""
  from PIL import Image

  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"PNG needs uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return atomic_write_bytes(path, buf.getvalue())


# --- arrays as bytes (the cache's records) -------------------------------------------------

def array_bytes(arrays: Mapping[str, Any]) -> bytes:
  """{name: array} -> bytes (an .npz archive; strings as 0-d unicode arrays, nothing pickled)."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return buf.getvalue()


_NPY_HEADER = re.compile(r"""\{'descr': '([<>|=]?[A-Za-z]\d*)', 'fortran_order': (True|False), """
                         r"""'shape': \(([\d, ]*)\), \}""")


def _read_npy(data: bytes) -> np.ndarray:
  """One .npy member, its header parsed with a regular expression: `np.load` parses it with
  `ast.literal_eval`, which CPython 3.11 does not run safely in several threads at once (grain
  reads with threads: "AST constructor recursion depth mismatch")."""
  if data[:6] != b"\x93NUMPY":
    raise ValueError("a record member is not a .npy array")
  major = data[6]
  size_bytes = 2 if major == 1 else 4
  length = int.from_bytes(data[8:8 + size_bytes], "little")
  start = 8 + size_bytes
  match = _NPY_HEADER.match(data[start:start + length].decode("latin1").strip())
  if match is None:
    raise ValueError(f"unexpected .npy header {data[start:start + length]!r} in a record")
  dtype, fortran = np.dtype(match.group(1)), match.group(2) == "True"
  shape = tuple(int(d) for d in match.group(3).replace(" ", "").split(",") if d)
  array = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=start + length)
  return array.reshape(shape, order="F" if fortran else "C").copy()


def read_array_bytes(data: bytes) -> dict[str, np.ndarray]:
  """The inverse of `array_bytes` (thread-safe, nothing unpickled)."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    return {name.removesuffix(".npy"): _read_npy(archive.read(name))
            for name in archive.namelist()}
