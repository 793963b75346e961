"""The any-to-any benchmark (`codi_jax.evaluate`, `codi-jax eval`): its scoring on stand-in
generators built by hand (perfect, wrong, blank), its batched generation against `generate`, and
the command end to end on the tiny preset with host-side random weights."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from codi_jax import checkpoint
from codi_jax import eval_report
from codi_jax import evaluate as ev
from codi_jax.data import analyzers
from codi_jax.data import synthetic as syn
from codi_jax.modality import Alignment, Modality
from codi_jax.pipeline import CoDiPipeline, load_tokenizers
from codi_jax.train import data as train_data
from configs.codi import get_config
from tests.conftest import REPO

T, I, V, A = Modality.TEXT, Modality.IMAGE, Modality.VIDEO, Modality.AUDIO
EXAMPLES = 4


def _small_config():
  """The tiny preset at the smallest sizes the benchmark takes: 32 px, 2 frames, 0.3125 s."""
  config = get_config("tiny")
  config.data.image_size, config.data.num_frames, config.data.audio_samples = 32, 2, 5000
  return config


def _perfect(requests):
  """Every output is the example's own medium of that modality."""
  return [{m: getattr(r.example, m.value) for m in r.task.outputs} for r in requests]


def _accuracies(result):
  """Every accuracy of every section, as (where, attribute, value)."""
  for key, e in list(result["single"].items()) + list(result["multi"].items()):
    yield from ((key, n, v) for n, v in e["accuracy"].items())
  for key, e in result["joint"].items():
    for col, c in e["alignments"].items():
      for m, acc in c["accuracy"].items():
        yield from ((f"{key} {col} {m}", n, v) for n, v in acc.items())


def _agreements(result):
  for key, e in result["joint"].items():
    for col, c in e["alignments"].items():
      yield from ((f"{key} {col}", n, v) for n, v in c["agreement"].items())


@pytest.mark.parametrize("inputs, output, expected", [
    ((T,), I, ("colour", "shape", "size", "position")),
    ((T,), T, ev.ATTRIBUTES),
    ((A,), I, ("colour", "shape", "size")),
    ((I,), A, ("pitch", "timbre", "rhythm")),
    ((I,), V, ("colour", "shape", "size", "position")),
    ((V,), T, ev.ATTRIBUTES),
    ((A,), T, ("colour", "shape", "size", "pitch", "timbre", "rhythm")),
    ((A,), V, ("colour", "shape", "size")),
    ((T, A), I, ("colour", "shape", "size", "position")),
    ((I, A), T, ("colour", "shape", "size", "position", "pitch", "timbre", "rhythm")),
])
def test_scored_attributes(inputs, output, expected):
  assert ev.scored_attributes(inputs, output) == expected


def test_tasks_cover_every_pair():
  assert {(t.inputs, t.outputs) for t in ev.SINGLE} == {
      ((i,), (o,)) for i in ev.MODALITIES for o in ev.MODALITIES}
  # Joint pairs with full captions; from partial ones and from none, joint and each output alone.
  unnamed = 2 * (2 * len(ev.JOINT) + 3)
  assert len(ev.UNNAMED) == unnamed
  assert len({t.key for t in ev.TASKS}) == len(ev.TASKS) == (
      16 + len(ev.MULTI) + 2 * len(ev.JOINT) + unnamed)


@pytest.mark.parametrize("config", [get_config("tiny"), _small_config()], ids=["tiny", "small"])
def test_examples_are_the_training_data_at_model_sizes(config):
  source = train_data.sources(config, "test")[0]
  assert ev.dataset_config(config) == source.config
  d = config.data
  examples = ev.load_examples(config, "test", 2)
  for i, ex in enumerate(examples):
    assert ex.key == syn.generate(source.config, "test", i).key
    assert ex.image.dtype == np.uint8 and ex.image.shape == (d.image_size, d.image_size, 3)
    assert ex.video.dtype == np.uint8
    assert ex.video.shape == (d.num_frames, d.image_size, d.image_size, 3)
    assert ex.audio.dtype == np.float32 and ex.audio.shape == (d.audio_samples,)
  assert ev.example_seed(0, 1) == ev.example_seed(0, 1) != ev.example_seed(1, 0)


