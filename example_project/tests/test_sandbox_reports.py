"""Tests that fail on purpose: what the kernel did, reported in one line each.

Run with ``pytest --nsbox`` and read the short test summary: a crash names
its signal, an OOM kill names the limit, a timeout says how many processes
it killed. A passing test that leaves a daemon behind is listed in the
"nsbox" summary section with the killed process's name and pid.
"""

import ctypes
import subprocess
import time

import pytest


def test_crashes_with_a_segfault():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


@pytest.mark.nsbox(memory="64m")
def test_allocates_more_than_its_memory_limit():
    hog = bytearray(200 * 1024 * 1024)
    hog[::4096] = b"x" * len(hog[::4096])


@pytest.mark.nsbox(timeout=1)
def test_hangs_with_a_child_process():
    subprocess.Popen(["sleep", "100"])
    time.sleep(100)


def test_leaves_a_daemon_running():
    # Passes, but the sandbox kills the daemon at the end and the "nsbox"
    # summary section lists it by name and pid.
    subprocess.Popen(["sleep", "300"], start_new_session=True)
