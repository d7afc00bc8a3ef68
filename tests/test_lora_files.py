"""LoRA files: ours load in diffusers, diffusers/peft's and kohya's load in jaxdream, with the same outputs."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, nhwc, rel_err
from flax import nnx

from jaxdream.diffusion.pipeline import load_pipeline
from jaxdream.io.weights import WeightsError, read_safetensors, write_safetensors
from jaxdream.lora import apply_lora, check_lora, load_lora, merge_lora, save_lora
from jaxdream.lora.files import METADATA_KEY, ldm_names, original_unet_names, read_safetensors_metadata
from jaxdream.models import presets
from jaxdream.nn.adapters import add_lora, lora_layers

UNET_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0')
TE_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')


@pytest.fixture(scope='module')
def pipe(tiny_sd_folder):
  return load_pipeline(tiny_sd_folder[1])


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
  ids = np.array([[49406, 320, 1125, 539, 49407] + [49407] * 72], np.int32)
  return z, ids


@pytest.fixture(scope='module')
def run(pipe):
  """UNet and text encoder outputs of a pipeline with the base structure (one compile each for all tests)."""
  unet_def, te_def = nnx.graphdef(pipe.unet), nnx.graphdef(pipe.text_encoder)
  unet = jax.jit(lambda s, z, t, c: nnx.merge(unet_def, s)(z, t, c))
  te = jax.jit(lambda s, ids: nnx.merge(te_def, s)(ids))

  def outputs(p, z, ids):
    context = te(nnx.state(p.text_encoder), jnp.asarray(ids))
    eps = unet(nnx.state(p.unet), jnp.asarray(z), jnp.array([400]), context)
    return np.asarray(context), nchw(eps)

  return outputs


def torch_outputs(tpipe, z, ids):
  with torch.no_grad():
    context = tpipe.text_encoder(torch.from_numpy(ids).long())[0]
    eps = tpipe.unet(torch.from_numpy(nchw(z)), 400, context).sample
  return context.numpy(), eps.numpy()


def torch_pipe(path, monkeypatch, pipeline='StableDiffusionPipeline'):
  """diffusers' pipeline from the tiny folder, ready to take LoRA files (which needs peft)."""
  peft = pytest.importorskip('peft')
  import diffusers
  import transformers.integrations.peft as tp
  from packaging.version import Version

  # transformers may ask for a peft newer than any published; the adapter API these tests use is older.
  if Version(peft.__version__) < Version(tp.MIN_PEFT_VERSION):
    monkeypatch.setattr(tp, 'MIN_PEFT_VERSION', peft.__version__)

  return getattr(diffusers, pipeline).from_pretrained(path).to(torch.float32)


@pytest.fixture(scope='module')
def adapted(pipe):
  """Copies of the tiny UNet and text encoder with trained-looking adapters: nonzero B, alpha != rank, a LoCon
  resnet conv with its own rank and alpha, and GEGLU's projection (its output features interleaved in jaxdream,
  [h; gate] in torch files)."""
  unet, te = nnx.clone(pipe.unet), nnx.clone(pipe.text_encoder)
  add_lora(
    unet, targets=(*UNET_TARGETS, 'ff.net.0.proj'), rank=4, alpha=8, conv_targets=('resnets.0.conv1',), conv_rank=2, conv_alpha=1,
    key=jax.random.key(1),
  )  # fmt: skip
  add_lora(te, targets=TE_TARGETS, rank=2, alpha=3, key=jax.random.key(2))
  for i, layer in enumerate([*lora_layers(unet).values(), *lora_layers(te).values()]):
    layer.lora_b.set_value(jax.random.normal(jax.random.key(i), layer.lora_b.shape) * 0.2)
  return {'unet': unet, 'text_encoder': te, 'vae': pipe.vae}


