"""mrcnn.allocator: large freed blocks stay in glibc's heap, counted by the kernel's page faults."""

import json
import platform
import subprocess
import sys

import pytest

from mrcnn import allocator
from mrcnn.config import Config

# A fresh process (the test process may be tuned already by a model built in another test):
# allocate, fill and free blocks of 40 MB (above glibc's largest dynamic mmap threshold, so
# mmapped by default) and 3 MB, ten times; report the minor page faults of the later nine.
FAULTS = """
import json, resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from mrcnn.allocator import tune_malloc
    assert tune_malloc()

def round_trip():
    for size in (40 << 20, 3 << 20, 40 << 20):
        block = np.ones(size // 8)
        del block

round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    round_trip()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def page_faults(mode):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(allocator.glibc() is None, reason="glibc only")
def test_tuned_heap_reuses_large_blocks_instead_of_faulting_them_in_again():
    default, tuned = page_faults("default"), page_faults("tuned")
    # 9 rounds x 83 MB of fresh pages (4 KB, or 2 MB where the kernel backs them with huge
    # pages): 10k faults here when every block is a new mapping, none when the heap keeps it.
    assert default > 2_000, default
    assert tuned < default / 20, (tuned, default)


class RecordingLibc:
    """A C library whose mallopt accepts everything and records its calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, *args):
        self.calls.append(args)
        return 1


@pytest.fixture
def fresh_allocator(monkeypatch):
    """tune_malloc as in a process that has not called it yet; returns a RecordingLibc that
    stands in for the C library wherever the test installs it."""
    monkeypatch.setattr(allocator, "_state", {"tuned": None})
    return RecordingLibc()


def test_without_glibc_nothing_is_changed(monkeypatch, fresh_allocator):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", ""))
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a, **k: fresh_allocator)
    assert allocator.tune_malloc() is False
    assert fresh_allocator.calls == []


def test_settings_are_made_once_per_process(monkeypatch, fresh_allocator):
    monkeypatch.setattr(allocator, "glibc", lambda: fresh_allocator)
    assert allocator.tune_malloc() is True
    assert allocator.tune_malloc() is True
    assert fresh_allocator.calls == [(allocator.M_MMAP_MAX, 0),
                                     (allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)]


@pytest.mark.parametrize("setting", [True, False])
def test_model_tunes_the_heap_as_its_config_says(monkeypatch, tmp_path, setting):
    import mrcnn.model as model_module
    calls = []

    class Built(Exception):
        pass

    def stop(config):
        raise Built   # past the allocator step: no need to build the graph

    monkeypatch.setattr(model_module, "tune_malloc", lambda: calls.append(1))
    monkeypatch.setattr(model_module, "make_strategy", stop)

    class C(Config):
        NAME = "alloc"
        TUNE_MALLOC = setting

    with pytest.raises(Built):
        model_module.MaskRCNN("inference", C(), str(tmp_path))
    assert calls == ([1] if setting else [])
