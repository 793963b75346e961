"""`codi-jax sample` (`codi_jax.sample`): a manifest of mixed requests on the tiny preset with
host-side random weights, on 1 and 8 simulated devices, killed and resumed, against `generate`."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile

from codi_jax import checkpoint
from codi_jax.data import media
from codi_jax.modality import Modality
from codi_jax.parallel.mesh import create_mesh
from codi_jax.pipeline import CoDiPipeline, load_tokenizers
from codi_jax.sample.job import SamplingJob, load_pipeline, plan_batches
from codi_jax.sample.manifest import (default_options, load_inputs, read_input_file,
                                      read_manifest)
from configs.codi import SHARDING_RULES, get_config
from tests import procs
from tests.conftest import REPO
from tests.cpu_devices import xla_flags

SMALL = dict(ddim_steps=2, image_size=32, audio_seconds=0.3, num_frames=2)
JOINT = dict(outputs=["audio", "text"], num_samples=2, eta=0.5)  # per-row eta noise and text keys
LINES = [
    # One program: image outputs, from every kind of input.
    dict(id="img-text", inputs={"text": "a dog barks in the rain"}, outputs=["image"], seed=1),
    dict(id="img-image", inputs={"image": "in.png"}, outputs=["image"], seed=2,
         guidance_scale=3.0),
    dict(id="img-audio-text", inputs={"audio": "in.wav", "text": "rain"}, outputs=["image"],
         weights={"text": 2, "audio": 1}, seed=3),
    dict(id="img-video", inputs={"video": "in.mp4"}, outputs="image", seed=4),
    dict(inputs={"text": "named by its line"}, outputs=["image"], seed=5),  # id "5"
    # Another: audio + text jointly, two samples each.
    dict(id="at-text", inputs={"text": "a cat"}, seed=6, **JOINT),
    dict(id="at-image", inputs={"image": "in.png", "text": "birds"}, seed=7, guidance_scale=5.0,
         **JOINT),
    dict(id="at-video", inputs={"video": "in.mp4"}, seed=8, **JOINT),
    # Bad lines.
    dict(id="bad-modality", inputs={"smell": "roses"}, outputs=["image"]),
    dict(id="bad-missing", inputs={"image": "missing.png"}, outputs=["image"]),
    dict(id="bad-option", inputs={"text": "x"}, outputs=["image"], ddim_steps=0),
    dict(id="dup", inputs={"text": "x"}, outputs=["image"]),
    dict(id="dup", inputs={"text": "y"}, outputs=["image"]),
    dict(id="bad-corrupt", inputs={"image": "bad.png"}, outputs=["image"]),  # fails when prepared
]
VALID = ["img-text", "img-image", "img-audio-text", "img-video", "5", "at-text", "at-image",
         "at-video"]
FAILED = {9: "unknown modality 'smell'", 10: "image file missing.png does not exist",
          11: "ddim_steps must be a positive integer", 12: r"duplicate id 'dup' \(lines 12, 13\)",
          13: r"duplicate id 'dup' \(lines 12, 13\)", 14: "truncated|corrupt",
          16: "not valid JSON"}


def _manifest_text() -> str:
  lines = [json.dumps({**SMALL, **line}) for line in LINES]
  return "\n".join(lines) + "\n\n{not json\n"  # a blank line (skipped), then line 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sample")
  config = get_config("tiny")
  checkpoint.save_model(folder / "ckpt", checkpoint.random_model_params(config, seed=0), config)
  rng = np.random.default_rng(0)
  (folder / "in.png").write_bytes(media.encode_png(rng.integers(0, 256, (40, 48, 3), np.uint8)))
  (folder / "bad.png").write_bytes(media.encode_png(rng.integers(0, 256, (8, 8, 3), np.uint8))[:60])
  stereo = (0.3 * rng.standard_normal((6615, 2))).astype(np.float32)  # 0.3 s at 22.05 kHz
  soundfile.write(folder / "in.wav", stereo, 22050)
  (folder / "in.mp4").write_bytes(media.encode_mp4(rng.integers(0, 256, (5, 16, 16, 3), np.uint8),
                                                   8))
  (folder / "items.jsonl").write_text(_manifest_text())
  return folder


def _run(workspace, out, mesh_sizes, devices, per_device_batch):
  mesh = create_mesh(mesh_sizes, devices=devices)
  pipe = load_pipeline(workspace / "ckpt", None, mesh, SHARDING_RULES)
  items, failures = read_manifest(workspace / "items.jsonl", pipe.plan,
                                  default_options(pipe.config))
  job = SamplingJob(pipe, mesh, SHARDING_RULES, out, per_device_batch=per_device_batch,
                    progress=False)
  return pipe, job.run(items, failures)


@pytest.fixture(scope="module")
def eight(workspace):
  """8 devices as data 2 x fsdp 4 (parameters sharded), one item per device per batch."""
  out = workspace / "out8"
  return (out,) + _run(workspace, out, {"data": 2, "fsdp": 4}, jax.devices(), 1)


@pytest.fixture(scope="module")
def one(workspace):
  """1 device, two items per batch (so items share batches with different neighbours)."""
  out = workspace / "out1"
  return (out,) + _run(workspace, out, {"data": -1}, jax.devices()[:1], 2)


@pytest.fixture(scope="module")
def planner(workspace):
  """A pipeline on the default device, for its `plan` (no compiled sampling)."""
  config, params = checkpoint.load_model(workspace / "ckpt")
  return CoDiPipeline(config, params, load_tokenizers())


@pytest.mark.parametrize("line, match", [
    ('{"id": "../up", "inputs": {"text": "a"}, "outputs": ["image"]}', "id '../up' must be"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "colour": 1}',
     r"unknown field\(s\) \['colour'\]"),
    ('{"inputs": [], "outputs": ["image"]}', '"inputs" must be a non-empty object'),
    ('{"inputs": {"text": "a"}, "outputs": 3}', '"outputs" must be a list'),
    ('{"inputs": {"text": "a"}, "outputs": ["image", "image"]}', "output modality is repeated"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "weights": {"audio": 1}}',
     "weight is given for audio, which is not an input"),
    ('{"inputs": {"text": " "}, "outputs": ["image"]}', "text input must be a non-empty string"),
    ('{"inputs": {"image": 5}, "outputs": ["image"]}', "image input must be a file path"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "image_size": 36}', "multiple of 8"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "guidance_scale": "high"}',
     "guidance_scale must be a finite number"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "alignment": "sideways"}',
     "unknown alignment 'sideways'"),
    ("[1, 2]", "a line must be a JSON object, got list"),
    ('{"inputs": {"image": "/etc/passwd"}, "outputs": ["text"]}',
     "image file '/etc/passwd' is not inside the manifest's folder"),
    ('{"inputs": {"image": "sub/../../x.png"}, "outputs": ["text"]}',
     "image file 'sub/../../x.png' is not inside the manifest's folder"),
    # Settings the sampler could not serve are refused when the manifest is read, not mid-job.
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "ddim_steps": 3}',
     "3 DDIM steps over 1000 timesteps select timestep 1000"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "ddim_steps": 1001}',
     r"DDIM steps must be in \[1, 1000\]"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "seed": 18446744073709551616}',
     r"seed must be an integer in \[0, 4294967295\]"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "seed": -1}', "seed must be an integer in"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "image_size": 0}',
     "image_size must be a positive integer, got 0"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "num_frames": 0}',
     "num_frames must be a positive integer, got 0"),
    ('{"inputs": {"text": "a"}, "outputs": ["audio"], "audio_seconds": 0}',
     "audio_seconds must be positive, got 0"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "guidance_scale": NaN}',
     "guidance_scale must be a finite number, got nan"),
    ('{"inputs": {"text": "a"}, "outputs": ["image"], "eta": -0.5}', "eta must be >= 0"),
])
def test_bad_lines_name_their_problem(planner, tmp_path, line, match):
  path = tmp_path / "m.jsonl"
  path.write_text('{"inputs": {"text": "fine"}, "outputs": ["text"]}\n' + line + "\n")
  items, failures = read_manifest(path, planner.plan, default_options(planner.config))
  assert [i.id for i in items] == ["1"] and items[0].settings.ddim_steps == 10  # the config's
  assert [f.line for f in failures] == [2]
  assert re.search(match, failures[0].message), failures[0].message


def test_items_group_by_program_not_by_seed_or_guidance(planner, workspace):
  items, _ = read_manifest(workspace / "items.jsonl", planner.plan, default_options(planner.config))
  image = VALID[:5] + ["bad-corrupt"]  # its media are read (and fail) when it is prepared
  assert [[i.id for i in b.items] for b in plan_batches(items, 8)] == [image, VALID[5:]]
  assert [[i.id for i in b.items] for b in plan_batches(items, 4)] == [
      image[:4], image[4:], VALID[5:]]


def test_help_lists_the_flags():
  proc = subprocess.run([sys.executable, "-m", "codi_jax.cli", "sample", "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0
  for flag in ("--ckpt", "--manifest", "--out", "--per_device_batch", "--mesh", "--tokenizers",
               "--seed", "--on_changed"):
    assert flag in proc.stdout
  top = subprocess.run([sys.executable, "-m", "codi_jax.cli", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert "sample" in top.stdout


def _outputs(folder: pathlib.Path) -> dict:
  result = json.loads((folder / "result.json").read_text())
  got = {}
  for modality, names in result["output_files"].items():
    if modality == "image":
      got[modality] = np.stack([media.decode_image((folder / n).read_bytes()) for n in names])
    elif modality == "audio":
      got[modality] = np.stack([media.read_audio((folder / n).read_bytes())[0] for n in names])
    else:
      got[modality] = [(folder / n).read_text(encoding="utf-8") for n in names]
  return got


def _assert_same(a: dict, b: dict, what: str):
  assert sorted(a) == sorted(b), what
  for m in a:
    if m == "text":
      assert a[m] == b[m], what
    elif m == "audio":  # 16-bit WAV (a step is 3e-5); tiny decodes with 200 Griffin-Lim
      # iterations, which carry the float reassociation of another sharding up to ~2e-4.
      np.testing.assert_allclose(a[m], b[m], atol=1e-3, rtol=0, err_msg=what)
    else:  # uint8 pixels
      diff = np.abs(a[m].astype(np.int32) - b[m].astype(np.int32))
      assert diff.max() <= 2, f"{what}: {m} differs by {diff.max()} levels"


def test_every_item_once_and_bad_lines_fail(eight):
  out, pipe, summary = eight
  items = out / "items"
  assert sorted(p.name for p in items.iterdir()) == sorted(VALID)  # nothing half-written
  for item_id in VALID:
    result = json.loads((items / item_id / "result.json").read_text())
    line = LINES[int(result["line"]) - 1]
    assert result["id"] == item_id and result["settings"]["seed"] == line["seed"]
    n = line.get("num_samples", 1)
    outputs = [line["outputs"]] if isinstance(line["outputs"], str) else line["outputs"]
    assert result["output_files"] == {m: [f"{m}_{i}.{ext}" for i in range(n)] for m, ext in
                                      (("image", "png"), ("audio", "wav"), ("text", "txt"))
                                      if m in outputs}
  notes = json.loads((items / "img-audio-text" / "result.json").read_text())["notes"]
  assert notes and "resampled to 16000 Hz" in notes[0]

  failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
  assert sorted(f["line"] for f in failures) == sorted(FAILED)
  for f in failures:
    assert re.search(FAILED[f["line"]], f["message"], re.IGNORECASE), f
  assert {f["line"]: f["id"] for f in failures}[14] == "bad-corrupt"

  s = json.loads((out / "summary.json").read_text())
  assert (s["done"], s["skipped"], s["failed"], s["lines"]) == (8, 0, 7, 15)
  assert s["devices"] == 8 and s["mesh"]["fsdp"] == 4 and s["batches"] == 2
  assert len(s["programs"]) == 2 and all(p["compile_s"] > 0 for p in s["programs"])
  assert s["items_per_s"] > 0 and s["items_per_s_per_device"] == pytest.approx(
      s["items_per_s"] / 8)
  page = (out / "index.html").read_text()
  links = set(re.findall(r'href="(items/[^"]+/index\.html)"', page))
  assert links == {f"items/{i}/index.html" for i in VALID}
  assert all((out / link).is_file() for link in links)
  # FSDP: the diffusers' large kernels really are split over the fsdp axis.
  specs = [leaf.sharding.spec for leaf in jax.tree_util.tree_leaves(pipe.params["diffusers"])]
  assert any("fsdp" in str(spec) for spec in specs)


def test_one_device_equals_eight(one, eight):
  out1, _, summary = one
  assert (summary["done"], summary["batches"]) == (8, 5)  # 6 image items / 2 + 3 joint items / 2
  for item_id in VALID:
    _assert_same(_outputs(out1 / "items" / item_id), _outputs(eight[0] / "items" / item_id),
                 item_id)
  texts = _outputs(out1 / "items" / "at-image")["text"]
  assert texts[0] != texts[1]  # the two samples of an item differ


def test_sample_equals_generate(workspace, eight):
  out = eight[0]
  config, params = checkpoint.load_model(workspace / "ckpt")
  pipe = CoDiPipeline(config, params, load_tokenizers())
  items, _ = read_manifest(workspace / "items.jsonl", pipe.plan, default_options(config))
  for item in (i for i in items if i.id in ("img-audio-text", "at-image")):
    line = {**SMALL, **LINES[item.line - 1]}
    options = {k: v for k, v in line.items() if k not in ("id", "inputs", "outputs")}
    inputs, _ = load_inputs(item)
    g = pipe.generate(inputs, line["outputs"], **options)
    want = {m: getattr(g, m) for m in ("image", "audio", "text") if getattr(g, m) is not None}
    want = {m: ([t + "\n" for t in v] if m == "text" else v) for m, v in want.items()}
    if "audio" in want:  # what the 16-bit WAV holds
      want["audio"] = np.stack([media.read_audio(media.encode_wav(w, 16000))[0]
                                for w in want["audio"]])
    _assert_same(_outputs(out / "items" / item.id), want, item.id)


def _stats(items: pathlib.Path) -> dict:
  """{id: (folder inode, result.json inode and mtime)} of the complete items."""
  if not items.is_dir():
    return {}
  return {p.name: (p.stat().st_ino, (p / "result.json").stat().st_ino,
                   (p / "result.json").stat().st_mtime_ns)
          for p in items.iterdir() if not p.name.startswith(".") and (p / "result.json").is_file()}


def test_killed_job_resumes_where_it_stopped(workspace, one, tmp_path):
  out = tmp_path / "job"
  cmd = [sys.executable, "-m", "codi_jax.cli", "sample", "--ckpt", str(workspace / "ckpt"),
         "--manifest", str(workspace / "items.jsonl"), "--out", str(out),
         "--per_device_batch", "1", "--quiet"]
  env = {**os.environ, "XLA_FLAGS": xla_flags(1),
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 300
  while not _stats(out / "items"):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"no item completed:\n{proc.communicate()[0].decode()[-3000:]}")
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  before = _stats(out / "items")
  assert 1 <= len(before) < len(VALID), sorted(before)

  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  after = _stats(out / "items")
  assert sorted(after) == sorted(VALID)
  assert sorted(p.name for p in (out / "items").iterdir()) == sorted(VALID)
  for item_id, stat in before.items():
    assert after[item_id] == stat, f"{item_id} was rewritten"
  s = json.loads((out / "summary.json").read_text())
  assert (s["done"], s["skipped"], s["failed"]) == (len(VALID) - len(before), len(before), 7)
  assert f"{s['done']} done, {s['skipped']} skipped" in done.stdout
  failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
  assert sorted(f["line"] for f in failures) == sorted(FAILED)  # this run's, once each
  for item_id in VALID:  # interrupted + resumed == uninterrupted (1 device, other batches)
    _assert_same(_outputs(out / "items" / item_id), _outputs(one[0] / "items" / item_id),
                 item_id)


def test_two_processes_share_the_work(workspace, one, tmp_path):
  """Two JAX processes x 2 devices, data 2 x fsdp 2: each prepares and writes the items on its own
  devices; together they write each item once, equal to the 1-device run."""
  port = procs.free_port()
  ids = ["img-text", "img-image", "img-video", "bad-modality"]  # 3 items on 4 devices
  lines = [json.dumps({**SMALL, **line}) for line in LINES if line.get("id") in ids]
  (tmp_path / "two.jsonl").write_text("\n".join(lines) + "\n")
  for name in ("in.png", "in.mp4"):  # copies: a link out of the manifest's folder needs a flag
    shutil.copy(workspace / name, tmp_path / name)
  out = tmp_path / "job"
  cmd = [sys.executable, "-m", "codi_jax.cli", "sample", "--ckpt", str(workspace / "ckpt"),
         "--manifest", str(tmp_path / "two.jsonl"), "--out", str(out),
         "--mesh", "data=2,fsdp=2", "--quiet"]
  started = []
  for pid in range(2):
    env = {**os.environ, "CODI_COORDINATOR": f"localhost:{port}", "CODI_NUM_PROCESSES": "2",
           "CODI_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(2)}
    started.append(procs.start(cmd, cwd=REPO, env=env))
  logs = procs.finish(started, 300)
  for p, log in zip(started, logs):
    assert p.returncode == 0, log[-3000:]
  assert "3 done, 0 skipped" in logs[0]  # process 0 reports
  assert "skipped (already complete)" not in logs[1]
  items = ids[:-1]
  assert sorted(p.name for p in (out / "items").iterdir()) == sorted(items)
  writers = {i: json.loads((out / "items" / i / "result.json").read_text())["process"]
             for i in items}
  assert writers == {"img-text": 0, "img-image": 0, "img-video": 1}
  for item_id in items:
    _assert_same(_outputs(out / "items" / item_id), _outputs(one[0] / "items" / item_id),
                 item_id)
  failures = (out / "failures.jsonl").read_text().splitlines()
  assert len(failures) == 1 and "unknown modality 'smell'" in failures[0]


@pytest.fixture
def small_job(workspace, tmp_path):
  """run(lines, **job_options) -> summary: a 1-device job into one --out, run many times."""
  mesh = create_mesh({"data": -1}, devices=jax.devices()[:1])
  pipe = load_pipeline(workspace / "ckpt", None, mesh, SHARDING_RULES)
  manifest, out = tmp_path / "m.jsonl", tmp_path / "out"

  def run(lines, **options):
    manifest.write_text("".join(json.dumps({**SMALL, **line}) + "\n" for line in lines))
    items, failures = read_manifest(manifest, pipe.plan, default_options(pipe.config))
    return SamplingJob(pipe, mesh, SHARDING_RULES, out, progress=False, **options).run(
        items, failures)

  run.out = out
  return run


def test_a_changed_line_is_regenerated_or_refused(small_job):
  a = dict(id="a", inputs={"text": "a red ball"}, outputs=["image"], seed=1)
  b = dict(id="b", inputs={"text": "a blue cube"}, outputs=["image"], seed=2)
  assert small_job([a, b])["done"] == 2
  stamp = lambda i: (small_job.out / "items" / i / "result.json").stat().st_mtime_ns
  before = {i: stamp(i) for i in "ab"}
  again = small_job([a, b])
  assert (again["done"], again["skipped"], again["regenerated"]) == (0, 2, 0)
  b_changed = dict(b, seed=3)
  with pytest.raises(ValueError, match=r"1 item\(s\) .* other settings or inputs"):
    small_job([a, b_changed], on_changed="refuse")
  assert {i: stamp(i) for i in "ab"} == before  # refusing touched nothing
  rerun = small_job([a, b_changed])
  assert (rerun["done"], rerun["skipped"], rerun["regenerated"]) == (1, 1, 1)
  assert stamp("a") == before["a"] and stamp("b") != before["b"]
  result = json.loads((small_job.out / "items" / "b" / "result.json").read_text())
  assert result["settings"]["seed"] == 3
  assert small_job([a, b_changed])["regenerated"] == 0


def test_a_batch_that_cannot_run_fails_its_items_not_the_job(small_job, monkeypatch):
  image = dict(id="image", inputs={"text": "a red ball"}, outputs=["image"])
  audio = dict(id="audio", inputs={"text": "a low drone"}, outputs=["audio"])
  text = dict(id="text", inputs={"text": "a cube"}, outputs=["text"])
  compile_program = SamplingJob._compile

  def failing_compile(self, program, layout):
    if program.outputs == (Modality.AUDIO,):
      raise RuntimeError("XLA could not compile this")
    return compile_program(self, program, layout)

  write = SamplingJob._write

  def failing_write(self, batch, failures):
    if batch.items[0].id == "text":
      raise RuntimeError("the program failed while it ran")
    return write(self, batch, failures)

  monkeypatch.setattr(SamplingJob, "_compile", failing_compile)
  monkeypatch.setattr(SamplingJob, "_write", failing_write)
  summary = small_job([audio, image, text])
  assert (summary["done"], summary["failed"]) == (1, 2)
  assert summary["samples_per_s"] == summary["items_per_s"]  # failed items are not counted
  failures = [json.loads(l) for l in (small_job.out / "failures.jsonl").read_text().splitlines()]
  assert {(f["id"], f["error"], f["message"]) for f in failures} == {
      ("audio", "RuntimeError", "XLA could not compile this"),
      ("text", "RuntimeError", "the program failed while it ran")}
  assert (small_job.out / "summary.json").is_file()
  assert "XLA could not compile this" in (small_job.out / "index.html").read_text()
  monkeypatch.undo()  # the rerun makes what failed
  rerun = small_job([audio, image, text])
  assert (rerun["done"], rerun["skipped"], rerun["failed"]) == (2, 1, 0)


def test_an_unreadable_media_file_is_named_in_its_error(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"not a png")
  (tmp_path / "bad.wav").write_bytes(b"RIFF0000")
  for modality, name in (("image", "bad.png"), ("audio", "bad.wav")):
    with pytest.raises(media.MediaError) as e:
      read_input_file(modality, tmp_path / name, 2)
    assert f"{modality} file {tmp_path / name}: " in str(e.value)
    assert "BytesIO" not in str(e.value)


def test_media_outside_the_manifest_folder_need_a_flag(planner, workspace, tmp_path):
  line = json.dumps({"inputs": {"image": str(workspace / "in.png")}, "outputs": ["text"]})
  (tmp_path / "m.jsonl").write_text(line + "\n")
  items, failures = read_manifest(tmp_path / "m.jsonl", planner.plan)
  assert not items and "not inside the manifest's folder" in failures[0].message
  items, failures = read_manifest(tmp_path / "m.jsonl", planner.plan, allow_outside=True)
  assert not failures and items[0].files[Modality.IMAGE] == workspace / "in.png"


def test_a_link_leading_out_of_the_manifest_folder_needs_the_flag(planner, workspace, tmp_path):
  (tmp_path / "inside.png").symlink_to(workspace / "in.png")  # workspace is not under tmp_path
  (tmp_path / "m.jsonl").write_text(
      json.dumps({"inputs": {"image": "inside.png"}, "outputs": ["text"]}) + "\n")
  items, failures = read_manifest(tmp_path / "m.jsonl", planner.plan)
  assert not items and "leads out of the manifest's folder" in failures[0].message
  items, failures = read_manifest(tmp_path / "m.jsonl", planner.plan, allow_outside=True)
  assert not failures and items[0].files[Modality.IMAGE] == tmp_path / "inside.png"
