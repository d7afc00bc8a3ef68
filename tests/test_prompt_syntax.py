"""A1111 prompts: stable-diffusion-webui's emphasis parser, its 75-token chunks, and the conditioning and images
they give, against torch computations of A1111's procedure on the same tiny diffusers models."""

import jax
import numpy as np
import pytest
import torch

from jaxdream.diffusion.conditioning import Emphasis, encode_chunks
from jaxdream.diffusion.sampling import image_noise, txt2img
from jaxdream.io import prompt_syntax
from jaxdream.io.prompt_syntax import chunk_prompt, parse_prompt_attention, prompt_schedule

pytestmark = pytest.mark.reference

LONG = 'a photo of sks dog, ' + ', '.join(f'(detail {i}:1.{i % 5})' for i in range(40)) + ', [soft light], BREAK sunset'


@pytest.mark.parametrize(
  'text, expected',
  [  # stable-diffusion-webui's own examples (modules/prompt_parser.py, parse_prompt_attention's docstring)
    ('normal text', [('normal text', 1.0)]),
    ('an (important) word', [('an ', 1.0), ('important', 1.1), (' word', 1.0)]),
    ('(unbalanced', [('unbalanced', 1.1)]),
    ('\\(literal\\]', [('(literal]', 1.0)]),
    ('(unnecessary)(parens)', [('unnecessaryparens', 1.1)]),
    (
      'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
      [
        ('a ', 1.0),
        ('house', 1.5730000000000004),
        (' ', 1.1),
        ('on', 1.0),
        (' a ', 1.1),
        ('hill', 0.55),
        (', sun, ', 1.1),
        ('sky', 1.4641000000000006),
        ('.', 1.1),
      ],
    ),
    ('a BREAK b', [('a', 1.0), ('BREAK', -1), ('b', 1.0)]),
    ('', [('', 1.0)]),
  ],
)
def test_emphasis_parser_gives_a1111s_documented_weights(text, expected):
  got = parse_prompt_attention(text)
  assert [t for t, _ in got] == [t for t, _ in expected]
  assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


@pytest.mark.parametrize(
  'text, expected',
  [  # stable-diffusion-webui's own examples (get_learned_conditioning_prompt_schedules' docstring), 10 steps
    ('test', [(10, 'test')]),
    ('a [b:3]', [(3, 'a '), (10, 'a b')]),
    ('a [b: 3]', [(3, 'a '), (10, 'a b')]),
    ('a [[[b]]:2]', [(2, 'a '), (10, 'a [[b]]')]),
    ('[(a:2):3]', [(3, ''), (10, '(a:2)')]),
    ('a [b : c : 1] d', [(1, 'a b  d'), (10, 'a  c  d')]),
    ('a[b:[c:d:2]:1]e', [(1, 'abe'), (2, 'ace'), (10, 'ade')]),
    ('a [unbalanced', [(10, 'a [unbalanced')]),
    ('a [b:.5] c', [(5, 'a  c'), (10, 'a b c')]),
    ('((a][:b:c [d:3]', [(3, '((a][:b:c '), (10, '((a][:b:c d')]),
    ('[a|(b:1.1)]', [(i, 'a' if i % 2 else '(b:1.1)') for i in range(1, 11)]),
    ('[fe|]male', [(i, 'female' if i % 2 else 'male') for i in range(1, 11)]),
    ('[fe|||]male', [(i, 'female' if i % 4 == 1 else 'male') for i in range(1, 11)]),
  ],
)
def test_prompt_editing_gives_a1111s_documented_schedules(text, expected):
  assert prompt_schedule(text, 10) == expected


