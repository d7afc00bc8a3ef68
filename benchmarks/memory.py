"""Per-device memory of the DreamBooth training step by mesh shape and batch size, for SD 1.5 (512 px),
SD 2.1 (768 px) and SDXL base (1024 px), read from the compiled step: no weight is ever made and no step runs.

The step is the one `jaxdream train` runs (built with the same functions: split_models, param_groups,
split_trainable, make_optimizer, StepFn, step_shardings, jit_step): UNet and text encoder trained with
AdamW, bfloat16 compute over float32 parameters, frozen VAE encoding the images, prior preservation
(instance and class examples in one batch), global-norm clipping. The models are built shape-only
(abstract_model) and every argument is a jax.ShapeDtypeStruct carrying its sharding, so lowering sees
the mesh; `compile().memory_analysis()` then gives per-device sizes of the arguments (parameters,
optimizer state, frozen VAE, batch), the outputs (the new state, which reuses the donated old state),
and the temporaries (activations kept for the backward pass, gradients, XLA's scratch buffers).
Total per device = arguments + temporaries + outputs that do not reuse a donated argument + frozen
parameters the step never reads (the VAE decoder: jit leaves them out of the executable, but a run
keeps them on the device).

  python benchmarks/memory.py                                  # sd15 and sd21, 4 meshes over 8 devices
  python benchmarks/memory.py --models sd15 --meshes 8,1,1 1,8,1 --batch 1 2
  python benchmarks/memory.py --devices 16 --meshes 16,1,1 4,4,1 1,16,1 --json /tmp/memory.jsonl
  python benchmarks/memory.py --models sd15 --cached           # latents cached (no VAE encode)
  python benchmarks/memory.py --models sd15 --meshes 8,1,1 --attention xla --remat blocks   # compare kernels, remat
  python benchmarks/memory.py --models sd15 --lora-rank 4 --meshes 8,1,1 --batch 2            # LoRA, one subject
  python benchmarks/memory.py --models sd15 --lora-rank 4 --subjects 64 --meshes 8,1,1 --batch 16
  python benchmarks/memory.py --models sdxl --freeze-text-encoder --remat blocks --meshes 1,8,1  # dreambooth_sdxl.py
  python benchmarks/memory.py --models sdxl --lora-rank 4 --freeze-text-encoder --meshes 8,1,1  # lora_sdxl.py

SDXL (--models sdxl): the published base's UNet (2,567,463,684 parameters, checked), both text encoders (CLIP ViT-L
and OpenCLIP bigG with its projection), the SDXL VAE and scheduler, conditioned as load_pipeline conditions an SDXL
folder; each example carries its token ids for both encoders and its six time ids, as the data pipeline gives them.
Its configs train the UNet only (train.train_text_encoder=False: --freeze-text-encoder), dreambooth_sdxl.py with
train.remat='blocks', lora_sdxl.py with 'none' (its 4 accumulation steps add one adapter-sized buffer, not measured).

LoRA mode (--lora-rank R): rank-R adapters on the UNet's attention projections (to_q, to_k, to_v,
to_out.0, as diffusers' train_dreambooth_lora.py) and, unless --freeze-text-encoder, every text encoder's
(q_proj, k_proj, v_proj, out_proj), added as a run adds them (training.lora.lora_plan, add_adapters); only the
adapters are trained, the whole base is frozen. With
--subjects N the step is jaxdream.training.subjects' per-subject one (the single-subject step vmapped
over N subjects, one adapter, optimizer state and EMA each): the global batch (--batch x data x fsdp
examples) is split evenly over the subjects, and the subject axis over the mesh's batch axes.
Measured (sd15 512 px, rank 4, UNet + text encoder adapters, 1.09M trained parameters per subject,
bfloat16): 1 subject, 1 device, 1+1 examples: 28.97 GiB (state 0.01, frozen base 3.97, temporaries
24.98); 64 subjects on 8,1,1, 2 examples each (16 per device): 137.6 GiB per device (state 0.10,
temporaries 133.5). The adapters cost almost nothing; activations, which follow the examples per device,
are the whole bill, so subjects_per_step is set by examples per device, as batch size is.

--batch is examples per device, instance and class examples both counting: a step's global batch is
batch x data x fsdp examples, half of them instance examples (train.batch_size = global / 2), so
batch x data x fsdp must be even. The devices are simulated CPU devices
(--xla_force_host_platform_device_count, set from --devices before jax starts), so any mesh can be
planned on one machine; a 'tensor' axis > 1 only splits anything with --tensor-rules.

What the numbers are: XLA:CPU's buffer assignment for the partitioned program, an estimate of what a
TPU or GPU compile needs, not a measurement of one. Those backends fuse differently and their attention
kernels differ. The step is measured as a run trains: the config's defaults (attention 'auto', which
trains with 'flash', and train.remat) unless --attention/--remat are given. On these CPU devices 'flash'
is jaxdream's pure-JAX flash-attention kernel, whose backward keeps no score matrix, as cuDNN's (GPU)
and the Pallas kernel (TPU) do not either. --attention xla keeps every attention's full score matrix for
the backward pass (the numbers measured before 'flash' existed); --remat attention|blocks|full
recomputes activations instead of keeping them. The argument sizes are exact.

How it scales beyond these meshes: the arguments (float32 parameters and AdamW's two moments, 12 bytes
per trained parameter, and the frozen VAE) are FSDP-sharded, so they shrink about 1/fsdp, down to the
parameters whose dimensions do not divide over fsdp, which stay whole (the script prints the analytic
size for larger fsdp axes: past 64 it grows again, as SD's 320 and 640 channels stop dividing).
Temporaries follow the examples per device, plus gradient-sized buffers, which are whole on every
device of a pure data-parallel mesh and sharded like the parameters under FSDP. The script works for
any --devices count; more simulated devices make compiling slower.

Measured (jax 0.10.2, bfloat16, the training defaults, 2026-11-30, GiB per device): sd15 512 px 16.94 on
8,1,1 (arguments 11.11, temporaries 5.65), +0.96 per further example per device, 3.40 on 1,8,1 (5.11 with 2
examples per device); sd21 768 px 20.83 on 8,1,1, 6.10 on 1,8,1. With --attention xla and XLA:CPU's
default scheduler (before runtime/compiler.py) sd15 was 26.7 and sd21 47.3 on 8,1,1 (README).

Compiling one step on CPU takes 2-6 minutes and up to 5 GB of host memory; XLA prints "Very slow
compile?" meanwhile and, on FSDP meshes, SPMD "Involuntary full rematerialization" warnings (which
concern the speed of such a step, not these sizes). The rows are compiled one after another, each
printed when it is done, with jax's caches cleared between them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
import types

GIB = 2**30
AXES = ('data', 'fsdp', 'tensor')
RESOLUTIONS = {'sd15': 512, 'sd21': 768, 'sdxl': 1024, 'tiny': 64}
# The published UNets' parameter counts (diffusers' configs): the abstract models are checked against them.
UNET_PARAMETERS = {'sd15': 859_520_964, 'sdxl': 2_567_463_684}
FSDP_EXTRAPOLATION = (1, 8, 16, 32, 64, 256)  # fsdp sizes of the analytic per-device state line


def _mesh_shape(text):
  try:
    sizes = tuple(int(s) for s in text.split(','))
  except ValueError:
    sizes = ()
  if len(sizes) != 3:
    raise argparse.ArgumentTypeError(f'{text!r}: a mesh is data,fsdp,tensor, e.g. 4,2,1')
  return sizes


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument(
    '--models',
    nargs='+',
    choices=['sd15', 'sd21', 'sdxl', 'tiny'],
    default=['sd15', 'sd21'],
    help="sdxl: SDXL base 1.0 (both text encoders, time ids per example); 'tiny' is the quickstart's miniature "
    'model, for a quick check of the script',
  )
  p.add_argument('--resolution', type=int, help='image size for every model (default: sd15 512, sd21 768, sdxl 1024)')
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  p.add_argument(
    '--meshes',
    nargs='+',
    type=_mesh_shape,
    help='data,fsdp,tensor sizes, multiplying to --devices; default: every data x fsdp split',
  )
  p.add_argument('--batch', nargs='+', type=int, default=[1], help='examples per device (instance + class)')
  p.add_argument(
    '--cached',
    action='store_true',
    help='cached latents (train.cache_latents): no VAE encode in the step; with '
    '--freeze-text-encoder the text embeddings are cached too',
  )
  p.add_argument('--freeze-text-encoder', action='store_true', help='train the UNet only (no text encoder of SDXL)')
  p.add_argument('--dtype', choices=['bfloat16', 'float32'], default='bfloat16', help='compute dtype')
  p.add_argument(
    '--attention',
    choices=['xla', 'cudnn', 'tiled', 'flash', 'auto'],
    help="the config's attention (default: a run's, base_config's); the step trains with 'flash' for 'auto', "
    'as a run does',
  )
  p.add_argument(
    '--remat', choices=['none', 'attention', 'blocks', 'full'], help="train.remat (default: a run's, base_config's)"
  )
  p.add_argument(
    '--tensor-rules',
    action='store_true',
    help='shard over the tensor axis with jaxdream.distributed.sharding.TENSOR_RULES (off in the default config)',
  )
  p.add_argument('--lora-rank', type=int, default=0, help='train rank-R LoRA adapters only (0: full fine-tune)')
  p.add_argument(
    '--subjects', type=int, default=1, help='subjects per step (per-subject LoRA, needs --lora-rank), one adapter each'
  )
  p.add_argument('--json', help='append one JSON line per row to this file')
  args = p.parse_args(argv)
  if args.devices < 1 or min(args.batch) < 1:
    p.error('--devices and --batch must be at least 1')
  if args.lora_rank < 0 or args.subjects < 1 or (args.subjects > 1 and not args.lora_rank):
    p.error('--lora-rank must be >= 0 and --subjects >= 1; several subjects need --lora-rank')
  if args.meshes is None:  # every (data, fsdp) split, pure data parallel first
    n = args.devices
    args.meshes = [(n // f, f, 1) for f in range(1, n + 1) if n % f == 0]
  return args


def _use_devices(n: int):
  """Simulated CPU devices; must run before jax is imported."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
  flags += f' --xla_force_host_platform_device_count={n}'
  # The compiled step never runs, so its machine code need not be fast: LLVM's cheap pipeline compiles
  # SD 1.5's step in 2/3 of the time, with the same buffer assignment (memory analysis checked equal).
  for flag in ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true'):
    if flag.split('=')[0] not in flags:
      flags += ' ' + flag
  os.environ['XLA_FLAGS'] = flags.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _gib(x) -> str:
  return f'{x / GIB:.2f}'


