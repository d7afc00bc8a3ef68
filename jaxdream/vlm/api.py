"""The user-facing Kosmos-2 API: `load` a transformers folder into a bundle, `caption` (and ground) images,
draw `phrase_heatmaps`, and `check_subject` for DreamBooth training sets."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from jaxdream.models.kosmos2 import Kosmos2ForConditionalGeneration, load_kosmos2
from jaxdream.vlm.generation import compiled, generate
from jaxdream.vlm.grounding import parse_grounding, subject_boxes
from jaxdream.vlm.processor import _PROMPT_BUCKET, DEFAULT_PROMPT, Kosmos2Processor


@dataclasses.dataclass
class Kosmos2Bundle:
  """A loaded Kosmos-2 folder: the model, its processor, and the EOS / pad ids generation uses."""

  model: Kosmos2ForConditionalGeneration
  processor: Kosmos2Processor
  eos_token_id: tuple
  pad_token_id: int
  path: str | None = None


def load(path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False) -> Kosmos2Bundle:
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


def caption(
  model,
  images,
  *,
  prompt: str | list[str] = DEFAULT_PROMPT,
  max_new_tokens: int = 64,
  batch_size: int = 8,
  heatmaps: bool = False,
  **generate_kwargs,
) -> list[dict]:
  """Caption (and ground) images with Kosmos-2.

  model: a folder or a `load`ed bundle; images: paths, PIL images or uint8 arrays; prompt: one string or
  one per image. generate_kwargs: do_sample, temperature, top_k, top_p, num_beams, seed, ...
  Returns per image {'generated_text', 'text', 'entities'}: the decoded sequence (prompt included, as
  processor.batch_decode(..., skip_special_tokens=True)) and its post_process_generation parse.
  heatmaps=True adds 'heatmaps': [(phrase, (grid, grid) array in [0, 1])], where each `<phrase>`'s tokens
  looked in the image (see `phrase_heatmaps`).
  """
  if generate_kwargs.get('num_return_sequences', 1) != 1:
    raise ValueError('caption returns one result per image; call generate for num_return_sequences > 1')
  bundle = model if isinstance(model, Kosmos2Bundle) else load(model)
  images = list(images)
  prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
  if len(prompts) != len(images):
    raise ValueError(f'{len(prompts)} prompts for {len(images)} images')
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

  mode 'caption': the phrase must be among the grounded entities of a free caption (conservative);
  mode 'refer': the model is asked where `<phrase>phrase</phrase>` is (it nearly always answers a box).
  Returns {'phrase', 'mode', 'grounded_fraction', 'images': [{'image', 'grounded', 'boxes', 'text'}]}.
  """
  if mode not in ('caption', 'refer'):
    raise ValueError(f"mode must be 'caption' or 'refer', not {mode!r}")
  images = list(images)
  if mode == 'refer':
    caption_kwargs['prompt'] = f'<grounding><phrase> {phrase.strip()}</phrase>'
  results = caption(model, images, **caption_kwargs)
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
