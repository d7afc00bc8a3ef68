"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

The new content goes to a temporary file beside the target (os.replace must not cross file systems),
is flushed to disk, then moved onto the target in one step. On any error the temporary file is removed
and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid


def _fsync_folder(folder: str):
  """Make the rename itself durable (POSIX; other systems cannot open a folder and need not)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = 'w', **open_kwargs):
  """Open a temporary file beside `path` for writing ('w' or 'wb'); when the block ends without error it
  replaces `path`. The temporary file is created with open() rather than mkstemp so that it gets the
  usual permissions (umask), not 0600, and is named per process and call so concurrent writers never share one."""
  if mode not in ('w', 'wb'):
    raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
  folder, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
  try:
    with open(tmp, mode.replace('w', 'x'), **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _fsync_folder(folder)


def atomic_write(path: str, data: bytes | str, encoding: str = 'utf-8'):
  """Write `data` (bytes, or text in `encoding`) to `path` atomically."""
  if isinstance(data, str):
    data = data.encode(encoding)
  with atomic_open(path, 'wb') as f:
    f.write(data)
