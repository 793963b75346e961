#!/usr/bin/env bash
# Runs one codi-jax command on every host of a Cloud TPU pod slice (one process per TPU VM host;
# JAX connects them through CODI_DISTRIBUTED=auto). See `launch/tpu_pod.sh --help`.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh [OPTIONS] SUBCOMMAND [-- COMMAND ARGS...]

Subcommands:
  create         create the TPU VM slice, or reuse it when it is READY
  setup          copy this checkout to every worker and `pip install -e ".[tpu]"` there
  run -- CMD...  start CMD on every worker (CODI_DISTRIBUTED=auto), detached from ssh,
                 logging to ~/REMOTE_DIR/logs/SESSION-workerN.log on worker N
  logs           copy every worker's log into LOGS_DIR/N.log
  tail           follow one worker's log (WORKER, default 0)
  status         the slice's state and, per worker, whether the job runs and its last log line
  stop           SIGTERM the job on every worker (it checkpoints), SIGKILL after STOP_GRACE s
  delete         delete the slice

Options (each also read from the environment variable in capitals):
  --name NAME                 TPU VM name (required)
  --zone ZONE                 zone, e.g. us-east5-a (required)
  --project PROJECT           Google Cloud project (default: gcloud's configured project)
  --accelerator ACCELERATOR   accelerator type (default v5p-128)
  --runtime-version VERSION   TPU VM image (RUNTIME_VERSION; default by accelerator generation)
  --spot | --preemptible      create a Spot / preemptible slice (SPOT=1, PREEMPTIBLE=1)
  --recreate                  create: delete and re-create a PREEMPTED or TERMINATED slice
  --remote-dir DIR            checkout on the workers, relative to home (default codi-jax)
  --session NAME              job name for run/logs/tail/status/stop (default codi)
  --env KEY=VALUE             run: extra environment for the command (repeatable)
  --logs-dir DIR              logs: local folder (default outputs/tpu-logs/NAME)
  --worker N                  tail: which worker (default 0)
  --stop-grace SECONDS        stop: wait this long after SIGTERM (default 120)
  --python PYTHON             setup: interpreter for the workers' venv (default python3.11)
  --dry-run                   print every gcloud command instead of running it (DRY_RUN=1)
  GCLOUD=path                 the gcloud binary (default gcloud)

Example (v5p-128: 16 hosts x 4 chips):
  launch/tpu_pod.sh --name codi --zone us-east5-a create --spot
  launch/tpu_pod.sh --name codi --zone us-east5-a setup
  launch/tpu_pod.sh --name codi --zone us-east5-a run -- codi-jax train \
      --config configs/codi.py:full --config.stage=diffuse_image --workdir gs://bucket/run1
EOF
}

die() { echo "error: $*" >&2; exit 1; }
info() { echo "$*" >&2; }

# Shell-quotes each argument, leaving plain words bare so printed commands stay readable.
q() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

NAME=${NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-v5p-128}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
RECREATE=${RECREATE:-0}
REMOTE_DIR=${REMOTE_DIR:-codi-jax}
SESSION=${SESSION:-codi}
LOGS_DIR=${LOGS_DIR:-}
WORKER=${WORKER:-0}
STOP_GRACE=${STOP_GRACE:-120}
PYTHON=${PYTHON:-python3.11}
DRY_RUN=${DRY_RUN:-0}
GCLOUD=${GCLOUD:-gcloud}
EXTRA_ENV=()
SUBCOMMAND=
COMMAND=()

while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) NAME=${2:?--name needs a value}; shift ;;
    --zone) ZONE=${2:?--zone needs a value}; shift ;;
    --project) PROJECT=${2:?--project needs a value}; shift ;;
    --accelerator) ACCELERATOR=${2:?--accelerator needs a value}; shift ;;
    --runtime-version) RUNTIME_VERSION=${2:?--runtime-version needs a value}; shift ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --recreate) RECREATE=1 ;;
    --remote-dir) REMOTE_DIR=${2:?--remote-dir needs a value}; shift ;;
    --session) SESSION=${2:?--session needs a value}; shift ;;
    --env) [[ ${2:-} == *=* ]] || die "--env needs KEY=VALUE, got '${2:-}'"
           EXTRA_ENV+=("$2"); shift ;;
    --logs-dir) LOGS_DIR=${2:?--logs-dir needs a value}; shift ;;
    --worker) WORKER=${2:?--worker needs a value}; shift ;;
    --stop-grace) STOP_GRACE=${2:?--stop-grace needs a value}; shift ;;
    --python) PYTHON=${2:?--python needs a value}; shift ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; COMMAND=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [ -z "$SUBCOMMAND" ] || die "two subcommands: '$SUBCOMMAND' and '$1'"; SUBCOMMAND=$1 ;;
  esac
  shift
done

