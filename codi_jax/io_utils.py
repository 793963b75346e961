"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader (or a resumed job) never sees a half-written output under its final name.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
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
  import io

  from PIL import Image

  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"PNG needs uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return atomic_write_bytes(path, buf.getvalue())


def atomic_write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> pathlib.Path:
  import io

  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return atomic_write_bytes(path, buf.getvalue())
