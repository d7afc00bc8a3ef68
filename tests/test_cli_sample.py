"""`jaxdream sample` end to end on the tiny model, and the A1111 parameters text it writes into PNGs.

The CLI runs in-process, so each sampling loop compiles once for the whole module (the CLI keeps the
loaded model); every run uses 2 steps on 64x64 images.
"""

import os

import numpy as np
import pytest
from conftest import tiny_base
from PIL import Image

from jaxdream.cli import main
from jaxdream.cli.sample import SampleSession
from jaxdream.io.images import (
  SAMPLER_NAMES,
  format_parameters,
  grid_shape,
  make_grid,
  parse_parameters,
  read_parameters,
  save_png,
)
from jaxdream.io.weights import read_safetensors, write_safetensors
from jaxdream.runtime import CompileCache
from jaxdream.schedulers import SCHEDULER_NAMES

PROMPT = 'a photo of sks dog'
CACHE = CompileCache()  # keeps the loaded model and its compiled loops for the whole module


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """The tiny model folder (named tiny-sd), an 80x64 init image and two 64x64 masks."""
  root = tmp_path_factory.mktemp('sample')
  model = tiny_base(str(root / 'tiny-sd'))
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 80, 3), np.uint8)).save(root / 'init.png')
  half = np.zeros((64, 64), np.uint8)
  half[:, 32:] = 255
  Image.fromarray(half).save(root / 'mask_half.png')
  Image.fromarray(np.zeros_like(half)).save(root / 'mask_none.png')
  return dict(model=model, **{name: str(root / f'{name}.png') for name in ('init', 'mask_half', 'mask_none')})


def sample(*argv):
  try:
    return main(['sample', *map(str, argv)], cache=CACHE)
  except SystemExit as e:  # argparse's own errors (a non-number for --steps) exit with 2 too
    return e.code


def load(path):
  return np.asarray(Image.open(path))


def params(folder, i):
  return read_parameters(os.path.join(folder, f'{i:05d}.png'))


# --- the parameters text -------------------------------------------------------------------------------


def test_parameters_are_written_in_a1111s_exact_line_format():
  txt2img = format_parameters(
    PROMPT,
    'blurry, low quality',
    steps=20,
    scheduler='euler_a',
    guidance=7.5,
    seed=1234,
    width=512,
    height=768,
    model='sd15',
  )
  assert txt2img == (
    'a photo of sks dog\nNegative prompt: blurry, low quality\n'
    'Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model: sd15'
  )
  img2img = format_parameters(
    PROMPT,
    '',
    steps=30,
    scheduler='dpmpp_2m_karras',
    guidance=7.0,
    seed=5,
    width=512,
    height=512,
    model='my, model',
    strength=0.8,
  )
  assert img2img == (
    'a photo of sks dog\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, '
    'Size: 512x512, Model: "my, model", Denoising strength: 0.8'
  )


def test_parameters_round_trip_through_the_parser_with_commas_colons_quotes_and_newlines():
  prompt, negative, model = 'a dog, (oil:1.2) "quoted"\nsecond line', 'ugly: very, bad', 'folder, "v2"'
  text = format_parameters(
    prompt,
    negative,
    steps=2,
    scheduler='ddim',
    guidance=12.25,
    seed=2**32 - 1,
    width=64,
    height=96,
    model=model,
    strength=0.35,
  )
  assert parse_parameters(text) == {
    'Prompt': prompt,
    'Negative prompt': negative,
    'Steps': '2',
    'Sampler': 'DDIM',
    'CFG scale': '12.25',
    'Seed': '4294967295',
    'Size': '64x96',
    'Model': model,
    'Denoising strength': '0.35',
  }


