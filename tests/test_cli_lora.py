"""LoRA files on the command line: `sample --lora`, A1111 prompt tags, the lora_scale sweep, `lora merge`.

In-process on the tiny model, 2 steps at 64x64: every run shares one compiled loop (a merged pipeline has the
base's structure).
"""

import os

import jax
import numpy as np
import pytest
from conftest import tiny_base
from flax import nnx
from PIL import Image

from jaxdream.cli import main
from jaxdream.cli.sample import SampleSession
from jaxdream.diffusion.pipeline import load_pipeline
from jaxdream.io.images import read_parameters
from jaxdream.lora import merge_lora, save_lora
from jaxdream.nn.adapters import add_lora, lora_layers
from jaxdream.runtime import CompileCache

PROMPT = 'a photo of sks dog'
CACHE = CompileCache()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """The tiny model, a folder with a LoRA for it (loras/style.safetensors) and one for another model."""
  root = tmp_path_factory.mktemp('lora_cli')
  model = tiny_base(str(root / 'tiny-sd'))
  pipe = load_pipeline(model)
  unet = nnx.clone(pipe.unet)
  add_lora(unet, targets=('to_q', 'to_k', 'to_v', 'to_out.0'), rank=4, alpha=2, key=jax.random.key(0))
  for i, layer in enumerate(lora_layers(unet).values()):
    layer.lora_b.set_value(jax.random.normal(jax.random.key(i), layer.lora_b.shape))
  os.makedirs(root / 'loras')
  lora = save_lora(str(root / 'loras' / 'style.safetensors'), {'unet': unet})
  other = nnx.clone(pipe.text_encoder)
  add_lora(other, targets=('fc1',), rank=2, key=jax.random.key(1))
  other.text_model.encoder.layers[0].mlp.fc1.lora_a.set_value(np.zeros((7, 2), np.float32))  # another width
  layer = next(iter(lora_layers(unet).values()))
  layer.lora_b.set_value(layer.lora_b[...].at[0, 0].set(np.nan))  # a damaged (diverged) file
  return dict(
    model=model,
    lora=lora,
    dir=str(root / 'loras'),
    other=save_lora(str(root / 'other.safetensors'), {'text_encoder': other}),
    nan=save_lora(str(root / 'nan.safetensors'), {'unet': unet}),
  )


def sample(*argv):
  try:
    return main(['sample', '--steps', '2', '--seed', '7', *map(str, argv)], cache=CACHE)
  except SystemExit as e:
    return e.code


def load(path):
  return np.asarray(Image.open(path)).astype(int)


def test_lora_scale_sweep_prompt_tags_and_lora_flag_merge_the_same_file(files, tmp_path):
  assert sample('--model', files['model'], '--prompt', PROMPT, '--out', tmp_path / 'base') == 0
  base = load(tmp_path / 'base' / '00000.png')
  compiled = len(CACHE.get(('sample-session',), SampleSession).pipeline(files['model'], False).compiled)
  argv = ['--model', files['model'], '--prompt', PROMPT, '--lora', files['lora'], '--sweep', 'lora_scale=0,1']
  assert sample(*argv, '--out', tmp_path / 'sweep') == 0
  off, on = load(tmp_path / 'sweep' / '00000.png'), load(tmp_path / 'sweep' / '00001.png')
  np.testing.assert_array_equal(off, base)
  assert np.abs(on - base).mean() > 1  # the adapter changes the image
  assert os.path.exists(tmp_path / 'sweep' / 'xyz_grid.png')
  assert read_parameters(str(tmp_path / 'sweep' / '00001.png')).startswith(f'{PROMPT} <lora:style:1>\n')
  tagged = 'a photo of <lora:style:1> sks dog'
  assert (
    sample('--model', files['model'], '--prompt', tagged, '--lora-dir', files['dir'], '--out', tmp_path / 'tag') == 0
  )
  np.testing.assert_array_equal(load(tmp_path / 'tag' / '00000.png'), on)  # the tag is not in the encoded prompt
  # merged pipelines share the base's compiled loop: nothing new was compiled for them
  assert len(CACHE.get(('sample-session',), SampleSession).pipeline(files['model'], False).compiled) == compiled


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--lora', '{root}/missing.safetensors:0.5'], 'no such LoRA file'),
    (['--prompt', 'a <lora:style:0.5> dog'], 'give --lora-dir'),
    (['--prompt', 'a <lora:nope> dog', '--lora-dir', '{dir}'], 'no nope.safetensors'),
    (['--prompt', 'a <lora:style:much> dog', '--lora-dir', '{dir}'], 'the scale must be a number'),
    (['--prompt', 'a <lora:style:0.5:0.8> dog', '--lora-dir', '{dir}'], 'separate text-encoder and UNet weights'),
    (['--prompt', 'a <hypernet:style:1> dog', '--lora-dir', '{dir}'], 'hypernet networks are not supported'),
    (['--sweep', 'lora_scale=0,1'], '--sweep lora_scale needs a LoRA'),
    (['--lora', '{other}'], 'do not fit'),
    (['--lora', '{lora}:nan'], 'the scale must be a finite number'),
    (['--prompt', 'a <lora:style:inf> dog', '--lora-dir', '{dir}'], 'the scale must be a finite number'),
    (['--lora', '{nan}'], 'non-finite'),
    (['--height', '1000000'], 'larger than 16384 pixels'),
  ],
  ids=[
    'missing-file', 'tag-without-dir', 'unknown-tag', 'bad-tag-scale', 'two-weights', 'hypernet', 'sweep-without-lora',
    'other-model',
    'nan-scale', 'inf-tag-scale', 'nan-factors', 'huge-size',
  ],
)  # fmt: skip
def test_bad_lora_arguments_exit_2_with_a_message_before_any_output(files, tmp_path, capsys, argv, message):
  fill = dict(files, root=os.path.dirname(files['model']))
  argv = [str(a).format(**fill) for a in argv]
  if '--prompt' not in argv:
    argv += ['--prompt', PROMPT]
  assert sample('--model', files['model'], *argv, '--out', tmp_path / 'out') == 2
  err = capsys.readouterr().err
  assert 'jaxdream sample: error:' in err and message in err and 'Traceback' not in err
  assert not (tmp_path / 'out').exists()


def test_lora_merge_writes_a_model_folder_with_the_merged_weights(files, tmp_path, capsys):
  out = tmp_path / 'merged'
  assert main(['lora', 'merge', '--model', files['model'], '--lora', f'{files["lora"]}:0.5', '--out', str(out)]) == 0
  want = merge_lora(load_pipeline(files['model']), [(files['lora'], 0.5)])
  got = load_pipeline(str(out))
  for a, b in zip(jax.tree.leaves(nnx.state(want.unet)), jax.tree.leaves(nnx.state(got.unet))):
    np.testing.assert_allclose(a, b, rtol=0, atol=0)
  assert main(['lora', 'merge', '--model', files['model'], '--lora', files['other'], '--out', str(tmp_path / 'x')]) == 2
  assert 'jaxdream lora: error:' in capsys.readouterr().err and not (tmp_path / 'x').exists()
