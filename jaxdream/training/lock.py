"""One run per workdir: a lock file naming the process that holds it.

Two runs writing the same checkpoints, dataset and model folder would corrupt each other. The primary
process holds `workdir/.jaxdream.lock` (pid and host, as JSON) from before it writes anything until it
finishes; a second run is refused at once. A lock left by a process that died (SIGKILL, a crash) on this
host is detected and taken over; one from another host cannot be checked, so the message names the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

from jaxdream.distributed import multihost

LOCK_FILE = '.jaxdream.lock'


class WorkdirInUse(OSError):
  """Another live run holds the workdir."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a live process of another user
    return True
  return True


def _holder(path: str) -> dict | None:
  """The lock's {'pid', 'host'}; None if there is no lock (or an unreadable one, which nobody holds)."""
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) and isinstance(holder.get('pid'), int) else None
  except (OSError, ValueError):
    return None


def acquire(workdir: str) -> str:
  """Take the workdir's lock for this process; raise WorkdirInUse if a live process holds it."""
  path = os.path.join(workdir, LOCK_FILE)
  me = {'pid': os.getpid(), 'host': socket.gethostname()}
  for _ in range(3):  # a lost race with another starting run is retried, then reported
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if holder and holder != me and (holder.get('host') != me['host'] or _alive(holder['pid'])):
        also = '' if holder.get('host') == me['host'] else f' (if that run is gone, delete {path})'
        raise WorkdirInUse(
          f'workdir {workdir} is in use by pid {holder["pid"]} on {holder.get("host")}{also}'
        ) from None
      with contextlib.suppress(FileNotFoundError):  # stale: its process died; take it over
        os.remove(path)
      continue
    with os.fdopen(fd, 'w') as f:
      json.dump(me, f)
    return path
  raise WorkdirInUse(f'workdir {workdir} is in use: could not take {path}')


def release(path: str):
  """Drop the lock if this process still holds it."""
  if _holder(path) == {'pid': os.getpid(), 'host': socket.gethostname()}:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Hold the workdir's lock for the block (on the primary process; the others follow it)."""
  path = acquire(workdir) if multihost.is_primary() else None
  try:
    yield
  finally:
    if path:
      release(path)