def test_parser_reads_text_written_by_a1111():
  text = (
    "girl with an artist's beret, determined, blue eyes\nNegative prompt: ugly, fat, (((deformed)))\n"
    'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b'
  )
  p = parse_parameters(text)
  assert p['Prompt'] == "girl with an artist's beret, determined, blue eyes"
  assert p['Negative prompt'] == 'ugly, fat, (((deformed)))'
  assert (p['Sampler'], p['Seed'], p['Size'], p['Model hash']) == ('Euler a', '965400086', '512x512', '45dee52b')
  assert parse_parameters('just a prompt') == {'Prompt': 'just a prompt', 'Negative prompt': ''}


def test_every_scheduler_has_an_a1111_sampler_name():
  assert set(SAMPLER_NAMES) == set(SCHEDULER_NAMES)
  assert len(set(SAMPLER_NAMES.values())) == len(SAMPLER_NAMES)


# --- PNGs and grids ----------------------------------------------------------------------------------


def test_save_png_puts_parameters_in_a_text_chunk_and_leaves_no_temporary_file(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8)
  save_png(str(tmp_path / 'a.png'), image, 'cat\nSteps: 2')
  save_png(str(tmp_path / 'b.png'), image, 'a café ☕')  # not Latin-1: an iTXt chunk, as PIL and A1111 write it
  assert b'tEXtparameters\x00cat\nSteps: 2' in (tmp_path / 'a.png').read_bytes()
  assert read_parameters(str(tmp_path / 'b.png')) == 'a café ☕'
  np.testing.assert_array_equal(load(tmp_path / 'a.png'), image)
  assert sorted(os.listdir(tmp_path)) == ['a.png', 'b.png']


def test_make_grid_tiles_row_by_row_and_fills_empty_cells_black():
  images = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8)
  grid = make_grid(images, *grid_shape(5))
  assert grid_shape(5) == (2, 3) and grid.shape == (4, 9, 1)
  np.testing.assert_array_equal(grid[::2, ::3, 0], [[1, 2, 3], [4, 5, 0]])
  with pytest.raises(ValueError, match='do not fit'):
    make_grid(images, 2, 2)


# --- the command -------------------------------------------------------------------------------------


def test_txt2img_writes_numbered_pngs_with_their_parameters_and_a_grid(files, tmp_path, capsys):
  assert (
    sample(
      '--model',
      files['model'],
      '--prompt',
      PROMPT,
      '--negative-prompt',
      'blurry',
      '--steps',
      2,
      '--num-images',
      2,
      '--seed',
      1234,
      '--out',
      tmp_path,
    )
    == 0
  )
  out, err = capsys.readouterr()
  assert f'wrote 2 images to {tmp_path}' in out and 'grid.png' in out
  assert 'sampling' in err and '3/3' in err  # the bar counts PLMS's 3 UNet steps for 2 inference steps
  assert sorted(os.listdir(tmp_path)) == ['00000.png', '00001.png', 'grid.png']
  for i in range(2):
    assert params(tmp_path, i) == (
      f'{PROMPT}\nNegative prompt: blurry\nSteps: 2, Sampler: PLMS, '
      f'CFG scale: 7.5, Seed: {1234 + i}, Size: 64x64, Model: tiny-sd'
    )
  a, b = load(tmp_path / '00000.png'), load(tmp_path / '00001.png')
  assert a.shape == (64, 64, 3) and np.abs(a.astype(int) - b).mean() > 1  # two seeds, two images
  np.testing.assert_array_equal(load(tmp_path / 'grid.png'), np.concatenate([a, b], axis=1))
  assert read_parameters(str(tmp_path / 'grid.png')) == params(tmp_path, 0)


def test_clip_skip_changes_the_image_and_is_recorded_as_a1111s_clip_skip(files, tmp_path):
  for name, extra in (('plain', []), ('skip', ['--clip-skip', '1'])):
    assert sample('--model', files['model'], '--prompt', PROMPT, '--out', tmp_path / name, *extra) == 0
  assert 'Clip skip: 2' in params(tmp_path / 'skip', 0) and 'Clip skip' not in params(tmp_path / 'plain', 0)
  assert not np.array_equal(load(tmp_path / 'skip' / '00000.png'), load(tmp_path / 'plain' / '00000.png'))


