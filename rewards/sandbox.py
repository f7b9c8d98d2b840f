"""Sandbox for model-written code: verdicts the candidate cannot touch, a minimal unprivileged view
of the host, bounded resources, nothing that outlives the run. docs/sandbox.md has the threat
model; in short:

* Verdicts. A test job runs in two sandboxes: the candidate's code in one, the tests in another
  (`_harness`). They talk over two pipes; values cross as data the receiving side rebuilds with
  its own code (standard-library types, numpy arrays, the setup code's classes), other objects
  stay references the tests' side decides about; the tests' sandbox alone holds the result pipe,
  and the parent counts the per-test lines it reads there. Stdin/stdout jobs run the candidate
  alone; the parent compares its whole stdout as it streams in.
* Privilege and view. The candidate runs as a non-root host uid even when the trainer is root
  (one uid per sandbox from a private range), with no capabilities, ``no_new_privs`` and a seccomp
  filter (`_jail.seccomp_filter`). It sees the interpreter and its standard library read-only
  (site-packages masked; an allow-list of packages, default numpy, read-only under /sbx/pkgs),
  /usr, a fresh /proc of its own pid namespace, a minimal /dev and a private, size-limited /tmp
  and /dev/shm; nothing else of the host, and no network.
* Resources. Per sandbox: a cgroup (memory incl. tmpfs/memfd/shm, process count) where the machine
  allows it (`_cgroup`), always rlimits (CPU, address space, file size, open files, processes),
  sized tmpfs, oom_score_adj 1000 (the OOM killer takes a sandbox before the trainer), a
  wall-clock timeout and an output cap.
* Lifetime. The trainer holds the only write end of a lifeline pipe; each sandbox checks it
  before running anything, and a chain of parent-death signals kills every sandbox's namespace
  when the trainer dies (also by SIGKILL). After each run the parent SIGKILLs what is left and
  waits until it is gone.

Backends: ``bwrap`` (bubblewrap, started under the sample's uid; as root through ``nsenter`` into
a staging namespace when the interpreter lives where that uid cannot read, such as /root;
`_host.Stage`), ``unshare`` (root: util-linux ``unshare`` for the namespaces, `_jail` for the view
and the privilege drop), or ``unsafe`` (no isolation; refused unless ``unsafe=True``).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from rewards import _host
from rewards._cgroup import Cgroup, Cgroups
from rewards._host import SBX_HARNESS
from rewards._jail import seccomp_filter

log = logging.getLogger("rewards")

MODES = ("bwrap", "unshare", "unsafe")
_MODE_CACHE: dict[str, bool] = {}
_LOGGED_MODE: set[str] = set()


@dataclass
class RunResult:
    """Outcome of one run: per-test verdicts and errors (test jobs), or stdout and whether it
    matched the expected output (stdio jobs). `setup_error`: the dataset's setup code failed in
    the tests' sandbox (every test failed)."""

    passed: list[bool] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    setup_error: str | None = None
    stdout: bytes = b""
    stdout_match: bool | None = None
    timed_out: bool = False
    output_exceeded: bool = False
    oom: bool = False
    returncode: int | None = None
    wall_s: float = 0.0
    error: str | None = None


class SandboxUnavailable(RuntimeError):
    pass


@dataclass
class _Handle:
    proc: subprocess.Popen
    cgroup: Cgroup | None
    uid: int | None
    tmpdir: str | None = None
    handshake: tuple[int, int] | None = None  # bwrap --info-fd (read end), --block-fd (write end)


