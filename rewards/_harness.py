"""In-sandbox test harness for `rewards.code` (runs as ``python -I _harness.py JOB_FD``).

It is started by `rewards.sandbox.Sandbox` inside bubblewrap/unshare namespaces. It reads its
job (code, tests, limits, a per-run nonce) from the memfd ``JOB_FD``, closes it, applies
rlimits, then runs the candidate and the tests. For every test it writes one record
``<nonce> <json>\\n`` to the result pipe; the json holds plain-data *leaves*: the serialized
operands of every comparison an ``assert`` evaluated, and the truth value claimed for it.
The trusted parent re-decodes every leaf and recomputes each comparison itself
(`verify_record`), so a candidate object whose ``__eq__`` always says True cannot pass: it
serializes to an opaque marker that equals nothing.

This module is also imported by the parent for the shared plain-data codec
(`encode` / `decode` / `compare`); it must not import anything from the package.
"""

from __future__ import annotations

import ast
import builtins
import json
import math
import operator
import os
import resource
import sys
import types

MAX_DEPTH = 64
MAX_ITEMS = 200_000
MAX_LEAF_CHARS = 8 << 20  # per test: serialized operands kept for the parent

# ---------------------------------------------------------------------------------------------
# plain-data codec (shared with the parent)
# ---------------------------------------------------------------------------------------------


class _TooBig(Exception):
    pass


def encode(x, _depth: int = 0, _budget: list | None = None):
    """Serialize builtin plain data (exact types only, no subclasses) to JSON-able tagged lists.

    Anything else (user classes, subclasses of int/str/..., generators) becomes ``["X", type]``.
    """
    if _budget is None:
        _budget = [MAX_ITEMS]
    _budget[0] -= 1
    if _budget[0] < 0 or _depth > MAX_DEPTH:
        raise _TooBig
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -(1 << 53) < x < (1 << 53) else ["I", hex(x)]
    if t is float:
        return x if math.isfinite(x) else ["F", repr(x)]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "L", tuple: "T", set: "S", frozenset: "Z"}[t]
        return [tag, [encode(v, _depth + 1, _budget) for v in x]]
    if t is dict:
        return ["D", [[encode(k, _depth + 1, _budget), encode(v, _depth + 1, _budget)] for k, v in x.items()]]
    if t is bytes:
        return ["B", x.hex()]
    if t is complex:
        return ["C", repr(x.real), repr(x.imag)]
    return ["X", t.__name__ if isinstance(t.__name__, str) else "?"]


def safe_encode(x):
    try:
        return encode(x)
    except _TooBig:
        return ["X", "too large"]
    except RecursionError:
        return ["X", "too deep"]


class Opaque:
    """Decoded stand-in for a value that was not plain data: equals nothing, is falsy."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __eq__(self, other):
        return False

    def __ne__(self, other):
        return True

    def __bool__(self):
        return False

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<opaque {self.name}>"


def decode(e, _depth: int = 0):
    """Inverse of `encode`; raises ValueError on malformed input."""
    if _depth > MAX_DEPTH + 1:
        raise ValueError("too deep")
    if e is None or type(e) in (bool, int, float, str):
        return e
    if type(e) is not list or not e or type(e[0]) is not str:
        raise ValueError("malformed leaf")
    tag = e[0]
    if tag in ("L", "T", "S", "Z"):
        items = [decode(v, _depth + 1) for v in e[1]]
        return {"L": list, "T": tuple, "S": set, "Z": frozenset}[tag](items)
    if tag == "D":
        return {decode(k, _depth + 1): decode(v, _depth + 1) for k, v in e[1]}
    if tag == "I":
        return int(e[1], 16)
    if tag == "F":
        return float(e[1])
    if tag == "B":
        return bytes.fromhex(e[1])
    if tag == "C":
        return complex(float(e[1]), float(e[2]))
    if tag == "X":
        return Opaque(str(e[1]))
    raise ValueError(f"unknown tag {tag!r}")


_OPS = {
    "Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le,
    "Gt": operator.gt, "GtE": operator.ge, "Is": operator.is_, "IsNot": operator.is_not,
    "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
}


def compare(op: str, a, b) -> bool:
    """Apply a comparison to decoded plain values; anything but a real ``True`` is False."""
    if op in ("Is", "IsNot"):  # identity is only meaningful for singletons after a round trip
        same = (a is b) if (a is None or type(a) is bool or b is None or type(b) is bool) else False
        return same if op == "Is" else not same
    try:
        return _OPS[op](a, b) is True
    except Exception:
        return False


def truth(v) -> bool:
    try:
        return bool(v)
    except Exception:
        return False


def verify_record(rec: dict, min_asserts: int) -> bool:
    """Parent side: a test passes iff the harness says ok, at least `min_asserts` asserts ran,
    and every leaf's claimed truth value equals the one recomputed from its plain data."""
    if rec.get("ok") is not True:
        return False
    groups = rec.get("asserts")
    if type(groups) is not list or len(groups) < min_asserts:
        return False
    try:
        for leaves in groups:
            if type(leaves) is not list or not leaves:
                return False
            for leaf in leaves:
                if leaf[0] == "c":
                    _, ea, op, eb, claimed = leaf
                    if op not in _OPS or compare(op, decode(ea), decode(eb)) is not claimed:
                        return False
                elif leaf[0] == "v":
                    _, ev, claimed = leaf
                    if truth(decode(ev)) is not claimed:
                        return False
                else:
                    return False
    except (ValueError, TypeError, IndexError, KeyError, RecursionError, OverflowError):
        return False
    return True