def test_hires_scale_samples_again_at_the_larger_size_and_records_a1111s_hires_fields(files, tmp_path):
  argv = ['--model', files['model'], '--prompt', PROMPT, '--steps', 2, '--seed', 5, '--height', 32, '--width', 48]
  hires = ['--hires-scale', 1.5, '--hires-steps', 1, '--hires-strength', 0.5, '--hires-upscaler', 'Lanczos']
  assert sample(*argv, *hires, '--out', tmp_path / 'hires') == 0
  assert load(tmp_path / 'hires' / '00000.png').shape == (48, 72, 3)
  text = params(tmp_path / 'hires', 0)
  for field in (
    'Size: 48x32',
    'Denoising strength: 0.5',
    'Hires upscale: 1.5',
    'Hires steps: 1',
    'Hires upscaler: Lanczos',
  ):
    assert field in text, text


def test_guidance_rescale_changes_the_image_and_is_recorded_as_sdnexts_cfg_rescale(files, tmp_path):
  argv = ['--model', files['model'], '--prompt', PROMPT, '--steps', 2, '--seed', 3]
  assert sample(*argv, '--out', tmp_path / 'plain') == 0
  assert sample(*argv, '--guidance-rescale', 0.7, '--out', tmp_path / 'rescaled') == 0
  assert 'CFG rescale: 0.7' in params(tmp_path / 'rescaled', 0) and 'CFG rescale' not in params(tmp_path / 'plain', 0)
  assert not np.array_equal(load(tmp_path / 'plain' / '00000.png'), load(tmp_path / 'rescaled' / '00000.png'))


def test_prompt_syntax_a1111_reads_emphasis_and_plain_keeps_the_brackets(files, tmp_path):
  runs = {
    'plain': ['--prompt', 'a dog'],
    'a1111': ['--prompt', '(a dog:1.0)', '--prompt-syntax', 'a1111'],
    'brackets': ['--prompt', '(a dog:1.0)'],
    'weighted': ['--prompt', '(a dog:1.5)', '--prompt-syntax', 'a1111'],
  }
  for name, extra in runs.items():
    assert sample('--model', files['model'], '--steps', 2, '--seed', 3, '--out', tmp_path / name, *extra) == 0
  image = {name: load(tmp_path / name / '00000.png') for name in runs}
  np.testing.assert_array_equal(image['a1111'], image['plain'])  # weight 1: the words alone
  assert not np.array_equal(image['brackets'], image['plain'])  # plain: the brackets are tokens
  assert not np.array_equal(image['weighted'], image['plain'])
  assert '(a dog:1.5)' in params(tmp_path / 'weighted', 0)  # the prompt as written, as A1111 records it


def test_an_embedding_named_by_its_file_changes_only_prompts_that_name_it(files, tmp_path, capsys):
  from jaxdream import load_pipeline

  dim = load_pipeline(files['model']).text_encoder.text_model.embeddings.token_embedding.embedding.shape[1]
  emb = tmp_path / 'shinystyle.safetensors'  # A1111's format: the file's name is the token
  write_safetensors(str(emb), {'emb_params': np.random.default_rng(0).standard_normal((2, dim)).astype(np.float32)})
  common = ['--model', files['model'], '--steps', 2, '--seed', 3, '--embedding', emb]
  for name, prompt in (('named', 'a dog, shinystyle'), ('unnamed', 'a dog')):
    assert sample(*common, '--prompt', prompt, '--out', tmp_path / name) == 0
  assert (
    sample('--model', files['model'], '--steps', 2, '--seed', 3, '--prompt', 'a dog', '--out', tmp_path / 'none') == 0
  )
  image = {name: load(tmp_path / name / '00000.png') for name in ('named', 'unnamed', 'none')}
  np.testing.assert_array_equal(image['unnamed'], image['none'])
  assert not np.array_equal(image['named'], image['none'])
  # A session keeps the model with its embeddings while neither changes: its loops compile once.
  import argparse

  from jaxdream.cli.sample import SampleSession

  session, args = SampleSession(), argparse.Namespace(embedding=[str(emb)], allow_pickle=False)
  base = session.pipeline(files['model'], False)
  first = session.with_embeddings(base, args)
  assert session.with_embeddings(base, args) is first and first is not base
  os.utime(emb, ns=(1, 1))
  assert session.with_embeddings(base, args) is not first
  capsys.readouterr()
  assert sample(*common[:-1], tmp_path / 'nope.safetensors', '--prompt', 'a', '--out', tmp_path / 'x') == 2
  assert 'nope.safetensors: no such file' in capsys.readouterr().err


