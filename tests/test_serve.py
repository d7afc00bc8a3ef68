"""jaxdream serve: A1111's sdapi/v1 routes, shapes and defaults; errors naming the field (422/401/413/429/503);
an image never depends on the batch it was generated in (prompts, seeds, guidance and LoRA adapters differing);
the queue's batching, interrupt and shutdown; a real uvicorn; the web page in headless Chromium.

One server for the module (small_sd_folder at 32x32 px, 2 steps, batches of 4): its few programs (txt2img,
txt2img with adapters, inpainting) are compiled once and shared by every test, the live servers included."""

import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient
from flax import nnx
from PIL import Image

from jaxdream.cli.main import main
from jaxdream.cli.serve import make_uvicorn_server
from jaxdream.diffusion.pipeline import load_pipeline, save_pipeline
from jaxdream.io.weights import write_safetensors
from jaxdream.lora import save_lora
from jaxdream.nn.adapters import add_lora, lora_layers
from jaxdream.serve import inpainting
from jaxdream.serve.app import Server, create_app, make_server
from jaxdream.serve.engine import BatchKey, Engine, Hires, Task
from jaxdream.serve.limits import Limits, check_bind, parse_auth
from jaxdream.serve.metrics import Metrics
from jaxdream.serve.queue import BatchQueue, ShuttingDown

AUTH = ('ann', 's3cret')
SMALL = dict(width=32, height=32, steps=2, sampler_name='Euler')
MAX_BATCH = 4
LIMITS = Limits(max_size=64, max_steps=10, max_body_bytes=2**20, max_image_pixels=64 * 64)


@pytest.fixture(scope='module')
def served(small_sd_folder, tmp_path_factory):
  """(server, authenticated test client): models-dir with a second name for the same model, two LoRA files of
  one shape (rank 2 on the UNet's attention), a queue of 3 requests, tight limits, basic auth."""
  root = tmp_path_factory.mktemp('serve')
  model = small_sd_folder[1]
  os.makedirs(root / 'models')
  os.symlink(model, root / 'models' / 'other')
  os.makedirs(root / 'loras')
  # Textual inversion embeddings as A1111's embeddings/ folder: one of this model's width, one of another's.
  os.makedirs(root / 'embeddings')
  rng = np.random.default_rng(7)
  write_safetensors(str(root / 'embeddings' / 'ShinyStyle.safetensors'), {'emb_params': rng.standard_normal((2, 32))})
  write_safetensors(str(root / 'embeddings' / 'wide.safetensors'), {'emb_params': rng.standard_normal((1, 33))})
  server = make_server(
    model,
    models_dir=str(root / 'models'),
    lora_dir=str(root / 'loras'),
    embeddings_dir=str(root / 'embeddings'),
    max_batch=MAX_BATCH,
    queue_size=3,
    limits=LIMITS,
    users=dict([AUTH]),
  )
  base = server.engine.pipeline(server.engine.current)
  for i, name in enumerate(('subject', 'style')):
    unet = nnx.clone(base.unet)
    add_lora(unet, targets=('to_q', 'to_k', 'to_v', 'to_out.0'), rank=2, key=jax.random.key(i))
    for j, layer in enumerate(lora_layers(unet).values()):
      layer.lora_b.set_value(0.5 * jax.random.normal(jax.random.key(100 * i + j), layer.lora_b.shape))
    save_lora(str(root / 'loras' / f'{name}.safetensors'), {'unet': unet})
  yield server, TestClient(create_app(server), headers=basic(*AUTH))
  server.queue.close()


def basic(user, password) -> dict:
  return {'Authorization': 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()}


