"""A Stable Diffusion (1.x, 2.x, XL) model folder in diffusers format: its named components, loading them, writing
them back."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxdream import models
from jaxdream.diffusion import sdxl
from jaxdream.diffusion.conditioning import encode_prompt as sd_encode_prompt
from jaxdream.diffusion.conditioning import no_micro_conditioning, tokenizer_folder
from jaxdream.io import prompt_syntax
from jaxdream.io.files import atomic_write
from jaxdream.io.tokenizer import load_tokenizer, tokenize, write_clip_tokenizer
from jaxdream.io.weights import read_weights_file, state_dict, torch_slots, write_safetensors
from jaxdream.models import (
  AutoencoderKL,
  CLIPTextModel,
  CLIPTextModelWithProjection,
  UNet2DConditionModel,
  WeightsError,
  presets,
  single_file,
)
from jaxdream.runtime import CallbackRegistry, CompileCache

# Folders every Stable Diffusion model folder has, besides its text encoders (text_encoder, text_encoder_2, ...: at
# least one) and their tokenizers.
REQUIRED = ('unet', 'vae', 'scheduler')
# The model classes a model_index.json may name, with the library whose format they are written in.
# Other entries (safety_checker, feature_extractor, ...) are not loaded.
MODEL_CLASSES = {
  'UNet2DConditionModel': ('diffusers', UNet2DConditionModel),
  'AutoencoderKL': ('diffusers', AutoencoderKL),
  'CLIPTextModel': ('transformers', CLIPTextModel),
  'CLIPTextModelWithProjection': ('transformers', CLIPTextModelWithProjection),
}
# The class of each component a single-file checkpoint holds.
SINGLE_FILE_CLASSES = {
  'unet': UNet2DConditionModel,
  'vae': AutoencoderKL,
  'text_encoder': CLIPTextModel,
  'text_encoder_2': CLIPTextModelWithProjection,
}
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
_MODEL_INDEX = {
  '_class_name': 'StableDiffusionPipeline',
  '_diffusers_version': '0.35.0',
  'feature_extractor': [None, None],
  'safety_checker': [None, None],
  'requires_safety_checker': False,
  'image_encoder': [None, None],
}


@dataclasses.dataclass
class Pipeline:
  """A diffusion model as its named components, in order (unet, text_encoder, vae, ...; each also an
  attribute: `pipeline.unet`), a tokenizer per text encoder, the scheduler config, and how its UNet is conditioned
  (diffusion/conditioning.py): `encode_prompt` turns token ids into UNet conditioning, `micro_conditioning` gives
  the UNet inputs that do not come from the prompt, and `force_zeros_for_empty_prompt` (SDXL) makes the negative
  half of a guided batch zeros when no negative prompt is given. `pipeline_class` is model_index.json's
  `_class_name`. The pipeline owns its compiled functions (`compiled`) and the registry through which they reach
  each call's progress callback (`callbacks`)."""

  components: dict  # name -> nnx.Module
  tokenizers: dict  # text encoder name -> tokenizer
  scheduler_config: dict
  path: str | None = None
  encode_prompt: Callable = sd_encode_prompt
  micro_conditioning: Callable = no_micro_conditioning
  force_zeros_for_empty_prompt: bool = False
  pipeline_class: str = 'StableDiffusionPipeline'
  compiled: CompileCache = dataclasses.field(default_factory=CompileCache, init=False, repr=False, compare=False)
  callbacks: CallbackRegistry = dataclasses.field(
    default_factory=CallbackRegistry, init=False, repr=False, compare=False
  )

  def __getattr__(self, name):
    components = self.__dict__.get('components') or {}
    if name in components:
      return components[name]
    raise AttributeError(f'{type(self).__name__} has no attribute or component {name!r}')

  @property
  def tokenizer(self):
    """The first text encoder's tokenizer."""
    return next(iter(self.tokenizers.values()))

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.downsampling_factor

  @property
  def default_size(self) -> tuple[int, int]:
    """Default image (height, width): the UNet's sample size times the VAE factor."""
    s = self.unet.config.get('sample_size') or 64
    h, w = (s, s) if isinstance(s, int) else s
    return h * self.vae_scale_factor, w * self.vae_scale_factor

  def tokenize(self, prompts) -> dict[str, np.ndarray]:
    """Token ids per text encoder: {'text_encoder': (B, L) int32, ...}, what `encode_prompt` reads."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return {name: tokenize(tok, prompts) for name, tok in self.tokenizers.items()}

  def tokenize_chunks(
    self, prompts, syntax: str = 'plain', num_chunks: int = 0
  ) -> tuple[dict, dict | None, np.ndarray]:
    """Token ids per text encoder in chunks {'text_encoder': (B, K, L) int32, ...}, the per-token weights in the
    same form (None for plain prompts) and each prompt's own number of chunks (B,), for
    `conditioning.encode_chunks`. 'plain': one chunk, truncated to the tokenizer's length, as diffusers; 'a1111':
    A1111's emphasis syntax and prompts of any length (io/prompt_syntax.py), at least `num_chunks` chunks."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if prompt_syntax.check_syntax(syntax) == 'plain':
      return {name: ids[:, None] for name, ids in self.tokenize(prompts).items()}, None, np.ones(len(prompts), np.int32)
    chunked = {name: prompt_syntax.tokenize_chunks(tok, prompts, num_chunks) for name, tok in self.tokenizers.items()}
    counts = [c for _, _, c in chunked.values()]
    if any((c != counts[0]).any() for c in counts):  # the same BPE vocabulary in every published model
      raise ValueError("the model's tokenizers cut the prompt into different chunks: A1111 prompts need one vocabulary")
    return {n: c[0] for n, c in chunked.items()}, {n: c[1] for n, c in chunked.items()}, counts[0]