def count_asserts(src: str) -> int:
    """Number of `assert` statements at module level of a test snippet (each must execute)."""
    try:
        return sum(isinstance(n, ast.Assert) for n in ast.parse(src).body)
    except SyntaxError:
        return 0


# ---------------------------------------------------------------------------------------------
# assert instrumentation (runs in the sandbox)
# ---------------------------------------------------------------------------------------------

_BEGIN, _CMP, _VAL = "__dllm_begin__", "__dllm_cmp__", "__dllm_val__"


class _Instrument(ast.NodeTransformer):
    """``assert E, msg`` -> ``__begin__(); if not T(E): raise AssertionError`` where T routes
    every comparison / truth test through recorders that compare plain-data copies."""

    def visit_Assert(self, node: ast.Assert):
        begin = ast.Expr(ast.Call(ast.Name(_BEGIN, ast.Load()), [], []))
        check = ast.If(
            test=ast.UnaryOp(ast.Not(), self._truth(self.visit(node.test))),
            body=[ast.Raise(ast.Call(ast.Name("AssertionError", ast.Load()), [], []), None)],
            orelse=[],
        )
        return [ast.copy_location(begin, node), ast.copy_location(check, node)]

    def _truth(self, e: ast.expr) -> ast.expr:
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
            return ast.UnaryOp(ast.Not(), self._truth(e.operand))
        if isinstance(e, ast.BoolOp):
            return ast.BoolOp(e.op, [self._truth(v) for v in e.values])
        if isinstance(e, ast.Compare):
            args: list[ast.expr] = [e.left]
            for i, (op, comp) in enumerate(zip(e.ops, e.comparators)):
                args.append(ast.Constant(type(op).__name__))
                # later operands of a chain stay lazy, as in Python's own evaluation order
                args.append(comp if i == 0 else ast.Lambda(_no_args(), comp))
            return ast.Call(ast.Name(_CMP, ast.Load()), args, [])
        return ast.Call(ast.Name(_VAL, ast.Load()), [e], [])


def _no_args() -> ast.arguments:
    return ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])


def instrument(src: str, filename: str):
    tree = _Instrument().visit(ast.parse(src, filename))
    return compile(ast.fix_missing_locations(tree), filename, "exec")


class _AbortTest(BaseException):
    pass


def _make_recorders():
    state = {"groups": [], "chars": 0}

    def begin():
        state["groups"].append([])

    def _leaf(leaf, size):
        state["chars"] += size
        if state["chars"] > MAX_LEAF_CHARS:
            raise _AbortTest("leaf budget exceeded")
        if not state["groups"]:
            state["groups"].append([])
        state["groups"][-1].append(leaf)

    def cmp(a, *rest):
        ea = safe_encode(a)
        pa = decode(ea)
        for i in range(0, len(rest), 2):
            op, b = rest[i], rest[i + 1]
            if i:
                b = b()
            eb = safe_encode(b)
            pb = decode(eb)
            r = compare(op, pa, pb)
            _leaf(["c", ea, op, eb, r], len(repr(ea)) + len(repr(eb)))
            if not r:
                return False
            ea, pa = eb, pb
        return True

    def val(v):
        ev = safe_encode(v)
        r = truth(decode(ev))
        _leaf(["v", ev, r], len(repr(ev)))
        return r

    return state, begin, cmp, val


def _plain_returning(fn):
    """Wrap a candidate function so test code only ever sees plain-data copies of its results."""

    def wrapper(*args, **kwargs):
        return decode(safe_encode(fn(*args, **kwargs)))

    wrapper.__name__ = getattr(fn, "__name__", "candidate")
    return wrapper


# ---------------------------------------------------------------------------------------------
# sandbox setup for the `unshare` path (we are root in fresh mount/pid/net namespaces)
# ---------------------------------------------------------------------------------------------

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18