def test_bad_settings_raise():
  config = get_config("tiny")
  with pytest.raises(ValueError, match=r"num_examples must be an integer in \[1, 256\]"):
    ev.load_examples(config, "test", 257)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    ev.load_examples(config, "dev", 2)
  config.data.audio_samples = 3000
  with pytest.raises(ValueError, match="config.data.audio_samples is 3000"):
    ev.load_examples(config, "test", 2)
  with pytest.raises(ValueError, match=r"gave no \[.text.\] for text->text on example 0"):
    ev.run_benchmark(get_config("tiny"), lambda rs: [{} for _ in rs], num_examples=1, seed=0,
                     progress=False)
  with pytest.raises(ValueError, match="returned 0 results"):
    ev.run_benchmark(get_config("tiny"), lambda rs: [], num_examples=1, seed=0, progress=False)


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
  gallery = tmp_path_factory.mktemp("gallery")
  result = ev.run_benchmark(get_config("tiny"), _perfect, num_examples=EXAMPLES, seed=0,
                            gallery=gallery, gallery_examples=1, progress=False)
  return result, gallery


def test_perfect_generator_scores_one(perfect):
  result, _ = perfect
  assert sorted(result["single"]) == sorted(t.key for t in ev.SINGLE)
  assert all(v == 1.0 for _, _, v in _accuracies(result))
  assert all(v == 1.0 for _, _, v in _agreements(result))
  for key, e in result["multi"].items():
    task = next(t for t in ev.MULTI if t.key == key)
    for m, alone in e["alone"].items():  # 1.0 where that input alone determines it, else None
      known = ev.determined([Modality(m)])
      assert alone == {n: 1.0 if n in known else None for n in e["accuracy"]}, (key, m)
    assert set(e["alone"]) == {m.value for m in task.inputs}
  summary = result["summary"]
  for name, a in summary["attributes"].items():
    bar = {"colour": 0.9, "pitch": 0.9, "size": 0.8, "position": 0.8, "rhythm": 0.8}.get(name, 0.7)
    assert (a["accuracy"], a["bar"], a["met"]) == (1.0, bar, True)
    assert a["gap"] == pytest.approx(1.0 - bar)
    assert a["chance"] == pytest.approx(1 / len(syn.ATTRIBUTE_VALUES[name]))
    assert (a["unreadable"], a["readable_accuracy"]) == (0.0, 1.0)
  assert {m: (o["unreadable"], o["met"]) for m, o in summary["outputs"].items()} == {
      m.value: (0.0, True) for m in ev.MODALITIES}
  assert all(v == 1.0 for o in summary["outputs"].values() for v in o["accuracy"].values())
  # Equal agreement is not "others above self".
  assert summary["joint_agreement"] == dict(others=1.0, self=1.0, none=1.0, met=False, gap=0.0)
  unnamed = summary["unnamed_agreement"]
  assert [unnamed[c]["agreement"] for c in ("others", "self", "none")] == [1.0, 1.0, 1.0]
  assert (unnamed["gap"], unnamed["met"]) == (0.0, False)
  assert not summary["all_met"]
  report = eval_report.format_report(result)
  assert "colour         1.00    0.00     1.00    0.17  0.90  met (+0.10" in report
  assert "joint agreement: others 1.00 vs self 1.00 (none 1.00): NOT met (+0.00" in report
  json.dumps(result)  # JSON-able as it is


def test_gallery_marks_every_scored_attribute(perfect):
  result, gallery = perfect
  page = (gallery / "index.html").read_text()
  ticks = sum(len(ev.scored_attributes(t.inputs, m)) for t in ev.TASKS for m in t.outputs)
  assert page.count("&#10003;") == ticks and "&#10007;" not in page
  for t in ev.TASKS:
    assert f"<th>{t.key.replace('>', '&gt;')}" in page
  partial = result["examples"][0]["partial_caption"].replace("'", "&#x27;")
  assert f"<q>{partial}</q>" in page and "(no prompt)" in page
  media = {p.name for p in (gallery / "media").iterdir()}
  assert {"example0_input_image.png", "example0_input_video.mp4", "example0_input_audio.wav",
          "example0_text_to_image_audio_others_audio.wav",
          "example0_video_audio_to_image_image.png"} <= media
  assert not any(name.startswith("example1") for name in media)