def pixels(b64: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def png_b64(array, fmt='PNG') -> str:
  out = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(out, format=fmt)
  return base64.b64encode(out.getvalue()).decode()


def txt2img(client, **body):
  r = client.post('/sdapi/v1/txt2img', json={**SMALL, **body})
  assert r.status_code == 200, r.text
  return r.json()


def batched(server, client, bodies: list[dict]) -> list[dict]:
  """The requests sent at once while the worker holds, so that they are queued together, then released."""
  server.queue.pause()
  out = [None] * len(bodies)
  threads = [
    threading.Thread(target=lambda i=i, b=b: out.__setitem__(i, txt2img(client, **b))) for i, b in enumerate(bodies)
  ]
  try:
    for t in threads:
      t.start()
    deadline = time.monotonic() + 60
    while server.queue.depth() < len(bodies):
      assert time.monotonic() < deadline, 'requests not queued'
      time.sleep(0.02)
  finally:
    server.queue.resume()
  for t in threads:
    t.join(120)
  return out


def batch_count(server, size: int) -> int:
  """Sampler calls so far that held exactly `size` images."""
  h = server.metrics.batch_sizes
  return h.counts[size - 1] - (h.counts[size - 2] if size > 1 else 0)


def test_routes_answer_in_a1111_shapes_with_a1111_defaults(served):
  server, client = served
  data = txt2img(client, prompt='a dog', seed=5, an_unknown_field={'ignored': True})
  assert set(data) == {'images', 'parameters', 'info'} and len(data['images']) == 1
  params, info = data['parameters'], json.loads(data['info'])
  assert 'an_unknown_field' not in params
  defaults = dict(negative_prompt='', batch_size=1, n_iter=1, cfg_scale=7.0, sampler_index='Euler', send_images=True)
  assert {k: params[k] for k in defaults} == defaults
  assert info['prompt'] == 'a dog' and info['all_prompts'] == ['a dog']
  assert (info['seed'], info['all_seeds'], info['width'], info['height']) == (5, [5], 32, 32)
  assert (info['sampler_name'], info['cfg_scale'], info['steps']) == ('Euler', 7.0, 2)
  image = pixels(data['images'][0])
  assert image.shape == (32, 32, 3) and image.std() > 0
  # What typed clients require of info (sd-backend-client's GenerationInfoData): these keys, a string hash.
  assert isinstance(info['sd_model_hash'], str) and info['version'].startswith('jaxdream')
  assert {'sd_vae_name', 'sd_vae_hash', 'face_restoration_model', 'clip_skip', 'job_timestamp'} <= set(info)
  # null fields are defaults (A1111's are all optional), and the evenly spaced schedule types are the sampler's own.
  same = txt2img(client, prompt='a dog', seed=5, negative_prompt=None, batch_size=None, scheduler='Normal')
  assert np.array_equal(pixels(same['images'][0]), image)
  # A1111's clip skip (CLIP_stop_at_last_layers, 2: the layer before the last), per request: another encoding,
  # reported in info and the infotext.
  skipped = txt2img(client, prompt='a dog', seed=5, override_settings={'CLIP_stop_at_last_layers': 2})
  assert json.loads(skipped['info'])['clip_skip'] == 2 and 'Clip skip: 2' in json.loads(skipped['info'])['infotexts'][0]
  assert not np.array_equal(pixels(skipped['images'][0]), image)
  # PNG Info reads the image's own A1111 parameters chunk back.
  png = client.post('/sdapi/v1/png-info', json={'image': 'data:image/png;base64,' + data['images'][0]}).json()
  assert (
    png['info']
    == info['infotexts'][0]
    == Image.open(io.BytesIO(base64.b64decode(data['images'][0]))).text['parameters']
  )
  assert {k: png['parameters'][k] for k in ('Prompt', 'Seed', 'Sampler', 'Size')} == dict(
    Prompt='a dog', Seed='5', Sampler='Euler', Size='32x32'
  )
  # seed -1: a random seed, reported; a batch's images get seed, seed + 1.
  two = json.loads(txt2img(client, prompt='a dog', seed=-1, batch_size=2)['info'])
  assert two['seed'] >= 0 and two['all_seeds'] == [two['seed'], two['seed'] + 1]
  assert [m['title'] for m in client.get('/sdapi/v1/sd-models').json()] == [server.engine.current, 'other']
  names = [s['name'] for s in client.get('/sdapi/v1/samplers').json()]
  assert {'Euler a', 'Euler', 'DPM++ 2M', 'DPM++ 2M Karras', 'DDIM', 'LMS', 'PLMS'} <= set(names)
  assert [s['label'] for s in client.get('/sdapi/v1/schedulers').json()] == [
    'Automatic',
    'Uniform',
    'Normal',
    'Simple',
    'Karras',
  ]
  assert client.get('/sdapi/v1/scripts').json() == {'txt2img': [], 'img2img': []}
  assert client.get('/sdapi/v1/face-restorers').json() == [] and client.get('/sdapi/v1/cmd-flags').json() == {}
  loras = client.get('/sdapi/v1/loras').json()
  assert [(lo['name'], os.path.basename(lo['path'])) for lo in loras] == [
    ('style', 'style.safetensors'),
    ('subject', 'subject.safetensors'),
  ]
  assert client.get('/sdapi/v1/sd-vae').json() == []
  for path in ('/sdapi/v1/refresh-checkpoints', '/sdapi/v1/refresh-loras'):
    assert client.post(path).status_code == 200
  idle = client.get('/sdapi/v1/progress').json()
  assert idle['progress'] == 0 and idle['eta_relative'] == 0
  assert {'job_count', 'sampling_step', 'sampling_steps', 'interrupted'} <= set(idle['state'])
  assert client.post('/sdapi/v1/interrupt').json() == {'interrupted': False}
  assert 'Generate' in client.get('/').text and client.get('/docs').status_code == 200
  # sd_model_checkpoint switches among --models-dir models ('other' is the same weights: the same pixels,
  # and its loops are the shared compiled ones).
  first = server.engine.current
  assert client.post('/sdapi/v1/options', json={'sd_model_checkpoint': 'nope'}).json()['field'] == 'sd_model_checkpoint'
  assert client.post('/sdapi/v1/options', json={'sd_model_checkpoint': 'other'}).status_code == 200
  try:
    assert client.get('/sdapi/v1/options').json()['sd_model_checkpoint'] == 'other'
    again = txt2img(client, prompt='a dog', seed=5)
    assert json.loads(again['info'])['sd_model_name'] == 'other'
    assert np.array_equal(pixels(again['images'][0]), image)
  finally:
    client.post('/sdapi/v1/options', json={'sd_model_checkpoint': first})
  text = client.get('/metrics').text
  for line in ('jaxdream_serve_queue_depth 0', 'jaxdream_serve_batch_size_count', 'request_latency_seconds_bucket'):
    assert line in text
  assert int(re.search(r'^jaxdream_serve_images_generated_total (\d+)$', text, re.M).group(1)) >= 4


def test_single_file_checkpoints_in_models_dir_are_listed_switched_to_and_reported_when_broken(served):
  server, client = served
  models, base = server.engine.models_dir, server.engine.pipeline(server.engine.current)
  first = server.engine.current
  single = os.path.join(models, 'single.safetensors')
  save_pipeline(load_pipeline(base.path), single, single_file=True)  # the model's own weights (no embeddings)
  os.symlink(base.path, os.path.join(models, 'single.config'))  # its configs: a diffusers folder beside it
  with open(os.path.join(models, 'broken.safetensors'), 'wb') as f:
    f.write(b'not a checkpoint')
  reference = pixels(txt2img(client, prompt='a dog', seed=5)['images'][0])
  try:
    assert client.post('/sdapi/v1/refresh-checkpoints').status_code == 200  # finds the new files
    listed = {m['model_name']: m for m in client.get('/sdapi/v1/sd-models').json()}
    assert set(listed) == {first, 'other', 'single', 'broken'}  # not the .config folder
    with open(single, 'rb') as f:
      sha = hashlib.sha256(f.read()).hexdigest()
    assert listed['single'] == dict(
      title=f'single.safetensors [{sha[:10]}]',
      model_name='single',
      hash=sha[:10],
      sha256=sha,
      filename=os.path.abspath(single),
      config=os.path.join(models, 'single.config'),
    )
    assert listed['other']['hash'] is None and listed['other']['title'] == 'other'
    # A file that cannot be loaded is a 422 naming it and why; the loaded model serves on.
    r = client.post('/sdapi/v1/options', json={'sd_model_checkpoint': 'broken.safetensors'})
    assert r.status_code == 422 and r.json()['field'] == 'sd_model_checkpoint', r.text
    assert 'broken.safetensors' in r.json()['detail'] and 'cannot be loaded' in r.json()['detail']
    # A name is looked up among the listed models, never joined to a path.
    for name in ('../single.safetensors', os.path.abspath(single), 'single.config'):
      assert client.post('/sdapi/v1/options', json={'sd_model_checkpoint': name}).status_code == 422
    assert client.get('/sdapi/v1/options').json()['sd_model_checkpoint'] == first
    # Switched to by model_name (A1111 clients send the title, name, model_name or hash): the same weights give
    # the same pixels, through the same compiled loop.
    assert client.post('/sdapi/v1/options', json={'sd_model_checkpoint': 'single'}).status_code == 200
    assert client.get('/sdapi/v1/options').json()['sd_model_checkpoint'] == listed['single']['title']
    data = txt2img(client, prompt='a dog', seed=5)
    info = json.loads(data['info'])
    assert (info['sd_model_name'], info['sd_model_hash']) == ('single.safetensors', sha[:10])
    assert np.array_equal(pixels(data['images'][0]), reference)
  finally:
    client.post('/sdapi/v1/options', json={'sd_model_checkpoint': first})
    for name in ('single.safetensors', 'single.config', 'broken.safetensors'):
      os.remove(os.path.join(models, name))
    server.engine.refresh_models()


def test_save_images_writes_a1111_named_pngs_with_their_parameters_under_the_outdir(served, tmp_path):
  server, client = served
  kept, server.outdir = server.outdir, str(tmp_path / 'out')
  try:
    unsaved = txt2img(client, prompt='a dog', seed=21)  # save_images: false by default
    assert not os.path.exists(server.outdir)
    data = txt2img(client, prompt='a dog', seed=21, batch_size=2, save_images=True, send_images=False)
    again = txt2img(client, prompt='a cat', seed=7, save_images=True)
  finally:
    server.outdir = kept
  folder = tmp_path / 'out' / 'txt2img-images' / time.strftime('%Y-%m-%d')
  assert sorted(os.listdir(folder)) == ['00000-21.png', '00001-22.png', '00002-7.png']  # numbered on, NNNNN-SEED
  assert data['images'] == []  # send_images: false
  for name, text in zip(['00000-21.png', '00001-22.png'], json.loads(data['info'])['infotexts'], strict=True):
    assert Image.open(folder / name).text['parameters'] == text
  assert np.array_equal(np.asarray(Image.open(folder / '00000-21.png')), pixels(unsaved['images'][0]))
  assert np.array_equal(np.asarray(Image.open(folder / '00002-7.png')), pixels(again['images'][0]))


def test_bad_requests_are_refused_naming_the_field(served):
  server, client = served
  images_before = server.metrics.images

  def refused(status, field, body, path='/sdapi/v1/txt2img', **kw):
    r = client.post(path, json={**SMALL, **body}, **kw)
    assert r.status_code == status, r.text
    if field:
      assert r.json()['field'] == field, r.json()
    return r.json()

  detail = refused(422, 'sampler_name', {'sampler_name': 'Heun++'})['detail']
  assert all(name in detail for name in ('Euler a', 'DPM++ 2M Karras', 'DDIM'))
  assert 'Karras' in refused(422, 'scheduler', {'sampler_name': 'Euler', 'scheduler': 'Exponential'})['detail']
  assert '[4, 64]' in refused(422, 'width', {'width': 1024})['detail']
  assert 'multiple of 4' in refused(422, 'height', {'height': 30})['detail']
  refused(422, 'steps', {'steps': 0})
  refused(422, 'batch_size', {'batch_size': 17})
  assert 'without a path' in refused(422, 'prompt', {'prompt': 'x <lora:../../etc/passwd:1>'})['detail']
  refused(422, 'prompt', {'prompt': 'x <lora:sub/subject:1>'})
  assert 'no nope.safetensors' in refused(422, 'prompt', {'prompt': 'x <lora:nope:1>'})['detail']
  assert 'at most 8' in refused(422, 'prompt', {'prompt': 'x' + ' <lora:subject:0.1>' * 9})['detail']
  refused(422, None, {'steps': 'many'})  # a type error: FastAPI's own 422
  # Features that would change the image and that jaxdream does not have: refused, not silently left out.
  hires = {'enable_hr': True, 'hr_scale': 1.5}
  assert 'ESRGAN' in refused(422, 'hr_upscaler', {**hires, 'hr_upscaler': 'R-ESRGAN 4x+'})['detail']
  assert '[4, 64]' in refused(422, 'hr_scale (hires width)', {**hires, 'hr_scale': 3})['detail']  # 96 px
  refused(422, 'hr_resize_y', {**hires, 'hr_resize_x': 32, 'hr_resize_y': 128})
  refused(422, 'denoising_strength', {**hires, 'denoising_strength': 0})
  for tiny in (0.001, 5e-324):  # a schedule of steps / strength past the model's timesteps: named, the worker lives
    assert 'needs a schedule' in refused(422, 'denoising_strength', {**hires, 'denoising_strength': tiny})['detail']
  r = client.post(
    '/sdapi/v1/txt2img', content=b'{"steps": NaN, "hr_resize_x": NaN}', headers={'Content-Type': 'application/json'}
  )
  assert r.status_code == 422 and 'nan' in r.text, r.text  # FastAPI's own 422, its echoed NaN made JSON
  refused(422, 'hr_second_pass_steps', {**hires, 'hr_second_pass_steps': 11})
  refused(422, 'hr_sampler_name', {**hires, 'hr_sampler_name': 'Heun++'})
  refused(422, 'hr_checkpoint_name', {**hires, 'hr_checkpoint_name': 'other'})  # another checkpoint
  assert 'tags' in refused(422, 'hr_prompt', {**hires, 'hr_prompt': 'x <lora:subject:1>'})['detail']
  refused(422, 'alwayson_scripts', {'alwayson_scripts': {'controlnet': {'args': []}}})
  refused(422, 'script_name', {'script_name': 'x/y/z plot'})
  for clip in (0, 13, 'two'):
    refused(422, 'CLIP_stop_at_last_layers', {'override_settings': {'CLIP_stop_at_last_layers': clip}})
  refused(422, 'CLIP_stop_at_last_layers', {'override_settings': {'CLIP_stop_at_last_layers': 5}})  # 1 layer here
  for scale in ('nan', 'inf', '-inf'):  # a non-finite weight would make a black image
    assert 'finite' in refused(422, 'prompt', {'prompt': f'x <lora:subject:{scale}>'})['detail']
  refused(422, 'sd_model_checkpoint', {'override_settings': {'sd_model_checkpoint': ['a']}})
  r = client.post('/sdapi/v1/options', json={'sd_model_checkpoint': {'a': 1}})
  assert r.status_code == 422 and r.json()['field'] == 'sd_model_checkpoint', r.text
  refused(422, 'init_images', {}, '/sdapi/v1/img2img')
  refused(422, 'init_images', {'init_images': ['not base64!']}, '/sdapi/v1/img2img')
  tiny = {'init_images': [png_b64(np.zeros((8, 8, 3)))], 'denoising_strength': 0.01}  # int(steps * 0.01) = 0
  assert 'runs no step' in refused(422, 'denoising_strength', tiny, '/sdapi/v1/img2img')['detail']
  # A small file that decodes to more pixels than the limit (a decompression bomb) is refused before decoding.
  bomb = png_b64(np.zeros((128, 128, 3)))
  assert '128x128' in refused(413, 'init_images', {'init_images': [bomb]}, '/sdapi/v1/img2img')['detail']
  refused(413, 'body', {'prompt': 'x' * (2**20 + 10)})
  assert 'at most 8' in refused(422, 'prompt', {'prompt': 'a dog, ' * 400})['detail']  # 9 chunks of 75 tokens
  assert 'characters' in refused(422, 'negative_prompt', {'negative_prompt': 'x' * 20000})['detail']
  assert 'overflow' in refused(422, 'prompt', {'prompt': '(' * 1000 + 'a' + ')' * 1000})['detail']
  for headers in ({}, basic(AUTH[0], 'wrong'), basic('bob', AUTH[1]), {'Authorization': 'Basic !!'}):
    r = TestClient(client.app).post('/sdapi/v1/txt2img', json=SMALL, headers=headers)
    assert r.status_code == 401 and r.headers['www-authenticate'].startswith('Basic')
  assert TestClient(client.app).get('/sdapi/v1/sd-models').status_code == 401
  assert server.metrics.images == images_before
  assert 'jaxdream_serve_errors_total{kind="unauthorized"} 5' in client.get('/metrics').text


def test_an_image_is_the_same_alone_and_batched_with_other_prompts_seeds_and_guidance(served):
  server, client = served
  request = dict(prompt='a red fox', negative_prompt='blurry', seed=11, cfg_scale=6.0)
  alone = pixels(txt2img(client, **request)['images'][0])
  others = [dict(prompt='a castle', seed=1, cfg_scale=9.0), dict(prompt='a cat', negative_prompt='x', seed=2)]
  calls = batch_count(server, 3)
  server.queue.pause()
  try:  # the queue holds 3 requests: a 4th is refused while they wait
    got = [None] * 3
    threads = [
      threading.Thread(target=lambda i=i, b=b: got.__setitem__(i, txt2img(client, **b)))
      for i, b in enumerate([others[0], request, others[1]])
    ]
    for t in threads:
      t.start()
    deadline = time.monotonic() + 60
    while server.queue.depth() < 3:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    full = client.post('/sdapi/v1/txt2img', json={**SMALL, 'prompt': 'one too many'})
    assert full.status_code == 429 and int(full.headers['retry-after']) > 0
  finally:
    server.queue.resume()
  for t in threads:
    t.join(120)
  assert batch_count(server, 3) == calls + 1  # the three were one sampler call
  images = [pixels(g['images'][0]) for g in got]
  assert np.array_equal(images[1], alone)
  assert not np.array_equal(images[0], alone) and not np.array_equal(images[2], alone)
  assert json.loads(got[0]['info'])['cfg_scale'] == 9.0


def test_prompts_are_read_as_a1111_reads_them_emphasis_and_any_length(served):
  server, client = served
  image = lambda **b: pixels(txt2img(client, seed=4, **b)['images'][0])
  plain = image(prompt='a dog on a beach')
  assert np.array_equal(image(prompt='(a dog:1.0) on a \\beach'), plain)  # brackets and escapes are syntax
  assert not np.array_equal(image(prompt='(a dog:1.6) on a beach'), plain)
  long = 'a dog on a beach, ' + ', '.join(['sunny day'] * 40)  # two chunks: differs from its first 75 tokens
  alone = image(prompt=long)
  assert not np.array_equal(alone, image(prompt=long[:200]))
  # Batched with a one-chunk request, each keeps its own chunks (never padded to the other's).
  got = batched(server, client, [dict(SMALL, prompt=long, seed=4), dict(SMALL, prompt='a dog on a beach', seed=4)])
  assert np.array_equal(pixels(got[0]['images'][0]), alone) and np.array_equal(pixels(got[1]['images'][0]), plain)


def test_devices_split_each_batch_over_a_data_mesh_and_give_the_same_images(served, small_sd_folder):
  """`--devices 2`: each batch is split over a 2-device 'data' mesh (parameters replicated); an image is the
  one a single device makes (to rounding)."""
  server, client = served
  request = dict(prompt='a red fox', negative_prompt='blurry', seed=11, cfg_scale=6.0)
  one = pixels(txt2img(client, **request)['images'][0])
  two = make_server(small_sd_folder[1], max_batch=MAX_BATCH, queue_size=3, limits=LIMITS, devices=2)
  try:
    assert dict(two.engine.mesh.shape)['data'] == 2
    got = pixels(txt2img(TestClient(create_app(two)), **request)['images'][0])
  finally:
    two.queue.close()
  assert np.abs(got.astype(int) - one.astype(int)).max() <= 1


def test_lora_prompt_tags_give_each_image_its_adapter_alone_and_batched(served):
  server, client = served
  plain = pixels(txt2img(client, prompt='a dog', seed=3)['images'][0])
  data = txt2img(client, prompt='a dog <lora:subject:0.8>', seed=3)
  alone = pixels(data['images'][0])
  assert not np.array_equal(alone, plain)  # the adapter changes the image
  info = json.loads(data['info'])
  assert info['prompt'] == 'a dog <lora:subject:0.8>' and '<lora:subject:0.8>' in info['infotexts'][0]
  calls = batch_count(server, 3)
  got = batched(
    server,
    client,
    [
      dict(prompt='a cat <lora:style:1>', seed=4),
      dict(prompt='a dog <lora:subject:0.8>', seed=3),
      dict(prompt='a dog <lora:subject:0.3>', seed=3),
    ],
  )
  assert batch_count(server, 3) == calls + 1
  images = [pixels(g['images'][0]) for g in got]
  assert np.array_equal(images[1], alone)
  assert not np.array_equal(images[2], alone) and not np.array_equal(images[0], alone)


def test_several_lora_tags_apply_their_weighted_sum_per_image_and_the_lora_cache_is_lru_bounded(served):
  server, client = served
  engine, model = server.engine, server.engine.current
  subject, style = (engine.lora_path(n) for n in ('subject', 'style'))
  # The combination's update is exactly 0.8 subject's + 0.5 style's, per layer.
  one = {p: engine.adapter(model, ((p, 1.0),))[1]['unet'] for p in (subject, style)}
  both = engine.adapter(model, ((style, 0.5), (subject, 0.8)))[1]['unet']
  delta = lambda f: np.einsum('...ir,...ro->...io', np.asarray(f['a'][0]), np.asarray(f['b'][0]))
  for name, f in both.items():
    expected = 0.8 * delta(one[subject][name]) + 0.5 * delta(one[style][name])
    np.testing.assert_allclose(delta(f), expected, rtol=1e-5, atol=1e-7)
  single = pixels(txt2img(client, prompt='a dog <lora:subject:0.8>', seed=3)['images'][0])
  alone = pixels(txt2img(client, prompt='a dog <lora:subject:0.8> <lora:style:0.5>', seed=3)['images'][0])
  assert not np.array_equal(alone, single)
  calls = batch_count(server, 3)
  got = batched(
    server,
    client,
    [
      dict(prompt='a cat <lora:style:1> <lora:subject:0.2>', seed=4),
      dict(prompt='a dog <lora:style:0.5> <lora:subject:0.8>', seed=3),  # the tags in another order
      dict(prompt='a dog <lora:subject:0.4> <lora:style:0.5> <lora:subject:0.4>', seed=3),  # subject twice
    ],
  )
  assert batch_count(server, 3) == calls + 1  # one call, each image its own combination
  images = [pixels(g['images'][0]) for g in got]
  assert np.array_equal(images[1], alone) and not np.array_equal(images[0], alone)
  assert np.abs(images[2].astype(int) - alone).max() <= 1  # 0.4 + 0.4 = 0.8 (rounding aside: another rank)
  assert '<lora:style:0.5> <lora:subject:0.8>' in json.loads(got[1]['info'])['infotexts'][0]
  # LRU: a bound of 2 entries keeps the 2 most recently used; a trimmed one is read again when asked.
  kept = engine.lora_cache
  engine.lora_cache = 2
  try:
    for entry in (((subject, 1.0),), ((style, 1.0),), ((subject, 1.0),), ((style, 0.3), (subject, 0.3))):
      engine.adapter(model, entry)
    assert [k[1] for k in engine._adapters] == [((subject, 1.0),), ((style, 0.3), (subject, 0.3))]
    assert engine.adapter_cache()[0] == 2 and engine.adapter(model, ((style, 1.0),))[1]
    size = engine.adapter_cache()[1]
    engine.lora_cache_bytes = size // 2 + 1  # a bound in bytes: the entry just used is always kept
    engine.adapter(model, ((subject, 1.0),))
    assert [k[1] for k in engine._adapters] == [((subject, 1.0),)]
  finally:
    engine.lora_cache, engine.lora_cache_bytes = kept, 1024 * 2**20


def test_inpainting_from_a_data_url_image_and_a_base64_mask(served):
  _, client = served
  rng = np.random.default_rng(0)
  init = 'data:image/png;base64,' + png_b64(rng.integers(0, 256, (40, 40, 3)))  # resized to 32x32, as A1111
  mask = np.zeros((32, 32), np.uint8)
  mask[:, 16:] = 255
  r = client.post(
    '/sdapi/v1/img2img',
    json={
      **SMALL,
      'prompt': 'a dog',
      'seed': 1,
      'init_images': [init],
      'mask': png_b64(mask),
      'mask_blur': 0,
      'denoising_strength': 0.5,
    },
  )
  assert r.status_code == 200, r.text
  info = json.loads(r.json()['info'])
  assert (info['denoising_strength'], info['is_using_inpainting_conditioning']) == (0.5, True)
  assert 'Denoising strength: 0.5' in info['infotexts'][0]
  assert r.json()['parameters']['init_images'] is None
  assert pixels(r.json()['images'][0]).shape == (32, 32, 3)


def test_hires_fix_gives_the_librarys_hires_images_alone_and_batched_with_a1111_infotext(served):
  from jaxdream.diffusion.sampling import hires_fix
  from jaxdream.serve import samplers

  server, client = served
  hires = dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5, hr_sampler_name='DDIM')
  request = dict(prompt='a red fox', seed=11, **hires)
  alone = txt2img(client, **request)
  image = pixels(alone['images'][0])
  assert image.shape == (48, 48, 3)
  info = json.loads(alone['info'])
  assert (info['width'], info['height'], info['denoising_strength']) == (32, 32, 0.5)  # A1111: the first pass's size
  for field in ('Size: 32x32', 'Denoising strength: 0.5', 'Hires upscale: 1.5', 'Hires steps: 2',
                'Hires upscaler: Latent', 'Hires sampler: DDIM'):  # fmt: skip
    assert field in info['infotexts'][0], info['infotexts'][0]
  # The engine's call (a batch padded to --max-batch, the progress program) made with the library's function.
  pipe = server.engine.pipeline(server.engine.current)
  expected = hires_fix(
    pipe, ['a red fox'] * MAX_BATCH, negative_prompts=[None] * MAX_BATCH, num_inference_steps=2,
    guidance_scale=[7.0] * MAX_BATCH, scheduler=samplers.resolve('Euler'), seed=[11] * MAX_BATCH, height=32, width=32,
    progress=lambda *a: None, progress_latents='denoised', prompt_syntax='a1111', scale=1.5, strength=0.5,
    hires_steps=2, hires_scheduler=samplers.resolve('DDIM'),
  )  # fmt: skip
  assert np.array_equal(image, expected[0])
  others = [dict(prompt='a castle', seed=1, **hires), dict(prompt='a cat', seed=2, cfg_scale=9.0, **hires)]
  got = batched(server, client, [others[0], request, others[1]])
  assert np.array_equal(pixels(got[1]['images'][0]), image)
  assert not np.array_equal(pixels(got[0]['images'][0]), image)
  key = BatchKey(server.engine.current, 'txt2img', 32, 32, 2, samplers.resolve('Euler'), True)
  hires_key = dataclasses.replace(key, hires=Hires(1.5, 0, 0, 'Latent', 2, samplers.resolve('DDIM'), 0.5))
  assert server.engine.num_steps(hires_key) == server.engine.num_steps(key) + 2  # /progress counts both passes
  names = [m['name'] for m in client.get('/sdapi/v1/latent-upscale-modes').json()]
  names += [u['name'] for u in client.get('/sdapi/v1/upscalers').json()]
  for name in names:  # every upscaler listed is one hires fix takes
    assert txt2img(client, prompt='a red fox', seed=11, **dict(hires, hr_upscaler=name))['images']


