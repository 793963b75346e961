"""The main job: stage order and reuse (with a stand-in trainer), and the whole command on
pre-trained (random-weight) stage models."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from codi_jax import checkpoint
from codi_jax.commands import demo
from codi_jax.pipeline import required_parts
from codi_jax.train import stages
from codi_jax.train.loop import MODEL_DIR, Summary
from configs.codi import get_config
from tests.conftest import REPO


def test_stage_steps_parses_overrides_and_rejects_bad_ones():
  steps = demo.stage_steps(["diffuse_image=7", "latent_align=3"])
  assert steps["diffuse_image"] == 7 and steps["latent_align"] == 3
  assert steps["autoencoders"] == demo.DEMO_STAGES["autoencoders"]["steps"]
  for bad in (["bogus=3"], ["diffuse_image"], ["diffuse_image=x"], ["diffuse_image=0"]):
    with pytest.raises(SystemExit, match="--steps"):
      demo.stage_steps(bad)


def test_stages_run_in_order_each_from_the_ones_before_and_finished_ones_are_reused(
    tmp_path, monkeypatch):
  calls, data_settings = [], []

  def fake_train(config, workdir):
    calls.append((config.stage, config.train.steps, config.init_from))
    data_settings.append((config.stage, config.data.minimal_pairs, config.data.cache))
    (pathlib.Path(workdir) / MODEL_DIR).mkdir(parents=True)
    return Summary(config.stage, 0, config.train.steps, "init_from", 0.5, 1.0,
                   str(pathlib.Path(workdir) / MODEL_DIR), False)

  import codi_jax.train.loop as loop
  monkeypatch.setattr(loop, "train", fake_train)
  cache_calls = []

  def fake_cache(config, models, out):
    cache_calls.append([pathlib.Path(m).parent.name for m in models])
    return out
  monkeypatch.setattr(demo, "cache_training_split", fake_cache)
  config = get_config("tiny")
  steps = demo.stage_steps(["diffuse_text=5"])
  # A run that already finished the first stage (e.g. stopped and started again).
  for stage in stages.STAGES[:1]:
    (tmp_path / "stages" / stage / MODEL_DIR).mkdir(parents=True)
  summaries = demo.train_stages(config, tmp_path, steps)
  assert [s["stage"] for s in summaries] == list(stages.STAGES)
  assert [s.get("reused", False) for s in summaries] == [True] + [False] * 6
  assert [c[0] for c in calls] == list(stages.STAGES[1:])
  models = [str(tmp_path / "stages" / s / MODEL_DIR) for s in stages.STAGES]
  for stage, n, init_from in calls:
    before = models[:stages.STAGES.index(stage)]
    assert init_from.split(",") == before and n == steps[stage]
  assert json.loads((tmp_path / "stages" / "diffuse_text" / "summary.json").read_text())[
      "steps"] == 5
  assert config.stage == "diffuse_image"  # the caller's config is untouched
  align = [c for c in data_settings if c[0] == "align_encoders"]
  assert align == [("align_encoders", True, "")]  # a stage's `data` entry reaches config.data
  assert {c[1] for c in data_settings if c[0] != "align_encoders"} == {False}
  # The encoders' outputs are cached once, from the two encoder stages, for every later stage.
  assert cache_calls == [["autoencoders", "align_encoders"]]
  # Stopped in the text diffuser: the cache comes from the same two encoder stages again.
  cache_calls.clear()
  shutil.rmtree(tmp_path / "stages" / "diffuse_text" / MODEL_DIR)
  demo.train_stages(config, tmp_path, steps)
  assert cache_calls == [["autoencoders", "align_encoders"]]
  assert {c[2] for c in data_settings if c[0] in stages.FROZEN_ENCODER_STAGES} == {
      str(tmp_path / demo.CACHE_DIR)}


def test_demo_reuses_finished_stages_and_writes_gallery_and_report(tmp_path):
  """Every stage already finished (random weights): the demo merges, generates, scores, reports.
  Training itself is tested in tests/train; the benchmark's numbers in tests/test_evaluate."""
  config = get_config("tiny")
  seed_model = tmp_path / "random"
  params = checkpoint.random_model_params(config, 0)
  del params["hifigan_vocoder"]  # the tiny stages train none: Griffin-Lim decodes audio
  checkpoint.save_model(seed_model, params, config)
  workdir = tmp_path / "demo"
  for stage in stages.STAGES:
    shutil.copytree(seed_model, workdir / "stages" / stage / MODEL_DIR)
  proc = subprocess.run([sys.executable, "-m", "codi_jax.cli", "demo", f"--workdir={workdir}",
                         "--eval_examples=1", "--ddim_steps=2", "--sweep_examples=1"], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("done earlier, reusing") == len(stages.STAGES)
  assert "gallery/index.html" in proc.stdout
  _, merged = checkpoint.load_model(workdir / MODEL_DIR)
  assert tuple(merged) == required_parts(config.model)
  report = json.loads((workdir / "report.json").read_text())
  assert [s["stage"] for s in report["training"]] == list(stages.STAGES)
  assert len(report["single"]) == 16
  page = (workdir / "gallery" / "index.html").read_text()
  assert "<img" in page and "<audio" in page and "<video" in page
  markdown = (workdir / "report.md").read_text()
  assert "| latent_align |" in markdown and "colour" in markdown
  # The guidance sweep ran on validation examples and its choice is the model's and the report's.
  best = report["guidance_sweep"]["best"]
  assert best in demo.GUIDANCE_CANDIDATES and report["settings"]["guidance_scale"] == best
  assert checkpoint.load_config(workdir / MODEL_DIR).sample.guidance_scale == best
  assert "Guidance sweep" in markdown
