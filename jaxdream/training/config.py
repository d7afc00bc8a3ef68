"""Training run configs (ml_collections) and their validation, done before anything is compiled.

`task` chooses the run: 'dreambooth' (fine-tuning a Stable Diffusion model on concepts) or 'vae' (training an
AutoencoderKL on an image folder, settings in the `vae` group: training/vae.py).

Config files in configs/ define `get_config()` on top of `base_config()`; any key can be overridden on
the command line (`--config.train.num_steps=400`). The config is locked, so a misspelt key is an error.
"""

from __future__ import annotations

import difflib
import json
import os
import re

import ml_collections

from jaxdream.diffusion.tiny_model import BUILTIN_MODELS, BUILTIN_TINY, BUILTIN_TINY_BASE  # noqa: F401 (configs import them)
from jaxdream.nn.attention import IMPLEMENTATIONS
from jaxdream.nn.remat import REMAT
from jaxdream.schedulers import SCHEDULER_NAMES


class RunConfigError(ValueError):
  """A run config that cannot work; the message lists every problem and what to fix."""


def config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file (for config files built on another one)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def concept(
  instance_dir='', instance_prompt='', class_prompt='', class_dir='', num_class_images=100, identifier='sks', name=''
):
  return ml_collections.ConfigDict(
    dict(
      name=name,
      instance_dir=instance_dir,
      instance_prompt=instance_prompt,
      class_prompt=class_prompt,
      class_dir=class_dir,
      num_class_images=num_class_images,
      identifier=identifier,
    )
  )


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'dreambooth'  # or 'vae': train an AutoencoderKL (the `vae` group)
  c.model = ''  # diffusers-format folder (SD 1.x/2.x), or 'builtin:tiny'
  c.vae_model = ''  # an AutoencoderKL folder replacing the model's VAE (e.g. a task='vae' run's workdir/vae)
  c.allow_pickle = False  # load .bin/.ckpt weights (unpickling can run code)
  c.seed = 0
  c.resolution = 512
  c.compute_dtype = 'float32'  # or 'bfloat16' (parameters stay float32)
  c.attention = 'auto'
  c.resume_override = False  # resume even if the run-defining config changed

  c.concepts = [concept()]
  c.data = ml_collections.ConfigDict(
    dict(
      concepts_file='',  # JSON list of concepts (same keys as `concepts`), for many subjects
      center_crop=True,  # False: random crops
      flip_p=0.0,  # probability of a horizontal flip
      caption_ext='.txt',  # per-image caption sidecars: photo.jpg + photo.txt
      caption_mode='append',  # 'append' to the instance prompt, or 'replace' it
      on_bad_image='fail',  # or 'skip' (with a warning)
      on_bad_subject='fail',  # lora.per_subject: or 'skip' a subject whose photos are unusable, train the others
      min_instance_images=3,
      min_image_size=32,  # smaller images are reported as bad
    )
  )
  c.prior = ml_collections.ConfigDict(
    dict(enabled=True, loss_weight=1.0, sample_steps=25, guidance_scale=7.5, scheduler='', batch_size=4)
  )
  c.train = ml_collections.ConfigDict(
    dict(
      num_steps=400,
      batch_size=1,  # instance examples per step; as many prior examples come on top
      learning_rate=5e-6,
      train_text_encoder=False,
      text_encoder_learning_rate=5e-6,
      # Extra trainable groups: name -> {pattern: regex over 'unet/...'/'text_encoder/...' paths,
      # learning_rate}. When given, they replace the default unet/text_encoder groups.
      param_groups=ml_collections.ConfigDict(),
      lr_schedule='constant',  # constant, warmup_constant, cosine
      warmup_steps=0,
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-8,
      weight_decay=1e-2,
      max_grad_norm=1.0,  # 0 disables clipping
      grad_accum_steps=1,
      offset_noise=0.0,
      caption_dropout=0.0,  # probability of training an example on the empty prompt (classifier-free guidance)
      snr_gamma=0.0,  # min-SNR-gamma weighting; 0 disables it
      ema_decay=0.0,  # EMA of the trainable weights; 0 disables it
      cache_latents=False,  # encode images once (needs center crops and no flips)
      cache_text_embeddings=False,  # encode prompts once (needs a frozen text encoder)
      nan_policy='stop',  # 'stop' the run, or 'skip' the step
      subjects_per_step=0,  # lora.per_subject: subjects trained together in one step (0: all)
      optimizer='adamw',  # or 'adafactor' (factored second moments, no first moment)
      optimizer_state_dtype='float32',  # 'bfloat16': AdamW's first moment in bfloat16
      remat='none',  # none, attention, blocks, full: activations recomputed in the backward pass (nn/remat.py)
    )
  )
  c.lora = ml_collections.ConfigDict(
    dict(
      rank=0,  # 0: full fine-tuning (no adapters)
      alpha=0.0,  # 0: the rank (scale 1)
      rslora=False,
      init='kaiming_uniform',
      unet_targets=['to_q', 'to_k', 'to_v', 'to_out.0'],
      text_encoder=False,
      text_encoder_targets=['q_proj', 'k_proj', 'v_proj', 'out_proj'],
      conv_rank=0,  # > 0: LoCon on the UNet's resnet convolutions too
      conv_alpha=0.0,  # 0: lora.alpha
      conv_targets=['conv1', 'conv2', 'conv_shortcut'],  # only layers under `resnets`
      per_subject=False,
      export_kohya=False,
      export_merged=False,
    )
  )
  c.vae = vae_group()
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, keep=3, async_save=True, resume_step=0))
  c.logging = ml_collections.ConfigDict(dict(every_steps=10, tensorboard=True, wandb=False, wandb_project='jaxdream'))
  c.validation = ml_collections.ConfigDict(
    dict(
      every_steps=0,  # 0: only at the end
      prompts=[],
      negative_prompt='',
      num_images=2,
      steps=25,
      guidance_scale=7.5,
      seed=0,
      scheduler='',
      metrics=False,  # DreamBench's DINO, CLIP-I and CLIP-T of each concept's validation images
      clip_model='',  # a local CLIPModel folder (e.g. openai/clip-vit-base-patch32), for validation.metrics
      dino_model='',  # a local DINO ViTModel folder (e.g. facebook/dino-vits16), for validation.metrics
    )
  )
  c.mesh = ml_collections.ConfigDict(
    dict(
      data=-1,
      fsdp=1,
      tensor=1,
      # logical axis -> mesh axis (models name logical axes only; see jaxdream/sharding.py). Empty by
      # default (data + FSDP suit DreamBooth's model sizes); jaxdream.distributed.sharding.TENSOR_RULES shards
      # paired column/row-parallel layers (attention heads, feed-forward, ResNet inner channels) over 'tensor'.
      rules=(),
      fsdp_min_size=1024,  # parameters with fewer elements stay whole under FSDP
    )
  )
  return c


