"""The Qwen2.5-VL and Qwen3-VL decoders compute what transformers' Qwen2_5_VLTextModel / Qwen3VLTextModel
compute, at the M-RoPE positions transformers' get_rope_index gives, and a cached decode continues a prompt
as the full forward does.

The prompts hold two images of different grids in one row, one image in another, none in a third, all left
padded. Each model runs as one jitted program: the full forward, then a prefill of all but the last token
into a KV cache and the last token decoded at its slot.
"""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import perturb_, rel_err
from flax import nnx

from jaxdream.distributed.sharding import logical_axes
from jaxdream.io.weights import abstract_model, load_state_dict
from jaxdream.models.config import ConfigError
from jaxdream.models.qwen_text import (
  QwenTextModel,
  decode_position_ids,
  get_rope_index,
  resolve_qwen_text_config,
)

pytestmark = pytest.mark.reference

IMAGE, VISION_START, VISION_END, PAD = 60, 61, 62, 0
MERGE = 2
# Merged grids: (1, 2, 3) -> 6 tokens, (1, 1, 2) -> 2 tokens, (1, 2, 2) -> 4 tokens.
GRIDS = np.array([[1, 4, 6], [1, 2, 4], [1, 4, 4]])
TOKEN_IDS = dict(
  image_token_id=IMAGE, video_token_id=63, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END
)


def _image(n):
  return [VISION_START] + [IMAGE] * n + [VISION_END]


def prompts():
  """input_ids and attention_mask (3, 19), left padded; every row ends in text."""
  rng = np.random.default_rng(0)
  text = lambda n: list(rng.integers(1, 50, n))
  rows = [
    text(2) + _image(6) + text(1) + _image(2) + text(2),
    text(1) + _image(4) + text(7),
    text(16),
  ]
  length = max(map(len, rows)) + 2
  ids = np.array([[PAD] * (length - len(r)) + r for r in rows])
  mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows])
  return ids, mask


def torch_rope_index(model_cls, config, ids, mask):
  """transformers' get_rope_index, without building the vision tower it does not use."""
  fake = types.SimpleNamespace(config=config)
  fake.get_vision_position_ids = lambda *a, **k: model_cls.get_vision_position_ids(fake, *a, **k)
  ids_t = torch.tensor(ids)
  pos, deltas = model_cls.get_rope_index(
    fake,
    ids_t,
    mm_token_type_ids=(ids_t == IMAGE).int(),
    image_grid_thw=torch.tensor(GRIDS),
    attention_mask=torch.tensor(mask),
  )
  return pos.numpy(), deltas.numpy()[:, 0]


def qwen2_5():
  from transformers import Qwen2_5_VLConfig
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel, Qwen2_5_VLTextModel

  config = Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=64,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      rope_parameters=dict(rope_type='default', mrope_section=[4, 2, 2], rope_theta=10000.0),
    ),
    vision_config=dict(spatial_merge_size=MERGE),
    **TOKEN_IDS,
  )
  return config, Qwen2_5_VLModel, Qwen2_5_VLTextModel(config.text_config)


def qwen3():
  from transformers import Qwen3VLConfig
  from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLTextModel

  config = Qwen3VLConfig(
    text_config=dict(
      vocab_size=64,
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      attention_bias=True,
      rope_parameters=dict(rope_type='default', mrope_section=[4, 2, 2], mrope_interleaved=True, rope_theta=10000.0),
    ),
    vision_config=dict(spatial_merge_size=MERGE),
    **TOKEN_IDS,
  )
  return config, Qwen3VLModel, Qwen3VLTextModel(config.text_config)


def _forward_and_decode(model, embeds, positions, valid, prefix_positions, prefix_deltas, deepstack):
  """One program: the full forward, and the last token decoded after a prefill of the others."""
  graphdef, state = nnx.split(model)
  n = embeds.shape[1] - 1

  @jax.jit
  def run(state, embeds, positions, valid, prefix_positions, prefix_deltas, deepstack):
    m = nnx.merge(graphdef, state)
    full, _ = m(embeds, positions, valid, deepstack=deepstack)
    cache = m.init_cache(embeds.shape[0], n + 1)
    _, cache = m(embeds[:, :n], prefix_positions, valid, cache, 0, deepstack=[d[:, :n] for d in deepstack])
    last, _ = m(
      embeds[:, n:], decode_position_ids(n, prefix_deltas), valid, cache, n, deepstack=[d[:, n:] for d in deepstack]
    )
    return full, last[:, 0]

  return run(state, embeds, positions, valid, prefix_positions, prefix_deltas, deepstack)