def test_variation_seeds_slerp_toward_the_subseed_as_a1111_and_report_it(served):
  server, client = served
  plain = {seed: pixels(txt2img(client, prompt='a red fox', seed=seed)['images'][0]) for seed in (11, 5)}
  # Strength 1 is the subseed's noise (Euler: no other randomness), 0 the seed's.
  full = txt2img(client, prompt='a red fox', seed=11, subseed=5, subseed_strength=1.0)
  assert np.array_equal(pixels(full['images'][0]), plain[5])
  assert np.array_equal(pixels(txt2img(client, prompt='a red fox', seed=11, subseed=5)['images'][0]), plain[11])
  some = txt2img(client, prompt='a red fox', seed=11, subseed=5, subseed_strength=0.3, batch_size=2)
  info = json.loads(some['info'])
  assert (info['subseed'], info['all_subseeds'], info['subseed_strength']) == (5, [5, 6], 0.3)
  assert info['all_seeds'] == [11, 11]  # A1111: with a variation strength every image keeps the seed
  alone = txt2img(client, prompt='a red fox', seed=11, subseed=6, subseed_strength=0.3)
  assert np.array_equal(pixels(alone['images'][0]), pixels(some['images'][1]))
  assert 'Variation seed: 6, Variation seed strength: 0.3' in info['infotexts'][1]
  assert not any(np.array_equal(pixels(some['images'][0]), p) for p in plain.values())
  # The seed's noise drawn at the same size and pasted in the middle: the seed's own image.
  same = txt2img(client, prompt='a red fox', seed=11, seed_resize_from_w=32, seed_resize_from_h=32)
  assert np.array_equal(pixels(same['images'][0]), plain[11]) and 'Seed resize from: 32x32' in same['info']
  body = {**SMALL, 'seed': 11, 'subseed_strength': 0.5}
  r = client.post('/sdapi/v1/txt2img', json={**body, 'enable_hr': True, 'hr_scale': 1.5})
  assert r.status_code == 422 and r.json()['field'] == 'subseed_strength'
  assert client.post('/sdapi/v1/txt2img', json={**body, 'subseed_strength': 1.5}).status_code == 422


