"""Shared fixtures: tiny random diffusers/transformers models saved with save_pretrained (built once per
session), and helpers to compare jaxdream with the PyTorch reference."""

import json
import os
import tempfile

# Cheap compile flags: most of the suite's time is XLA compiling tiny programs, and LLVM's optimisation
# passes cost more than they save there (test_unet.py: 74 s -> 54 s). They change no HLO pass. XLA's
# older elemental fusion emitters, in one codegen unit, compile the tiny model's train step in half the
# CPU time of the new fusion emitters (13 s vs 27 s).
CHEAP_XLA_FLAGS = (
  '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
  ' --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1'
)
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 ' + CHEAP_XLA_FLAGS)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache per session, inherited by the tests' subprocesses: most of the
# suite's time is XLA compiling the same tiny programs again (every new jax.jit object recompiles).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jaxdream-test-jit-cache-'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from jaxdream.models import presets  # noqa: E402

# One torch thread per worker: the suite's two xdist workers share 2 cores, and OpenMP threads that spin while
# another process holds the core turn a 0.07 s reference call into seconds (test_sampling.py: 118 s -> 55 s).
torch.set_num_threads(1)

# An SD1-like and an SD2-like tiny UNet: three resolution levels, both kinds of blocks.
UNET_SD1 = dict(
  sample_size=16,
  in_channels=4,
  out_channels=4,
  block_out_channels=(32, 64, 64),
  layers_per_block=1,
  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
  cross_attention_dim=32,
  attention_head_dim=4,
  norm_num_groups=8,
)
# UNET_SD1 cut to one level: transformer and ResNet blocks in the down, mid and up blocks, for tests that
# compile several gradients or steps of the UNet alone.
UNET_ONE_LEVEL = dict(
  UNET_SD1,
  sample_size=8,
  block_out_channels=(32,),
  down_block_types=('CrossAttnDownBlock2D',),
  up_block_types=('CrossAttnUpBlock2D',),
)
# UNET_SD1 cut to two levels: still every block kind (cross-attention and plain, down- and upsamplers).
UNET_TWO_LEVEL = dict(
  UNET_SD1,
  block_out_channels=(32, 64),
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
)
UNET_SD2 = dict(
  UNET_SD1,
  attention_head_dim=(2, 4, 8),
  use_linear_projection=True,
  upcast_attention=True,
  cross_attention_dim=48,
  layers_per_block=2,
  transformer_layers_per_block=(1, 2, 1),
  flip_sin_to_cos=True,
  freq_shift=1,
)
VAE = dict(
  block_out_channels=(32, 64, 64),
  down_block_types=('DownEncoderBlock2D',) * 3,
  up_block_types=('UpDecoderBlock2D',) * 3,
  latent_channels=4,
  norm_num_groups=8,
  layers_per_block=1,
  sample_size=32,
)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def perturb_(module, scale=0.05, seed=0):
  """Move every parameter off its initialisation (zero-initialised layers would hide bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=g) * scale)
  return module.eval()


def jit_call(model, method='__call__', **static):
  """A jitted version of `model.method` (eager NNX is op by op, slow for a whole UNet)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **static)

  return lambda *args: fn(state, *args)


@pytest.fixture(scope='session')
def torch_unet_sd1(tmp_path_factory):
  from diffusers import UNet2DConditionModel

  torch.manual_seed(0)
  model = perturb_(UNet2DConditionModel(**UNET_SD1))
  path = str(tmp_path_factory.mktemp('unet_sd1'))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope='session')
def torch_unet_sd2(tmp_path_factory):
  from diffusers import UNet2DConditionModel

  torch.manual_seed(1)
  model = perturb_(UNet2DConditionModel(**UNET_SD2), seed=1)
  path = str(tmp_path_factory.mktemp('unet_sd2'))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope='session')
def torch_vae(tmp_path_factory):
  from diffusers import AutoencoderKL

  torch.manual_seed(2)
  model = perturb_(AutoencoderKL(**VAE), seed=2)
  path = str(tmp_path_factory.mktemp('vae'))
  model.save_pretrained(path)
  return model, path


def make_text_encoder(path, hidden_act, seed=3, **overrides):
  from transformers import CLIPTextConfig, CLIPTextModel

  torch.manual_seed(seed)
  cfg = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act=hidden_act,
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=999,
  )
  cfg.update(overrides)
  model = perturb_(CLIPTextModel(CLIPTextConfig(**cfg)), seed=seed)
  model.save_pretrained(path)
  return model


