"""The multi-host launchers (launch/), run against fake gcloud, srun, scontrol and scancel."""

import os
import pathlib
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest

from tests.conftest import REPO

LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
TRAIN = ("codi-jax train --config configs/codi.py:full --config.stage=diffuse_image "
         "--workdir gs://bucket/run1")


def clean_env(**extra):
  """This process's environment without any real cluster or codi-jax settings."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "CODI_", "JAX_LOCAL", "CUDA_VISIBLE"))}
  env.pop("NAME", None)
  env.pop("ZONE", None)
  env.update(extra)
  return env


def write_tool(folder: pathlib.Path, name: str, body: str) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def tpu_pod(*args, env=None, check=True):
  proc = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], capture_output=True,
                        text=True, timeout=60, env=env or clean_env())
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
  return proc


def test_scripts_parse():
  assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm.sbatch", "slurm.sh",
                                        "local_processes.sh"}
  for script in SCRIPTS:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed")
  proc = subprocess.run(["shellcheck", "-S", "warning", *map(str, SCRIPTS)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stdout


POD = ("--dry-run", "--name", "fake-pod", "--zone", "us-test1-a")


@pytest.mark.parametrize("args,pieces", [
    (("create", "--spot"),
     ["gcloud compute tpus tpu-vm describe fake-pod --zone us-test1-a",
      "gcloud compute tpus tpu-vm create fake-pod --zone us-test1-a --accelerator-type v5p-128 "
      "--version v2-alpha-tpuv5 --spot"]),
    (("setup",),
     ["gcloud compute tpus tpu-vm scp", "fake-pod:codi-jax-src.tar.gz --zone us-test1-a "
      "--worker=all", "ssh fake-pod --zone us-test1-a --worker=all --command",
      "tar -xzf codi-jax-src.tar.gz -C codi-jax", 'pip install -q -e ".[tpu]"']),
    (("run", "--env", "XLA_FLAGS=--a --b", "--", *TRAIN.split()),
     ["ssh fake-pod --zone us-test1-a --worker=all --command", TRAIN, "CODI_DISTRIBUTED=auto",
      "XLA_FLAGS=--a --b", "setsid nohup bash logs/codi.job", "logs/codi-worker$w.log",
      "agent-worker-number"]),
    (("logs", "--logs-dir", "out/logs"),
     ["mkdir -p out/logs", "--worker=all", "cat logs/codi-worker*.log",
      "--output-directory out/logs"]),
    (("status",), ["describe fake-pod", "--worker=all", "codi runs"]),
    (("stop", "--stop-grace", "30"), ["--worker=all", 'kill -TERM -- "-$p"', "seq 30",
                                      'kill -KILL -- "-$p"']),
    (("tail", "--worker", "3"), ["--worker=3", "tail -n 200 -F codi-jax/logs/codi-worker*.log"]),
    (("delete",), ["gcloud compute tpus tpu-vm delete fake-pod --zone us-test1-a --quiet"]),
], ids=["create", "setup", "run", "logs", "status", "stop", "tail", "delete"])
def test_tpu_pod_dry_run(args, pieces):
  out = tpu_pod(*POD, *args, env=clean_env(GCLOUD="/nonexistent/gcloud")).stdout
  out = out.replace("/nonexistent/gcloud", "gcloud")
  for piece in pieces:
    assert piece in out, f"{piece!r} not in\n{out}"
  assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0  # a valid script


def test_tpu_pod_env_options_and_errors():
  env = clean_env(DRY_RUN="1", NAME="env-pod", ZONE="europe-west4-b", ACCELERATOR="v6e-256",
                  PROJECT="my-proj", PREEMPTIBLE="1")
  out = tpu_pod("create", env=env).stdout
  assert ("create env-pod --zone europe-west4-b --accelerator-type v6e-256 --version "
          "v2-alpha-tpuv6e --preemptible --project my-proj") in out

  cases = [
      (("create",), {"ZONE": "z"}, "no TPU name: pass --name NAME or set NAME"),
      (("--name", "p", "create"), {}, "no zone: pass --zone ZONE or set ZONE"),
      (("--name", "p", "--zone", "z", "frobnicate"), {"DRY_RUN": "1"}, "unknown subcommand"),
      (("--name", "p", "--zone", "z", "run"), {"DRY_RUN": "1"}, "run needs the command"),
      (("--name", "p", "--zone", "z", "--spot", "--preemptible", "create"), {"DRY_RUN": "1"},
       "exclude each other"),
      (("--name", "p", "--zone", "z", "--accelerator", "v9-8", "create"), {"DRY_RUN": "1"},
       "no default runtime version for accelerator 'v9-8'"),
      (("--name", "p", "--zone", "z", "create"), {"GCLOUD": "/nonexistent/gcloud"},
       "'/nonexistent/gcloud' not found"),
  ]
  for args, extra, message in cases:
    proc = tpu_pod(*args, env=clean_env(**extra), check=False)
    assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)


FAKE_GCLOUD = r"""
# Fake gcloud: records each call; `tpu-vm ssh --command C` runs C in $FAKE_HOME, as one worker.
printf '%s\n' "$*" >> "$FAKE_DIR/gcloud_calls"
args=("$@"); command=; outdir=
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --command) command=${args[i+1]} ;;
    --output-directory) outdir=${args[i+1]} ;;
  esac
