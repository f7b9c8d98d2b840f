"""Privilege and view: the candidate runs as a non-root host uid without capabilities, sees only
the interpreter, its standard library and private scratch space, and reaches no host socket, on
both backends, with the trainer running as root (as in CI)."""

import json
import os
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.sandbox import MODES, code_reward

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import glob, json, os, socket, sys
out = {}
def attempt(name, fn):
    try:
        out[name] = ["ok", repr(fn())[:200]]
    except BaseException as e:
        out[name] = ["err", type(e).__name__]
if COMM:  # so the host can find this process (PR_SET_NAME)
    import ctypes
    ctypes.CDLL(None).prctl(15, COMM.encode(), 0, 0, 0)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
out["caps"] = [status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")]
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["seccomp"] = status["Seccomp"].strip()
out["top"] = sorted(os.listdir("/"))
out["etc"] = sorted(os.listdir("/etc"))
out["tmp"] = sorted(os.listdir("/tmp"))
out["shm"] = sorted(os.listdir("/dev/shm"))
out["exists"] = {p: os.path.lexists(p) for p in PATHS}
out["site"] = [sorted(os.listdir(p)) for p in SITE if os.path.isdir(p)]
out["cmdlines"] = [open(p, "rb").read().decode("latin-1") for p in glob.glob("/proc/[0-9]*/cmdline")]
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("init_environ", lambda: open("/proc/1/environ", "rb").read())
for i, path in enumerate(SOCKETS):
    attempt(f"unix{i}", lambda: socket.socket(socket.AF_UNIX).connect(path))
attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect("\0" + ABSTRACT))
attempt("write_usr", lambda: open("/usr/dllm-sbx", "w"))
attempt("write_root", lambda: open("/dllm-sbx", "w"))
attempt("write_python", lambda: open(sys.prefix + "/dllm-sbx", "w"))
attempt("write_scratch", lambda: open("/tmp/mine", "w").write("x"))
attempt("unshare_user", lambda: os.system("unshare -U -r true") or os.waitstatus_to_exitcode(0))
attempt("setuid_root", lambda: os.setuid(0))
attempt("ptrace_init", lambda: open("/proc/1/mem", "rb").read(1))
if MARK:
    open("/tmp/" + MARK, "w").write("x")
    open("/dev/shm/" + MARK, "w").write("x")
