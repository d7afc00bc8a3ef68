"""The request queue: bounded FIFO, one worker thread that batches compatible images into one sampler call.

A request is a list of images (batch_size * n_iter) with one BatchKey. The worker takes the image at the head
and every queued image with the same key, in queue order, up to max_batch; a request larger than a batch is
served over several. The HTTP handlers only submit and await a future: sampling never runs on the event loop.
Interrupt (A1111's /interrupt) stops the running batch between two steps (the progress callback raises) and
ends its requests with the images they have; skip stops the running batch only. As in A1111, a stopped batch's
images are the clean latents of its last step decoded (`finish`), not nothing, for each request's images of one
iteration (A1111's batch_size images of one n_iter round, the job A1111 was running): its later iterations packed
into the same batch are run again after a skip and dropped by an interrupt, as A1111 would not have started them.
A stopped request's result says so (`.interrupted`), whichever client asked.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time

from jaxdream.io.images import png_bytes
from jaxdream.serve.engine import BatchKey, Task


class QueueFull(Exception):
  pass


class ShuttingDown(Exception):
  pass


class _Stop(Exception):
  """Raised from the progress callback to end the running batch (interrupt / skip)."""


class _QuietStop(logging.Filter):
  """JAX logs every exception of a debug callback with its traceback; an interrupt is no error."""

  def filter(self, record):
    return not (record.exc_info and isinstance(record.exc_info[1], _Stop))


logging.getLogger('jax._src.debugging').addFilter(_QuietStop())
log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Request:
  key: BatchKey
  tasks: list
  future: concurrent.futures.Future
  images: list  # per task: uint8 image, or None (not generated: interrupted, skipped)
  pending: int
  per_iteration: int  # tasks per A1111 iteration (its batch_size)
  stopped: bool = False


class Images(list):
  """A request's images (None where none was made), and whether an interrupt stopped it."""

  interrupted: bool = False


@dataclasses.dataclass(eq=False)
class _Unit:
  request: _Request
  index: int