def _nbytes(shape, dtype) -> int:
  import numpy as np

  return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- the abstract setup


def _scheduler_config(model):
  from jaxdream.diffusion.tiny_model import SD15_SCHEDULER
  from jaxdream.models import presets

  if model == 'sdxl':
    return dict(presets.SDXL_SCHEDULER)
  # SD 2.1 (768 px) was trained with v-prediction on the same beta schedule.
  return dict(SD15_SCHEDULER, prediction_type='v_prediction') if model == 'sd21' else dict(SD15_SCHEDULER)


def _component_configs(model) -> dict:
  """{component: config} of the model, as its diffusers folder has them."""
  from jaxdream.diffusion import tiny_model
  from jaxdream.models import presets, single_file

  if model == 'sdxl':  # the published SDXL base's, as a single file of it loads
    return dict(single_file.PRESETS['xl_base'])
  return dict(
    zip(
      ('unet', 'text_encoder', 'vae'),
      {
        'sd15': (presets.SD15_UNET, presets.SD15_TEXT_ENCODER, presets.SD_VAE),
        'sd21': (presets.SD21_UNET, presets.SD21_TEXT_ENCODER, presets.SD_VAE),
        'tiny': (tiny_model.TINY_UNET, tiny_model.TINY_TEXT_ENCODER, tiny_model.TINY_VAE),
      }[model],
    )
  )


