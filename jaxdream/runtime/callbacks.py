"""Host callbacks of the calls running now, looked up by a per-call token.

A compiled function is shared by every call that has its key, so a callback compiled into it (e.g. a
progress bar) cannot be the caller's own. Instead each call registers its callback for the duration
of the call, passes the token as a traced argument, and the compiled code calls `registry(token, ...)`:
a new callback never recompiles, and two threads running the same compiled loop each get their own.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable


class CallbackRegistry:
  def __init__(self):
    self._fns: dict[int, Callable] = {}
    self._lock = threading.Lock()
    self._tokens = itertools.count(1)  # 0: no callback

  @contextlib.contextmanager
  def register(self, fn: Callable | None):
    """A token for `fn` while the block runs (0 for None); it is forgotten when the block exits."""
    if fn is None:
      yield 0
      return
    with self._lock:
      token = next(self._tokens)
      self._fns[token] = fn
    try:
      yield token
    finally:
      with self._lock:
        del self._fns[token]

  def __call__(self, token, *args):
    """Called from compiled code: forward to the callback registered under `token`, if any."""
    with self._lock:
      fn = self._fns.get(int(token))
    if fn is not None:
      fn(*args)

  def __len__(self) -> int:
    return len(self._fns)