@pytest.mark.reference
@pytest.mark.parametrize('fmt', ['diffusers', 'kohya'])
def test_our_lora_file_loads_in_diffusers_with_the_outputs_of_our_merged_pipeline(
  fmt, tiny_sd_folder, pipe, adapted, run, inputs, tmp_path, monkeypatch
):
  path = save_lora(str(tmp_path / 'lora.safetensors'), adapted, format=fmt)
  tensors = read_safetensors(path)
  if fmt == 'kohya':
    assert all(k.startswith(('lora_unet_', 'lora_te_')) for k in tensors)
    assert float(tensors['lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha']) == 8
  else:
    meta = json.loads(read_safetensors_metadata(path)[METADATA_KEY])
    assert (meta['unet.r'], meta['unet.lora_alpha'], meta['text_encoder.lora_alpha']) == (4, 8, 3)
    assert set(meta['unet.rank_pattern'].values()) == {2}
  tp = torch_pipe(tiny_sd_folder[1], monkeypatch)
  tp.load_lora_weights(str(tmp_path), weight_name='lora.safetensors')
  ref_context, ref_eps = torch_outputs(tp, *inputs)
  merged = merge_lora(pipe, [(path, 1.0)])
  context, eps = run(merged, *inputs)
  base_context, _ = run(pipe, *inputs)
  assert rel_err(base_context, ref_context) > 1e-2  # the adapters change the outputs
  assert rel_err(context, ref_context) <= 1e-4
  assert rel_err(eps, ref_eps) <= 1e-4


def test_apply_lora_attaches_the_files_factors_unmerged(adapted, pipe, tmp_path):
  path = save_lora(str(tmp_path / 'lora.safetensors'), adapted)
  comps = {'unet': nnx.clone(pipe.unet), 'text_encoder': nnx.clone(pipe.text_encoder)}
  done = apply_lora(comps, path, 0.5)
  assert done['unet'] == sorted(lora_layers(adapted['unet']))
  assert any(n.endswith('ff.net.0.proj') for n in done['unet'])  # GEGLU's projection takes an adapter too
  for comp in ('unet', 'text_encoder'):
    want, got = lora_layers(adapted[comp]), lora_layers(comps[comp])
    assert sorted(got) == sorted(want)
    for name, layer in got.items():
      np.testing.assert_array_equal(layer.lora_a[...], want[name].lora_a[...])
      np.testing.assert_array_equal(layer.lora_b[...], want[name].lora_b[...])
      assert layer.lora_scale == pytest.approx(0.5 * want[name].lora_scale)
  with pytest.raises(WeightsError, match='already|plain|cannot attach|Linear'):
    apply_lora(comps, path)


@pytest.mark.reference
def test_file_written_by_diffusers_and_peft_loads_with_the_same_outputs(
  tiny_sd_folder, pipe, run, inputs, tmp_path, monkeypatch
):
  tp = torch_pipe(tiny_sd_folder[1], monkeypatch)  # skips without peft
  from diffusers import StableDiffusionPipeline
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict

  torch.manual_seed(0)
  unet_cfg = LoraConfig(
    r=4,
    lora_alpha=6,
    target_modules=[*UNET_TARGETS, 'conv1', 'ff.net.0.proj', 'proj_in', 'proj_out'],  # SD1's 1x1-conv projections
    rank_pattern={'conv1': 2},
    alpha_pattern={'conv1': 5, 'attn2.to_k': 1},
    init_lora_weights=False,  # random B: a trained-looking adapter
  )
  te_cfg = LoraConfig(r=2, lora_alpha=7, target_modules=['q_proj', 'v_proj', 'fc1'], init_lora_weights=False)
  tp.unet.add_adapter(unet_cfg)
  tp.text_encoder.add_adapter(te_cfg)
  StableDiffusionPipeline.save_lora_weights(
    str(tmp_path),
    unet_lora_layers=get_peft_model_state_dict(tp.unet),
    text_encoder_lora_layers=get_peft_model_state_dict(tp.text_encoder),
    unet_lora_adapter_metadata=unet_cfg.to_dict(),
    text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
  )
  ref_context, ref_eps = torch_outputs(tp, *inputs)
  lora = load_lora(str(tmp_path / 'pytorch_lora_weights.safetensors'))
  assert lora.format == 'diffusers'
  assert {m.scale for m in lora.modules['text_encoder'].values()} == {3.5}
  context, eps = run(merge_lora(pipe, [(lora, 1.0)]), *inputs)
  assert rel_err(context, ref_context) <= 1e-4
  assert rel_err(eps, ref_eps) <= 1e-4
  # Attached unmerged, as the server does: the same outputs (proj_out's 1x1 conv takes tokens, not an image).
  unet = nnx.clone(pipe.unet)
  apply_lora({'unet': unet, 'text_encoder': nnx.clone(pipe.text_encoder)}, lora)
  context = jnp.asarray(ref_context)
  assert rel_err(nchw(jit_call(unet)(jnp.asarray(inputs[0]), jnp.array([400]), context)), ref_eps) <= 1e-4


