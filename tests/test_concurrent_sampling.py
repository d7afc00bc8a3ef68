"""Per-call state: two threads sampling from one pipeline at once each get their own images and their own
progress calls, from compiled loops the pipeline owns and shares between calls."""

import threading
import time

import numpy as np

from jaxdream import load_pipeline
from jaxdream.diffusion.sampling import txt2img

JOBS = {  # different prompts, batch sizes, seeds and step counts
  'a': dict(prompts=['a photo of sks dog'], num_inference_steps=3, seed=0),
  'b': dict(prompts=['a red fox in the snow', 'a cat'], num_inference_steps=5, seed=7),
}


def _run(pipe, name, progress):
  job = JOBS[name]
  return txt2img(
    pipe,
    job['prompts'],
    num_inference_steps=job['num_inference_steps'],
    seed=job['seed'],
    scheduler='ddim',
    height=32,
    width=32,
    progress=progress,
  )


def _recorder(calls):
  def progress(step):
    time.sleep(0.01)  # slow enough that the two loops' callbacks interleave
    calls.append(step)

  return progress


def test_two_threads_sampling_one_pipeline_get_their_own_images_and_progress(small_sd_folder):
  pipe = load_pipeline(small_sd_folder[1])
  alone, alone_calls = {}, {}
  for name in JOBS:
    alone_calls[name] = []
    alone[name] = _run(pipe, name, _recorder(alone_calls[name]))
  for name, job in JOBS.items():
    assert alone_calls[name] == list(range(job['num_inference_steps']))

  together, calls, errors = {}, {name: [] for name in JOBS}, []
  start = threading.Barrier(len(JOBS))

  def worker(name):
    try:
      start.wait()
      together[name] = _run(pipe, name, _recorder(calls[name]))
    except Exception as e:  # noqa: BLE001 -- reported by the main thread
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(name,)) for name in JOBS]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=300)
  assert not errors, errors
  for name, job in JOBS.items():
    assert calls[name] == list(range(job['num_inference_steps'])), (name, calls)
    assert together[name].shape == alone[name].shape
    assert int(np.abs(together[name].astype(np.int32) - alone[name]).max()) <= 1, name
  # One compiled loop per step count, each compiled once: new callbacks never recompile.
  assert len(pipe.compiled) == 2 and all(fn._cache_size() == 1 for fn in pipe.compiled.values())
  assert len(pipe.callbacks) == 0  # every call forgot its callback