def test_emphasis_of_weight_one_is_exact_even_for_a_zero_mean_encoding():
  from jaxdream.diffusion.conditioning import emphasize

  rng = np.random.default_rng(0)
  z = rng.standard_normal((3, 77, 16)).astype(np.float32)
  z -= z.mean(axis=(1, 2), keepdims=True)  # a final layer norm's output can average 1e-8: 0/0-like ratios
  ones = np.ones((3, 77), np.float32)
  np.testing.assert_array_equal(emphasize(z, ones), z)
  np.testing.assert_array_equal(emphasize(z, ones, np.array([0, 0, 1]), np.array([True, False, True])), z)
  w = ones.copy()
  w[0, 5] = 1.5
  out = np.asarray(emphasize(z + 1, w))  # a nonzero mean: kept, as the webui's rescaling keeps it
  assert np.isfinite(out).all() and out[0].mean() == pytest.approx((z[0] + 1).mean(), rel=1e-5)


def test_prompt_edge_cases_neither_crash_nor_overflow():
  assert prompt_schedule('a [cat:dog:1e999]', 10) == [(10, 'a cat')]  # an infinite step: past the last one
  assert prompt_schedule('a [cat:dog:-1e999]', 10) == [(10, 'a dog')]
  deep = '(' * 100 + 'x' + ')' * 100  # paired nesting the webui's grammar reads
  assert prompt_schedule(f'[cat:dog:0.5] {deep}', 10) == [(5, f'cat {deep}'), (10, f'dog {deep}')]
  with pytest.raises(ValueError, match='overflow'):  # 1.1 ** 1000 is past float32: NaN conditioning
    chunk_prompt(_clip_tokenizer(), '(' * 1000 + 'a' + ')' * 1000)


def _clip_tokenizer():
  import tempfile

  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  folder = tempfile.mkdtemp()
  write_clip_tokenizer(folder)
  return load_tokenizer(folder)


def test_hostile_prompts_parse_in_linear_time_and_never_recurse_deeply():
  import time

  prompts = ['(word:1.2), ' * 1300 + '[a|b]', '[' * 16000, '[a:' * 5000 + 'x' + ':1]' * 5000, 'x [a:b:0.5]' * 1400]
  t0 = time.perf_counter()
  schedules = [prompt_schedule(p, 150) for p in prompts]
  assert time.perf_counter() - t0 < 10  # stable-diffusion-webui's Earley grammar takes minutes on the first
  assert len(schedules[0]) == 150 and schedules[1] == [(150, prompts[1])] and schedules[2] == [(150, prompts[2])]
  assert [end for end, _ in schedules[3]] == [75, 150]


@pytest.fixture(scope='module')
def tokenizer(small_sd_folder):
  from jaxdream import load_pipeline

  return load_pipeline(small_sd_folder[1]).tokenizer


def test_chunks_hold_the_whole_prompt_with_its_weights(tokenizer):
  ids, weights = chunk_prompt(tokenizer, LONG)
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  assert ids.shape[1] == weights.shape[1] == tokenizer.model_max_length and len(ids) >= 3
  assert (ids[:, 0] == bos).all() and (ids[:, -1] == eos).all()
  # Every token of the prompt, in order, once: the chunks' contents less BOS, EOS and padding.
  body = [int(t) for row in ids for t in row[1:-1] if t != eos]
  plain = LONG.replace('(', ' ').replace(')', ' ').replace('[', ' ').replace(']', ' ').replace('BREAK', ' ')
  plain = ' '.join(w.split(':')[0] for w in plain.split(' '))
  assert body == tokenizer(plain, add_special_tokens=False)['input_ids']
  # A weighted word's tokens carry its weight; padding, BOS and EOS carry 1.
  detail = tokenizer('detail', add_special_tokens=False)['input_ids'][0]
  got = sorted({round(float(w), 6) for row, wrow in zip(ids, weights) for t, w in zip(row, wrow) if t == detail})
  assert got == [1.0, 1.1, 1.2, 1.3, 1.4]
  assert (weights[ids == eos] == 1).all() and (weights[:, 0] == 1).all()
  soft = tokenizer('soft', add_special_tokens=False)['input_ids'][0]
  assert weights[ids == soft] == pytest.approx([1 / 1.1])
  # BREAK ends a chunk: 'sunset' starts the last one.
  sunset = tokenizer('sunset', add_special_tokens=False)['input_ids'][0]
  assert ids[-1, 1] == sunset and sunset not in ids[:-1] and ids[-2, -2] == eos  # the chunk before: padded


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next(tokenizer):
  words = ' '.join(['cat'] * 70) + ', ' + ' '.join(['dog'] * 10)
  ids, _ = chunk_prompt(tokenizer, words)
  cat, dog, comma = (tokenizer(w, add_special_tokens=False)['input_ids'][0] for w in ('cat', 'dog', ','))
  first = list(ids[0, 1:-1])
  assert first[:71] == [cat] * 70 + [comma] and dog not in first  # the comma is 5 tokens from the end: all moved
  assert list(ids[1, 1:11]) == [dog] * 10
  far = ' '.join(['cat'] * 40) + ', ' + ' '.join(['dog'] * 50)  # the comma 34 tokens from the end: no move
  ids, _ = chunk_prompt(tokenizer, far)
  assert list(ids[0, 1:-1]).count(dog) == 75 - 41


