"""The user-facing VLM API over Kosmos-2, Qwen2.5-VL and Qwen3-VL: `load` a transformers folder into a
bundle, `caption` and `ask` about images (with grounded entities), draw Kosmos-2's `phrase_heatmaps`, and
`check_subject` for DreamBooth training sets.

Every result has 'text' and 'entities' ((phrase, (start, end), [(x1, y1, x2, y2), ...]), boxes in [0, 1]);
Kosmos-2's entities come from its grounding tags (`parse_grounding`), Qwen's from the JSON boxes of its answer
(`parse_qwen_grounding`)."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from jaxdream.io.weights import read_config
from jaxdream.models.config import ConfigError
from jaxdream.models.kosmos2 import Kosmos2ForConditionalGeneration, load_kosmos2
from jaxdream.models.qwen_text import MODEL_TYPES as QWEN_TYPES
from jaxdream.vlm.generation import compiled, generate
from jaxdream.vlm.grounding import parse_grounding, parse_qwen_grounding, subject_boxes
from jaxdream.vlm.processor import _PROMPT_BUCKET, DEFAULT_PROMPT, Kosmos2Processor

QWEN_MODEL_TYPES = QWEN_TYPES
MODEL_TYPES = ('kosmos-2',) + QWEN_MODEL_TYPES  # config.json's model_type of the folders `load` reads
SUPPORTED_MODELS = "Kosmos-2 ('kosmos-2'), Qwen2.5-VL ('qwen2_5_vl') and Qwen3-VL ('qwen3_vl')"

# Qwen's questions. Captions become training sidecars, so one sentence: a longer description would be cut
# at max_new_tokens. The grounding question is the style of Qwen's published grounding examples.
QWEN_CAPTION_PROMPT = 'Describe this image in one sentence.'
QWEN_LOCATE_PROMPT = 'Locate every {phrase} in the image and output the bbox coordinates in JSON format.'
# Kosmos-2's question answering prompt, as its model card gives it.
KOSMOS2_QUESTION_PROMPT = '<grounding> Question: {question} Answer:'


@dataclasses.dataclass
class Kosmos2Bundle:
  """A loaded Kosmos-2 folder: the model, its processor, and the EOS / pad ids generation uses."""

  model: Kosmos2ForConditionalGeneration
  processor: Kosmos2Processor
  eos_token_id: tuple
  pad_token_id: int
  path: str | None = None
  model_type: ClassVar[str] = 'kosmos-2'


def model_type(path: str) -> str:
  """config.json's model_type of a vision-language model folder; any other folder is an error naming the
  supported types."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such folder; a VLM folder is a transformers folder of {SUPPORTED_MODELS}')
  config = read_config(path, hint=f'a VLM folder is a transformers folder of {SUPPORTED_MODELS}')
  kind = config.get('model_type') if isinstance(config, dict) else None
  if kind not in MODEL_TYPES:
    raise ConfigError(
      f'{path}: model_type {kind!r} is not a supported vision-language model; supported: {SUPPORTED_MODELS}'
    )
  return kind