def _kohya_to_ldm(key: str) -> str:
  """The tiny SD1 UNet's (layers_per_block=1, three levels) original SD names, written out by hand."""
  table = {
    'down_blocks_0_attentions_0': 'input_blocks_1_1',
    'down_blocks_0_resnets_0_conv1': 'input_blocks_1_0_in_layers_2',
    'down_blocks_1_attentions_0': 'input_blocks_3_1',
    'down_blocks_1_resnets_0_conv1': 'input_blocks_3_0_in_layers_2',
    'down_blocks_2_resnets_0_conv1': 'input_blocks_5_0_in_layers_2',
    'mid_block_attentions_0': 'middle_block_1',
    'mid_block_resnets_0_conv1': 'middle_block_0_in_layers_2',
    'up_blocks_1_attentions_0': 'output_blocks_2_1',
    'up_blocks_1_attentions_1': 'output_blocks_3_1',
    'up_blocks_2_attentions_0': 'output_blocks_4_1',
    'up_blocks_2_attentions_1': 'output_blocks_5_1',
    'up_blocks_0_resnets_0_conv1': 'output_blocks_0_0_in_layers_2',
    'up_blocks_1_resnets_0_conv1': 'output_blocks_2_0_in_layers_2',
    'up_blocks_2_resnets_0_conv1': 'output_blocks_4_0_in_layers_2',
  }
  for new, old in table.items():
    if key.startswith('lora_unet_' + new + '_') or key.startswith('lora_unet_' + new + '.'):
      return 'lora_unet_' + old + key[len('lora_unet_' + new) :]
  raise AssertionError(f'no LDM name for {key}')


def test_kohya_file_with_original_sd_unet_names_merges_like_the_diffusers_named_one(adapted, pipe, tmp_path):
  path = save_lora(str(tmp_path / 'k.safetensors'), adapted, format='kohya')
  ldm = {(_kohya_to_ldm(k) if k.startswith('lora_unet_') else k): v for k, v in read_safetensors(path).items()}
  assert not any('down_blocks' in k for k in ldm)
  write_safetensors(str(tmp_path / 'ldm.safetensors'), ldm)
  want = merge_lora(pipe, [(path, 0.7)])
  got = merge_lora(pipe, [(str(tmp_path / 'ldm.safetensors'), 0.7)])
  for comp in ('unet', 'text_encoder'):
    for a, b in zip(
      jax.tree.leaves(nnx.state(want.components[comp])), jax.tree.leaves(nnx.state(got.components[comp]))
    ):
      np.testing.assert_array_equal(a, b)
  # SD1.x/2.x (two layers per block, four levels): the published name table
  names = ldm_names(2, 4)
  assert names['input_blocks_4_1'] == 'down_blocks_1_attentions_0'
  assert names['input_blocks_3_0_op'] == 'down_blocks_0_downsamplers_0_conv'
  assert names['output_blocks_5_2_conv'] == 'up_blocks_1_upsamplers_0_conv'
  assert names['output_blocks_11_1'] == 'up_blocks_3_attentions_2'


