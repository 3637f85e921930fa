"""Run a load's copy on vLLM's worker thread when it comes by, on the loader's own otherwise.

On a CPU engine the loader thread's copy got about half a core: while a request waits for its
KV, vLLM's engine and worker processes step every millisecond and spin between steps (its
shared-memory queues busy-wait for a second after each message), so on a small host the loader
shares a core with a spinner. Measured in bench.ttft's replica: 127 blocks of 2 MiB took 45-64 ms
of wall time for 22-26 ms of the loader's CPU time. vLLM's worker thread calls get_finished in
every step, waiting requests or not; a copy run there has that thread's core and nobody spins
for it. If the worker thread does not come by in time (a long forward pass), the loader copies
as before, so a load never waits on vLLM more than wait_s.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class _Job:
    def __init__(self, run: Callable[[], int]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._is_taken = False
        self.result = 0
        self.error: Exception | None = None
        self.done = threading.Event()

    def take(self) -> bool:
        """Claim the job: True for the first caller only, so it runs exactly once."""
        with self._lock:
            if self._is_taken:
                return False
            self._is_taken = True
            return True

    def run(self) -> None:
        try:
            self.result = self._run()
        except Exception as exc:  # noqa: BLE001 - raised again on the loader's thread
            self.error = exc
        finally:
            self.done.set()


class Handoff:
    """Copies the loader thread offers to whichever thread calls serve() next."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()

    def run(self, copy: Callable[[], int], wait_s: float) -> int:
        """copy() on the next thread to call serve() within wait_s, else here; its result."""
        job = _Job(copy)
        self._jobs.put(job)
        if not job.done.wait(wait_s) and job.take():
            job.run()  # nobody came: copy here, as a loader always did
        job.done.wait()  # taken by the other thread: it checks the load's deadline as it goes
        if job.error is not None:
            raise job.error
        return job.result

    def serve(self) -> int:
        """Run every copy offered so far (called on vLLM's worker thread); how many ran."""
        num = 0
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return num
            if job.take():
                job.run()
                num += 1