def test_sd2_tokenizers_pad_after_the_first_eos(tmp_path):
  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  write_clip_tokenizer(str(tmp_path), pad_token='!')
  tok = load_tokenizer(str(tmp_path))
  ids, _ = chunk_prompt(tok, 'a photo')
  reference = tok(['a photo'], padding='max_length', max_length=77, return_tensors='np').input_ids[0]
  np.testing.assert_array_equal(ids[0], reference)  # as diffusers pads a short prompt


def _a1111_reference(encoder, ids, weights, counts):
  """stable-diffusion-webui's conditioning, in torch: each chunk through the encoder, its tokens' vectors times
  their weights, rescaled to the chunk's mean before; chunks concatenated; a prompt of fewer chunks continued
  with its last vector (prompt_parser.stack_conds)."""
  rows = []
  for b in range(ids.shape[0]):
    zs = []
    for k in range(int(counts[b])):
      with torch.no_grad():
        z = encoder(torch.from_numpy(ids[b, k : k + 1].astype(np.int64)))
      mean = z.mean()
      z = z * torch.from_numpy(weights[b, k : k + 1])[..., None]
      zs.append(z * (mean / z.mean()))
    z = torch.cat(zs, axis=1)[0]
    rows.append(torch.cat([z, z[-1:].repeat(ids.shape[1] * ids.shape[2] - len(z), 1)]))
  return torch.stack(rows).numpy()


def test_sd_conditioning_is_a1111s(small_sd_folder):
  from conftest import rel_err

  from jaxdream import load_pipeline
  from jaxdream.diffusion.conditioning import encode_prompt

  ref, path = small_sd_folder
  pipe = load_pipeline(path)
  prompts = [LONG, 'a (red:1.4) fox']
  ids, weights, counts = pipe.tokenize_chunks(prompts, 'a1111')
  assert list(counts) == [len(chunk_prompt(pipe.tokenizer, p)[0]) for p in prompts] and counts[1] == 1
  te = pipe.text_encoder
  ours = jax.jit(lambda ids, w, c: encode_chunks(encode_prompt, {'text_encoder': te}, ids, c, Emphasis(w))[0])(
    ids, weights, counts
  )
  expected = _a1111_reference(lambda t: ref.text_encoder(t)[0], ids['text_encoder'], weights['text_encoder'], counts)
  assert ours.shape == expected.shape and rel_err(ours, expected) <= 1e-5
  # Without brackets and within 75 tokens the token ids are the plain prompt's.
  one, _, _ = pipe.tokenize_chunks(['a red fox'], 'a1111')
  np.testing.assert_array_equal(one['text_encoder'][:, 0], pipe.tokenize(['a red fox'])['text_encoder'])


def _schedule_reference(ref, pipe, texts):
  """The webui's conditionings of one prompt's schedule texts, in torch: all texts encoded as one batch per chunk
  (a text of fewer chunks with empty ones), each chunk's batch rescaled to its mean before weighting."""
  ids, w, _ = pipe.tokenize_chunks(texts, 'a1111')
  ids, w = ids['text_encoder'], w['text_encoder']
  chunks = []
  for k in range(ids.shape[1]):
    with torch.no_grad():
      z = ref.text_encoder(torch.from_numpy(ids[:, k].astype(np.int64)))[0]
    zw = z * torch.from_numpy(w[:, k])[..., None]
    chunks.append(zw * (z.mean() / zw.mean()))
  return [c.numpy()[None] for c in torch.cat(chunks, axis=1)]