[ -n "$SUBCOMMAND" ] || { usage >&2; exit 2; }
[ -n "$NAME" ] || die "no TPU name: pass --name NAME or set NAME"
[ -n "$ZONE" ] || die "no zone: pass --zone ZONE or set ZONE"
[[ $SESSION =~ ^[A-Za-z0-9_.-]+$ ]] || die "--session must be a plain word, got '$SESSION'"
[[ $STOP_GRACE =~ ^[0-9]+$ ]] || die "--stop-grace must be whole seconds, got '$STOP_GRACE'"
[ "$SPOT$PREEMPTIBLE" != 11 ] || die "--spot and --preemptible exclude each other"
if [ -z "$RUNTIME_VERSION" ]; then
  case $ACCELERATOR in
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    *) die "no default runtime version for accelerator '$ACCELERATOR'; pass --runtime-version" ;;
  esac
fi
LOGS_DIR=${LOGS_DIR:-outputs/tpu-logs/$NAME}
if [ "$DRY_RUN" != 1 ] && ! command -v "$GCLOUD" >/dev/null; then
  die "'$GCLOUD' not found: install the Google Cloud SDK" \
      "(https://cloud.google.com/sdk/docs/install) or pass --dry-run to print the commands"
fi

# Runs one gcloud command; in dry-run mode prints it instead (stdout then is a runnable script).
gc() {
  local cmd=("$GCLOUD" "$@")
  [ -z "$PROJECT" ] || cmd+=(--project "$PROJECT")
  if [ "$DRY_RUN" = 1 ]; then
    q "${cmd[@]}"
  else
    info "+ $(q "${cmd[@]}")"
    "${cmd[@]}"
  fi
}

tpu() { gc compute tpus tpu-vm "$@"; }

# Runs a shell script on every worker at once.
on_all_workers() { tpu ssh "$NAME" --zone "$ZONE" --worker=all --command "$1" "${@:2}"; }

# Shell prelude of every remote script: into the checkout, with this worker's index in $w.
remote_prelude() {
  local dir
  dir=$(q "$REMOTE_DIR")
  cat <<EOF
cd $dir || { echo "\$(hostname): no ~/$dir; run setup first" >&2; exit 1; }
w=\$(curl -sf --connect-timeout 2 -H "Metadata-Flavor: Google" \\
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \\
    || hostname)
pidf=logs/$SESSION.pid
alive() { [ -f "\$pidf" ] && kill -0 -- "-\$(cat "\$pidf")" 2>/dev/null; }
EOF
}

# Sets STATE to the slice's state, or to "" when it does not exist (dry-run: assumes it does not).
describe_state() {
  local args=(describe "$NAME" --zone "$ZONE" --format='value(state)') err status=0
  if [ "$DRY_RUN" = 1 ]; then
    tpu "${args[@]}"
    STATE=
    return
  fi
  err=$(mktemp)
  STATE=$(tpu "${args[@]}" 2>"$err") || status=$?
  if [ "$status" != 0 ]; then
    STATE=
    grep -qiE 'NOT_FOUND|not found' "$err" \
        || die "could not describe TPU $NAME in $ZONE: $(grep -v '^+ ' "$err")"
  fi
  rm -f "$err"
}

cmd_create() {
  describe_state
  case $STATE in
    READY) info "TPU $NAME in $ZONE exists and is READY: reusing it"; return ;;
    "") ;;
    PREEMPTED|TERMINATED)
      [ "$RECREATE" = 1 ] \
          || die "TPU $NAME is $STATE; pass --recreate to delete and create it again"
      tpu delete "$NAME" --zone "$ZONE" --quiet ;;
    *) die "TPU $NAME is $STATE, not READY: wait, or delete it" ;;
  esac
  local args=(create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR"
              --version "$RUNTIME_VERSION")
  [ "$SPOT" != 1 ] || args+=(--spot)
  [ "$PREEMPTIBLE" != 1 ] || args+=(--preemptible)
  tpu "${args[@]}"
}

# The files git knows in this checkout (committed or not, untracked but not ignored), as a tarball.
pack_checkout() {
  local repo tarball=$1
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ "$DRY_RUN" = 1 ]; then
    echo "# pack $(q "$repo") (git ls-files -co --exclude-standard) into $(q "$tarball")"
    return
  fi
  git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 \
      || die "$repo is not a git checkout; setup copies the files git knows"
  git -C "$repo" ls-files -z -co --exclude-standard \
    | while IFS= read -r -d '' f; do [ ! -e "$repo/$f" ] || printf '%s\0' "$f"; done \
    | tar -C "$repo" --null -T - -czf "$tarball"
}