def _pipeline(model, dtype, attention):
  """The model's pipeline with shape-only parameters (nothing allocated), conditioned as a loaded one is (SDXL:
  both encoders' prompt embedding and the time ids, as load_pipeline makes it from model_index.json)."""
  from jaxdream.diffusion import sdxl
  from jaxdream.diffusion.pipeline import SINGLE_FILE_CLASSES, Pipeline
  from jaxdream.models import abstract_model

  components = {
    name: abstract_model(
      lambda rngs, cls=SINGLE_FILE_CLASSES[name], cfg=cfg: cls(cfg, dtype=dtype, attention_impl=attention, rngs=rngs)
    )
    for name, cfg in _component_configs(model).items()
  }
  conditioning = {}
  if model == 'sdxl':
    conditioning = dict(
      encode_prompt=sdxl.encode_prompt,
      micro_conditioning=sdxl.size_time_ids,
      force_zeros_for_empty_prompt=True,
      pipeline_class='StableDiffusionXLPipeline',
    )
  return Pipeline(
    components=components,
    tokenizers={},
    scheduler_config=_scheduler_config(model),
    path=f'{model} (built from its published configs)',
    **conditioning,
  )


def _run_config(args, resolution):
  """The run config a real run would have (base_config with the text encoder(s) trained, or LoRA adapters)."""
  from jaxdream.distributed.sharding import TENSOR_RULES
  from jaxdream.training.config import base_config

  c = base_config()
  c.resolution = resolution
  c.compute_dtype = args.dtype
  c.attention = args.attention
  c.train.remat = args.remat
  c.train.train_text_encoder = not args.freeze_text_encoder
  c.train.cache_latents = args.cached
  c.train.cache_text_embeddings = args.cached and args.freeze_text_encoder
  # LoRA: the config's targets (diffusers' train_dreambooth_lora*.py: the UNet's to_q, to_k, to_v, to_out.0, every
  # text encoder's q_proj, k_proj, v_proj, out_proj), only the adapters trained.
  c.lora.rank = args.lora_rank
  c.lora.text_encoder = bool(args.lora_rank) and not args.freeze_text_encoder
  c.lora.per_subject = args.subjects > 1
  if args.tensor_rules:
    c.mesh.rules = TENSOR_RULES
  return c


