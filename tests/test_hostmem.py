"""The glibc mmap threshold the CLI pins (mergemix.hostmem), checked in a fresh process each time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, os, sys
from mergemix.hostmem import pin_mmap_threshold
done = pin_mmap_threshold()
# glibc: an 8 MiB block freed raises a dynamic threshold to 8 MiB; a pinned one (4 MiB) stays, so the
# 6 MiB block after it is mapped on its own (mallinfo2's hblkhd counts mapped bytes)
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free(ctypes.c_void_p(libc.malloc(8 << 20)))
block = libc.malloc(6 << 20)
print(done, libc.mallinfo2().hblkhd >= 6 << 20)
"""


def _probe(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc only")
def test_freed_blocks_stay_mapped_on_their_own_unless_the_user_chose() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert _probe(env) == "True True"
    assert _probe({**env, "MALLOC_MMAP_THRESHOLD_": "33554432"}) == "False False"  # the user's 32 MiB stands
