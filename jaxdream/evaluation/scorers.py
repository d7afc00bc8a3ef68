"""The DreamBench scoring models, loaded from local transformers folders, and their batched, jitted embeddings.

`load_clip` (a CLIPModel folder: weights, tokenizer, CLIPImageProcessor settings) and `load_dino` (a ViTModel
folder, e.g. facebook/dino-vits16) give a `Scorer`; `clip_image_embed`, `clip_text_embed` and `dino_embed`
return float32 numpy embeddings, not normalised: CLIP's are transformers' get_image_features /
get_text_features, DINO's the class token after the final layer norm (`last_hidden_state[:, 0]`).
Images are paths, PIL images or uint8 (H, W[, C]) arrays.

Each model compiles once per batch shape (and mesh): inputs run in batches of `batch_size` (fewer when there are
fewer inputs), the last one padded, and the compiled functions live in the scorer's own `compile_cache`. With a
`mesh`, each batch is split over the mesh's data axes (its size rounded up to a multiple of their devices) and
the model replicated; the embeddings are the single-device ones, to float rounding.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdream.distributed.mesh import as_auto
from jaxdream.distributed.multihost import to_global, to_host
from jaxdream.distributed.sharding import split_batch
from jaxdream.evaluation.preprocess import ClipTransform, DinoTransform
from jaxdream.io.tokenizer import load_tokenizer, tokenize
from jaxdream.models import load_clip_model, load_vit
from jaxdream.runtime import CompileCache, compiler_options
from jaxdream.runtime.compile_cache import Structure

_TOKENIZER_FILES = ('vocab.json', 'tokenizer.json')


@dataclasses.dataclass
class Scorer:
  """A loaded scoring model: the NNX model, its image preprocessing, and (CLIP) its tokenizer."""

  kind: str  # 'clip' or 'dino'
  model: nnx.Module
  transform: ClipTransform | DinoTransform
  tokenizer: object | None = None
  path: str | None = None
  batch_size: int = 32
  compile_cache: CompileCache = dataclasses.field(default_factory=CompileCache)


def load_clip(path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', batch_size: int = 32) -> Scorer:
  """A CLIPModel folder (config.json with text_config and vision_config, model.safetensors, the tokenizer
  files and preprocessor_config.json; without the latter, CLIPImageProcessor's defaults at the model's size).
  A folder of another model type is an error naming it, before anything compiles."""
  model = load_clip_model(path, dtype=dtype, attention_impl=attention_impl)
  transform = ClipTransform(path, model.image_size)
  tokenizer = load_tokenizer(path) if any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES) else None
  return Scorer('clip', model, transform, tokenizer, path, batch_size)


def load_dino(path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', batch_size: int = 32) -> Scorer:
  """A ViTModel folder (DINO, e.g. facebook/dino-vits16); preprocessing is DINO's evaluation transform at the
  model's image_size. A folder of another model type is an error naming it, before anything compiles."""
  model = load_vit(path, dtype=dtype, attention_impl=attention_impl)
  return Scorer('dino', model, DinoTransform(model.image_size), None, path, batch_size)


def _check_kind(scorer: Scorer, kind: str, fn: str):
  if not isinstance(scorer, Scorer) or scorer.kind != kind:
    got = scorer.kind if isinstance(scorer, Scorer) else type(scorer).__name__
    raise TypeError(f'{fn} takes a scorer from load_{kind}(...), got {got!r}')


def _embed(scorer: Scorer, method: str, items: list, prepare, progress=None, mesh=None) -> np.ndarray:
  """`scorer.model.<method>` over `prepare(batch of items)` batch by batch (images are decoded and resized one
  batch at a time, never all at once), as float32 numpy. `progress(n)` is told each batch's size. With a mesh,
  each batch is split over its data axes and the model replicated."""
  n = len(items)
  if n == 0:
    raise ValueError('nothing to embed: no inputs')
  graphdef, state = nnx.split(scorer.model)
  split, pieces = None, 1
  if mesh is not None:
    mesh = as_auto(mesh)
    split, pieces = split_batch(mesh)
    state = to_global(state, NamedSharding(mesh, P()))

  def build():
    embed = lambda state, x: getattr(nnx.merge(graphdef, state), method)(x).astype(jnp.float32)
    return jax.jit(
      embed, compiler_options=compiler_options(getattr(scorer.model, 'dtype', jnp.float32), xla_kernels=True)
    )

  fn = scorer.compile_cache.get((method, Structure(graphdef), mesh), build)
  b = -(-min(scorer.batch_size, n) // pieces) * pieces  # a multiple of the mesh's batch pieces
  out = []
  for i in range(0, n, b):
    chunk = prepare(items[i : i + b])
    m = len(chunk)
    if m < b:  # one batch shape: the last batch is padded with zeros, their rows dropped
      chunk = np.concatenate([chunk, np.zeros((b - m,) + chunk.shape[1:], chunk.dtype)])
    if split is not None:
      chunk = to_global(chunk, split)
    out.append(to_host(fn(state, chunk))[:m])
    if progress is not None:
      progress(m)
  return np.concatenate(out)


def clip_image_embed(clip: Scorer, images, *, progress=None, mesh=None) -> np.ndarray:
  """(N, projection_dim) CLIP image embeddings (get_image_features' pooler_output); mesh: split each batch
  over its data axes."""
  _check_kind(clip, 'clip', 'clip_image_embed')
  return _embed(clip, 'get_image_features', list(images), clip.transform, progress, mesh)


def clip_text_embed(clip: Scorer, tokenizer, texts, *, progress=None, mesh=None) -> np.ndarray:
  """(N, projection_dim) CLIP text embeddings (get_text_features' pooler_output); tokenizer None: the folder's."""
  _check_kind(clip, 'clip', 'clip_text_embed')
  tokenizer = clip.tokenizer if tokenizer is None else tokenizer
  if tokenizer is None:
    raise ValueError(f'{clip.path}: no tokenizer files ({" or ".join(_TOKENIZER_FILES)}); pass a tokenizer')
  length = min(tokenizer.model_max_length, clip.model.max_position_embeddings)
  prepare = lambda batch: tokenize(tokenizer, batch, length)
  return _embed(clip, 'get_text_features', list(texts), prepare, progress, mesh)


def dino_embed(dino: Scorer, images, *, progress=None, mesh=None) -> np.ndarray:
  """(N, hidden_size) DINO embeddings: the class token after the final layer norm; mesh: split each batch
  over its data axes."""
  _check_kind(dino, 'dino', 'dino_embed')
  return _embed(dino, 'cls_embedding', list(images), dino.transform, progress, mesh)