def vae_group() -> ml_collections.ConfigDict:
  """task='vae': what an AutoencoderKL is trained on and with which loss (training/vae.py)."""
  return ml_collections.ConfigDict(
    dict(
      data_dir='',  # image folder, searched recursively
      recon_loss='l1',  # or 'l2'
      kl_weight=1e-6,  # weight of KL(posterior || N(0, I)), as LDM's autoencoders
      sample_posterior=True,  # decode a posterior sample (False: its mean)
    )
  )


MAX_RESOLUTION = 4096  # training images' side, pixels: larger is a typo (SDXL trains at 1024)

# One line per config key for `jaxdream train --help` (tests check that every key has one).
KEY_DOCS = {
  'task': "'dreambooth' (fine-tune a Stable Diffusion model) or 'vae' (train an AutoencoderKL: the vae.* keys)",
  'model': "diffusers-format model folder (SD 1.x/2.x; task='vae': also an AutoencoderKL folder), or "
  + '; '.join(f"'{name}' ({what})" for name, what in BUILTIN_MODELS.items()),
  'vae_model': "an AutoencoderKL folder (or a diffusers model folder: its vae/) replacing the model's VAE, e.g. "
  "a task='vae' run's workdir/vae; it stays frozen and is exported with the model",
  'allow_pickle': 'also load .bin/.ckpt weights (unpickling can run code)',
  'seed': 'seed of noise, timesteps, data order and class images',
  'resolution': 'training image size in pixels (a multiple of 8)',
  'compute_dtype': "'float32' or 'bfloat16' (parameters stay float32)",
  'attention': "attention implementation: 'auto' (training: 'flash'), 'xla', 'cudnn', 'tiled' or 'flash'",
  'resume_override': 'resume even if the run-defining config changed',
  'concepts.N.name': "the subject's name, [A-Za-z0-9_.-] (default: instance_dir's folder name); names LoRA files",
  'concepts.N.instance_dir': 'folder of photos of the subject (N: 0 for the first concept)',
  'concepts.N.instance_prompt': 'prompt of those photos; contains the identifier, e.g. "a photo of sks dog"',
  'concepts.N.class_prompt': 'prompt of the class-prior images, e.g. "a photo of dog"',
  'concepts.N.class_dir': 'folder of class-prior images (generated when short); {workdir} is replaced',
  'concepts.N.num_class_images': 'class-prior images to use (and make if missing)',
  'concepts.N.identifier': "the rare token naming the subject ('': none, the prompt is a plain caption: "
  'text-to-image training, as configs/tiny_base_pretrain.py)',
  'data.concepts_file': 'JSON list of concepts (same keys as concepts), for many subjects',
  'data.center_crop': 'True: centre crops; False: random crops',
  'data.flip_p': 'probability of a horizontal flip',
  'data.caption_ext': 'per-image caption sidecars: photo.jpg + photo.txt',
  'data.caption_mode': "'append' a sidecar caption to the instance prompt, or 'replace' it",
  'data.on_bad_image': "'fail' on a bad image, or 'skip' it with a warning",
  'data.on_bad_subject': "lora.per_subject: 'fail' on a subject with unusable photos, or 'skip' it "
  '(named in workdir/loras/skipped.json) and train the others',
  'data.min_instance_images': 'fewest usable photos per concept',
  'data.min_image_size': 'smaller images (pixels) are reported as bad',
  'prior.enabled': 'prior preservation: train on class images too',
  'prior.loss_weight': 'weight of the class-image loss',
  'prior.sample_steps': 'sampler steps per generated class image',
  'prior.guidance_scale': 'classifier-free guidance of generated class images',
  'prior.scheduler': "sampler of class images ('': the model's)",
  'prior.batch_size': 'class images generated at once',
  'train.num_steps': 'training steps (batches) in all, a resumed run continuing to this; with grad_accum_steps k, '
  'num_steps / k optimizer updates',
  'train.batch_size': 'instance examples per step; as many prior examples come on top',
  'train.learning_rate': 'learning rate of the UNet',
  'train.train_text_encoder': 'also train the text encoder',
  'train.text_encoder_learning_rate': 'learning rate of the text encoder',
  'train.param_groups': 'NAME.pattern (regex over unet/... and text_encoder/... paths) and NAME.learning_rate',
  'train.lr_schedule': "'constant', 'warmup_constant' or 'cosine'",
  'train.warmup_steps': 'linear warmup steps',
  'train.adam_b1': 'AdamW beta1',
  'train.adam_b2': 'AdamW beta2',
  'train.adam_eps': 'AdamW epsilon',
  'train.weight_decay': 'AdamW weight decay',
  'train.max_grad_norm': 'global gradient clipping (0 disables it)',
  'train.grad_accum_steps': 'batches accumulated per optimizer step',
  'train.offset_noise': 'offset noise strength (0 disables it)',
  'train.caption_dropout': 'probability of an example trained on the empty prompt, which classifier-free guidance '
  'samples against (0: never; pretraining uses ~0.1)',
  'train.snr_gamma': 'min-SNR-gamma loss weighting (0 disables it)',
  'train.ema_decay': 'EMA of the trainable weights, exported instead of them (0 disables it)',
  'train.cache_latents': 'encode every image once (needs centre crops and no flips)',
  'train.cache_text_embeddings': 'encode every prompt once (needs a frozen text encoder)',
  'train.nan_policy': "on a non-finite loss: 'stop' the run, or 'skip' the step",
  'train.subjects_per_step': 'lora.per_subject: subjects trained together in one step, groups one after '
  'another (0: all subjects in one group)',
  'train.optimizer': "'adamw' or 'adafactor' (optax; factored second moments: almost no optimizer memory)",
  'train.optimizer_state_dtype': "'float32' or 'bfloat16' (AdamW's first moment in bfloat16: 6 bytes of "
  'state per parameter instead of 8)',
  'train.remat': "activations recomputed in the backward pass instead of kept: 'none', 'attention' (scores), "
  "'blocks' (all but each block's inputs and weight products) or 'full' (all but each block's inputs)",
  'lora.rank': 'LoRA rank: > 0 trains adapters instead of the model (0: full fine-tuning)',
  'lora.alpha': 'LoRA alpha: the update is scaled by alpha / rank (0: the rank, scale 1)',
  'lora.rslora': 'rank-stabilised LoRA: scale alpha / sqrt(rank)',
  'lora.init': "init of the adapters' down factor: 'kaiming_uniform' (peft, kohya) or 'gaussian' (diffusers)",
  'lora.unet_targets': "UNet Linear layers to adapt, by peft's rule (a full name or its last dotted parts)",
  'lora.text_encoder': 'also adapt the text encoder (with its own learning rate)',
  'lora.text_encoder_targets': 'text-encoder Linear layers to adapt',
  'lora.conv_rank': "LoCon rank of the UNet's resnet convolutions (0: none)",
  'lora.conv_alpha': 'LoCon alpha (0: lora.alpha)',
  'lora.conv_targets': 'resnet convolutions to adapt (only layers under resnets)',
  'lora.per_subject': 'one adapter per concept (see concepts.N.name)',
  'lora.export_kohya': 'also write the adapters in the kohya/A1111 layout, workdir/loras/NAME.safetensors',
  'lora.export_merged': 'also write workdir/model: the base with the adapters merged in (a plain diffusers model)',
  'vae.data_dir': "task='vae': the training images' folder (searched recursively)",
  'vae.recon_loss': "task='vae': reconstruction loss, 'l1' or 'l2' (mean over pixels)",
  'vae.kl_weight': "task='vae': weight of the KL divergence of the posterior from N(0, I)",
  'vae.sample_posterior': "task='vae': decode a posterior sample (False: the posterior mean)",
  'checkpoint.every_steps': 'save a checkpoint every this many steps',
  'checkpoint.keep': 'checkpoints kept (the newest ones)',
  'checkpoint.async_save': 'write checkpoints in the background',
  'checkpoint.resume_step': 'resume from this saved step (0: the newest readable one); newer ones are moved aside',
  'logging.every_steps': 'log scalars every this many steps',
  'logging.tensorboard': 'write TensorBoard event files to workdir/tensorboard',
  'logging.wandb': 'also log to Weights & Biases',
  'logging.wandb_project': 'Weights & Biases project',
  'validation.every_steps': "sample validation images (task='vae': reconstructions) every this many steps (0: only "
  'at the end)',
  'validation.prompts': "validation prompts (default: each concept's instance and class prompts)",
  'validation.negative_prompt': 'negative prompt of validation images',
  'validation.num_images': "images per validation prompt (0: no validation samples); task='vae': dataset images "
  'reconstructed',
  'validation.steps': 'sampler steps of validation images',
  'validation.guidance_scale': 'classifier-free guidance of validation images',
  'validation.seed': 'seed of validation images',
  'validation.scheduler': "sampler of validation images ('': the model's)",
  'validation.metrics': "score each validation: DreamBench's DINO, CLIP-I and CLIP-T of the images of prompts with a "
  "concept's identifier against its photos (TensorBoard validation/*, samples/metrics.json; docs/evaluation.md)",
  'validation.clip_model': 'CLIPModel folder (transformers format) of validation.metrics: CLIP-I and CLIP-T',
  'validation.dino_model': 'DINO ViTModel folder (transformers format) of validation.metrics',
  'mesh.data': 'devices on the data axis (-1: all that are left)',
  'mesh.fsdp': 'devices on the FSDP axis (parameters split over them)',
  'mesh.tensor': 'devices on the tensor axis',
  'mesh.rules': 'logical axis -> mesh axis rules (see jaxdream/distributed/sharding.py)',
  'mesh.fsdp_min_size': 'parameters with fewer elements stay whole under FSDP',
}


