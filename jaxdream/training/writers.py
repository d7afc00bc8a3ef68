"""Run logs: TensorBoard / Weights & Biases scalars and images, the loss history and its plot."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np

from jaxdream.io.files import atomic_write


def _load_losses(workdir) -> list:
  path = os.path.join(workdir, 'losses.json')
  if os.path.exists(path):
    with open(path) as f:
      return [tuple(x) for x in json.load(f)]
  return []


def _save_losses(workdir, losses):
  atomic_write(os.path.join(workdir, 'losses.json'), json.dumps(losses))


def loss_curve_image(losses, size=(640, 360)) -> np.ndarray:
  """A plain loss-vs-step plot (raw and smoothed) with labelled y ticks, drawn with PIL."""
  from PIL import Image, ImageDraw

  w, h = size
  im = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(im)
  if len(losses) >= 2:
    steps = np.array([s for s, _ in losses], np.float64)
    vals = np.array([v for _, v in losses], np.float64)
    vals = np.where(np.isfinite(vals), vals, np.nan)
    smooth = np.convolve(np.nan_to_num(vals), np.ones(min(20, len(vals))) / min(20, len(vals)), 'valid')
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    pad, left = 40, 70  # the left margin holds the tick labels
    xy = lambda s, v: (
      left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - left - pad),
      h - pad - (v - lo) / max(hi - lo, 1e-12) * (h - 2 * pad),
    )
    for v in np.linspace(lo, hi, 5):  # y ticks: a faint grid line and the value
      y = xy(steps[0], v)[1]
      draw.line([(left, y), (w - pad, y)], fill=(232, 232, 232), width=1)
      draw.line([(left - 5, y), (left, y)], fill='black', width=1)
      label = f'{v:.4g}'  # right-aligned by hand: anchors need a FreeType font
      draw.text((left - 8 - draw.textlength(label), y - 6), label, fill='black')
    draw.line([(left, pad), (left, h - pad)], fill='black', width=1)
    draw.line([xy(s, v) for s, v in zip(steps, vals) if np.isfinite(v)], fill=(170, 190, 230), width=1)
    draw.line([xy(s, v) for s, v in zip(steps[len(steps) - len(smooth) :], smooth)], fill=(20, 60, 160), width=2)
    draw.text((left, 8), f'loss  (min {lo:.4f}, max {hi:.4f})', fill='black')
    draw.text((left, h - pad + 8), f'step {int(steps[0])}', fill='black')
    draw.text((w - pad - 60, h - pad + 8), f'step {int(steps[-1])}', fill='black')
  return np.asarray(im)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it can only to
  accept torch tensors (jaxdream passes numpy), and that import is 6-9 s of a run's start-up."""
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules['torch'] = None  # makes `import torch` raise ImportError, which tensorboardX allows for
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class _Writer:
  """TensorBoard event files (tensorboardX, no TensorFlow) and, if asked for, Weights & Biases."""

  def __init__(self, workdir, config):
    self.tb = self.wandb = None
    if config.logging.tensorboard:
      self.tb = _summary_writer()(os.path.join(workdir, 'tensorboard'))
    if config.logging.wandb:
      try:
        import wandb

        self.wandb = wandb.init(project=config.logging.wandb_project, config=config.to_dict(), resume='allow')
      except ImportError:
        warnings.warn('logging.wandb=True but wandb is not installed; logging to TensorBoard only')

  def scalars(self, step, prefix='train', **values):
    """Tagged PREFIX/NAME in TensorBoard; Weights & Biases keeps the training scalars' bare names."""
    values = {k: float(v) for k, v in values.items()}
    if self.tb:
      for k, v in values.items():
        self.tb.add_scalar(f'{prefix}/{k}', v, step)
    if self.wandb:
      self.wandb.log(values if prefix == 'train' else {f'{prefix}/{k}': v for k, v in values.items()}, step=step)

  def images(self, step, images: dict, prefix: str = 'validation'):
    """Each entry's images side by side, tagged PREFIX/NN NAME (validation prompts, VAE reconstructions)."""
    from jaxdream.io.images import make_grid

    for k, (prompt, ims) in enumerate(images.items()):
      grid = make_grid(list(ims), 1, len(ims))
      if self.tb:
        self.tb.add_image(f'{prefix}/{k:02d} {prompt}', grid, step, dataformats='HWC')
      if self.wandb:
        import wandb

        self.wandb.log({f'{prefix}/{prompt}': wandb.Image(grid)}, step=step)

  def close(self):
    if self.tb:
      self.tb.close()
    if self.wandb:
      self.wandb.finish()
