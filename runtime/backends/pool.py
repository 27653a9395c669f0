"""A bounded pool of expensive per-call resources (TensorRT execution contexts), with a wait timeout.

Kept free of TensorRT so its concurrency is unit-tested anywhere: at most `size` resources are ever created
(lazily, outside the lock: creating a context allocates device memory and can take a while), callers beyond that
wait, and a wait longer than `timeout` seconds raises `BackendBusyError` instead of hanging a request forever.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Generic, Iterator, TypeVar

from k3trt.contract.errors import BackendBusyError

T = TypeVar("T")


class ResourcePool(Generic[T]):
    def __init__(self, create: Callable[[], T], size: int, *, timeout: float | None = 30.0, name: str = "pool"):
        if size < 1:
            raise ValueError(f"pool size {size} < 1")
        self._create, self.size, self.timeout, self.name = create, size, timeout, name
        self._idle: queue.LifoQueue = queue.LifoQueue()  # LIFO: the warmest resource (its buffers, graphs) first
        self._lock = threading.Lock()
        self.created = 0

    def acquire(self, timeout: float | None = None) -> T:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            reserve = self.created < self.size
            if reserve:
                self.created += 1
        if reserve:
            try:
                return self._create()
            except BaseException:
                with self._lock:
                    self.created -= 1
                raise
        wait = self.timeout if timeout is None else timeout
        try:
            return self._idle.get(timeout=wait)
        except queue.Empty:
            raise BackendBusyError(f"all {self.size} {self.name} slot(s) stayed busy for {wait} s",
                                   fix="retry later, raise max_contexts, or send fewer concurrent requests") \
                from None

    def release(self, item: T) -> None:
        self._idle.put(item)

    @contextlib.contextmanager
    def slot(self, timeout: float | None = None) -> Iterator[T]:
        item = self.acquire(timeout)
        try:
            yield item
        finally:
            self.release(item)

    def drain(self) -> list[T]:
        """Take every idle resource out (for closing); busy ones are not waited for."""
        items = []
        while True:
            try:
                items.append(self._idle.get_nowait())
            except queue.Empty:
                return items