done
case " $* " in
  *" describe "*)
    [ -n "${FAKE_STATE:-}" ] && { echo "$FAKE_STATE"; exit 0; }
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found" >&2; exit 1 ;;
  *" ssh "*)
    cd "$FAKE_HOME"
    if [ -n "$outdir" ]; then bash -c "$command" > "$outdir/0.log"; else bash -c "$command"; fi ;;
esac
"""


@pytest.fixture
def fake_pod(tmp_path):
  """A one-worker "pod": fake gcloud and metadata server, a worker home with a checkout."""
  bin_dir = tmp_path / "bin"
  write_tool(bin_dir, "gcloud", FAKE_GCLOUD)
  write_tool(bin_dir, "curl", "echo 3\n")  # the metadata server: this is worker 3
  venv = tmp_path / "home" / "codi-jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "activate").write_text("export ACTIVATED=yes\n")
  write_tool(venv, "python", "exit 0\n")
  env = clean_env(GCLOUD=str(bin_dir / "gcloud"), FAKE_DIR=str(tmp_path),
                  FAKE_HOME=str(tmp_path / "home"), PATH=f"{bin_dir}:{os.environ['PATH']}")
  yield tmp_path, env
  pid_file = tmp_path / "home" / "codi-jax" / "logs" / "codi.pid"
  if pid_file.exists():  # a failed test leaves its job behind
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except ProcessLookupError:
      pass


def wait_for(predicate, timeout=20.0):
  end = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > end:
      raise AssertionError("timed out")
    time.sleep(0.05)


def test_tpu_pod_run_status_stop_logs(fake_pod):
  tmp, env = fake_pod
  pod = ("--name", "fake-pod", "--zone", "us-test1-a")
  assert "exists and is READY: reusing it" in tpu_pod(*pod, "create",
                                                      env={**env, "FAKE_STATE": "READY"}).stderr
  preempted = tpu_pod(*pod, "create", env={**env, "FAKE_STATE": "PREEMPTED"}, check=False)
  assert preempted.returncode != 0 and "PREEMPTED; pass --recreate" in preempted.stderr

  env["FAKE_STATE"] = "READY"
  job = ('trap "echo checkpointed; exit 0" TERM; '
         'echo "training with $CODI_DISTRIBUTED $ACTIVATED $EXTRA"; '
         'while :; do sleep 0.05; done')
  out = tpu_pod(*pod, "--env", "EXTRA=x y", "run", "--", "bash", "-c", job, env=env).stdout
  assert "worker 3: started codi, log ~/codi-jax/logs/codi-worker3.log" in out
  log = tmp / "home" / "codi-jax" / "logs" / "codi-worker3.log"
  # The job outlived its ssh command, with the launcher's environment and the venv active.
  wait_for(lambda: log.exists() and "training with auto yes x y" in log.read_text())
  assert log.read_text().startswith("=== ")
  assert "worker 3: codi runs | training with auto yes x y" in tpu_pod(*pod, "status",
                                                                        env=env).stdout
  again = tpu_pod(*pod, "run", "--", "true", env=env, check=False)
  assert again.returncode != 0 and "job codi already runs; stop it first" in again.stderr

  assert "worker 3: stopped" in tpu_pod(*pod, "stop", "--stop-grace", "20", env=env).stdout
  text = log.read_text()
  assert "checkpointed" in text and re.search(r"=== \S+ exit 0\n$", text), text
  assert "worker 3: idle" in tpu_pod(*pod, "status", env=env).stdout
  assert "no job codi runs" in tpu_pod(*pod, "stop", env=env).stdout

  tpu_pod(*pod, "logs", "--logs-dir", str(tmp / "collected"), env=env)
  assert (tmp / "collected" / "0.log").read_text() == text
  calls = (tmp / "gcloud_calls").read_text()
  assert calls.count("--worker=all") == 7 and "--output-directory" in calls


FAKE_SRUN = r"""
# Fake srun: runs every task of the step here, with the variables Slurm gives a task.
while [[ $1 == --* ]]; do echo "$1" >> "$FAKE_DIR/srun_args"; shift; done
per=$SLURM_NTASKS_PER_NODE; gpus=$FAKE_GPUS_PER_NODE; pids=()
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do
  for ((l = 0; l < per; l++)); do
    i=$((n * per + l))
    case $FAKE_CVD in  # which GPUs the task sees: bound to its own, or all of the node's
      task) g=$((gpus / per)); cvd=$(seq -s, $((l * g)) $((l * g + g - 1))) ;;
      node) cvd=$(seq -s, 0 $((gpus - 1))) ;;
      *) cvd= ;;
    esac
    ( [ -z "$cvd" ] || export CUDA_VISIBLE_DEVICES=$cvd
      export SLURM_PROCID=$i SLURM_LOCALID=$l SLURM_NODEID=$n
      export SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST
      exec "$@" ) > "$FAKE_DIR/task$i.log" 2>&1 &
    pids+=($!)
  done
