"""Process settings of livertumorai.runtime, each checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Frees a 64 MiB array and reports how much the resident size fell. glibc serves a block
# that large with its own mapping by default and unmaps it when freed.
_FREE_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    import numpy as np
    from livertumorai.runtime import prepare_process

    def resident_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    applied = prepare_process() if sys.argv[1] == "prepared" else None
    block = np.ones(64 << 20, dtype=np.uint8)
    before_kib = resident_kib()
    del block
    print(json.dumps({"applied": applied, "fall_mib": (before_kib - resident_kib()) / 1024,
                      "frozen": gc.get_freeze_count()}))
    """
)


def _run(mode: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", _FREE_SCRIPT, mode],
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_prepared_process_keeps_freed_memory_and_freezes_imports():
    default = _run("default")
    prepared = _run("prepared")

    assert default["fall_mib"] > 48, default  # the block went back to the kernel
    assert prepared["applied"] is True, prepared
    assert prepared["fall_mib"] < 16, prepared  # the block stays for reuse
    assert default["frozen"] == 0
    assert prepared["frozen"] > 10_000, prepared  # numpy's objects at least