def _sd_pipeline_folder(root, unet_config, text_layers):
  """A tiny random diffusers StableDiffusionPipeline saved in root/'model', with the real CLIP tokenizer."""
  from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
  from transformers import CLIPTextConfig, CLIPTextModel

  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  tok_dir = str(root / 'tok')
  write_clip_tokenizer(tok_dir)
  torch.manual_seed(4)
  unet = perturb_(UNet2DConditionModel(**unet_config), seed=4)
  vae = perturb_(AutoencoderKL(**VAE), seed=5)
  te = perturb_(
    CLIPTextModel(
      CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
      )
    ),
    seed=6,
  )
  sched = PNDMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule='scaled_linear',
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
  )
  pipe = StableDiffusionPipeline(
    unet=unet,
    vae=vae,
    text_encoder=te,
    tokenizer=load_tokenizer(tok_dir),
    scheduler=sched,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  path = str(root / 'model')
  pipe.save_pretrained(path)
  # SD 1.5's scheduler file also says clip_sample false; without it DDIM would default to clipping and
  # diffusers' pipelines would silently patch that (a legacy-config fix-up) while a bare scheduler does not.
  cfg_path = os.path.join(path, 'scheduler', 'scheduler_config.json')
  cfg = json.load(open(cfg_path))
  cfg['clip_sample'] = False
  json.dump(cfg, open(cfg_path, 'w'))
  return pipe, path


@pytest.fixture(scope='session')
def tiny_sd_folder(tmp_path_factory):
  """A tiny random diffusers StableDiffusionPipeline folder (the three-level UNET_SD1, a two-layer text
  encoder) with the real CLIP tokenizer."""
  return _sd_pipeline_folder(tmp_path_factory.mktemp('tiny_sd'), UNET_SD1, text_layers=2)


@pytest.fixture(scope='session')
def small_sd_folder(tmp_path_factory):
  """tiny_sd_folder with a two-level UNet (UNET_TWO_LEVEL) and a one-layer text encoder: every kind of
  block and layer, at half the compile time, for the tests that compile whole training steps and samplers
  (most of the suite's time)."""
  return _sd_pipeline_folder(tmp_path_factory.mktemp('small_sd'), UNET_TWO_LEVEL, text_layers=1)


@pytest.fixture(scope='session')
def scoring_models(tmp_path_factory):
  """Tiny random DreamBench scoring models saved with save_pretrained: a CLIPModel (30 px images, patch 4: a 7x7
  grid with a remainder), a DINO-like ViTModel (36 px, patch 8) and a second ViT (quick_gelu, no qkv bias, a
  pooler). {'clip': (model, folder, processor, tokenizer), 'dino': (model, folder), 'vit': (model, folder)}."""
  from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTModel

  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  root = tmp_path_factory.mktemp('scorers')
  torch.manual_seed(0)
  clip_dir = str(root / 'clip')
  text = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act='quick_gelu',
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
  )
  vision = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=4,
    hidden_act='gelu',
  )
  clip = perturb_(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)), seed=1)
  clip.save_pretrained(clip_dir)
  write_clip_tokenizer(clip_dir)
  CLIPImageProcessor(size={'shortest_edge': 30}, crop_size={'height': 30, 'width': 30}).save_pretrained(clip_dir)

  dino_dir = str(root / 'dino')
  dino_cfg = ViTConfig(
    hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, image_size=36, patch_size=8
  )
  dino = perturb_(ViTModel(dino_cfg, add_pooling_layer=False), seed=2)
  dino.save_pretrained(dino_dir)

  vit_dir = str(root / 'vit_quick_gelu_pooler')
  vit_cfg = ViTConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    image_size=30,
    patch_size=4,
    hidden_act='quick_gelu',
    qkv_bias=False,
  )
  vit = perturb_(ViTModel(vit_cfg, add_pooling_layer=True), seed=3)
  vit.save_pretrained(vit_dir)
  return dict(
    clip=(clip, clip_dir, CLIPImageProcessor.from_pretrained(clip_dir), load_tokenizer(clip_dir)),
    dino=(dino, dino_dir),
    vit=(vit, vit_dir),
  )


