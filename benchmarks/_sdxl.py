"""The SDXL presets of unet_forward.py and sample.py: a random-weight model folder that both sides load, each side in
its own process.

`sdxl` is the published stabilityai/stable-diffusion-xl-base-1.0 architecture (its UNet alone is 2,567,463,684
parameters, 10.3 GB per float32 copy); `sdxl-tiny` has the same block structure (three UNet levels, the first
without attention, 1/2/10 transformer layers per level, both text encoders, the pooled embedding and 6 time ids as
added conditioning, a 4-level VAE) with small widths. The folder (diffusers' StableDiffusionXLPipeline layout) is
written once under the cache folder by a child process, shard by shard from models built on torch's meta device,
so that a model is never in memory twice; both scripts reuse it. The scripts then run each side in its own child
process, one after the other, so that only one side's weights are in memory at a time (two 10 GB UNets do not fit
next to other work on a 24 GB machine). A child prints its result as one `RESULT {json}` line.

  python benchmarks/_sdxl.py --make FOLDER --preset sdxl     # what model_folder() runs when the folder is missing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from jaxdream.models import presets

PRESETS = ('sdxl', 'sdxl-tiny')
CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'jaxdream', 'bench-sdxl')
SHARD_BYTES = 2**31

# name -> (library, class, weights file name without suffix)
COMPONENTS = {
  'unet': ('diffusers', 'UNet2DConditionModel', 'diffusion_pytorch_model'),
  'vae': ('diffusers', 'AutoencoderKL', 'diffusion_pytorch_model'),
  'text_encoder': ('transformers', 'CLIPTextModel', 'model'),
  'text_encoder_2': ('transformers', 'CLIPTextModelWithProjection', 'model'),
}
_TINY_TE2 = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=4, projection_dim=64)
_TIME_EMBED = 8
CONFIGS = {
  'sdxl': dict(
    unet=presets.SDXL_UNET,
    vae=presets.SDXL_VAE,
    text_encoder=presets.SDXL_TEXT_ENCODER,
    text_encoder_2=presets.SDXL_TEXT_ENCODER_2,
  ),
  'sdxl-tiny': dict(
    unet=dict(
      presets.SDXL_UNET,
      block_out_channels=[32, 64, 128],
      attention_head_dim=[1, 2, 4],  # heads per level (diffusers' name), 32 features each
      cross_attention_dim=32 + _TINY_TE2['hidden_size'],  # both encoders' features
      addition_time_embed_dim=_TIME_EMBED,
      projection_class_embeddings_input_dim=_TINY_TE2['projection_dim'] + 6 * _TIME_EMBED,  # pooled + 6 time ids
      norm_num_groups=8,
      sample_size=16,
    ),
    vae=dict(presets.SDXL_VAE, block_out_channels=[32, 32, 64, 64], norm_num_groups=8, sample_size=128),
    text_encoder=dict(
      presets.SDXL_TEXT_ENCODER,
      hidden_size=32,
      intermediate_size=64,
      num_attention_heads=2,
      num_hidden_layers=2,
      projection_dim=32,
    ),
    text_encoder_2=dict(presets.SDXL_TEXT_ENCODER_2, **_TINY_TE2),
  ),
}


def model_index() -> dict:
  import diffusers

  index = {
    '_class_name': 'StableDiffusionXLPipeline',
    '_diffusers_version': diffusers.__version__,
    'force_zeros_for_empty_prompt': True,
    'feature_extractor': [None, None],
    'image_encoder': [None, None],
    'scheduler': ['diffusers', presets.SDXL_SCHEDULER['_class_name']],
    'tokenizer': ['transformers', 'CLIPTokenizer'],
    'tokenizer_2': ['transformers', 'CLIPTokenizer'],
  }
  index.update({name: [lib, cls] for name, (lib, cls, _) in COMPONENTS.items()})
  return index


def _meta_model(name: str, config: dict):
  """The component built on torch's meta device (shapes and names only, no memory)."""
  import diffusers
  import torch
  import transformers

  lib, cls, _ = COMPONENTS[name]
  kwargs = {k: v for k, v in config.items() if not k.startswith('_') and k != 'model_type'}
  with torch.device('meta'):
    if lib == 'diffusers':
      return getattr(diffusers, cls)(**kwargs)
    return getattr(transformers, cls)(transformers.CLIPTextConfig(**kwargs))


