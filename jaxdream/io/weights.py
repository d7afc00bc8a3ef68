"""Reading and writing diffusers/transformers weight folders without torch.

A model's parameters map one-to-one onto the PyTorch state-dict names: the module tree is named as
the weights name it, and each layer's `TORCH_PARAMS` gives the parameter name and layout conversion.
safetensors files are read straight into numpy (memory-mapped). Pickle files (`.bin`, `.ckpt`, `.pt`)
are refused unless the caller opts in, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jaxdream.io.files import atomic_open, atomic_write


class WeightsError(ValueError):
  """A weight folder or file that cannot be loaded as asked; the message says what to fix."""


_ST_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
PICKLE_SUFFIXES = ('.bin', '.ckpt', '.pt', '.pth', '.pkl')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as (memory-mapped, read-only) numpy arrays."""
  try:
    with open(path, 'rb') as f:
      n = int.from_bytes(f.read(8), 'little')
      if n <= 0 or n > os.path.getsize(path) - 8:
        raise ValueError('bad header length')
      header = json.loads(f.read(n))
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  except (OSError, ValueError, UnicodeDecodeError) as e:
    raise WeightsError(f'{path}: not a readable safetensors file ({e})') from None
  if not isinstance(header, dict):
    raise WeightsError(f'{path}: not a readable safetensors file (its header is not a JSON object)')
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if not _well_formed(info):
      raise WeightsError(f'{path}: tensor {name!r} has a corrupt header entry: {str(info)[:200]}')
    if info['dtype'] not in _ST_DTYPES:
      raise WeightsError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    start, end = info['data_offsets']
    dtype = np.dtype(_ST_DTYPES[info['dtype']])
    count = int(np.prod(info['shape'], dtype=np.int64))
    if not 0 <= start <= end or end - start != count * dtype.itemsize or 8 + n + end > len(buf):
      raise WeightsError(f'{path}: tensor {name!r} is truncated or its header is corrupt')
    out[name] = np.frombuffer(buf, dtype, count, 8 + n + start).reshape(info['shape'])
  return out


def _well_formed(info) -> bool:
  """A safetensors header entry: {'dtype': str, 'shape': [int >= 0, ...], 'data_offsets': [int, int]}."""
  ints = lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
  return (
    isinstance(info, dict)
    and isinstance(info.get('dtype'), str)
    and ints(info.get('shape'))
    and all(i >= 0 for i in info['shape'])
    and ints(info.get('data_offsets'))
    and len(info['data_offsets']) == 2
  )


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None):
  """Write tensors (numpy, C order) as .safetensors, atomically (a partial file is never left)."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.asarray(tensors[name], order='C')  # not ascontiguousarray: it makes scalars (kohya's alphas) 1-d
    header[name] = {'dtype': _ST_NAMES[a.dtype], 'shape': list(a.shape), 'data_offsets': [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  header['__metadata__'] = {'format': 'pt', **(metadata or {})}
  blob = json.dumps(header, separators=(',', ':')).encode()
  # Tensor data starts 64-byte aligned (the format asks 8): jax's CPU arrays can then be views of a loaded
  # file's tensors instead of copies (those whose offsets are multiples of 64 too).
  blob += b' ' * (-(8 + len(blob)) % 64)
  with atomic_open(path, 'wb') as f:
    f.write(len(blob).to_bytes(8, 'little'))
    f.write(blob)
    for a in arrays:
      f.write(a.tobytes())


def _pickle_refusal(path: str) -> WeightsError:
  return WeightsError(
    f'{path} is a pickle-based checkpoint. Loading it can run arbitrary code, so jaxdream refuses it '
    'by default. Convert it to safetensors (in Python with torch: '
    '`safetensors.torch.save_file(torch.load(p, weights_only=True), p_without_suffix + ".safetensors")`, '
    "or diffusers' `from_pretrained(...).save_pretrained(dir, safe_serialization=True)`), "
    "or pass allow_pickle=True (CLI: --allow-pickle) to load it with torch's weights_only loader."
  )


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise WeightsError(f'{path}: loading a pickle checkpoint needs torch installed') from None
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:  # torch's own message suggests weights_only=False: not advice to pass on
    found = re.search(r'GLOBAL (\S+)', str(e))
    raise WeightsError(
      f'{path} holds more than tensors{f" (it needs {found.group(1)})" if found else ""}, so jaxdream refuses '
      "it even with allow_pickle: torch's weights_only loader only reads tensors and plain containers."
    ) from e
  if isinstance(sd, dict) and 'state_dict' in sd and isinstance(sd['state_dict'], dict):
    # The training step count sits beside the state dict in CompVis checkpoints: it tells SD 2.0 base (epsilon,
    # 875000 steps) from the v-prediction models, as diffusers' convert_from_ckpt reads it.
    step = sd.get('global_step')
    sd = dict(sd['state_dict'])
    if isinstance(step, int) and 'global_step' not in sd:
      sd['global_step'] = torch.tensor(step)
  return {
    k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    for k, v in sd.items()
    if hasattr(v, 'detach')
  }


def read_weights_file(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The tensors of one weights file: .safetensors, or (opt-in) a pickle checkpoint (.ckpt, .pt, .bin, ...)."""
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: no such file')
  if path.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise _pickle_refusal(path)
    return _read_pickle(path)
  if not path.endswith('.safetensors'):
    raise WeightsError(
      f'{path}: expected a .safetensors file (or, with allow_pickle, one of {", ".join(PICKLE_SUFFIXES)})'
    )
  return read_safetensors(path)


