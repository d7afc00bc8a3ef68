"""The DreamBooth training step in jaxdream and in diffusers/torch, side by side in one run: steps/s,
peak memory and the ratio.

The step (diffusers' train_dreambooth.py with --train_text_encoder --with_prior_preservation): one
instance and one class example, frozen VAE encode, UNet and text encoder trained, AdamW (two groups),
global-norm gradient clipping. The batch is fixed and already on the device: data loading is not timed.
jaxdream's steps run as the training loop runs them, each step's metrics read to the host after the next
step is dispatched (--metrics-lag 0: before, so that every step waits for the previous one); its s/step is
the median time between two such reads. Each side also prints CPU seconds per step (all its threads).

CPU (the reference measurements; sd15 at 256 px fits the 24 GB machine, one side at a time):
  python benchmarks/train_step.py --preset tiny --threads 2 --steps 10 --rounds 2
  python benchmarks/train_step.py --preset sd15 --resolution 256 --threads 2 --steps 2
GPU (jaxdream bf16 compute vs torch fp16 autocast + GradScaler; README: the H200 run):
  python benchmarks/train_step.py --preset sd15 --device gpu --steps 10 --remat none

Both sides run the same random weights: the torch models are built from configs, saved with
save_pretrained (diffusers folder with model_index.json, SD 1.5 scheduler, real CLIP tokenizer) and each
side loads that folder. Each side runs in its own subprocess so their memory peaks do not mix; the
torch side's first step uses the jaxdream step's random draws, so the first-step losses must agree
(float32 on CPU). Peak memory is the growth of the resident set over the process's size after its
imports, taken as the kernel's high-water mark (getrusage), which is reset after setup and jaxdream's
compile so that it covers the training steps only (freed heap is returned to the OS first, on both
sides). On GPU the device allocators' peaks are printed too, and those are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import _report

RESULT = '@@result '  # a child's last line: its measurements as JSON
PROMPTS = ('a photo of sks dog', 'a photo of dog')  # instance, class
GIB = 2**30


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=['tiny', 'sd15'], default='tiny')
  p.add_argument('--resolution', type=int, help='image size (default: tiny 64, sd15 512)')
  p.add_argument('--steps', type=int, default=5, help='timed steps per side, after one warm-up step')
  p.add_argument('--rounds', type=int, default=1, help='alternate jaxdream/torch runs this often; best kept')
  p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
  p.add_argument('--threads', type=int, help='CPU cores for each side (default: all this process may use)')
  p.add_argument('--attention', default='auto', help="jaxdream's attention (a run's: 'auto' trains with 'flash')")
  p.add_argument(
    '--remat',
    choices=['none', 'attention', 'blocks', 'full'],
    help="jaxdream's train.remat; anything but 'none' also turns on gradient checkpointing on the torch side "
    "(diffusers' and transformers' checkpointing keep each block's inputs only, as 'full' does). Default: "
    "sd15 'full', tiny 'none'",
  )
  p.add_argument(
    '--metrics-lag',
    type=int,
    choices=[0, 1],
    default=1,
    help="jaxdream: read a step's metrics after the next step is dispatched, as the training loop does (1), "
    'or before (0: every step waits for the previous one)',
  )
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--skip-jax', action='store_true')
  p.add_argument('--model-dir', help='build the random model here, or reuse the one there (default: temp)')
  p.add_argument('--max-rss-gb', type=float, help='kill a side whose resident set grows past this')
  p.add_argument(
    '--min-free-gb',
    type=float,
    default=1.0,
    help="kill a side when the machine's available memory falls below this (0: never)",
  )
  p.add_argument('--json', help='write the per-step times and memory of each side to this file (benchmarks/_report.py)')
  p.add_argument('--side', choices=['build', 'jax', 'torch'], help=argparse.SUPPRESS)  # internal
  p.add_argument('--folder', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.resolution = args.resolution or {'tiny': 64, 'sd15': 512}[args.preset]
  args.remat = args.remat or {'tiny': 'none', 'sd15': 'full'}[args.preset]
  return args


# ----------------------------------------------------------------------------- shared setup


def _configs(preset):
  """UNet, VAE and text encoder configs as keyword arguments of the diffusers/transformers classes."""
  from jaxdream.diffusion import tiny_model
  from jaxdream.models import presets

  configs = {
    'tiny': (tiny_model.TINY_UNET, tiny_model.TINY_VAE, tiny_model.TINY_TEXT_ENCODER),
    'sd15': (presets.SD15_UNET, presets.SD_VAE, presets.SD15_TEXT_ENCODER),
  }[preset]
  return [{k: v for k, v in c.items() if not k.startswith('_') and k != 'model_type'} for c in configs]


def train_config(gpu: bool):
  """The run config both sides follow: base_config's optimiser, with the text encoder trained."""
  from jaxdream.training.config import base_config

  c = base_config()
  c.train.train_text_encoder = True
  c.compute_dtype = 'bfloat16' if gpu else 'float32'
  return c