@pytest.mark.parametrize('build', [qwen2_5, qwen3], ids=['qwen2_5_vl', 'qwen3_vl'])
def test_decoder_matches_transformers_and_cached_decode_matches_full_forward(build):
  config, model_cls, torch_model = build()
  perturb_(torch_model, scale=0.1)
  ids, mask = prompts()
  pads = (mask == 0).sum(1)

  # get_rope_index: transformers' integers; deltas relative to cache slots (transformers' minus the padding).
  kw = dict(spatial_merge_size=MERGE, image_token_id=IMAGE, vision_start_token_id=VISION_START)
  positions, deltas = get_rope_index(ids, GRIDS, mask, **kw)
  want_pos, want_deltas = torch_rope_index(model_cls, config, ids, mask)
  np.testing.assert_array_equal(positions, want_pos)
  np.testing.assert_array_equal(deltas, want_deltas - pads)
  assert positions[:, 0].max() < positions.shape[-1] - 2  # the images really compress row 0's positions
  n = ids.shape[1] - 1
  prefix_positions, prefix_deltas = get_rope_index(ids[:, :n], GRIDS, mask[:, :n], **kw)
  np.testing.assert_array_equal(np.asarray(decode_position_ids(n, prefix_deltas))[..., 0], positions[:, :, n])

  cfg = resolve_qwen_text_config(config.to_dict(), config.model_type)
  model = abstract_model(lambda rngs: QwenTextModel(cfg, rngs=rngs))
  load_state_dict(model, {k: v.numpy() for k, v in torch_model.state_dict().items()})
  axes = logical_axes(model)
  assert axes['layers/0/self_attn/k_proj/kernel'] == ('embed', 'heads')
  assert axes['layers/0/mlp/down_proj/kernel'] == ('mlp', 'embed')

  rng = np.random.default_rng(1)
  embeds = rng.standard_normal((*ids.shape, cfg['hidden_size'])).astype(np.float32)
  visual = ids == IMAGE
  torch_kw, deepstack = {}, []
  if cfg['qk_norm']:  # Qwen3-VL: deepstack features added after each layer, at the image tokens; as transformers,
    # one more than the 3 layers goes unused
    features = [rng.standard_normal((visual.sum(), cfg['hidden_size'])).astype(np.float32) for _ in range(4)]
    for f in features:
      d = np.zeros_like(embeds)
      d[visual] = f
      deepstack.append(d)
    torch_kw = dict(visual_pos_masks=torch.tensor(visual), deepstack_visual_embeds=[torch.tensor(f) for f in features])
  with torch.no_grad():
    want = torch_model(
      inputs_embeds=torch.tensor(embeds),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(want_pos),
      **torch_kw,
    ).last_hidden_state.numpy()

  full, last = _forward_and_decode(
    model, jnp.asarray(embeds), positions, jnp.asarray(mask, bool), prefix_positions, prefix_deltas, deepstack
  )
  real = mask.astype(bool)
  assert rel_err(np.asarray(full)[real], want[real]) <= 1e-5
  assert rel_err(last, np.asarray(full)[:, n]) <= 1e-5
  if deepstack:  # the deepstack features matter (else the comparison above would not test them)
    plain = torch_model(
      inputs_embeds=torch.tensor(embeds), attention_mask=torch.tensor(mask), position_ids=torch.tensor(want_pos)
    )
    assert rel_err(plain.last_hidden_state.detach().numpy()[real], want[real]) > 1e-2