def torchvision_dino(image, image_size):
  """DINO's eval transform as torchvision documents it, in torch: Resize(int) scales the shorter side to it and
  the longer to int(size * long / short) (PIL, bicubic); CenterCrop's offsets are int(round((h - crop) / 2));
  ToTensor divides by 255; Normalize subtracts the ImageNet mean and divides by the std."""
  from PIL import Image

  size = round(image_size * 256 / 224)
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
  image = image.convert('RGB').resize(new, Image.BICUBIC)
  top, left = int(round((new[1] - image_size) / 2.0)), int(round((new[0] - image_size) / 2.0))
  image = image.crop((left, top, left + image_size, top + image_size))
  t = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
  mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
  return (t - mean) / std


_TINY_BASE = {}


def tiny_base(dest) -> str:
  """`create_tiny_pipeline(dest)`: the built-in tiny base model, made once per test process and copied (a
  test may write into its copy)."""
  import atexit
  import shutil

  from jaxdream.diffusion.tiny_model import create_tiny_pipeline

  if 'path' not in _TINY_BASE:
    root = tempfile.mkdtemp(prefix='jaxdream-tiny-base-')
    atexit.register(shutil.rmtree, root, True)
    _TINY_BASE['path'] = create_tiny_pipeline(os.path.join(root, 'model'))
  shutil.copytree(_TINY_BASE['path'], str(dest), dirs_exist_ok=True)
  return str(dest)


# Seconds a test takes on the 2-core CI machine, for the few that take minutes (CI's --durations list);
# any other slow test counts SLOW_SECONDS, a fast one FAST_SECONDS. Only the order depends on them.
KNOWN_SECONDS = {
  'test_two_hosts_stopped_by_sigterm_on_one_resume_to_the_one_device_model': 220,
  'test_ctrl_c_saves_sigkill_at_any_moment_and_a_damaged_checkpoint_resume_to_identical_weights': 175,
  'test_sixty_four_synthetic_subjects_train_on_the_eight_device_mesh_as_on_one_device': 85,
  # test_quickstart_quality.py's module: the whole quickstart (400 steps) in a subprocess, then the base sampled
  'test_readme_command_trains_offline_without_third_party_chatter': 120,
  'test_fine_tuned_sks_dog_is_the_bundled_dog_and_the_base_alone_never_draws_it': 20,
  'test_a_per_subject_run_killed_resumes_to_identical_adapters': 60,
}
SLOW_SECONDS, FAST_SECONDS = 30, 2


# Tiny SDXL base (tests/test_sdxl.py, test_sdxl_training.py).
TIME_EMBED = 8  # addition_time_embed_dim
# Two levels, the first without attention as SDXL's; the transformer depth per level a list ([1, 2]: the
# up blocks take it reversed), linear projections, per-level heads, context = both encoders' 32 features.
UNET_SDXL = dict(
  sample_size=16,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
  up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
  transformer_layers_per_block=[1, 2],
  attention_head_dim=(2, 4),
  cross_attention_dim=64,
  use_linear_projection=True,
  norm_num_groups=8,
  addition_embed_type='text_time',
  addition_time_embed_dim=TIME_EMBED,
  projection_class_embeddings_input_dim=32 + 6 * TIME_EMBED,  # pooled + 6 time ids
)
VAE_SDXL = dict(
  block_out_channels=(32, 64),
  down_block_types=('DownEncoderBlock2D',) * 2,
  up_block_types=('UpDecoderBlock2D',) * 2,
  latent_channels=4,
  norm_num_groups=8,
  layers_per_block=1,
  sample_size=32,
  scaling_factor=0.13025,
  force_upcast=True,
)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (less its class name)
EULER_SDXL = {k: v for k, v in presets.SDXL_SCHEDULER.items() if k != '_class_name'}


def _clip_config(num_layers, **overrides):
  from transformers import CLIPTextConfig

  cfg = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=num_layers,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
  )
  return CLIPTextConfig(**dict(cfg, **overrides))