def test_embeddings_are_named_by_their_files_as_words_in_any_case_and_other_models_ones_are_skipped(served):
  server, client = served
  listed = client.get('/sdapi/v1/embeddings').json()
  assert listed['loaded'] == {  # named as the file is, as A1111 lists them
    'ShinyStyle': {'step': None, 'sd_checkpoint': None, 'sd_checkpoint_name': None, 'shape': 32, 'vectors': 2}
  }
  assert listed['skipped']['wide']['shape'] == 33
  # A file added to a subfolder (A1111 walks it) is read on refresh-embeddings; removed, it is gone again.
  folder = os.path.join(server.engine.embeddings_dir, 'more')
  os.makedirs(folder, exist_ok=True)
  write_safetensors(os.path.join(folder, 'laterzq.safetensors'), {'emb_params': np.ones((1, 32), np.float32)})
  assert client.post('/sdapi/v1/refresh-embeddings').status_code == 200
  assert set(client.get('/sdapi/v1/embeddings').json()['loaded']) == {'ShinyStyle', 'laterzq'}
  os.remove(os.path.join(folder, 'laterzq.safetensors'))
  assert client.post('/sdapi/v1/refresh-embeddings').status_code == 200
  assert set(client.get('/sdapi/v1/embeddings').json()['loaded']) == {'ShinyStyle'}
  # As A1111, the folder is also rescanned before each generation: a file added is a word from the next request on.
  write_safetensors(os.path.join(folder, 'laterzq.safetensors'), {'emb_params': np.ones((1, 32), np.float32)})
  txt2img(client, prompt='a laterzq')
  assert set(client.get('/sdapi/v1/embeddings').json()['loaded']) == {'ShinyStyle', 'laterzq'}
  os.remove(os.path.join(folder, 'laterzq.safetensors'))
  assert client.post('/sdapi/v1/refresh-embeddings').status_code == 200
  pipe = server.engine.pipeline(server.engine.current)
  ids = {p: list(pipe.tokenize([p])['text_encoder'][0][:6]) for p in ('a ShinyStyle', 'a shinystyle', 'a shinystyles')}
  n = 49408  # the vocabulary: the embedding's two vectors are the next two tokens
  assert ids['a ShinyStyle'] == ids['a shinystyle'] and ids['a shinystyle'][2:4] == [n, n + 1]
  assert n not in ids['a shinystyles']  # another word
  body = {**SMALL, 'seed': 4, 'cfg_scale': 1}
  named = pixels(txt2img(client, prompt='a dog, (SHINYSTYLE:1.1)', **body)['images'][0])
  plain = pixels(txt2img(client, prompt='a dog, ', **body)['images'][0])
  assert not np.array_equal(named, plain)


