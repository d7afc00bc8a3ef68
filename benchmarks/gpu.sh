#!/usr/bin/env bash
# The GPU measurements of the README's speed table, as one prepared run on one NVIDIA GPU (a few minutes
# on an H200): jaxdream bf16 against diffusers/torch fp16 (SDPA attention), side by side.
#
#   bash benchmarks/gpu.sh [OUT_DIR] [STAGE...]     stages: env attention train sample unet (default: all)
#
# Each stage has its own time limit and the run goes on past a failed one; logs and --json results go to
# OUT_DIR (default $OUT, else ./gpu-out). Pure-Python packages missing on the machine can sit as wheels in
# .whl/ (installed to /tmp/site first). The SD 1.5 random model is built once (under /tmp) and reused.
set -u
out=${1:-${OUT:-gpu-out}}
shift || true
stages=${*:-env attention train sample unet}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G '.whl/*.whl' >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
model=/tmp/jaxdream-gpu-sd15

stage() {  # stage NAME LIMIT_S COMMAND...: run with a limit, log to OUT/NAME.log, report the outcome
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

for s in $stages; do
  case $s in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/env.log"
      python3 -c "
import jax, flax, optax, torch, diffusers, transformers
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__)
print('torch', torch.__version__, torch.cuda.get_device_name(), '| diffusers', diffusers.__version__,
      '| transformers', transformers.__version__)" 2>&1 | tee -a "$out/env.log" ;;
    attention)  # cuDNN/XLA dispatch and equality on SD 1.5's shapes (skipped off a GPU)
      JAX_PLATFORMS=cuda XLA_FLAGS= stage attention 100 python3 -m pytest -q -p no:cacheprovider \
        tests/test_flash_attention.py -k 'gpu or backend' ;;
    train)  # the DreamBooth step: UNet + text encoder trained, 1 instance + 1 class example, 512 px
      stage train_step 300 python3 benchmarks/train_step.py --preset sd15 --resolution 512 --device gpu \
        --steps 10 --remat none --model-dir "$model" --min-free-gb 0 --json "$out/train_step.json" ;;
    sample)  # txt2img, SD 1.5 512x512, batch 8, 50 DDIM steps with classifier-free guidance
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 stage sample 240 python3 benchmarks/sample.py --preset sd15 \
        --device gpu --steps 50 --batch 8 --repeats 3 --no-torch-compile --json "$out/sample.json" ;;
    unet)  # one UNet forward, batch 8 (classifier-free guidance's 2 x 4 images), 64x64 latents
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 stage unet_forward 120 python3 benchmarks/unet_forward.py --preset sd15 \
        --device gpu --batch 8 --size 64 --repeats 20 --json "$out/unet_forward.json" ;;
    *) echo "unknown stage $s" ;;
  esac
done