@pytest.fixture(scope='session')
def sdxl_folder(tmp_path_factory):
  """(diffusers StableDiffusionXLPipeline, its saved folder, jaxdream's pipeline loaded from it). The second
  encoder is SDXL's as its config says: gelu, a text projection, eos_token_id 2 (pooled at the largest id),
  and its tokenizer pads with '!', not with the end token."""
  from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTextModelWithProjection

  from jaxdream import load_pipeline
  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  root = tmp_path_factory.mktemp('tiny_sdxl')
  write_clip_tokenizer(str(root / 'tok'))
  write_clip_tokenizer(str(root / 'tok_2'), pad_token='!')
  torch.manual_seed(0)
  ref = StableDiffusionXLPipeline(
    unet=perturb_(UNet2DConditionModel(**UNET_SDXL), seed=1),
    vae=perturb_(AutoencoderKL(**VAE_SDXL), seed=2),
    text_encoder=perturb_(CLIPTextModel(_clip_config(2)), seed=3),
    text_encoder_2=perturb_(
      CLIPTextModelWithProjection(
        _clip_config(2, hidden_act='gelu', projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
      ),
      seed=4,
    ),
    tokenizer=load_tokenizer(str(root / 'tok')),
    tokenizer_2=load_tokenizer(str(root / 'tok_2')),
    scheduler=EulerDiscreteScheduler(**EULER_SDXL),
    add_watermarker=False,
  )
  path = str(root / 'model')
  ref.save_pretrained(path)
  return ref, path, load_pipeline(path)


def _module_fixture_group(item) -> str | None:
  """The test's module, if the test uses a module-scoped fixture defined there (a whole training run, a
  compiled step): such tests are kept together on one xdist worker, so the fixture is built once."""
  info, module = getattr(item, '_fixtureinfo', None), getattr(item.module, '__name__', None)
  if info is None or module is None:  # pytest's private fixture info: only an ordering hint if it moves
    return None
  for defs in info.name2fixturedefs.values():
    if defs and defs[-1].scope == 'module' and defs[-1].baseid.split('::')[0].endswith(module + '.py'):
      return module
  return None


def pytest_collection_modifyitems(config, items):
  """An order for xdist's worksteal, which hands worker k the k-th equal share of this list and lets an
  idle worker take the tail of a busy one's: the heavy work units (slow tests, and the tests sharing a
  module fixture) are spread over the shares longest first, each share's tail filled with quick tests.
  Both workers start the minutes-long runs at once, and a module fixture is built on one worker only."""
  workers = int(getattr(config, 'workerinput', {}).get('workercount', 1))
  units, weight = {}, {}
  for item in items:
    unit = _module_fixture_group(item) or item.nodeid
    units.setdefault(unit, []).append(item)
    seconds = KNOWN_SECONDS.get(item.originalname) or (
      SLOW_SECONDS if item.get_closest_marker('slow') else FAST_SECONDS
    )
    weight[unit] = weight.get(unit, 0) + seconds
  heavy = sorted((u for u in units if weight[u] > FAST_SECONDS), key=lambda u: -weight[u])  # stable
  light = [item for u in units if weight[u] <= FAST_SECONDS for item in units[u]]
  shares, load = [[] for _ in range(workers)], [0] * workers
  for unit in heavy:  # longest first, each to the least loaded share
    k = min(range(workers), key=lambda k: load[k])
    shares[k] += units[unit]
    load[k] += weight[unit]
  ordered = []
  for k, share in enumerate(shares):
    size = len(items) // workers if k < workers - 1 else len(items)  # worksteal's split: floor, rest last
    ordered += share
    while light and len(ordered) < size * (k + 1) and k < workers - 1:
      ordered.append(light.pop(0))
  items[:] = ordered + light


# ------------------------------------------------------------------------------------------------ Qwen-VL folders

# Qwen2.5-VL's published chat template (Qwen2-VL's): a default system prompt before the first user turn.
QWEN2_5_VL_CHAT_TEMPLATE = (
  '{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}'
  "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
  "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
  "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
  "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
  "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
  "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
  "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
  "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
  '<|im_start|>assistant\n{% endif %}'
)
# Qwen3-VL Instruct's (Qwen3's with vision content): no default system prompt, tools and tool responses.
QWEN3_VL_CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                <|vision_start|><|image_pad|><|vision_end|>
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                <|vision_start|><|video_pad|><|vision_end|>
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content, false) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, True) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# The added tokens of Qwen2.5-VL's vocabulary in its order (ids 151643...); Qwen3-VL's adds the last four.
QWEN_SPECIAL_TOKENS = (
  '<|endoftext|>',
  '<|im_start|>',
  '<|im_end|>',
  '<|object_ref_start|>',
  '<|object_ref_end|>',
  '<|box_start|>',
  '<|box_end|>',
  '<|quad_start|>',
  '<|quad_end|>',
  '<|vision_start|>',
  '<|vision_end|>',
  '<|vision_pad|>',
  '<|image_pad|>',
  '<|video_pad|>',
)
QWEN_PLAIN_ADDED_TOKENS = ('<tool_call>', '</tool_call>')
QWEN_FIM_TOKENS = ('<|fim_prefix|>', '<|fim_middle|>', '<|fim_suffix|>', '<|fim_pad|>', '<|repo_name|>', '<|file_sep|>')
QWEN3_EXTRA_TOKENS = ('<tool_response>', '</tool_response>', '<think>', '</think>')
_QWEN_CORPUS = (
  'Describe this image. What is in the picture? A photo of a dog on the grass, a cat by the window. '
  'Locate the dog and output its bbox coordinates in JSON format. The sks dog is red and blue. '
  '{"bbox_2d": [12, 34, 56, 78], "label": "dog"} Is there a sks dog in the image? Answer yes or no.'
)
# A tiny Qwen2.5-VL / Qwen3-VL: 32-wide, two decoder layers, 2 kv heads; vision towers of three blocks.
QWEN2_5_VL_TINY = dict(
  text_config=dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_parameters=dict(rope_type='default', rope_theta=1000000.0, mrope_section=[2, 1, 1]),
  ),
  vision_config=dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=32,
    window_size=56,  # 2x2 merged tokens (4x4 patches of 14) per window
    fullatt_block_indexes=[1],
  ),
)
QWEN3_VL_TINY = dict(
  text_config=dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
    rope_parameters=dict(rope_type='default', rope_theta=5000000.0, mrope_section=[2, 1, 1], mrope_interleaved=True),
  ),
  vision_config=dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=32,
    num_position_embeddings=16,  # a 4x4 learned grid: every other grid size interpolates
    deepstack_visual_indexes=[0, 1],
  ),
)
# Small pixel budgets, so that a test image of a few hundred pixels a side is already too large.
QWEN_IMAGE_PROCESSORS = {
  'qwen2_5_vl': dict(
    image_processor_type='Qwen2VLImageProcessor',
    processor_class='Qwen2_5_VLProcessor',
    do_convert_rgb=True,
    do_normalize=True,
    do_rescale=True,
    do_resize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    min_pixels=28 * 28 * 4,
    max_pixels=28 * 28 * 16,
    merge_size=2,
    patch_size=14,
    resample=3,
    rescale_factor=1 / 255,
    temporal_patch_size=2,
  ),
  'qwen3_vl': dict(
    image_processor_type='Qwen2VLImageProcessorFast',
    processor_class='Qwen3VLProcessor',
    do_convert_rgb=True,
    do_normalize=True,
    do_rescale=True,
    do_resize=True,
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
    size={'shortest_edge': 32 * 32 * 4, 'longest_edge': 32 * 32 * 12},
    merge_size=2,
    patch_size=16,
    resample=3,
    rescale_factor=1 / 255,
    temporal_patch_size=2,
  ),
}