def load_pipeline(
  path: str,
  *,
  dtype=jnp.float32,
  attention_impl: str = 'auto',
  allow_pickle: bool = False,
  config_dir: str | None = None,
  prediction_type: str | None = None,
  extract_ema: bool = False,
) -> Pipeline:
  """Load a local diffusers-format Stable Diffusion folder (1.x, 2.x, or XL base or refiner: model_index.json's
  `_class_name` says which), or a single-file checkpoint in the original layout (`config_dir`, `extract_ema`: see
  read_model). All configs are checked before any weights are read, so a broken folder fails at once with the
  file to fix. `prediction_type` ('epsilon', 'v_prediction') overrides the scheduler config's."""
  spec = read_model(
    path, allow_pickle=allow_pickle, config_dir=config_dir, prediction_type=prediction_type, extract_ema=extract_ema
  )
  kw = dict(dtype=dtype, attention_impl=attention_impl)
  components = _single_file_components(spec, **kw) if spec.single_file else _folder_components(spec, **kw)
  return Pipeline(
    components=components,
    tokenizers=_tokenizers(spec),
    scheduler_config=spec.scheduler_config,
    path=path,
    **_conditioning(spec.index),
  )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What load_pipeline loads, read from configs (and a single file's key names and shapes) alone: no model is
  built and no weights are read, a single file's tensors being memory-mapped. `configs`: each component's config
  as the folder (or the presets) has it, all checked; `index`: model_index.json's entries (a single file's: those of the published model of its
  type, or of `config_dir`'s); `model_type`: a single file's type as diffusers names it ('v1', 'v2', 'inpainting',
  'xl_base', 'xl_refiner', ...; None for a folder)."""

  path: str
  index: dict
  configs: dict
  scheduler_config: dict
  allow_pickle: bool = False
  model_type: str | None = None
  tensors: dict | None = None  # a single file's (memory-mapped)
  config_dir: str | None = None
  extract_ema: bool = False

  @property
  def single_file(self) -> bool:
    return self.model_type is not None

  @property
  def conditioning(self) -> dict:
    """The Pipeline fields that say how its UNet is conditioned (read_conditioning's)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Pipeline) if f.name in _CONDITIONING_FIELDS}
    return {**defaults, **_conditioning(self.index)}

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(AutoencoderKL.resolve_config(self.configs['vae'])['block_out_channels']) - 1)

  @property
  def default_size(self) -> tuple[int, int]:
    """Pipeline.default_size, from the configs."""
    s = self.configs['unet'].get('sample_size') or 64
    h, w = (s, s) if isinstance(s, int) else s
    return h * self.vae_scale_factor, w * self.vae_scale_factor


def read_model(
  path: str,
  *,
  allow_pickle: bool = False,
  config_dir: str | None = None,
  prediction_type: str | None = None,
  extract_ema: bool = False,
) -> ModelSpec:
  """A model folder's or single file's ModelSpec, with every error load_pipeline gives for bad input: a missing
  folder or file, a broken config, a pickle file (unless `allow_pickle`), a single file whose keys are no known
  layout. A single file (original CompVis/Stability layout, models/single_file.py) has its type inferred from its
  keys; its configs, tokenizers and scheduler come from `config_dir` (a diffusers folder of the same kind of model,
  weights not needed) or else from the published model of that type (models/presets.py, the CLIP vocabulary jaxdream
  ships): nothing is downloaded. `extract_ema` loads its EMA UNet weights."""
  if os.path.isfile(path):
    spec = _read_single_file(path, config_dir=config_dir, extract_ema=extract_ema, allow_pickle=allow_pickle)
  else:
    if config_dir or extract_ema:
      raise ValueError(f'{path}: config_dir and extract_ema are for single-file checkpoints, not model folders')
    spec = _read_folder(path, allow_pickle=allow_pickle)
  if prediction_type:
    config = dict(spec.scheduler_config, prediction_type=_check_prediction_type(prediction_type))
    spec = dataclasses.replace(spec, scheduler_config=config)
  return spec


def _check_prediction_type(value: str) -> str:
  if value not in PREDICTION_TYPES:
    raise ValueError(f'prediction_type {value!r}: expected one of {", ".join(PREDICTION_TYPES)}')
  return value


def _model_classes(index: dict) -> dict:
  """{component: model class} of the model_index.json entries jaxdream loads."""
  return {
    name: MODEL_CLASSES[entry[1]][1]
    for name, entry in index.items()
    if isinstance(entry, list) and len(entry) == 2 and entry[1] in MODEL_CLASSES
  }


def _read_folder(path: str, *, allow_pickle: bool) -> ModelSpec:
  if not os.path.isdir(path):
    raise WeightsError(f'{path}: no such model folder or file')
  index = models.read_config(
    path,
    'model_index.json',
    'a diffusers model folder has model_index.json with unet/, text_encoder/, vae/, tokenizer/, scheduler/ beside it',
  )
  classes = _model_classes(index)
  encoders = [name for name in classes if _is_text_encoder(name)]
  folders = [*REQUIRED, *encoders, *map(tokenizer_folder, encoders)]
  missing = [c for c in folders if not os.path.isdir(os.path.join(path, c))]
  if missing:
    raise WeightsError(f'{path}: missing component folder(s) {", ".join(missing)}')
  unnamed = [c for c in ('unet', 'vae') if c not in classes] + ([] if encoders else ['text_encoder'])
  if unnamed:
    raise WeightsError(
      f'{path}/model_index.json: no supported model class for {", ".join(unnamed)} '
      f'(supported: {", ".join(MODEL_CLASSES)})'
    )
  configs = {name: models.read_config(os.path.join(path, name)) for name in classes}
  for name, cls in classes.items():  # all checked before any weights are read
    cls.resolve_config(configs[name])
  scheduler_config = models.read_config(
    os.path.join(path, 'scheduler'), 'scheduler_config.json', 'the scheduler folder needs scheduler_config.json'
  )
  return ModelSpec(
    path=path, index=index, configs=configs, scheduler_config=scheduler_config, allow_pickle=allow_pickle
  )


def _folder_components(spec: ModelSpec, *, dtype, attention_impl: str) -> dict:
  kw = dict(dtype=dtype, attention_impl=attention_impl, allow_pickle=spec.allow_pickle)
  return {
    name: models.load_component(cls, os.path.join(spec.path, name), **kw)
    for name, cls in _model_classes(spec.index).items()
  }


def _read_single_file(path: str, *, config_dir: str | None, extract_ema: bool, allow_pickle: bool) -> ModelSpec:
  tensors = read_weights_file(path, allow_pickle=allow_pickle)
  model_type = single_file.infer_model_type(tensors)
  layout = single_file.layout_of(model_type)
  if extract_ema:
    single_file.check_ema(tensors, path)
  if config_dir:
    index, configs, scheduler_config = _config_folder(config_dir, layout, model_type, path)
  else:
    configs = single_file.PRESETS[model_type]
    scheduler_config = dict(
      presets.SDXL_SCHEDULER if layout.pipeline_class in sdxl.PIPELINE_CLASSES else presets.SD_SCHEDULER,
      prediction_type=single_file.default_prediction_type(model_type, tensors),
    )
    refiner = model_type == 'xl_refiner'  # as the published refiner's model_index.json
    index = dict(
      _class_name=layout.pipeline_class, requires_aesthetics_score=refiner, force_zeros_for_empty_prompt=not refiner
    )
  configs = {name: configs[name] for name in layout.parts}
  for name in layout.parts:  # all checked before any model is built
    SINGLE_FILE_CLASSES[name].resolve_config(configs[name])
  return ModelSpec(
    path=path,
    index=index,
    configs=configs,
    scheduler_config=scheduler_config,
    allow_pickle=allow_pickle,
    model_type=model_type,
    tensors=tensors,
    config_dir=config_dir,
    extract_ema=extract_ema,
  )


def _single_file_components(spec: ModelSpec, *, dtype, attention_impl: str) -> dict:
  layout = single_file.layout_of(spec.model_type)
  components = {}
  for name in sorted(layout.parts):  # in model_index.json's order, as a folder loads
    prefix, kind = layout.parts[name]
    cls = SINGLE_FILE_CLASSES[name]
    model = models.abstract_model(
      lambda rngs, cls=cls, name=name: cls(spec.configs[name], dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    )
    state = single_file.from_single_file(
      spec.tensors,
      prefix,
      kind,
      cls.resolve_config(spec.configs[name]),
      torch_slots(model),
      extract_ema=spec.extract_ema and name == 'unet',
      source=spec.path,
    )
    models.load_state_dict(model, state, source=f'{spec.path} ({name})')
    components[name] = model
  return components


def _config_folder(config_dir: str, layout, model_type: str, path: str):
  """(model_index, component configs, scheduler config) of a diffusers folder used as the configs of a single file;
  its components must be the file's."""
  index = models.read_config(config_dir, 'model_index.json', 'config_dir must be a diffusers model folder')
  listed = set(_model_classes(index))
  if listed != set(layout.parts):
    raise WeightsError(
      f'{path} is a {model_type} checkpoint with {", ".join(layout.parts)}, but config_dir {config_dir} '
      f'has {", ".join(sorted(listed)) or "no models"}: give the config folder of the same kind of model'
    )
  configs = {name: models.read_config(os.path.join(config_dir, name)) for name in layout.parts}
  scheduler_config = models.read_config(
    os.path.join(config_dir, 'scheduler'), 'scheduler_config.json', 'the scheduler folder needs scheduler_config.json'
  )
  return index, configs, scheduler_config


def _tokenizers(spec: ModelSpec) -> dict:
  """A tokenizer per text encoder: the folder's (a single file's config_dir's), or the bundled ones."""
  encoders = [name for name in spec.configs if _is_text_encoder(name)]
  if spec.single_file and not spec.config_dir:
    return _bundled_tokenizers(single_file.layout_of(spec.model_type))
  folder = spec.config_dir or spec.path
  return {name: load_tokenizer(os.path.join(folder, tokenizer_folder(name))) for name in encoders}


def _bundled_tokenizers(layout) -> dict:
  """The published models' CLIP tokenizers, from the vocabulary jaxdream ships: OpenCLIP's (SD 2.x, SDXL's
  second encoder) pads with '!', CLIP's with the end token."""
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, (_, kind) in layout.parts.items():
      if _is_text_encoder(name):
        folder = os.path.join(tmp, name)
        write_clip_tokenizer(folder, pad_token='!' if kind == 'open_clip' else '<|endoftext|>')
        out[name] = load_tokenizer(folder)
  return out


def read_conditioning(path: str) -> dict:
  """How a model folder's UNet is conditioned, from its model_index.json alone (no weights read): the Pipeline
  fields `pipeline_class`, `encode_prompt`, `micro_conditioning` and `force_zeros_for_empty_prompt`."""
  index = models.read_config(path, 'model_index.json', 'a diffusers model folder has model_index.json')
  return ModelSpec(path=path, index=index, configs={}, scheduler_config={}).conditioning


_CONDITIONING_FIELDS = ('pipeline_class', 'encode_prompt', 'micro_conditioning', 'force_zeros_for_empty_prompt')


def _conditioning(index: dict) -> dict:
  """The Pipeline fields that say how the UNet is conditioned, from model_index.json."""
  name = index.get('_class_name', 'StableDiffusionPipeline')
  if name not in sdxl.PIPELINE_CLASSES:
    return dict(pipeline_class=name)
  return dict(
    encode_prompt=sdxl.encode_prompt,
    micro_conditioning=sdxl.aesthetic_time_ids if index.get('requires_aesthetics_score') else sdxl.size_time_ids,
    force_zeros_for_empty_prompt=bool(index.get('force_zeros_for_empty_prompt', True)),  # diffusers' default
    pipeline_class=name,
  )


def _is_text_encoder(name: str) -> bool:
  return name.startswith('text_encoder')


def save_pipeline(pipeline: Pipeline, path: str, *, weights_dtype=None, single_file: bool = False):
  """Write a diffusers-format folder that diffusers/torch and jaxdream both load; `weights_dtype='float16'`
  stores half-precision weights (loaded back as float32 parameters). `single_file=True` writes one .safetensors
  file in the original CompVis/Stability layout instead (`_save_single_file`).

  Each part is written to a temporary folder first and moved in place, so an interrupted save never
  leaves a half-written model behind a complete-looking model_index.json (which is written last).
  """
  if single_file:
    return _save_single_file(pipeline, path, weights_dtype=weights_dtype)
  unknown = [n for n, m in pipeline.components.items() if getattr(m, 'CLASS_NAME', None) not in MODEL_CLASSES]
  if unknown:
    raise WeightsError(f'cannot save component(s) {", ".join(unknown)}: not one of {", ".join(MODEL_CLASSES)}')
  os.makedirs(path, exist_ok=True)
  index = dict(_MODEL_INDEX, _class_name=pipeline.pipeline_class)
  if pipeline.pipeline_class in sdxl.PIPELINE_CLASSES:  # no safety checker; its own two options
    del index['safety_checker'], index['requires_safety_checker']
    index['force_zeros_for_empty_prompt'] = pipeline.force_zeros_for_empty_prompt
    index['requires_aesthetics_score'] = pipeline.micro_conditioning is sdxl.aesthetic_time_ids
  for name, model in pipeline.components.items():
    _write_part(path, name, lambda tmp, model=model: models.save_component(model, tmp, weights_dtype=weights_dtype))
    index[name] = [MODEL_CLASSES[model.CLASS_NAME][0], model.CLASS_NAME]
  for name, tok in pipeline.tokenizers.items():
    _write_part(path, tokenizer_folder(name), tok.save_pretrained)
    index[tokenizer_folder(name)] = ['transformers', 'CLIPTokenizer']
  os.makedirs(os.path.join(path, 'scheduler'), exist_ok=True)
  atomic_write(
    os.path.join(path, 'scheduler', 'scheduler_config.json'), json.dumps(pipeline.scheduler_config, indent=2)
  )
  index['scheduler'] = ['diffusers', pipeline.scheduler_config.get('_class_name', 'PNDMScheduler')]
  atomic_write(os.path.join(path, 'model_index.json'), json.dumps(index, indent=2))


def _save_single_file(pipeline: Pipeline, path: str, *, weights_dtype=None):
  """One .safetensors file in the original layout, as A1111, SD.Next and ComfyUI load them (written atomically).
  The layout follows the model: SDXL base or refiner by its pipeline class and encoders, SD 2.x by its OpenCLIP
  text encoder (gelu; SD 1.x's CLIP uses quick_gelu). Tokenizers and scheduler are not part of such files."""
  if not path.endswith('.safetensors'):
    raise ValueError(f'{path}: a single-file checkpoint is written as .safetensors')
  if pipeline.pipeline_class in sdxl.PIPELINE_CLASSES:
    family = 'sdxl' if 'text_encoder' in pipeline.components else 'sdxl_refiner'
  else:
    encoder = pipeline.components.get('text_encoder')
    family = 'sd2' if encoder is not None and encoder.config.get('hidden_act') == 'gelu' else 'sd1'
  layout = single_file.LAYOUTS[family]
  if set(pipeline.components) != set(layout.parts):
    raise WeightsError(
      f'a {family} single file holds {", ".join(layout.parts)}; this pipeline has {", ".join(pipeline.components)}'
    )
  tensors = {}
  for name, (prefix, kind) in layout.parts.items():
    model = pipeline.components[name]
    tensors.update(single_file.to_single_file(state_dict(model), prefix, kind, model.resolve_config(model.config)))
  if weights_dtype is not None:
    tensors = {k: v.astype(weights_dtype) for k, v in tensors.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_safetensors(path, tensors)


def _write_part(path: str, name: str, write):
  """`write(folder)` into a temporary folder, then moved to path/name."""
  tmp = os.path.join(path, f'.{name}.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  write(tmp)
  _replace_dir(tmp, os.path.join(path, name))


def _replace_dir(src: str, dst: str):
  old = dst + '.old'
  if os.path.exists(dst):
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
  os.rename(src, dst)
  shutil.rmtree(old, ignore_errors=True)