def _text_encoders(pipeline) -> list[str]:
  return [name for name in pipeline.components if name.startswith('text_encoder')]


class Setup:
  """One model's abstract pipeline, parameter split and optimizer, shared by its rows."""

  def __init__(self, model, args):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxdream.training.config import RunConfigError
    from jaxdream.training.inputs import check_trainable
    from jaxdream.training.lora import adapter_key, add_adapters, lora_plan
    from jaxdream.training.params import make_optimizer, param_groups, split_models, split_trainable

    self.model = model
    self.resolution = args.resolution or RESOLUTIONS[model]
    self.config = _run_config(args, self.resolution)
    dtype = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}[args.dtype]
    self.pipeline = _pipeline(model, dtype, args.attention)
    if self.resolution % self.pipeline.vae_scale_factor:
      raise SystemExit(
        f'--resolution {self.resolution} is not a multiple of the VAE factor {self.pipeline.vae_scale_factor}'
      )
    try:  # what a run refuses before compiling (an SDXL per-subject run)
      check_trainable(self.pipeline, per_subject=self.config.lora.per_subject)
    except RunConfigError as e:
      raise SystemExit(str(e)) from None
    self.base_parameters = {
      m: sum(int(x.size) for x in jax.tree.leaves(nnx.state(c, nnx.Param))) for m, c in self.pipeline.components.items()
    }
    expected = UNET_PARAMETERS.get(model)
    if expected and self.base_parameters['unet'] != expected:
      raise SystemExit(
        f'{model} UNet: {self.base_parameters["unet"]:,} parameters, the published model has {expected:,}'
      )
    self.lora_rank, self.subjects = args.lora_rank, args.subjects
    if self.lora_rank:  # as a run adds them (the adapters' init values are real and small; the base stays abstract)
      add_adapters(self.pipeline, lora_plan(self.pipeline, self.config), adapter_key(self.config.seed))
    self.graphdefs, self.templates, flat = split_models(self.pipeline)
    self.groups = param_groups(self.config)  # LoRA: the adapters only, the whole base is frozen
    self.trainable, self.frozen, self.labels = split_trainable(flat, self.groups)
    self.tx = make_optimizer(self.config, self.groups, self.labels)
    self.opt_state = jax.eval_shape(self.tx.init, self.trainable)

  def totals(self) -> dict:
    """Whole-model sizes from the shapes: parameters (trained, frozen) and optimizer state."""
    import jax

    count = lambda tree: sum(int(x.size) for x in jax.tree.leaves(tree))
    size = lambda tree: sum(_nbytes(x.shape, x.dtype) for x in jax.tree.leaves(tree))
    by_model = {
      m: count({k: v for k, v in self.trainable.items() if k.startswith(m + '/')})
      for m in ('unet', *_text_encoders(self.pipeline))
    }
    return dict(
      trainable_params=count(self.trainable),
      trainable_bytes=size(self.trainable),
      trainable_by_model=by_model,
      frozen_params=count(self.frozen),
      frozen_bytes=size(self.frozen),
      optimizer_bytes=size(self.opt_state),
    )

  def state_per_device(self, fsdp: int) -> dict:
    """Analytic bytes per device of parameters, optimizer state and frozen parameters when FSDP-sharded
    over `fsdp` devices, by the library's own partition rule (a dimension that does not divide stays
    whole). AdamW keeps two float32 moments per trained parameter, sharded like it."""
    from jaxdream.distributed.sharding import logical_axes, partition_spec

    mesh = types.SimpleNamespace(shape={'data': 1, 'fsdp': fsdp, 'tensor': 1})  # all partition_spec reads
    axes = {}
    for m, model in self.pipeline.components.items():
      axes.update(logical_axes(model, m + '/'))
    rules = tuple(tuple(r) for r in self.config.mesh.rules)  # inert here: this mesh has no tensor axis

    def shard(flat):
      total = 0
      for k, v in flat.items():
        spec = partition_spec(v.shape, axes.get(k), mesh, rules, self.config.mesh.fsdp_min_size)
        total += _nbytes(v.shape, v.dtype) // (fsdp if 'fsdp' in tuple(spec) else 1)
      return total

    trained = shard(self.trainable)
    return dict(trainable=trained, optimizer=2 * trained, frozen=shard(self.frozen))