def config_keys(config) -> list[tuple[str, object]]:
  """Every settable key of `config` with its value, dotted; a list of concepts as concepts.N.KEY (its
  first element's values)."""
  out = []

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict) and value.keys():
        walk(value, f'{prefix}{key}.')
      elif key == 'concepts':
        walk(value[0] if value else concept(), f'{prefix}{key}.N.')
      else:
        out.append((prefix + key, value))

  walk(config, '')
  return out


# Keys that define what the run computes: resuming with any of these changed is refused.
RUN_DEFINING = (
  'task',
  'vae',  # only with task='vae' (see run_defining)
  'model',
  'vae_model',
  'seed',
  'resolution',
  'concepts',
  'data',
  'prior.enabled',
  'prior.loss_weight',
  'train.batch_size',
  'train.learning_rate',
  'train.train_text_encoder',
  'train.text_encoder_learning_rate',
  'train.param_groups',
  'train.lr_schedule',
  'train.warmup_steps',
  'train.adam_b1',
  'train.adam_b2',
  'train.adam_eps',
  'train.weight_decay',
  'train.max_grad_norm',
  'train.grad_accum_steps',
  'train.offset_noise',
  'train.caption_dropout',
  'train.snr_gamma',
  'train.ema_decay',
  'train.optimizer',
  'train.optimizer_state_dtype',
  # Only with lora.rank > 0 (see run_defining): checkpoints of full fine-tuning runs made before LoRA existed
  # stay resumable.
  'lora.rank',
  'lora.alpha',
  'lora.rslora',
  'lora.init',
  'lora.unet_targets',
  'lora.text_encoder',
  'lora.text_encoder_targets',
  'lora.conv_rank',
  'lora.conv_alpha',
  'lora.conv_targets',
  'lora.per_subject',
)

