"""Parity with the original CoDi code on the reference fixtures (the `codi-jax parity` path)."""

import json

import numpy as np
import pytest

from codi_jax import parity
from codi_jax.parity.fixtures import load_fixture


@pytest.mark.parametrize("name", ["unet_codi", "ddim_sampler", "unet_codi_layout"])
def test_fixture_matches_original(fixtures_dir, name):
  rows = parity.check_file(fixtures_dir / f"{name}.npz")
  failed = {k: r for k, r in rows.items() if not r.passed}
  assert not failed, failed
  assert len(rows) >= 20  # every case was compared, not a lone error row


def test_every_fixture_has_a_handler(fixtures_dir):
  for path in parity.fixture_files(fixtures_dir):
    assert parity._handler(load_fixture(path)) is not None, path.name


def test_unknown_component_is_a_failure_not_a_skip(tmp_path):
  path = tmp_path / "mystery.npz"
  np.savez(path, config_json=np.asarray(json.dumps({"component": "SomethingElse"})),
           **{"output/y": np.zeros(3, np.float32)})
  rows = parity.check_file(path)
  assert list(rows) == ["<file>"]
  assert not rows["<file>"].passed and "no parity handler" in rows["<file>"].error


def test_corrupt_fixture_is_a_failure(tmp_path):
  bad = tmp_path / "broken.npz"
  bad.write_bytes(b"not a zip file")
  rows = parity.check_file(bad)
  assert not rows["<file>"].passed and "not a readable" in rows["<file>"].error


def test_missing_output_is_a_failure(fixtures_dir, monkeypatch):
  # A handler that skips an output must not pass silently.

  from codi_jax.diffusion.schedule import ddpm_schedule

  only_betas = lambda fx: {"schedule/betas": (ddpm_schedule().betas, (1e-7, 1e-6))}
  monkeypatch.setattr(parity, "HANDLERS", (("DDIMSampler_VD", only_betas),))
  rows = parity.check_file(fixtures_dir / "ddim_sampler.npz")
  assert rows["schedule/betas"].passed
  missing = [k for k, r in rows.items() if r.error == "output not computed"]
  assert len(missing) == len(rows) - 1 and not any(rows[k].passed for k in missing)