def test_img2img_takes_the_init_image_size_and_records_denoising_strength(files, tmp_path):
  assert (
    sample(
      '--model',
      files['model'],
      '--prompt',
      PROMPT,
      '--steps',
      2,
      '--seed',
      7,
      '--scheduler',
      'ddim',
      '--init-image',
      files['init'],
      '--strength',
      0.5,
      '--out',
      tmp_path,
    )
    == 0
  )
  assert load(tmp_path / '00000.png').shape == (64, 80, 3)
  assert params(tmp_path, 0) == (
    f'{PROMPT}\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 80x64, Model: tiny-sd, Denoising strength: 0.5'
  )


def test_inpaint_repaints_only_under_the_mask(files, tmp_path):
  def inpaint(mask, prompt):
    out = tmp_path / f'{os.path.basename(mask)}-{prompt}'
    assert (
      sample(
        '--model',
        files['model'],
        '--prompt',
        prompt,
        '--steps',
        2,
        '--seed',
        3,
        '--init-image',
        files['init'],
        '--mask',
        mask,
        '--out',
        out,
      )
      == 0
    )
    return load(out / '00000.png'), params(out, 0)

  (cat, text), (dog, _) = inpaint(files['mask_half'], 'a cat'), inpaint(files['mask_half'], 'a dog')
  assert text.endswith('Size: 80x64, Model: tiny-sd, Denoising strength: 1')  # 64x64 masks are resized
  assert np.abs(cat.astype(int) - dog).mean() > 1  # the prompt shapes the masked half
  # The mask's edge is at x=40 of the 80-wide image. Away from it the kept half barely moves with the
  # prompt and the painted half moves a lot. (The kept half is not pixel-exact: the VAE decoder's
  # GroupNorm and mid-block attention see the whole latent image, painted half included.)
  change = np.abs(cat.astype(int) - dog)
  assert change[:, :32].max() <= 3 and change[:, 48:].mean() > 3
  # With nothing masked, every latent is the init image's: the prompt changes nothing, and the result is
  # the VAE's reconstruction of the init image (its latents clean, not noised to some step's level).
  kept = inpaint(files['mask_none'], 'a cat')[0]
  np.testing.assert_array_equal(kept, inpaint(files['mask_none'], 'a dog')[0])
  assert np.abs(kept.astype(int) - _reconstruction(files['model'], files['init'], seed=3)).max() <= 1


