"""One OS thread for all of rank 0's torch work: loading, prepacking, and every engine step.

Why: libgomp gives every thread that opens an OpenMP parallel region its own worker pool. With
two pools on a machine with few cores it throttles the workers' spin-waiting, and the decode
step of the default model ran 12.6 ms on the thread that had built the model but 14.8-16 ms on
another thread of the same process (2 cores, measured). Keeping one thread makes the engine step
as fast as a single-threaded script.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "privlm-engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if fn is None:
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn on the thread and return its result (re-raising its exception)."""
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut.result()

    def run_last(self, fn: Callable[[], object]) -> None:
        """Run fn (the engine loop) on the thread without waiting; the thread ends when it returns."""
        self._jobs.put((fn, Future()))
        self._jobs.put((None, None))

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
