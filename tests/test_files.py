"""Atomic writes: a file is the old one or the whole new one, and no temporary file is left behind."""

import os

import numpy as np
import pytest

from jaxdream.io.files import atomic_open, atomic_write
from jaxdream.io.images import save_png


def test_atomic_write_replaces_the_file_with_text_or_bytes(tmp_path):
  path = str(tmp_path / 'a.json')
  atomic_write(path, '{"café": 1}')
  assert open(path, encoding='utf-8').read() == '{"café": 1}'
  atomic_write(path, b'\x00\x01')
  assert open(path, 'rb').read() == b'\x00\x01'
  assert os.listdir(tmp_path) == ['a.json']


def test_failure_mid_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
  path = str(tmp_path / 'losses.json')
  atomic_write(path, 'old')
  with pytest.raises(RuntimeError, match='disk full'):
    with atomic_open(path, 'w') as f:
      f.write('half of the new')
      assert os.path.dirname(f.name) == str(tmp_path)  # beside the target: os.replace stays on one file system
      raise RuntimeError('disk full')
  assert open(path).read() == 'old'
  assert os.listdir(tmp_path) == ['losses.json']


def test_failure_before_the_first_write_creates_nothing(tmp_path):
  path = str(tmp_path / 'new.bin')
  with pytest.raises(KeyError):
    with atomic_open(path, 'wb'):
      raise KeyError('x')
  assert os.listdir(tmp_path) == []


def test_written_file_has_the_usual_permissions_not_0600(tmp_path):
  umask = os.umask(0o022)
  try:
    atomic_write(str(tmp_path / 'f'), 'x')
  finally:
    os.umask(umask)
  assert os.stat(tmp_path / 'f').st_mode & 0o777 == 0o644


def test_save_png_that_fails_keeps_the_previous_image(tmp_path):
  path = str(tmp_path / 'img.png')
  save_png(path, np.zeros((4, 4, 3), np.uint8), 'first')
  before = open(path, 'rb').read()
  with pytest.raises((TypeError, ValueError)):
    save_png(path, np.zeros((4, 4, 7), np.uint8), 'second')  # PIL has no 7-channel mode
  assert open(path, 'rb').read() == before
  assert os.listdir(tmp_path) == ['img.png']


def test_only_whole_file_write_modes_are_accepted(tmp_path):
  with pytest.raises(ValueError, match="'w' or 'wb'"):
    with atomic_open(str(tmp_path / 'f'), 'a'):
      pass