done
echo "${pids[@]}" > "$FAKE_DIR/task_pids"
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
FAKE_SCONTROL = r"""
case $1 in
  show) [ "$2" = hostnames ] && [ "$3" = "$SLURM_JOB_NODELIST" ] && printf '%s\n' gpu01 gpu02 ;;
  *) echo "$*" >> "$FAKE_DIR/scontrol_calls" ;;
esac
"""
FAKE_SCANCEL = 'echo "$*" >> "$FAKE_DIR/scancel_calls"; kill -TERM $(cat "$FAKE_DIR/task_pids")\n'
PRINT_ENV = ('env | grep -E "^(CODI_(COORDINATOR|NUM_PROCESSES|PROCESS_ID|DISTRIBUTED)|'
             'JAX_LOCAL_DEVICE_IDS)=" | sort')


def slurm_env(tmp_path, per_node, gpus_per_task, cvd, **extra):
  bin_dir = tmp_path / "bin"
  write_tool(bin_dir, "srun", FAKE_SRUN)
  write_tool(bin_dir, "scontrol", FAKE_SCONTROL)
  write_tool(bin_dir, "scancel", FAKE_SCANCEL)
  env = clean_env(
      PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), FAKE_GPUS_PER_NODE="8",
      FAKE_CVD=cvd, SLURM_JOB_ID="4242", SLURM_JOB_NAME="codi-jax",
      SLURM_JOB_NODELIST="gpu[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS=str(2 * per_node),
      SLURM_NTASKS_PER_NODE=str(per_node), SLURM_SUBMIT_DIR=str(tmp_path),
      CODI_LOG_DIR=str(tmp_path / "logs"))
  env.update(extra)
  if gpus_per_task:
    env["SLURM_GPUS_PER_TASK"] = gpus_per_task
  return env