def test_config_forms_and_errors():
  from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

  text = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=64)
  nested = resolve_qwen_text_config(
    dict(model_type='qwen2_5_vl', text_config=dict(text, rope_scaling=dict(type='mrope', mrope_section=[4, 2, 2]))),
    'qwen2_5_vl',
  )
  # Older Qwen2.5-VL folders keep the text fields at the top level, theta beside rope_scaling.
  flat = resolve_qwen_text_config(
    dict(text, model_type='qwen2_5_vl', rope_theta=1e6, rope_scaling=dict(type='mrope', mrope_section=[4, 2, 2])),
    'qwen2_5_vl',
  )
  assert nested == flat
  assert flat['head_dim'] == 16 and flat['mrope_section'] == (4, 2, 2) and flat['rope_theta'] == 1e6
  assert (flat['qkv_bias'], flat['o_bias'], flat['qk_norm'], flat['mrope_interleaved']) == (True, False, False, False)
  q3 = resolve_qwen_text_config(Qwen3VLConfig().to_dict(), 'qwen3_vl')  # transformers' defaults: Qwen3-VL-8B's shape
  assert (q3['head_dim'], q3['mrope_section'], q3['mrope_interleaved'], q3['qk_norm']) == (
    128,
    (24, 20, 20),
    True,
    True,
  )
  assert resolve_qwen_text_config(Qwen2_5_VLConfig().to_dict(), 'qwen2_5_vl')['mrope_section'] == (16, 24, 24)

  bad = [
    (dict(text, rope_scaling=dict(rope_type='yarn', mrope_section=[4, 2, 2])), 'rope_scaling.rope_type'),
    (dict(text, use_sliding_window=True, max_window_layers=0), 'use_sliding_window'),
    (dict(text, rope_parameters=dict(mrope_section=[4, 4, 4])), 'mrope_section'),
    (dict(text, rope_parameters=dict(mrope_section=[4, 2, 2], mrope_interleaved=True)), 'mrope_interleaved'),
    (dict(text, hidden_act='swiglu'), 'hidden_act'),
    (dict(text, num_key_value_heads=3), 'num_key_value_heads'),
  ]
  for text_config, key in bad:
    with pytest.raises(ConfigError, match=key):
      resolve_qwen_text_config(dict(text_config=text_config), 'qwen2_5_vl')
  with pytest.raises(ConfigError, match='qwen2_vl'):
    resolve_qwen_text_config({}, 'qwen2_vl')

  ids, mask = prompts()
  kw = dict(spatial_merge_size=MERGE, image_token_id=IMAGE, vision_start_token_id=VISION_START)
  with pytest.raises(ValueError, match='an image run of 6 tokens'):
    get_rope_index(ids, GRIDS[[1, 0, 2]], mask, **kw)
  with pytest.raises(ValueError, match='more image-token runs'):
    get_rope_index(ids, GRIDS[:2], mask, **kw)
  with pytest.raises(ValueError, match='more rows'):
    get_rope_index(ids, np.concatenate([GRIDS, GRIDS]), mask, **kw)
  with pytest.raises(ValueError, match='vision_start_token_id'):
    get_rope_index(np.where(ids == VISION_START, 5, ids), GRIDS, mask, **kw)


