"""Greedy Kosmos-2 generation in jaxdream and in transformers/torch, side by side in one run; prints the ratio.

CPU (the reference measurement):
  python benchmarks/kosmos2_generate.py --config tiny full --batch 1 --new-tokens 16 --threads 2 --int8

Both sides get the same random weights (torch's init, handed to jaxdream as a numpy state dict), the same
224x224 image and the same `<grounding>An image of` prompt (64 image tokens + text, 72 tokens). EOS is
switched off so that every run generates exactly --new-tokens tokens; tokens/s counts generated tokens
over the whole call (vision tower, prompt prefill and decoding), after a warm-up call (jaxdream compiles
there: its compile time is printed separately), and a 1-token call separates vision + prefill from
decoding. The generated tokens are compared too. --int8 then quantizes jaxdream's weights (weight-only
int8) and reports memory, logits error against float32 and speed.

`full` is microsoft/kosmos-2-patch14-224's architecture (1.66B parameters, 6.7 GB per copy in float32:
both copies need ~14 GB of RAM); `tiny` is a 4-layer model with the real 65037-token vocabulary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _report

TINY = dict(
  text_config=dict(embed_dim=256, layers=4, ffn_dim=1024, attention_heads=8),
  vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8),
)


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', nargs='+', choices=['tiny', 'full'], default=['tiny', 'full'])
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--new-tokens', type=int, default=32)
  p.add_argument('--threads', type=int, default=2, help='CPU threads for torch')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per measurement (median)')
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32', help='jaxdream compute dtype')
  p.add_argument(
    '--int8', action='store_true', help="then quantize jaxdream's weights to int8: memory, logits error, tokens/s"
  )
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  return p.parse_args()


def _inputs(batch, image_size, num_image_tokens=64):
  """Prompt ids laid out as Kosmos2Processor makes them for '<grounding> An image of' (<s> <image>, the 64
  image slots 4..67, </image> <grounding> An image of), and a random image (already normalised)."""
  import numpy as np

  boi, eoi, grounding = 64003, 64004, 64012
  row = [0, boi] + list(range(4, 4 + num_image_tokens)) + [eoi, grounding, 712, 1648, 9]
  ids = np.array([row] * batch, np.int64)
  image_mask = np.zeros_like(ids)
  image_mask[:, 2 : 2 + num_image_tokens] = 1
  pixels = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
  return pixels, ids, np.ones_like(ids), image_mask


def bench(name, args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

  from jaxdream import vlm
  from jaxdream.models import count_params
  from jaxdream.models.kosmos2 import kosmos2_from_state_dict, quantize_int8, state_bytes
  from jaxdream.vlm.generation import compiled

  torch.manual_seed(0)
  t0 = time.perf_counter()
  config = Kosmos2Config(**(TINY if name == 'tiny' else {}))
  tmodel = Kosmos2ForConditionalGeneration(config).eval()
  tmodel.generation_config.eos_token_id = None  # run to --new-tokens
  with torch.no_grad():
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
  model = kosmos2_from_state_dict(config.to_dict(), sd, dtype=getattr(jnp, args.dtype))
  del sd
  print(f'[{name}] {count_params(model) / 1e6:.1f}M parameters, built in {time.perf_counter() - t0:.0f} s', flush=True)

  n, b = args.new_tokens, args.batch
  pixels, ids, attention, image_mask = _inputs(b, config.vision_config.image_size)
  px = pixels.transpose(0, 2, 3, 1)

  def run_jax(tokens):
    return vlm.generate(model, px, ids, attention, image_mask, max_new_tokens=tokens, eos_token_id=[-1])

  def report(side, run, note):
    """Time the whole call for n tokens and for 1 (vision + prefill): the difference is n - 1 decode steps.
    Returns the n-token calls' Timing."""
    timing = _report.timed(lambda: run(n), args.repeats, warmup=False)  # warmed up by the caller
    s_n = timing.median
    s_1 = _report.timed(lambda: run(1), args.repeats, warmup=False).median
    decode = f'{b * (n - 1) / (s_n - s_1):.1f} tokens/s' if s_n > s_1 else 'n/a (timing noise)'
    print(
      f'[{name}] {side:12s} batch {b}, {n} new tokens: {s_n:.2f} s, {b * n / s_n:.1f} tokens/s '
      f'(vision + prefill {s_1:.2f} s, decoding {decode}; {note})',
      flush=True,
    )
    return timing

  t0 = time.perf_counter()
  run_jax(n), run_jax(1)
  compile_s = time.perf_counter() - t0
  jax_t = report(
    'jaxdream', run_jax, f'{args.dtype}, first calls incl. compile {compile_s:.1f} s, backend {jax.default_backend()}'
  )
  jax_s, jax_out = jax_t.median, jax_t.out

  torch.set_num_threads(args.threads)
  tin = {
    k: torch.from_numpy(v)
    for k, v in zip(
      ('pixel_values', 'input_ids', 'attention_mask', 'image_embeds_position_mask'),
      (pixels, ids, attention, image_mask),
    )
  }

  def run_torch(tokens):
    with torch.inference_mode():
      return tmodel.generate(**tin, max_new_tokens=tokens, do_sample=False).numpy()  # noqa: F821 (deleted after use, below)

  run_torch(n)  # warm-up
  torch_t = report('transformers', run_torch, f'float32, torch {torch.__version__}, {args.threads} threads')
  torch_s, torch_out = torch_t.median, torch_t.out
  same = torch_out.shape == jax_out.shape and bool(np.all(torch_out == jax_out))
  print(
    f'[{name}] speed ratio (torch time / jaxdream time): {torch_s / jax_s:.2f}x   identical tokens: {same}', flush=True
  )
  del tmodel, tin
  result = _report.row(
    f'Kosmos-2 greedy, {name} config, batch {b}, {n} new tokens',
    [
      _report.timing_side('jaxdream', jax_t, f'jaxdream {args.dtype}'),
      _report.timing_side('torch', torch_t, 'transformers'),
    ],
    per_call=b * n,
    item='token',
    compile_s=compile_s,
    identical_tokens=same,
  )
  if not args.int8:
    return result

  inputs = (jnp.asarray(px, model.dtype), jnp.asarray(ids), jnp.asarray(image_mask), jnp.asarray(attention))
  # The model's compile cache keys on its structure: after quantizing in place, this compiles anew.
  forward = lambda: np.asarray(compiled(model, type(model).__call__)(*inputs))
  ref = forward()
  before = state_bytes(model)
  quantize_int8(model)
  logits = forward()
  err = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
  agree = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
  run_jax(n), run_jax(1)
  int8_t = report('jaxdream int8', run_jax, 'weight-only int8')
  int8_s, int8_out = int8_t.median, int8_t.out
  same = float(np.mean(int8_out[:, -n:] == jax_out[:, -n:]))
  print(
    f'[{name}] int8 weights: {before / 2**30:.2f} GiB -> {state_bytes(model) / 2**30:.2f} GiB, prompt logits '
    f'relative error {err:.2e} (argmax agreement {agree:.1%}), generated tokens equal to float32: {same:.0%}, '
    f'speed vs float32 {jax_s / int8_s:.2f}x',
    flush=True,
  )
  result['notes'].update(int8_times=int8_t.times, int8_logits_rel_err=err)
  return result


def main():
  args = _parse()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  _report.write_json(args.json, [bench(name, args) for name in args.config])


if __name__ == '__main__':
  sys.exit(main())