def test_wrong_generators_score_zero():
  config = get_config("tiny")
  visual = lambda ex: [getattr(ex.attributes, n) for n in syn.VISUAL_ATTRIBUTES]
  train = ev.load_examples(config, "train", 48)
  test = ev.load_examples(config, "test", EXAMPLES)
  # For each test example, a train example that differs from it in every attribute.
  wrong = {ex.key: next(t for t in train if all(a != b for a, b in zip(visual(t), visual(ex))))
           for ex in test}

  def mismatched(requests):
    return [{m: getattr(wrong[r.example.key], m.value) for m in r.task.outputs}
            for r in requests]

  result = ev.run_benchmark(config, mismatched, num_examples=EXAMPLES, seed=0, progress=False)
  assert all(v == 0.0 for _, _, v in _accuracies(result))
  assert all(v == 1.0 for _, _, v in _agreements(result))  # wrong, but wrong together

  d = config.data
  blank = {T: "", I: np.full((d.image_size, d.image_size, 3), 128, np.uint8),
           V: np.full((d.num_frames, d.image_size, d.image_size, 3), 128, np.uint8),
           A: np.zeros(d.audio_samples, np.float32)}
  result = ev.run_benchmark(config, lambda rs: [{m: blank[m] for m in r.task.outputs} for r in rs],
                            num_examples=2, seed=0, progress=False)
  assert all(v == 0.0 for _, _, v in _accuracies(result))
  assert all(v == 0.0 for _, _, v in _agreements(result))
  assert result["analyses"]["image->text"][0]["text"] == dict.fromkeys(
      analyzers.ATTRIBUTES_BY_MODALITY[T], analyzers.UNKNOWN)
  # Silent, not wrong: every text output unreadable, none readable to score.
  text = result["single"]["image->text"]
  assert set(text["unreadable"].values()) == {1.0} and text["unreadable_outputs"] == 1.0
  assert set(text["readable_accuracy"].values()) == {None}
  outputs = result["summary"]["outputs"]
  assert outputs["text"]["unreadable"] == 1.0 and not outputs["text"]["met"]
  assert "text outputs: 1.00 unreadable (bar <= 0.02: NOT met)" in eval_report.format_report(result)