def test_a_lone_bfloat16_row_is_computed_as_among_other_rows():
  """Batch-1 decoding multiplies one row: `matmul` gives a lone bfloat16 row a zero companion on CPU (XLA:CPU's
  single-row loop is ~10x slower than the kernel it uses from two rows on). The row's numbers are those it
  gets among other rows: float32-accumulated, rounded once to bfloat16, in the input's shape."""
  from jaxdream.nn.layers import matmul

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 1, 96)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((96, 40)) * 0.1, jnp.float32)
  one = jax.jit(matmul, static_argnums=2)(x, w, jnp.bfloat16)
  among = jax.jit(matmul, static_argnums=2)(jnp.concatenate([x, -x, 2 * x]), w, jnp.bfloat16)[:1]
  assert one.shape == (1, 1, 40) and one.dtype == jnp.bfloat16
  exact = np.asarray(x, np.float32) @ np.asarray(w.astype(jnp.bfloat16), np.float32)
  ulp = 2.0**-7 * np.abs(exact)  # one bfloat16 rounding
  np.testing.assert_array_less(np.abs(np.asarray(one, np.float32) - exact), ulp + 1e-6)
  np.testing.assert_array_less(np.abs(np.asarray(one, np.float32) - np.asarray(among, np.float32)), ulp + 1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('rows', [1, 3])
def test_out_in_linear_loads_torch_weights_and_computes_as_linear(dtype, rows):
  """nn.layers.LinearOutIn keeps torch's (out, in) weight as it is and computes what Linear computes from the
  same weight (float32: the same products; bfloat16: within one rounding), its int8 form too, and writes the
  weight back unchanged."""
  from jaxdream.io.weights import state_dict
  from jaxdream.nn.adapters import quantize_int8
  from jaxdream.nn.layers import Linear, LinearOutIn, linear_class

  assert linear_class(jnp.float32) is Linear and linear_class(jnp.bfloat16) is LinearOutIn
  rng = np.random.default_rng(rows)
  weights = {'weight': rng.standard_normal((40, 96)).astype(np.float32) * 0.1, 'bias': rng.standard_normal(40)}
  weights['bias'] = weights['bias'].astype(np.float32)
  layers = {}
  for cls in (Linear, LinearOutIn):
    layer = cls(96, 40, axes=('embed', 'mlp'), dtype=dtype, rngs=nnx.Rngs(0))
    load_state_dict(layer, weights, source='test')
    layers[cls] = layer
  assert layers[LinearOutIn].kernel.shape == (40, 96)
  assert layers[LinearOutIn].param_axes()['kernel'] == ('mlp', 'embed')
  assert all(np.array_equal(state_dict(layers[LinearOutIn])[k], weights[k]) for k in weights)
  x = jnp.asarray(rng.standard_normal((rows, 1, 96)), dtype)
  ulp = 0 if dtype == jnp.float32 else 2.0**-7
  for quantize in (False, True):
    if quantize:
      layers = {k: quantize_int8(nnx.Sequential(v)).layers[0] for k, v in layers.items()}
    a, b = (np.asarray(jax.jit(lambda m, x: m(x))(layers[c], x), np.float32) for c in (Linear, LinearOutIn))
    assert a.shape == b.shape == (rows, 1, 40)
    np.testing.assert_allclose(b, a, rtol=ulp + 1e-6, atol=1e-6)


def test_out_in_linear_in_a_decoding_loop_reads_its_weight_in_place():
  """A (batch, 1, features) bfloat16 input against an (out, in) kernel inside a loop (decoding) once made
  XLA:CPU hoist a transposed copy of the kernel out of the loop, every call (the 3B model's batch-4 prefill
  took 1.8x as long): LinearOutIn flattens the rows first, and the compiled loop holds no copy of the weight."""
  from jaxdream.nn.layers import LinearOutIn

  up = LinearOutIn(256, 1024, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  down = LinearOutIn(1024, 256, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  for m in (up, down):  # bfloat16 weights, as vlm.load(dtype=bfloat16) keeps them
    m.kernel.set_value(m.kernel[...].astype(jnp.bfloat16))
  x = jnp.ones((4, 1, 256), jnp.bfloat16)
  loop = jax.jit(lambda up, down, x: jax.lax.fori_loop(0, 3, lambda i, x: down(up(x)) * 0.01, x))
  hlo = loop.lower(up, down, x).compile().as_text()
  weights = ('[256,1024]', '[1024,256]')  # either orientation of either kernel
  moved = [
    line for line in hlo.splitlines() if ('copy(' in line or 'transpose(' in line) and any(w in line for w in weights)
  ]
  assert not moved, moved
  assert loop(up, down, x).shape == (4, 1, 256)


def test_token_lookup_and_tied_head_in_a_decoding_loop_read_the_bfloat16_table_in_place():
  """The decoding loop looks tokens up in the bfloat16 embedding table and (tied heads) multiplies by it. XLA:CPU
  used to compute both on a float32 copy of the table, hoisted out of the loop and made on every call (1.24 GB
  for Qwen2.5-VL-3B): Embed ties the lookup to the ids and reads the head's table as an (out, in) weight, so
  the compiled loop holds no converted copy of the table, and its numbers are the plain computation's."""
  from jaxdream.nn.layers import Embed

  embed = Embed(8192, 256, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  embed.embedding.set_value(embed.embedding[...].astype(jnp.bfloat16))

  def decode(embed, ids):
    step = lambda i, ids: jnp.argmax(embed.attend(embed(ids) * 1.5).astype(jnp.float32), -1).astype(jnp.int32)
    return jax.lax.fori_loop(0, 3, step, ids)

  ids = jnp.asarray([3, 4000], jnp.int32)
  loop = jax.jit(decode)
  hlo = loop.lower(embed, ids).compile().as_text()
  # A float32 table made by a fusion, or taken by one (the product); a conversion inside the lookup's fusion
  # touches only the looked-up rows.
  f32_table = re.compile(r'(: f32\[8192,256\]|-> f32\[8192,256\]|= f32\[8192,256\]\S* fusion\()')
  copies = [line for line in hlo.splitlines() if f32_table.search(line)]
  assert not copies, copies
  table = np.asarray(embed.embedding[...], np.float32)
  expected = np.asarray(ids)
  for _ in range(3):  # the same steps in numpy: bfloat16 rows, float32 products
    rows = np.asarray(jnp.asarray(table[expected] * 1.5, jnp.bfloat16), np.float32)
    expected = np.argmax(rows @ table.T, -1)
  np.testing.assert_array_equal(loop(embed, ids), expected)


@pytest.mark.parametrize('int8', [False, True], ids=['bfloat16', 'int8'])
def test_a_lone_row_in_a_decoding_loop_converts_its_half_precision_weight_as_it_reads_it(int8):
  """Batch-1 decoding against (out, in) bfloat16 or int8 weights: `matmul` computes the row as a float32
  vector-matrix product of the converted weight, which XLA:CPU fuses into the conversion (in parts below its
  4,095-float limit: 5,000 inputs here), and generation compiles its loops without hoisting loop invariants
  (`compiler_options(decoding=True)`), so no float32 copy of a weight is made; the numbers are the exact
  products summed in float32, rounded once to bfloat16."""
  from jaxdream.nn.adapters import quantize_int8
  from jaxdream.nn.layers import LinearOutIn
  from jaxdream.runtime import compiler_options

  layers = nnx.Sequential(
    LinearOutIn(5000, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
    LinearOutIn(64, 5000, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)),
  )
  for m in layers.layers:
    m.kernel.set_value(m.kernel[...].astype(jnp.bfloat16))
  if int8:
    quantize_int8(layers)

  def decode(layers, x):
    return jax.lax.fori_loop(0, 3, lambda i, x: layers(x) * 0.5, x)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 5000)), jnp.bfloat16)
  compiled = jax.jit(decode, compiler_options=compiler_options(jnp.bfloat16, decoding=True)).lower(layers, x).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 5000 * 64 * 2  # less than one bfloat16 weight
  y = np.asarray(x, np.float32)
  for _ in range(3):
    for m in layers.layers:
      w = np.asarray(m.kernel[...], np.float32)
      if int8:
        w = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)  # the int8 layer's weight in bfloat16
        y = np.asarray(jnp.asarray(y @ w.T, jnp.bfloat16), np.float32)
        y = y * np.asarray(m.scale[...].astype(jnp.bfloat16), np.float32)
      else:
        y = np.asarray(jnp.asarray(y @ w.T, jnp.bfloat16), np.float32)
      y = np.asarray(
        jnp.asarray(y + np.asarray(m.bias[...].astype(jnp.bfloat16), np.float32), jnp.bfloat16), np.float32
      )
    y = np.asarray(jnp.asarray(y * 0.5, jnp.bfloat16), np.float32)
  np.testing.assert_allclose(np.asarray(compiled(layers, x), np.float32), y, rtol=0.02, atol=0.02)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
