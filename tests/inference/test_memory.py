"""Memory at CPU inference (`inference/memory.py`): the C heap's free pages go back to the system."""

import pytest
import torch

from latent_diffusion.inference.memory import release_free_memory
from latent_diffusion.runtime import libc_function


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def test_free_heap_holes_go_back_to_the_system():
    if libc_function("malloc_trim") is None:
        pytest.skip("not glibc: nothing to trim")
    blocks = [torch.ones(16 * 1024) for _ in range(6400)]  # 64 KiB each, from the C heap: 400 MiB
    del blocks[::2]  # 200 MiB of holes between live blocks: freed, yet resident
    holding = _resident_mib()
    release_free_memory()
    assert holding - _resident_mib() > 100  # measured: 188 MiB
    assert all(torch.equal(b, torch.ones(16 * 1024)) for b in blocks)  # the live blocks are untouched
