"""Host-side facts and helpers of the code sandbox: the filesystem view, sandbox uids, the
lifeline pipe, and the staging namespace that lets an unprivileged uid bind-mount an interpreter
it could not reach on the host (pyenv under /root, say)."""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from rewards import _harness

HARNESS = str(Path(_harness.__file__).resolve())
_LOCK = threading.Lock()
SBX_HARNESS = "/sbx/_harness.pyc"
SBX_PACKAGES = "/sbx/pkgs"  # where allowed packages appear in the sandbox (on its sys.path)
UID_BASE, UIDS_PER_TRAINER = 2_000_000_000, 512
_STAGE_DIRS = ("/media", "/srv", "/mnt", "/run", "/tmp")


def python() -> str:
    """The base interpreter (a venv's python is a link to it or a copy of it)."""
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for p in (os.path.realpath(sys.executable), os.path.join(sys.base_exec_prefix, "bin", ver)):
        if os.path.isfile(p) and p.startswith(os.path.realpath(sys.base_exec_prefix) + "/"):
            return p
    return os.path.realpath(sys.executable)


def exposed_dirs() -> list[str]:
    """System directories plus the interpreter's prefix (read-only in the sandbox)."""
    dirs = [d for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32") if os.path.lexists(d)]
    for d in {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}:
        if not any(d == x or d.startswith(x + "/") for x in dirs):
            dirs.append(d)
    return dirs


def _site_dirs(exposed: list[str]) -> list[str]:
    found = set()
    for pre in {os.path.realpath(sys.base_prefix), "/usr", "/usr/local"}:
        for pat in ("lib/python3*/site-packages", "lib/python3*/dist-packages", "lib/python3/dist-packages"):
            found.update(glob.glob(f"{pre}/{pat}"))
    return sorted(d for d in found if os.path.isdir(d) and not os.path.islink(d)
                  and any(d.startswith(x + "/") for x in exposed))


def package_entries(names) -> tuple[list[str], list[tuple[str, str]]]:
    """The allowed packages found in the trainer's environment, and the files and folders each
    one installed at the top of its site-packages (``numpy/``, ``numpy.libs/``): ``(names found,
    [(host path, name)])``. A package that is not installed, or that is part of the standard
    library, is left out (the sandbox sees the standard library anyway)."""
    import importlib.metadata
    import importlib.util
    import sysconfig

    found: list[str] = []
    entries: dict[str, str] = {}
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"sandbox option packages: {name!r} is not a top-level package name")
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue
        where = list(spec.submodule_search_locations or []) or [spec.origin]
        site = os.path.dirname(os.path.realpath(where[0]))
        if site == stdlib or site.startswith(stdlib + "/"):
            continue
        tops = {os.path.basename(where[0].rstrip("/"))}
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        tops |= {f.parts[0] for f in files if f.parts and f.parts[0] != ".."
                 and not f.parts[0].endswith((".dist-info", ".egg-info"))}
        if os.path.isdir(os.path.join(site, f"{name}.libs")):
            tops.add(f"{name}.libs")
        for top in sorted(tops):
            path = os.path.join(site, top)
            if os.path.exists(path) and top not in entries:
                entries[top] = path
        found.append(name)
    return found, [(path, top) for top, path in entries.items()]


_COMPILED: list[str] = []