# Run-defining keys added after runs were checkpointed: left out at their default value, so that those
# checkpoints stay resumable.
_LEFT_OUT_AT_DEFAULT = {
  'task': 'dreambooth',
  'vae_model': '',
  'train.optimizer': 'adamw',
  'train.optimizer_state_dtype': 'float32',
  'train.caption_dropout': 0.0,
}

_CHOICES = {
  'task': ('dreambooth', 'vae'),
  'vae.recon_loss': ('l1', 'l2'),
  'compute_dtype': ('float32', 'bfloat16'),
  'attention': IMPLEMENTATIONS,
  'data.caption_mode': ('append', 'replace'),
  'data.on_bad_image': ('fail', 'skip'),
  'data.on_bad_subject': ('fail', 'skip'),
  'train.lr_schedule': ('constant', 'warmup_constant', 'cosine'),
  'train.nan_policy': ('stop', 'skip'),
  'train.remat': REMAT,
  'train.optimizer': ('adamw', 'adafactor'),
  'train.optimizer_state_dtype': ('float32', 'bfloat16'),
  'lora.init': ('kaiming_uniform', 'gaussian'),
}


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config


def load_concepts(config) -> list[dict]:
  """The run's concepts: `concepts` plus those listed in `data.concepts_file`."""
  out = [dict(c) for c in config.concepts if c.instance_dir]
  if config.data.concepts_file:
    try:
      with open(config.data.concepts_file, encoding='utf-8') as f:
        listed = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise RunConfigError(f'data.concepts_file {config.data.concepts_file}: not a readable JSON file ({e})') from None
    if not isinstance(listed, list) or not all(isinstance(item, dict) for item in listed):
      raise RunConfigError(
        f'data.concepts_file {config.data.concepts_file}: expected a JSON list of concepts (objects)'
      )
    defaults = dict(concept())
    for i, item in enumerate(listed):
      unknown = set(item) - set(defaults)
      if unknown:
        raise RunConfigError(
          f'{config.data.concepts_file}: concept {i} has unknown keys {sorted(unknown)} (known: {sorted(defaults)})'
        )
      for key, value in item.items():  # the JSON types the config's own concepts have
        want = type(defaults[key])
        if not isinstance(value, want) or isinstance(value, bool):
          raise RunConfigError(
            f'{config.data.concepts_file}: concept {i} {key}={value!r} must be a {want.__name__} '
            f'(e.g. {defaults[key]!r})'
          )
      out.append({**defaults, **item})
  for c in out:
    c['name'] = c['name'] or default_name(c['instance_dir'])
  return out


