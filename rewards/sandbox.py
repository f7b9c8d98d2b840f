"""Sandbox for model-written code: namespaces, rlimits, and results the candidate cannot forge.

Isolation (per run, a fresh sandbox):

* ``bwrap`` when it works: read-only bind of ``/``, private tmpfs ``/tmp`` (also the throwaway
  working directory) and ``$HOME`` (only the interpreter's own directories re-exposed,
  read-only), new user/pid/net/ipc/uts/cgroup namespaces, all capabilities dropped,
  ``--die-with-parent``, ``--new-session``, ``--clearenv``.
* else ``unshare`` (needs root): new pid/net/ipc/uts/mount namespaces; the harness mounts private
  tmpfs over every world-writable directory and ``$HOME``, remounts the rest read-only where it
  can, and drops to uid 65534 (which removes every capability) with ``no_new_privs``.
* else nothing: `Sandbox` refuses to run unless ``unsafe=True`` (plain subprocess + rlimits).

In every mode: rlimits (CPU, address space, file size, open files, processes), a wall-clock
timeout after which the whole process group is SIGKILLed (the pid namespace takes every
descendant with it, detached or not), a scrubbed environment, stdout+stderr capped
(`max_output_bytes`; more than that kills the run; `keep_output_bytes` are kept for logs).

Verdicts. The candidate's exit code and its printed text are never trusted. The parent writes
the job, including a fresh random nonce, into a memfd that the harness reads and closes before
any candidate code runs; the nonce never appears in argv, the environment or any file the
candidate can open. The harness reports each test as ``<nonce> <json>`` on a pipe; lines
without the nonce are ignored, a duplicated test index fails that test. Each record carries
the plain-data serialization of both operands of every comparison the test's asserts made
(values returned by candidate functions are round-tripped through that serialization before
tests see them), and the parent recomputes every comparison from that data
(`_harness.verify_record`). Hence ``sys.exit(0)``/``os._exit(0)`` before the asserts (no
records), ``atexit`` hooks (the harness leaves with ``os._exit``), printing "PASSED" (no
nonce) and objects whose ``__eq__``/``__sub__``/``__bool__`` lie (opaque after serialization)
all score 0. Tests run with a snapshot of ``builtins`` taken before the candidate ran, and
each top-level ``assert`` of a test must actually have executed.

Residual risk, stated plainly: the harness shares an interpreter with the candidate, so code
that deliberately introspects the interpreter (``gc``, frame objects, ``ctypes`` on its own
memory) to find the nonce or replace the recorders, or that monkeypatches stdlib modules the
tests call, could forge a pass. Isolation of the host does not depend on this.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rewards import _harness

log = logging.getLogger("rewards")

HARNESS = str(Path(_harness.__file__).resolve())
MODES = ("bwrap", "unshare", "unsafe")
_MODE_CACHE: dict[str, bool] = {}
_LOGGED_MODE: set[str] = set()


@dataclass
class RunResult:
    """Outcome of one sandboxed run: per-test verdicts (assert modes) or stdout (stdio mode)."""

    passed: list[bool] = field(default_factory=list)
    stdout: bytes = b""
    timed_out: bool = False
    output_exceeded: bool = False
    returncode: int | None = None
    wall_s: float = 0.0
    error: str | None = None


class SandboxUnavailable(RuntimeError):
    pass


def _interpreter_dirs() -> list[str]:
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    dirs.add(str(Path(sys.executable).resolve().parent.parent))
    return sorted({str(Path(d).resolve()) for d in dirs})


def _home_dirs() -> list[str]:
    homes = {os.path.expanduser("~"), "/root"}
    return sorted(h for h in homes if h and h != "/" and os.path.isdir(h))


def _world_writable() -> list[str]:
    return [d for d in ("/var/tmp", "/run/lock", "/var/lock", "/dev/shm", "/dev/mqueue") if os.path.isdir(d) and not os.path.islink(d)]


class Sandbox:
    """Runs jobs for `_harness.py` in the strongest available isolation.

    Args:
        mode: "auto" (bwrap, else unshare, else refuse), "bwrap", "unshare", or "unsafe".
        unsafe: allow running without namespaces when nothing else works.
        timeout_s: wall-clock budget per run; memory_mb: address-space limit;
        max_procs: extra processes the candidate may create.
    """

    def __init__(self, mode: str = "auto", *, unsafe: bool = False, timeout_s: float = 5.0, memory_mb: int = 1024,
                 max_procs: int = 256, max_file_mb: int = 16, max_output_bytes: int = 1 << 20,
                 keep_output_bytes: int = 64 << 10):
        if mode not in ("auto", *MODES):
            raise ValueError(f"sandbox mode must be one of auto/bwrap/unshare/unsafe, got {mode!r}")
        self.timeout_s, self.memory_mb, self.max_procs = float(timeout_s), int(memory_mb), int(max_procs)
        self.max_file_mb, self.max_output_bytes, self.keep_output_bytes = max_file_mb, max_output_bytes, keep_output_bytes
        self.python = sys.executable
        self.mode = self._select(mode, unsafe)
        if self.mode not in _LOGGED_MODE:
            _LOGGED_MODE.add(self.mode)
            (log.warning if self.mode == "unsafe" else log.info)("code sandbox mode: %s", self.mode)

    # -- mode selection ----------------------------------------------------------------------
    def _select(self, mode: str, unsafe: bool) -> str:
        if mode == "unsafe":
            if not unsafe:
                raise SandboxUnavailable("mode='unsafe' requires unsafe=True")
            return mode
        for m in ("bwrap", "unshare") if mode == "auto" else (mode,):
            if m not in _MODE_CACHE:
                _MODE_CACHE[m] = self._probe(m)
            if _MODE_CACHE[m]:
                return m
        if unsafe:
            return "unsafe"
        raise SandboxUnavailable(
            f"no working sandbox (tried {mode if mode != 'auto' else 'bwrap, unshare'}); install bubblewrap, "
            "run as root for unshare, or pass unsafe=True to run model code without isolation")

    def _probe(self, mode: str) -> bool:
        if mode == "bwrap" and shutil.which("bwrap") is None:
            return False
        if mode == "unshare" and (shutil.which("unshare") is None or os.geteuid() != 0):
            return False
        try:
            res = self.run({"mode": "asserts", "code": "def f():\n    return 1\n", "tests": ["assert f() == 1"]},
                           _mode=mode, timeout_s=max(self.timeout_s, 10.0))
        except OSError as e:
            log.info("sandbox probe %s failed: %s", mode, e)
            return False
        ok = res.passed == [True]
        if not ok:
            log.info("sandbox probe %s failed: rc=%s %s", mode, res.returncode, res.stdout[-500:])
        return ok

    # -- command lines -----------------------------------------------------------------------
    def _argv(self, mode: str, job_fd: int) -> tuple[list[str], dict | None]:
        inner = [self.python, "-I", HARNESS, str(job_fd)]
        if mode == "bwrap":
            argv = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
                    "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/", "/", "--dev", "/dev",
                    "--proc", "/proc", "--tmpfs", "/tmp"]
            for d in _world_writable() + _home_dirs():
                if not d.startswith("/dev"):
                    argv += ["--tmpfs", d]
            for d in _interpreter_dirs() + [str(Path(HARNESS).parent)]:
                argv += ["--ro-bind", d, d]
            for k, v in self._env().items():
                argv += ["--setenv", k, v]
            return argv + ["--chdir", "/tmp", "--"] + inner, None
        if mode == "unshare":
            argv = ["unshare", "--fork", "--pid", "--kill-child", "--mount-proc", "--mount", "--net", "--ipc", "--uts", "--"]
            hide = sorted(set(_world_writable() + _home_dirs()))
            expose = [d for d in _interpreter_dirs() + [str(Path(HARNESS).parent)] if any(d.startswith(h + "/") for h in hide)]
            return argv + inner, {"hide": hide, "expose": expose, "uid": 65534}
        return inner, None

    @staticmethod
    def _env() -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}

    # -- running -----------------------------------------------------------------------------
    def run(self, job: dict, *, stdin: bytes = b"", timeout_s: float | None = None, _mode: str | None = None) -> RunResult:
        """Run one job: ``{"mode": "asserts", "code", "tests"}``, ``{"mode": "humaneval", "code", "test",
        "entry_point"}`` or ``{"mode": "stdio", "code"}`` (with `stdin`)."""
        mode = _mode or self.mode
        timeout = float(timeout_s or self.timeout_s)
        nonce = secrets.token_hex(16)
        res_r, res_w = os.pipe()
        out_r, out_w = os.pipe()
        job_fd = os.memfd_create("job", 0)
        in_fd = os.memfd_create("stdin", 0)
        argv, setup = self._argv(mode, job_fd)
        payload = dict(job, nonce=nonce, result_fd=res_w, setup=setup, cwd="/tmp" if mode != "unsafe" else None,
                       limits={"cpu_s": int(timeout) + 1, "as_bytes": self.memory_mb << 20, "fsize": self.max_file_mb << 20,
                               "nofile": 256, "nproc": _nproc_limit(self.max_procs), "core": 0})
        cwd = None
        if mode == "unsafe":
            import tempfile

            cwd = tempfile.mkdtemp(prefix="dllm-sbx-")
            payload["cwd"] = cwd
        os.write(job_fd, json.dumps(payload).encode())
        os.lseek(job_fd, 0, os.SEEK_SET)
        os.write(in_fd, stdin)
        os.lseek(in_fd, 0, os.SEEK_SET)
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=in_fd, stdout=out_w, stderr=subprocess.DEVNULL if job["mode"] == "stdio" else out_w, pass_fds=(job_fd, res_w),
                                    env=self._env(), start_new_session=True, close_fds=True)
        finally:
            for fd in (res_w, out_w, job_fd, in_fd):
                os.close(fd)
        result = RunResult()
        out, res = bytearray(), bytearray()
        total_out = 0
        sel = selectors.DefaultSelector()
        for fd in (out_r, res_r):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        exited_at = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now - t0 > timeout:
                    result.timed_out = True
                    break
                if exited_at is not None and now - exited_at > 0.5:
                    break  # pipes still held open: only possible in unsafe mode
                for key, _ in sel.select(timeout=0.05):
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                    elif key.fd == out_r:
                        total_out += len(chunk)
                        if len(out) < self.keep_output_bytes:
                            out += chunk[: self.keep_output_bytes - len(out)]
                    else:
                        res += chunk
                if total_out > self.max_output_bytes or len(res) > (64 << 20):
                    result.output_exceeded = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
        finally:
            _kill_group(proc)
            sel.close()
            os.close(out_r)
            os.close(res_r)
            if cwd:
                shutil.rmtree(cwd, ignore_errors=True)
        result.returncode = proc.returncode
        result.wall_s = time.monotonic() - t0
        result.stdout = bytes(out)
        if job["mode"] != "stdio":
            result.passed = _verdicts(job, bytes(res), nonce)
        return result


def _descendants(pid: int) -> list[int]:
    """All live descendants of `pid` (via /proc/<pid>/task/*/children)."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            out += kids
            stack += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group and every descendant (bwrap's sandboxed child leaves our
    session), then wait until none is left, so no process outlives the call."""
    kids = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5.0
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.005)


_NPROC_BASE: list[int] = []


def _nproc_limit(extra: int) -> int:
    """RLIMIT_NPROC counts all processes of the (mapped) uid on the host, so allow what is running
    now plus `extra` (counted once per process)."""
    if not _NPROC_BASE:
        uid = os.getuid()
        n = 0
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.stat(f"/proc/{p}").st_uid == uid:
                        n += 1
                except OSError:
                    pass
        _NPROC_BASE.append(n)
    return _NPROC_BASE[0] + extra


def _verdicts(job: dict, raw: bytes, nonce: str) -> list[bool]:
    """Per-test pass/fail from the nonce-tagged records, recomputing every comparison."""
    n = 1 if job["mode"] == "humaneval" else len(job["tests"])
    need = [1] * n if job["mode"] == "humaneval" else [_harness.count_asserts(t) for t in job["tests"]]
    prefix = nonce.encode() + b" "
    records: dict[int, dict | None] = {}
    for line in raw.split(b"\n"):
        if not line.startswith(prefix):
            continue
        try:
            rec = json.loads(line[len(prefix):])
        except ValueError:
            continue
        if type(rec) is not dict or "t" not in rec:
            continue
        t = rec["t"]
        if type(t) is not int or not 0 <= t < n:
            continue
        records[t] = None if t in records else rec  # a duplicate makes the test fail
    return [records.get(i) is not None and _harness.verify_record(records[i], need[i]) for i in range(n)]
