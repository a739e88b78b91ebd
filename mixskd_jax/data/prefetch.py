"""A background thread that keeps a few batches ready, for iterators built in Python."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def prefetch_in_thread(iterator: Iterator[T], size: int) -> Iterator[T]:
  """Yields what `iterator` yields, computing up to `size` items ahead in a daemon thread.

  Exceptions raised while producing an item are re-raised at the consumer, in order.
  `size <= 0` runs `iterator` in the caller's thread.
  """
  if size <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)

  def produce():
    try:
      for item in iterator:
        items.put(item)
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      items.put(_Failure(e))
      return
    items.put(_DONE)

  threading.Thread(target=produce, daemon=True, name="mixskd-prefetch").start()
  while True:
    item = items.get()
    if item is _DONE:
      return
    if isinstance(item, _Failure):
      raise item.error
    yield item