class Sandbox:
    """Runs jobs for `_harness` in the strongest available isolation.

    Args:
        mode: "auto" (bwrap, else unshare, else refuse), "bwrap", "unshare", or "unsafe".
        unsafe: allow running without isolation when nothing else works.
        timeout_s: wall-clock budget per run. memory_mb: per sandbox (cgroup and address space).
        max_procs: processes and threads per sandbox. max_file_mb: largest file it may write.
        scratch_mb / shm_mb: sizes of its /tmp and /dev/shm. cgroups: use cgroups when available.
        max_output_bytes: output cap (a stdio run with an expected output may print twice that
        much plus 64 KiB). keep_output_bytes: how much of it `RunResult.stdout` keeps.
        packages: third-party packages visible read-only in both sandboxes (found in the trainer's
        environment; those not installed are left out, logged once), the rest of site-packages
        stays hidden.
    """

    def __init__(self, mode: str = "auto", *, unsafe: bool = False, timeout_s: float = 5.0, memory_mb: int = 1024,
                 max_procs: int = 32, max_file_mb: int = 16, scratch_mb: int = 64, shm_mb: int = 16,
                 max_output_bytes: int = 1 << 20, keep_output_bytes: int = 64 << 10, cgroups: bool = True,
                 packages: tuple[str, ...] | list[str] = ("numpy",)):
        if mode not in ("auto", *MODES):
            raise ValueError(f"sandbox mode must be one of auto/bwrap/unshare/unsafe, got {mode!r}")
        for name, v in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_procs", max_procs),
                        ("max_file_mb", max_file_mb), ("scratch_mb", scratch_mb), ("shm_mb", shm_mb),
                        ("max_output_bytes", max_output_bytes), ("keep_output_bytes", keep_output_bytes)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"sandbox option {name} must be a positive number, got {v!r}")
        self.timeout_s, self.memory_mb, self.max_procs = float(timeout_s), int(memory_mb), int(max_procs)
        self.max_file_mb, self.scratch_mb, self.shm_mb = int(max_file_mb), int(scratch_mb), int(shm_mb)
        self.max_output_bytes, self.keep_output_bytes = int(max_output_bytes), int(keep_output_bytes)
        self.python = _host.python()
        self.root = os.geteuid() == 0
        self.cgroups = _shared("cgroups", Cgroups.detect) if cgroups else Cgroups(None, [])
        self.uids = _shared("uids", _host.Uids) if self.root else None
        self.seccomp = seccomp_filter()
        if isinstance(packages, str) or not isinstance(packages, (list, tuple)):
            raise ValueError(f"sandbox option packages must be a list of package names, got {packages!r}")
        self.packages, self._package_entries = _shared(f"packages:{tuple(packages)}",
                                                       lambda: _host.package_entries(packages))
        missing = sorted(set(packages) - set(self.packages))
        if missing and f"missing:{missing}" not in _LOGGED_MODE:
            _LOGGED_MODE.add(f"missing:{missing}")
            log.info("code sandbox: packages %s are not installed here; the sandbox will not have them", missing)
        self._harness = os.path.join(_host.compiled_harness(), "_harness.pyc")
        self._bwrap_plan = _host.view_plan(self.scratch_mb << 20, self.shm_mb << 20, harness_at=SBX_HARNESS,
                                           packages=self._package_entries)
        self._jail_plan = _host.view_plan(self.scratch_mb << 20, self.shm_mb << 20, packages=self._package_entries)
        self.mode = self._select(mode, unsafe)
        if self.mode not in _LOGGED_MODE:
            _LOGGED_MODE.add(self.mode)
            (log.warning if self.mode == "unsafe" else log.info)(
                "code sandbox mode: %s (cgroup: %s, seccomp: %s, uid: %s)", self.mode,
                f"v{self.cgroups.version}" if self.cgroups.version else "none (rlimits only)",
                "on" if self.seccomp else "unavailable", "per-sandbox" if self.root else "the trainer's")

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
            f"no working sandbox (tried {mode if mode != 'auto' else 'bwrap, unshare'}); install bubblewrap "
            "(>= 0.7), run as root for unshare, or pass unsafe=True to run model code without isolation")

    def _probe(self, mode: str) -> bool:
        if mode == "bwrap":
            if shutil.which("bwrap") is None or (self.root and shutil.which("nsenter") is None):
                return False
            if "--size" not in _bwrap_help():
                log.info("sandbox probe bwrap: this bubblewrap has no --size (tmpfs limits); need >= 0.7")
                return False
        if mode == "unshare" and (not self.root or shutil.which("unshare") is None or shutil.which("setpriv") is None):
            return False
        try:
            res = self.run({"mode": "asserts", "code": "def f():\n    return 1\n", "tests": ["assert f() == 1"]},
                           _mode=mode, timeout_s=max(self.timeout_s, 20.0))
        except (OSError, SandboxUnavailable) as e:
            log.info("sandbox probe %s failed: %s", mode, e)
            return False
        ok = res.passed == [True]
        if not ok:
            log.info("sandbox probe %s failed: rc=%s %s", mode, res.returncode, res.stdout[-500:])
        return ok

    # -- command lines -----------------------------------------------------------------------
    def _stage(self) -> _host.Stage | None:
        """As root: the staging namespace for what the sandbox uids cannot reach (None if all can)."""
        hidden = [op[1] for op in self._bwrap_plan if op[0] == "ro" and not _host.others_can_read(op[1])]
        if not self.root or not hidden:
            return None
        return _shared(f"stage:{hidden}", lambda: _host.Stage(hidden, self.python))

    def _bwrap_argv(self, job_fd: int, uid: int | None, extra: dict[str, int]) -> tuple[list[str], dict]:
        """The bwrap command line (and Popen options) for one sandbox; `extra` names the seccomp,
        info and block fds."""
        stage = self._stage()
        where = stage.where if stage else {}
        argv = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
                "--die-with-parent", "--as-pid-1", "--new-session", "--clearenv", "--hostname", "sandbox"]
        if "--disable-userns" in _shared("bwrap_help", _bwrap_help):
            argv.append("--disable-userns")
        for op in self._bwrap_plan:
            kind = op[0]
            if kind == "ro":
                argv += ["--ro-bind", where.get(op[1], op[1]), op[2]]
            elif kind == "symlink":
                argv += ["--symlink", op[1], op[2]]
            elif kind == "tmpfs":
                argv += ["--size", str(op[2]), "--perms", f"{op[3]:04o}", "--tmpfs", op[1]]
                if op[4]:
                    argv += ["--remount-ro", op[1]]
            elif kind in ("proc", "dev", "remount-ro"):
                argv += [f"--{kind}", op[1]]
        for k, v in _host.minimal_env().items():
            argv += ["--setenv", k, v]
        for name, fd in extra.items():
            argv += [f"--{name}", str(fd)]
        argv += ["--chdir", "/tmp", "--", self.python, "-I", "-S", SBX_HARNESS, str(job_fd), _host.owner_tag()]
        if uid is None:
            return argv, {}
        if stage:  # root: enter the staging namespace, then become the sample's uid (groups cleared)
            return ["nsenter", f"--mount={stage.namespace()}", f"--setuid={uid}", f"--setgid={uid}", "--"] + argv, {}
        return argv, {"user": uid, "group": uid, "extra_groups": []}

    # -- spawning ----------------------------------------------------------------------------
    def _spawn(self, mode: str, payload: dict, *, stdin, stdout, stderr, fds: tuple[int, ...]) -> _Handle:
        """Start one sandbox. bwrap with a cgroup waits (--block-fd) until `_release` has put it in."""
        cgroup = uid = None
        if mode != "unsafe" and self.cgroups.version:
            cgroup = self.cgroups.create(self.memory_mb << 20, self.max_procs)
        if mode != "unsafe" and self.uids is not None:
            uid = self.uids.acquire()
        job_fd = os.memfd_create("job", 0)
        child_fds: list[int] = []  # ours to close once the child has them
        handshake = None
        kwargs: dict = {}
        try:
            payload = dict(payload, lifeline=_host.lifeline(), limits=self._limits(mode), init=mode != "unsafe")
            if self.packages:
                payload.update(packages=self.packages,
                               pkg_path=self._unsafe_packages() if mode == "unsafe" else _host.SBX_PACKAGES)
            if mode == "bwrap":
                extra = {}
                if self.seccomp:
                    r, w = os.pipe()
                    os.write(w, self.seccomp)
                    os.close(w)
                    child_fds.append(r)
                    extra["seccomp"] = r
                if cgroup:
                    info_r, info_w = os.pipe()
                    block_r, block_w = os.pipe()
                    child_fds += [info_w, block_r]
                    handshake = (info_r, block_w)
                    extra.update({"info-fd": info_w, "block-fd": block_r})
                argv, kwargs = self._bwrap_argv(job_fd, uid, extra)
            elif mode == "unshare":
                payload["jail"] = {"plan": self._jail_plan, "stage": _host.stage_dir(_host.exposed_dirs()), "uid": uid,
                                   "cgroups": cgroup.procs_files if cgroup else [],
                                   "seccomp": self.seccomp.hex() if self.seccomp else None}
                argv = ["setpriv", "--pdeathsig=KILL", "--", "unshare", "--fork", "--pid", "--mount", "--net", "--ipc",
                        "--uts", "--cgroup", "--kill-child", "--", self.python, "-I", "-S", self._harness, str(job_fd),
                        _host.owner_tag()]
            else:
                payload["cwd"] = tempfile.mkdtemp(prefix="dllm-sbx-")
                argv = [self.python, "-I", "-S", self._harness, str(job_fd), _host.owner_tag()]
            os.write(job_fd, json.dumps(payload).encode())
            os.lseek(job_fd, 0, os.SEEK_SET)
            proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=_host.minimal_env(), cwd="/",
                                    pass_fds=(job_fd, _host.lifeline(), *fds, *child_fds), start_new_session=True,
                                    close_fds=True, **kwargs)
        except BaseException:
            for fd in handshake or ():
                os.close(fd)
            if cgroup:
                self.cgroups.release(cgroup)
            if uid is not None:
                self.uids.release(uid)
            raise
        finally:
            for fd in (job_fd, *child_fds):
                os.close(fd)
        return _Handle(proc, cgroup, uid, payload.get("cwd"), handshake)

    def _release(self, h: _Handle, deadline: float) -> None:
        """bwrap has cloned the sandbox and waits: put bwrap and the sandbox's first process in the
        cgroup (everything the sandbox starts later is born there), then let it run."""
        if h.handshake is None:
            return
        info_r, block_w = h.handshake
        h.handshake = None
        try:
            info = b""
            while b"}" not in info:
                if not select.select([info_r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise OSError("bwrap did not start in time")
                chunk = os.read(info_r, 4096)
                if not chunk:
                    raise OSError("bwrap exited before the sandbox started")
                info += chunk
            child = int(json.loads(info)["child-pid"])
            for procs in h.cgroup.procs_files:  # type: ignore[union-attr]
                for pid in (h.proc.pid, child):
                    with open(procs, "w") as f:
                        f.write(str(pid))
            os.write(block_w, b"1")
        finally:
            os.close(info_r)
            os.close(block_w)

    def _unsafe_packages(self) -> str:
        """Unsafe mode: a folder of links to the allowed packages (the trainer's site-packages
        stays off the path)."""
        def make() -> str:
            d = tempfile.mkdtemp(prefix="dllm-sbx-pkgs-")
            for path, top in self._package_entries:
                os.symlink(path, os.path.join(d, top))
            atexit.register(shutil.rmtree, d, True)
            return d
        return _shared(f"unsafe-packages:{self._package_entries}", make)

    def _limits(self, mode: str) -> dict:
        nproc = self.max_procs if mode != "unsafe" else _nproc_limit(self.max_procs)
        return {"cpu_s": int(math.ceil(self.timeout_s)) + 1, "as_bytes": self.memory_mb << 20,
                "fsize": self.max_file_mb << 20, "nofile": 256, "nproc": nproc, "core": 0, "msgqueue": 0,
                "memlock": 1 << 16}

    def _finish(self, h: _Handle) -> bool:
        """SIGKILL the sandbox and everything in it; wait until it is gone; free its cgroup and uid.
        Returns whether the cgroup saw an OOM kill."""
        kids = _descendants(h.proc.pid)
        try:
            os.killpg(h.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _sigkill(kids)
        if h.cgroup:
            h.cgroup.kill()
        h.proc.wait()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            left = [k for k in kids if _alive(k)] + ([p for p in h.cgroup.pids() if _alive(p)] if h.cgroup else [])
            if not left:
                break
            _sigkill(left)
            time.sleep(0.002)
        else:
            log.warning("sandbox processes still alive 5 s after SIGKILL: %s", left)
        oom = False
        if h.cgroup:
            oom = h.cgroup.oom_killed()
            self.cgroups.release(h.cgroup)
        if h.uid is not None and self.uids is not None:
            self.uids.release(h.uid)
        if h.handshake:
            for fd in h.handshake:
                os.close(fd)
        if h.tmpdir:
            shutil.rmtree(h.tmpdir, ignore_errors=True)
        return oom

    # -- running -----------------------------------------------------------------------------
    def run(self, job: dict, *, stdin: bytes = b"", expected_stdout: str | None = None, timeout_s: float | None = None,
            _mode: str | None = None) -> RunResult:
        """Run one job: ``{"mode": "asserts", "code", "tests"[, "setup"]}``, ``{"mode": "humaneval", "code",
        "test", "entry_point"[, "setup"]}`` or ``{"mode": "stdio", "code"}`` (with `stdin`). ``setup`` is the
        dataset's own code (e.g. HumanEval's prompt), run in both sandboxes: in the candidate's before its
        code, in the tests' before the tests, where its names win over the candidate's. For a stdio job
        with `expected_stdout`, the whole output is compared with it as it streams in
        (`RunResult.stdout_match`; lines right-stripped, CRLF as LF, trailing empty lines ignored)."""
        mode = _mode or self.mode
        timeout = float(timeout_s or self.timeout_s)
        t0 = time.monotonic()
        result = RunResult()
        handles: list[_Handle] = []
        out_r, out_w = os.pipe()
        res_r = None
        own: list[int] = [out_w]
        try:
            if job["mode"] == "stdio":
                in_fd = os.memfd_create("stdin", 0)
                own.append(in_fd)
                os.write(in_fd, stdin)
                os.lseek(in_fd, 0, os.SEEK_SET)
                handles.append(self._spawn(mode, {"role": "stdio", "code": job["code"]}, stdin=in_fd, stdout=out_w,
                                           stderr=subprocess.DEVNULL, fds=()))
            else:
                c_r, t_w = os.pipe()
                t_r, c_w = os.pipe()
                res_r, res_w = os.pipe()
                own += [c_r, t_w, t_r, c_w, res_w]
                cand = {k: job[k] for k in ("code", "setup", "entry_point") if k in job}
                handles.append(self._spawn(mode, dict(cand, role="candidate", rfd=c_r, wfd=c_w),
                                           stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w, fds=(c_r, c_w)))
                tests = {k: job[k] for k in ("mode", "tests", "test", "entry_point", "setup") if k in job}
                handles.append(self._spawn(mode, dict(tests, role="tests", rfd=t_r, wfd=t_w, result_fd=res_w),
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, fds=(t_r, t_w, res_w)))
            for fd in own:
                os.close(fd)
            own = []
            for h in handles:
                self._release(h, t0 + timeout)
            compare = _StreamCompare(expected_stdout) if job["mode"] == "stdio" and expected_stdout is not None else None
            cap = self.max_output_bytes
            if compare is not None:
                cap = max(cap, 2 * len(expected_stdout.encode("utf-8", "surrogatepass")) + (64 << 10))  # type: ignore[union-attr]
            res = self._collect(result, out_r, res_r, handles[-1].proc, t0, timeout, cap, compare)
            if compare is not None and not result.timed_out and not result.output_exceeded:
                result.stdout_match = compare.result()
        finally:
            for fd in own:
                os.close(fd)
            for h in handles:
                result.oom |= self._finish(h)
            os.close(out_r)
            if res_r is not None:
                os.close(res_r)
        result.returncode = handles[-1].proc.returncode if handles else None
        result.wall_s = time.monotonic() - t0
        if job["mode"] != "stdio":
            n = 1 if job["mode"] == "humaneval" else len(job["tests"])
            result.passed, result.errors, result.setup_error = _verdicts(res, n)
        return result

    def _collect(self, result: RunResult, out_r: int, res_r: int | None, last: subprocess.Popen, t0: float,
                 timeout: float, cap: int, compare: "_StreamCompare | None") -> bytes:
        """Read output (capped at `cap`; fed to `compare`) and result lines until the result pipe
        (or, for stdio, the output) closes, the deadline passes or the output cap is hit."""
        out, res = bytearray(), bytearray()
        total_out = 0
        sel = selectors.DefaultSelector()
        for fd in (out_r, res_r):
            if fd is not None:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
        done_fd = res_r if res_r is not None else out_r
        exited_at = None
        try:
            while done_fd in sel.get_map():
                now = time.monotonic()
                if now - t0 > timeout:
                    result.timed_out = True
                    break
                if exited_at is not None and now - exited_at > 0.5:
                    break  # a pipe still held open by a leftover process: stop waiting
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
                        if compare is not None:
                            compare.feed(chunk)
                    else:
                        res += chunk
                if total_out > cap or len(res) > (16 << 20):
                    result.output_exceeded = True
                    break
                if exited_at is None and last.poll() is not None:
                    exited_at = time.monotonic()
        finally:
            sel.close()
        result.stdout = bytes(out)
        return bytes(res)


def _verdicts(raw: bytes, n: int) -> tuple[list[bool], list[str | None], str | None]:
    """Per test: exactly one well-formed line from the tests' sandbox saying it passed; the
    errors it reported; the setup code's failure, if it reported one."""
    seen: dict[int, bool | None] = {}
    errors: list[str | None] = [None] * n
    setup = None
    for line in raw.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if type(rec) is not dict:
            continue
        if type(rec.get("setup")) is str and setup is None:
            setup = rec["setup"][:500]
        if type(rec.get("t")) is not int or not 0 <= rec["t"] < n:
            continue
        t = rec["t"]
        seen[t] = None if t in seen else rec.get("ok") is True
        if type(rec.get("error")) is str:
            errors[t] = rec["error"][:500]
    return [seen.get(i) is True for i in range(n)], errors, setup


def normalize_output(text: str) -> list[str]:
    """Stdout as compared: lines right-stripped, CRLF as LF, trailing empty lines dropped."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


class _StreamCompare:
    """Compares a program's stdout with the expected text as it streams in (`normalize_output`
    on both sides, line by line), so outputs of any size are compared in full without being kept."""

    def __init__(self, expected: str):
        self.want = normalize_output(expected)
        self.i = 0
        self.ok = True
        self.partial = b""

    def feed(self, chunk: bytes) -> None:
        if not self.ok:
            return
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            self._line(raw)
            if not self.ok:
                return

    def _line(self, raw: bytes) -> None:
        s = raw.decode("utf-8", "replace").rstrip()
        self.ok = s == (self.want[self.i] if self.i < len(self.want) else "")
        self.i += 1

    def result(self) -> bool:
        if self.ok:
            self._line(self.partial)
        return self.ok and self.i >= len(self.want)


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


def _sigkill(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


_SHARED: dict[str, object] = {}
_SHARED_LOCK = threading.Lock()


def _shared(key: str, make):
    """One per trainer process: cgroup setup, uid range, staging namespace, bwrap's help text."""
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = make()
        return _SHARED[key]


def _bwrap_help() -> str:
    return subprocess.run(["bwrap", "--help"], capture_output=True, text=True).stdout


_NPROC_BASE: list[int] = []


def _nproc_limit(extra: int) -> int:
    """Unsafe mode only: RLIMIT_NPROC counts every process of the trainer's uid, so allow what is
    running now plus `extra`."""
    if not _NPROC_BASE:
        uid, n = os.getuid(), 0
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    n += os.stat(f"/proc/{p}").st_uid == uid
                except OSError:
                    pass
        _NPROC_BASE.append(n)
    return _NPROC_BASE[0] + extra