NAME = re.compile(r'[A-Za-z0-9_.-]+')


def default_name(instance_dir: str) -> str:
  """A concept's name when none is given: its photo folder's name, other characters replaced by '_'."""
  base = os.path.basename(os.path.normpath(instance_dir)) if instance_dir else ''
  return re.sub(r'[^A-Za-z0-9_.-]', '_', base).strip('.') or 'subject'


def adapter_name(concepts) -> str:
  """The name of a run's single adapter: its concept's, or the first one's + the count of the others."""
  first = concepts[0]['name']
  return first if len(concepts) == 1 else f'{first}+{len(concepts) - 1}'


def _lora_problems(config) -> list[str]:
  """LoRA settings that cannot work, found without the model (targets are checked on it once loaded)."""
  lo, t = config.lora, config.train
  problems = [
    f'lora.{key} must not be negative, got {lo[key]}'
    for key in ('rank', 'alpha', 'conv_rank', 'conv_alpha')
    if lo[key] < 0
  ]
  if t.subjects_per_step < 0:
    problems.append(f'train.subjects_per_step must not be negative, got {t.subjects_per_step}')
  if not lo.per_subject:
    for key, default in (('train.subjects_per_step', 0), ('data.on_bad_subject', 'fail')):
      if _get(config, key) != default:
        problems.append(f'{key}={_get(config, key)!r} needs lora.per_subject=True')
  # Settings that would do nothing: changed from their defaults, they are refused, not ignored.
  default = base_config().lora
  unused = [] if lo.rank > 0 else ['alpha', 'rslora', 'init', 'unet_targets']
  unused += [] if lo.text_encoder else ['text_encoder_targets']
  unused += [] if lo.conv_rank > 0 else ['conv_alpha', 'conv_targets']
  needs = {'text_encoder_targets': 'lora.text_encoder=True', 'conv_alpha': 'lora.conv_rank > 0'}
  needs['conv_targets'] = needs['conv_alpha']
  for key in unused:
    value, usual = lo[key], default[key]
    if isinstance(usual, list | tuple):
      value, usual = list(value), list(usual)
    if value != usual and not (key in ('alpha', 'conv_alpha') and value < 0):  # negative: named above
      problems.append(f'lora.{key}={lo[key]!r} does nothing without {needs.get(key, "lora.rank > 0")}')
  if lo.per_subject and lo.export_merged:
    problems.append(
      'lora.export_merged writes one merged model; a per-subject run has an adapter per subject (merge one with '
      '`jaxdream lora merge`)'
    )
  if lo.rank <= 0:
    for key in ('text_encoder', 'conv_rank', 'per_subject', 'export_kohya', 'export_merged'):
      if lo[key]:
        problems.append(f'lora.{key}={lo[key]!r} needs lora.rank > 0 (lora.rank=0 is full fine-tuning)')
    return problems
  if t.train_text_encoder:
    problems.append(
      'train.train_text_encoder trains the whole text encoder, which a LoRA run (lora.rank > 0) neither '
      'trains nor exports: use lora.text_encoder=True for text-encoder adapters'
    )
  if len(t.param_groups):
    problems.append('train.param_groups cannot be combined with lora.rank > 0 (a LoRA run trains only its adapters)')
  for key, needed in (
    ('unet_targets', True),
    ('text_encoder_targets', lo.text_encoder),
    ('conv_targets', lo.conv_rank),
  ):
    if needed and not lo[key]:
      problems.append(f'lora.{key} is empty: name the layers to adapt')
  return problems