def _paths(folder, args):
  return (
    os.path.join(folder, 'model'),
    os.path.join(folder, f'batch_{args.resolution}.npz'),
    os.path.join(folder, f'draws_{args.resolution}_{args.device}.npz'),
  )


def _build(args, folder):
  """Random torch models saved as a diffusers folder (skipped if one is there), and the fixed batch."""
  import numpy as np

  from jaxdream.io.tokenizer import load_tokenizer, tokenize, write_clip_tokenizer

  model_dir, batch_path, _ = _paths(folder, args)
  if not os.path.exists(os.path.join(model_dir, 'model_index.json')):
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from jaxdream.diffusion.tiny_model import SD15_SCHEDULER

    t0 = time.perf_counter()
    unet_cfg, vae_cfg, te_cfg = _configs(args.preset)
    tok_dir = os.path.join(folder, 'tokenizer-src')
    write_clip_tokenizer(tok_dir)
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
      unet=diffusers.UNet2DConditionModel(**unet_cfg),
      vae=diffusers.AutoencoderKL(**vae_cfg),
      text_encoder=CLIPTextModel(CLIPTextConfig(**te_cfg)),
      tokenizer=load_tokenizer(tok_dir),
      scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
      safety_checker=None,
      feature_extractor=None,
      requires_safety_checker=False,
    )
    pipe.save_pretrained(model_dir)
    print(
      f'built and saved the random {args.preset} model in {model_dir} ({time.perf_counter() - t0:.1f} s)', flush=True
    )
  rng = np.random.default_rng(0)
  r = args.resolution
  np.savez(
    batch_path,
    pixels=rng.uniform(-1, 1, (2, r, r, 3)).astype(np.float32),
    input_ids=tokenize(load_tokenizer(os.path.join(model_dir, 'tokenizer')), list(PROMPTS)),
  )
  return {}


# ----------------------------------------------------------------------------- jaxdream