def test_pipeline_generator_batches_like_generate(tmp_path):
  """Three requests in batches of two (one padded row) give what `generate` gives each alone."""
  config = _small_config()
  pipe = CoDiPipeline(config, checkpoint.random_model_params(config, 0),
                      load_tokenizers())
  generate = ev.PipelineGenerator(pipe, ddim_steps=2, guidance_scale=5.0, batch_size=2,
                                  progress=False)
  examples = ev.load_examples(config, "test", 3)
  task = ev.Task((A, T), (I,))
  requests = [ev.Request(task, i, ex, ev.example_seed(7, i)) for i, ex in enumerate(examples)]
  outputs = generate(requests)
  assert generate.stats | {"seconds": 0} == dict(requests=3, batches=2, padding_rows=1,
                                                 programs=1, seconds=0)
  for r, out in zip(requests, outputs):
    alone = pipe.generate(r.inputs(), [I], ddim_steps=2, guidance_scale=5.0, seed=r.seed,
                          image_size=32, num_frames=2, audio_seconds=5000 / 16000)
    diff = np.abs(out[I].astype(int) - alone.image[0].astype(int))
    assert out[I].shape == (32, 32, 3) and diff.max() <= 2, (r.index, diff.max())
  assert not np.array_equal(outputs[0][I], outputs[1][I])
  # An unconditional request conditions on its null token; a partial one on its own caption.
  joint = ev.Task((T,), (I, A), Alignment.OTHERS, ev.Prompt.NONE)
  none = ev.Request(joint, 0, examples[0], 1, "a red shape")
  rows = generate._prepare(generate.plan(none), none)
  assert np.array_equal(rows.cond, rows.uncond)
  partial = dataclasses.replace(none, task=dataclasses.replace(joint, prompt=ev.Prompt.PARTIAL))
  rows = generate._prepare(generate.plan(partial), partial)
  assert not np.allclose(rows.cond, rows.uncond)
  with pytest.raises(ValueError, match="batch_size must be a positive integer"):
    ev.PipelineGenerator(pipe, ddim_steps=2, guidance_scale=5.0, batch_size=0)
  # The guidance sweep: single pairs at each scale on validation examples, the best recorded.
  sweep = ev.sweep_guidance(pipe, [1.0, 6.0], num_examples=1, ddim_steps=1, progress=False)
  assert set(sweep["scores"]) == set(sweep["unreadable"]) == {1.0, 6.0}
  assert sweep["best"] == max(sweep["scores"], key=sweep["scores"].get)
  assert all(0.0 <= v <= 1.0 for v in sweep["scores"].values()) and sweep["split"] == "validation"
  checkpoint.save_model(tmp_path / "ckpt", {"clip": pipe.params["clip"]}, config)
  ev.record_guidance(tmp_path / "ckpt", dict(sweep, best=3.25))
  assert checkpoint.load_config(tmp_path / "ckpt").sample.guidance_scale == 3.25
  assert "guidance 6: " in eval_report.format_sweep(sweep) and "<- chosen" in (
      eval_report.format_sweep(sweep))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  folder = tmp_path_factory.mktemp("eval")
  config = _small_config()
  checkpoint.save_model(folder / "ckpt", checkpoint.random_model_params(config, 0), config)
  proc = subprocess.run(
      [sys.executable, "-m", "codi_jax.cli", "eval", "--ckpt", str(folder / "ckpt"),
       "--num_examples", "2", "--ddim_steps", "2", "--json", str(folder / "eval.json"),
       "--guidance_sweep", "2,7.5", "--sweep_examples", "1",
       "--out", str(folder / "gallery"), "--gallery_examples", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  return folder, proc


def test_cli_end_to_end(cli_run):
  folder, proc = cli_run
  assert proc.returncode == 0, proc.stderr[-3000:]  # a measurement: 0 though the bars fail
  result = json.loads((folder / "eval.json").read_text())
  best = result["guidance_sweep"]["best"]
  assert best in (2.0, 7.5) and "Guidance sweep: single pairs on 1 validation" in proc.stdout
  assert checkpoint.load_config(folder / "ckpt").sample.guidance_scale == best  # recorded
  assert result["settings"] | {"checkpoint": None} == result["settings"] | dict(
      num_examples=2, ddim_steps=2, guidance_scale=best, seed=0, split="test", image_size=32,
      num_frames=2, audio_seconds=5000 / 16000, checkpoint=None)
  assert result["chance"] == {n: 1 / len(k) for n, k in syn.ATTRIBUTE_VALUES.items()}
  assert sorted(result["single"]) == sorted(t.key for t in ev.SINGLE)
  assert sorted(result["multi"]) == sorted(t.key for t in ev.MULTI)
  assert sorted(result["joint"]) == ["text->image+audio", "text->video+audio"]
  for e in result["joint"].values():
    assert sorted(e["alignments"]) == ["none", "others", "self"]
  for task in ev.SINGLE + ev.MULTI:
    entry = result["single" if len(task.inputs) == 1 else "multi"][task.key]
    assert sorted(entry["accuracy"]) == sorted(ev.scored_attributes(task.inputs, task.outputs[0]))
  values = [v for _, _, v in _accuracies(result)] + [v for _, _, v in _agreements(result)]
  assert values and all(0.0 <= v <= 1.0 for v in values)
  assert all(len(per) == 2 for per in result["analyses"].values())
  assert result["generation"]["programs"] == 4 + 2 * len(ev.JOINT)  # 4 single outputs + joint
  assert sorted(result["summary"]["attributes"]) == sorted(ev.ATTRIBUTES)
  for section in ("1. Single input", "2. Multi-input", "3. Joint generation", "Summary",
                  "joint agreement: others"):
    assert section in proc.stdout
  assert proc.stdout.count("met (") == len(ev.ATTRIBUTES) + 2
  assert sorted(result["unnamed"]) == sorted(
      ev.Task(i, o, None, p).key for i, o in ev.JOINT for p in (ev.Prompt.PARTIAL, ev.Prompt.NONE))
  page = (folder / "gallery" / "index.html").read_text()
  assert "example 0" in page and "example 1" not in page
  assert (folder / "gallery" / "media" / "example0_text_to_video_video.mp4").stat().st_size > 0
  assert (folder / "gallery" / "media" / "example0_image_to_audio_audio.wav").stat().st_size > 0


def test_cli_errors(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "codi_jax.cli", "eval", "--ckpt",
                         str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode != 0 and "codi-jax eval: error:" in proc.stderr
  assert str(tmp_path / "missing") in proc.stderr


def test_alignment_columns_name_real_tasks():
  keys = {t.key for t in ev.TASKS}
  for inputs, outputs in ev.JOINT:
    for a in (Alignment.OTHERS, Alignment.SELF):
      assert ev.Task(inputs, outputs, a).key in keys
    assert all(ev.Task(inputs, (o,)).key in keys for o in outputs)


def test_wilson_interval_closed_forms():
  assert ev.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
  assert ev.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
  assert ev.wilson_interval(40, 40)[1] == 1.0 and ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_partial_captions_leave_keyed_attributes_unnamed():
  examples = ev.load_examples(get_config("tiny"), "test", 8)
  for i, ex in enumerate(examples):
    text, left_out = ev.partial_caption(ex, 3, i)
    assert (text, left_out) == ev.partial_caption(ex, 3, i)
    assert left_out and set(left_out) <= set(ev.KEYED)
    read = analyzers.analyze_text(text)
    truth = ex.attributes.as_dict()
    for name in syn.VISUAL_ATTRIBUTES:
      assert read[name] == (analyzers.UNKNOWN if name in left_out else truth[name]), (text, name)


def test_only_aligned_joint_outputs_agree_on_what_the_prompt_leaves_out():
  """A stand-in whose joint `others` outputs come from one example but whose `self` and single
  outputs take the audio of an example that differs in everything: the unnamed-attribute bar is
  met, and only there."""
  config = get_config("tiny")
  visual = lambda ex: [getattr(ex.attributes, n) for n in syn.VISUAL_ATTRIBUTES]
  train = ev.load_examples(config, "train", 48)
  test = ev.load_examples(config, "test", 12)
  wrong = {ex.key: next(t for t in train if all(a != b for a, b in zip(visual(t), visual(ex))))
           for ex in test}
  seen = []

  def generate(requests):
    out = []
    for r in requests:
      seen.append((r.task.prompt, r.inputs().get(T), r.caption, r.example.text))
      aligned = r.task.alignment is Alignment.OTHERS
      out.append({m: getattr(r.example if m is not A or aligned else wrong[r.example.key],
                             m.value) for m in r.task.outputs})
    return out

  result = ev.run_benchmark(config, generate, num_examples=12, seed=0, progress=False)
  assert all(text == caption for p, text, caption, _ in seen if p is ev.Prompt.PARTIAL)
  assert all(text == full for p, text, _, full in seen if p is not ev.Prompt.PARTIAL and text)
  unnamed = result["summary"]["unnamed_agreement"]
  assert (unnamed["others"]["agreement"], unnamed["self"]["agreement"],
          unnamed["none"]["agreement"]) == (1.0, 0.0, 0.0)
  assert unnamed["met"] and unnamed["intervals_apart"] and unnamed["gap"] == 1.0
  left_out = sum(len(e["left_out"]) for e in result["examples"])
  assert unnamed["others"]["n"] == 2 * (left_out + 3 * 12)  # two joint pairs
  report = eval_report.format_report(result)
  assert "unnamed-attribute agreement: others 1.00 vs self 0.00 and none 0.00" in report