# DreamBooth settings that a VAE run has no use for: changed from their defaults, they are refused, not ignored.
_DREAMBOOTH_ONLY = (
  'vae_model',
  'train.caption_dropout',
  'train.train_text_encoder',
  'train.param_groups',
  'train.offset_noise',
  'train.snr_gamma',
  'train.cache_latents',
  'train.cache_text_embeddings',
  'data.concepts_file',
  'lora.rank',
  'lora.per_subject',
)


def _vae_group_problems(config) -> list[str]:
  """Misspelt keys of the vae group (a config file can add keys before the config is locked), and vae
  settings in a run that is not a VAE run (task='vae' forgotten)."""
  known, problems = vae_group(), []
  for key in sorted(set(config.vae.keys()) - set(known.keys())):
    close = difflib.get_close_matches(key, list(known.keys()), n=1)
    hint = f"; did you mean 'vae.{close[0]}'?" if close else f' (known: {", ".join(known.keys())})'
    problems.append(f"unknown config key 'vae.{key}'{hint}")
  changed = [k for k in known.keys() if k in config.vae and config.vae[k] != known[k]]
  if config.task != 'vae' and changed:
    problems.append(f"vae.{changed[0]} is set but task={config.task!r}: set task='vae' to train a VAE")
  return problems


def _vae_problems(config) -> list[str]:
  """A VAE run's own settings: its image folder and loss, and no DreamBooth setting it would ignore."""
  v, problems = config.vae, []
  if not v.data_dir:
    problems.append('vae.data_dir is empty: give the folder of training images')
  elif not os.path.isdir(v.data_dir):
    problems.append(f'vae.data_dir={v.data_dir!r} does not exist')
  if v.kl_weight < 0:
    problems.append(f'vae.kl_weight must not be negative, got {v.kl_weight}')
  defaults = base_config()
  for key in _DREAMBOOTH_ONLY:
    value, default = _get(config, key), _get(defaults, key)
    if isinstance(default, ml_collections.ConfigDict):  # as dicts: a locked ConfigDict never equals an unlocked one
      value, default = value.to_dict(), default.to_dict()
    if value != default:
      problems.append(f"{key}={value!r} is a DreamBooth setting that task='vae' does not use")
  return problems


def _metric_model_problems(config) -> list[str]:
  """validation.metrics' scoring model folders, checked from their configs alone (a CLIP folder given as DINO's
  is named here, not at the first validation)."""
  from jaxdream.models import CLIPModel, ConfigError, ViTModel, WeightsError, check_component

  problems = []
  if config.task != 'dreambooth' or not config.validation.num_images:
    problems.append(
      'validation.metrics scores validation images: it needs a DreamBooth run with validation.num_images > 0'
    )
  for key, cls in (('clip_model', CLIPModel), ('dino_model', ViTModel)):
    path = config.validation[key]
    if not path:
      problems.append(f'validation.metrics needs validation.{key} (a local {cls.CLASS_NAME} folder)')
    elif not os.path.isdir(path):
      problems.append(f'validation.{key}={path!r}: no such folder')
    else:
      try:
        check_component(cls, path)
      except (ConfigError, WeightsError) as e:
        problems.append(f'validation.{key}: {e}')
  return problems