def test_progress_current_image_is_the_running_image_decoded_only_when_asked(served):
  server, client = served
  engine, at_last, go_on, decoded = server.engine, threading.Event(), threading.Event(), []
  # Without guidance, so that after the last step the prompt's clean latents (A1111's preview) are the image's.
  body = {**SMALL, 'prompt': 'a lighthouse', 'seed': 8, 'cfg_scale': 1}
  expected = pixels(txt2img(client, **body)['images'][0])

  def run(key, tasks, progress):  # holds after the last step, its latents reported
    def held(i, latents):
      progress(i, latents)
      if i == key.steps - 1:
        at_last.set()
        go_on.wait(60)

    return engine.run(key, tasks, held)

  def preview(key, latents):
    decoded.append(latents.shape)
    return engine.preview(key, latents)

  queue = BatchQueue(run, max_batch=MAX_BATCH, max_requests=4, num_steps=engine.num_steps, preview=preview)
  held_client = TestClient(create_app(Server(engine, queue, Metrics(MAX_BATCH), LIMITS)))
  got = {}
  try:
    t = threading.Thread(target=lambda: got.setdefault('r', held_client.post('/sdapi/v1/txt2img', json=body)))
    t.start()
    assert at_last.wait(60)
    skipped = held_client.get('/sdapi/v1/progress', params={'skip_current_image': 'true'}).json()
    assert skipped['current_image'] is None and skipped['state']['sampling_step'] == 2 and not decoded
    shown = [held_client.get('/sdapi/v1/progress').json()['current_image'] for _ in range(2)]  # A1111's default
    assert shown[0] == shown[1] and decoded == [(8, 8, 4)]  # one image's latents, decoded once per step
    go_on.set()
    t.join(60)
  finally:
    go_on.set()
    queue.close()
  final = pixels(got['r'].json()['images'][0])
  assert np.array_equal(final, expected)  # a preview changes no pixel of the batch
  current = pixels(shown[0]).astype(int)  # after the last step the latents are the image's
  assert current.shape == (32, 32, 3) and np.abs(current - final).max() <= 2
  assert held_client.get('/sdapi/v1/progress').json()['current_image'] is None  # nothing running