# ----------------------------------------------------------------------------- one row


def _abstract(tree, shardings):
  import jax

  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device(tree) -> int:
  """Bytes of one device's shards of an abstract, sharded tree."""
  import jax

  return sum(_nbytes(x.sharding.shard_shape(x.shape), x.dtype) for x in jax.tree.leaves(tree))


def _batch(s: Setup, examples: int, cached: bool) -> dict:
  """Abstract arrays of one step's batch, as train()'s _next_batch assembles it; with several subjects,
  (subjects, examples per subject, ...) as the per-subject step takes it. Token ids per text encoder, the
  prompt conditioning (context and extra UNet inputs) when cached, and the model's micro-conditioning per
  example (SDXL's time ids: data.make_iterator's)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  n = (examples,) if s.subjects == 1 else (s.subjects, examples // s.subjects)
  r, f = s.resolution, s.pipeline.vae_scale_factor
  if cached:
    latent = (*n, r // f, r // f, s.pipeline.vae.latent_channels)
    batch = {'latent_mean': (latent, jnp.float32), 'latent_std': (latent, jnp.float32)}
  else:
    batch = {'pixels': ((*n, r, r, 3), jnp.float32)}
  ids = {name: ((*n, 77), jnp.int32) for name in _text_encoders(s.pipeline)}
  if s.config.train.cache_text_embeddings:  # what _cache_text_embeddings stores: encode_prompt's outputs
    batch.update(jax.tree.map(lambda x: (x.shape, x.dtype), _encoded_shapes(s, examples)))
  else:
    batch['input_ids'] = ids
  micro = s.pipeline.micro_conditioning(r, r)  # {} for SD 1.x/2.x
  if micro:
    batch['micro_conditioning'] = {k: ((*n, *np.shape(v)), np.asarray(v).dtype) for k, v in micro.items()}
  return batch


def _encoded_shapes(s: Setup, examples: int) -> dict:
  """{'context': ..., 'extra': {...}} of `examples` prompts: the shapes of the pipeline's encode_prompt, as
  training.inputs._cache_text_embeddings stores them."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from jaxdream.training.params import unflatten

  ids = {name: jax.ShapeDtypeStruct((examples, 77), jnp.int32) for name in _text_encoders(s.pipeline)}

  def encode(params, ids):
    models = {m: nnx.merge(s.graphdefs[m], params[m]) for m in ids}
    context, extra = s.pipeline.encode_prompt(models, ids)
    return {'context': context, 'extra': extra}  # in the compute dtype, as the cache keeps them

  encoded = jax.eval_shape(encode, unflatten({**s.trainable, **s.frozen}, s.templates), ids)
  if s.subjects > 1:
    encoded = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((s.subjects, examples // s.subjects, *x.shape[1:]), x.dtype), encoded
    )
  return encoded


def measure(s: Setup, mesh_sizes, per_device: int, args) -> dict:
  """Compile the step for one mesh and batch; its memory analysis, per device."""
  import jax

  from jaxdream.distributed.mesh import make_mesh
  from jaxdream.nn.attention import training_implementation
  from jaxdream.schedulers import NoiseSchedule
  from jaxdream.training.step import StepFn, init_state, jit_step, step_shardings

  mesh = make_mesh(*mesh_sizes)
  d, f, t = (mesh.shape[a] for a in AXES)
  examples = per_device * d * f
  row = dict(
    model=s.model,
    resolution=s.resolution,
    mesh=[d, f, t],
    devices=d * f * t,
    batch_per_device=per_device,
    global_examples=examples,
    instance_examples=examples // 2,
    subjects=s.subjects,
    lora_rank=s.lora_rank,
    cached=args.cached,
    text_encoder_trained=not args.freeze_text_encoder,
    dtype=args.dtype,
    attention=training_implementation(args.attention),
    remat=args.remat,
  )
  if examples % (2 * s.subjects):
    return dict(row, error=f'{examples} examples cannot split into {s.subjects} subject(s) x instance + class pairs')
  per_subject = examples // s.subjects
  c = s.config
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = d, f, t
  c.train.batch_size = examples // 2
  step_fn = StepFn(
    graphdefs=s.graphdefs,
    templates=s.templates,
    schedule=NoiseSchedule.from_config(s.pipeline.scheduler_config),
    tx=s.tx,
    num_instance=per_subject // 2,
    prior_weight=c.prior.loss_weight,
    snr_gamma=c.train.snr_gamma,
    offset_noise=c.train.offset_noise,
    ema_decay=c.train.ema_decay,
    encode_prompt=s.pipeline.encode_prompt,
    attention=training_implementation(c.attention),
    remat=c.train.remat,
  )
  if s.subjects == 1:
    shardings = step_shardings(s.pipeline, s.trainable, s.frozen, s.tx, mesh, c)
    make_state = lambda tr: init_state(tr, s.tx, c.seed, c.train.ema_decay > 0)
    jit = jit_step
  else:  # one adapter, optimizer state and EMA per subject, stacked
    from jaxdream.training import subjects

    shardings = subjects.subject_step_shardings(
      s.pipeline, s.trainable, s.frozen, s.tx, mesh, c, s.subjects, per_subject
    )
    make_state = lambda tr: subjects.stack([init_state(tr, s.tx, c.seed, c.train.ema_decay > 0)] * s.subjects)
    jit = subjects.jit_subject_step
  state_sh, frozen_sh, batch_sh = shardings
  state = _abstract(jax.eval_shape(make_state, s.trainable), state_sh)
  frozen = _abstract(s.frozen, frozen_sh)
  batch = jax.tree.map(  # leaves: (shape, dtype) pairs
    lambda sd: jax.ShapeDtypeStruct(*sd, sharding=batch_sh),
    _batch(s, examples, args.cached),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  t0 = time.perf_counter()
  compiled = jit(step_fn, shardings, mesh).lower(state, frozen, batch).compile()
  row['compile_s'] = round(time.perf_counter() - t0, 1)
  m = compiled.memory_analysis()
  mem = {
    k: int(getattr(m, f'{k}_size_in_bytes', 0) or 0) for k in ('argument', 'output', 'alias', 'temp', 'generated_code')
  }
  row.update(mem)
  # The same split from the shardings alone: what the arguments should hold.
  row['state_analytic'] = _per_device(state)
  row['frozen_analytic'] = _per_device(frozen)
  row['batch_analytic'] = _per_device(batch)
  # jit drops arguments the step never reads (the VAE decoder; with --cached the encoder too) from the
  # executable, but a run keeps them on the device all the same: they count towards the total.
  held = row['state_analytic'] + row['frozen_analytic'] + row['batch_analytic']
  row['unused'] = max(0, held - mem['argument'])
  row['total'] = mem['argument'] + mem['temp'] + mem['output'] - mem['alias'] + row['unused']
  return row


# ----------------------------------------------------------------------------- output

COLUMNS = (
  ('model', 6),
  ('px', 5),
  ('mesh d,f,t', 11),
  ('batch/dev', 10),
  ('global (inst+class)', 26),
  ('state/dev', 10),
  ('frozen/dev', 11),
  ('arguments', 10),
  ('temp', 8),
  ('total/dev', 10),
  ('compile', 8),
)


def _line(cells) -> str:
  return ' '.join(str(c).ljust(w) for c, (_, w) in zip(cells, COLUMNS)).rstrip()


def _row_line(r) -> str:
  head = [
    r['model'],
    r['resolution'],
    ','.join(map(str, r['mesh'])),
    r['batch_per_device'],
    f'{r["global_examples"]} ({r["instance_examples"]}+{r["instance_examples"]})'
    + (f' {r["subjects"]} subj.' if r.get('subjects', 1) > 1 else ''),
  ]
  if 'error' in r:
    return _line(head) + '  skipped: ' + r['error']
  return _line(
    head
    + [
      _gib(r['state_analytic']),
      _gib(r['frozen_analytic']),
      _gib(r['argument']),
      _gib(r['temp']),
      _gib(r['total']),
      f'{r["compile_s"]:.0f} s',
    ]
  )


def _model_header(s: Setup) -> str:
  t = s.totals()
  parts = ' + '.join(f'{m} {n / 1e6:.1f}M' for m, n in t['trainable_by_model'].items() if n)
  ext = ', '.join(f'{n}: {_gib(sum(s.state_per_device(n).values()))}' for n in FSDP_EXTRAPOLATION)
  lora = f'LoRA rank {s.lora_rank} adapters' + (f', per subject of {s.subjects}' if s.subjects > 1 else '')
  base = ', '.join(f'{m} {n:,}' for m, n in s.base_parameters.items())
  checked = " (the published UNet's, checked)" if s.model in UNET_PARAMETERS else ''
  return (
    f'{s.model} {s.resolution}x{s.resolution}: parameters {base}{checked}\n'
    f'  trained {t["trainable_params"] / 1e6:.2f}M parameters '
    + (f'({lora}) ' if s.lora_rank else '')
    + f'({parts}) = {_gib(t["trainable_bytes"])} GiB float32, '
    f'AdamW state {_gib(t["optimizer_bytes"])} GiB, '
    f'frozen {t["frozen_params"] / 1e6:.1f}M = {_gib(t["frozen_bytes"])} GiB\n'
    f'  parameters + optimizer + frozen per device by fsdp size (analytic, GiB): {ext}'
  )


def main(argv=None):
  args = _parse(argv)
  _use_devices(args.devices)  # before jax is imported (below and in jaxdream)
  import jax

  from jaxdream.nn.attention import training_implementation
  from jaxdream.training.config import base_config

  defaults = base_config()  # what a run trains with unless its config says otherwise
  args.attention = args.attention or defaults.attention
  args.remat = args.remat or defaults.train.remat

  if len(jax.devices()) != args.devices:
    print(f'asked for {args.devices} devices, jax has {len(jax.devices())}', file=sys.stderr)
    return 1
  for sizes in args.meshes:
    known = math.prod(n for n in sizes if n != -1)
    if args.devices % known or (-1 not in sizes and known != args.devices):
      print(f'mesh {sizes} does not fit {args.devices} devices (--devices)', file=sys.stderr)
      return 2
  print(
    f'jaxdream DreamBooth step, per-device memory from XLA:CPU memory_analysis over {args.devices} '
    f'simulated devices: {args.dtype} compute, float32 parameters, UNet'
    f'{"" if args.freeze_text_encoder else " + text encoder(s)"} trained with AdamW'
    f'{f" (LoRA rank {args.lora_rank} adapters only)" if args.lora_rank else ""}, prior preservation, '
    f'{"cached latents" if args.cached else "VAE encode in the step"}, attention {args.attention} (training: '
    f'{training_implementation(args.attention)}), remat {args.remat} '
    f'(jax {jax.__version__})',
    flush=True,
  )
  print(
    'state/dev = trained parameters + AdamW moments, frozen/dev = frozen parameters (both analytic, '
    'from the shardings); arguments and temp from the compiled step; total/dev = arguments + temp + '
    'outputs not aliasing donated arguments + frozen parameters the step never reads (the VAE decoder: '
    'pruned from the executable, still held by a run); GiB',
    flush=True,
  )
  out = open(args.json, 'a') if args.json else None
  failed = 0
  try:
    for model in args.models:
      s = Setup(model, args)
      print('\n' + _model_header(s), flush=True)
      print(_line([name for name, _ in COLUMNS]), flush=True)
      for sizes in args.meshes:
        for b in args.batch:
          try:
            r = measure(s, sizes, b, args)
          except Exception as e:  # a row that fails to compile (e.g. out of memory) leaves the others
            r = dict(
              model=model,
              resolution=s.resolution,
              mesh=list(sizes),
              batch_per_device=b,
              global_examples='?',
              instance_examples='?',
              error=f'{type(e).__name__}: {e}'[:300],
            )
            failed += 1
          print(_row_line(r), flush=True)
          if out:
            out.write(json.dumps(r) + '\n')
            out.flush()
          jax.clear_caches()  # the compiled step and its lowering are dropped before the next row
          gc.collect()
      del s
  finally:
    if out:
      out.close()
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