def _jax_side(args, folder):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxdream import load_pipeline
  from jaxdream.nn.attention import training_implementation
  from jaxdream.runtime.compiler import compiler_options
  from jaxdream.schedulers import NoiseSchedule
  from jaxdream.training.params import make_optimizer, param_groups, split_models, split_trainable
  from jaxdream.training.step import StepFn, init_state

  base = _report.rss()
  model_dir, batch_path, draws_path = _paths(folder, args)
  gpu = args.device == 'gpu'
  c = train_config(gpu)
  t0 = time.perf_counter()
  pipe = load_pipeline(model_dir, dtype=jnp.bfloat16 if gpu else jnp.float32, attention_impl=args.attention)
  # Assembled as train() does (single device: no mesh).
  graphdefs, templates, flat = split_models(pipe)
  groups = param_groups(c)
  trainable, frozen, labels = split_trainable(flat, groups)
  tx = make_optimizer(c, groups, labels)
  fn = StepFn(
    graphdefs=graphdefs,
    templates=templates,
    schedule=NoiseSchedule.from_config(pipe.scheduler_config),
    tx=tx,
    num_instance=c.train.batch_size,
    prior_weight=c.prior.loss_weight,
    snr_gamma=c.train.snr_gamma,
    offset_noise=c.train.offset_noise,
    ema_decay=0.0,
    encode_prompt=pipe.encode_prompt,
    attention=training_implementation(args.attention),  # as a run's step (StepFn.from_config)
    remat=args.remat,
  )
  state = jax.device_put(init_state(trainable, tx, c.seed, False))
  frozen = jax.device_put(frozen)
  batch = dict(np.load(batch_path))
  batch['input_ids'] = {'text_encoder': batch['input_ids']}  # token ids per text encoder, as the pipeline's
  batch = jax.device_put(batch)
  f, r, ch = pipe.vae_scale_factor, args.resolution, pipe.vae.latent_channels
  del pipe, flat, trainable  # the step's arguments hold the weights from here on
  n_trainable = sum(int(np.prod(v.shape)) for v in state['trainable'].values())
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  draws = jax.device_get(fn.draws(key, (2, r // f, r // f, ch)))  # what the first step will draw
  setup_s, rss_loaded = time.perf_counter() - t0, _report.rss()

  t0 = time.perf_counter()
  # compiled as a run's step is (training.step.jit_step): on CPU, XLA's memory-optimized scheduler
  compiled = (
    jax.jit(fn, donate_argnums=(0,), compiler_options=compiler_options(c.compute_dtype, low_memory=True))
    .lower(state, frozen, batch)
    .compile()
  )
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  mem = (
    {k: int(getattr(mem, f'{k}_size_in_bytes', 0) or 0) for k in ('temp', 'argument', 'output', 'alias')}
    if mem is not None
    else None
  )
  peak_setup = _report.peak_rss()
  reset = _report.reset_peak()
  rss_setup = _report.rss()

  def step():
    nonlocal state
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    metrics = jax.device_get(metrics)
    jax.block_until_ready(state)
    return time.perf_counter() - t0, metrics

  def steps(n):
    """n steps as the training loop runs them: each step's metrics read to the host after the next step is
    dispatched (--metrics-lag 1), or before it (0); the time from one read to the next, and CPU seconds."""
    nonlocal state
    times, pending = [], []
    c0, t_last = time.process_time(), time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, frozen, batch)
      pending.append(metrics)
      while len(pending) > args.metrics_lag:
        jax.device_get(pending.pop(0))
        now = time.perf_counter()
        times.append(now - t_last)
        t_last = now
    for m in pending:
      jax.device_get(m)
      now = time.perf_counter()
      times.append(now - t_last)
      t_last = now
    jax.block_until_ready(state)
    return times, (time.process_time() - c0) / n

  first_s, metrics = step()
  np.savez(draws_path, loss=np.float64(metrics['loss']), **draws)
  times, cpu_s = steps(args.steps)
  device_peak = None
  if gpu:
    stats = jax.devices()[0].memory_stats() or {}
    device_peak = stats.get('peak_bytes_in_use')
  return dict(
    label=f'jaxdream  ({jnp.dtype(jnp.bfloat16 if gpu else jnp.float32).name} compute, {jax.default_backend()}, '
    f'{fn.describe()})',
    setup_s=setup_s,
    compile_s=compile_s,
    first_s=first_s,
    times=times,
    cpu_s=cpu_s,
    loss0=float(metrics['loss']),
    n_trainable=n_trainable,
    base=base,
    rss_loaded=rss_loaded,
    rss_setup=rss_setup,
    peak_setup=peak_setup,
    peak_steps=_report.peak_rss() if reset else None,
    memory_analysis=mem,
    device_peak=device_peak,
    version=f'jax {jax.__version__}',
    threads=len(os.sched_getaffinity(0)),
    device={'platform': jax.devices()[0].platform, 'kind': jax.devices()[0].device_kind, 'count': jax.device_count()},
  )


# ----------------------------------------------------------------------------- diffusers / torch


def _torch_side(args, folder):
  import contextlib

  import numpy as np
  import torch
  from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
  from transformers import CLIPTextModel

  if args.threads:
    torch.set_num_threads(args.threads)
  base = _report.rss()
  model_dir, batch_path, draws_path = _paths(folder, args)
  gpu = args.device == 'gpu'
  dev = 'cuda' if gpu else 'cpu'
  cfg = train_config(gpu)
  c, prior_weight = cfg.train, cfg.prior.loss_weight
  t0 = time.perf_counter()
  # As train_dreambooth.py with --mixed_precision: trained models stay float32 (autocast computes in
  # fp16, GradScaler guards the gradients); the frozen VAE is cast to fp16.
  unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder='unet').to(dev).train()
  te = CLIPTextModel.from_pretrained(model_dir, subfolder='text_encoder').to(dev).train()
  vae = AutoencoderKL.from_pretrained(model_dir, subfolder='vae').to(dev, torch.float16 if gpu else torch.float32)
  vae.requires_grad_(False)
  checkpointing = args.remat != 'none'
  if checkpointing:  # train_dreambooth.py --gradient_checkpointing
    unet.enable_gradient_checkpointing()
    te.gradient_checkpointing_enable()
  sched = DDPMScheduler.from_pretrained(model_dir, subfolder='scheduler')
  params = list(unet.parameters()) + list(te.parameters())
  opt = torch.optim.AdamW(
    [
      {'params': list(unet.parameters()), 'lr': c.learning_rate},
      {'params': list(te.parameters()), 'lr': c.text_encoder_learning_rate},
    ],
    betas=(c.adam_b1, c.adam_b2),
    eps=c.adam_eps,
    weight_decay=c.weight_decay,
  )
  scaler = torch.amp.GradScaler('cuda') if gpu else None
  autocast = (lambda: torch.autocast('cuda', torch.float16)) if gpu else contextlib.nullcontext
  nchw = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).contiguous().to(dev)
  b = dict(np.load(batch_path))
  pixels, ids = nchw(b['pixels']).to(vae.dtype), torch.from_numpy(b['input_ids']).long().to(dev)
  shared = dict(np.load(draws_path)) if os.path.exists(draws_path) else None
  n_trainable = sum(p.numel() for p in params)
  setup_s = time.perf_counter() - t0
  sync = torch.cuda.synchronize if gpu else (lambda: None)

  def step(draws=None):
    t0 = time.perf_counter()
    with torch.no_grad():
      dist = vae.encode(pixels).latent_dist
      latents = dist.mean + dist.std * nchw(draws['latent_noise']).to(vae.dtype) if draws else dist.sample()
      latents = latents * vae.config.scaling_factor
    if draws:
      noise, t = nchw(draws['noise']).to(latents.dtype), torch.from_numpy(draws['timesteps']).long().to(dev)
    else:
      noise, t = torch.randn_like(latents), torch.randint(0, sched.config.num_train_timesteps, (2,), device=dev)
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == 'v_prediction' else noise
    with autocast():
      pred = unet(noisy, t, te(ids)[0]).sample
    mse = torch.nn.functional.mse_loss
    loss = mse(pred[:1].float(), target[:1].float()) + prior_weight * mse(pred[1:].float(), target[1:].float())
    if scaler:
      scaler.scale(loss).backward()
      scaler.unscale_(opt)
    else:
      loss.backward()
    torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
    if scaler:
      scaler.step(opt)
      scaler.update()
    else:
      opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.item()  # as the loop's logging does
    sync()
    return time.perf_counter() - t0, value

  rss_loaded, peak_setup = _report.rss(), _report.peak_rss()
  reset = _report.reset_peak()
  rss_setup = _report.rss()
  if gpu:
    torch.cuda.reset_peak_memory_stats()
  first_s, loss0 = step(shared)  # also allocates AdamW's state
  c0 = time.process_time()
  times = [step()[0] for _ in range(args.steps)]
  cpu_s = (time.process_time() - c0) / args.steps
  return dict(
    label=f'diffusers ({"fp16 autocast" if gpu else "float32"}, {dev}, '
    f'{unet.attn_processors[next(iter(unet.attn_processors))].__class__.__name__}, '
    f'gradient checkpointing {"on" if checkpointing else "off"})',
    setup_s=setup_s,
    compile_s=None,
    first_s=first_s,
    times=times,
    cpu_s=cpu_s,
    loss0=loss0,
    loss0_ref=float(shared['loss']) if shared else None,
    n_trainable=n_trainable,
    base=base,
    rss_loaded=rss_loaded,
    rss_setup=rss_setup,
    peak_setup=peak_setup,
    peak_steps=_report.peak_rss() if reset else None,
    memory_analysis=None,
    device_peak=torch.cuda.max_memory_allocated() if gpu else None,
    version=f'torch {torch.__version__}, {torch.get_num_threads()} threads',
    threads=torch.get_num_threads(),
  )


