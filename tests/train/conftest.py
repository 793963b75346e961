"""Shared fixtures of the training tests."""

import pathlib

import pytest

from codi_jax import checkpoint
from configs.codi import get_config


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> pathlib.Path:
  """A host-random tiny model checkpoint: runs start from it (`init_from`) without compiling the
  modules' initialisers."""
  path = tmp_path_factory.mktemp("init") / "model"
  config = get_config("tiny")
  checkpoint.save_model(path, checkpoint.random_model_params(config, 0), config)
  return path