def load(
  path: str,
  *,
  dtype=jnp.float32,
  attention_impl: str = 'auto',
  allow_pickle: bool = False,
  int8: bool = False,
  tensor_parallel: int = 1,
):
  """Load a transformers vision-language folder by its config.json's model_type: a `Kosmos2Bundle`
  ('kosmos-2') or a `jaxdream.vlm.qwen.QwenVLBundle` ('qwen2_5_vl', 'qwen3_vl').

  int8: weight-only int8 (about a quarter of float32's parameter memory). tensor_parallel > 1: the
  parameters split over that many local devices, attention heads, MLP and vocabulary Megatron-style (for the
  7B/8B sizes; int8 weights stay whole on each device)."""
  import jax

  if not 1 <= tensor_parallel <= jax.local_device_count():  # before gigabytes of weights are read
    raise ValueError(f'tensor_parallel={tensor_parallel}: between 1 and the {jax.local_device_count()} local devices')
  if model_type(path) in QWEN_MODEL_TYPES:
    from jaxdream.models.qwen_vl import quantize_int8
    from jaxdream.vlm.qwen import load_qwen  # the Qwen port loads only when a Qwen folder is asked for

    bundle = load_qwen(path, dtype=dtype, attention_impl=attention_impl, allow_pickle=allow_pickle)
  else:
    from jaxdream.models.kosmos2 import quantize_int8

    bundle = load_kosmos2_bundle(path, dtype=dtype, attention_impl=attention_impl, allow_pickle=allow_pickle)
  if int8:  # the model's own conversion: every Linear and the token embeddings (a tied LM head reads them)
    quantize_int8(bundle.model)
  if tensor_parallel > 1:
    from jaxdream.distributed.mesh import make_mesh
    from jaxdream.distributed.sharding import place_model

    place_model(
      bundle.model, make_mesh(data=1, fsdp=1, tensor=tensor_parallel, devices=jax.local_devices()[:tensor_parallel])
    )
  return bundle


def load_kosmos2_bundle(
  path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False
) -> Kosmos2Bundle:
  """Load a transformers Kosmos-2 folder: config.json, model.safetensors, tokenizer files and the
  (pre)processor config. EOS and pad ids come from the text config: transformers' Kosmos-2 generates with
  its text model's own generation settings, so generation_config.json does not apply there either."""
  model = load_kosmos2(path, dtype=dtype, attention_impl=attention_impl, allow_pickle=allow_pickle)
  eos = model.eos_token_id if isinstance(model.eos_token_id, (list, tuple)) else [model.eos_token_id]
  return Kosmos2Bundle(
    model,
    Kosmos2Processor(path, num_image_tokens=model.latent_query_num),
    tuple(eos),
    eos[0] if model.pad_token_id is None else model.pad_token_id,
    path,
  )


def _bundle(model):
  """A bundle from a folder (loaded) or a bundle (as it is)."""
  return load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model


def _is_qwen(bundle) -> bool:
  return getattr(bundle, 'model_type', None) in QWEN_MODEL_TYPES


def _per_image(value, images: list, what: str) -> list:
  """One string for every image, or one per image."""
  values = [value] * len(images) if isinstance(value, str) else list(value)
  if len(values) != len(images):
    raise ValueError(f'{len(values)} {what} for {len(images)} images')
  return values


def _qwen(bundle, images: list, questions: list[str], **generate_kwargs) -> list[dict]:
  """Qwen's answers, each with the entities of the JSON boxes in it (on the image as resized for the model)."""
  from jaxdream.vlm.qwen import qwen_generate

  return [
    dict(text=r['text'], entities=parse_qwen_grounding(r['text'], bundle.model_type, r['input_size']))
    for r in qwen_generate(bundle, images, questions, **generate_kwargs)
  ]