cmd_setup() {
  local tarball remote
  if [ "$DRY_RUN" = 1 ]; then
    tarball=${TMPDIR:-/tmp}/codi-jax-src.tar.gz
  else
    SETUP_TMP=$(mktemp -d)
    trap 'rm -rf "$SETUP_TMP"' EXIT
    tarball=$SETUP_TMP/codi-jax-src.tar.gz
  fi
  pack_checkout "$tarball"
  tpu scp "$tarball" "$NAME:codi-jax-src.tar.gz" --zone "$ZONE" --worker=all
  local dir py
  dir=$(q "$REMOTE_DIR")
  py=$(q "$PYTHON")
  # Replaces the code but keeps the venv and logs; Python 3.11 comes from apt when the image
  # lacks it (TPU VM images ship Ubuntu's 3.10; apt waits for boot-time upgrades to release dpkg).
  remote=$(cat <<EOF
set -e
mkdir -p $dir
find $dir -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
tar -xzf codi-jax-src.tar.gz -C $dir
rm -f codi-jax-src.tar.gz
cd $dir
if ! $py -c "import ensurepip" 2>/dev/null; then
  sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \\
      $py $py-venv
fi
[ -x .venv/bin/python ] || $py -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[tpu]"
echo "\$(hostname): jax \$(.venv/bin/python -c "import jax; print(jax.__version__)") ready"
EOF
)
  on_all_workers "$remote"
}

cmd_run() {
  [ ${#COMMAND[@]} -gt 0 ] || die "run needs the command after --, e.g. run -- codi-jax train ..."
  local env=(CODI_DISTRIBUTED=auto ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}) remote
  # The job file keeps a record of what ran. Its shell ignores SIGTERM (the command gets the
  # default) so that it outlives `stop` long enough to log the command's exit status; setsid and
  # nohup detach it from the ssh session.
  remote=$(cat <<EOF
$(remote_prelude)
[ -x .venv/bin/python ] || { echo "worker \$w: no .venv; run setup first" >&2; exit 1; }
if alive; then echo "worker \$w: job $SESSION already runs; stop it first" >&2; exit 1; fi
mkdir -p logs
cat > logs/$SESSION.job <<"CODI_JOB_EOF"
echo \$\$ > logs/$SESSION.pid
trap : TERM
source .venv/bin/activate
$(q "${COMMAND[@]}")
rc=\$?
echo "=== \$(date -u +%FT%TZ) exit \$rc"
rm -f logs/$SESSION.pid
exit \$rc
CODI_JOB_EOF
log=logs/$SESSION-worker\$w.log
echo "=== \$(date -u +%FT%TZ) worker \$w starts: \$(sed -n 4p logs/$SESSION.job)" >> "\$log"
export $(q "${env[@]}")
setsid nohup bash logs/$SESSION.job >> "\$log" 2>&1 < /dev/null &
echo "worker \$w: started $SESSION, log ~/$(q "$REMOTE_DIR")/\$log"
EOF
)
  on_all_workers "$remote"
}

cmd_logs() {
  if [ "$DRY_RUN" = 1 ]; then q mkdir -p "$LOGS_DIR"; else mkdir -p "$LOGS_DIR"; fi
  local remote
  remote="cd $(q "$REMOTE_DIR") && cat logs/$SESSION-worker*.log 2>/dev/null \
|| echo \"(no log yet)\""
  on_all_workers "$remote" --output-directory "$LOGS_DIR"
  [ "$DRY_RUN" = 1 ] || info "logs of every worker in $LOGS_DIR/<worker>.log"
}

cmd_tail() {
  tpu ssh "$NAME" --zone "$ZONE" --worker="$WORKER" \
      --command "tail -n 200 -F $(q "$REMOTE_DIR")/logs/$SESSION-worker*.log"
}

cmd_status() {
  tpu describe "$NAME" --zone "$ZONE" --format='value(state,acceleratorType)'
  local remote
  remote=$(cat <<EOF
$(remote_prelude)
last=\$(tail -n 1 logs/$SESSION-worker\$w.log 2>/dev/null || echo "(no log)")
if alive; then echo "worker \$w: $SESSION runs | \$last"; else echo "worker \$w: idle | \$last"; fi
EOF
)
  on_all_workers "$remote"
}

cmd_stop() {
  local remote
  remote=$(cat <<EOF
$(remote_prelude)
if ! alive; then echo "worker \$w: no job $SESSION runs"; rm -f "\$pidf"; exit 0; fi
p=\$(cat "\$pidf")
kill -TERM -- "-\$p"
for _ in \$(seq $STOP_GRACE); do alive || break; sleep 1; done
if alive; then kill -KILL -- "-\$p"; echo "worker \$w: killed after $STOP_GRACE s"
else echo "worker \$w: stopped"; fi
rm -f "\$pidf"
EOF
)
  on_all_workers "$remote"
}

cmd_delete() { tpu delete "$NAME" --zone "$ZONE" --quiet; }

case $SUBCOMMAND in
  create|setup|run|logs|tail|status|stop|delete) "cmd_$SUBCOMMAND" ;;
  *) usage >&2; die "unknown subcommand '$SUBCOMMAND'" ;;
esac