def _reconstruction(model, init, seed):
  """decode(encode(init)) with the sampler's posterior sample for `seed`, as uint8 pixels."""
  from flax import nnx

  from jaxdream.diffusion.sampling import _ENCODE, _encode, _seeds, _to_images

  pipe = CACHE.get(('sample-session',), SampleSession).pipeline(model, False)
  latents = _encode(pipe, _to_images([init], 64, 80), _seeds(seed, 1), _ENCODE)
  decode = nnx.jit(lambda vae, z: vae.decode_latents(z))  # eager is slower
  images = np.asarray(decode(pipe.vae, latents))[0]
  return np.round(np.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(int)


def test_sweep_generates_every_combination_and_a_labelled_xy_grid(files, tmp_path):
  assert (
    sample(
      '--model',
      files['model'],
      '--prompt',
      PROMPT,
      '--steps',
      2,
      '--num-images',
      2,
      '--seed',
      1,
      '--sweep',
      'guidance=5,7.5',
      '--sweep',
      'seed=10,20',
      '--out',
      tmp_path,
    )
    == 0
  )
  assert sorted(os.listdir(tmp_path)) == [f'{i:05d}.png' for i in range(8)] + ['xyz_grid.png']
  # X (guidance) varies fastest, then Y (seed); each cell holds --num-images images.
  cells = [parse_parameters(params(tmp_path, i)) for i in range(8)]
  assert [(c['CFG scale'], c['Seed']) for c in cells] == [
    ('5', '10'),
    ('5', '11'),
    ('7.5', '10'),
    ('7.5', '11'),
    ('5', '20'),
    ('5', '21'),
    ('7.5', '20'),
    ('7.5', '21'),
  ]
  assert len({load(tmp_path / f'{i:05d}.png').tobytes() for i in range(8)}) == 8  # the values reach the sampler
  grid = load(tmp_path / 'xyz_grid.png')
  top, left = grid.shape[0] - 2 * 64, grid.shape[1] - 2 * 128  # label margins above and left of the cells
  assert top > 0 and left > 0
  np.testing.assert_array_equal(grid[-64:, -64:], load(tmp_path / '00007.png'))
  margin = grid[:top, left:]
  assert (margin == 255).mean() > 0.5 and (margin < 128).any()  # white, with dark label text on it


def test_three_sweeps_write_one_grid_per_z_value_and_prompts_split_on_bars(files, tmp_path):
  assert (
    sample(
      '--model',
      files['model'],
      '--prompt',
      PROMPT,
      '--steps',
      2,
      '--num-images',
      2,
      '--seed',
      1,
      '--sweep',
      'guidance=6',
      '--sweep',
      'steps=2',
      '--sweep',
      'prompt=a dog, oil painting|a cat',
      '--out',
      tmp_path,
    )
    == 0
  )
  assert sorted(os.listdir(tmp_path))[4:] == ['xyz_grid_z0.png', 'xyz_grid_z1.png']
  prompts = [parse_parameters(params(tmp_path, i))['Prompt'] for i in range(4)]
  assert prompts == ['a dog, oil painting', 'a dog, oil painting', 'a cat', 'a cat']
  z0, z1 = load(tmp_path / 'xyz_grid_z0.png'), load(tmp_path / 'xyz_grid_z1.png')
  np.testing.assert_array_equal(z0[-64:, -64:], load(tmp_path / '00001.png'))
  np.testing.assert_array_equal(z1[-64:, -64:], load(tmp_path / '00003.png'))


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--model', '{root}/no-such-model'], 'no such model folder'),
    (['--mask', '{mask_half}'], '--mask needs --init-image'),
    (['--sweep', 'cfg=5,7'], 'KEY one of guidance, steps, seed, scheduler, strength, prompt'),
    (['--sweep', 'steps=10,many'], 'steps values must be ints'),
    (['--sweep', 'scheduler=euler,k_euler'], "unknown scheduler 'k_euler'"),
    (['--height', 30], '--height 30: must be a positive multiple of 4'),
    (['--strength', 0.5], 'needs --init-image'),
    (['--init-image', '{root}/missing.png'], 'no such file'),
    (['--steps', 'two'], "invalid int value: 'two'"),
    (['--init-image', '{init}', '--steps', 1], 'runs no denoising step'),  # int(1 * 0.8) = 0, as diffusers
    (['--hires-strength', 0.5], '--hires-strength needs --hires-scale'),
    (['--hires-scale', 2, '--init-image', '{init}'], 'is for txt2img'),
    (['--hires-scale', 2, '--hires-upscaler', 'R-ESRGAN 4x+'], 'model upscalers such as ESRGAN are not supported'),
    (['--hires-scale', 200], 'must be in (0, 8]'),
    (['--guidance-rescale', 1.5], '--guidance-rescale 1.5: must be in [0, 1]'),
    (['--clip-skip', 40], '--clip-skip 40: clip_skip must be in [0, '),  # before the model loads
    (['--prompt-2', 'a castle'], '--prompt-2: for SDXL base models'),
  ],
  ids=[
    'missing-model',
    'mask-without-init',
    'bad-sweep-key',
    'bad-sweep-value',
    'bad-scheduler',
    'bad-size',
    'strength-without-init',
    'missing-init-image',
    'non-number',
    'no-step-at-strength',
    'hires-flag-without-scale',
    'hires-with-init',
    'hires-model-upscaler',
    'hires-scale-too-large',
    'guidance-rescale-out-of-range',
    'clip-skip-past-the-layers',
    'prompt-2-without-sdxl',
  ],
)
def test_bad_arguments_exit_2_with_a_message_before_any_output(files, tmp_path, capsys, argv, message):
  fill = dict(files, root=os.path.dirname(files['model']))
  argv = [str(a).format(**fill) for a in argv]
  if '--model' not in argv:
    argv = ['--model', files['model']] + argv
  assert sample(*argv, '--prompt', PROMPT, '--out', tmp_path / 'out') == 2
  err = capsys.readouterr().err
  assert 'jaxdream sample: error:' in err and message in err and 'Traceback' not in err
  assert not (tmp_path / 'out').exists()


