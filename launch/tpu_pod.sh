#!/usr/bin/env bash
# DreamBooth on a Cloud TPU VM slice (one host or a pod): every worker runs the same `jaxdream train`;
# on TPU, jax.distributed finds the coordinator and each process's id by itself.
#
#   launch/tpu_pod.sh create                 make the TPU VM (optional: any existing one will do)
#   launch/tpu_pod.sh setup                  install jaxdream on every worker (and mount GCS_BUCKET)
#   launch/tpu_pod.sh train [--config.k=v]   run training on every worker (rerun to resume)
#   launch/tpu_pod.sh all [--config.k=v]     create, setup, train
#   launch/tpu_pod.sh logs                   follow worker 0's log (DETACH=1 runs)
#   launch/tpu_pod.sh ssh 'COMMAND'          run a command on every worker
#   launch/tpu_pod.sh status | delete
#
# Environment (defaults in brackets):
#   TPU_NAME [jaxdream]  ZONE [us-central2-b]  ACCELERATOR_TYPE [v4-32]
#   RUNTIME_VERSION [tpu-ubuntu2204-base]  PROJECT [gcloud's default]  SPOT=1 (spot VMs)
#   SOURCE, REF    git URL and branch/tag/commit [main] cloned on every worker;
#                  no SOURCE: copy this checkout (tracked and unignored files) to every worker
#   REMOTE_DIR [jaxdream]          where the checkout goes, relative to the workers' home
#   PYTHON [python3.12]            installed from the deadsnakes PPA if missing (Ubuntu 22.04 has 3.10)
#   CONFIG [configs/quickstart.py] run config, relative to REMOTE_DIR or absolute on the workers
#   GCS_BUCKET     bucket mounted with gcsfuse on every worker at /mnt/gcs/$GCS_BUCKET
#   WORKDIR        run folder that every worker sees at the same path: on the bucket mount
#                  [/mnt/gcs/$GCS_BUCKET/runs/$TPU_NAME] or a shared disk (NFS, Filestore)
#   DETACH=1       train in the background (nohup, log in ~/jaxdream-train.log): survives ssh drops
#   DRY_RUN=1      print the gcloud commands instead of running them
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-jaxdream}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SOURCE="${SOURCE:-}"
REF="${REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-jaxdream}"
PYTHON="${PYTHON:-python3.12}"
CONFIG="${CONFIG:-configs/quickstart.py}"
GCS_BUCKET="${GCS_BUCKET:-}"
MOUNT="/mnt/gcs/$GCS_BUCKET"
WORKDIR="${WORKDIR:-${GCS_BUCKET:+$MOUNT/runs/$TPU_NAME}}"
VENV="\$HOME/jaxdream-venv"  # expanded on the workers

gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all() {  # a bash command line, run on every worker at once
  run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

create() {
  run "${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" ${SPOT:+--spot}
}

setup() {
  local fetch
  if [[ -n "$SOURCE" ]]; then  # a clone, not a bare pip install: configs/ comes with it
    fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR fetch -q origin $REF; \
else git clone -q $SOURCE ~/$REMOTE_DIR && git -C ~/$REMOTE_DIR fetch -q origin $REF; fi \
&& git -C ~/$REMOTE_DIR checkout -q FETCH_HEAD"
  else
    # The checkout as git sees it (no venv, no outputs), copied to every worker.
    local tarball
    tarball="$(mktemp -d)/jaxdream.tar.gz"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
      | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
      | tar -czf "$tarball" --null -T -)
    run "${gc[@]}" scp "$tarball" "$TPU_NAME:jaxdream.tar.gz" "${where[@]}" --worker=all
    fetch="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxdream.tar.gz -C ~/$REMOTE_DIR"
  fi
  local mount=true
  if [[ -n "$GCS_BUCKET" ]]; then  # gcsfuse from Google's apt repository, as its install guide does
    local key=/usr/share/keyrings/cloud.google.asc repo=https://packages.cloud.google.com/apt
    mount="command -v gcsfuse >/dev/null || { curl -fsSL $repo/doc/apt-key.gpg | sudo tee $key >/dev/null
echo \"deb [signed-by=$key] $repo gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }
sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $GCS_BUCKET $MOUNT"
  fi
  on_all "set -e
command -v $PYTHON >/dev/null || { sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q \
&& sudo apt-get install -y -q $PYTHON $PYTHON-venv; }
[ -x $VENV/bin/pip ] || $PYTHON -m venv $VENV
$VENV/bin/pip install -q -U pip
$fetch
$VENV/bin/pip install -q -e ~/$REMOTE_DIR'[tpu]'
$VENV/bin/pip install -q --no-deps open_clip_torch==3.3.0
$mount
$VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count())'"
}

train() {
  if [[ -z "$WORKDIR" ]]; then
    echo 'tpu_pod.sh: set WORKDIR to a folder every worker sees (a shared disk), or GCS_BUCKET' >&2
    exit 2
  fi
  local cmd
  # JAXDREAM_DISTRIBUTED=auto: jax.distributed.initialize() finds the other workers (and starts the
  # preemption service, through which a spot VM's SIGTERM stops every worker at the same step)
  cmd="cd ~/$REMOTE_DIR && JAXDREAM_DISTRIBUTED=auto $VENV/bin/jaxdream train --config $(printf '%q' "$CONFIG") \
--workdir $(printf '%q' "$WORKDIR")"
  (($#)) && cmd+=" $(printf '%q ' "$@")"
  if [[ -n "${DETACH:-}" ]]; then
    on_all "nohup bash -c $(printf '%q' "$cmd") > ~/jaxdream-train.log 2>&1 < /dev/null & echo started"
  else
    on_all "$cmd"
  fi
}

case "${1:-}" in
  create) create ;;
  setup) setup ;;
  train) shift; train "$@" ;;
  all) shift; create; setup; train "$@" ;;
  logs) run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command='tail -n 100 -f ~/jaxdream-train.log' ;;
  ssh) shift; on_all "$*" ;;
  status) run "${gc[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state,acceleratorType,health)' ;;
  delete) run "${gc[@]}" delete "$TPU_NAME" "${where[@]}" --quiet ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