def task_env(tmp_path, task):
  text = (tmp_path / f"task{task}.log").read_text()
  assert text.startswith(f"[codi] task {task}/"), text
  return dict(line.split("=", 1) for line in text.splitlines()[1:])


@pytest.mark.parametrize("layout,per_node,gpus_per_task,cvd,ids", [
    # --ntasks-per-node=8 --gpus-per-node=8 (default): every task sees the node's 8 GPUs.
    ("per-gpu, shared", 8, None, "node", lambda local: str(local)),
    # --ntasks-per-node=8 --gpus-per-task=1: Slurm binds each task to one GPU.
    ("per-gpu, bound", 8, "1", "task", lambda local: "0"),
    # --ntasks-per-node=1 --gpus-per-node=8: one process drives all 8 GPUs.
    ("per-node", 1, None, "node", lambda local: "0,1,2,3,4,5,6,7"),
    # --ntasks-per-node=1 --gpus-per-task=gpu:8 (a typed request), bound.
    ("per-node, typed", 1, "gpu:8", "task", lambda local: "0,1,2,3,4,5,6,7"),
    # No CUDA_VISIBLE_DEVICES at all: the node's GPU count decides.
    ("per-node, unbound", 1, None, "", lambda local: "0,1,2,3,4,5,6,7"),
], ids=["per-gpu-shared", "per-gpu-bound", "per-node", "per-node-typed", "per-node-unbound"])
def test_slurm_explicit_env(tmp_path, layout, per_node, gpus_per_task, cvd, ids):
  env = slurm_env(tmp_path, per_node, gpus_per_task, cvd,
                  **({} if cvd else {"SLURM_GPUS_ON_NODE": "8"}))
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "bash", "-c", PRINT_ENV], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert "job 4242 (restart 0): " + str(2 * per_node) + " tasks on gpu[01-02]" in proc.stdout
  for task in range(2 * per_node):
    assert task_env(tmp_path, task) == {
        "CODI_COORDINATOR": "gpu01:24242",  # 20000 + job id % 20000
        "CODI_NUM_PROCESSES": str(2 * per_node), "CODI_PROCESS_ID": str(task),
        "JAX_LOCAL_DEVICE_IDS": ids(task % per_node)}, layout
  args = (tmp_path / "srun_args").read_text().split()
  assert "--kill-on-bad-exit=1" in args
  assert f"--output={tmp_path}/logs/%x-%j-task%t.log" in args


