"""Many LoRA adapters in one sampling batch: each image equals its prompt sampled alone with its adapter
merged at its weight, new adapter ids or weights never recompile, and concurrent calls with different
adapters do not meet."""

import dataclasses
import threading

import jax
import numpy as np
import pytest
from conftest import tiny_base
from flax import nnx

from jaxdream import load_pipeline
from jaxdream.diffusion.adapters import stack_adapters
from jaxdream.diffusion.sampling import img2img, txt2img
from jaxdream.nn.adapters import LoRAConv2d, LoRALinear, LoRAParam, add_lora, lora_layers, merge_lora_layers
from jaxdream.nn.layers import Conv2d, Linear

RANK = 2
UNET_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0')
TEXT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
ALPHAS = (None, 4.0, 1.0)  # adapter scales 1, 2 and 0.5: stacking must fold each one's own scale
# A repeated id at two weights, weight 0 (the base model), and ids in any order.
PROMPTS = ['a photo of sks dog', 'a red fox', 'a photo of sks dog', 'a castle', 'a cat']
IDS = [0, 1, 0, 2, 1]
SCALES = [1.0, 0.6, 1.5, 1.0, 0.0]
SEEDS = [3, 4, 5, 6, 7]
KW = dict(num_inference_steps=2, guidance_scale=7.5, scheduler='ddim', height=32, width=32, seed=SEEDS)