def read_weights(folder: str, weights_name: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The state dict stored in a component folder: a single or sharded safetensors file, or (opt-in)
  a pickle file. `weights_name` is the library's file name, e.g. 'diffusion_pytorch_model'."""
  if not os.path.isdir(folder):
    raise WeightsError(f'{folder}: no such folder')
  index = os.path.join(folder, f'{weights_name}.safetensors.index.json')
  single = os.path.join(folder, f'{weights_name}.safetensors')
  if os.path.exists(single):
    return read_safetensors(single)
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    out = {}
    for shard in shards:
      out.update(read_safetensors(os.path.join(folder, shard)))
    return out
  found = sorted(os.listdir(folder))
  st = [f for f in found if f.endswith('.safetensors')]
  if len(st) == 1:  # e.g. a variant such as diffusion_pytorch_model.fp16.safetensors
    return read_safetensors(os.path.join(folder, st[0]))
  pickles = [f for f in found if f.endswith(PICKLE_SUFFIXES)]
  if pickles:
    return read_weights_file(os.path.join(folder, pickles[0]), allow_pickle=allow_pickle)
  raise WeightsError(f'{folder}: no weights file (expected {weights_name}.safetensors); found {found}')


def read_config(
  folder: str, name: str = 'config.json', hint: str = 'is this a model component folder (e.g. <model>/unet)?'
) -> dict:
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    raise WeightsError(f'{folder}: missing {name}; {hint}')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise WeightsError(f'{path}: not valid JSON ({e})') from None


class _Slot:
  """Where one PyTorch tensor lives in an NNX model, and how its layout converts."""

  def __init__(self, module, attr, to_jax, to_torch):
    self.module, self.attr, self.to_jax, self.to_torch = module, attr, to_jax, to_torch

  @property
  def variable(self):
    return getattr(self.module, self.attr)


def torch_slots(model: nnx.Module) -> dict[str, _Slot]:
  """PyTorch state-dict key -> slot, for every parameter of `model`."""
  slots = {}
  for path, node in nnx.iter_graph(model):
    table = getattr(type(node), 'TORCH_PARAMS', None)
    if table is None or not isinstance(node, nnx.Module):
      continue
    prefix = ''.join(f'{p}.' for p in path)
    for attr, (tname, to_jax, to_torch) in table.items():
      if getattr(node, attr, None) is not None:
        slots[prefix + tname] = _Slot(node, attr, to_jax, to_torch)
  return slots


def load_state_dict(
  model: nnx.Module,
  state_dict: dict[str, np.ndarray],
  *,
  source: str = 'weights',
  renames: tuple[tuple[str, str], ...] = (),
  ignore: tuple[str, ...] = (),
  param_dtype=jnp.float32,
):
  """Fill `model` (concrete or from nnx.eval_shape) with a PyTorch-named state dict, in place.

  renames: (regex, replacement) pairs applied to file keys first (legacy names);
  ignore: regexes of file keys that are not parameters (buffers such as position_ids);
  param_dtype: float32 (training, the default) or, for inference of large models, the compute dtype.
  Every parameter must be present with the right shape, and every file tensor used.
  """
  sd = {}
  for key, value in state_dict.items():
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    if not any(re.fullmatch(p, key) for p in ignore):
      sd[key] = value
  slots = torch_slots(model)
  missing = sorted(set(slots) - set(sd))
  unexpected = sorted(set(sd) - set(slots))
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing tensor(s): ' + ', '.join(missing[:10]))
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected tensor(s): ' + ', '.join(unexpected[:10]))
  converted = {}
  for key in sorted(set(slots) & set(sd)):
    slot = slots[key]
    value = slot.to_jax(sd[key])
    want = tuple(slot.variable.shape)
    if tuple(value.shape) != want:
      problems.append(
        f'shape mismatch for {key}: file has {tuple(sd[key].shape)}, '
        f'model expects {want} (in jax layout; file gave {tuple(value.shape)})'
      )
    converted[key] = value
  if problems:
    raise WeightsError(f'{source}: ' + '; '.join(problems))
  for key, value in converted.items():
    slots[key].variable.set_value(jnp.asarray(value, param_dtype))


def state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a PyTorch-named, PyTorch-layout float32 state dict."""
  return {
    key: np.ascontiguousarray(slot.to_torch(np.asarray(jax.device_get(slot.variable[...]), np.float32)))
    for key, slot in torch_slots(model).items()
  }


class KeyStream:
  """What models take as `rngs`: `params()` gives `fold_in(key, n)` for n = 0, 1, ..., the keys of
  `nnx.Rngs(key).params()`, with n counted in Python. nnx.Rngs keeps n in a Variable, which is a tracer while a
  model's init is traced, and each update of it builds an error message over the whole trace so far (jax 0.10,
  flax 0.12): tracing SD 1.5's UNet took 11 s and SDXL's 70 s, time quadratic in the number of parameters."""

  def __init__(self, key: jax.Array):
    self.key, self.count = key, 0

  def params(self) -> jax.Array:
    self.count += 1
    return jax.random.fold_in(self.key, self.count - 1)


def abstract_model(build: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
  """The model's structure with shape-only parameters: no memory, no random init."""
  return nnx.eval_shape(lambda: build(KeyStream(jax.random.key(0))))


def init_model(build: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
  """A randomly initialised model, built under one jit (eager init compiles every op on its own).
  The 'unsafe_rbg' generator compiles several times faster than threefry; init needs no more."""
  key = jax.random.key(seed, impl='unsafe_rbg')
  graphdefs = []

  def init():
    graphdef, state = nnx.split(build(KeyStream(key)))
    graphdefs.append(graphdef)  # static structure, captured while tracing: the build runs only once
    return state

  state = jax.jit(init)()
  return nnx.merge(graphdefs[0], state)


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def save_folder(
  folder: str, config: dict, tensors: dict[str, np.ndarray], weights_name: str, config_name: str = 'config.json'
):
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, f'{weights_name}.safetensors'), tensors)
  atomic_write(os.path.join(folder, config_name), json.dumps(config, indent=2, sort_keys=True))
