"""The data commands as a user runs them: import-data -> build-dataset -> a pipeline reads it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from codi_jax.data import media, pipeline
from tests.conftest import REPO
from tests.data.test_importers import _tar

PNG = media.encode_png(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "codi_jax.cli", *args], cwd=REPO,
                        capture_output=True, text=True)
  if check and proc.returncode:
    raise AssertionError(proc.stderr[-3000:])
  return proc


def test_import_then_build_then_read(tmp_path):
  for i in range(2):
    _tar(tmp_path / f"shard-{i}.tar", [(f"{i}a.png", PNG), (f"{i}a.txt", b"a red square"),
                                       (f"{i}b.png", b"\x89PNG broken"), (f"{i}b.txt", b"bad")])
  out = tmp_path / "records" / "train"
  report = tmp_path / "report.json"
  run("import-data", "--format", "webdataset", "--inputs", str(tmp_path / "shard-{0..1}.tar"),
      "--out", str(out), "--name", "toy", "--license", "CC0-1.0", "--json", str(report))
  summary = json.loads(report.read_text())
  assert summary["seen"] == 4 and summary["kept"] == 2
  assert summary["rejected"] == {"corrupt_image": 2}

  info = tmp_path / "built.json"
  run("build-dataset", "--dataset", "records", "--records_dir", str(tmp_path / "records"),
      "--data_dir", str(tmp_path / "tfds"), "--name", "toy", "--json", str(info))
  built = json.loads(info.read_text())
  assert built["splits"] == {"train": 2}
  spec = pipeline.stage_data("diffuse_image", [pipeline.TfdsSource(built["builder_dir"])],
                             image_size=32)
  batch = next(iter(pipeline.build_pipeline(spec, batch_size=2, seed=0, process_index=0,
                                            process_count=1)))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["text"] == ["a red square"] * 2

  missing = run("import-data", "--format", "webdataset", "--inputs", str(tmp_path / "no-*.tar"),
                "--out", str(out), "--name", "toy", check=False)
  assert missing.returncode != 0 and "matches no file" in missing.stderr
