"""Per-sandbox cgroups: a memory limit (anonymous memory, tmpfs, memfd, shared memory and page
cache all count) and a process limit, so a bomb is killed inside its own group, not the trainer;
and, where a cpu controller is available too, a quota of one core.

`Cgroups.detect()` picks, once per process:

* cgroup v2, when the trainer's own cgroup offers the ``memory`` and ``pids`` controllers to
  children (a delegated subtree, or a container whose cgroup has them enabled);
* else cgroup v1 ``memory`` and ``pids`` hierarchies we can write (root), plus ``cpu`` if mounted;
* else none: `Sandbox` falls back to rlimits, sized tmpfs, the seccomp filter and oom_score_adj
  (docs/sandbox.md says what that leaves open).

Groups are named ``dllm-sbx-<pid>-<n>`` under the trainer's own cgroup; groups left by a trainer
that died are removed by the next one that starts.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import threading
import time

log = logging.getLogger("rewards")
_COUNTER = itertools.count()
_PREFIX = "dllm-sbx-"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) >= 5 and len(r) >= 3 and r[0] in ("cgroup", "cgroup2"):
            out.append((f[3], f[4].replace("\\040", " "), r[0], set(r[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """controller ('' for v2) -> our cgroup path, from /proc/self/cgroup."""
    out = {}
    for line in _read("/proc/self/cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _join(mount_root: str, mount_point: str, path: str) -> str:
    rel = path[len(mount_root):] if mount_root != "/" and path.startswith(mount_root) else path
    return os.path.normpath(mount_point + "/" + rel.lstrip("/"))


class Cgroup:
    """One sandbox's group(s): one directory (v2) or memory, pids (and cpu) directories (v1)."""

    def __init__(self, dirs: list[str], version: int):
        self.dirs, self.version = dirs, version

    @property
    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.dirs]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for f in self.procs_files:
            try:
                out |= {int(p) for p in _read(f).split()}
            except OSError:
                pass
        return out

    def oom_killed(self) -> bool:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            m = re.search(r"^oom_kill (\d+)", _read(f"{self.dirs[0]}/{name}"), re.M)
        except OSError:
            return False
        return bool(m and int(m.group(1)))

    def kill(self) -> None:
        if self.version == 2 and os.path.exists(f"{self.dirs[0]}/cgroup.kill"):
            try:
                _write(f"{self.dirs[0]}/cgroup.kill", "1")
                return
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self, wait_s: float = 5.0) -> bool:
        """Kill what is left, wait until the group is empty, remove it. False if it is still busy."""
        deadline = time.monotonic() + wait_s
        while True:
            self.kill()
            try:
                for d in self.dirs:
                    if os.path.isdir(d):
                        os.rmdir(d)
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)


class Cgroups:
    """Factory for per-sandbox groups; `version` is 2, 1 or None (unavailable)."""

    def __init__(self, version: int | None, parents: list[str]):
        self.version, self.parents = version, parents
        self._busy: list[Cgroup] = []
        self._lock = threading.Lock()

    @classmethod
    def detect(cls) -> "Cgroups":
        try:
            mounts, own = _mounts(), _own_paths()
        except OSError:
            return cls(None, [])
        for root, point, fstype, _ in mounts:
            if fstype == "cgroup2" and "" in own:
                parent = _join(root, point, own[""])
                if cls._v2_usable(parent):
                    return cls._ready(2, [parent])
        parents = []
        for ctrl in ("memory", "pids", "cpu"):
            hit = [(r, p) for r, p, t, opts in mounts if t == "cgroup" and ctrl in opts and ctrl in own]
            if hit and os.access(_join(hit[0][0], hit[0][1], own[ctrl]), os.W_OK):
                parents.append(_join(hit[0][0], hit[0][1], own[ctrl]))
            elif ctrl != "cpu":
                return cls(None, [])
        return cls._ready(1, parents)

    @staticmethod
    def _v2_usable(parent: str) -> bool:
        try:
            have = set(_read(f"{parent}/cgroup.controllers").split())
            if not {"memory", "pids"} <= have:
                return False
            want = {"memory", "pids"} | ({"cpu"} & have)
            enabled = set(_read(f"{parent}/cgroup.subtree_control").split())
            if not want <= enabled:
                _write(f"{parent}/cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(want - enabled)))
            return os.access(parent, os.W_OK)
        except OSError:
            return False

    @classmethod
    def _ready(cls, version: int, parents: list[str]) -> "Cgroups":
        self = cls(version, parents)
        try:
            probe = self.create(1 << 30, 64)
        except OSError as e:
            log.info("cgroup v%d not usable: %s", version, e)
            return cls(None, [])
        probe.remove()
        self._sweep_stale()
        return self

    def _sweep_stale(self) -> None:
        """Remove empty groups left by trainers that no longer run."""
        for parent in self.parents:
            try:
                names = os.listdir(parent)
            except OSError:
                continue
            for name in names:
                m = re.fullmatch(_PREFIX + r"(\d+)-\d+", name)
                if m and not os.path.exists(f"/proc/{m.group(1)}"):
                    Cgroup([f"{parent}/{name}"], self.version or 1).remove(wait_s=0.5)

    def create(self, memory_bytes: int, pids: int, cpus: float = 1.0) -> Cgroup:
        with self._lock:
            busy, self._busy = self._busy, []
        busy = [g for g in busy if not g.remove(wait_s=0)]
        with self._lock:
            self._busy += busy
        name = f"{_PREFIX}{os.getpid()}-{next(_COUNTER)}"
        dirs = [f"{p}/{name}" for p in self.parents]
        for d in dirs:
            os.mkdir(d)
        group = Cgroup(dirs, self.version or 1)
        try:
            quota = str(int(cpus * 100_000))
            if self.version == 2:
                d = dirs[0]
                _write(f"{d}/memory.max", str(memory_bytes))
                if os.path.exists(f"{d}/memory.swap.max"):
                    _write(f"{d}/memory.swap.max", "0")
                _write(f"{d}/pids.max", str(pids))
                if os.path.exists(f"{d}/cpu.max"):
                    _write(f"{d}/cpu.max", f"{quota} 100000")
            else:
                mem, pid = dirs[:2]
                _write(f"{mem}/memory.limit_in_bytes", str(memory_bytes))
                if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
                    _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory_bytes))
                _write(f"{pid}/pids.max", str(pids))
                if len(dirs) > 2:
                    _write(f"{dirs[2]}/cpu.cfs_period_us", "100000")
                    _write(f"{dirs[2]}/cpu.cfs_quota_us", quota)
        except OSError:
            group.remove(wait_s=0)
            raise
        return group

    def release(self, group: Cgroup) -> None:
        """Remove `group` now if it is empty, else later (from `create`)."""
        if not group.remove(wait_s=1.0):
            with self._lock:
                self._busy.append(group)
