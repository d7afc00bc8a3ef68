"""Greedy generation of Qwen2.5-VL / Qwen3-VL in jaxdream and in transformers/torch, side by side; prints the ratio.

CPU (the reference measurement):
  python benchmarks/vlm_generate.py --model qwen2_5_vl --config tiny 3b --batch 1 4 --new-tokens 8 --threads 2

Both sides load one folder of random weights, written once by transformers (`save_pretrained`, in the
compute dtype) under --cache-dir, and are fed the same inputs: one random image per row (--image-size
pixels square: 224 -> 64 image tokens) inside a chat-like prompt of special and text tokens, no tokenizer
needed. Each side runs in its own process, one after the other, so that a 3B model in bfloat16 (7.5 GB per
copy; 15 GB in float32) fits next to nothing else. Both sides run float32 by default; `--dtype bfloat16`
runs both in bfloat16 (on CPU too: jaxdream's products keep bfloat16 operands and accumulate in float32, and
a batch-1 row takes YNNPACK's kernel, nn.layers.matmul). EOS is switched off, so every call generates exactly --new-tokens tokens;
tokens/s counts generated tokens over the whole call (vision tower, prefill and decoding), after a warm-up
call (jaxdream compiles there: printed separately), and a 1-token call separates vision + prefill from
decoding. The generated tokens are compared too (bfloat16 rounding may make long random-weight runs part).
Each side also reports its resident memory over its imports: with the model loaded, and the peak during the
timed calls (the high-water mark restarted after the warm-up, so compiling is not counted). `--int8` runs
jaxdream with weight-only int8 weights (`quantize_int8`, computing in --dtype) against transformers in --dtype:
  python benchmarks/vlm_generate.py --config 3b --batch 1 --dtype bfloat16 --int8 --threads 2

`3b` is the published Qwen2.5-VL-3B-Instruct architecture (3,754,622,976 parameters, tied embeddings);
Qwen3-VL's `4b` is Qwen3-VL-4B-Instruct's. `tiny` keeps the real vocabulary with a 4-layer decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _report

from jaxdream.models.presets import QWEN2_5_VL_3B, QWEN3_VL_4B

GIB = 2**30
SPECIAL = {
  k: QWEN2_5_VL_3B[k] for k in ('image_token_id', 'video_token_id', 'vision_start_token_id', 'vision_end_token_id')
}
CONFIGS = {('qwen2_5_vl', '3b'): QWEN2_5_VL_3B, ('qwen3_vl', '4b'): QWEN3_VL_4B}
for _model, _big in (('qwen2_5_vl', '3b'), ('qwen3_vl', '4b')):
  _big = CONFIGS[(_model, _big)]
  _text = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1
  )
  _vision = dict(depth=4, hidden_size=256, intermediate_size=1024, out_hidden_size=256)
  _vision.update(fullatt_block_indexes=[3]) if _model == 'qwen2_5_vl' else _vision.update(
    deepstack_visual_indexes=[1, 2]
  )
  CONFIGS[(_model, 'tiny')] = dict(
    _big, text_config=dict(_big['text_config'], **_text), vision_config=dict(_big['vision_config'], **_vision)
  )


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', choices=['qwen2_5_vl', 'qwen3_vl'], default='qwen2_5_vl')
  p.add_argument('--config', nargs='+', default=['tiny'], help='tiny, 3b (qwen2_5_vl) or 4b (qwen3_vl)')
  p.add_argument('--batch', type=int, nargs='+', default=[1, 4])
  p.add_argument('--new-tokens', type=int, default=8)
  p.add_argument('--image-size', type=int, default=224, help='pixels (square, a multiple of 28 / 32)')
  p.add_argument('--threads', type=int, default=2, help='CPU threads for torch')
  p.add_argument('--repeats', type=int, default=2, help='timed calls per measurement (median)')
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32', help='weights and compute, both sides')
  p.add_argument('--int8', action='store_true', help="jaxdream's weights int8 (weight-only), computing in --dtype")
  p.add_argument('--cache-dir', default=os.path.join(os.path.expanduser('~'), '.cache', 'jaxdream', 'bench-vlm'))
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  p.add_argument('--side', choices=['make', 'jaxdream', 'torch'], help=argparse.SUPPRESS)  # a child process
  p.add_argument('--folder', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _dtype(args, name):
  return args.dtype


def _make(args):
  """The child that writes the random-weight folder: transformers' config and tensor names (the model built on
  torch's meta device, no memory), N(0, 0.02) weights, unit norms, zero biases, written shard by shard so
  that a 3B model never sits in memory twice."""
  import numpy as np
  import torch
  from transformers import AutoConfig, AutoModelForImageTextToText

  from jaxdream.io.weights import write_safetensors

  name = args.config[0]
  config = AutoConfig.for_model(
    args.model, **{k: v for k, v in CONFIGS[(args.model, name)].items() if k != 'model_type'}
  )
  with torch.device('meta'):
    model = AutoModelForImageTextToText.from_config(config)
  os.makedirs(args.folder, exist_ok=True)
  rng, dtype = np.random.default_rng(0), np.dtype(_dtype(args, name))
  shard, size, weight_map, n = {}, 0, {}, 0

  def flush():
    nonlocal shard, size, n
    if shard:
      n += 1
      write_safetensors(os.path.join(args.folder, f'model-{n:05d}.safetensors'), shard)
      weight_map.update({k: f'model-{n:05d}.safetensors' for k in shard})
      shard, size = {}, 0

  for key, p in model.named_parameters():  # tied weights once, as save_pretrained writes them
    if p.ndim == 1:
      value = np.full(p.shape, 1.0 if 'norm' in key or key.endswith('ln_q.weight') else 0.0, dtype)
    else:
      value = (rng.standard_normal(p.shape, np.float32) * 0.02).astype(dtype)
    shard[key], size = value, size + value.nbytes
    if size > 2**31:
      flush()
  flush()
  with open(os.path.join(args.folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  config.save_pretrained(args.folder)


def _inputs(args, batch):
  """One random image per row and a chat-like prompt around it: special tokens and text ids."""
  import numpy as np

  with open(os.path.join(args.folder, 'config.json')) as f:
    config = json.load(f)
  vision = config['vision_config']
  patch, merge, temporal = vision.get('patch_size', 14), vision.get('spatial_merge_size', 2), 2
  side = args.image_size // (patch * merge) * merge  # patches per side
  grid = np.array([[1, side, side]] * batch, np.int64)
  pixels = np.random.default_rng(0).standard_normal((batch * side * side, 3 * temporal * patch * patch))
  image = [SPECIAL['vision_start_token_id']] + [SPECIAL['image_token_id']] * (side * side // merge**2)
  row = [151644, 872, 198] + image + [SPECIAL['vision_end_token_id']] + list(range(1000, 1012)) + [151645, 198]
  ids = np.array([row + [151644, 77091, 198]] * batch, np.int64)
  return pixels.astype(np.float32), grid, ids, np.ones_like(ids)


def _side(args):
  """A child process: one side's timings for one (config, batch), as a JSON line on stdout."""
  import numpy as np

  batch, n = args.batch[0], args.new_tokens
  pixels, grid, ids, mask = _inputs(args, batch)
  if args.side == 'jaxdream':
    import jax
    import jax.numpy as jnp

    from jaxdream import vlm
    from jaxdream.models.qwen_vl import load_qwen_vl, quantize_int8

    jax.devices()  # the runtime's start is not the model's memory
  else:
    import torch
    from transformers import AutoModelForImageTextToText
  base, t0 = _report.rss(), time.perf_counter()
  if args.side == 'jaxdream':
    model = load_qwen_vl(args.folder, dtype=getattr(jnp, _dtype(args, args.config[0])))
    if args.int8:
      quantize_int8(model)
    run = lambda tokens: vlm.generate(model, pixels, grid, ids, mask, max_new_tokens=tokens, eos_token_id=[-1])
  else:
    torch.set_num_threads(args.threads)
    model = AutoModelForImageTextToText.from_pretrained(args.folder, dtype='auto').eval()
    t_in = dict(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      pixel_values=torch.from_numpy(pixels).to(model.dtype),
      image_grid_thw=torch.from_numpy(grid),
      mm_token_type_ids=torch.from_numpy((ids == SPECIAL['image_token_id']).astype(np.int64)),
    )

    def run(tokens):
      with torch.inference_mode():
        out = model.generate(**t_in, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
      return out.numpy()

  load_s = time.perf_counter() - t0
  _report.reset_peak()  # malloc's free lists back to the OS: what loading freed is not the model
  loaded = _report.rss() - base
  t0 = time.perf_counter()
  run(n), run(1)
  first_s = time.perf_counter() - t0
  reset = _report.reset_peak()
  full = _report.timed(lambda: run(n), args.repeats, warmup=False)
  one = _report.timed(lambda: run(1), args.repeats, warmup=False)
  print(
    'RESULT '
    + json.dumps(
      dict(
        times=full.times,
        cpu=full.cpu,
        one=one.times,
        first=first_s,
        load=load_s,
        loaded=loaded,
        peak=_report.peak_rss() - base if reset else None,
        tokens=np.asarray(full.out)[:, ids.shape[1] :].tolist(),
      )
    ),
    flush=True,
  )


def _child(args, side: str, folder: str, name: str, batch: int | None = None) -> dict | None:
  argv = [sys.executable, os.path.abspath(__file__), '--side', side, '--folder', folder, '--model', args.model]
  argv += ['--config', name, '--new-tokens', str(args.new_tokens), '--image-size', str(args.image_size)]
  argv += ['--threads', str(args.threads), '--repeats', str(args.repeats)]
  argv += ['--batch', str(batch or 1)] + (['--dtype', args.dtype] if args.dtype else [])
  argv += ['--int8'] if args.int8 else []
  out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
  lines = [line for line in out.splitlines() if line.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT ') :]) if lines else None


def bench(args, name: str) -> list[dict]:
  import statistics

  if (args.model, name) not in CONFIGS:
    raise SystemExit(
      f'--config {name}: not a {args.model} config ({", ".join(c for m, c in CONFIGS if m == args.model)})'
    )
  dtype = _dtype(args, name)
  folder = os.path.join(args.cache_dir, f'{args.model}-{name}-{dtype}')
  if not os.path.exists(os.path.join(folder, 'config.json')):
    print(f'[{name}] writing random {dtype} weights to {folder} ...', flush=True)
    _child(args, 'make', folder, name)
  rows, n = [], args.new_tokens
  kinds = {'jaxdream': f'{dtype}, int8 weights' if args.int8 else dtype, 'torch': dtype}
  for b in args.batch:
    sides = {}
    for side in ('jaxdream', 'torch'):
      r = sides[side] = _child(args, side, folder, name, b)
      s_n, s_1 = statistics.median(r['times']), statistics.median(r['one'])
      decode = f'{b * (n - 1) / (s_n - s_1):.1f} tokens/s' if s_n > s_1 else 'n/a (timing noise)'
      print(
        f'[{name}] {side:12s} batch {b}, {n} new tokens: {s_n:.2f} s, {b * n / s_n:.2f} tokens/s (vision + '
        f'prefill {s_1:.2f} s, decoding {decode}; {kinds[side]}; load {r["load"]:.0f} s, first calls '
        f'{r["first"]:.0f} s; memory over imports: loaded {r["loaded"] / GIB:.2f} GiB, peak while generating '
        + (f'{r["peak"] / GIB:.2f} GiB)' if r['peak'] is not None else 'n/a)'),
        flush=True,
      )
    j, t = (statistics.median(sides[s]['times']) for s in ('jaxdream', 'torch'))
    same = sides['jaxdream']['tokens'] == sides['torch']['tokens']
    print(f'[{name}] batch {b}: speed ratio (torch time / jaxdream time): {t / j:.2f}x   identical tokens: {same}')
    work = f'{args.model} greedy, {name} config, {kinds["jaxdream"]}, batch {b}, {n} new tokens'
    rows.append(
      _report.row(
        work,
        [
          _report.side(
            'jaxdream', sides['jaxdream']['times'], cpu=sides['jaxdream']['cpu'], first=sides['jaxdream']['first']
          ),
          _report.side('torch', sides['torch']['times'], cpu=sides['torch']['cpu'], label='transformers'),
        ],
        per_call=b * n,
        item='token',
        identical_tokens=same,
      )
    )
    if all(sides[s]['peak'] is not None for s in sides):
      rows.append(
        _report.row(
          f'{work}: memory while generating (RSS growth over imports)',
          [
            _report.side('jaxdream', [sides['jaxdream']['peak'] / GIB]),
            _report.side('torch', [sides['torch']['peak'] / GIB], label='transformers'),
          ],
          unit='GiB',
        )
      )
  return rows


def main():
  args = _parse()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.side == 'make':
    return _make(args)
  if args.side:
    return _side(args)
  _report.write_json(args.json, [row for name in args.config for row in bench(args, name)])


if __name__ == '__main__':
  sys.exit(main())
