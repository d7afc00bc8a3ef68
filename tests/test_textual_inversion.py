"""Textual inversion embeddings load as diffusers' load_textual_inversion loads them: the same token ids and prompt
embeddings (SD and SDXL, multi-vector tokens, A1111 syntax), from diffusers', A1111's and SDXL's file formats."""

import numpy as np
import pytest
import torch

from jaxdream import load_pipeline
from jaxdream.diffusion.sampling import txt2img
from jaxdream.diffusion.textual_inversion import load_textual_inversion, read_embedding
from jaxdream.io.weights import WeightsError, write_safetensors

pytestmark = pytest.mark.reference

PROMPTS = ['a photo of <cat-toy> on a table', 'a <cat-toy>, <cat-toy> and a dog', 'no token here']


def _embeds(pipe, prompts, syntax='plain'):
  from jaxdream.diffusion.conditioning import Emphasis

  ids, weights, _ = pipe.tokenize_chunks(prompts, syntax)
  ids = {k: v[:, 0] for k, v in ids.items()}
  emphasis = None if weights is None else Emphasis({k: v[:, 0] for k, v in weights.items()})
  context, extra = pipe.encode_prompt(pipe.components, ids, emphasis=emphasis)
  return np.asarray(context), {k: np.asarray(v) for k, v in extra.items()}


def test_sd_embeddings_equal_diffusers_for_multi_vector_tokens_and_the_pipeline_is_left_as_it_was(
  small_sd_folder, tmp_path
):
  import diffusers
  from conftest import rel_err

  folder = small_sd_folder[1]
  pipe = load_pipeline(folder)
  dim = pipe.text_encoder.text_model.embeddings.token_embedding.embedding.shape[1]
  vectors = np.random.default_rng(0).standard_normal((3, dim)).astype(np.float32)
  path = str(tmp_path / 'learned_embeds.safetensors')
  write_safetensors(path, {'<cat-toy>': vectors})  # diffusers' format: the token names the tensor
  before = pipe.tokenize(PROMPTS)['text_encoder']
  ti = load_textual_inversion(pipe, path)

  ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  ref.load_textual_inversion(path)
  want_ids = ref.tokenizer(
    ref.maybe_convert_prompt(PROMPTS, ref.tokenizer), padding='max_length', max_length=77, truncation=True
  ).input_ids
  np.testing.assert_array_equal(ti.tokenize(PROMPTS)['text_encoder'], want_ids)
  assert len(ref.tokenizer) == len(ti.tokenizer) == 49408 + 3
  with torch.no_grad():
    want = ref.encode_prompt(PROMPTS, 'cpu', 1, False)[0].numpy()
  got, _ = _embeds(ti, PROMPTS)
  assert rel_err(got, want) < 1e-5
  assert rel_err(got[2], _embeds(pipe, PROMPTS)[0][2]) < 1e-6  # a prompt without the token: as before
  # The original pipeline still has its own tokenizer and table.
  np.testing.assert_array_equal(pipe.tokenize(PROMPTS)['text_encoder'], before)
  assert pipe.text_encoder.text_model.embeddings.token_embedding.embedding.shape[0] == 49408
  # A1111 prompts: the token's vectors are tokens of the chunk, weighted like the words around them.
  a1111, _ = _embeds(ti, ['a photo of (<cat-toy>:1.0) on a table'], 'a1111')
  assert rel_err(a1111[0], want[0]) < 1e-5
  # A1111 keeps an embedding's vectors in one 75-token chunk: one that would straddle the end starts the next.
  ids, _, counts = ti.tokenize_chunks(['a ' * 73 + '<cat-toy> dog'], 'a1111')
  row = ids['text_encoder'][0]
  assert counts[0] == 2 and 49408 not in row[0] and list(row[1][1:5]) == [49408, 49409, 49410, row[1][4]]
  assert row[0][74] == row[0][75] == 49407  # the first chunk padded after its 73 words
  # Sampling compiles once more for the longer table; the token changes the image.
  kw = dict(num_inference_steps=2, guidance_scale=1.0, seed=0, height=32, width=32, output_type='latent')
  assert not np.allclose(txt2img(ti, PROMPTS[:1], **kw), txt2img(pipe, PROMPTS[:1], **kw))


