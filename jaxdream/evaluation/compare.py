"""Paired comparison of evaluation runs (scores.json files): is run B better than run A, subject by subject?

For each metric, the per-subject differences B - A over the subjects both runs scored: their mean, a seeded
95% bootstrap interval of it (bootstrap_ci) and the two-sided Wilcoxon signed-rank p-value (scipy's; exact
for small samples without ties). Runs are comparable when their manifests agree on everything but the model:
`manifest_differences` lists what else differs.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxdream.evaluation.metrics import METRICS, bootstrap_ci

# Config keys that name what is evaluated (allowed to differ), where its files are, or how many devices
# shared the work (the scores agree across meshes to float32 rounding).
_MODEL_KEYS = ('model', 'loras', 'images', 'out', 'dataset', 'clip', 'dino', 'vlm', 'devices')
_ENVIRONMENT_KEYS = ('jax', 'flax', 'platform', 'device_kind')  # what changes the numbers, not who made them


def load_scores(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such scores file')
  try:
    with open(path, encoding='utf-8') as f:
      scores = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not a scores.json file ({e})') from None
  if not isinstance(scores, dict) or not {'subjects', 'overall', 'manifest'} <= set(scores):
    raise ValueError(f'{path}: not a jaxdream eval scores.json (no subjects/overall/manifest)')
  for key in ('subjects', 'overall', 'manifest'):
    if not isinstance(scores[key], dict):
      raise ValueError(f'{path}: {key} is a {type(scores[key]).__name__}, not a mapping (an edited or damaged file?)')
  if 'config' in scores['manifest'] and not isinstance(scores['manifest']['config'], dict):
    raise ValueError(f'{path}: manifest.config is not a mapping (an edited or damaged file?)')
  subjects = scores['subjects']
  metrics = list(METRICS) + ['vlm'] * ('vlm' in scores['overall'])  # vlm: compared when both runs have it
  for name, values in subjects.items():
    for m in metrics:
      v = values.get(m) if isinstance(values, dict) else None
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
        raise ValueError(f'{path}: subjects.{name}.{m} is {v!r}, not a score (an edited or damaged file?)')
  return scores


def wilcoxon_p(differences) -> float:
  """Two-sided Wilcoxon signed-rank p-value of paired differences (1.0 when all are zero)."""
  from scipy.stats import wilcoxon

  d = np.asarray(differences, np.float64)
  if not np.any(d != 0):
    return 1.0
  return float(wilcoxon(d, zero_method='wilcox', alternative='two-sided').pvalue)


def compare(a: dict, b: dict, *, seed: int = 0) -> dict:
  """{metric: {a, b, diff, ci, p, n}} of B against A over their common subjects (per-subject means)."""
  common = [s for s in a['subjects'] if s in b['subjects']]
  if not common:
    raise ValueError('the runs share no subject')
  out = {}
  for m in list(METRICS) + ['vlm'] * ('vlm' in a['overall'] and 'vlm' in b['overall']):
    va = np.array([a['subjects'][s][m] for s in common])
    vb = np.array([b['subjects'][s][m] for s in common])
    d = vb - va
    out[m] = {
      'a': float(va.mean()),
      'b': float(vb.mean()),
      'diff': float(d.mean()),
      'ci': list(bootstrap_ci(d, seed)),
      'p': wilcoxon_p(d),
      'n': len(common),
    }
  return out


def _differing(x: dict, y: dict, prefix: str = '') -> list[str]:
  """Keys both have with different values (a setting only one run has, e.g. the steps of a run that generated
  its images against one that scored given images, is unknown for the other, not different)."""
  return [prefix + k for k in sorted(set(x) & set(y)) if x[k] != y[k]]


def manifest_differences(a: dict, b: dict) -> list[str]:
  """What differs between two runs' manifests besides the model evaluated: settings, prompts and real images,
  scoring models, and the versions and device that compute the scores."""
  ma, mb = a['manifest'], b['manifest']
  strip = lambda cfg: {k: v for k, v in cfg.items() if k not in _MODEL_KEYS}
  out = _differing(strip(ma.get('config', {})), strip(mb.get('config', {})), 'config.')
  fa, fb = ma.get('files', {}), mb.get('files', {})
  for key in ('dataset', 'real_images', 'clip', 'dino', 'vlm'):
    if fa.get(key) != fb.get(key):
      out.append(f'files.{key}')
  env_a, env_b = ma.get('environment', {}), mb.get('environment', {})
  out += [f'environment.{k}' for k in _ENVIRONMENT_KEYS if env_a.get(k) != env_b.get(k)]
  return out


def comparison_markdown(names: list[str], results: list[dict]) -> str:
  """One table per run after the first: each metric's means, difference, CI and p-value against the first."""
  from jaxdream.evaluation.report import NAMES

  parts = []
  for name, res in zip(names[1:], results):
    n = next(iter(res.values()))['n']
    lines = [
      f'B = {name} vs A = {names[0]} ({n} subject{"s" * (n > 1)})',
      '',
      '| metric | A | B | B - A | 95% CI | Wilcoxon p |',
      '|---|---|---|---|---|---|',
    ]
    for m, r in res.items():
      lo, hi = r['ci']
      lines.append(
        f'| {NAMES[m]} | {r["a"]:.4f} | {r["b"]:.4f} | {r["diff"]:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {r["p"]:.3g} |'
      )
    parts.append('\n'.join(lines))
  return '\n\n'.join(parts) + '\n'
