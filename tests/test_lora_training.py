"""LoRA DreamBooth runs (lora.rank > 0): the config's problems are named before anything is compiled, a run
trains only the adapters (checkpointed, EMA'd, exported as LoRA files and optionally merged), and the base
model's files are never written."""

import hashlib
import importlib
import os
import sys
import types

import jax
import numpy as np
import pytest
from conftest import tiny_base

import jaxdream
from jaxdream.io.weights import read_safetensors
from jaxdream.training import config as config_lib

SAMPLE = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject', 'dog')
UNET_FILE = os.path.join('unet', 'diffusion_pytorch_model.safetensors')


def _config(tmp_path, **lora):
  c = config_lib.base_config()
  c.model = config_lib.BUILTIN_TINY
  c.resolution = 64
  c.concepts = [config_lib.concept(instance_dir=SAMPLE, instance_prompt='a photo of sks dog')]
  c.prior.enabled = False
  c.lora.rank = 4
  c.lora.update(lora)
  return c


@pytest.mark.parametrize(
  'lora, train, message',
  [
    (dict(rank=-1), {}, 'lora.rank must not be negative, got -1'),
    (dict(init='xavier'), {}, "lora.init='xavier': choose one of ('kaiming_uniform', 'gaussian')"),
    (dict(conv_alpha=-2.0), {}, 'lora.conv_alpha must not be negative'),
    (dict(rank=0, text_encoder=True), {}, 'lora.text_encoder=True needs lora.rank > 0'),
    (dict(rank=0, conv_rank=2), {}, 'lora.conv_rank=2 needs lora.rank > 0'),
    (dict(unet_targets=[]), {}, 'lora.unet_targets is empty'),
    # Settings that would do nothing are refused, not ignored: a typo in conv_targets would otherwise pass.
    (dict(conv_targets=['conv_in_typo']), {}, "lora.conv_targets=['conv_in_typo'] does nothing without lora.conv_rank"),
    (dict(conv_alpha=3.0), {}, 'lora.conv_alpha=3.0 does nothing without lora.conv_rank > 0'),
    (dict(text_encoder_targets=['nope']), {}, 'does nothing without lora.text_encoder=True'),
    (dict(rank=0, alpha=8.0), {}, 'lora.alpha=8.0 does nothing without lora.rank > 0'),
    (dict(per_subject=True, export_merged=True), {}, 'lora.export_merged writes one merged model'),
    (dict(text_encoder=True, text_encoder_targets=[]), {}, 'lora.text_encoder_targets is empty'),
    ({}, dict(train_text_encoder=True), 'train.train_text_encoder trains the whole text encoder'),
    (
      dict(text_encoder=True),
      dict(cache_text_embeddings=True),
      'train.cache_text_embeddings needs a frozen text encoder',
    ),
  ],
)
def test_bad_lora_settings_are_refused_with_their_key(tmp_path, lora, train, message):
  c = _config(tmp_path, **lora)
  c.train.update(train)
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  assert message in str(e.value) and str(e.value).count('\n  - ') == 1, str(e.value)


def test_param_groups_and_lora_are_refused_together(tmp_path):
  import ml_collections

  c = _config(tmp_path)
  c.train.param_groups = ml_collections.ConfigDict({'attn': {'pattern': 'attn', 'learning_rate': 1e-4}})
  with pytest.raises(config_lib.RunConfigError, match='train.param_groups cannot be combined with lora.rank > 0'):
    config_lib.validate(c)


def test_concept_names_default_to_the_folder_are_checked_and_unique_in_lora_runs(tmp_path):
  spaced = tmp_path / 'my dog photos'
  spaced.mkdir()
  c = _config(tmp_path)
  c.concepts = [
    config_lib.concept(instance_dir=SAMPLE, instance_prompt='a photo of sks dog'),
    config_lib.concept(instance_dir=str(spaced) + '/', instance_prompt='a photo of sks dog'),
  ]
  concepts = config_lib.validate(c)
  assert [x['name'] for x in concepts] == ['dog', 'my_dog_photos']
  assert config_lib.adapter_name(concepts) == 'dog+1' and config_lib.adapter_name(concepts[:1]) == 'dog'
  c.concepts[1].name = 'dog'
  with pytest.raises(config_lib.RunConfigError, match=r"name 'dog' is also concept 0's: give each a distinct"):
    config_lib.validate(c)
  c.lora.rank = 0  # a full fine-tuning run writes no file by name
  assert config_lib.validate(c)
  c.concepts[1].name = 'my dog'
  with pytest.raises(config_lib.RunConfigError, match=r"name 'my dog' may only use .*\(concepts.1.name\)"):
    config_lib.validate(c)


