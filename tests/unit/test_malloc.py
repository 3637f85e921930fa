"""kvstore.malloc: after keep_large_buffers, batches of large buffers reuse their memory instead of
faulting every page in again (what a daemon receiving TCP PUT frames does all day)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvstore.malloc import glibc_mallopt

# 30 batches of 16 frames of 2 MiB, allocated and freed on another thread like libzmq's I/O
# thread; prints the minor page faults taken.
BATCHES = """
import resource, sys, threading
from kvstore.malloc import keep_large_buffers
if sys.argv[1] == "tuned":
    assert keep_large_buffers()
def batches():
    for _ in range(30):
        frames = [bytearray(2 << 20) for _ in range(16)]
        del frames
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", BATCHES, mode], check=True, capture_output=True,
                         text=True, timeout=60)
    return int(out.stdout)


@pytest.mark.skipif(glibc_mallopt() is None, reason="needs glibc's mallopt")
def test_kept_buffers_take_a_fraction_of_the_page_faults() -> None:
    pages_per_batch = 16 * (2 << 20) // 4096
    plain, tuned = faults("plain"), faults("tuned")
    assert plain > 10 * pages_per_batch, plain  # the default allocator faults most batches in
    assert tuned < 3 * pages_per_batch, tuned  # the first batch, then reuse