def _encoded(ref, pipe, text):
  """A1111's conditioning of one prompt, computed in torch by the diffusers pipeline `ref`."""
  ids, w, c = pipe.tokenize_chunks([text], 'a1111')
  return _a1111_reference(lambda t: ref.text_encoder(t)[0], ids['text_encoder'], w['text_encoder'], c)


@pytest.fixture(scope='module')
def ddim_pipes(small_sd_folder):
  import dataclasses

  import diffusers

  from jaxdream import load_pipeline

  ref = small_sd_folder[0]
  pipe = load_pipeline(small_sd_folder[1])
  ref = type(ref)(**ref.components)
  ref.scheduler = diffusers.DDIMScheduler.from_config(dict(pipe.scheduler_config))
  return ref, dataclasses.replace(pipe)


def _ref_latents(ref, noise, cond, uncond, guidance, steps):
  """diffusers' DDIM loop with separate UNet calls for the two halves, as A1111 runs prompts and negative prompts
  of different lengths; `cond` may be a function of the step (A1111's prompt editing)."""
  sched = ref.scheduler
  sched.set_timesteps(steps)
  x = torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2) * sched.init_noise_sigma
  cond_at = cond if callable(cond) else (lambda i: cond)
  uncond = torch.from_numpy(uncond)
  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      eu = ref.unet(x, t, encoder_hidden_states=uncond).sample
      ec = ref.unet(x, t, encoder_hidden_states=torch.from_numpy(cond_at(i))).sample
      x = sched.step(eu + guidance * (ec - eu), t, x).prev_sample
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('negative', ['blurry, (ugly:1.3)', 'blurry, ' * 40])
def test_txt2img_with_a1111_prompts_follows_a1111s_guidance(ddim_pipes, negative):
  """A negative prompt of as many chunks as the prompt's (one UNet call) and of fewer (two): the same latents as a
  torch loop over A1111's conditioning."""
  from conftest import rel_err

  ref, pipe = ddim_pipes
  prompt = 'a photo of sks dog, ' + ', '.join(['(sunny:1.2) beach'] * 30)
  noise = image_noise([3], (16, 16, 4))
  run = lambda **syntax: txt2img(
    pipe, [prompt], negative_prompts=[negative], num_inference_steps=4, scheduler='ddim', latents=noise,
    output_type='latent', **syntax,
  )  # fmt: skip
  ours, plain = run(prompt_syntax='a1111'), run()
  conds = {name: _encoded(ref, pipe, text) for name, text in (('cond', prompt), ('uncond', negative))}
  assert conds['cond'].shape[1] == 2 * 77 and conds['uncond'].shape[1] == 77 * (1 if 'ugly' in negative else 2)
  expected = _ref_latents(ref, noise, conds['cond'], conds['uncond'], 7.5, 4)
  assert rel_err(ours, expected) <= 1e-4
  assert rel_err(plain, expected) > 1e-2  # the plain prompt (cut at 77 tokens, no weights) is another image


