"""The `codi-jax` command, run as a user runs it (subprocesses)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from codi_jax.text import vocab_dir
from tests.conftest import REPO


def run(*args, check=True):
  proc = subprocess.run([sys.executable, "-m", "codi_jax.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc


def test_help_lists_subcommands():
  out = run("--help").stdout
  for command in ("demo", "parity", "inspect"):
    assert command in out
  assert "--fixtures" in run("parity", "--help").stdout
  bad = run("frobnicate", check=False)
  assert bad.returncode == 2 and "unknown command" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["inspect", "--config", "configs/codi.py:huge"], "unknown preset 'huge'"),
    (["train", "--config.train.nonsense=1"], "the config has no field 'nonsense'"),
    (["train", "--config.train.steps=abc"], "--config.train.steps=abc: invalid literal"),
    (["generate", "--seed=-1"], "--seed=-1: -1 is not an integer in the range"),
    (["generate", "--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_a_bad_flag_is_one_line(args, message):
  proc = run(*args, check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert f"codi-jax {args[0]}: error: bad flag: " in proc.stderr and message in proc.stderr


def test_inspect_full_json_equals_manifest(tmp_path, fixtures_dir):
  out = tmp_path / "counts.json"
  manifest = fixtures_dir / "manifest_full.json"
  proc = run("inspect", "--config", "configs/codi.py:full", "--params", "--json", str(out),
             "--manifest", str(manifest))
  assert "!= manifest" not in proc.stdout
  ours = json.loads(out.read_text())
  theirs = json.loads(manifest.read_text())
  for name, count in ours["parameter_counts_per_component"].items():
    assert count == theirs["parameter_counts_per_component"][name]
  assert ours["unet_parameter_counts_main_vs_cross_modal"] == {
      k: v for k, v in theirs["unet_parameter_counts_main_vs_cross_modal"].items()}


def test_parity_json_and_exit_status(tmp_path, fixtures_dir):
  report = tmp_path / "parity.json"
  proc = run("parity", "--fixtures", str(fixtures_dir), "--only", "ddim_sampler",
             "--json", str(report))
  data = json.loads(report.read_text())
  rows = data["ddim_sampler.npz"]
  assert "sample_text/x_t_text" in rows and "schedule/betas" in rows
  assert all(set(r) == {"max_abs", "tol", "pass"} and r["pass"] for r in rows.values())
  assert "FAIL" not in proc.stdout

  # A folder with a fixture no handler knows fails, and says why.
  folder = tmp_path / "set"
  folder.mkdir()
  np.savez(folder / "mystery.npz", config_json=np.asarray(json.dumps({"component": "Other"})),
           **{"output/y": np.zeros(3, np.float32)})
  bad = run("parity", "--fixtures", str(folder), check=False)
  assert bad.returncode == 1 and "no parity handler" in bad.stdout

  # --tokenizers replaces the bundled vocabularies: a copy of them passes, an empty folder fails.
  shutil.copy(fixtures_dir / "optimus.npz", folder)
  vocab = shutil.copytree(vocab_dir(), tmp_path / "vocab")
  moved = run("parity", "--fixtures", str(folder), "--only", "optimus", "--tokenizers", str(vocab))
  assert "input/bert_token_ids" in moved.stdout and "FAIL" not in moved.stdout
  empty = run("parity", "--fixtures", str(folder), "--only", "optimus", "--tokenizers",
              str(tmp_path), check=False)
  assert empty.returncode != 0 and "bert-base-cased-vocab.txt" in empty.stdout + empty.stderr