def validate(config) -> list[dict]:
  """Check a run config; return its concepts (none for task='vae'). Raises RunConfigError listing every problem."""
  problems = []
  for key, choices in _CHOICES.items():
    if _get(config, key) not in choices:
      problems.append(f'{key}={_get(config, key)!r}: choose one of {choices}')
  if not config.model:
    problems.append(f'model is empty: give a diffusers model folder (or one of {", ".join(BUILTIN_MODELS)})')
  elif config.model.startswith('builtin:') and config.model not in BUILTIN_MODELS:
    problems.append(f'model={config.model!r}: no such built-in model; built-in models: {", ".join(BUILTIN_MODELS)}')
  elif config.model not in BUILTIN_MODELS and not os.path.isfile(os.path.join(config.model, 'model_index.json')):
    if config.task != 'vae':
      problems.append(f'model={config.model!r}: not a diffusers model folder (no model_index.json)')
    elif not os.path.isfile(os.path.join(config.model, 'config.json')):
      problems.append(
        f'model={config.model!r}: neither a diffusers model folder (model_index.json) nor an AutoencoderKL folder '
        '(config.json)'
      )
  for key in (
    'resolution',
    'train.num_steps',
    'train.batch_size',
    'train.grad_accum_steps',
    'checkpoint.every_steps',
    'checkpoint.keep',
    'logging.every_steps',
    'validation.steps',
    'prior.sample_steps',
    'prior.batch_size',
  ):
    if _get(config, key) < 1:
      problems.append(f'{key} must be at least 1, got {_get(config, key)}')
  if config.checkpoint.resume_step < 0:
    problems.append(f'checkpoint.resume_step must not be negative, got {config.checkpoint.resume_step}')
  if config.validation.num_images < 0:
    problems.append(f'validation.num_images must not be negative (0: no samples), got {config.validation.num_images}')
  if config.validation.metrics:
    problems += _metric_model_problems(config)
  if config.resolution % 8:
    problems.append(f'resolution must be a multiple of 8, got {config.resolution}')
  if config.resolution > MAX_RESOLUTION:  # before every photo is resized to it
    problems.append(f'resolution {config.resolution} is above {MAX_RESOLUTION} pixels')
  t = config.train
  for key in (
    'learning_rate',
    'text_encoder_learning_rate',
    'weight_decay',
    'max_grad_norm',
    'offset_noise',
    'snr_gamma',
    'warmup_steps',
  ):
    if not 0 <= t[key] < float('inf'):  # NaN too
      problems.append(f'train.{key} must be a finite number, not negative, got {t[key]}')
  if t.num_steps < t.grad_accum_steps or t.num_steps % t.grad_accum_steps:
    # optax.MultiSteps updates every grad_accum_steps steps: the rest would compute gradients and never apply them
    problems.append(
      f'train.num_steps={t.num_steps} must be a multiple of train.grad_accum_steps={t.grad_accum_steps} (each '
      'update takes that many steps; the steps after the last whole update would be lost)'
    )
  for key in ('validation.scheduler', 'prior.scheduler'):
    if _get(config, key) and _get(config, key) not in SCHEDULER_NAMES:
      problems.append(f"{key}={_get(config, key)!r}: choose one of {SCHEDULER_NAMES} ('' for the model's own)")
  if config.data.min_instance_images < 1:
    problems.append(f'data.min_instance_images must be at least 1, got {config.data.min_instance_images}')
  for key in ('adam_b1', 'adam_b2'):
    if not 0.0 <= t[key] < 1.0:
      problems.append(f'train.{key} is a decay rate, in [0, 1), got {t[key]}')
  if not t.adam_eps > 0:
    problems.append(f'train.adam_eps must be above 0, got {t.adam_eps}')
  if not 0.0 <= config.data.flip_p <= 1.0:
    problems.append(f'data.flip_p is a probability, in [0, 1], got {config.data.flip_p}')
  if not config.prior.loss_weight >= 0:
    problems.append(f'prior.loss_weight must be a number, not negative, got {config.prior.loss_weight}')
  if t.optimizer == 'adafactor' and t.optimizer_state_dtype != 'float32':
    problems.append(
      "train.optimizer_state_dtype='bfloat16' makes AdamW's first moment bfloat16; adafactor has none "
      "(its factored state is already small): use train.optimizer_state_dtype='float32'"
    )
  if not 0.0 <= t.caption_dropout < 1.0:
    problems.append(f'train.caption_dropout must be in [0, 1), got {t.caption_dropout}')
  if config.vae_model and not any(
    os.path.isfile(os.path.join(config.vae_model, *p)) for p in (('config.json',), ('vae', 'config.json'))
  ):
    problems.append(
      f'vae_model={config.vae_model!r}: neither an AutoencoderKL folder (config.json) nor a diffusers model folder '
      'with a vae/'
    )
  if not 0.0 <= t.ema_decay < 1.0:
    problems.append(f'train.ema_decay must be in [0, 1), got {t.ema_decay}')
  problems += _vae_group_problems(config)
  if config.task == 'vae':
    problems += _vae_problems(config)
    concepts = []
  else:
    found, concepts = _dreambooth_problems(config)
    problems += found
  if problems:
    raise RunConfigError('the config has problems:\n  - ' + '\n  - '.join(problems))
  return concepts


