"""Kernel-level pieces of the code sandbox: the seccomp filter (both backends) and, for the
``unshare`` backend, the namespace view and privilege drop done by the harness as pid 1.

The parent builds the filter with `seccomp_filter` (bwrap loads it with ``--seccomp``); in the
``unshare`` backend `enter` runs inside fresh mount/pid/net/ipc/uts namespaces, as root, before
any untrusted code: it joins the sample's cgroups, marks the sandbox first in line for the OOM
killer, builds a new root from the mount plan (the same plan bwrap gets as arguments), pivots into
it; after the harness has forked the namespace's init, `drop` makes the child the sample's
unprivileged host uid for good (no capabilities, ``no_new_privs``, the filter).

Imports nothing from the package (the harness loads it by path before pivoting).
"""

from __future__ import annotations

import os
import struct

# -- seccomp ------------------------------------------------------------------------------------

# Syscalls the candidate never needs and that would escape the sandbox's accounting or attack the
# kernel: memory outside RLIMIT_AS (memfd, SysV shm/msg), new namespaces (unsized tmpfs, fresh
# capabilities), tracing other processes, kernel-side programs and keyrings, mounts, modules.
_DENY = ("memfd_create", "memfd_secret", "shmget", "msgget", "userfaultfd", "perf_event_open", "bpf",
         "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key", "request_key", "ptrace",
         "process_vm_readv", "process_vm_writev", "kexec_load", "kexec_file_load", "init_module", "finit_module",
         "delete_module", "mount", "umount2", "pivot_root", "swapon", "swapoff", "reboot", "setns", "unshare",
         "open_by_handle_at", "name_to_handle_at", "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree",
         "mount_setattr", "chroot", "acct", "quotactl", "syslog", "vhangup", "lookup_dcookie", "fanotify_init",
         "kcmp")
_NR = {
    "x86_64": (0xC000003E, dict(
        memfd_create=319, memfd_secret=447, shmget=29, msgget=68, userfaultfd=323, perf_event_open=298, bpf=321,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, keyctl=250, add_key=248, request_key=249,
        ptrace=101, process_vm_readv=310, process_vm_writev=311, kexec_load=246, kexec_file_load=320,
        init_module=175, finit_module=313, delete_module=176, mount=165, umount2=166, pivot_root=155, swapon=167,
        swapoff=168, reboot=169, setns=308, unshare=272, open_by_handle_at=304, name_to_handle_at=303, fsopen=430,
        fsmount=432, fsconfig=431, move_mount=429, open_tree=428, mount_setattr=442, chroot=161, acct=163,
        quotactl=179, syslog=103, vhangup=153, lookup_dcookie=212, fanotify_init=300, kcmp=312, clone=56,
        clone3=435, prctl=157)),
    "aarch64": (0xC00000B7, dict(
        memfd_create=279, memfd_secret=447, shmget=194, msgget=186, userfaultfd=282, perf_event_open=241, bpf=280,
        io_uring_setup=425, io_uring_enter=426, io_uring_register=427, keyctl=219, add_key=217, request_key=218,
        ptrace=117, process_vm_readv=270, process_vm_writev=271, kexec_load=104, kexec_file_load=294,
        init_module=105, finit_module=273, delete_module=106, mount=40, umount2=39, pivot_root=41, swapon=224,
        swapoff=225, reboot=142, setns=268, unshare=97, open_by_handle_at=265, name_to_handle_at=264, fsopen=430,
        fsmount=432, fsconfig=431, move_mount=429, open_tree=428, mount_setattr=442, chroot=51, acct=89,
        quotactl=60, syslog=116, vhangup=58, lookup_dcookie=18, fanotify_init=262, kcmp=272, clone=220,
        clone3=435, prctl=167)),
}
_CLONE_NS = 0x7E020080  # CLONE_NEW{NS,CGROUP,UTS,IPC,USER,PID,NET,TIME}
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """The BPF program (``struct sock_filter[]``) for this machine, or None if its syscall table is
    unknown here. Denied calls fail with EPERM; ``clone3`` with ENOSYS (libc falls back to
    ``clone``, whose namespace flags are checked); ``prctl(PR_SET_DUMPABLE)`` may only clear the
    flag; another architecture's ABI kills the process."""
    entry = _NR.get(machine or os.uname().machine)
    if entry is None:
        return None
    arch, nr = entry
    # (label, code, jump-if-true, jump-if-false, k); jumps name a label or skip n instructions
    prog: list[tuple] = [(None, _LD_ABS, 0, 0, 4), (None, _JEQ, 1, 0, arch), (None, _RET, 0, 0, _KILL),
                         (None, _LD_ABS, 0, 0, 0)]
    if arch == 0xC000003E:
        prog.append((None, _JGE, "deny", 0, 0x40000000))  # the x32 ABI
    prog += [(None, _JEQ, "deny", 0, nr[name]) for name in _DENY]
    prog += [(None, _JEQ, "enosys", 0, nr["clone3"]), (None, _JEQ, "clone", 0, nr["clone"]),
             (None, _JEQ, "prctl", "allow", nr["prctl"]),
             # prctl(PR_SET_DUMPABLE, 0) only: the harness makes itself undumpable, nobody undoes it
             ("prctl", _LD_ABS, 0, 0, 16), (None, _JEQ, 0, "allow", 4), (None, _LD_ABS, 0, 0, 24),
             (None, _JEQ, "allow", "deny", 0),
             ("clone", _LD_ABS, 0, 0, 16), (None, _JSET, "deny", "allow", _CLONE_NS),
             ("allow", _RET, 0, 0, _ALLOW), ("deny", _RET, 0, 0, _ERRNO | _EPERM),
             ("enosys", _RET, 0, 0, _ERRNO | _ENOSYS)]
    labels = {ins[0]: i for i, ins in enumerate(prog) if ins[0]}
    out = bytearray()
    for i, (_, code, jt, jf, k) in enumerate(prog):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)