def _mount(libc, src, target, fstype, flags, data=None):
    if libc.mount(src, target.encode(), fstype, flags, data) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _setup_unshare(setup: dict) -> None:
    """Private tmpfs over every world-writable dir and $HOME (re-exposing the interpreter),
    best-effort read-only remount of the rest, then drop to an unprivileged uid."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
    _mount(libc, b"tmpfs", "/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=64m,mode=1777")
    stage = []
    for i, keep in enumerate(setup.get("expose", [])):
        s = f"/tmp/.stage{i}"
        os.mkdir(s)
        _mount(libc, keep.encode(), s, None, _MS_BIND | _MS_REC)
        stage.append((s, keep))
    for d in setup.get("hide", []):
        if os.path.isdir(d):
            _mount(libc, b"tmpfs", d, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=64m,mode=1777")
    for s, keep in stage:
        os.makedirs(keep, exist_ok=True)
        _mount(libc, s.encode(), keep, None, _MS_MOVE)
        os.rmdir(s)
    skip = set(setup.get("hide", [])) | {"/tmp"} | {k for _, k in stage}
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in points:
        mp = mp.encode().decode("unicode_escape")
        if mp in skip or mp == "/proc" or mp.startswith("/proc/"):
            continue
        try:
            _mount(libc, None, mp, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID)
        except OSError:
            pass  # not every mount can be remounted; the uid drop below still protects it
    for d in ("/tmp", *setup.get("hide", [])):
        os.chmod(d, 0o1777)
    uid = int(setup.get("uid", 65534))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)  # from root to non-root: all capabilities are dropped
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries from here on


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _apply_limits(lim: dict) -> None:
    for name, key in (("RLIMIT_CPU", "cpu_s"), ("RLIMIT_AS", "as_bytes"), ("RLIMIT_FSIZE", "fsize"),
                      ("RLIMIT_NOFILE", "nofile"), ("RLIMIT_NPROC", "nproc"), ("RLIMIT_CORE", "core")):
        if lim.get(key) is not None:
            v = int(lim[key])
            try:
                resource.setrlimit(getattr(resource, name), (v, v))
            except (ValueError, OSError):
                soft, hard = resource.getrlimit(getattr(resource, name))
                resource.setrlimit(getattr(resource, name), (min(v, hard), min(v, hard)))


def _make_emitter(fd: int, nonce: bytes):
    write, dumps = os.write, json.dumps

    def emit(obj) -> None:
        data = nonce + b" " + dumps(obj, separators=(",", ":")).encode() + b"\n"
        while data:
            data = data[write(fd, data):]

    return emit


def _run_asserts(job: dict, emit) -> None:
    clean_builtins = dict(vars(builtins))  # snapshot before the candidate can patch anything
    mode = job["mode"]
    ns: dict = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "<solution>", "exec"), ns)
    except BaseException as e:  # SystemExit included: exiting early is a failure
        emit({"load": False, "error": type(e).__name__})
        return
    tns = dict(ns)
    for k, v in ns.items():
        if isinstance(v, types.FunctionType) and v.__globals__ is ns:
            tns[k] = _plain_returning(v)
    state, begin, cmp, val = _make_recorders()
    tns.update({"__builtins__": clean_builtins, _BEGIN: begin, _CMP: cmp, _VAL: val, "__name__": "__test__"})
    if mode == "humaneval":
        tests = [job["test"]]
    else:
        tests = job["tests"]
    for i, src in enumerate(tests):
        state["groups"], state["chars"] = [], 0
        ok, err = True, None
        try:
            exec(instrument(src, f"<test {i}>"), tns)
            if mode == "humaneval":
                ep = job["entry_point"]
                if ep not in ns or not callable(ns[ep]):
                    raise NameError(ep)
                tns["check"](tns[ep])
        except BaseException as e:
            ok, err = False, type(e).__name__
        emit({"t": i, "ok": ok, "error": err, "asserts": state["groups"]})


def main() -> None:
    job_fd = int(sys.argv[1])
    with os.fdopen(job_fd, "rb") as f:
        job = json.loads(f.read())
    if job.get("setup"):
        _setup_unshare(job["setup"])
    os.chdir(job.get("cwd", "/tmp"))
    result_fd = int(job["result_fd"])
    emit = _make_emitter(result_fd, job.pop("nonce").encode())
    keep = sorted({0, 1, 2, result_fd})
    for lo, hi in zip(keep, keep[1:] + [1 << 16]):
        os.closerange(lo + 1, hi)
    _apply_limits(job["limits"])
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    if job["mode"] == "stdio":
        os.close(result_fd)
        ns = {"__name__": "__main__", "__builtins__": builtins}
        code = compile(job["code"], "<solution>", "exec")
        exec(code, ns)
        sys.stdout.flush()
        os._exit(0)
    try:
        _run_asserts(job, emit)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)  # skip candidate atexit hooks; the parent decides from the records


if __name__ == "__main__":
    main()
