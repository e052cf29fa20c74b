"""kd_core.runtime: after reuse_freed_memory(), a big block freed and allocated again costs no new
page faults; with glibc's default (or KD_CORE_MALLOC=system) every allocation faults its pages in."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="kd_core.runtime tunes glibc's malloc only")

# Allocates, writes and frees a 64 MB tensor 40 times (as training steps do their activations) and
# prints whether the allocator was tuned and the minor page faults of those allocations. Tuned, the
# heap grows by a block for the first few (a small allocation can land after a freed block), then
# every block reuses freed memory.
PROBE = """
import resource, torch
from kd_core.runtime import reuse_freed_memory
tuned = reuse_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.empty(16 * 2**20).fill_(1)  # written, as activations are
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_BLOCK = 64 * 2**20 // 4096


def probe(malloc: str | None) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if key != "KD_CORE_MALLOC"}
    if malloc:
        env["KD_CORE_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    tuned, faults = out.split()
    return tuned, int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    tuned, faults = probe(None)
    assert tuned == "True"
    assert faults < 10 * PAGES_PER_BLOCK  # 40 blocks, at most the first few faulted in


def test_kd_core_malloc_system_keeps_glibc_default():
    tuned, faults = probe("system")
    assert tuned == "False"
    assert faults >= 40 * PAGES_PER_BLOCK  # each block mmapped anew and faulted in page by page


# Eight threads allocate (torch tensors, as request handlers do), then glibc's malloc_stats() lists
# each arena on stderr as "Arena N:".
ARENAS = """
import ctypes, sys, threading, torch
from kd_core.runtime import limit_malloc_arenas
limited = limit_malloc_arenas() if sys.argv[1] == "limit" else None
barrier = threading.Barrier(8)
def work():
    barrier.wait()  # all eight allocate at once, so that glibc sees contention
    for _ in range(200):
        torch.empty(4096).fill_(1)
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads: thread.start()
for thread in threads: thread.join()
print(limited, flush=True)
ctypes.CDLL(None).malloc_stats()
"""


def arenas(mode: str) -> tuple[str, int]:
    env = {key: value for key, value in os.environ.items() if key not in ("KD_CORE_MALLOC", "MALLOC_ARENA_MAX")}
    done = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    return done.stdout.strip(), sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_a_server_limits_malloc_to_one_arena_however_many_threads_allocate():
    limited, count = arenas("limit")
    assert limited == "True" and count == 1
    _, default = arenas("default")
    assert default > 2  # glibc's own default: an arena per contending thread, up to eight per core