def test_inpainting_fill_modes_and_full_res_as_a1111_with_the_original_pasted_back_outside_the_mask(served):
  _, client = served
  # A1111's crop region (the mask's box, padded) widened to the output's aspect ratio, kept inside the image.
  region = np.zeros((64, 64), np.uint8)
  region[10:40, 10:20] = 255
  assert inpainting.crop_region(region, 4) == (6, 6, 24, 44)
  assert inpainting.expand_crop_region((6, 6, 24, 44), 32, 32, 64, 64) == (0, 6, 38, 44)
  assert inpainting.expand_crop_region((50, 0, 64, 10), 32, 32, 64, 64) == (50, 0, 64, 14)
  # fill (0) paints the masked area with the colours around it and leaves the rest.
  flat = np.zeros((32, 32, 3), np.uint8) + np.array([200, 40, 10], np.uint8)
  hole = np.zeros((32, 32), np.uint8)
  hole[8:24, 8:24] = 255
  filled = inpainting.fill(np.where(hole[..., None] > 0, 0, flat).astype(np.uint8), hole)
  assert np.abs(filled.astype(int) - flat).max() <= 8  # premultiplied-alpha rounding, as in A1111
  assert np.array_equal(filled[hole == 0], flat[hole == 0])

  init = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 16:28] = 255
  body = {**SMALL, 'prompt': 'a dog', 'seed': 2, 'init_images': [png_b64(init)], 'mask': png_b64(mask)}
  body.update(mask_blur=0, denoising_strength=0.5, inpaint_full_res=False)

  def inpainted(**kw):
    r = client.post('/sdapi/v1/img2img', json={**body, **kw})
    assert r.status_code == 200, r.text
    return pixels(r.json()['images'][0])

  out = {fill: inpainted(inpainting_fill=fill) for fill in range(4)}
  out['full res'] = inpainted(inpainting_fill=1, inpaint_full_res=True, inpaint_full_res_padding=2)
  for name, image in out.items():  # the original pasted back outside the mask, pixel for pixel
    assert np.array_equal(image[mask == 0], init[mask == 0]), name
  inside = [image[mask > 0] for image in out.values()]
  assert all(not np.array_equal(a, b) for i, a in enumerate(inside) for b in inside[i + 1 :])
  assert not any(np.array_equal(a, init[mask > 0]) for a in inside)
  r = client.post('/sdapi/v1/img2img', json={**body, 'inpainting_fill': 4})
  assert r.status_code == 422 and r.json()['field'] == 'inpainting_fill'