def test_sdxl_files_give_each_encoder_its_table_as_diffusers_with_clip_l_and_clip_g(sdxl_folder, tmp_path):
  from conftest import rel_err

  ref, folder, _ = sdxl_folder
  pipe = load_pipeline(folder)
  dims = {e: pipe.components[e].text_model.embeddings.token_embedding.embedding.shape[1] for e in pipe.tokenizers}
  rng = np.random.default_rng(1)
  tables = {
    'clip_l': rng.standard_normal((2, dims['text_encoder'])),
    'clip_g': rng.standard_normal((2, dims['text_encoder_2'])),
  }
  path = str(tmp_path / 'sdxl_embedding.safetensors')
  write_safetensors(path, {k: v.astype(np.float32) for k, v in tables.items()})
  ti = load_textual_inversion(pipe, path, token='<cat-toy>')

  import diffusers

  ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
  ref.load_textual_inversion(
    torch.from_numpy(tables['clip_l']).float(),
    token='<cat-toy>',
    text_encoder=ref.text_encoder,
    tokenizer=ref.tokenizer,
  )
  ref.load_textual_inversion(
    torch.from_numpy(tables['clip_g']).float(),
    token='<cat-toy>',
    text_encoder=ref.text_encoder_2,
    tokenizer=ref.tokenizer_2,
  )
  with torch.no_grad():
    want, _, want_pooled, _ = ref.encode_prompt(PROMPTS, device='cpu', do_classifier_free_guidance=False)
  got, extra = _embeds(ti, PROMPTS)
  assert rel_err(got, want.numpy()) < 1e-5
  assert rel_err(extra['text_embeds'], want_pooled.numpy()) < 1e-5
  # A1111 pools SDXL's prompt embedding at the end token, the embedding's tokens read as 0 (diffusers: at the
  # largest id, the embedding's last token, by the legacy eos_token_id=2 rule).
  _, a1111 = _embeds(ti, PROMPTS, 'a1111')
  ids = ti.tokenize(PROMPTS)['text_encoder_2']
  with torch.no_grad():
    out = ref.text_encoder_2(torch.from_numpy(ids.astype(np.int64)))
    end = torch.from_numpy(np.argmax(ids == 49407, axis=1))
    at_end = ref.text_encoder_2.text_projection(out.last_hidden_state[torch.arange(len(ids)), end]).numpy()
  assert rel_err(a1111['text_embeds'], at_end) < 1e-5
  assert rel_err(a1111['text_embeds'][:2], want_pooled.numpy()[:2]) > 1e-3  # prompts naming the embedding differ


def test_a1111_and_pickle_formats_and_bad_files_are_named(small_sd_folder, tmp_path):
  pipe = load_pipeline(small_sd_folder[1])
  dim = pipe.text_encoder.text_model.embeddings.token_embedding.embedding.shape[1]
  vectors = np.random.default_rng(2).standard_normal((2, dim)).astype(np.float32)
  # A1111's safetensors: emb_params, the token is the file's name (A1111 uses the file stem).
  a1111 = str(tmp_path / 'mystyle.safetensors')
  write_safetensors(a1111, {'emb_params': vectors})
  assert read_embedding(a1111)[0] is None
  with pytest.raises(ValueError, match='names no token'):
    load_textual_inversion(pipe, a1111)
  ti = load_textual_inversion(pipe, a1111, token='mystyle')
  row = ti.tokenize(['mystyle'])['text_encoder'][0]
  assert list(row[:4]) == [49406, 49408, 49409, 49407]  # BOS, the two vectors' tokens, EOS
  # A1111's embeddings folder (the server's): a file's name, as a word in any case, even one of the vocabulary.
  word = load_textual_inversion(pipe, a1111, token='Style', as_word=True)
  ids = {p: list(word.tokenize([p])['text_encoder'][0][:5]) for p in ('a STYLE photo', 'a style, photo', 'stylish')}
  assert ids['a STYLE photo'][2:4] == [49408, 49409] and ids['a style, photo'][2:4] == [49408, 49409]
  assert 49408 not in ids['stylish'] and 49408 not in pipe.tokenize(['a style photo'])['text_encoder'][0]
  with pytest.raises(ValueError, match="an embedding named 'STYLE' is already loaded"):
    load_textual_inversion(word, a1111, token='STYLE', as_word=True)
  # A1111's .pt (a pickle): refused unless allowed; then the same vectors under its own name.
  pt = str(tmp_path / 'mystyle.pt')
  torch.save({'string_to_param': {'*': torch.from_numpy(vectors)}, 'name': 'mystyle', 'step': 100}, pt)
  with pytest.raises(WeightsError, match='pickle'):
    read_embedding(pt)
  name, got = read_embedding(pt, allow_pickle=True)
  assert name == 'mystyle' and np.array_equal(got[''], vectors)
  # Vectors of another model's width, a token the vocabulary has, several tensors, SDXL tables on an SD model.
  wide = str(tmp_path / 'wide.safetensors')
  write_safetensors(wide, {'<w>': np.zeros((1, dim + 1), np.float32)})
  with pytest.raises(ValueError, match=f'vectors of size {dim + 1}'):
    load_textual_inversion(pipe, wide)
  with pytest.raises(ValueError, match="token 'dog' is already in the text_encoder tokenizer"):
    load_textual_inversion(pipe, a1111, token='dog')
  with pytest.raises(ValueError, match="token 'mystyle' is already"):
    load_textual_inversion(ti, a1111, token='mystyle')
  many = str(tmp_path / 'many.safetensors')
  write_safetensors(many, {'a': vectors, 'b': vectors})
  with pytest.raises(WeightsError, match='not a textual inversion embedding'):
    read_embedding(many)
  xl = str(tmp_path / 'xl.safetensors')
  write_safetensors(xl, {'clip_l': vectors, 'clip_g': vectors})
  with pytest.raises(ValueError, match='clip_l/clip_g tables, but the model has text encoders text_encoder'):
    load_textual_inversion(pipe, xl, token='<x>')
  huge = str(tmp_path / 'huge.safetensors')  # more vectors than a prompt chunk holds
  write_safetensors(huge, {'<h>': np.zeros((76, dim), np.float32)})
  with pytest.raises(ValueError, match='76 vectors do not fit a prompt of 75 tokens'):
    load_textual_inversion(pipe, huge)
  uneven = str(tmp_path / 'uneven.safetensors')  # SDXL's two encoders' outputs are joined token by token
  write_safetensors(uneven, {'clip_l': vectors, 'clip_g': vectors[:1]})
  with pytest.raises(WeightsError, match='different numbers of vectors'):
    read_embedding(uneven)
  other_key = str(tmp_path / 'other.pt')  # A1111 takes string_to_param's one entry whatever its key
  torch.save({'string_to_param': {'x': torch.from_numpy(vectors)}, 'name': 'other'}, other_key)
  assert np.array_equal(read_embedding(other_key, allow_pickle=True)[1][''], vectors)
  nan = str(tmp_path / 'nan.safetensors')
  write_safetensors(nan, {'<n>': np.full((1, dim), np.nan, np.float32)})
  with pytest.raises(WeightsError, match='finite'):
    read_embedding(nan)