def test_per_example_factors_give_each_example_its_own_adapter():
  rngs, keys = nnx.Rngs(0), jax.random.split(jax.random.key(1), 6)
  cases = (
    (LoRALinear(Linear(6, 5, rngs=rngs), 2, scale=0.5, key=keys[0]), (3, 7, 6)),
    (LoRAConv2d(Conv2d(3, 4, 3, stride=2, rngs=rngs), 2, scale=0.5, key=keys[1]), (3, 8, 8, 3)),
  )
  for layer, x_shape in cases:
    x = jax.random.normal(keys[2], x_shape)
    a = jax.random.normal(keys[3], (3,) + layer.lora_a.shape)
    b = jax.random.normal(keys[4], (3,) + layer.lora_b.shape)
    expected = []
    for i in range(3):  # example i alone with adapter i as shared factors
      layer.lora_a, layer.lora_b = LoRAParam(a[i]), LoRAParam(b[i])
      expected.append(layer(x[i : i + 1])[0])
    layer.lora_a, layer.lora_b = LoRAParam(a), LoRAParam(b)
    np.testing.assert_allclose(layer(x), np.stack(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='per-example LoRA factors for 3 examples, but the input has 2'):
      layer(x[:2])


def _adapted(base, key, *, rank=RANK, alpha=None, unet_targets=UNET_TARGETS) -> dict:
  """Copies of the base UNet and text encoder with LoRA on attention (LoCon on the resnet convs) and
  random nonzero B, so that every adapter changes the images."""
  comps = {'unet': nnx.clone(base.unet), 'text_encoder': nnx.clone(base.text_encoder)}
  kw = dict(rank=rank, alpha=alpha)
  add_lora(comps['unet'], targets=unet_targets, conv_targets=('conv1', 'conv2'), conv_rank=rank, key=key, **kw)
  add_lora(comps['text_encoder'], targets=TEXT_TARGETS, key=jax.random.fold_in(key, 1), **kw)
  for j, model in enumerate(comps.values()):
    for i, layer in enumerate(lora_layers(model).values()):
      k = jax.random.fold_in(jax.random.fold_in(key, 2 + j), i)
      layer.lora_b = LoRAParam(0.5 * jax.random.normal(k, layer.lora_b.shape))
  return comps


def _with(base, comps, compiled=None):
  pipe = dataclasses.replace(base, components=dict(base.components, **comps))
  if compiled is not None:
    pipe.compiled = compiled  # same structure: one compiled loop for all the references
  return pipe


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  base = load_pipeline(tiny_base(str(tmp_path_factory.mktemp('tiny'))))
  adapters = [_adapted(base, jax.random.key(10 + i), alpha=a) for i, a in enumerate(ALPHAS)]
  stacked = stack_adapters(adapters)
  # The pipeline sampled from carries LoRA layers of its own, with values that must not be used.
  lora_pipe = _with(base, _adapted(base, jax.random.key(99)))
  refs = []  # each image's prompt alone, its adapter merged at its weight (weight 0: the base model itself)
  for prompt, i, s, seed in zip(PROMPTS, IDS, SCALES, SEEDS):
    comps = {c: nnx.clone(m) for c, m in adapters[i].items()}
    for m in comps.values():
      merge_lora_layers(m, weight=s)
    ref_pipe = base if s == 0 else _with(base, comps, base.compiled)
    refs.append(txt2img(ref_pipe, [prompt], output_type='latent', **dict(KW, seed=[seed]))[0])
  images = txt2img(lora_pipe, PROMPTS, adapters=stacked, adapter_ids=IDS, adapter_scales=SCALES, **KW)
  return dict(base=base, adapters=adapters, stacked=stacked, pipe=lora_pipe, refs=np.stack(refs), images=images)


def _rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_each_image_is_its_prompt_alone_with_its_adapter_merged_at_its_weight(setup):
  pipe = _with(setup['base'], {c: setup['pipe'].components[c] for c in ('unet', 'text_encoder')})
  kw = dict(adapters=setup['stacked'], adapter_ids=IDS, adapter_scales=SCALES)
  latents = txt2img(pipe, PROMPTS, output_type='latent', **kw, **KW)
  refs = setup['refs']
  errors = [_rel_err(latents[b], refs[b]) for b in range(len(PROMPTS))]
  assert max(errors) <= 1e-5, errors
  # The adapters matter: far above that tolerance, each image differs from the base model's (image 4).
  base_same_seed = [_rel_err(refs[b], refs[4]) for b in range(4)]
  assert min(base_same_seed) > 1e-2, base_same_seed


def test_a1111_prompts_with_editing_and_a_longer_negative_keep_each_images_adapter(setup):
  """Prompt editing encodes each image's texts as extra text-encoder rows, and a negative prompt of more chunks
  runs the two halves of guidance as separate UNet calls: each row still gets its image's adapter."""
  prompts, ids, scales, seeds = ['a photo of a [dog:(red fox:1.2):0.5]', 'a castle'], [0, 1], [1.0, 0.6], [3, 4]
  negative = 'blurry, ' * 40  # 2 chunks, the prompts 1
  kw = dict(KW, prompt_syntax='a1111')
  refs = []
  for prompt, i, scale, seed in zip(prompts, ids, scales, seeds):
    comps = {c: nnx.clone(m) for c, m in setup['adapters'][i].items()}
    for m in comps.values():
      merge_lora_layers(m, weight=scale)
    ref_pipe = _with(setup['base'], comps, setup['base'].compiled)
    refs.append(
      txt2img(ref_pipe, [prompt], negative_prompts=[negative], output_type='latent', **dict(kw, seed=[seed]))[0]
    )
  pipe = _with(setup['base'], {c: setup['pipe'].components[c] for c in ('unet', 'text_encoder')})
  latents = txt2img(
    pipe, prompts, negative_prompts=[negative] * 2, adapters=setup['stacked'], adapter_ids=ids, adapter_scales=scales,
    output_type='latent', **dict(kw, seed=seeds),
  )  # fmt: skip
  errors = [_rel_err(latents[b], refs[b]) for b in range(2)]
  assert max(errors) <= 1e-5, errors


def test_images_are_within_2_of_255_of_the_merged_models(setup):
  from conftest import jit_call

  vae = setup['base'].vae
  decoded = np.asarray(jit_call(vae, 'decode')(setup['refs'] / vae.scaling_factor + vae.shift_factor))
  expected = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.int32)
  diff = np.abs(setup['images'].astype(np.int32) - expected)
  assert setup['images'].shape == (len(PROMPTS), 32, 32, 3)
  assert diff.max() <= 2, diff.max()


def test_new_adapter_ids_and_scales_do_not_recompile(setup):
  pipe = setup['pipe']
  ids, scales = [0, 2, 1, 1, 0], [1.0, 1.0, 0.3, 0.0, 2.0]  # image 0 unchanged, the others changed
  again = txt2img(pipe, PROMPTS, adapters=setup['stacked'], adapter_ids=ids, adapter_scales=scales, **KW)
  (fn,) = pipe.compiled.values()
  assert fn._cache_size() == 1
  assert np.array_equal(again[0], setup['images'][0])
  for b in range(1, len(PROMPTS)):
    assert not np.array_equal(again[b], setup['images'][b]), b


