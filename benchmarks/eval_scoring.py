"""DreamBench scoring throughput: images embedded per second by jaxdream's DINO and CLIP ports and by
transformers/torch, on CPU, side by side in one run; prints both and the ratio (torch time / jaxdream time).

  python benchmarks/eval_scoring.py --models dino clip --batch 32 --threads 2 --repeats 3

dino: ViT-S/16 (facebook/dino-vits16's architecture: 384 wide, 12 layers, 6 heads, 224 px), the class token
after the final layer norm; clip: CLIP ViT-B/32's vision tower with its projection (openai/clip-vit-base-patch32,
get_image_features). Random weights (torch's init), handed to jaxdream through a save_pretrained folder, so both
sides run the same numbers (the outputs are compared). Timed: the model on a batch of already preprocessed
pixels, after a warm-up call (jaxdream compiles there), median of --repeats calls. Both sides are pinned to the
same --threads cores before their thread pools start.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import _report


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', nargs='+', choices=['dino', 'clip'], default=['dino', 'clip'])
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--threads', type=int, default=2, help='CPU cores for each side (0: all)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per side (median)')
  p.add_argument('--attention', default='auto', help="jaxdream's attention implementation (nn.attention)")
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  return p.parse_args()


def _torch_model(name):
  from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

  if name == 'dino':
    cfg = ViTConfig(
      hidden_size=384,
      num_hidden_layers=12,
      num_attention_heads=6,
      intermediate_size=1536,
      image_size=224,
      patch_size=16,
    )
    return ViTModel(cfg, add_pooling_layer=False).eval()
  return CLIPModel(CLIPConfig(projection_dim=512)).eval()  # the defaults are ViT-B/32's vision tower


def bench(name, args):
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from jaxdream.models import load_clip_model, load_vit
  from jaxdream.runtime import compiler_options

  torch.manual_seed(0)
  tmodel = _torch_model(name)
  with tempfile.TemporaryDirectory() as tmp:
    tmodel.save_pretrained(tmp)
    model = (load_vit if name == 'dino' else load_clip_model)(tmp, attention_impl=args.attention)
  method = 'cls_embedding' if name == 'dino' else 'get_image_features'
  graphdef, state = nnx.split(model)
  # Compiled as jaxdream.evaluation compiles them (on CPU: matmuls on XLA's kernels, not YNNPACK's).
  fn = jax.jit(
    lambda state, x: getattr(nnx.merge(graphdef, state), method)(x), compiler_options=compiler_options(xla_kernels=True)
  )
  x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  def run_torch():
    with torch.no_grad():
      if name == 'dino':
        return tmodel(pixel_values=xt).last_hidden_state[:, 0].numpy()
      out = tmodel.get_image_features(pixel_values=xt)
      return (out.pooler_output if hasattr(out, 'pooler_output') else out).numpy()

  jax_t = _report.timed(lambda: np.asarray(jax.block_until_ready(fn(state, x))), args.repeats)
  torch_t = _report.timed(run_torch, args.repeats)
  first, jax_s, jax_cpu, got = jax_t.first, jax_t.median, jax_t.cpu_median, jax_t.out
  torch_s, torch_cpu, want = torch_t.median, torch_t.cpu_median, torch_t.out
  err = float(np.abs(got - want).max() / np.abs(want).max())
  label = {'dino': 'DINO ViT-S/16', 'clip': 'CLIP ViT-B/32 image'}[name]
  print(
    f'{label}, batch {args.batch}: jaxdream {args.batch / jax_s:.1f} images/s (first call {first:.1f} s), '
    f'transformers {args.batch / torch_s:.1f} images/s; ratio {torch_s / jax_s:.2f}x; CPU seconds per batch '
    f'{jax_cpu:.1f} vs {torch_cpu:.1f} ({torch_cpu / jax_cpu:.2f}x) (max rel. diff {err:.1e})',
    flush=True,
  )
  sides = [_report.timing_side('jaxdream', jax_t), _report.timing_side('torch', torch_t, 'transformers')]
  return _report.row(
    f'DreamBench scoring, {label}, batch {args.batch}', sides, per_call=args.batch, item='image', max_rel_diff=err
  )


def main():
  args = _parse()
  _report.pin_cpu(args.threads)
  rows = [bench(name, args) for name in args.models]
  print(f'load average after: {os.getloadavg()[0]:.1f}')
  _report.write_json(args.json, rows)


if __name__ == '__main__':
  sys.exit(main())