def _dreambooth_problems(config) -> tuple[list[str], list[dict]]:
  """(problems, concepts) of a DreamBooth run's own settings: caching, parameter groups, LoRA, concepts."""
  problems, t = [], config.train
  if t.cache_latents and (not config.data.center_crop or config.data.flip_p > 0):
    problems.append(
      'train.cache_latents needs data.center_crop=True and data.flip_p=0 '
      '(cached latents cannot follow random crops or flips)'
    )
  if t.cache_text_embeddings and (
    t.train_text_encoder
    or (config.lora.rank > 0 and config.lora.text_encoder)
    or any('text_encoder' in g.pattern for g in t.param_groups.values() if isinstance(g, ml_collections.ConfigDict))
  ):
    problems.append(
      'train.cache_text_embeddings needs a frozen text encoder (train.train_text_encoder=False, '
      'lora.text_encoder=False and no param_groups over text_encoder/)'
    )
  if t.caption_dropout > 0 and (t.cache_text_embeddings or config.lora.per_subject):
    problems.append(
      'train.caption_dropout needs train.cache_text_embeddings=False and lora.per_subject=False (it drops '
      "captions as the run's batches are read)"
    )
  for name, group in t.param_groups.items():
    if not isinstance(group, ml_collections.ConfigDict) or set(group.keys()) != {'pattern', 'learning_rate'}:
      problems.append(f'train.param_groups.{name} needs exactly pattern and learning_rate')
      continue
    try:
      re.compile(group.pattern)
    except re.error as e:
      problems.append(f'train.param_groups.{name}.pattern is not a valid regex ({e})')
    if re.match(group.pattern, 'vae/') or group.pattern.startswith('vae') or group.pattern.startswith('^vae'):
      problems.append(f'train.param_groups.{name}: the VAE is always frozen')
  problems += _lora_problems(config)
  try:
    concepts = load_concepts(config)
  except (OSError, json.JSONDecodeError, RunConfigError) as e:
    problems.append(str(e))
    concepts = []
  if not concepts:
    problems.append('no concepts: set concepts[0].instance_dir (or data.concepts_file)')
  names = [c['name'] for c in concepts]
  for i, c in enumerate(concepts):
    where = f'concept {i} ({c["instance_dir"]})'
    if not NAME.fullmatch(c['name']) or c['name'] in ('.', '..'):
      problems.append(f'{where}: name {c["name"]!r} may only use letters, digits, _ . and - (concepts.{i}.name)')
    elif c['name'] == 'skipped.json':  # loras/NAME/ beside per-subject runs' loras/skipped.json
      problems.append(f'{where}: the name skipped.json is taken by the run (concepts.{i}.name)')
    elif config.lora.rank > 0 and names.index(c['name']) != i:  # names name adapter files
      problems.append(
        f"{where}: name {c['name']!r} is also concept {names.index(c['name'])}'s: give each a distinct concepts.N.name"
      )
    if not os.path.isdir(c['instance_dir']):
      problems.append(f'{where}: instance_dir does not exist')
    ident = c['identifier']
    if not ident:  # no identifier: a captioned text-to-image concept (pretraining)
      if not c['instance_prompt'].strip():
        problems.append(
          f'{where}: instance_prompt is empty (without an identifier it is the caption of images without a sidecar)'
        )
    elif not re.search(rf'(^|\W){re.escape(ident)}(\W|$)', c['instance_prompt']):
      problems.append(
        f'{where}: instance_prompt {c["instance_prompt"]!r} must contain the identifier '
        f'{ident!r} (e.g. "a photo of {ident} dog")'
      )
    if config.prior.enabled:
      if not c['class_prompt']:
        problems.append(f'{where}: class_prompt is empty (needed for prior preservation)')
      elif ident and re.search(rf'(^|\W){re.escape(ident)}(\W|$)', c['class_prompt']):
        problems.append(f'{where}: class_prompt {c["class_prompt"]!r} must not contain the identifier')
      if not c['class_dir']:
        problems.append(f'{where}: class_dir is empty (class images are generated there)')
      if c['num_class_images'] < 1:
        problems.append(f'{where}: num_class_images must be at least 1')
  return problems, concepts


def run_defining(config) -> dict:
  """The part of a config that a resumed run must share with the checkpoint."""
  d = json.loads(config.to_json_best_effort())
  for c in d['concepts']:  # an unset name (the default) as before names existed
    if not c.get('name'):
      c.pop('name', None)
  out = {}
  for key in RUN_DEFINING:
    if (key.startswith('lora.') and config.lora.rank <= 0) or (key == 'vae' and config.task != 'vae'):
      continue
    node = d
    for part in key.split('.'):
      node = node[part]
    if key in _LEFT_OUT_AT_DEFAULT and node == _LEFT_OUT_AT_DEFAULT[key]:
      continue
    out[key] = node
  if config.data.concepts_file:  # the subjects it lists, not only its path: an edited file is changed data
    out[CONCEPTS_FILE_KEY] = load_concepts(config)[sum(1 for c in config.concepts if c.instance_dir) :]
  if config.task != 'vae':
    out[PHOTOS_KEY] = photo_record(load_concepts(config), config.data.caption_ext)
  return out


CONCEPTS_FILE_KEY = 'data.concepts_file (its concepts)'
PHOTOS_KEY = 'instance photos (name, bytes, caption bytes)'


def photo_record(concepts, caption_ext: str) -> list[list]:
  """Each concept's photos as [file name, size, caption sidecar size or -1]: a photo added, removed or replaced,
  or an edited caption, is changed data (sizes, not times: a copied dataset is the same data)."""
  from jaxdream.io.images import list_images

  def size(path):
    return os.path.getsize(path) if os.path.isfile(path) else -1

  out = []
  for c in concepts:
    folder = c['instance_dir']
    files = list_images(folder) if os.path.isdir(folder) else []
    out.append([[os.path.basename(p), size(p), size(os.path.splitext(p)[0] + caption_ext)] for p in files])
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  keys = set(saved) | set(current)
  for key in (CONCEPTS_FILE_KEY, PHOTOS_KEY):
    if key not in saved:  # a checkpoint from before these were recorded
      keys.discard(key)
  return [
    f'{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}'
    for k in sorted(keys)
    if saved.get(k) != current.get(k)
  ]