# ----------------------------------------------------------------------------- parent


def _rows(args, results: dict) -> list[dict]:
  """The --json rows: every timed step of every round per side, and the step-phase memory of each round
  (device peak on GPU, RSS growth over imports on CPU) where both sides measured it."""
  labels = {'jax': 'jaxdream', 'torch': 'torch'}
  short = {'jax': 'jaxdream', 'torch': 'diffusers'}  # the table's; each side's full setup goes to the notes
  work = f'DreamBooth step, {args.preset} {args.resolution}x{args.resolution}, 1+1 examples, UNet + text encoder'
  sides = [
    _report.side(labels[s], [t for r in rs for t in r['times']], first=rs[0]['first_s'], label=short[s])
    for s, rs in results.items()
    if rs
  ]
  setups = {labels[s]: rs[0]['label'] for s, rs in results.items() if rs}
  rows = [_report.row(work, sides, item='step', rounds=args.rounds, setups=setups)] if sides else []
  peaks = {
    s: [r['device_peak'] or (r['peak_steps'] - r['base'] if r['peak_steps'] else None) for r in rs]
    for s, rs in results.items()
  }
  if len(peaks) == 2 and all(p and None not in p for p in peaks.values()):
    kind = 'device memory peak' if args.device == 'gpu' else 'RSS growth over imports'
    rows.append(
      _report.row(
        f'{work}: memory during the steps ({kind})',
        [_report.side(labels[s], [b / GIB for b in p]) for s, p in peaks.items()],
        unit='GiB',
      )
    )
  return rows