def test_full_fine_tuning_checkpoints_from_before_lora_still_resume(tmp_path):
  """A rank-0 run's run-defining config has no lora key and no unset concept name: what it was before them."""
  c = _config(tmp_path, rank=0)
  defining = config_lib.run_defining(c)
  assert not any(k.startswith('lora.') for k in defining) and 'name' not in defining['concepts'][0]
  c.lora.rank = 4
  assert config_lib.config_differences(defining, config_lib.run_defining(c))[0].startswith('lora.alpha')


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  return tiny_base(str(tmp_path_factory.mktemp('lora_base') / 'base'))


def test_targets_that_match_no_layer_are_refused_before_class_images(base, tmp_path):
  from jaxdream.training.loop import train

  c = _config(tmp_path, unet_targets=['to_q', 'to_qq'], conv_rank=2, conv_targets=['conv1', 'conv_in'])
  c.model = base
  c.prior.enabled = True
  c.concepts[0].class_prompt, c.concepts[0].class_dir = 'a photo of dog', str(tmp_path / 'class')
  c.mesh.data, c.mesh.tensor = 2, 4
  with pytest.raises(config_lib.RunConfigError) as e:
    train(c, str(tmp_path / 'run'))
  assert "lora.unet_targets: 'to_qq' matches no Linear layer of the unet (they are: " in str(e.value)
  assert "lora.conv_targets: 'conv_in' matches no convolution under resnets" in str(e.value)  # conv_in: not a resnet's
  assert str(e.value).count('\n  - ') == 2 and not os.path.exists(tmp_path / 'class')


def _digest(folder) -> dict:
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def lora_run(base, tmp_path_factory):
  """A 3-step LoRA run (UNet + text encoder adapters, LoCon, EMA, kohya and merged exports), recording what it
  hands to jaxdream.lora.files.save_lora (a recording stand-in where that module is not installed)."""
  from jaxdream.training.loop import train
  from jaxdream.training.params import split_models

  calls = []
  try:
    files = importlib.import_module('jaxdream.lora.files')
    real = files.save_lora
  except ImportError:
    files, real = types.ModuleType('jaxdream.lora.files'), None

  def save_lora(path, modules, **kw):  # records the adapters the modules carry now (a merge comes later)
    flat = split_models(types.SimpleNamespace(components=modules))[2]
    calls.append((path, sorted(modules), kw, jax.device_get({k: v for k, v in flat.items() if '/lora_' in k})))
    if real is not None:
      real(path, modules, **kw)

  root = tmp_path_factory.mktemp('lora_run')
  c = _config(root, text_encoder=True, conv_rank=2, alpha=8.0, export_kohya=True, export_merged=True)
  c.model = base
  c.train.num_steps, c.train.learning_rate, c.train.text_encoder_learning_rate = 3, 1e-2, 1e-2
  c.train.ema_decay = 0.5
  c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
  c.validation.prompts, c.validation.num_images, c.validation.steps = ['a photo of sks dog'], 1, 2
  c.mesh.data, c.mesh.tensor = 1, 8
  before = _digest(base)
  with pytest.MonkeyPatch.context() as mp:
    if real is None:
      mp.setitem(sys.modules, 'jaxdream.lora', types.ModuleType('jaxdream.lora'))
      mp.setitem(sys.modules, 'jaxdream.lora.files', files)
    mp.setattr(files, 'save_lora', save_lora, raising=False)
    workdir = str(root / 'run')
    summary = train(c, workdir)
  assert _digest(base) == before  # the base model's files were not written
  return c, workdir, summary, calls


def _state(workdir, step):
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'data', 'config'))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, restored['state'])


