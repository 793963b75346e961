"""Test setup: 8 simulated CPU devices (set before JAX starts) and the reference fixtures
(`tests/fixtures/codi_reference`, or the folder $CODI_FIXTURES names)."""

import os
import pathlib

from tests.cpu_devices import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Subprocesses (the CLI tests) reuse compiled programs, e.g. the tiny model's random init.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ.get("TMPDIR", "/tmp"), "codi-jax-test-xla-cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

from codi_jax.convert import keymap  # noqa: E402
from codi_jax.convert.original import codi_config_from_original  # noqa: E402
from codi_jax.models.codi import param_shapes  # noqa: E402
from codi_jax.parity.fixtures import load_fixture  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("CODI_FIXTURES",
                                       REPO / "tests" / "fixtures" / "codi_reference"))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  if not FIXTURES.is_dir():
    raise FileNotFoundError(f"reference fixtures not found at {FIXTURES} (set CODI_FIXTURES)")
  return FIXTURES


@pytest.fixture(scope="session")
def unet_fixture(fixtures_dir):
  return load_fixture(fixtures_dir / "unet_codi.npz")


@pytest.fixture(scope="session")
def tiny_model(unet_fixture):
  """(CoDiConfig, params) of the dev fixture's tiny UNets, loaded through the key map."""
  config = codi_config_from_original(unet_fixture.config["unet_config"])
  params, report = keymap.torch_to_flax(unet_fixture.weights, param_shapes(config))
  report.check()
  return config, jax.tree_util.tree_map(jax.numpy.asarray, params)