def qwen_tokenizer(model_type: str):
  """A byte-level BPE tokenizer laid out as Qwen's: a small trained vocabulary, then Qwen's added tokens in
  their order (so the special ids are consecutive, as 151643... are in the real vocabulary)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  from transformers import AddedToken, Qwen2Tokenizer

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
  )
  bpe.train_from_iterator([_QWEN_CORPUS], trainer)
  spec = json.loads(bpe.to_str())['model']
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in spec['merges']]
  tok = Qwen2Tokenizer(vocab=spec['vocab'], merges=merges, eos_token='<|im_end|>', pad_token='<|endoftext|>')
  added = (
    [AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS]
    + [AddedToken(t, special=False) for t in QWEN_PLAIN_ADDED_TOKENS]
    + [AddedToken(t, special=True) for t in QWEN_FIM_TOKENS]
    + ([AddedToken(t, special=False) for t in QWEN3_EXTRA_TOKENS] if model_type == 'qwen3_vl' else [])
  )
  tok.add_tokens(added)
  return tok


def write_qwen_vl_folder(path, model_type: str = 'qwen2_5_vl', config: dict | None = None, seed: int = 0):
  """A tiny random Qwen2.5-VL (model_type 'qwen2_5_vl') or Qwen3-VL ('qwen3_vl') folder laid out as the
  published ones: config.json + model.safetensors (save_pretrained), tokenizer.json + tokenizer_config.json,
  chat_template.json, preprocessor_config.json, generation_config.json. `config` entries override the tiny
  config's (dicts merged one level down). Returns the torch model (eval mode, weights moved off init)."""
  from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
  )

  path = str(path)
  os.makedirs(path, exist_ok=True)
  kinds = {
    'qwen2_5_vl': (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, QWEN2_5_VL_TINY, QWEN2_5_VL_CHAT_TEMPLATE),
    'qwen3_vl': (Qwen3VLConfig, Qwen3VLForConditionalGeneration, QWEN3_VL_TINY, QWEN3_VL_CHAT_TEMPLATE),
  }
  config_cls, model_cls, tiny, template = kinds[model_type]
  tok = qwen_tokenizer(model_type)
  ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
  cfg = {k: dict(v) for k, v in tiny.items()}
  for key, value in (config or {}).items():
    cfg[key] = dict(cfg.get(key, {}), **value) if isinstance(value, dict) else value
  cfg['text_config'] = dict(
    dict(vocab_size=len(tok), bos_token_id=ids['<|endoftext|>'], eos_token_id=ids['<|im_end|>']),
    **cfg['text_config'],
  )
  cfg.setdefault('image_token_id', ids['<|image_pad|>'])
  cfg.setdefault('video_token_id', ids['<|video_pad|>'])
  cfg.setdefault('vision_start_token_id', ids['<|vision_start|>'])
  cfg.setdefault('vision_end_token_id', ids['<|vision_end|>'])
  torch.manual_seed(seed)
  model = perturb_(model_cls(config_cls(**cfg)), seed=seed)
  # As the published generation configs: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>.
  model.generation_config = GenerationConfig(
    bos_token_id=ids['<|endoftext|>'],
    eos_token_id=[ids['<|im_end|>'], ids['<|endoftext|>']],
    pad_token_id=ids['<|endoftext|>'],
  )
  model.save_pretrained(path)
  tok.save_pretrained(path)
  with open(os.path.join(path, 'chat_template.json'), 'w') as f:
    json.dump({'chat_template': template}, f, indent=2)
  with open(os.path.join(path, 'preprocessor_config.json'), 'w') as f:
    json.dump(QWEN_IMAGE_PROCESSORS[model_type], f, indent=2)
  return model