def compiled_harness() -> str:
    """A folder holding the harness and `_jail` as bytecode (``_harness.pyc``, ``_jail.pyc``):
    a sandbox runs the harness as a script, and compiling its source would cost every sandbox
    tens of milliseconds. Compiled once per source version into a folder that only this user can
    read (``$TMPDIR/dllm-sbx-code-<uid>/<hash>``; a private temporary folder if that one is not
    ours), written under another name and renamed, so concurrent trainers never see half a file."""
    import hashlib
    import py_compile
    import shutil
    import stat
    import tempfile

    with _LOCK:
        if _COMPILED:
            return _COMPILED[0]
        sources = {name: Path(HARNESS).with_name(f"{name}.py") for name in ("_harness", "_jail")}
        digest = hashlib.sha256(sys.version.encode())
        for src in sources.values():
            digest.update(src.read_bytes())
        base = os.path.join(tempfile.gettempdir(), f"dllm-sbx-code-{os.getuid()}")
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            st = os.lstat(base)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise OSError("not a private folder")
        except OSError:
            base = tempfile.mkdtemp(prefix="dllm-sbx-code-")
        folder = os.path.join(base, digest.hexdigest()[:20])
        if not all(os.path.isfile(os.path.join(folder, f"{name}.pyc")) for name in sources):
            tmp = tempfile.mkdtemp(dir=base)
            for name, src in sources.items():
                py_compile.compile(str(src), cfile=os.path.join(tmp, f"{name}.pyc"), dfile=f"/sbx/{name}.py",
                                   doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            try:
                os.rename(tmp, folder)
            except OSError:  # another trainer was first
                shutil.rmtree(tmp, ignore_errors=True)
        _COMPILED.append(folder)
        return folder


def view_plan(scratch_bytes: int, shm_bytes: int, *, harness_at: str | None = None,
              packages: list[tuple[str, str]] = ()) -> list[list]:
    """The sandbox's filesystem, as ops both backends execute (see `_jail.build_root`): system
    directories and the interpreter read-only with site-packages masked, the allowed packages
    read-only under `SBX_PACKAGES`, /etc/ld.so.cache, a new /proc and minimal /dev, sized tmpfs on
    /tmp and /dev/shm, the rest read-only."""
    plan: list[list] = []
    exposed = exposed_dirs()
    for d in exposed:
        plan.append(["symlink", os.readlink(d), d] if os.path.islink(d) else ["ro", d, d])
    if os.path.isfile("/etc/ld.so.cache"):
        plan.append(["ro", "/etc/ld.so.cache", "/etc/ld.so.cache"])
    plan += [["tmpfs", d, 4096, 0o755, True] for d in _site_dirs(exposed)]
    if harness_at:
        plan.append(["ro", os.path.join(compiled_harness(), "_harness.pyc"), harness_at])
    plan += [["ro", path, f"{SBX_PACKAGES}/{top}"] for path, top in packages]
    plan += [["proc", "/proc"], ["dev", "/dev"], ["tmpfs", "/dev/shm", shm_bytes, 0o1777, False],
             ["tmpfs", "/tmp", scratch_bytes, 0o1777, False], ["remount-ro", "/dev"], ["remount-ro", "/"]]
    return plan


def others_can_read(path: str) -> bool:
    """Whether a uid that owns nothing can reach `path` (every parent searchable, readable)."""
    p = Path(path)
    try:
        for parent in list(p.parents)[:-1] + ([p] if p.is_dir() else []):
            if not parent.stat().st_mode & 0o001:
                return False
        return bool(p.stat().st_mode & 0o004)
    except OSError:
        return False


def stage_dir(sources: list[str]) -> str:
    """An existing directory, not above any of `sources`, to mount a private tmpfs on."""
    for d in _STAGE_DIRS:
        if os.path.isdir(d) and not os.path.islink(d) and not any(s == d or s.startswith(d + "/") for s in sources):
            return d
    raise OSError("no directory to stage the sandbox's bind mounts on")


class Uids:
    """Host uids for sandboxes when the trainer is root: one per live sandbox, from a range no
    account uses (per trainer process), so process limits and file ownership are per sandbox."""

    def __init__(self):
        self.base = UID_BASE + (os.getpid() % 4096) * UIDS_PER_TRAINER
        self._free = list(range(UIDS_PER_TRAINER))
        self._cond = threading.Condition()

    def acquire(self) -> int:
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self.base + self._free.pop()

    def release(self, uid: int) -> None:
        with self._cond:
            self._free.append(uid - self.base)
            self._cond.notify()


def owner_tag(kind: str = "owner") -> str:
    """Last argument of every sandbox command line (ignored by the harness): whose sandbox it is
    (``dllm-sbx-stage=<pid>`` for the trainer's staging helper)."""
    return f"dllm-sbx-{kind}={os.getpid()}"


_LIFELINE: list[int] = []


def lifeline() -> int:
    """Read end of a pipe whose write end only this process holds (children forked without exec
    drop it), so a sandbox can tell whether the trainer still lives."""
    with _LOCK:
        if not _LIFELINE:
            r, w = os.pipe()
            _LIFELINE[:] = [r, w]
            os.register_at_fork(after_in_child=lambda: os.close(w))
        return _LIFELINE[0]


def minimal_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


class Stage:
    """A private mount namespace in which `sources` (paths the sandbox uid cannot reach on the host)
    are bind-mounted under a world-readable directory; bwrap enters it with ``nsenter`` (as root)
    before becoming that uid. One helper process per trainer keeps the namespace alive: it holds
    nothing but the lifeline and exits as soon as the trainer is gone. Restarted if it dies."""

    def __init__(self, sources: list[str], python_exe: str):
        self.sources, self.python = sources, python_exe
        self.dir = stage_dir(sources)
        self.where = {src: f"{self.dir}/{i}" for i, src in enumerate(sources)}
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def namespace(self) -> str:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            return f"/proc/{self._proc.pid}/ns/mnt"  # type: ignore[union-attr]

    def _start(self) -> None:
        q = shlex.quote
        lines = ["set -e", f"mount -t tmpfs -o size=65536,mode=0755 dllm-sbx-stage {q(self.dir)}"]
        for src, dst in self.where.items():
            lines.append(f"mkdir {q(dst)}" if os.path.isdir(src) else f": > {q(dst)}")
            lines.append(f"mount --bind {q(src)} {q(dst)}")
        fd = lifeline()
        wait = "import os, sys\nwhile os.read(int(sys.argv[1]), 4096):\n    pass"  # EOF: the trainer is gone
        lines += ["echo ready", f"exec {q(self.python)} -I -S -c {q(wait)} {fd} {owner_tag('stage')}"]
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", "\n".join(lines)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(fd,), env=minimal_env(), cwd="/", start_new_session=True)
        ready = proc.stdout.readline()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        if ready != b"ready\n":
            err = proc.stderr.read().decode(errors="replace")[-300:]  # type: ignore[union-attr]
            proc.kill()
            proc.wait()
            raise OSError(f"could not stage {self.sources} for the sandbox: {err}")
        proc.stderr.close()  # type: ignore[union-attr]
        self._proc = proc