import time
time.sleep(SLEEP)
out["tmp_after"] = sorted(os.listdir("/tmp"))
out["shm_after"] = sorted(os.listdir("/dev/shm"))
print(json.dumps(out))
'''


def _probe(reward, paths: list[str], sockets: list[str], abstract: str, mark: str = "", sleep: float = 0.0,
           comm: str = "") -> dict:
    site = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    prelude = (f"PATHS = {paths!r}\nSITE = {site!r}\nSOCKETS = {sockets!r}\nABSTRACT = {abstract!r}\n"
               f"MARK = {mark!r}\nSLEEP = {sleep!r}\nCOMM = {comm!r}\n")
    res = reward.sandbox.run({"mode": "stdio", "code": prelude + PROBE})
    assert not res.timed_out, res
    return json.loads(res.stdout)


def _find_comm(comm: str, future) -> str:
    """/proc/<pid>/status, seen from the host, of the sandboxed process that named itself `comm`."""
    while not future.done():
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and Path(f"/proc/{p}/comm").read_text().strip() == comm:
                    oom = Path(f"/proc/{p}/oom_score_adj").read_text().strip()
                    return Path(f"/proc/{p}/status").read_text() + f"OomScoreAdj:\t{oom}\n"
            except OSError:
                pass
    future.result()
    raise AssertionError("the probe finished before the host saw it")


@pytest.mark.parametrize("mode", MODES)
def test_unprivileged_minimal_view(mode, shared_data, tmp_path):
    reward = code_reward(mode, timeout_s=10.0)
    marker = f"dllm-sbx-{uuid.uuid4().hex}"
    host_tmp = Path("/tmp") / marker
    host_tmp.write_text("host file")
    abstract = f"dllm-sbx-{uuid.uuid4().hex}"
    servers, sockets = [], []
    for where in (tmp_path, Path("/tmp")):  # e.g. wandb's service socket lives in /tmp
        path = str(where / f"{marker[:20]}.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.listen(1)
        servers.append(s)
        sockets.append(path)
    s = socket.socket(socket.AF_UNIX)
    s.bind("\0" + abstract)
    s.listen(1)
    servers.append(s)
    hidden = [str(ROOT), str(shared_data.resolve()), str(tmp_path), "/home", "/run", "/var", "/opt", "/sys", "/work",
              "/etc/passwd", "/etc/shadow", str(Path.home() / ".bash_history"), str(host_tmp)]
    comm = uuid.uuid4().hex[:15]
    try:
        with ThreadPoolExecutor(1) as ex:
            future = ex.submit(_probe, reward, hidden, sockets, abstract, "", 3.0, comm)
            host_view = _find_comm(comm, future)
            got = future.result()
    finally:
        for s in servers:
            s.close()
        host_tmp.unlink()
        for p in sockets:
            os.unlink(p)
    # a non-root uid on the host (real, effective, saved, filesystem), no capabilities, no way to gain any
    uids = next(ln.split()[1:] for ln in host_view.splitlines() if ln.startswith("Uid:"))
    assert "0" not in uids and len(set(uids)) == 1, host_view
    assert "OomScoreAdj:\t1000\n" in host_view  # the OOM killer takes a sandbox before the trainer
    assert got["caps"] == ["0000000000000000"] * 4
    assert got["no_new_privs"] == "1" and got["seccomp"] == "2"
    assert got["setuid_root"][0] == "err" and got["unshare_user"] != ["ok", "0"]
    assert got["shadow"][0] == "err" and got["init_environ"][0] == "err" and got["ptrace_init"][0] == "err"
    # no host socket, path or abstract
    assert [got[f"unix{i}"][0] for i in range(len(sockets))] == ["err"] * len(sockets)
    assert got["abstract"][0] == "err"
    # the view: interpreter + system libraries read-only, private scratch, nothing of the host
    assert set(got["top"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "sbx", "tmp",
                               "usr", *Path(sys.base_prefix).resolve().parts[1:2]}
    assert got["etc"] in ([], ["ld.so.cache"])
    assert got["tmp"] == [] and got["shm"] == []
    assert got["exists"] == {p: False for p in hidden}
    assert all(entries == [] for entries in got["site"])
    assert [got[k][0] for k in ("write_usr", "write_root", "write_python")] == ["err"] * 3
    assert got["write_scratch"][0] == "ok"
    assert not any("pytest" in c or str(os.getpid()) in c.split("\0") for c in got["cmdlines"])


@pytest.mark.parametrize("mode", MODES)
def test_samples_do_not_see_each_other(mode):
    reward = code_reward(mode, timeout_s=10.0)
    mark = f"dllm-sbx-{uuid.uuid4().hex}"
    with ThreadPoolExecutor(2) as ex:
        writer = ex.submit(_probe, reward, [], [], "x", mark, 2.0)
        reader = ex.submit(_probe, reward, [], [], "x", "", 1.0)
        w, r = writer.result(), reader.result()
    assert mark in w["tmp_after"] and mark in w["shm_after"]
    assert mark not in r["tmp_after"] and mark not in r["shm_after"]
    assert not any(mark in c for c in r["cmdlines"])


PACKAGES_PROBE = (
    "import importlib.util, json, os\n"
    "out = {'numpy': None, 'others': [n for n in ('torch', 'pytest', 'yaml', 'transformers') if importlib.util.find_spec(n)],\n"
    "       'pkgs': sorted(os.listdir('/sbx/pkgs')) if os.path.isdir('/sbx/pkgs') else None}\n"
    "try:\n    import numpy\n    out['numpy'] = int(numpy.arange(4).sum())\nexcept ImportError:\n    pass\n"
    "print(json.dumps(out))\n")


@pytest.mark.parametrize("mode", MODES)
def test_allowed_packages_only(mode):
    """The allow-list (`packages`, default numpy) is visible read-only in the sandbox; the rest of
    the trainer's site-packages stays hidden; an empty list hides numpy too."""
    reward = code_reward(mode, timeout_s=10.0)
    got = json.loads(reward.sandbox.run({"mode": "stdio", "code": PACKAGES_PROBE}).stdout)
    assert got == {"numpy": 6, "others": [], "pkgs": ["numpy", "numpy.libs"]}
    write = reward.sandbox.run({"mode": "stdio", "code": "import numpy, os\ntry:\n    open(os.path.join(os.path.dirname("
                                                          "numpy.__file__), 'x'), 'w')\n    print('wrote')\n"
                                                          "except OSError:\n    print('read-only')\n"})
    assert write.stdout == b"read-only\n"
    bare = code_reward(mode, timeout_s=10.0, packages=[])
    got = json.loads(bare.sandbox.run({"mode": "stdio", "code": PACKAGES_PROBE}).stdout)
    assert got == {"numpy": None, "others": [], "pkgs": None}
