"""keep_host_memory: freed tensors stay with the process (no page faults on the next step's buffers)."""

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r"""
import json, os, torch
from alignkit.runtime import keep_host_memory
kept = keep_host_memory()
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page / 2**20
x = torch.ones(64 * 2**20 // 4)   # 64 MiB, written, so resident
before_free = rss()
del x
after_free = rss()
print(json.dumps({"kept": kept, "again": keep_host_memory(), "dropped_mib": before_free - after_free}))
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("ALIGNKIT_HOST_ALLOC", None)
    if env_value is not None:
        env["ALIGNKIT_HOST_ALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_freed_memory_stays_with_the_process_unless_opted_out():
    kept = _probe(None)
    assert kept["kept"] is True and kept["again"] is True
    assert kept["dropped_mib"] < 8  # the 64 MiB block went back to the heap, not to the OS
    system = _probe("system")
    assert system["kept"] is False and system["again"] is False
    assert system["dropped_mib"] > 56  # glibc's default: a block this size was mmapped and is unmapped on free