def test_the_queue_batches_compatible_images_in_order_interrupts_skips_and_shuts_down():
  calls, release = [], threading.Event()

  def run(key, tasks, progress):
    calls.append((key.width, [t.prompt for t in tasks]))
    for i in range(200 if key.steps > 1 else 1):
      progress(i)
      if key.steps > 1:
        release.wait(0.01)
    return np.full((len(tasks), 1, 1, 3), len(calls), np.uint8)

  def key(width, steps=1):
    return BatchKey('m', 'txt2img', 8, width, steps, 'euler', True)

  def tasks(name, n):
    return [Task(f'{name}{i}', '', i, 7.0) for i in range(n)]

  q = BatchQueue(run, max_batch=4, max_requests=8)
  try:
    q.pause()
    a, b, c = q.submit(key(8), tasks('a', 3)), q.submit(key(16), tasks('b', 1)), q.submit(key(8), tasks('c', 2))
    q.resume()
    assert [len(f.result(10)) for f in (a, b, c)] == [3, 1, 2]
    # The head request and every compatible image after it, in order, up to max_batch; then the next key.
    assert calls == [(8, ['a0', 'a1', 'a2', 'c0']), (16, ['b0']), (8, ['c1'])]
    assert [im[0, 0, 0] for im in c.result()] == [1, 3]
    for skip in (False, True):  # 6 images: two batches; stopped in the first
      calls.clear()
      f = q.submit(key(8, steps=2), tasks('d', 6))
      while q.progress()['state']['sampling_step'] < 2:
        time.sleep(0.01)
      assert q.progress()['progress'] > 0
      assert q.interrupt(skip=skip)
      images = f.result(10)
      if skip:  # the running batch is dropped, the request goes on
        assert [im is None for im in images] == [True] * 4 + [False] * 2 and len(calls) == 2
      else:  # the request ends with what it has
        assert images == [None] * 6 and len(calls) == 1
    # Shutdown: the running batch finishes, the queued requests fail (503), new ones are refused.
    running = q.submit(key(8, steps=2), tasks('e', 4))
    while q.progress()['state']['sampling_step'] < 1:
      time.sleep(0.01)
    queued = q.submit(key(8), tasks('f', 1))
    release.set()
    q.close()
    assert all(im is not None for im in running.result(10))
    with pytest.raises(ShuttingDown):
      queued.result(10)
    with pytest.raises(ShuttingDown):
      q.submit(key(8), tasks('g', 1))
  finally:
    q.close()


def test_a_stopped_batch_returns_its_last_reported_latents_finished_and_one_that_reported_none_nothing():
  started, release = threading.Event(), threading.Event()

  def run(key, tasks, progress):
    for i in range(200):
      if i >= 1 and tasks[0].prompt != 'bare':  # from the second step on, the loop reports its latents
        progress(i, np.full((4, 1, 1, 1), 10 * len(tasks) + i, np.float32))
      else:
        progress(i)
      started.set()
      release.wait(0.01)
    return np.zeros((len(tasks), 1, 1, 3), np.uint8)

  def finish(key, tasks, latents):
    return [np.full((1, 1, 3), latents[j, 0, 0, 0], np.uint8) for j in range(len(tasks))]

  q = BatchQueue(run, max_batch=4, max_requests=8, finish=finish)
  key = BatchKey('m', 'txt2img', 8, 8, 2, 'euler', True)
  try:
    for skip in (False, True):
      f = q.submit(key, [Task(f'p{i}', '', i, 7.0) for i in range(6)])  # two batches: 4, then 2
      while q.progress()['state']['sampling_step'] < 3:
        time.sleep(0.01)
      assert q.interrupt(skip=skip)
      images = f.result(10)
      assert all(im is not None and 40 < im[0, 0, 0] < 240 for im in images[:4])  # the 4-task batch's latents
      if skip:  # the next batch runs to its end
        assert [im[0, 0, 0] for im in images[4:]] == [0, 0]
      else:
        assert images[4:] == [None, None]
    started.clear()
    f = q.submit(key, [Task('bare', '', 0, 7.0)])
    assert started.wait(10) and q.interrupt()  # a loop that reported no latents: nothing to return
    assert f.result(10) == [None] and f.result().interrupted
    # batch_size 1, n_iter 3, packed into one batch: a stop ends the first iteration (the job A1111 runs); skip runs
    # the other two again, whole, interrupt drops them. Either way the result says whether an interrupt stopped it.
    for skip in (True, False):
      f = q.submit(key, [Task(f'n{i}', '', i, 7.0) for i in range(3)], per_iteration=1)
      while q.progress()['state']['sampling_step'] < 3:
        time.sleep(0.01)
      assert q.interrupt(skip=skip)
      images = f.result(10)
      assert images[0][0, 0, 0] > 0  # partial (a finished image of this fake run is 0)
      if skip:
        assert [im[0, 0, 0] for im in images[1:]] == [0, 0] and not images.interrupted
      else:
        assert images[1:] == [None, None] and images.interrupted
  finally:
    release.set()
    q.close()


@contextlib.contextmanager
def live(served_server, run=None):
  """A real uvicorn on a free loopback port, serving the module's engine through its own queue, without auth."""
  engine = served_server.engine
  metrics = Metrics(MAX_BATCH)
  queue = BatchQueue(
    run or engine.run,
    max_batch=MAX_BATCH,
    max_requests=8,
    metrics=metrics,
    num_steps=engine.num_steps,
    preview=engine.preview,
    finish=engine.finish,
  )
  server = Server(engine, queue, metrics, LIMITS)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  uv = make_uvicorn_server(create_app(server), queue, '127.0.0.1', port)
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not uv.started:
    assert thread.is_alive() and time.monotonic() < deadline, 'uvicorn did not start'
    time.sleep(0.02)
  try:
    yield server, uv, thread, f'http://127.0.0.1:{port}'
  finally:
    uv.should_exit = True
    thread.join(30)
    queue.close()