def random_tensor(key: str, shape, rng):
  """Unit norm scales, zero biases, N(0, 1/fan_in) weights: activations stay O(1) through every layer."""
  import numpy as np

  if len(shape) == 1:
    return np.full(shape, 1.0 if key.endswith('.weight') and 'norm' in key else 0.0, np.float32)
  a = rng.standard_normal(shape, np.float32)
  a *= np.float32(np.prod(shape[1:]) ** -0.5)
  return a


def write_component(folder: str, name: str, config: dict, seed: int):
  """A diffusers/transformers component folder of random weights: config.json and safetensors shards of at most
  SHARD_BYTES (one file when it fits), written parameter by parameter."""
  import numpy as np

  from jaxdream.io.weights import write_safetensors

  model = _meta_model(name, config)
  weights_name = COMPONENTS[name][2]
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  shard, size, weight_map = {}, 0, {}

  def flush():
    nonlocal shard, size
    if shard:
      file = f'{weights_name}-{len(set(weight_map.values())) + 1:05d}.safetensors'
      write_safetensors(os.path.join(folder, file), shard)
      weight_map.update(dict.fromkeys(shard, file))
      shard, size = {}, 0

  for key, p in model.named_parameters():
    shard[key] = random_tensor(key, tuple(p.shape), rng)
    size += shard[key].nbytes
    if size >= SHARD_BYTES:
      flush()
  flush()
  files = sorted(set(weight_map.values()))
  if len(files) == 1:
    os.replace(os.path.join(folder, files[0]), os.path.join(folder, f'{weights_name}.safetensors'))
  else:
    with open(os.path.join(folder, f'{weights_name}.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  if COMPONENTS[name][0] == 'diffusers':
    model.save_config(folder)
  else:
    model.config.save_pretrained(folder)


def make(folder: str, preset: str):
  """The whole pipeline folder, written beside `folder` and renamed into place when complete."""
  from jaxdream.io.tokenizer import write_clip_tokenizer

  tmp = folder + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  for seed, (name, config) in enumerate(CONFIGS[preset].items()):
    print(f'[{preset}] writing random {name} weights ...', flush=True)
    write_component(os.path.join(tmp, name), name, config, seed)
  write_clip_tokenizer(os.path.join(tmp, 'tokenizer'))
  write_clip_tokenizer(os.path.join(tmp, 'tokenizer_2'), pad_token='!')  # SDXL's second tokenizer pads with '!'
  os.makedirs(os.path.join(tmp, 'scheduler'))
  with open(os.path.join(tmp, 'scheduler', 'scheduler_config.json'), 'w') as f:
    json.dump(presets.SDXL_SCHEDULER, f, indent=1)
  with open(os.path.join(tmp, 'model_index.json'), 'w') as f:
    json.dump(model_index(), f, indent=1)
  os.replace(tmp, folder)


def model_folder(cache_dir: str, preset: str) -> str:
  """The preset's random-weight pipeline folder under `cache_dir`, written first (in a child process) if missing."""
  folder = os.path.join(cache_dir, preset)
  if not os.path.exists(os.path.join(folder, 'model_index.json')):
    print(f'[{preset}] writing the random-weight folder {folder} (once) ...', flush=True)
    os.makedirs(cache_dir, exist_ok=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), '--make', folder, '--preset', preset], check=True)
  return folder


def image_size(folder: str) -> tuple[tuple[int, int], int]:
  """The pipeline's native image size (SDXL 1024) and the VAE's downscaling factor, from its configs alone."""
  with open(os.path.join(folder, 'unet', 'config.json')) as f:
    latent = json.load(f)['sample_size']
  with open(os.path.join(folder, 'vae', 'config.json')) as f:
    factor = 2 ** (len(json.load(f)['block_out_channels']) - 1)
  return (latent * factor, latent * factor), factor


def pin_threads(threads: int | None):
  """Before jax and torch start their thread pools: this process's cores, the first `threads` of them."""
  if threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def result(**values):
  """A child's result, for run_side."""
  print('RESULT ' + json.dumps(values), flush=True)


def run_side(argv: list[str]) -> dict:
  """Run a side's child process (`python argv...`): its printed lines shown, its RESULT line returned."""
  proc = subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.PIPE, text=True)
  found = None
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      found = json.loads(line[len('RESULT ') :])
    else:
      print(line, flush=True)
  if found is None:
    raise RuntimeError(f'{" ".join(argv)}: the child printed no RESULT line')
  return found


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--make', required=True, metavar='FOLDER')
  p.add_argument('--preset', choices=PRESETS, required=True)
  args = p.parse_args(argv)
  make(args.make, args.preset)


if __name__ == '__main__':
  sys.exit(main())
