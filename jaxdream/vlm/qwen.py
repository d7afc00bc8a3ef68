"""Qwen2.5-VL and Qwen3-VL behind jaxdream.vlm's API: `load_qwen` a transformers folder into a bundle, and
`qwen_generate` answers, one per (image, question), through the model-agnostic generation loops."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxdream.models.qwen_vl import QwenVLForConditionalGeneration, load_qwen_vl
from jaxdream.vlm.generation import generate
from jaxdream.vlm.qwen_processor import QwenVLProcessor

# Prompts are left-padded to a multiple of this many tokens, so that questions of similar lengths about
# images of one size share a compiled generation loop.
PROMPT_BUCKET = 32


@dataclasses.dataclass
class QwenVLBundle:
  """A loaded Qwen2.5-VL / Qwen3-VL folder: the model, its processor, and the EOS / pad ids generation uses
  (generation_config.json's, as transformers' generate takes them)."""

  model: QwenVLForConditionalGeneration
  processor: QwenVLProcessor
  eos_token_id: tuple
  pad_token_id: int
  model_type: str
  path: str | None = None


def load_qwen(
  path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False
) -> QwenVLBundle:
  """Load a transformers Qwen2.5-VL or Qwen3-VL folder: weights, tokenizer, chat template, image processor."""
  processor = QwenVLProcessor(path)
  model = load_qwen_vl(path, dtype=dtype, attention_impl=attention_impl, allow_pickle=allow_pickle)
  return QwenVLBundle(model, processor, processor.eos_token_ids, processor.pad_token_id, model.model_type, path)


def qwen_generate(
  bundle: QwenVLBundle,
  images: list,
  texts: list[str],
  *,
  max_new_tokens: int = 64,
  batch_size: int = 8,
  **generate_kwargs: Any,
) -> list[dict]:
  """Answers to one question per image, each asked as one user turn of the folder's chat template (the
  image, then the text, then the generation prompt). Returns per image {'text': the new tokens decoded with
  skip_special_tokens=True, 'input_size': (width, height) of the image as resized for the model}.
  generate_kwargs: do_sample, temperature, top_k, top_p, num_beams, seed, repetition_penalty (default: the
  folder's generation_config.json's, as transformers' generate applies it; its sampling settings are not taken:
  decoding is greedy unless asked), ..."""
  images, texts = list(images), list(texts)
  generate_kwargs.setdefault('repetition_penalty', bundle.processor.repetition_penalty)
  if len(images) != len(texts):
    raise ValueError(f'{len(texts)} questions for {len(images)} images')
  proc, results = bundle.processor, []
  for lo in range(0, len(images), batch_size):
    inputs = proc(images[lo : lo + batch_size], texts[lo : lo + batch_size], pad_to_multiple_of=PROMPT_BUCKET)
    out = generate(
      bundle.model,
      inputs['pixel_values'],
      inputs['image_grid_thw'],
      inputs['input_ids'],
      inputs['attention_mask'],
      max_new_tokens=max_new_tokens,
      eos_token_id=bundle.eos_token_id,
      pad_token_id=bundle.pad_token_id,
      **generate_kwargs,
    )
    texts_out = proc.decode(out[:, inputs['input_ids'].shape[1] :])
    results += [dict(text=t, input_size=tuple(s)) for t, s in zip(texts_out, inputs['input_sizes'])]
  return results
