#!/usr/bin/env bash
# The tiny base model from scratch (issue #15): a VAE (its scaling_factor set for unit-variance latents), then the
# UNet + text encoder on its latents, both on DreamBench without the quickstart's dog
# (jaxdream/training/pretrain_data.py), then the diffusers folder at OUT.
#
#   scripts/make_tiny_base.sh [OUT] [--dreambench DIR] [--steps-vae N] [--steps-unet M] [--seed S] [--workdir W]
#
# OUT defaults to outputs/tiny_base, W (the runs: data/, vae/, pretrain/) to OUT.work. Seeded: the same
# arguments on the same machine give the same weights, byte for byte. Both runs checkpoint; the same command
# resumes them after an interruption (give a new W for a run with other arguments). Run from the repository
# root (or anywhere with jaxdream installed); JAXDREAM (default: jaxdream) is the command that runs jaxdream.
set -euo pipefail

OUT=outputs/tiny_base
DREAMBENCH=../shared/dreambench
STEPS_VAE=2000
STEPS_UNET=4000
SEED=0
WORK=
JAXDREAM=${JAXDREAM:-jaxdream}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; exit "${1:-0}"; }
positional=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dreambench) DREAMBENCH=$2; shift 2 ;;
    --steps-vae) STEPS_VAE=$2; shift 2 ;;
    --steps-unet) STEPS_UNET=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --workdir) WORK=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "make_tiny_base.sh: unknown option $1" >&2; usage 2 ;;
    *) [[ $positional == 0 ]] || { echo "make_tiny_base.sh: one OUT only" >&2; usage 2; }
       OUT=$1; positional=1; shift ;;
  esac
done
WORK=${WORK:-$OUT.work}
if [[ -e $OUT && ! -f $OUT/model_index.json ]]; then
  echo "make_tiny_base.sh: $OUT exists and is not a model folder; not overwriting it" >&2; exit 2
fi
[[ -f $DREAMBENCH/prompts_and_classes.txt ]] || { echo "make_tiny_base.sh: no DreamBench at $DREAMBENCH (--dreambench DIR)" >&2; exit 2; }

echo "== 1/3 data: DreamBench minus the quickstart's dog -> $WORK/data"
if [[ ! -d $WORK/data ]]; then
  mkdir -p "$WORK"
  "$PYTHON" -m jaxdream.training.pretrain_data --dreambench "$DREAMBENCH" --out "$WORK/data"
fi

echo "== 2/3 VAE: $STEPS_VAE steps -> $WORK/vae/vae"
"$JAXDREAM" train --config "$HERE/configs/vae_tiny.py" --workdir "$WORK/vae" \
  --config.vae.data_dir="$WORK/data" --config.train.num_steps="$STEPS_VAE" --config.seed="$SEED"

"$PYTHON" -m jaxdream.training.pretrain_data --calibrate-vae "$WORK/vae/vae" --out "$WORK/data" --resolution 64

echo "== 3/3 UNet + text encoder: $STEPS_UNET steps on the VAE's latents -> $WORK/pretrain/model"
"$JAXDREAM" train --config "$HERE/configs/tiny_base_pretrain.py:$DREAMBENCH" --workdir "$WORK/pretrain" \
  --config.vae_model="$WORK/vae/vae" --config.train.num_steps="$STEPS_UNET" --config.seed="$SEED"

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
# float16 weights: the package ships the folder (half the size; loaded back as float32 parameters)
"$PYTHON" -m jaxdream.training.pretrain_data --export-base "$WORK/pretrain/model" --out "$OUT"
echo "The tiny base model (diffusers format): $OUT"
echo "Try it: $JAXDREAM sample --model $OUT --prompt 'a photo of teapot' --out samples_tiny_base"