def test_slurm_auto_env_and_errors(tmp_path):
  env = slurm_env(tmp_path, 8, None, "node", CODI_SLURM_INIT="auto", CODI_PORT="1234",
                  CODI_COORDINATOR="stale:1")
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "bash", "-c", PRINT_ENV], env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert task_env(tmp_path, 11) == {"CODI_DISTRIBUTED": "auto", "JAX_LOCAL_DEVICE_IDS": "3"}

  # Five GPUs cannot be split between two tasks; no allocation at all; an unknown mode.
  bad = slurm_env(tmp_path, 2, None, "node", FAKE_GPUS_PER_NODE="5")
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "true"], env=bad,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert "task 1 sees 5 GPUs" in (tmp_path / "task1.log").read_text()
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "true"], env=clean_env(),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0
  assert "SLURM_JOB_ID unset: submit this script with sbatch" in proc.stderr
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "true"],
                        env={**env, "CODI_SLURM_INIT": "mpi"}, capture_output=True, text=True)
  assert proc.returncode != 0 and "CODI_SLURM_INIT must be explicit or auto" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_slurm_signal_checkpoints_then_requeues(tmp_path, sig):
  """USR1 (time limit near): the script asks the tasks to checkpoint, then requeues the job.
  TERM (preemption, scancel): Slurm signals the tasks itself; the script only waits for them."""
  env = slurm_env(tmp_path, 1, "8", "task")
  job = ('trap "echo checkpointed; exit 0" TERM; touch "$FAKE_DIR/ready$SLURM_PROCID"; '
         'while :; do sleep 0.05; done')
  batch = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "bash", "-c", job], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    wait_for(lambda: all((tmp_path / f"ready{t}").exists() for t in range(2)))
    batch.send_signal(sig)
    if sig == signal.SIGTERM:
      time.sleep(0.3)
      assert batch.poll() is None  # still waiting for its tasks
      for pid in (tmp_path / "task_pids").read_text().split():
        os.kill(int(pid), signal.SIGTERM)
    out, err = batch.communicate(timeout=30)
  finally:
    if batch.poll() is None:
      batch.kill()
  assert batch.returncode == 0, err
  for task in range(2):
    assert "checkpointed" in (tmp_path / f"task{task}.log").read_text()
  requeued = (tmp_path / "scontrol_calls").read_text() if sig == signal.SIGUSR1 else ""
  assert requeued == ("requeue 4242\n" if sig == signal.SIGUSR1 else "")
  if sig == signal.SIGUSR1:
    assert (tmp_path / "scancel_calls").read_text() == "--signal=TERM 4242\n"
    assert "requeueing job 4242" in out
  else:
    assert not (tmp_path / "scancel_calls").exists() and "requeueing" not in out
    assert not (tmp_path / "scontrol_calls").exists()


def test_slurm_wrapper_dry_run():
  def wrapper(*args):
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), "--dry-run", *args], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout

  out = wrapper("--nodes", "2", "--gpus-per-node", "8", "--partition=gpu", "--", *TRAIN.split())
  assert "mkdir -p outputs/slurm && CODI_SLURM_INIT=explicit sbatch --nodes=2 " \
      "--ntasks-per-node=8 --gpus-per-node=8 --partition=gpu launch/slurm.sbatch " + TRAIN in out
  out = wrapper("--nodes", "4", "--per-node", "--init", "auto", "--", "codi-jax", "demo", "a b")
  assert "CODI_SLURM_INIT=auto sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 " \
      "launch/slurm.sbatch codi-jax demo 'a b'" in out
  proc = subprocess.run(["bash", str(LAUNCH / "slurm.sh"), "--dry-run", "--nodes", "0", "--", "x"],
                        env=clean_env(), capture_output=True, text=True)
  assert proc.returncode == 2 and "--nodes must be a positive integer, got '0'" in proc.stderr


def test_local_processes_stops_the_others_when_one_fails():
  """A process whose peer died would wait at the coordinator forever: the launcher stops it and
  exits with the failure's status at once."""
  body = 'if [ "$CODI_PROCESS_ID" = 1 ]; then exit 7; fi; exec sleep 120'
  start = time.monotonic()
  proc = subprocess.run([str(LAUNCH / "local_processes.sh"), "3", "1", "bash", "-c", body],
                        capture_output=True, text=True, timeout=60, env=clean_env())
  assert proc.returncode == 7, proc.stderr
  assert time.monotonic() - start < 30
  done = subprocess.run([str(LAUNCH / "local_processes.sh"), "2", "1", "bash", "-c",
                         'echo "$CODI_PROCESS_ID of $CODI_NUM_PROCESSES"'],
                        capture_output=True, text=True, timeout=60, env=clean_env())
  assert done.returncode == 0 and sorted(done.stdout.split("\n")[:2]) == ["0 of 2", "1 of 2"]