def caption(
  model,
  images,
  prompt: str | list[str] | None = None,
  *,
  max_new_tokens: int = 64,
  batch_size: int = 8,
  heatmaps: bool = False,
  **generate_kwargs,
) -> list[dict]:
  """Caption (and ground) images.

  model: a folder or a `load`ed bundle; images: paths, PIL images or uint8 arrays; prompt: one string or
  one per image, by default Kosmos-2's '<grounding>An image of' (a caption to continue) or Qwen's
  `QWEN_CAPTION_PROMPT` (a question). generate_kwargs: do_sample, temperature, top_k, top_p, num_beams, seed, ...
  Returns per image {'text', 'entities'}. Kosmos-2 adds 'generated_text', the decoded sequence (prompt
  included, as processor.batch_decode(..., skip_special_tokens=True)), of which 'text' and 'entities' are the
  post_process_generation parse; heatmaps=True (Kosmos-2 only) adds 'heatmaps': [(phrase, (grid, grid) array
  in [0, 1])], where each `<phrase>`'s tokens looked in the image (see `phrase_heatmaps`).
  """
  if generate_kwargs.get('num_return_sequences', 1) != 1:
    raise ValueError('caption returns one result per image; call generate for num_return_sequences > 1')
  bundle = _bundle(model)
  images = list(images)
  if _is_qwen(bundle):
    if heatmaps:
      raise ValueError('heatmaps are Kosmos-2 only: Qwen-VL has no grounding tokens to follow')
    prompts = _per_image(QWEN_CAPTION_PROMPT if prompt is None else prompt, images, 'prompts')
    return _qwen(bundle, images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **generate_kwargs)
  prompts = _per_image(DEFAULT_PROMPT if prompt is None else prompt, images, 'prompts')
  proc, results = bundle.processor, []
  for lo in range(0, len(images), batch_size):
    ids, attention, image_mask = proc.prompts(prompts[lo : lo + batch_size], bucket=_PROMPT_BUCKET)
    pixels = proc.images(images[lo : lo + batch_size])
    out = generate(
      bundle.model,
      pixels,
      ids,
      attention,
      image_mask,
      max_new_tokens=max_new_tokens,
      eos_token_id=bundle.eos_token_id,
      pad_token_id=bundle.pad_token_id,
      **generate_kwargs,
    )
    maps = phrase_heatmaps(bundle, pixels, out, attention, image_mask) if heatmaps else None
    for i, generated_text in enumerate(proc.decode(out)):
      text, entities = parse_grounding(generated_text)
      results.append(dict(generated_text=generated_text, text=text, entities=entities))
      if heatmaps:
        results[-1]['heatmaps'] = maps[i]
  return results


def ask(model, images, question: str | list[str], *, max_new_tokens: int = 64, **caption_kwargs) -> list[dict]:
  """Answer a question about each image: one question for all, or one per image.

  Kosmos-2 is prompted with `KOSMOS2_QUESTION_PROMPT` (grounded); its 'text' is the answer after the
  question, and 'entities' are those of the answer, their spans into it ('generated_text' keeps the whole
  sequence). Qwen gets the question as the user message. caption_kwargs: batch_size and generate's settings.
  """
  bundle = _bundle(model)
  images = list(images)
  questions = _per_image(question, images, 'questions')
  if _is_qwen(bundle):
    return caption(bundle, images, questions, max_new_tokens=max_new_tokens, **caption_kwargs)
  prompts = [KOSMOS2_QUESTION_PROMPT.format(question=q.strip()) for q in questions]
  results = caption(bundle, images, prompts, max_new_tokens=max_new_tokens, **caption_kwargs)
  return [_after_prompt(bundle.processor, r, p) for r, p in zip(results, prompts)]


def _after_prompt(proc: Kosmos2Processor, result: dict, prompt: str) -> dict:
  """A Kosmos-2 result cut to what follows its prompt: the text after the prompt as the tokenizer round-trips
  it (a tokenizer may drop characters it lacks), and the entities there, their spans moved to the cut text."""
  question = parse_grounding(proc.decode([proc.encode_prompt(prompt)])[0])[0]
  text = result['text']
  cut = len(question) if text.startswith(question) else 0
  cut += len(text[cut:]) - len(text[cut:].lstrip())
  entities = [(p, (s - cut, e - cut), boxes) for p, (s, e), boxes in result['entities'] if s >= cut]
  return dict(result, text=text[cut:], entities=entities)


def _attention_summary(model, pixel_values, ids, image_mask, attention):
  maps = model.attention_maps(pixel_values, ids, image_mask, attention)
  text = jnp.mean(jnp.stack([m.mean(1) for m in maps['text']]), 0)  # (B, L, L): layers and heads averaged
  return text, maps['projection'].mean(1)  # (B, Q, 1 + patches + Q)