def test_int8_layers_in_a_decoding_loop_convert_one_weight_at_a_time(dtype):
  """XLA:CPU multiplies int8 weights as converted copies. Independent of the input, the conversions were hoisted
  out of the decoding loop: a full-precision copy of every weight held through generation (Qwen2.5-VL-3B in
  bfloat16: 5.77 GiB of temporaries next to 2.88 GiB of int8 weights). Tied to each layer's input, one copy
  lives at a time, and the layers compute the same numbers."""
  from jaxdream.nn.adapters import quantize_int8
  from jaxdream.nn.layers import linear_class

  layers = nnx.Sequential(*[linear_class(dtype)(512, 512, dtype=dtype, rngs=nnx.Rngs(i)) for i in range(6)])
  quantize_int8(layers)

  def decode(layers, x):
    return jax.lax.fori_loop(0, 3, lambda i, x: layers(x) * 0.05, x)

  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, 512)), dtype)
  compiled = jax.jit(decode).lower(layers, x).compile()
  one_copy = 512 * 512 * jnp.dtype(dtype).itemsize
  assert compiled.memory_analysis().temp_size_in_bytes < 2.5 * one_copy
  y = x
  for _ in range(3):  # the plain dequantized products, eagerly
    for layer in layers.layers:
      k, scale = np.asarray(layer.kernel[...], np.float32), np.asarray(layer.scale[...], np.float32)
      w = (k * scale[:, None]).T if layer.out_in else k * scale  # (in, out)
      y = (jnp.asarray(np.asarray(y, np.float32) @ w, dtype) + layer.bias[...].astype(dtype)) * 0.05
  np.testing.assert_allclose(
    np.asarray(compiled(layers, x), np.float32), np.asarray(y, np.float32), rtol=0.02, atol=0.02
  )
