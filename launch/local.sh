#!/usr/bin/env bash
# DreamBooth on one machine: makes the virtualenv if it is missing, then runs `jaxdream train`.
#
#   launch/local.sh [--config FILE] [--workdir DIR] [--config.key=value ...]
#
# Environment:
#   CONFIG             run config (default configs/quickstart.py); --config overrides it
#   WORKDIR            run folder (default outputs/local); --workdir overrides it; rerun to resume
#   VENV               virtualenv (default .venv in the checkout); made here if it has no jaxdream
#   EXTRAS             pip extras for a new virtualenv: gpu or tpu (default: CPU jax)
#   PYTHON             interpreter for a new virtualenv (default python3; jaxdream needs >= 3.11)
#   SIMULATED_DEVICES  N: run on N simulated CPU devices (tries the sharded step on one machine;
#                      a step's examples, prior ones included, must split over them)
#   PROCESSES          N: run N processes that stand in for N hosts (jax.distributed over localhost,
#                      SIMULATED_DEVICES each): tries a multi-host run on one machine
#   PORT               coordinator port for PROCESSES (default 12321)
#   DRY_RUN=1          print the command instead of running it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-$ROOT/configs/quickstart.py}"
WORKDIR="${WORKDIR:-$ROOT/outputs/local}"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

args=()
while (($#)); do
  case "$1" in
    --config | --workdir)
      (($# >= 2)) || { echo "local.sh: $1 needs a value" >&2; exit 2; }
      if [[ $1 == --config ]]; then CONFIG="$2"; else WORKDIR="$2"; fi
      shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;  # --config.train.num_steps=... and the rest go through
  esac
done

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [[ ! -x "$VENV/bin/jaxdream" ]]; then
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/pip" install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  # The CLIP BPE vocabulary of the built-in tiny model; --no-deps keeps torchvision out.
  run "$VENV/bin/pip" install -q --no-deps open_clip_torch==3.3.0
fi

if [[ -n "${SIMULATED_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$SIMULATED_DEVICES"
  [[ -n "${DRY_RUN:-}" ]] && echo "JAX_PLATFORMS=$JAX_PLATFORMS XLA_FLAGS=$XLA_FLAGS"
fi

cmd=("$VENV/bin/jaxdream" train --config "$CONFIG" --workdir "$WORKDIR" ${args[@]+"${args[@]}"})
if [[ -n "${PROCESSES:-}" ]]; then
  export JAXDREAM_COORDINATOR="localhost:${PORT:-12321}" JAXDREAM_NUM_PROCESSES="$PROCESSES"
  pids=()
  for ((i = 0; i < PROCESSES; i++)); do
    if [[ -n "${DRY_RUN:-}" ]]; then
      echo "JAXDREAM_COORDINATOR=$JAXDREAM_COORDINATOR JAXDREAM_NUM_PROCESSES=$PROCESSES JAXDREAM_PROCESS_ID=$i"
      run "${cmd[@]}"
    else
      JAXDREAM_PROCESS_ID=$i "${cmd[@]}" & pids+=($!)
    fi
  done
  # SIGTERM to this script reaches one process; JAX's preemption service tells the others
  trap 'kill -TERM "${pids[0]}" 2>/dev/null' TERM
  status=0
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=$?; done
  exit $status
fi
# exec: SIGTERM (preemption) reaches the training process, which saves a checkpoint and stops
if [[ -n "${DRY_RUN:-}" ]]; then run "${cmd[@]}"; else exec "${cmd[@]}"; fi