def test_a_real_uvicorn_serves_interrupts_and_sigterm_answers_the_queued_requests_503_and_stops(served):
  engine, at_step, go_on = served[0].engine, threading.Event(), threading.Event()

  reported = []

  def run(key, tasks, progress):  # the compiled loop's progress callback holds at the first step until told
    def held(i, *latents):
      if key.steps == 2 and tasks[0].prompt == 'hold':
        reported.append(latents[0])
        at_step.set()
        go_on.wait(60)
      progress(i, *latents)

    return engine.run(key, tasks, held)

  with live(served[0], run) as (server, uv, thread, url):
    r = httpx.post(f'{url}/sdapi/v1/txt2img', json={**SMALL, 'prompt': 'a dog', 'seed': 5}, timeout=120)
    assert r.status_code == 200 and len(r.json()['images']) == 1
    # Interrupt stops the loop between two steps (the callback raises inside the compiled loop): as in A1111, the
    # request ends with the running batch's images decoded from the clean latents of its last step; its second
    # batch never runs.
    held = {}
    body = {**SMALL, 'prompt': 'hold', 'batch_size': MAX_BATCH, 'n_iter': 2}
    t = threading.Thread(
      target=lambda: held.setdefault('r', httpx.post(f'{url}/sdapi/v1/txt2img', json=body, timeout=120))
    )
    t.start()
    assert at_step.wait(60)
    progress = httpx.get(f'{url}/sdapi/v1/progress').json()
    assert progress['state']['sampling_steps'] == 2 and progress['state']['job'] == f'batch of {MAX_BATCH}'
    assert httpx.post(f'{url}/sdapi/v1/interrupt').json() == {'interrupted': True}
    go_on.set()
    t.join(60)
    assert held['r'].status_code == 200 and len(held['r'].json()['images']) == MAX_BATCH
    assert json.loads(held['r'].json()['info'])['interrupted'] is True
    partial = [pixels(im) for im in held['r'].json()['images']]
    key = BatchKey(engine.current, 'txt2img', 32, 32, 2, 'euler', True)
    assert np.array_equal(np.stack(partial), engine.finish(key, [None] * MAX_BATCH, reported[0]))
    assert server.metrics.images == 1 + MAX_BATCH
    server.queue.pause()
    queued = {}
    t = threading.Thread(
      target=lambda: queued.setdefault('r', httpx.post(f'{url}/sdapi/v1/txt2img', json=SMALL, timeout=120))
    )
    t.start()
    while server.queue.depth() < 1:
      time.sleep(0.02)
    uv.handle_exit(signal.SIGTERM, None)
    t.join(60)
    assert queued['r'].status_code == 503 and queued['r'].json()['error'] == 'shutting_down'
    thread.join(60)
    assert not thread.is_alive()


def test_the_web_page_generates_an_image_in_headless_chromium(served, tmp_path):
  chromium, driver = shutil.which('chromium'), shutil.which('chromedriver')
  if not chromium or not driver:
    pytest.skip('headless browser test: needs Debian chromium and chromium-driver (/usr/bin/chromium, chromedriver)')
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import Select, WebDriverWait

  options = webdriver.ChromeOptions()
  options.binary_location = chromium
  for flag in (
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    f'--user-data-dir={tmp_path / "profile"}',
  ):
    options.add_argument(flag)
  options.add_experimental_option('mobileEmulation', {'deviceMetrics': {'width': 360, 'height': 740, 'pixelRatio': 1}})
  with live(served[0]) as (_, _, _, url):
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
      browser.get(url + '/')
      wait = WebDriverWait(browser, 120)
      wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#sampler_name option')) > 1)
      wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, '#loras span')) == 2)
      upscalers = [o.text for o in browser.find_elements(By.CSS_SELECTOR, '#hr_upscaler option')]
      assert upscalers[0] == 'Latent' and 'Lanczos' in upscalers  # hires fix's, from the two upscaler routes
      browser.find_element(By.ID, 'prompt').send_keys('a photo of sks dog')
      scale = browser.find_element(By.ID, 'lora_scale')
      scale.clear()
      scale.send_keys('0.5')
      browser.find_element(By.XPATH, "//div[@id='loras']/span[text()='subject']").click()  # the LoRA picker
      Select(browser.find_element(By.ID, 'sampler_name')).select_by_visible_text('Euler')
      for field, value in (('steps', 2), ('seed', 5), ('width', 32), ('height', 32)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
      browser.find_element(By.ID, 'generate').click()
      image = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '#gallery figure img')))
      wait.until(lambda b: b.execute_script('return arguments[0].complete && arguments[0].naturalWidth', image) == 32)
      text = browser.find_element(By.CSS_SELECTOR, '#gallery pre.parameters').text
      browser.save_screenshot(str(tmp_path / 'serve_page.png'))
      # Usable at phone width: nothing wider than the 360 px screen.
      assert browser.execute_script('return [window.innerWidth, document.documentElement.scrollWidth]') == [360, 360]
    finally:
      browser.quit()
  assert text.startswith('a photo of sks dog <lora:subject:0.5>') and 'Seed: 5' in text and 'Size: 32x32' in text, text
  assert 'Sampler: Euler,' in text
  assert (tmp_path / 'serve_page.png').stat().st_size > 0


def test_serving_beyond_loopback_needs_auth_or_insecure(small_sd_folder, capsys, tmp_path):
  assert main(['serve', '--model', small_sd_folder[1], '--host', '0.0.0.0', '--warmup-steps', '0']) == 2
  assert '--api-auth' in capsys.readouterr().err
  # A model that cannot be served, and numbers out of range: a usage error, not a traceback.
  assert main(['serve', '--model', str(tmp_path / 'missing'), '--warmup-steps', '0']) == 2
  assert 'serve: error:' in capsys.readouterr().err
  for flag, value in (('--port', '99999'), ('--max-steps', '0'), ('--max-size', '0'), ('--max-body-mb', 'nan')):
    with pytest.raises(SystemExit) as e:
      main(['serve', '--model', small_sd_folder[1], flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err
  check_bind('127.0.0.1', None, False)
  check_bind('::1', None, False)
  check_bind('0.0.0.0', 'a:b', False)
  check_bind('0.0.0.0', None, True)
  assert parse_auth('ann:s3cret, bob:x:y') == {'ann': 's3cret', 'bob': 'x:y'}
  with pytest.raises(ValueError, match='user:password'):
    parse_auth('ann')
  for kw, message in ((dict(devices=99), 'this machine has'), (dict(max_batch=0), 'at least 1')):
    with pytest.raises(ValueError, match=message):  # checked before any model is loaded
      Engine(small_sd_folder[1], **kw)