@pytest.mark.slow
def test_lora_run_trains_only_the_adapters_and_exports_their_ema(lora_run, base):
  from jaxdream import load_pipeline
  from jaxdream.training.lora import adapter_key, add_adapters, lora_plan
  from jaxdream.training.params import split_models

  c, workdir, summary, calls = lora_run
  out = summary['outputs']
  assert summary['step'] == 3 and os.path.exists(out['loss_curve']) and out['samples']
  assert out['lora'] == os.path.join(workdir, 'loras', 'dog', 'pytorch_lora_weights.safetensors')
  assert out['lora_kohya'] == os.path.join(workdir, 'loras', 'dog.safetensors')
  state = _state(workdir, 3)
  # What the adapters started as: the same layers added to the base with the run's seed.
  start = load_pipeline(base)
  add_adapters(start, lora_plan(start, c), adapter_key(c.seed))
  init = {k: v for k, v in split_models(start)[2].items() if k.endswith(('/lora_a', '/lora_b'))}
  assert set(state['trainable']) == set(state['ema']) == set(init)  # checkpoints hold only the adapters
  assert {k.split('/')[0] for k in init} == {'unet', 'text_encoder'}
  assert any('/resnets/' in k for k in init) and not any('conv_in' in k for k in init)
  for k, v in init.items():
    assert not np.array_equal(state['trainable'][k], v), k  # every adapter factor moved
    assert not np.array_equal(state['ema'][k], state['trainable'][k]), k
  # save_lora got the pipeline's adapted unet and text encoder carrying the EMA adapters, for both files.
  assert [call[:3] for call in calls] == [
    (out['lora'], ['text_encoder', 'unet'], {}),
    (out['lora_kohya'], ['text_encoder', 'unet'], {'format': 'kohya'}),
  ]
  assert set(calls[0][3]) == set(init)
  for k in init:
    np.testing.assert_array_equal(calls[0][3][k], state['ema'][k], err_msg=k)


@pytest.mark.slow
def test_merged_export_is_the_base_plus_the_ema_adapters(lora_run, base):
  from jaxdream.nn.adapters import lora_scale

  c, workdir, _, _ = lora_run
  ema = _state(workdir, 3)['ema']
  merged, old = (
    read_safetensors(os.path.join(workdir, 'model', UNET_FILE)),
    read_safetensors(os.path.join(base, UNET_FILE)),
  )
  assert set(merged) == set(old)  # a plain diffusers UNet: no adapter entries
  layer = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  a, b = ema[f'unet/{layer.replace(".", "/")}/lora_a'], ema[f'unet/{layer.replace(".", "/")}/lora_b']
  expected = old[layer + '.weight'] + lora_scale(4, 8.0) * (a @ b).T
  np.testing.assert_allclose(merged[layer + '.weight'], expected, rtol=1e-6, atol=1e-7)
  adapted = {k[len('unet/') : -len('/lora_a')].replace('/', '.') + '.weight' for k in ema if k.startswith('unet/')}
  assert {k for k in old if not np.array_equal(merged[k], old[k])} == adapted  # the rest is the base's
  vae = os.path.join('vae', 'diffusion_pytorch_model.safetensors')
  new_vae, old_vae = read_safetensors(os.path.join(workdir, 'model', vae)), read_safetensors(os.path.join(base, vae))
  assert all(np.array_equal(new_vae[k], old_vae[k]) for k in old_vae)


@pytest.mark.slow
def test_exported_lora_file_holds_the_ema_adapters_in_peft_layout(lora_run):
  pytest.importorskip('jaxdream.lora.files')
  _, workdir, summary, _ = lora_run
  ema = _state(workdir, 3)['ema']
  saved = read_safetensors(summary['outputs']['lora'])
  layer = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  a = ema[f'unet/{layer.replace(".", "/")}/lora_a']
  np.testing.assert_allclose(saved[f'unet.{layer}.lora_A.weight'], a.T)
  assert os.path.exists(summary['outputs']['lora_kohya'])


@pytest.mark.slow
def test_a_lora_run_resumes_from_its_adapter_checkpoint(lora_run, tmp_path):
  import shutil

  from jaxdream.training.loop import train

  c, workdir, _, _ = lora_run
  resumed = shutil.copytree(workdir, str(tmp_path / 'resumed'))
  c = c.copy_and_resolve_references()
  c.train.num_steps, c.lora.export_kohya, c.lora.export_merged = 4, False, False
  with pytest.MonkeyPatch.context() as mp:  # only the checkpoints matter here
    mp.setattr('jaxdream.training.loop.export_adapters', lambda *a: None)
    summary = train(c, resumed)
  assert summary['step'] == 4 and [s for s, _ in summary['losses']] == [1, 2, 3, 4]
  before, after = _state(workdir, 3), _state(resumed, 4)
  assert set(after['trainable']) == set(before['trainable'])
  assert all(not np.array_equal(after['trainable'][k], v) for k, v in before['trainable'].items())