class BatchQueue:
  """submit(key, tasks) -> a future of the images (None for those interrupted or skipped)."""

  def __init__(
    self, run, *, max_batch: int = 8, max_requests: int = 64, metrics=None, num_steps=None, preview=None, finish=None
  ):
    """run(key, tasks, progress) samples a batch, calling progress(step[, latents]); preview(key, latents) decodes
    one image's latents for /progress's current_image (None: no previews); finish(key, tasks, latents) gives a
    batch stopped part way its images from the last latents reported (None: a stopped batch has no images)."""
    self._run, self.max_batch, self.max_requests = run, max_batch, max_requests
    self._preview, self._finish = preview, finish
    self._num_steps = num_steps or (lambda key: key.steps)
    self._metrics = metrics
    self._units: collections.deque[_Unit] = collections.deque()
    self._requests: set[_Request] = set()  # submitted and not finished
    self._cond = threading.Condition()
    self._closing = False
    self._running: list[_Unit] = []
    self._stop: str | None = None  # 'interrupt' / 'skip' for the running batch
    self._progress = dict(step=0, steps=0, started=0.0, batch=0)
    self._batches = 0  # batches started: with the step, what a preview shows
    self._running_key = None
    # (batch number, step, key, the running batch's latents reported at that step)
    self._latents = None
    self._shown = None  # (batch number, step, base64 PNG): the last preview decoded, for the polls of one step
    self._paused = False
    self._thread = threading.Thread(target=self._work, name='jaxdream-serve-worker', daemon=True)
    self._thread.start()

  # -- clients
  def submit(self, key: BatchKey, tasks: list[Task], per_iteration: int | None = None) -> concurrent.futures.Future:
    """A future of the request's `Images`; `per_iteration`: tasks per A1111 iteration (its batch_size; default
    all of them)."""
    future = concurrent.futures.Future()
    with self._cond:
      if self._closing:
        raise ShuttingDown('the server is shutting down')
      if len(self._requests) >= self.max_requests:
        raise QueueFull(f'the queue is full ({self.max_requests} requests)')
      req = _Request(key, list(tasks), future, [None] * len(tasks), len(tasks), max(1, per_iteration or len(tasks)))
      self._requests.add(req)
      self._units.extend(_Unit(req, i) for i in range(len(tasks)))
      self._cond.notify_all()
    return future

  def depth(self) -> int:
    """Requests waiting or running."""
    with self._cond:
      return len(self._requests)

  def interrupt(self, skip: bool = False) -> bool:
    """Stop the running batch between two steps; interrupt also ends its requests. False if none runs."""
    with self._cond:
      if not self._running:
        return False
      self._stop = 'skip' if skip else 'interrupt'
      return True

  def progress(self, current_image: bool = False) -> dict:
    """A1111's /progress: fraction and ETA of the running batch, job counts; with `current_image`, a base64 PNG
    of the running batch's first image as it is now (its latents decoded only then, once per step)."""
    with self._cond:
      p, running, queued = dict(self._progress), bool(self._running), len(self._units)
      requests, latents = len(self._requests), self._latents
    image = None
    if current_image and running and latents is not None and self._preview is not None:
      image = self._current_image(latents)
    frac = p['step'] / p['steps'] if running and p['steps'] else 0.0
    elapsed = time.monotonic() - p['started'] if running else 0.0
    eta = elapsed / frac - elapsed if frac > 0 else 0.0
    state = {
      'skipped': self._stop == 'skip',
      'interrupted': self._stop == 'interrupt',
      'stopping_generation': False,
      'job': f'batch of {p["batch"]}' if running else '',
      'job_count': requests,
      'job_timestamp': time.strftime('%Y%m%d%H%M%S'),
      'job_no': 0,
      'sampling_step': p['step'] if running else 0,
      'sampling_steps': p['steps'] if running else 0,
      'queued_images': queued,
    }
    text = f'{queued} image(s) queued' if queued else None
    return {'progress': frac, 'eta_relative': eta, 'state': state, 'current_image': image, 'textinfo': text}

  def _current_image(self, latents) -> str:
    batch, step, key, x = latents
    shown = self._shown
    if shown is None or shown[:2] != (batch, step):
      png = png_bytes(self._preview(key, x[0]))
      shown = self._shown = (batch, step, base64.b64encode(png).decode('ascii'))
    return shown[2]

  def pause(self):
    """Hold the worker before its next batch (requests queue up; tests line them up with it)."""
    with self._cond:
      self._paused = True

  def resume(self):
    with self._cond:
      self._paused = False
      self._cond.notify_all()

  def close(self, wait: bool = True):
    """Refuse new requests, fail the queued ones (ShuttingDown: 503), let the running batch finish and the
    worker stop (waited for with `wait`; a signal handler on the event loop must not wait)."""
    with self._cond:
      self._closing = True
      for unit in self._units:
        self._fail(unit.request, ShuttingDown('the server is shutting down'))
      self._units.clear()
      self._cond.notify_all()
    if wait:
      self._thread.join()

  # -- the worker
  def _take(self) -> list[_Unit] | None:
    with self._cond:
      while (not self._units or self._paused) and not self._closing:
        self._cond.wait()
      if not self._units:
        return None
      key = self._units[0].request.key
      batch = [u for u in self._units if u.request.key == key][: self.max_batch]
      taken = set(map(id, batch))
      self._units = collections.deque(u for u in self._units if id(u) not in taken)
      self._running, self._stop, self._running_key = batch, None, key
      self._batches, self._latents = self._batches + 1, None
      try:
        steps = self._num_steps(key)
      except Exception:  # noqa: BLE001 (only the progress count: the batch itself will report what is wrong)
        log.exception('counting the steps of a batch failed')
        steps = key.steps
      self._progress = dict(step=0, steps=steps, started=time.monotonic(), batch=len(batch))
      return batch

  def _step(self, i, latents=None):
    with self._cond:
      self._progress['step'] += 1
      stop = self._stop
      if latents is not None:
        self._latents = (self._batches, self._progress['step'], self._running_key, latents)
    if stop:
      raise _Stop(stop)

  def _work(self):
    while True:
      batch = self._take()
      if batch is None:
        return
      key = batch[0].request.key
      t0 = time.monotonic()
      error = images = None
      tasks = [u.request.tasks[u.index] for u in batch]
      try:
        images = self._run(key, tasks, self._step)
      except Exception as e:  # noqa: BLE001 (a stop raised in the callback arrives wrapped by the runtime)
        error = e
        images = self._stopped_images(key, tasks)
      with self._cond:
        stop, self._running, self._stop = self._stop, [], None
        if self._metrics:
          self._metrics.batch(len(batch), time.monotonic() - t0, 0 if images is None else len(batch))
        first = {}  # per request, the first iteration it has in this batch: the one a stop ends
        for unit in batch:
          it = unit.index // unit.request.per_iteration
          first[unit.request] = min(first.get(unit.request, it), it)
        again = []
        for j, unit in enumerate(batch):
          req = unit.request
          later = error is not None and stop and unit.index // req.per_iteration > first[req]
          if later and stop == 'skip':  # A1111 goes on with the next iteration: run it again, whole
            again.append(unit)
            continue
          if images is not None and not later:
            req.images[unit.index] = images[j]
          elif images is None and stop is None:
            self._fail(req, error)
            continue
          if stop == 'interrupt':
            req.stopped = True
          req.pending -= 1
        self._units.extendleft(reversed(again))
        self._finish_stopped()
        for unit in batch:
          if unit.request.pending == 0 and not unit.request.future.done():
            self._done(unit.request)

  def _stopped_images(self, key, tasks):
    """A stopped batch's images from the last latents it reported (None: not stopped, or nothing to decode)."""
    with self._cond:
      stop, latents = self._stop, self._latents
    if stop is None or self._finish is None or latents is None or latents[0] != self._batches:
      return None
    try:
      return self._finish(key, tasks, latents[3])
    except Exception:  # noqa: BLE001 (the stop stands; the batch ends without images, as before)
      log.exception('decoding the stopped batch failed')
      return None

  def _finish_stopped(self):
    """Interrupted requests: their queued images are dropped and they end with what they have."""
    stopped = {u.request for u in self._units if u.request.stopped}
    if stopped:
      self._units = collections.deque(u for u in self._units if not u.request.stopped)
      for req in stopped:
        req.pending = 0

  def _done(self, req: _Request):
    self._requests.discard(req)
    result = Images(req.images)
    result.interrupted = req.stopped
    req.future.set_result(result)

  def _fail(self, req: _Request, error: Exception):
    self._requests.discard(req)
    if not req.future.done():
      req.future.set_exception(error)
    req.pending = 0
    self._units = collections.deque(u for u in self._units if u.request is not req)