def reference_processor(path, kind):
  """transformers' processor as AutoProcessor would build it, without the video processor it cannot load here
  (torchvision is not installed): the image processor AutoImageProcessor picks, the chat template the
  processor finds."""
  from unittest import mock

  from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen3VLProcessor

  cls = {'qwen2_5_vl': Qwen2_5_VLProcessor, 'qwen3_vl': Qwen3VLProcessor}[kind]
  template = cls.get_processor_dict(path)[0]['chat_template']
  with mock.patch.object(cls, 'check_argument_for_proper_class', lambda *a: None):
    return cls(
      image_processor=AutoImageProcessor.from_pretrained(path),
      tokenizer=AutoTokenizer.from_pretrained(path),
      video_processor=None,
      chat_template=template,
    )


@pytest.fixture(scope='session')
def qwen2_5_vl_folder(tmp_path_factory):
  """(torch Qwen2_5_VLForConditionalGeneration, its folder): see write_qwen_vl_folder."""
  path = str(tmp_path_factory.mktemp('qwen2_5_vl'))
  return write_qwen_vl_folder(path, 'qwen2_5_vl'), path


@pytest.fixture(scope='session')
def qwen3_vl_folder(tmp_path_factory):
  """(torch Qwen3VLForConditionalGeneration, its folder): see write_qwen_vl_folder. Its LM head is tied to the
  token embeddings (as the published 2B/4B models'; Qwen2.5-VL's fixture keeps a separate head)."""
  path = str(tmp_path_factory.mktemp('qwen3_vl'))
  return write_qwen_vl_folder(path, 'qwen3_vl', config=dict(tie_word_embeddings=True), seed=1), path
