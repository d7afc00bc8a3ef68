"""DreamBench's three scores (the DreamBooth paper's protocol) and seeded bootstrap confidence intervals.

Per subject: DINO and CLIP-I are the mean cosine similarity over every (generated, real) image pair, CLIP-T
the mean cosine similarity of each generated image with its prompt written without the identifier ('a dog in
the jungle'). The real-images row compares each real image with the subject's other real images (DINO,
CLIP-I). Overall scores are means over subjects, with 95% percentile bootstrap intervals over subjects.
"""

from __future__ import annotations

import numpy as np

from jaxdream.evaluation.scorers import Scorer, clip_image_embed, clip_text_embed, dino_embed

METRICS = ('dino', 'clip_i', 'clip_t')
REAL_METRICS = ('dino', 'clip_i')


def bootstrap_ci(values, seed: int, n: int = 1000) -> tuple[float, float]:
  """95% percentile bootstrap interval of the mean of `values` (one per subject): `n` resamplings of the
  subjects with replacement, drawn from numpy's PCG64 generator seeded with `seed`."""
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    raise ValueError('bootstrap_ci: no values')
  rng = np.random.default_rng(seed)
  means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return float(lo), float(hi)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _split(embeddings: np.ndarray, counts: list[int]) -> list[np.ndarray]:
  return np.split(_unit(embeddings), np.cumsum(counts)[:-1])


def _real_row(real: np.ndarray) -> float | None:
  """Mean cosine of each real image with every other one of the subject (None with fewer than two)."""
  k = len(real)
  if k < 2:
    return None
  sims = real @ real.T
  return float((sims.sum() - np.trace(sims)) / (k * (k - 1)))


def _check_inputs(real_images: dict, generated: dict, prompts: dict):
  problems = []
  for s in generated:
    if s not in real_images or not len(real_images[s]):
      problems.append(f'{s}: no real images')
    if s not in prompts:
      problems.append(f'{s}: no prompts')
    elif len(prompts[s]) != len(generated[s]):
      problems.append(f'{s}: {len(generated[s])} generated image(s) but {len(prompts[s])} prompt(s)')
    if not len(generated[s]):
      problems.append(f'{s}: no generated images')
  extra = sorted(set(prompts) - set(generated))
  if extra:
    problems.append(f'prompts for subjects with no generated images: {extra}')
  if not generated:
    problems.append('no subjects')
  if problems:
    raise ValueError('dreambench_scores: ' + '; '.join(problems))


def dreambench_scores(
  real_images: dict,
  generated: dict,
  prompts_without_identifier: dict,
  clip: Scorer,
  dino: Scorer,
  *,
  seed: int = 0,
  progress=None,
  mesh=None,
) -> dict:
  """DreamBench scores of generated images.

  real_images: subject -> the subject's real images; generated: subject -> generated images;
  prompts_without_identifier: subject -> one prompt per generated image, without the identifier.
  Images are paths, PIL images or uint8 arrays. Each model embeds all images in one batched call;
  `progress(n)` is told the size of each batch embedded (2 * images + prompts in all), e.g. a bar's update.
  mesh: a jax.sharding.Mesh whose data axes split each batch (the scores agree with one device's to 1e-5).

  Returns plain floats: 'subjects' {subject: {dino, clip_i, clip_t}}, 'overall' {metric: mean over subjects},
  'ci' {metric: [lo, hi]} (bootstrap_ci over subjects with `seed`), 'real' {dino, clip_i} and 'real_ci'
  (the real-images row over the subjects with at least two real images; None if there are none),
  'real_subjects' {subject: {dino, clip_i}}, and 'images' {subject: [{prompt, dino, clip_i, clip_t}] in order}.
  """
  _check_inputs(real_images, generated, prompts_without_identifier)
  subjects = list(generated)
  reals = [list(real_images[s]) for s in subjects]
  gens = [list(generated[s]) for s in subjects]
  counts = [len(r) for r in reals] + [len(g) for g in gens]
  everything = [im for group in reals + gens for im in group]
  embeds = {
    'dino': _split(dino_embed(dino, everything, progress=progress, mesh=mesh), counts),
    'clip_i': _split(clip_image_embed(clip, everything, progress=progress, mesh=mesh), counts),
  }
  texts = sorted({p for s in subjects for p in prompts_without_identifier[s]})
  text = dict(zip(texts, _unit(clip_text_embed(clip, None, texts, progress=progress, mesh=mesh))))

  n = len(subjects)
  out = {'subjects': {}, 'real_subjects': {}, 'images': {}}
  for i, s in enumerate(subjects):
    real, gen = {m: embeds[m][i] for m in REAL_METRICS}, {m: embeds[m][n + i] for m in REAL_METRICS}
    pairs = {m: gen[m] @ real[m].T for m in REAL_METRICS}  # (generated, real) cosines
    prompts = list(prompts_without_identifier[s])
    clip_t = np.einsum('nd,nd->n', gen['clip_i'], np.stack([text[p] for p in prompts]))
    out['images'][s] = [
      {
        'prompt': p,
        'dino': float(pairs['dino'][j].mean()),
        'clip_i': float(pairs['clip_i'][j].mean()),
        'clip_t': float(t),
      }
      for j, (p, t) in enumerate(zip(prompts, clip_t))
    ]
    out['subjects'][s] = {
      'dino': float(pairs['dino'].mean()),
      'clip_i': float(pairs['clip_i'].mean()),
      'clip_t': float(clip_t.mean()),
    }
    row = {m: _real_row(real[m]) for m in REAL_METRICS}
    if row['dino'] is not None:
      out['real_subjects'][s] = row
  per = {m: [out['subjects'][s][m] for s in subjects] for m in METRICS}
  out['overall'] = {m: float(np.mean(per[m])) for m in METRICS}
  out['ci'] = {m: list(bootstrap_ci(per[m], seed)) for m in METRICS}
  rows = out['real_subjects'].values()
  out['real'] = {m: float(np.mean([r[m] for r in rows])) for m in REAL_METRICS} if rows else None
  out['real_ci'] = {m: list(bootstrap_ci([r[m] for r in rows], seed)) for m in REAL_METRICS} if rows else None
  return out