def phrase_heatmaps(bundle: Kosmos2Bundle, pixel_values, ids, prompt_attention, prompt_image_mask) -> list:
  """Per row of generated `ids` (prompt included): [(phrase, heatmap)] for each <phrase>...</phrase>.

  The phrase tokens' attention to the 64 image tokens (averaged over decoder layers, heads and the phrase's
  tokens) is carried back to the image patches through the resampler's attention from its latent queries to
  the patch features: a (grid, grid) map of where the phrase looked, scaled to a maximum of 1.
  """
  model, tok = bundle.model, bundle.processor.tokenizer
  ids = np.asarray(ids)
  grow = lambda m, fill: np.concatenate([m, np.full((len(m), ids.shape[1] - m.shape[1]), fill, m.dtype)], 1)
  image_mask, attention = grow(np.asarray(prompt_image_mask), 0), grow(np.asarray(prompt_attention), 1)
  text, proj = compiled(model, _attention_summary)(
    jnp.asarray(pixel_values, model.dtype),
    jnp.asarray(ids),
    jnp.asarray(image_mask),
    jnp.asarray(attention),
  )
  text, proj = np.asarray(text), np.asarray(proj)
  grid = model.image_size // model.vision_model.model.embeddings.patch_embedding.kernel.shape[0]
  bop, eop = tok.convert_tokens_to_ids(['<phrase>', '</phrase>'])
  out = []
  for row, t, p, m in zip(ids, text, proj, image_mask):
    to_patches = p[:, 1 : 1 + grid * grid]  # latent query -> patch (the class token and latents dropped)
    maps = []
    for start in np.flatnonzero(row == bop):
      ends = np.flatnonzero(row[start + 1 :] == eop)
      if not len(ends) or ends[0] == 0:
        continue
      tokens = np.arange(start + 1, start + 1 + ends[0])
      heat = (t[tokens][:, m.astype(bool)].mean(0) @ to_patches).reshape(grid, grid)
      maps.append((tok.decode(row[tokens]).strip(), heat / max(heat.max(), 1e-12)))
    out.append(maps)
  return out


def check_subject(model, images, phrase: str, *, mode: str = 'caption', **caption_kwargs) -> dict:
  """Whether each image shows `phrase`, grounded with boxes: a DreamBooth training-set check.

  Kosmos-2: mode 'caption': the phrase must be among the grounded entities of a free caption (conservative);
  mode 'refer': the model is asked where `<phrase>phrase</phrase>` is (it nearly always answers a box).
  Qwen: in either mode the model is asked `QWEN_LOCATE_PROMPT` (its free captions carry no boxes), and the
  boxes labelled with the phrase count.
  Returns {'phrase', 'mode', 'grounded_fraction', 'images': [{'image', 'grounded', 'boxes', 'text'}]}.
  """
  if mode not in ('caption', 'refer'):
    raise ValueError(f"mode must be 'caption' or 'refer', not {mode!r}")
  if not phrase.strip():  # an empty phrase would match every grounded entity
    raise ValueError('check_subject needs a phrase naming the subject, got an empty one')
  bundle = _bundle(model)
  images = list(images)
  if _is_qwen(bundle):
    results = ask(bundle, images, QWEN_LOCATE_PROMPT.format(phrase=phrase.strip()), **caption_kwargs)
  else:
    if mode == 'refer':
      caption_kwargs['prompt'] = f'<grounding><phrase> {phrase.strip()}</phrase>'
    results = caption(bundle, images, **caption_kwargs)
  rows = []
  for i, (image, r) in enumerate(zip(images, results)):
    boxes = subject_boxes(r['entities'], phrase)
    rows.append(
      dict(
        image=str(image) if isinstance(image, (str, os.PathLike)) else i,
        grounded=bool(boxes),
        boxes=[list(b) for b in boxes],
        text=r['text'],
      )
    )
  fraction = sum(r['grounded'] for r in rows) / max(1, len(rows))
  return dict(phrase=phrase, mode=mode, grounded_fraction=fraction, images=rows)