def _child(args, side, folder) -> dict | None:
  """Run one side in a fresh process; its output passes through, its last line is the result."""
  cmd = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ['--side', side, '--folder', folder]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
  killed = []
  try:  # the machine may be shared: stop a side before the kernel's OOM killer picks someone
    import psutil
  except ImportError:
    psutil = None

  def guard():
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
      try:
        rss, free = p.memory_info().rss, psutil.virtual_memory().available
      except psutil.NoSuchProcess:
        return
      if (args.max_rss_gb and rss > args.max_rss_gb * GIB) or free < args.min_free_gb * GIB:
        killed.append(f'at {rss / GIB:.1f} GiB resident, {free / GIB:.1f} GiB available')
        proc.kill()
        return
      time.sleep(0.2)

  if psutil and (args.max_rss_gb or args.min_free_gb):
    threading.Thread(target=guard, daemon=True).start()
  result = None
  for line in proc.stdout:
    if line.startswith(RESULT):
      result = json.loads(line[len(RESULT) :])
    else:
      print(line, end='', flush=True)
  rc = proc.wait()
  if killed:
    print(f'{side}: killed {killed[0]} (--max-rss-gb {args.max_rss_gb}, --min-free-gb {args.min_free_gb})')
  elif rc:
    print(f'{side}: exited with status {rc}')
  return result


def _gib(x):
  return f'{x / GIB:.2f} GiB'


