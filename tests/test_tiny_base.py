"""The tiny base model's pretraining (configs/tiny_base_pretrain.py): its data is DreamBench without the quickstart's
dog, each subject captioned with its class; a run of the shipped config trains the UNet and text encoder from the
built-in tiny model, with a given VAE that it leaves as it was. (scripts/make_tiny_base.sh, run twice, gives
byte-identical weights: checked by hand, too slow for CI.)"""

import contextlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import UNET_ONE_LEVEL
from PIL import Image

import jaxdream
from jaxdream.io.dreambench import read_dreambench
from jaxdream.io.images import list_images
from jaxdream.io.weights import read_safetensors, write_safetensors
from jaxdream.models import load_vae
from jaxdream.training import config as config_lib
from jaxdream.training import loop
from jaxdream.training.data import _crop_flip, data_source, make_iterator, resized_png
from jaxdream.training.inputs import _instance_examples
from jaxdream.training.pretrain_data import calibrate_scaling_factor, pretraining_concepts, write_captioned_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, 'configs', 'tiny_base_pretrain.py')
DREAMBENCH = os.path.normpath(os.path.join(ROOT, '..', 'shared', 'dreambench'))
SAMPLE_DOG = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject', 'dog')
UNET, TE, VAE = (
  os.path.join('unet', 'diffusion_pytorch_model.safetensors'),
  os.path.join('text_encoder', 'model.safetensors'),
  os.path.join('vae', 'diffusion_pytorch_model.safetensors'),
)

pytestmark = pytest.mark.skipif(not os.path.isdir(DREAMBENCH), reason=f'no DreamBench at {DREAMBENCH}')


def _thumb(path) -> np.ndarray:
  """A 16x16 grey thumbnail of the centre square, in [0, 1]: the same photo at another size or JPEG quality."""
  with Image.open(path) as im:
    im = im.convert('L')
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    return np.asarray(im.crop((left, top, left + s, top + s)).resize((16, 16), Image.BILINEAR), np.float32) / 255


def test_pretraining_data_is_every_dreambench_subject_but_the_quickstarts_dog_captioned_with_its_class(tmp_path):
  bench = read_dreambench(DREAMBENCH)
  config = config_lib.config_file(PRETRAIN)
  config.lock()  # as the command line has it
  concepts = config_lib.validate(config)
  examples = _instance_examples(config, concepts)
  subjects = {os.path.basename(os.path.dirname(ex['file'])): ex['prompt'] for ex in examples}
  assert sorted(subjects) == sorted(s for s in bench.classes if s != 'dog') and len(subjects) == 29
  assert all(subjects[s] == f'a photo of {bench.classes[s]}' for s in subjects)
  assert subjects['bear_plushie'] == 'a photo of stuffed animal' and subjects['dog2'] == 'a photo of dog'
  assert len(examples) == sum(len(list_images(os.path.join(DREAMBENCH, s))) for s in subjects) == 153
  assert not config.prior.enabled and config.data.caption_mode == 'replace'
  assert all(c['identifier'] == '' for c in concepts)  # captions, not DreamBooth prompts

  # No pretraining image is one of the quickstart's photos; the measure finds them in DreamBench's dog/.
  dog = np.stack([_thumb(p) for p in list_images(SAMPLE_DOG)])

  def nearest(path):
    return float(np.min(np.mean(np.abs(dog - _thumb(path)), axis=(1, 2))))

  assert max(nearest(p) for p in list_images(os.path.join(DREAMBENCH, 'dog'))) < 0.02
  assert min(nearest(ex['file']) for ex in examples) > 0.05

  # The same images as one captioned folder (a VAE run's vae.data_dir): NN.jpg + NN.txt per subject.
  paths = write_captioned_folder(DREAMBENCH, str(tmp_path / 'data'))
  assert len(paths) == 153 and not os.path.exists(tmp_path / 'data' / 'dog')
  with open(tmp_path / 'data' / 'teapot' / '00.txt') as f:
    assert f.read() == 'a photo of teapot\n'
  with pytest.raises(FileExistsError):
    write_captioned_folder(DREAMBENCH, str(tmp_path / 'data'))
  with pytest.raises(ValueError, match=r"no subject\(s\) \['dgo'\] to leave out"):
    pretraining_concepts(DREAMBENCH, exclude=('dgo',))

  # What the new keys refuse.
  config = config_lib.config_file(PRETRAIN)
  config.concepts[0].instance_prompt = ''
  config.vae_model = str(tmp_path / 'missing')
  config.train.caption_dropout = 1.0
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(config)
  for message in (
    'concept 0 (' + os.path.join(DREAMBENCH, 'backpack') + '): instance_prompt is empty',
    f"vae_model='{tmp_path}/missing': neither an AutoencoderKL folder",
    'train.caption_dropout must be in [0, 1), got 1.0',
  ):
    assert message in str(e.value), str(e.value)


