"""Two processes on this machine stand in for two hosts (jax.distributed over localhost, two simulated CPU
devices each, gloo collectives): a two-host run on a (2, 2, 1) mesh, stopped by SIGTERM on the second
host and resumed, exports the model of a one-device run (made in this process)."""

import os
import signal
import socket
import textwrap

import jax
import numpy as np
import pytest
from conftest import CHEAP_XLA_FLAGS, rel_err, tiny_base
from test_train_run import SAMPLE, TE_FILE, UNET_FILE, _start, _wait_for_checkpoint

from jaxdream.distributed.mesh import make_mesh
from jaxdream.io.weights import read_safetensors
from jaxdream.training import config as config_lib
from jaxdream.training import loop

pytestmark = [pytest.mark.slow, pytest.mark.multihost]


def _config(path, base):
  path.write_text(
    textwrap.dedent(f"""
      from jaxdream.training.config import base_config, concept
      def get_config():
        c = base_config()
        c.model = {base!r}
        c.resolution = 64
        c.concepts = [concept(instance_dir={SAMPLE!r}, instance_prompt='a photo of sks dog',
                              class_prompt='a photo of dog', class_dir='{{workdir}}/class_images',
                              num_class_images=2)]
        c.prior.sample_steps, c.prior.batch_size = 2, 2
        c.train.num_steps, c.train.batch_size, c.train.learning_rate = 10, 2, 1e-4
        c.train.train_text_encoder = True
        c.checkpoint.every_steps = 2  # SIGTERM comes after the first one, well before the last step
        c.validation.prompts, c.validation.num_images, c.validation.steps = ['a dog'], 1, 2
        c.data.flip_p = 0.5
        c.mesh.data, c.mesh.fsdp = 2, 2  # rows 0-1 (instance) on host 0, rows 2-3 (class) on host 1
        return c
  """)
  )
  return str(path)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _two_hosts(config, workdir, *overrides):
  # The cheap compile flags: each host compiles its programs cold (at the same time, so neither finds them
  # in the compilation cache), and for these 10 steps compiling costs more than unoptimised code. The second
  # host compiles them cold again when resumed: on CPU, jax keys the cache by a topology fingerprint that
  # differs per process, and only the first process writes it.
  coordinator = f'localhost:{_free_port()}'
  env = dict(JAXDREAM_COORDINATOR=coordinator, JAXDREAM_NUM_PROCESSES='2')
  return [
    _start(config, workdir, *overrides, devices=2, xla_flags=CHEAP_XLA_FLAGS, JAXDREAM_PROCESS_ID=str(i), **env)
    for i in range(2)
  ]


def _one_device_run(config, workdir):
  """The reference run, in this process on its first device."""
  c = config_lib.config_file(config)
  c.mesh.data = c.mesh.fsdp = 1
  # Checkpoints only at its end, and no validation samples: they change nothing in what a run computes, and
  # only its model files are compared.
  c.checkpoint.every_steps, c.validation.num_images = 10, 0
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, 'make_mesh', lambda *sizes: make_mesh(*sizes, devices=jax.devices()[:1]))
    loop.train(c, workdir)


def _finish(procs, timeout=600, status=0):
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert all(p.returncode == status for p in procs), '\n\n'.join(outputs)
  return outputs


def test_two_hosts_stopped_by_sigterm_on_one_resume_to_the_one_device_model(tmp_path):
  base = tiny_base(tmp_path / 'base')
  config = _config(tmp_path / 'cfg.py', base)
  one_device = str(tmp_path / 'one_device')
  _one_device_run(config, one_device)

  two_hosts = str(tmp_path / 'two_hosts')
  procs = _two_hosts(config, two_hosts)
  _wait_for_checkpoint(procs[0], two_hosts, 2)
  procs[1].send_signal(signal.SIGTERM)  # a preemption notice on the second host only
  outputs = _finish(procs, status=75)  # stopped, not done: a scheduler's retry resumes it
  assert 'SIGTERM: saved the checkpoint' in outputs[0], outputs[0]
  steps = sorted(int(s) for s in os.listdir(os.path.join(two_hosts, 'checkpoints')) if s.isdigit())
  assert steps[-1] < 10 and not os.path.exists(os.path.join(two_hosts, 'model'))

  # The resumed run is not stopped: it saves only at its end (checkpoint.every_steps is not run-defining), sparing
  # the two hosts a save every other step.
  outputs = _finish(_two_hosts(config, two_hosts, '--config.checkpoint.every_steps=10'))
  assert f'resumed from the checkpoint at step {steps[-1]}' in outputs[0], outputs[0]
  assert 'Done: 10 steps' in outputs[0] and 'Done' not in outputs[1]  # only the primary host reports
  for rel in (UNET_FILE, TE_FILE):
    a = read_safetensors(os.path.join(two_hosts, rel))
    b = read_safetensors(os.path.join(one_device, rel))
    base = read_safetensors(os.path.join(tmp_path, 'base', rel.split(os.sep, 1)[1]))
    keys = sorted(a)
    flat = lambda d: np.concatenate([d[k].ravel() for k in keys])
    assert rel_err(flat(a), flat(b)) <= 1e-5
    # The updates themselves (Adam's are ~lr * sign(g), so summation order shows): equal to 1e-3.
    assert rel_err(flat(a) - flat(base), flat(b) - flat(base)) <= 1e-3
  samples = os.listdir(os.path.join(two_hosts, 'samples'))
  assert 'loss_curve.png' in samples and len(samples) == 2