def _print_side(r) -> tuple[float, float | None]:
  """Print one side's line(s); returns (steps/s, step-phase memory growth in bytes)."""
  s = statistics.median(r['times'])
  warm = f'compile {r["compile_s"]:.1f} s, ' if r['compile_s'] is not None else ''
  print(
    f'{r["label"]}: {s:.3f} s/step, {1 / s:.3f} steps/s, {r["cpu_s"]:.3f} CPU s/step  ({warm}first step '
    f'{r["first_s"]:.2f} s, setup {r["setup_s"]:.1f} s; {r["n_trainable"] / 1e6:.1f}M trained parameters; '
    f'{r["version"]})'
  )
  growth = r['peak_steps'] - r['base'] if r['peak_steps'] else None
  steps = f'peak {_gib(r["peak_steps"])} during the steps, +{_gib(growth)} over imports; ' if growth else ''
  jit = r['compile_s'] is not None
  print(
    f'  memory (RSS): {steps}{_gib(r["base"])} after imports, {_gib(r["rss_loaded"])} with the models '
    f'loaded, {_gib(r["rss_setup"])} after setup{" and compile" if jit else ""} (trimmed), peak '
    f'{_gib(r["peak_setup"])} during setup{" and compile" if jit else ""}'
  )
  if r['memory_analysis']:
    m = r['memory_analysis']
    print(
      f'  compiled step memory_analysis: temp {_gib(m["temp"])} + argument {_gib(m["argument"])} + output '
      f'{_gib(m["output"])} = {_gib(m["temp"] + m["argument"] + m["output"])} '
      f'({_gib(m["alias"])} of the output reuses donated arguments)'
    )
  if r['device_peak']:
    print(f'  device memory peak: {_gib(r["device_peak"])}')
  return 1 / s, r['device_peak'] or growth


def main():
  args = _parse()
  if args.side:
    if args.device == 'cpu':
      os.environ['JAX_PLATFORMS'] = 'cpu'
      if args.threads:  # before jax and torch start their thread pools: both sides get the same cores
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    result = {'build': _build, 'jax': _jax_side, 'torch': _torch_side}[args.side](args, args.folder)
    print(RESULT + json.dumps(result), flush=True)
    return 0
  sides = [s for s, skip in (('jax', args.skip_jax), ('torch', args.skip_torch)) if not skip]
  tmp = None if args.model_dir else tempfile.mkdtemp(prefix='jaxdream-train-bench-')
  folder = args.model_dir or tmp
  os.makedirs(folder, exist_ok=True)
  try:
    if _child(args, 'build', folder) is None:
      return 1
    if os.path.exists(_paths(folder, args)[2]):
      os.remove(_paths(folder, args)[2])  # a stale first-step draw would make the loss check meaningless
    cores = args.threads or len(os.sched_getaffinity(0))
    print(
      f'work: {args.preset} {args.resolution}x{args.resolution}, 1 instance + 1 class example, UNet and '
      f'text encoder trained, {args.steps} timed steps after 1 warm-up, {args.rounds} round(s), '
      f'{args.device}, {cores} cores per side',
      flush=True,
    )
    results = {s: [] for s in sides}
    for k in range(args.rounds):
      for side in sides:
        r = _child(args, side, folder)
        if r is not None:  # a side that failed is left out; the other is still measured
          results[side].append(r)
        if args.rounds > 1:
          print(f'round {k + 1} {side}: {statistics.median(r["times"]):.3f} s/step', flush=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  print()
  best = {s: min(rs, key=lambda r: statistics.median(r['times'])) for s, rs in results.items() if rs}
  speed = {s: _print_side(r) for s, r in best.items()}
  if len(speed) == 2:
    (js, jm), (ts, tm) = speed['jax'], speed['torch']
    print(f'speed ratio (jaxdream steps/s / torch steps/s): {js / ts:.2f}x')
    if jm and tm:
      print(
        f'memory ratio (jaxdream / torch, {"device peak" if args.device == "gpu" else "RSS growth"}): {jm / tm:.2f}x'
      )
    t = best['torch']
    if t['loss0_ref'] is not None:
      rel = abs(t['loss0'] - t['loss0_ref']) / abs(t['loss0_ref'])
      print(
        f'first-step loss (same weights, batch and draws): jaxdream {t["loss0_ref"]:.6f}, '
        f'torch {t["loss0"]:.6f} (relative difference {rel:.1e})'
      )
  threads = {s: rs[0]['threads'] for s, rs in results.items() if rs}
  device = next((rs[0]['device'] for s, rs in results.items() if s == 'jax' and rs), None)
  _report.write_json(args.json, _rows(args, results), threads=threads, device=device)
  return 0 if len(best) == len(sides) else 1


if __name__ == '__main__':
  sys.exit(main())
