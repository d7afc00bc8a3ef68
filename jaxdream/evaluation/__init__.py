"""Reproducible DreamBench evaluation (the DreamBooth paper's protocol): the scoring models (CLIP, DINO) as
Flax ports loaded from local transformers folders, their reference preprocessing, and the scores.

    clip, dino = load_clip(CLIP_DIR), load_dino(DINO_DIR)
    scores = dreambench_scores(real, generated, prompts_without_identifier, clip, dino, seed=0)
    scores['overall']['dino'], scores['subjects']['dog']['clip_t'], scores['real']['clip_i'], scores['ci'][...]

`jaxdream.io.dreambench` reads the dataset layout (subjects, classes, prompt lists).
"""

from jaxdream.evaluation.metrics import METRICS, REAL_METRICS, bootstrap_ci, dreambench_scores
from jaxdream.evaluation.preprocess import ClipTransform, DinoTransform, dino_pixels
from jaxdream.evaluation.scorers import Scorer, clip_image_embed, clip_text_embed, dino_embed, load_clip, load_dino

__all__ = [
  'METRICS',
  'REAL_METRICS',
  'ClipTransform',
  'DinoTransform',
  'Scorer',
  'bootstrap_ci',
  'clip_image_embed',
  'clip_text_embed',
  'dino_embed',
  'dino_pixels',
  'dreambench_scores',
  'load_clip',
  'load_dino',
]