def test_adapters_for_another_model_are_named_and_strict_false_merges_the_rest(adapted, pipe, tmp_path):
  path = save_lora(str(tmp_path / 'lora.safetensors'), adapted)
  tensors = dict(read_safetensors(path))
  q = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  tensors[f'{q}.lora_A.weight'] = np.zeros((4, 7), np.float32)  # another base model's width
  tensors['unet.no_such_block.to_q.lora_A.weight'] = np.zeros((4, 32), np.float32)
  tensors['unet.no_such_block.to_q.lora_B.weight'] = np.zeros((32, 4), np.float32)
  bad = str(tmp_path / 'bad.safetensors')
  write_safetensors(bad, tensors)
  with pytest.raises(WeightsError, match='no_such_block') as e:
    merge_lora(pipe, [(bad, 1.0)])
  assert 'attn1.to_q (update (32, 7), model (32, 32))' in str(e.value)
  before = np.asarray(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.kernel[...])
  with pytest.warns(UserWarning, match='skipped 2'):
    merged = merge_lora(pipe, [(bad, 1.0)], strict=False)
  assert len(merged.lora_skipped) == 2 and any('no_such_block' in s for s in merged.lora_skipped)
  to_k = merged.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.kernel[...]
  assert not np.allclose(to_k, before)  # the rest is merged
  np.testing.assert_array_equal(
    pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.kernel[...], before
  )
  assert merged.vae is pipe.vae


def test_bad_lora_files_are_refused_with_the_reason(tmp_path):
  with pytest.raises(WeightsError, match='pickle'):
    load_lora(str(tmp_path / 'x.ckpt'))
  with pytest.raises(WeightsError, match='no such LoRA file'):
    load_lora(str(tmp_path / 'missing.safetensors'))
  write_safetensors(str(tmp_path / 'loha.safetensors'), {'lora_unet_x.hada_w1_a': np.zeros((2, 2), np.float32)})
  with pytest.raises(WeightsError, match='hada_w1_a'):
    load_lora(str(tmp_path / 'loha.safetensors'))
  write_safetensors(str(tmp_path / 'half.safetensors'), {'unet.a.to_q.lora_A.weight': np.zeros((2, 2), np.float32)})
  with pytest.raises(WeightsError, match='needs both'):
    load_lora(str(tmp_path / 'half.safetensors'))


def test_malformed_factors_and_doubly_named_layers_are_refused_by_name(adapted, pipe, tmp_path):
  q = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  conv = 'unet.down_blocks.0.resnets.0.conv1'

  def refused(tensors, match, merge=False):
    path = str(tmp_path / 'bad.safetensors')
    write_safetensors(path, tensors)
    with pytest.raises(WeightsError, match=match):
      merge_lora(pipe, [(path, 1.0)]) if merge else load_lora(path)

  f32 = lambda *shape: np.ones(shape, np.float32)
  refused({f'{q}.lora_A.weight': f32(0, 32), f'{q}.lora_B.weight': f32(32, 0)}, 'rank 0')
  refused({f'{conv}.lora_A.weight': f32(2, 32, 3, 3), f'{conv}.lora_B.weight': f32(32, 2, 3, 3)}, 'must be 1x1')
  refused(
    {f'{q}.lora_down.weight': f32(2, 32), f'{q}.lora_up.weight': f32(32, 2), f'{q}.alpha': f32(2)}, 'not one number'
  )
  # One layer under two spellings: neither update may silently replace the other.
  kohya = 'lora_unet_' + q.removeprefix('unet.').replace('.', '_')
  twice = {f'{q}.lora_A.weight': f32(2, 32), f'{q}.lora_B.weight': f32(32, 2)}
  refused({**twice, f'{kohya}.lora_down.weight': f32(2, 32), f'{kohya}.lora_up.weight': f32(32, 2)}, 'both adapt', True)
  te = 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
  same = {f'{te}.lora_down.weight': f32(2, 32), f'{te}.lora_up.weight': f32(32, 2)}
  refused({**same, f'{te.replace("lora_te_", "lora_te1_")}.lora_down.weight': f32(2, 32)}, 'same factor')