def test_prompt_editing_switches_the_conditioning_at_a1111s_step(ddim_pipes):
  from conftest import rel_err

  ref, pipe = ddim_pipes
  noise = image_noise([5], (16, 16, 4))
  prompt = 'a photo of a [dog:(red fox:1.3):0.5] in the snow'  # 4 steps: steps 0-2 'dog', step 3 the fox
  ours = txt2img(
    pipe,
    [prompt],
    negative_prompts=['[blurry|ugly]'],
    num_inference_steps=4,
    scheduler='ddim',
    latents=noise,
    output_type='latent',
    prompt_syntax='a1111',
  )

  # The webui encodes a prompt's schedule texts as one batch and rescales them with one mean (per chunk).
  dog, fox = _schedule_reference(ref, pipe, ['a photo of a dog in the snow', 'a photo of a (red fox:1.3) in the snow'])
  negatives = dict(zip((1, 0, 1, 0), _schedule_reference(ref, pipe, ['blurry', 'ugly', 'blurry', 'ugly'])))
  # alternation: step i (0-based) reads segment i, from 1
  sched = ref.scheduler
  sched.set_timesteps(4)
  x = torch.from_numpy(np.asarray(noise)).permute(0, 3, 1, 2) * sched.init_noise_sigma
  with torch.no_grad():
    for i, t in enumerate(sched.timesteps):
      eu = ref.unet(x, t, encoder_hidden_states=torch.from_numpy(negatives[max(i, 1) % 2])).sample
      ec = ref.unet(x, t, encoder_hidden_states=torch.from_numpy(dog if i <= 2 else fox)).sample
      x = sched.step(eu + 7.5 * (ec - eu), t, x).prev_sample
  expected = x.permute(0, 2, 3, 1).numpy()
  assert rel_err(ours, expected) <= 1e-4
  fixed = _ref_latents(ref, noise, dog, negatives[1], 7.5, 4)
  assert rel_err(ours, fixed) > 1e-3  # the switch changes the image


def test_a_prompts_shorter_editing_texts_keep_a1111s_empty_chunks(ddim_pipes):
  from jaxdream.diffusion.sampling import _tokenized

  _, pipe = ddim_pipes
  prompt = f'[a dog:{LONG}:0.5]'  # one chunk, then several: A1111 encodes both with as many (empty ones added)
  cond, uncond, chunks = _tokenized(pipe, [prompt, 'a cat'], ['', ''], 'a1111', 10)
  ids, _, counts, ends = cond
  k = ids['text_encoder'].shape[2]
  assert chunks == (1, k) and k == len(chunk_prompt(pipe.tokenizer, LONG)[0])
  assert ends.tolist() == [[5, 10], [10, 10]] and counts.tolist() == [[k, k], [1, 1]]
  empty = prompt_syntax.empty_chunk(pipe.tokenizer)[0][0]
  np.testing.assert_array_equal(ids['text_encoder'][0, 0, 1], empty)
  assert uncond[0]['text_encoder'].shape == ids['text_encoder'].shape  # encoded together: as many chunks


def test_sdxl_conditioning_is_a1111s_with_the_first_chunks_pooled_embedding(sdxl_folder):
  from conftest import rel_err
  from flax import nnx

  from jaxdream.diffusion import sdxl

  ref, _, pipe = sdxl_folder
  prompts = [LONG, 'a (red:1.4) fox']
  ids, weights, counts = pipe.tokenize_chunks(prompts, 'a1111')
  split = {n: nnx.split(m) for n, m in pipe.components.items() if n.startswith('text_encoder')}
  graphdefs, params = {n: s[0] for n, s in split.items()}, {n: s[1] for n, s in split.items()}

  def encode(params, ids, w, c):
    models = {n: nnx.merge(graphdefs[n], params[n]) for n in graphdefs}
    return encode_chunks(sdxl.encode_prompt, models, ids, c, Emphasis(w))

  context, extra = jax.jit(encode)(params, ids, weights, counts)
  per_encoder = [
    _a1111_reference(
      lambda t, enc=enc: enc(t, output_hidden_states=True).hidden_states[-2], ids[name], weights[name], counts
    )
    for name, enc in (('text_encoder', ref.text_encoder), ('text_encoder_2', ref.text_encoder_2))
  ]
  assert rel_err(context, np.concatenate(per_encoder, axis=-1)) <= 1e-5
  with torch.no_grad():
    pooled = ref.text_encoder_2(torch.from_numpy(ids['text_encoder_2'][:, 0].astype(np.int64))).text_embeds
  assert rel_err(extra['text_embeds'], pooled.numpy()) <= 1e-5


def test_prompt_syntax_is_checked():
  with pytest.raises(ValueError, match='prompt syntax'):
    prompt_syntax.check_syntax('compel')