def test_devices_split_the_batch_and_change_images_only_by_rounding(files, tmp_path, capsys):
  # The single-device run is the txt2img test's (compiled once for both).
  args = (
    '--model',
    files['model'],
    '--prompt',
    PROMPT,
    '--negative-prompt',
    'blurry',
    '--steps',
    2,
    '--num-images',
    2,
    '--seed',
    1234,
  )
  assert sample(*args, '--out', tmp_path / 'one') == 0
  capsys.readouterr()
  assert sample(*args, '--devices', 2, '--out', tmp_path / 'two') == 0
  assert '3/3' in capsys.readouterr().err  # the progress bar counts steps once, not per device
  for i in range(2):  # another batch size per device is another compiled program: 1/255 flips at most
    diff = np.abs(load(tmp_path / 'one' / f'{i:05d}.png').astype(int) - load(tmp_path / 'two' / f'{i:05d}.png'))
    assert diff.max() <= 1 and diff.mean() < 0.01
  assert sample(*args, '--devices', 99, '--out', tmp_path / 'bad') == 2


def test_a_single_file_samples_as_its_folder_and_inspect_describes_it(files, tmp_path, capsys):
  """`sample --model FILE --config-dir DIR` (a single file written from the folder) gives the folder's pixels;
  `inspect FILE` says what the file is without building a model; a bad file fails as load_pipeline does, before
  any output."""
  import json

  from jaxdream.models import single_file

  path = str(tmp_path / 'tiny.safetensors')
  assert main(['convert', files['model'], path]) == 0
  args = ('--prompt', PROMPT, '--negative-prompt', 'blurry', '--steps', 2, '--num-images', 2, '--seed', 1234)
  assert sample('--model', files['model'], *args, '--out', tmp_path / 'folder') == 0  # the txt2img test's program
  # its own session: the module's keeps the folder's pipeline and compiled loops for the other tests
  argv = ['sample', '--model', path, '--config-dir', files['model'], *map(str, args), '--out', str(tmp_path / 'file')]
  assert main(argv, cache=CompileCache()) == 0
  for i in range(2):
    np.testing.assert_array_equal(load(tmp_path / 'file' / f'{i:05d}.png'), load(tmp_path / 'folder' / f'{i:05d}.png'))
    assert params(tmp_path / 'file', i) == params(tmp_path / 'folder', i).replace('Model: tiny-sd', 'Model: tiny')
  capsys.readouterr()

  assert main(['inspect', path, '--config-dir', files['model'], '--prediction-type', 'v_prediction']) == 0
  info = json.loads(capsys.readouterr().out)
  assert main(['inspect', '--model', files['model']]) == 0  # the folder, loaded
  folder = json.loads(capsys.readouterr().out)
  assert {k: info[k] for k in ('unet', 'vae', 'text_encoder', 'scheduler', 'default_size')} == {
    k: folder[k] for k in ('unet', 'vae', 'text_encoder', 'scheduler', 'default_size')
  }
  assert info['model_type'] == 'v1' and info['kind'] == 'SD 1.x (v-prediction)' and info['ema_weights'] is False
  assert info['dtype'] == dict(unet='float32', vae='float32', text_encoder='float32')
  assert info['prediction_type'] == 'v_prediction' and folder['prediction_type'] == 'epsilon'
  assert info['pipeline_class'] == 'StableDiffusionPipeline' and info['configs'] == files['model']
  assert single_file.DESCRIPTIONS.keys() == single_file.PRESETS.keys()

  renamed = str(tmp_path / 'renamed.safetensors')  # no known layout: load_pipeline's error, nothing written
  write_safetensors(renamed, {'unet.' + k: v for k, v in read_safetensors(path).items()})
  ckpt = tmp_path / 'tiny.ckpt'
  ckpt.write_bytes(b'not read')
  for model, message in ((renamed, 'expected the original (CompVis/Stability) layout'), (ckpt, 'pickle')):
    assert sample('--model', model, *args, '--out', tmp_path / 'bad') == 2
    err = capsys.readouterr().err
    assert 'jaxdream sample: error:' in err and message in err and 'Traceback' not in err, err
    assert main(['inspect', str(model)]) == 2 and message in capsys.readouterr().err
  assert not (tmp_path / 'bad').exists()
  assert sample('--model', files['model'], *args, '--config-dir', files['model'], '--out', tmp_path / 'bad') == 2
  assert 'config_dir and extract_ema are for single-file checkpoints' in capsys.readouterr().err
  assert (
    sample('--model', files['model'], *args, '--refiner-config-dir', files['model'], '--out', tmp_path / 'bad') == 2
  )
  assert '--refiner-config-dir needs --refiner' in capsys.readouterr().err