def test_apply_lora_without_strict_warns_of_the_adapters_it_skips(adapted, pipe, tmp_path):
  path = save_lora(str(tmp_path / 'lora.safetensors'), adapted)
  tensors = dict(read_safetensors(path))
  tensors['unet.no_such_block.to_q.lora_A.weight'] = np.zeros((4, 32), np.float32)
  tensors['unet.no_such_block.to_q.lora_B.weight'] = np.zeros((32, 4), np.float32)
  write_safetensors(str(tmp_path / 'extra.safetensors'), tensors)
  components = {name: nnx.clone(m) for name, m in pipe.components.items()}
  with pytest.warns(UserWarning, match='apply_lora skipped 1 adapter.*no_such_block'):
    apply_lora(components, str(tmp_path / 'extra.safetensors'), strict=False)


def _older_diffusers_name(key: str) -> str:
  """Our diffusers key under the names of older diffusers releases (attention processors, LoRALinearLayer)."""
  key = re.sub(r'\.lora_([AB])\.weight$', lambda m: {'A': '.down', 'B': '.up'}[m.group(1)] + '.weight', key)
  module, factor = key.rsplit('.', 2)[0], '.'.join(key.rsplit('.', 2)[1:])
  if module.startswith('unet.') and re.search(r'attn[12]\.(to_q|to_k|to_v|to_out\.0)$', module):
    parent, proj = re.match(r'(.*attn[12])\.(to_q|to_k|to_v|to_out)', module).groups()
    return f'{parent.removeprefix("unet.")}.processor.{proj}_lora.{factor}'  # no component prefix at all
  if module.startswith('text_encoder.') and re.search(r'self_attn\.(q|k)_proj$', module):
    # diffusers' oldest text-encoder files (here q and k; v and out below as later ones): CLIP's attention named as
    # the UNet's processors name theirs
    parent, proj = re.match(r'(.*self_attn)\.(q|k)_proj$', module).groups()
    return f'{parent}.to_{proj}_lora.{factor}'
  if module.startswith('text_encoder.'):
    return module.replace('text_encoder.text_model.', 'text_encoder.') + f'.lora_linear_layer.{factor}'
  return f'{module}.lora.{factor}'


def test_older_diffusers_names_and_alpha_tensors_merge_like_the_current_layout(adapted, pipe, tmp_path):
  path = save_lora(str(tmp_path / 'new.safetensors'), adapted)
  lora = load_lora(path)
  old = {_older_diffusers_name(k): v for k, v in read_safetensors(path).items()}
  assert any('.processor.to_out_lora.down.weight' in k for k in old) and any('lora_linear_layer' in k for k in old)
  assert any('.self_attn.to_q_lora.down.weight' in k for k in old)
  for comp, mods in lora.modules.items():  # no metadata: the alphas as tensors, as older files keep them
    for name, mod in mods.items():
      old[f'{comp}.{name}.alpha'] = np.asarray(mod.alpha, np.float32)
  write_safetensors(str(tmp_path / 'old.safetensors'), old)
  want, got = merge_lora(pipe, [(path, 1.0)]), merge_lora(pipe, [(str(tmp_path / 'old.safetensors'), 1.0)])
  for comp in ('unet', 'text_encoder'):
    for a, b in zip(
      jax.tree.leaves(nnx.state(want.components[comp])), jax.tree.leaves(nnx.state(got.components[comp]))
    ):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sdxl_unet_modules_have_kohyas_original_sgm_names():
  """SDXL's published UNet (two layers per level, three levels, the first without attention): the names
  kohya's sd-scripts (sdxl_original_unet) and A1111 give its modules."""
  names = {
    'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q': 'input_blocks.4.1.transformer_blocks.0.attn1.to_q',
    'down_blocks.2.attentions.1.proj_in': 'input_blocks.8.1.proj_in',
    'mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj': 'middle_block.1.transformer_blocks.9.ff.net.0.proj',
    'up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0': 'output_blocks.0.1.transformer_blocks.0.attn2.to_out.0',
    'up_blocks.1.attentions.2.proj_out': 'output_blocks.5.1.proj_out',
    'down_blocks.0.resnets.0.conv1': 'input_blocks.1.0.in_layers.2',
    'down_blocks.1.resnets.0.conv_shortcut': 'input_blocks.4.0.skip_connection',
    'mid_block.resnets.1.time_emb_proj': 'middle_block.2.emb_layers.1',
    'up_blocks.2.resnets.2.conv2': 'output_blocks.8.0.out_layers.3',
    'down_blocks.0.downsamplers.0.conv': 'input_blocks.3.0.op',
    'up_blocks.0.upsamplers.0.conv': 'output_blocks.2.2.conv',
    'time_embedding.linear_1': 'time_embed.0',
    'add_embedding.linear_2': 'label_emb.0.2',
    'conv_in': 'input_blocks.0.0',
    'conv_out': 'out.2',
  }  # fmt: skip
  assert original_unet_names(presets.SDXL_UNET, [*names, 'down_blocks.0', 'mid_block']) == names  # no blocks