def test_a1111_names_match_where_the_prompt_holds_their_tokens_whatever_the_spaces_and_case(small_sd_folder, tmp_path):
  """A1111 finds an embedding's name by its token ids (EmbeddingDatabase.find_embedding_at_position): the name is
  used wherever its tokens stand in the prompt's, so 'bad-hands-5' also in 'Bad - Hands - 5', but not in 'xbad-hands-5'
  (another token). The reference here is that rule, run on the model's own tokenizer."""
  pipe = load_pipeline(small_sd_folder[1])
  tokenizer = pipe.tokenizer

  def ids(text):
    return list(tokenizer(text, add_special_tokens=False).input_ids)

  def holds(prompt, name):
    p, n = ids(prompt), ids(name)
    return any(p[i : i + len(n)] == n for i in range(len(p) - len(n) + 1))

  dim = pipe.text_encoder.text_model.embeddings.token_embedding.embedding.shape[1]
  path = str(tmp_path / 'e.safetensors')
  write_safetensors(path, {'emb_params': np.ones((1, dim), np.float32)})
  prompts = [
    'a {}', 'a {} photo', '{},{}', '({}:1.2)', 'x{}', '{}x', '{}5', '5{}', '{}-', '-{}', '{}_', 'a {}s',
    'a {}, b', '[{}]',
  ]  # fmt: skip
  spellings = {
    'bad-hands-5': ['bad-hands-5', 'Bad - Hands - 5', 'bad -hands- 5', 'bad--hands-5', 'badhands5', 'bad-hands-56'],
    'ShinyStyle': ['shinystyle', 'SHINYSTYLE', 'shiny style', 'shinystyles'],
    'style2k': ['style2k', 'style 2 k', 'Style2K', 'style2kk', 'style22k'],
    'x--y': ['x--y', 'x - - y', 'x -- y', 'x---y'],
    'neg_v2': ['neg_v2', 'neg _ v 2', 'neg__v2', 'negv2'],
  }
  checked = 0
  for name, variants in spellings.items():
    word = load_textual_inversion(pipe, path, token=name, as_word=True)
    new_id = int(np.max(word.tokenize(['a ' + name])['text_encoder'][0]))
    assert new_id >= 49408
    for variant in variants:
      for template in prompts:
        prompt = template.format(variant, variant)
        ours = new_id in word.tokenize([prompt])['text_encoder'][0]
        assert ours == holds(prompt, name), (name, prompt)
        checked += ours
  assert checked > 50  # both outcomes are exercised