def test_sdxl_base_and_refiner_files_are_recognised_and_planned_from_their_keys_alone(tmp_path, capsys):
  """`--model BASE_FILE --refiner REFINER_FILE`: both files' types come from their key names (presets' configs: 1024
  px), the refiner's options reach its load; no weight is read (these files hold one tensor each)."""
  import json

  from jaxdream.cli.main import build_parser
  from jaxdream.cli.sample import _plan

  unet = {'model.diffusion_model.input_blocks.0.0.weight': np.zeros((320, 4, 3, 3), np.float16)}
  base, refiner = str(tmp_path / 'base.safetensors'), str(tmp_path / 'refiner.safetensors')
  write_safetensors(base, {**unet, 'conditioner.embedders.1.model.ln_final.weight': np.zeros(1280, np.float16)})
  write_safetensors(refiner, {**unet, 'conditioner.embedders.0.model.ln_final.weight': np.zeros(1280, np.float16)})

  def plan(*argv):
    return _plan(build_parser().parse_args(['sample', '--prompt', PROMPT, '--out', str(tmp_path / 'o'), *argv]))

  p = plan('--model', base, '--refiner', refiner, '--refiner-start', '0.7', '--refiner-prediction-type', 'v_prediction')
  assert p.refiner == (refiner, 0.7) and p.size == (1024, 1024)
  assert p.options == dict(config_dir=None, prediction_type=None, extract_ema=False)
  assert p.refiner_options == dict(config_dir=None, prediction_type='v_prediction', extract_ema=False)
  with pytest.raises(ValueError, match='must be an SDXL refiner'):
    plan('--model', base, '--refiner', base)
  assert main(['inspect', refiner]) == 0
  info = json.loads(capsys.readouterr().out)
  assert (info['kind'], info['pipeline_class'], info['unet'], info['text_encoder_2']) == (
    'SDXL refiner',
    'StableDiffusionXLImg2ImgPipeline',
    320 * 4 * 9,
    1280,
  )
  assert info['dtype']['unet'] == 'float16' and info['default_size'] == [1024, 1024]