def load_seccomp(prog: bytes) -> None:
    """Install `prog` on the calling thread (needs ``no_new_privs`` or CAP_SYS_ADMIN)."""
    import ctypes

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc().prctl(22, 2, ctypes.byref(fprog), 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# -- namespace view (unshare backend) -------------------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_DEVICES = ("null", "zero", "full", "random", "urandom")
_LIBC = []


def _libc():
    if not _LIBC:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _LIBC.append(libc)
    return _LIBC[0]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc().mount(enc(src), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def _bind_ro(src: str, target: str) -> None:
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(src, target, None, _MS_BIND)
    _mount(None, target, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _tmpfs(target: str, size: int, mode: int, ro: bool = False) -> None:
    os.makedirs(target, exist_ok=True)
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={size},nr_inodes={max(64, size >> 12)},mode={mode:o}")
    if ro:
        _mount(None, target, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def _dev(target: str) -> None:
    _tmpfs(target, 1 << 16, 0o755)
    for name in _DEVICES:
        open(f"{target}/{name}", "a").close()
        _mount(f"/dev/{name}", f"{target}/{name}", None, _MS_BIND)
    for name, dst in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                      ("stderr", "/proc/self/fd/2")):
        os.symlink(dst, f"{target}/{name}")
    os.mkdir(f"{target}/shm")


def build_root(plan: list[list], stage: str) -> None:
    """Build the sandbox's root on a tmpfs at `stage` from `plan` and pivot into it.

    Plan entries (shared with the bwrap command line): ``["ro", src, dst]``, ``["symlink", target,
    dst]``, ``["tmpfs", dst, size, mode, ro]``, ``["proc", dst]``, ``["dev", dst]``,
    ``["remount-ro", dst]``; ``["data", ...]`` is bwrap-only (the harness is already loaded here).
    """
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _tmpfs(stage, 1 << 20, 0o755)
    for op in plan:
        kind = op[0]
        dst = stage + (op[2] if kind in ("ro", "symlink") else op[1])
        if kind == "ro":
            _bind_ro(op[1], dst)
        elif kind == "symlink":
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(op[1], dst)
        elif kind == "tmpfs":
            _tmpfs(dst, int(op[2]), int(op[3]), bool(op[4]))
        elif kind == "proc":
            os.makedirs(dst, exist_ok=True)
            _mount("proc", dst, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        elif kind == "dev":
            _dev(dst)
        elif kind == "remount-ro" and op[1] != "/":
            _mount(None, dst, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID)
    os.chdir(stage)
    _check(_libc().syscall(_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(_libc().umount2(b".", 2), "umount old root")  # MNT_DETACH
    os.chdir("/")
    _mount(None, "/", None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)


def enter(jail: dict) -> None:
    """As root, pid 1 of fresh namespaces: join the sample's cgroups, go first in line for the OOM
    killer, build the view and pivot into it. The harness then forks its init and calls `drop`."""
    for procs in jail.get("cgroups", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    _libc().sethostname(b"sandbox", 7)
    build_root(jail["plan"], jail["stage"])


def drop(jail: dict) -> None:
    """Become the sample's unprivileged uid for good: no capabilities (bounding set included),
    ``no_new_privs``, the seccomp filter."""
    for cap in range(64):
        _libc().prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
    uid = int(jail["uid"])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # root -> uid: every capability is gone
    _check(_libc().prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if jail.get("seccomp"):
        load_seccomp(bytes.fromhex(jail["seccomp"]))