def _unprefixed(weights: dict) -> dict:
  """Text-encoder weights named without transformers' optional 'text_model.' prefix."""
  return {k.removeprefix('text_model.'): v for k, v in weights.items()}


@contextlib.contextmanager
def _one_device():
  from jaxdream.distributed.mesh import make_mesh

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, 'make_mesh', lambda *sizes: make_mesh(*sizes, devices=jax.devices()[:1]))
    yield


def test_pretraining_run_trains_unet_and_text_encoder_on_a_calibrated_vae_it_exports_untouched(
  tiny_sd_folder, tmp_path
):
  from diffusers import UNet2DConditionModel

  # conftest's tiny model with a one-level UNet: every kind of block, a step that compiles in half the time.
  base = shutil.copytree(tiny_sd_folder[1], tmp_path / 'base')
  torch.manual_seed(0)
  shutil.rmtree(base / 'unet')
  UNet2DConditionModel(**UNET_ONE_LEVEL).save_pretrained(base / 'unet')
  base = str(base)
  vae = shutil.copytree(os.path.join(base, 'vae'), tmp_path / 'trained_vae')  # a VAE other than the base's
  weights = read_safetensors(os.path.join(vae, 'diffusion_pytorch_model.safetensors'))
  rng = np.random.default_rng(0)
  weights = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in weights.items()}
  write_safetensors(os.path.join(vae, 'diffusion_pytorch_model.safetensors'), weights)
  # Its scaling factor set from the photos: their latents, as the diffusion model sees them, have unit std.
  factor = calibrate_scaling_factor(str(vae), os.path.join(DREAMBENCH, 'teapot'), 32)
  crops = [
    _crop_flip(np.frombuffer(resized_png(p, 32), np.uint8), 32, True, 0.0, None)
    for p in list_images(os.path.join(DREAMBENCH, 'teapot'))
  ]
  mean, _ = jax.jit(load_vae(str(vae)).encode_latents)(np.stack(crops).astype(np.float32) / 127.5 - 1)
  assert abs(float(np.std(np.asarray(mean, np.float64))) - 1.0) < 1e-4 and abs(factor - 0.18215) > 0.01

  config = config_lib.config_file(PRETRAIN)
  config.model, config.vae_model = base, str(vae)
  config.concepts = [c for c in config.concepts if c.name in ('backpack', 'teapot')]  # 11 photos
  config.resolution = 32
  config.train.num_steps, config.train.batch_size = 2, 2
  config.train.ema_decay = 0.0  # the exported weights are the trained ones
  config.train.caption_dropout = 0.5
  config.checkpoint.every_steps, config.validation.num_images = 2, 0
  workdir = str(tmp_path / 'run')
  with _one_device():
    summary = loop.train(config, workdir)
  assert summary['step'] == 2 and all(np.isfinite(loss) for _, loss in summary['losses'])
  model = summary['outputs']['model']
  for name, trained in ((UNET, True), (TE, True), (VAE, False)):
    before = weights if name == VAE else _unprefixed(read_safetensors(os.path.join(base, name)))
    after = _unprefixed(read_safetensors(os.path.join(model, name)))
    assert before.keys() == after.keys()
    changed = sum(not np.array_equal(before[k], after[k]) for k in before)
    assert (changed > len(before) // 2) if trained else changed == 0, (name, changed, len(before))
  with open(os.path.join(model, 'vae', 'config.json')) as f:
    assert json.load(f)['scaling_factor'] == factor  # exported with the VAE

  # Caption dropout empties prompts (here about half) and leaves the crops and flips as they were.
  source = data_source(os.path.join(workdir, 'data', os.listdir(os.path.join(workdir, 'data'))[0]), 'instance')

  def batches(p):
    it = make_iterator(
      source,
      batch_size=2,
      seed=0,
      resolution=32,
      center_crop=False,
      flip_p=0.5,
      tokenize=lambda prompts: {'length': np.array([len(x) for x in prompts])},
      caption_dropout=p,
    )
    return [next(it) for _ in range(10)]

  kept, dropped = batches(0.0), batches(0.5)
  assert all(np.array_equal(a['pixels'], b['pixels']) for a, b in zip(kept, dropped))
  lengths = np.concatenate([b['input_ids']['length'] for b in dropped])
  assert all(len(b['input_ids']['length']) and min(b['input_ids']['length']) > 0 for b in kept)
  assert 4 <= np.sum(lengths == 0) <= 16, lengths
