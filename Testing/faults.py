"""Real faults for tests: a full disk, a read-only folder, a peer that stalls.

``small_disk(folder)``
    A folder that holds only ``SMALL_DISK_BYTES``. As root (CI) it is a 64 KiB tmpfs mounted there; where mounting
    is not permitted, the folder is ordinary and ``disk.preexec`` limits the size of every file a child process
    writes (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG instead of killing the process). Run the
    code under test in a child with ``preexec_fn=disk.preexec``; ``disk.kind`` is "tmpfs" or "rlimit".
``read_only_folder(folder)``
    A folder nobody can write to, root included: a read-only bind mount (chmod alone does not stop root). Without
    the right to mount, an ordinary user gets a chmod 0555 folder; root without it cannot get one, and the test is
    skipped with that reason. ``MEDPRIVACY_TEST_NO_MOUNT=1`` tries these fallbacks even where mounting works.
``glibc_heaps(pid)``
    The number of glibc malloc arenas other than the main one in a running process, from /proc/PID/maps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

SMALL_DISK_BYTES = 64 * 1024


def _mount(*args: str) -> bool:
    # MEDPRIVACY_TEST_NO_MOUNT=1 exercises the fallbacks on a machine where mounting would work.
    if os.geteuid() != 0 or os.environ.get("MEDPRIVACY_TEST_NO_MOUNT") == "1":
        return False
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)


@dataclass
class SmallDisk:
    folder: Path
    kind: str  # "tmpfs" or "rlimit"
    preexec: Callable[[], None] | None


def _limit_file_size() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL_DISK_BYTES, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[SmallDisk]:
    folder.mkdir(parents=True, exist_ok=True)
    if _mount("-t", "tmpfs", "-o", f"size={SMALL_DISK_BYTES}", "tmpfs", str(folder)):
        try:
            yield SmallDisk(folder, "tmpfs", None)
        finally:
            _umount(folder)
    else:
        yield SmallDisk(folder, "rlimit", _limit_file_size)


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if _mount("--bind", str(folder), str(folder)):
        try:
            if not _mount("-o", "remount,ro,bind", str(folder)):
                pytest.skip("cannot remount a bind mount read-only here")
            yield folder
        finally:
            _umount(folder)
    elif os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
    else:
        pytest.skip("root without the right to mount: no folder is read-only for this process")


def glibc_heaps(pid: int) -> int:
    """Non-main glibc arenas: anonymous 64 MiB-aligned regions, a read-write part followed by a reserved one,
    64 MiB in all (glibc's HEAP_MAX_SIZE on 64-bit Linux)."""
    heap = 64 << 20
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) < 6:  # anonymous mapping: no path
            start, end = (int(x, 16) for x in parts[0].split("-"))
            regions.append((start, end, parts[1]))
    starts = {start: (end, perms) for start, end, perms in regions}
    count = 0
    for start, end, perms in regions:
        if start % heap or not perms.startswith("rw"):
            continue
        while end in starts and starts[end][1].startswith("---"):
            end = starts[end][0]
        count += end - start == heap
    return count
