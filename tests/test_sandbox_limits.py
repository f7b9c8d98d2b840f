"""Bounded resources: memory, tmpfs, shared memory, memfd, processes, file size. A bomb costs at
most its own sample's reward; it never grows past the sandbox's limits (and so never reaches the
trainer). Run with the machine's cgroups and with the documented fallback (rlimits, sized tmpfs,
seccomp) alone, on both backends.

Each bomb below records whether it stayed within the limits in ``CONTAINED``; the second test
reads it. Scores: 1.0 = the bomb was stopped and the sample carried on, 0.0 = the sample was
killed; 0.5 would mean the bomb got more than the limits allow."""

import os

import pytest

from helpers.sandbox import MODES, code_reward
from rewards._cgroup import Cgroups

MB = 1 << 20
SCRATCH_MB, SHM_MB, MEMORY_MB, PROCS, FILE_MB = 32, 8, 512, 16, 4
TESTS = ["assert f(2) == 4", "assert CONTAINED is True"]
GOOD = "def f(x):\n    return 2 * x\n"


def _fill(path: str, limit_mb: int) -> str:
    return (f"import os\nn = 0\ntry:\n    for i in range(100000):\n        with open({path!r} + str(i), 'wb') as fh:\n"
            f"            fh.write(b'x' * {MB})\n        n += 1\nexcept OSError:\n    pass\n"
            f"CONTAINED = n <= {limit_mb}\n")


BOMBS = {
    "tmp_tmpfs": _fill("/tmp/f", SCRATCH_MB),
    "dev_shm": _fill("/dev/shm/f", SHM_MB),
    "one_big_file": (f"n = 0\ntry:\n    with open('/tmp/big', 'wb') as fh:\n        for _ in range(1000):\n"
                     f"            fh.write(b'x' * {MB})\n            n += 1\nexcept OSError:\n    pass\n"
                     f"CONTAINED = n <= {FILE_MB}\n"),
    "memfd": ("import os\ntry:\n    fd = os.memfd_create('bomb')\n    for _ in range(4096):\n"
              f"        os.write(fd, b'x' * {MB})\n    CONTAINED = False\nexcept OSError:\n    CONTAINED = True\n"),
    "sysv_shm": ("import ctypes\nlibc = ctypes.CDLL(None)\nid_ = libc.shmget(0, ctypes.c_size_t(4 << 30), 0o1600)\n"
                 "CONTAINED = id_ == -1\n"),
    "big_alloc": ("try:\n    x = bytearray(8 << 30)\n    CONTAINED = False\nexcept MemoryError:\n    CONTAINED = True\n"),
    "gradual_alloc": (f"chunks = []\ntry:\n    for _ in range(100):\n        chunks.append(b'x' * (64 * {MB}))\n"
                      f"except MemoryError:\n    pass\nCONTAINED = len(chunks) * 64 <= {MEMORY_MB}\nchunks = None\n"),
    "fork_bomb": ("import os, time\nn = 0\nfor _ in range(500):\n    try:\n        pid = os.fork()\n    except OSError:\n"
                  "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\n"
                  f"CONTAINED = n < {PROCS}\n"),
    "thread_bomb": ("import threading, time\nn = 0\nfor _ in range(500):\n    try:\n"
                    "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n    except RuntimeError:\n"
                    f"        break\n    n += 1\nCONTAINED = n < {PROCS}\n"),
    "new_user_namespace": ("import os\nCONTAINED = os.system('unshare -U -r mount -t tmpfs none /tmp 2>/dev/null') != 0\n"),
}
# Several processes each under the address-space limit: only the cgroup bounds their sum.
FORKED_MEMORY = ("import os\nkids = []\nfor _ in range(6):\n    pid = os.fork()\n    if pid == 0:\n"
                 f"        try:\n            x = b'x' * ({MEMORY_MB} * {MB} // 2)\n            os._exit(0)\n"
                 "        except MemoryError:\n            os._exit(1)\n    kids.append(pid)\n"
                 "ok = sum(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) == 0 for k in kids)\n"
                 "CONTAINED = ok <= 2\n")


def _cgroups_available() -> bool:
    version = Cgroups.detect().version
    if os.environ.get("CI") and os.geteuid() == 0:
        assert version, "CI runs as root on a machine with writable cgroups: the cgroup path must be used"
    return bool(version)


@pytest.mark.parametrize("cgroups", [True, False], ids=["cgroup", "fallback"])
@pytest.mark.parametrize("mode", MODES)
def test_bombs_stay_within_limits(mode, cgroups):
    reward = code_reward(mode, timeout_s=15.0, pool_size=3, memory_mb=MEMORY_MB, max_procs=PROCS,
                         scratch_mb=SCRATCH_MB, shm_mb=SHM_MB, max_file_mb=FILE_MB, cgroups=cgroups)
    cases = dict(BOMBS)
    if cgroups and _cgroups_available():
        assert reward.sandbox.cgroups.version
        cases["forked_memory"] = FORKED_MEMORY
    names = list(cases)
    scores = reward([""] * len(names), [f"```python\n{cases[n]}{GOOD}```" for n in names],
                    tests=[TESTS] * len(names))
    got = dict(zip(names, scores))
    assert {n: v for n, v in got.items() if n != "forked_memory"} == {n: 1.0 for n in BOMBS}
    assert got.get("forked_memory", 0.0) in (0.0, 1.0)  # killed by the cgroup's OOM killer, or contained


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb_is_killed_inside_its_cgroup(mode):
    if not _cgroups_available():
        pytest.skip("no usable cgroup on this machine (the fallback is tested above)")
    reward = code_reward(mode, timeout_s=15.0, memory_mb=256)
    code = ("import os\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        x = b'x' * (200 << 20)\n        import time\n        time.sleep(2)\n        os._exit(0)\n"
            "    kids.append(pid)\nfor k in kids:\n    os.waitpid(k, 0)\n" + GOOD)
    res = reward.sandbox.run({"mode": "asserts", "code": code, "tests": ["assert f(2) == 4"]})
    assert res.oom and not res.timed_out  # 4 x 200 MiB > 256 MiB: the OOM killer ran in the sample's cgroup


def test_cgroup_limits_written():
    """Each sandbox's group gets the memory and process limits (and one core, where a cpu
    controller exists); removing it leaves nothing behind."""
    cgroups = Cgroups.detect()
    if not _cgroups_available():
        pytest.skip("no usable cgroup on this machine")
    group = cgroups.create(300 << 20, 7, cpus=1.0)
    try:
        files = {name: open(f"{d}/{name}").read().split()[0] for d in group.dirs for name in os.listdir(d)
                 if name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max", "cpu.cfs_quota_us")}
    finally:
        cgroups.release(group)
    assert files.get("memory.max", files.get("memory.limit_in_bytes")) == str(300 << 20)
    assert files["pids.max"] == "7"
    assert files.get("cpu.max", files.get("cpu.cfs_quota_us", "100000")) == "100000"
    assert not any(os.path.exists(d) for d in group.dirs)