def test_two_threads_with_different_adapters_get_their_own_images(setup):
  pipe, images = setup['pipe'], setup['images']
  reversed_stack = stack_adapters(setup['adapters'][::-1])
  kw = dict(adapter_scales=SCALES, **KW)
  alone = txt2img(pipe, PROMPTS, adapters=reversed_stack, adapter_ids=IDS, **kw)
  # Reversed ids into the reversed stack are the same adapters: the same images.
  mirrored = txt2img(pipe, PROMPTS, adapters=reversed_stack, adapter_ids=[2 - i for i in IDS], **kw)
  assert np.array_equal(mirrored, images)
  jobs = {'a': setup['stacked'], 'b': reversed_stack}
  together, errors, start = {}, [], threading.Barrier(2)

  def worker(name):
    try:
      start.wait()
      together[name] = txt2img(pipe, PROMPTS, adapters=jobs[name], adapter_ids=IDS, **kw)
    except Exception as e:  # noqa: BLE001 -- reported by the main thread
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(name,)) for name in jobs]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert not errors, errors
  assert np.array_equal(together['a'], images) and np.array_equal(together['b'], alone)
  assert not np.array_equal(images[0], alone[0])  # adapter 0 vs adapter 2: the two calls differ
  (fn,) = pipe.compiled.values()
  assert fn._cache_size() == 1


def test_img2img_without_guidance_uses_each_images_adapter(setup):
  # guidance_scale 1: one UNet pass per image (no unconditional half), through the same per-image loop.
  base, adapters = setup['base'], setup['adapters']
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  kw = dict(num_inference_steps=3, strength=0.7, guidance_scale=1.0, scheduler='ddim')
  prompts, ids, scales, seeds = PROMPTS[:2], [2, 0], [0.8, 0.0], [1, 2]
  pipe = _with(base, {c: setup['pipe'].components[c] for c in ('unet', 'text_encoder')})
  stacked = setup['stacked']
  batched = img2img(pipe, prompts, images, adapters=stacked, adapter_ids=ids, adapter_scales=scales, seed=seeds, **kw)
  merged = {c: nnx.clone(m) for c, m in adapters[2].items()}
  for m in merged.values():
    merge_lora_layers(m, weight=0.8)
  refs = [
    img2img(p, prompts[b : b + 1], images[b : b + 1], seed=[seeds[b]], **kw)[0]
    for b, p in enumerate([_with(base, merged, base.compiled), base])
  ]
  diff = [int(np.abs(batched[b].astype(np.int32) - refs[b]).max()) for b in range(2)]
  assert max(diff) <= 1, diff
  base_0 = img2img(base, prompts[:1], images[:1], seed=seeds[:1], **kw)[0]
  assert np.abs(refs[0].astype(np.int32) - base_0).mean() > 5  # the adapter matters


def test_adapters_that_do_not_stack_or_fit_are_clear_errors(setup):
  base, adapters, stacked = setup['base'], setup['adapters'], setup['stacked']
  with pytest.raises(ValueError, match='different ranks'):
    stack_adapters([adapters[0], _adapted(base, jax.random.key(1), rank=RANK + 1)])
  with pytest.raises(ValueError, match='different targets'):
    stack_adapters([adapters[0], _adapted(base, jax.random.key(1), unet_targets=('to_q',))])
  with pytest.raises(ValueError, match='no LoRA layers'):
    stack_adapters([base])
  with pytest.raises(ValueError, match='do not fit the pipeline'):
    txt2img(base, PROMPTS, adapters=stacked, adapter_ids=IDS, **KW)
  with pytest.raises(ValueError, match=r'adapter_ids \[3\] out of range'):
    txt2img(setup['pipe'], PROMPTS, adapters=stacked, adapter_ids=[0, 1, 3, 2, 1], **KW)
  with pytest.raises(ValueError, match='2 adapter_scales for 5 prompts'):
    txt2img(setup['pipe'], PROMPTS, adapters=stacked, adapter_ids=IDS, adapter_scales=[1.0, 0.5], **KW)
  with pytest.raises(ValueError, match='need adapters'):
    txt2img(setup['pipe'], PROMPTS, adapter_ids=IDS, **KW)


def test_adapters_split_over_a_mesh_give_the_single_device_images(setup):
  # 5 images over 8 devices: the ids and scales are split and padded with the other per-image inputs.
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  pipe = _with(setup['base'], {c: setup['pipe'].components[c] for c in ('unet', 'text_encoder')})
  kw = dict(adapters=setup['stacked'], adapter_ids=IDS, adapter_scales=SCALES, mesh=mesh)
  sharded = txt2img(pipe, PROMPTS, **kw, **KW)
  assert int(np.abs(sharded.astype(np.int32) - setup['images']).max()) <= 1
