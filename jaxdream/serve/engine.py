"""The models and LoRA files a server offers, and one call of the compiled sampler for a batch of images.

Every batch runs at the same batch size (--max-batch; the rest padded with copies of its last image, dropped
afterwards) and, with adapters, the same number of stacked adapters: XLA may round an image differently in a
program of another batch size, and one program per (size, steps, sampler, mode) is all a server compiles.
So an image never depends on what it was batched with: its own seed, prompt, guidance and adapter decide it.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.diffusion import sampling
from jaxdream.diffusion.adapters import combine_adapters, stack_adapters
from jaxdream.diffusion.pipeline import load_pipeline
from jaxdream.distributed.mesh import make_mesh
from jaxdream.io.weights import PICKLE_SUFFIXES
from jaxdream.lora import apply_lora
from jaxdream.lora.tags import lora_in_dir, lora_name
from jaxdream.models import ConfigError, WeightsError
from jaxdream.nn.adapters import LoRAParam, add_lora, lora_layers
from jaxdream.runtime import CallbackRegistry, CompileCache, Structure
from jaxdream.schedulers import make_scheduler
from jaxdream.serve.inpainting import Overlay, paste_back
from jaxdream.serve.limits import ApiError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
  """One image to generate."""

  prompt: str  # without its <lora:...> tag
  negative_prompt: str
  seed: int
  guidance: float
  # (adapter entry, weight): the entry ((file, weight), ...) is one file at 1.0 (the image's weight applies) or
  # several combined at their weights (the image's weight 1.0); see Engine.adapter
  lora: tuple[tuple, float] | None = None
  init: np.ndarray | None = None  # uint8 (H, W, 3), img2img / inpainting
  mask: np.ndarray | None = None  # uint8 (H, W), white: repaint
  overlay: Overlay | None = None  # inpainting: what the result is pasted back into
  hires_prompt: str | None = None  # hires fix's second pass (None: the prompt's)
  hires_negative_prompt: str | None = None
  # A1111's variation seed: (subseed, subseed_strength, latent (height, width) to resize the seed's noise from or None)
  variation: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Hires:
  """A1111's hires fix settings (txt2img's enable_hr), as sampling.hires_fix takes them."""

  scale: float
  resize_x: int
  resize_y: int
  upscaler: str
  steps: int  # the second pass's
  sampler: str
  strength: float
  chunks: tuple[int, int] = (1, 1)  # the second pass's prompts' 75-token chunks (BatchKey.chunks)


@dataclasses.dataclass(frozen=True)
class BatchKey:
  """What images must share to be generated in one call; everything else is per image."""

  model: str
  kind: str  # 'txt2img', 'img2img', 'inpaint'
  height: int
  width: int
  steps: int
  sampler: str  # our scheduler name
  cfg: bool  # guidance on (some scale > 1): a different program, so never mixed
  strength: float | None = None
  adapters: tuple | None = None  # the LoRA layers' signature (targets and ranks), None: no LoRA
  fill: str | None = None  # inpainting: what the masked latents start from (sampling.inpaint's masked_content)
  clip_skip: int = 0  # diffusers' clip_skip (A1111's CLIP_stop_at_last_layers - 1)
  # 75-token chunks of the negative prompt and the prompt (A1111 prompts): images of other counts would pad theirs
  chunks: tuple[int, int] = (1, 1)
  hires: Hires | None = None  # txt2img with A1111's hires fix


def _signature(tree: dict) -> tuple:
  return tuple(
    sorted(
      (comp, name, f['a'].shape[1:], f['b'].shape[1:]) for comp, layers in tree.items() for name, f in layers.items()
    )
  )


# A single-file checkpoint's configs (a diffusers folder of the same kind of model, weights not needed): the folder
# beside it named <file stem>.config, else --config-dir, else the published model of the type its keys say.
CONFIG_SUFFIX = '.config'


def _stem(name: str) -> str:
  return os.path.splitext(name)[0]


class Engine:
  """The models (--model, and --models-dir's diffusers folders and single-file checkpoints), the LoRA files
  (--lora-dir), the textual inversion embeddings (--embeddings-dir), one model loaded at a time."""

  def __init__(
    self,
    model: str,
    *,
    models_dir=None,
    lora_dir=None,
    config_dir=None,
    max_batch: int = 8,
    devices: int = 1,
    allow_pickle=False,
    lora_cache: int = 64,
    lora_cache_mb: float = 1024,
    embeddings_dir=None,
  ):
    if max_batch < 1:
      raise ValueError(f'--max-batch must be at least 1, got {max_batch}')
    n = jax.device_count() if devices == -1 else devices
    if not 1 <= n <= jax.device_count():
      raise ValueError(f'--devices {devices}: this machine has {jax.device_count()} device(s)')
    # Each batch split over the devices' 'data' axis (padded to a multiple of them; parameters replicated).
    self.mesh = make_mesh(data=n, devices=jax.devices()[:n]) if n > 1 else None
    for flag, folder in (
      ('--models-dir', models_dir),
      ('--lora-dir', lora_dir),
      ('--config-dir', config_dir),
      ('--embeddings-dir', embeddings_dir),
    ):
      if folder and not os.path.isdir(folder):
        raise ValueError(f'{flag} {folder}: no such folder')
    self.embeddings_dir = embeddings_dir
    self._embeddings = {'loaded': {}, 'skipped': {}}  # GET /sdapi/v1/embeddings, for the loaded model
    self._embeddings_seen = ()  # (path, mtime) of the folder's files when the loaded model read them
    self.model_path, self.models_dir, self.lora_dir, self.config_dir = model, models_dir, lora_dir, config_dir
    self._hashes: dict = {}  # (path, size, mtime) -> sha256 of a single file, computed once (A1111 caches it too)
    self.max_batch, self.allow_pickle = max_batch, allow_pickle
    self._lock = threading.RLock()  # the loaded model: loading, switching and sampling
    self._lora_lock = threading.RLock()
    self._loaded: tuple[str, object] | None = None
    # LRU: (model, entry, files' mtimes) -> (signature, stacked tree of one adapter), at most `lora_cache` entries
    # and `lora_cache_mb` MiB of factors (the entry just used is always kept); a trimmed one is read again.
    self._adapters: collections.OrderedDict = collections.OrderedDict()
    self.lora_cache, self.lora_cache_bytes = lora_cache, int(lora_cache_mb * 2**20)
    self._templates: dict = {}  # (model, signature) -> components carrying LoRA layers of that signature
    # Every model loaded shares one compile cache (its keys name the model structure) and the registry its loops
    # report progress to: switching back to a model, or to one of the same architecture, compiles nothing.
    self._compiled, self._callbacks = CompileCache(), CallbackRegistry()
    self.refresh_models()
    self.current = self.default_model = next(iter(self._models))
    self.pipeline(self.current)

  # -- models
  def refresh_models(self):
    """The models by name: --model's, then --models-dir's diffusers folders and checkpoint files (.safetensors;
    .ckpt too with --allow-pickle) by their file names. Only these are ever loaded: a request names one of
    them, never a path."""
    extensions = ('.safetensors', '.ckpt') if self.allow_pickle else ('.safetensors',)
    models = {os.path.basename(os.path.abspath(self.model_path)): self.model_path}
    if self.models_dir:
      for name in sorted(os.listdir(self.models_dir)):
        path = os.path.join(self.models_dir, name)
        folder = os.path.isfile(os.path.join(path, 'model_index.json')) and not name.endswith(CONFIG_SUFFIX)
        if folder or (os.path.isfile(path) and name.endswith(extensions)):
          models.setdefault(name, path)
    self._models = models

  def models(self) -> dict[str, str]:
    return dict(self._models)

  def model_config_dir(self, path: str) -> str | None:
    """The config folder a single file loads with (CONFIG_SUFFIX); None for a diffusers folder, or presets."""
    if not os.path.isfile(path):
      return None
    sidecar = _stem(path) + CONFIG_SUFFIX
    return sidecar if os.path.isdir(sidecar) else self.config_dir

  def sha256(self, path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in self._hashes:
      digest = hashlib.sha256()
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2**20), b''):
          digest.update(block)
      self._hashes[key] = digest.hexdigest()
    return self._hashes[key]

  def describe(self, name: str) -> dict:
    """A1111's /sd-models entry: a single file's title carries its short hash (the sha256's first 10 digits)."""
    path = self._models[name]
    if not os.path.isfile(path):
      return dict(title=name, model_name=name, hash=None, sha256=None, filename=path, config=None)
    sha = self.sha256(path)
    return dict(
      title=f'{name} [{sha[:10]}]',
      model_name=_stem(name),
      hash=sha[:10],
      sha256=sha,
      filename=os.path.abspath(path),
      config=self.model_config_dir(path),
    )

  def title(self, name: str) -> str:
    return self.describe(name)['title']

  def model_name(self, title: str, field: str = 'sd_model_checkpoint') -> str:
    """A model's name from what A1111 clients send: its title ('name [hash]'), name, model_name (a file's stem)
    or short hash; a 422 lists the known ones."""
    if not isinstance(title, str):
      raise ApiError(422, field, f'{field} must be a model name (a string), got {type(title).__name__}')
    name = title.split(' [')[0].strip()
    if name in self._models:
      return name
    for known, path in self._models.items():
      hashes = [h[:10] for k, h in self._hashes.items() if k[0] == os.path.abspath(path)]
      if os.path.isfile(path) and name in (_stem(known), *hashes):
        return known
    raise ApiError(422, field, f'{field} {title!r}: no such model; known: {", ".join(self._models)}')

  def pipeline(self, name: str):
    """The named model's pipeline, loaded (and the previous one dropped) if it is not the loaded one. The
    loaded one is returned without the lock: checking a request never waits for the running batch."""
    loaded = self._loaded
    if loaded is not None and loaded[0] == name:
      return loaded[1]
    with self._lock:
      if self._loaded is None or self._loaded[0] != name:
        self._loaded = None
        self._adapters.clear()
        self._templates.clear()
        path = self._models[name]
        try:
          pipe = load_pipeline(path, allow_pickle=self.allow_pickle, config_dir=self.model_config_dir(path))
        except Exception as e:  # noqa: BLE001 (a file from anywhere may fail in any way: reported, never a crash)
          known = isinstance(e, (WeightsError, ConfigError, OSError, ValueError))
          why = str(e) if known else f'{type(e).__name__}: {e}'
          raise ApiError(422, 'sd_model_checkpoint', f'model {name} ({path}) cannot be loaded: {why}') from None
        pipe = self._with_embeddings(pipe)
        pipe.compiled, pipe.callbacks = self._compiled, self._callbacks
        self._loaded = (name, pipe)
      return self._loaded[1]

  # -- textual inversion embeddings
  def embeddings(self) -> dict:
    """GET /sdapi/v1/embeddings: A1111's {'loaded': {name: facts}, 'skipped': {name: facts}} for the loaded model."""
    return copy.deepcopy(self._embeddings)  # replaced whole when a model loads: no lock (sampling holds it)

  def _with_embeddings(self, pipe):
    """The pipeline knowing every embedding of --embeddings-dir that fits it, each by its file name as a word
    (A1111's embeddings folder); the others are listed as skipped, with why."""
    from jaxdream.diffusion.textual_inversion import load_textual_inversion, read_embedding

    loaded, skipped, taken = {}, {}, set()
    for path in self._embedding_files():
      stem = os.path.splitext(os.path.basename(path))[0]
      if stem.lower() in taken:  # names match in any case: the first of a name (by path) is the one
        continue
      facts = {'step': None, 'sd_checkpoint': None, 'sd_checkpoint_name': None, 'shape': None, 'vectors': None}
      try:
        _, tables = read_embedding(path, allow_pickle=self.allow_pickle)
        # A1111's shape: the vectors' width, SDXL's two tables' together
        facts.update(
          shape=sum(int(t.shape[1]) for t in tables.values()), vectors=int(next(iter(tables.values())).shape[0])
        )
        pipe = load_textual_inversion(pipe, path, stem, allow_pickle=self.allow_pickle, as_word=True)
      except (WeightsError, ValueError, OSError) as e:  # another model's embedding, a broken file: listed, not fatal
        skipped[stem] = facts
        log.warning('embedding %s skipped: %s', path, e)
        continue
      loaded[stem] = facts
      taken.add(stem.lower())
    self._embeddings = {'loaded': loaded, 'skipped': skipped}
    self._embeddings_seen = self._embeddings_stamp()
    return pipe

  def _embedding_files(self) -> list[str]:
    """The embedding files of --embeddings-dir and the folders under it (as A1111 walks it), in path order."""
    if not self.embeddings_dir:
      return []
    suffixes = ('.safetensors', *(PICKLE_SUFFIXES if self.allow_pickle else ()))
    out = []
    for root, folders, files in os.walk(self.embeddings_dir):
      folders[:] = sorted(f for f in folders if not f.startswith('.'))
      out += [os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes) and not f.startswith('.')]
    return out

  def _embeddings_stamp(self) -> tuple:
    """(path, mtime) of each embedding file; one removed while the folder is read counts as gone (this runs before
    every request: a file deleted meanwhile must not fail it)."""
    stamp = []
    for path in self._embedding_files():
      try:
        stamp.append((path, os.stat(path).st_mtime_ns))
      except OSError:
        continue
    return tuple(stamp)

  def refresh_embeddings(self) -> bool:
    """When --embeddings-dir changed, the loaded model is read again with its embeddings (the longer token tables
    compile anew): on POST refresh-embeddings and before each request, as A1111 rescans the folder before each
    generation. Returns whether it did. Unchanged, it costs a walk of the folder and never waits for sampling."""
    if not self.embeddings_dir or self._loaded is None or self._embeddings_stamp() == self._embeddings_seen:
      return False
    with self._lock:
      if self._loaded is None or self._embeddings_stamp() == self._embeddings_seen:
        return False
      name, self._loaded = self._loaded[0], None
      self.pipeline(name)
      return True

  # -- LoRA files
  def loras(self) -> list[dict]:
    """GET /sdapi/v1/loras: {name, alias, path, metadata} of each file in --lora-dir."""
    if not self.lora_dir:
      return []
    out = []
    for entry in sorted(os.listdir(self.lora_dir)):
      for path in (
        os.path.join(self.lora_dir, entry),
        os.path.join(self.lora_dir, entry, 'pytorch_lora_weights.safetensors'),
      ):
        if path.endswith('.safetensors') and os.path.isfile(path):
          out.append({'name': lora_name(path), 'alias': lora_name(path), 'path': path, 'metadata': {}})
    return out

  def lora_path(self, name: str, field: str = 'prompt') -> str:
    """The file of a prompt tag's name, which must be a plain name: nothing a request sends reaches a path
    outside --lora-dir."""
    if not name or name in ('.', '..') or any(c in name for c in '/\\\0') or os.sep in name or ':' in name:
      raise ApiError(422, field, f'<lora:{name}>: a LoRA name is a file name in --lora-dir, without a path')
    try:
      return lora_in_dir(self.lora_dir, name)
    except ValueError as e:
      raise ApiError(422, field, str(e)) from None

  def adapter(self, model: str, entry: tuple):
    """(signature, stacked tree of one adapter) for the model's UNet/text encoders of an entry ((file, weight),
    ...): one file at weight 1.0 as it is read, or several combined, each at its weight (combine_adapters: what
    several <lora:...> tags in one prompt apply). Cached, least recently used trimmed first."""
    key = (model, entry, tuple(os.stat(path).st_mtime_ns for path, _ in entry))
    with self._lora_lock:
      if key in self._adapters:
        self._adapters.move_to_end(key)
        return self._adapters[key]
      if len(entry) == 1 and entry[0][1] == 1.0:
        tree = self._read_adapter(model, entry[0][0])
      else:
        tree = combine_adapters([(self.adapter(model, ((path, 1.0),))[1], w) for path, w in entry])
      self._adapters[key] = (_signature(tree), tree)
      self._trim_adapters()
      return self._adapters[key]

  def adapter_cache(self) -> tuple[int, int]:
    """(entries, bytes) of the LoRA cache."""
    with self._lora_lock:
      return len(self._adapters), sum(_nbytes(tree) for _, tree in self._adapters.values())

  def _trim_adapters(self):
    entries, size = self.adapter_cache()
    while entries > 1 and (entries > self.lora_cache or size > self.lora_cache_bytes):
      _, (_, tree) = self._adapters.popitem(last=False)
      entries, size = entries - 1, size - _nbytes(tree)

  def _read_adapter(self, model: str, path: str) -> dict:
    base = self.pipeline(model)
    comps = {c: nnx.clone(m) for c, m in base.components.items() if c == 'unet' or c.startswith('text_encoder')}
    try:
      done = apply_lora(comps, path, 1.0)
    except (WeightsError, ValueError, OSError) as e:
      raise ApiError(422, 'prompt', f'LoRA {lora_name(path)}: {e}') from None
    if not done:
      raise ApiError(422, 'prompt', f'LoRA {lora_name(path)}: adapts no layer of model {model}')
    return stack_adapters([{c: comps[c] for c in done}])

  def _template(self, model: str, signature: tuple, tree: dict) -> dict:
    """The model's components that an adapter of this signature touches, carrying LoRA layers of its shapes
    (their values unused: the sampler sets each image's): one structure, so one program, per signature."""
    with self._lora_lock:
      if (model, signature) not in self._templates:
        base, comps = self.pipeline(model), {}
        for comp, layers in tree.items():
          m = comps[comp] = nnx.clone(base.components[comp])
          add_lora(m, targets=list(layers), rank=1, conv_targets=list(layers), conv_rank=1, key=jax.random.key(0))
          own = lora_layers(m)
          for name, f in layers.items():
            own[name].lora_a = LoRAParam(jnp.zeros(f['a'].shape[1:], jnp.float32))
            own[name].lora_b = LoRAParam(jnp.zeros(f['b'].shape[1:], jnp.float32))
            own[name].lora_scale = 1.0
        self._templates[(model, signature)] = comps
      return self._templates[(model, signature)]

  # -- sampling
  def num_steps(self, key: BatchKey) -> int:
    """Steps the loop runs for this key (img2img starts part way)."""
    config = self.pipeline(key.model).scheduler_config
    sch = make_scheduler(key.sampler, config, key.steps)
    steps = sch.num_steps - (0 if key.strength is None else sch.start_index(key.strength))
    if key.hires is not None:
      steps += sampling.check_hires_schedule(key.hires.sampler, config, key.hires.steps, key.hires.strength)
    return steps

  def preview(self, key: BatchKey, latents: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) of one image's current latents (A1111's live preview)."""
    return self._decode(key, np.asarray(latents)[None])[0]

  def finish(self, key: BatchKey, tasks: list[Task], latents: np.ndarray) -> list:
    """The images of a batch stopped part way (interrupt, skip), as A1111 returns them: the clean latents of its
    last step (the progress callback's, `progress_latents='denoised'`) decoded, inpainted ones pasted back."""
    return self._finished(self._decode(key, np.asarray(latents)[: len(tasks)]), key, tasks)

  def _decode(self, key: BatchKey, latents: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) of latents, decoded as the loop decodes its result: by a jitted VAE decode of its own, so
    a preview never touches the batch's program or pixels."""
    vae = self.pipeline(key.model).vae
    graphdef, state = nnx.split(vae)
    fn = self.pipeline(key.model).compiled.get(
      ('serve_preview', Structure(graphdef)),
      lambda: jax.jit(lambda state, x: sampling.decode_uint8(nnx.merge(graphdef, state), x)),
    )
    return np.asarray(fn(state, jnp.asarray(latents, jnp.float32)))

  @staticmethod
  def _finished(images, key: BatchKey, tasks: list[Task]) -> list:
    if key.kind != 'inpaint':
      return images
    return [paste_back(im, t.overlay) if t.overlay is not None else im for im, t in zip(images, tasks, strict=True)]

  def run(self, key: BatchKey, tasks: list[Task], progress=None) -> np.ndarray:
    """uint8 images (len(tasks), H, W, 3) of one batch of compatible tasks, in one call of the compiled loop;
    inpainted ones pasted back into their originals (of their own size with inpaint_full_res)."""
    if not 1 <= len(tasks) <= self.max_batch:
      raise ValueError(f'{len(tasks)} tasks for a batch of at most {self.max_batch}')
    padded = list(tasks) + [tasks[-1]] * (self.max_batch - len(tasks))
    with self._lock:
      pipe = self.pipeline(key.model)
      kw = dict(
        # A1111 zeroes an empty negative prompt's half for SDXL (force_zero_negative_prompt); None asks for that
        negative_prompts=[t.negative_prompt or None for t in padded],
        num_inference_steps=key.steps,
        guidance_scale=[t.guidance for t in padded],
        scheduler=key.sampler,
        seed=[t.seed for t in padded],
        height=key.height,
        width=key.width,
        progress=progress,
        # progress(step, latents): the prompt's clean latents of the step, as A1111's live preview (/progress's
        # current_image) and what an interrupted batch returns
        progress_latents='denoised' if progress is not None else False,
        mesh=self.mesh,
        clip_skip=key.clip_skip,
        prompt_syntax='a1111',  # the A1111 API's prompts: emphasis, BREAK, any length
      )
      if key.adapters is not None:
        pipe, kw['adapters'], kw['adapter_ids'], kw['adapter_scales'] = self._with_adapters(pipe, key, padded)
      if any(t.variation for t in padded):  # each image's noise, varied or its seed's own
        f = pipe.vae_scale_factor
        shape = (key.height // f, key.width // f, pipe.vae.latent_channels)
        kw['latents'] = np.concatenate(
          [sampling.variation_noise([t.seed], [t.variation[0]], t.variation[1], shape, t.variation[2]) if t.variation
           else sampling.image_noise([t.seed], shape) for t in padded]
        )  # fmt: skip
      prompts = [t.prompt for t in padded]
      if key.kind == 'txt2img' and key.hires is not None:
        h = key.hires
        images = sampling.hires_fix(
          pipe,
          prompts,
          scale=h.scale,
          resize_x=h.resize_x,
          resize_y=h.resize_y,
          upscaler=h.upscaler,
          strength=h.strength,
          hires_steps=h.steps,
          hires_scheduler=h.sampler,
          hires_prompts=[t.prompt if t.hires_prompt is None else t.hires_prompt for t in padded],
          hires_negative_prompts=[
            n if t.hires_negative_prompt is None else (t.hires_negative_prompt or None)
            for n, t in zip(kw['negative_prompts'], padded, strict=True)
          ],
          **kw,
        )
      elif key.kind == 'txt2img':
        images = sampling.txt2img(pipe, prompts, **kw)
      else:
        init = np.stack([t.init for t in padded])
        if key.kind == 'inpaint':
          masks = np.stack([t.mask for t in padded])
          images = sampling.inpaint(pipe, prompts, init, masks, strength=key.strength, masked_content=key.fill, **kw)
        else:
          images = sampling.img2img(pipe, prompts, init, strength=key.strength, **kw)
    return self._finished(np.asarray(images)[: len(tasks)], key, tasks)

  def _with_adapters(self, base, key: BatchKey, tasks: list[Task]):
    """(pipeline carrying LoRA layers of the key's signature, stacked adapters padded to max_batch, ids, scales)."""
    entries = list(dict.fromkeys(t.lora[0] for t in tasks))
    trees = [self.adapter(key.model, e)[1] for e in entries]
    template = self._template(key.model, key.adapters, trees[0])
    trees += [trees[0]] * (self.max_batch - len(trees))  # a fixed number of stacked adapters: one program
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *trees)
    pipe = dataclasses.replace(base, components=dict(base.components, **template))
    pipe.compiled, pipe.callbacks = base.compiled, base.callbacks  # same structure: the base's loops
    return pipe, stacked, [entries.index(t.lora[0]) for t in tasks], [t.lora[1] for t in tasks]


def _nbytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