@pytest.mark.reference
def test_kohya_sdxl_file_names_the_unet_in_the_original_layout_and_loads_in_diffusers(
  sdxl_folder, tmp_path, monkeypatch
):
  """kohya's SDXL layout (as A1111/ComfyUI apply it): UNet modules under their original SGM names, the encoders
  as lora_te1_/lora_te2_. diffusers' load_lora_weights gives jaxdream's merged UNet; jaxdream reads the file back
  to the same factors, reads the diffusers-style spelling of older files too, and names what fits no module."""
  _, path, pipe = sdxl_folder
  comps = {c: nnx.clone(getattr(pipe, c)) for c in ('unet', 'text_encoder', 'text_encoder_2')}
  extra = ('proj_in', 'time_emb_proj', 'time_embedding.linear_1', 'add_embedding.linear_2')  # no attention layers
  add_lora(
    comps['unet'], targets=(*UNET_TARGETS, 'ff.net.0.proj', *extra), rank=4, alpha=8, key=jax.random.key(1),
    conv_targets=('conv1', 'conv2', 'conv_shortcut', 'downsamplers.0.conv', 'upsamplers.0.conv'), conv_rank=2, conv_alpha=1,
  )  # fmt: skip
  for c in ('text_encoder', 'text_encoder_2'):
    add_lora(comps[c], targets=TE_TARGETS, rank=2, alpha=3, key=jax.random.key(2))  # diffusers needs out_proj
  layers = {c: lora_layers(m) for c, m in comps.items()}
  for i, layer in enumerate(l for ls in layers.values() for l in ls.values()):
    layer.lora_b.set_value(jax.random.normal(jax.random.key(i), layer.lora_b.shape) * 0.2)
  file = save_lora(str(tmp_path / 'sdxl.safetensors'), comps, format='kohya')
  tensors = read_safetensors(file)
  modules = {k.split('.')[0] for k in tensors}
  assert {m.split('_', 2)[1] for m in modules} == {'unet', 'te1', 'te2'}
  assert not any(
    re.search('down_blocks|mid_block|up_blocks|resnets|attentions|time_embedding|add_embedding', m) for m in modules
  )
  # The tiny UNet (one layer per level, two levels, the first without attention): its first cross-attention
  # block is input_blocks.3.1, the upsampler of its first up level (with attention) output_blocks.1.2.
  for m in (
    'input_blocks_3_1_transformer_blocks_0_attn1_to_q', 'input_blocks_3_1_proj_in', 'input_blocks_2_0_op',
    'input_blocks_3_0_skip_connection', 'middle_block_1_transformer_blocks_0_ff_net_0_proj',
    'middle_block_2_in_layers_2', 'output_blocks_0_1_transformer_blocks_1_attn2_to_out_0', 'output_blocks_1_2_conv',
    'output_blocks_3_0_out_layers_3', 'output_blocks_2_0_emb_layers_1', 'time_embed_0', 'label_emb_0_2',
  ):  # fmt: skip
    assert f'lora_unet_{m}' in modules, m
  assert len(modules) == sum(map(len, layers.values()))

  # Read back: every module resolves to the adapter it was written from, with its factors and scale.
  found, unmatched = load_lora(file).resolve(comps)
  assert not unmatched and {c: sorted(f) for c, f in found.items()} == {c: sorted(ls) for c, ls in layers.items()}
  for c, mods in found.items():
    for name, mod in mods.items():
      down, up = layers[c][name].torch_factors()
      np.testing.assert_array_equal(mod.down, down)
      np.testing.assert_array_equal(mod.up, up)
      assert mod.scale == pytest.approx(layers[c][name].lora_scale)
  # Older files: the UNet's modules in diffusers' names, underscored.
  old = {}
  for name, layer in layers['unet'].items():
    key = 'lora_unet_' + name.replace('.', '_')
    down, up = layer.torch_factors()
    old[f'{key}.lora_down.weight'], old[f'{key}.lora_up.weight'] = down, up
    old[f'{key}.alpha'] = np.asarray(layer.lora_scale * down.shape[0], np.float32)
  write_safetensors(str(tmp_path / 'old.safetensors'), old)
  old_found, unmatched = load_lora(str(tmp_path / 'old.safetensors')).resolve(comps)
  assert not unmatched and sorted(old_found['unet']) == sorted(found['unet'])
  for name, mod in old_found['unet'].items():
    want = found['unet'][name]
    assert mod.scale == pytest.approx(want.scale) and np.array_equal(mod.down, want.down)
    assert np.array_equal(mod.up, want.up)
  # An original-layout name the tiny UNet lacks (a third level) is named.
  extra_key = 'lora_unet_input_blocks_6_1_transformer_blocks_0_attn1_to_q'
  bad = dict(tensors, **{f'{extra_key}.lora_down.weight': np.zeros((2, 64), np.float32)})
  bad[f'{extra_key}.lora_up.weight'] = np.zeros((64, 2), np.float32)
  write_safetensors(str(tmp_path / 'bad.safetensors'), bad)
  with pytest.raises(WeightsError, match='1 adapter.*input_blocks_6_1_transformer_blocks_0_attn1_to_q'):
    check_lora(comps, str(tmp_path / 'bad.safetensors'))

  # diffusers reads the file (its SGM block mapping) to the UNet jaxdream merges.
  tp = torch_pipe(path, monkeypatch, 'StableDiffusionXLPipeline')
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
  context = rng.standard_normal((1, 7, 64)).astype(np.float32)
  pooled = rng.standard_normal((1, 32)).astype(np.float32)
  time_ids = np.array([[40, 56, 0, 7, 32, 32]], np.float32)
  args = (torch.from_numpy(x), 321, torch.from_numpy(context))
  added = {'text_embeds': torch.from_numpy(pooled), 'time_ids': torch.from_numpy(time_ids)}
  with torch.no_grad():
    base = tp.unet(*args, added_cond_kwargs=added).sample.numpy()
    tp.load_lora_weights(str(tmp_path), weight_name='sdxl.safetensors')
    expected = tp.unet(*args, added_cond_kwargs=added).sample.numpy()
  assert rel_err(expected, base) > 1e-2  # the adapters were applied
  merged = merge_lora(pipe, [(file, 1.0)])
  out = nchw(jit_call(merged.unet)(nhwc(x), np.array([321]), context, pooled, time_ids))
  assert rel_err(out, expected) <= 1e-4
