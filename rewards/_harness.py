"""In-sandbox side of the code sandbox (``python -I -S _harness.py JOB_FD``); imports nothing from
the package.

Each sandboxed process plays one role, set by the job the parent writes into the memfd JOB_FD:

* ``candidate``: runs the model's code and then only answers requests on its objects (call,
  attribute, iteration, ...) over two pipes. It holds no test, no verdict and no result channel.
* ``tests``: runs the test code in its own interpreter, in another sandbox. Names the candidate
  defined become proxies that make those requests; values come back as plain data (`encode`),
  anything else stays a reference that cannot be compared or used as a truth value. Builtins and
  the dataset's setup code (e.g. HumanEval's prompt, whose helpers such as ``poly`` the tests
  call) win over candidate names. It writes one JSON line per test to the result pipe, which
  only it holds; the parent counts those lines.
* ``stdio``: runs the code as ``__main__`` on stdin; the parent compares stdout.

Before any untrusted code the harness checks that the trainer still lives (the lifeline pipe
reads EOF once it is gone), in the ``unshare`` backend builds the namespace view and drops
privileges (`_jail.enter`), and applies rlimits.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import resource
import select
import sys
import types

MAX_DEPTH = 100
MAX_ITEMS = 1_000_000
MAX_NESTING = 64  # requests in flight at once (callbacks inside calls)
_MUTABLE = (list, dict, set, bytearray)


class CandidateError(Exception):
    """Raised in the tests for an exception the candidate raised that is not a builtin one."""


class ProtocolError(Exception):
    """The peer broke the framing or the encoding (or went away)."""


class _TooBig(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# channel: length-prefixed JSON frames, plain data by value, everything else by reference
# ---------------------------------------------------------------------------------------------


class Remote:
    """An object that lives in the peer process. In the tests (strict) it is not plain data: it can
    be called, have attributes read and be passed back, nothing else (no comparison, truth value,
    length, iteration: the candidate would decide the outcome). In the candidate, objects of the
    tests (functions, iterators they pass in) can be called, iterated and indexed."""

    __slots__ = ("_ch", "_rid", "_tname")

    def __init__(self, ch: "Channel", rid: int, tname: str):
        object.__setattr__(self, "_ch", ch)
        object.__setattr__(self, "_rid", rid)
        object.__setattr__(self, "_tname", tname)

    def _op(self, op: str, *args, **kwargs):
        if self._ch.strict and op not in ("call", "getattr"):
            raise TypeError(f"a {self._tname} from the candidate is not plain data (only calls and attributes reach it)")
        return self._ch.request(op, self._rid, args, kwargs)

    def __call__(self, *args, **kwargs):
        return self._op("call", *args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or not self._ch.peer_getattr:
            raise AttributeError(name)
        return self._op("getattr", name)

    def __setattr__(self, name, value):
        raise AttributeError("remote objects are read-only")

    def __iter__(self):
        return self._op("iter")

    def __next__(self):
        return self._op("next")

    def __len__(self):
        n = self._op("len")
        if type(n) is not int or n < 0:
            raise TypeError("len() of a remote object must be a non-negative int")
        return n

    def __getitem__(self, key):
        return self._op("getitem", key)

    def __contains__(self, item):
        return self._op("contains", item) is True

    def __bool__(self):
        return self._op("bool") is True

    def _no_compare(self, other):
        if self._ch.strict:
            raise TypeError(f"a {self._tname} from the candidate cannot be compared")
        return NotImplemented

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _no_compare
    __hash__ = object.__hash__

    def __repr__(self):
        return f"<remote {self._tname}>"


_PLAIN_TAGS = {list: "L", tuple: "T", set: "S", frozenset: "Z"}
_FROM_TAG = {"L": list, "T": tuple, "S": set, "Z": frozenset}


class Channel:
    """One end of the candidate <-> tests pipes. Plain data (exact builtin types) travels by value;
    any other object is kept in `objects` and sent as a reference ``["R", id, type name]``; the
    peer sends it back as ``["P", id]``. Requests name an op on one of our objects; while we wait
    for an answer we serve the peer's requests (callbacks), up to `MAX_NESTING` deep."""

    def __init__(self, rfd: int, wfd: int, *, strict: bool, ops: frozenset[str], peer_getattr: bool,
                 max_frame: int = 16 << 20):
        self.rfd, self.wfd, self.max_frame = rfd, wfd, max_frame
        self.strict, self.ops, self.peer_getattr = strict, ops, peer_getattr
        self.objects: dict[int, object] = {}
        self._ids: dict[int, int] = {}
        self._depth = 0

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, x, _depth: int = 0, _budget: list | None = None):
        budget = [MAX_ITEMS] if _budget is None else _budget
        budget[0] -= 1
        if budget[0] < 0 or _depth > MAX_DEPTH:
            raise _TooBig
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x if -(1 << 53) < x < (1 << 53) else ["I", hex(x)]
        if t is float:
            return x if x == x and x not in (float("inf"), float("-inf")) else ["F", repr(x)]
        if t in _PLAIN_TAGS:
            return [_PLAIN_TAGS[t], [self.encode(v, _depth + 1, budget) for v in x]]
        if t is dict:
            return ["D", [[self.encode(k, _depth + 1, budget), self.encode(v, _depth + 1, budget)] for k, v in x.items()]]
        if t is bytes or t is bytearray:
            return ["B" if t is bytes else "A", x.hex()]
        if t is complex:
            return ["C", repr(x.real), repr(x.imag)]
        if t is range:
            return ["N", x.start, x.stop, x.step]
        if not self.strict and _is_builtin_iterator(t):
            # the candidate's generators and builtin iterators travel as their items (run here)
            return ["G", [self.encode(v, _depth + 1, budget) for v in _bounded(x, budget)]]
        if t is Remote and x._ch is self:
            return ["P", x._rid]
        rid = self._ids.get(id(x))
        if rid is None:
            rid = self._ids[id(x)] = len(self.objects)
            self.objects[rid] = x
        return ["R", rid, t.__name__ if type(t.__name__) is str else "object"]

    def decode(self, e, _depth: int = 0):
        if _depth > MAX_DEPTH + 1:
            raise ProtocolError("too deep")
        t = type(e)
        if e is None or t is bool or t is int or t is float or t is str:
            return e
        if t is not list or not e or type(e[0]) is not str:
            raise ProtocolError("malformed value")
        tag = e[0]
        if tag in _FROM_TAG:
            return _FROM_TAG[tag](self.decode(v, _depth + 1) for v in e[1])
        if tag == "D":
            return {self.decode(k, _depth + 1): self.decode(v, _depth + 1) for k, v in e[1]}
        if tag == "I":
            return int(e[1], 16)
        if tag == "F":
            return float(e[1])
        if tag in ("B", "A"):
            return (bytes if tag == "B" else bytearray).fromhex(e[1])
        if tag == "C":
            return complex(float(e[1]), float(e[2]))
        if tag == "N":
            return range(*(self.decode(v, _depth + 1) for v in e[1:4]))
        if tag == "G":
            return iter([self.decode(v, _depth + 1) for v in e[1]])
        if tag == "R":
            return Remote(self, int(e[1]), str(e[2])[:100])
        if tag == "P":
            if type(e[1]) is not int or e[1] not in self.objects:
                raise ProtocolError("unknown reference")
            return self.objects[e[1]]
        raise ProtocolError(f"unknown tag {tag[:20]!r}")

    # -- framing -------------------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        if len(data) > self.max_frame:
            raise _TooBig
        data = len(data).to_bytes(4, "big") + data
        while data:
            data = data[os.write(self.wfd, data):]

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.rfd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise ProtocolError("peer closed the channel")
            buf += chunk
        return bytes(buf)

    def recv(self) -> dict:
        n = int.from_bytes(self._read(4), "big")
        if n > self.max_frame:
            raise ProtocolError("frame too large")
        try:
            msg = json.loads(self._read(n))
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"bad frame: {type(e).__name__}") from None
        if type(msg) is not dict:
            raise ProtocolError("bad frame")
        return msg

    # -- requests ------------------------------------------------------------------------------
    def request(self, op: str, rid: int, args: tuple, kwargs: dict):
        if self._depth >= MAX_NESTING:
            raise RecursionError("too many nested calls between tests and candidate")
        try:
            self.send({"op": op, "ref": rid, "args": self.encode(list(args)), "kw": self.encode(kwargs)})
        except _TooBig:
            raise ValueError("arguments too large to send to the candidate") from None
        self._depth += 1
        try:
            while True:
                msg = self.recv()
                if "op" in msg:
                    self.serve(msg)
                    continue
                return self._result(op, msg, args, kwargs)
        finally:
            self._depth -= 1

    def _result(self, op: str, msg: dict, args: tuple, kwargs: dict):
        if "exc" in msg:
            exc = msg["exc"]
            name, text = (str(exc[0])[:100], str(exc[1])[:1000]) if type(exc) is list and len(exc) == 2 else ("?", "")
            cls = getattr(builtins, name, None)
            # StopIteration only ends an iteration: from a call it would silently end the caller's loop
            if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins" and \
                    (op == "next" or not issubclass(cls, (StopIteration, StopAsyncIteration))):
                raise cls(text)
            raise CandidateError(f"{name}: {text}")
        if "ok" not in msg:
            raise ProtocolError("bad reply")
        value = self.decode(msg["ok"])
        # arguments are copies: apply the peer's in-place changes to our mutable ones
        after = msg.get("after")
        if type(after) is list and len(after) == len(args) + len(kwargs):
            for orig, new in zip(list(args) + list(kwargs.values()), after):
                if new is not None and type(orig) in _MUTABLE:
                    _restore(orig, self.decode(new))
        return value

    def serve(self, msg: dict) -> None:
        """Answer one request on one of our objects."""
        try:
            op, rid = msg.get("op"), msg.get("ref")
            if op not in self.ops or type(rid) is not int or rid not in self.objects:
                raise ProtocolError(f"request {str(op)[:20]!r} not allowed")
            args, kwargs = self.decode(msg.get("args")), self.decode(msg.get("kw"))
            if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
                raise ProtocolError("bad arguments")
            value = _apply(op, self.objects[rid], args, kwargs)
            after = [self.encode(a) if type(a) in _MUTABLE else None for a in args + list(kwargs.values())]
            reply = {"ok": self.encode(value), "after": after}
        except BaseException as e:  # noqa: BLE001 - everything goes back as data
            reply = {"exc": [_name(e), _text(e)]}
        try:
            self.send(reply)
        except _TooBig:
            self.send({"exc": ["ValueError", "result too large to send"]})

    def serve_forever(self) -> None:
        while True:
            try:
                msg = self.recv()
            except ProtocolError:
                return
            if "op" in msg:
                self.serve(msg)


def _is_builtin_iterator(t: type) -> bool:
    return t is types.GeneratorType or (getattr(t, "__module__", None) in ("builtins", "itertools")
                                        and hasattr(t, "__next__"))


def _bounded(it, budget: list):
    for v in it:
        if budget[0] <= 0:
            raise _TooBig
        yield v


def _apply(op: str, obj, args: list, kwargs: dict):
    if op == "call":
        return obj(*args, **kwargs)
    if op == "getattr":
        if len(args) != 1 or type(args[0]) is not str:
            raise TypeError("getattr needs one name")
        return getattr(obj, args[0])
    if op == "iter":
        return iter(obj)
    if op == "next":
        return next(obj)
    if op == "len":
        return len(obj)
    if op == "getitem":
        return obj[args[0]]
    if op == "contains":
        return args[0] in obj
    if op == "bool":
        return bool(obj)
    raise ProtocolError(op)


def _restore(orig, new) -> None:
    if type(new) is not type(orig):
        return
    if type(orig) in (list, bytearray):
        orig[:] = new
    else:
        orig.clear()
        orig.update(new)


def _name(e: BaseException) -> str:
    n = type(e).__name__
    return n if type(n) is str else "Exception"


def _text(e: BaseException) -> str:
    try:
        s = str(e)
        return s[:1000] if type(s) is str else ""
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return ""


# ---------------------------------------------------------------------------------------------
# roles
# ---------------------------------------------------------------------------------------------

_CANDIDATE_OPS = frozenset({"call", "getattr", "iter", "next", "len", "getitem", "contains", "bool"})
_TESTS_OPS = frozenset({"call", "iter", "next", "len", "getitem", "contains", "bool"})  # no attributes


def _candidate(job: dict) -> None:
    ch = Channel(job["rfd"], job["wfd"], strict=False, ops=_CANDIDATE_OPS, peer_getattr=False)
    ns: dict = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "<solution>", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 - SystemExit too: leaving early is a failure
        ch.send({"hello": None, "error": _name(e)})
        return
    names = []
    for k, v in list(ns.items()):
        if type(k) is not str or k.startswith("__"):
            continue
        if isinstance(v, types.ModuleType):
            if type(v.__name__) is str:
                names.append([k, ["M", v.__name__], None])
            continue
        try:
            names.append([k, ch.encode(v, _budget=[10_000]), _origin(v)])
        except (_TooBig, RecursionError):
            names.append([k, ch.encode(object()), None])
    ch.send({"hello": names})
    ch.serve_forever()


def _origin(v) -> list | None:
    """(module, qualname) a candidate object claims, if the module is in the standard library."""
    try:
        mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
    except BaseException:  # noqa: BLE001 - a hostile descriptor
        return None
    if type(mod) is str and type(qual) is str and mod.partition(".")[0] in sys.stdlib_module_names:
        return [mod, qual]
    return None


def _stdlib(module: str, qualname: str | None = None):
    """Our own copy of a standard-library module (or an object in it); None if there is none."""
    if module.partition(".")[0] not in sys.stdlib_module_names:
        return None
    try:
        obj = __import__(module, fromlist=["_"])
        for part in (qualname.split(".") if qualname else []):
            obj = getattr(obj, part)
        return obj
    except BaseException:  # noqa: BLE001
        return None


def _test_namespace(ch: Channel, names: list, job: dict, sources: list[str]) -> tuple[dict, object]:
    """The tests' globals: the candidate names the tests mention, then the dataset's setup code,
    then the entry point again. Builtin names never come from the candidate; standard-library
    modules and functions the candidate imported (or claims to have) are our own copies, looked up
    by name; a stdlib module name the tests use as ``name.attr`` is always the real module; the
    rest are proxies (or plain copies)."""
    tns: dict = {"__name__": "__test__", "__builtins__": builtins}
    entry = job.get("entry_point")
    text = "\n".join(sources + [job.get("setup") or ""])
    used = set(re.findall(r"[A-Za-z_]\w*", text)) | {entry}
    for item in names if type(names) is list else []:
        if type(item) is not list or len(item) != 3 or type(item[0]) is not str:
            continue
        name, enc, origin = item
        if name not in used or name.startswith("__") or (hasattr(builtins, name) and name != entry):
            continue
        if type(enc) is list and len(enc) == 2 and enc[0] == "M" or \
                (name != entry and re.search(rf"\b{name}\s*\.", text) and _stdlib(name) is not None):
            real = _stdlib(str(enc[1]) if type(enc) is list and enc[0] == "M" else name)
            if real is not None:
                tns[name] = real
            continue
        if name != entry and type(origin) is list and len(origin) == 2 and all(type(o) is str for o in origin):
            real = _stdlib(*origin)
            if real is not None and callable(real):
                tns[name] = real
                continue
        tns[name] = ch.decode(enc)
    candidate = tns.get(entry) if entry else None
    if job.get("setup"):
        try:
            exec(compile(job["setup"], "<setup>", "exec"), tns)
        except BaseException:  # noqa: BLE001 - fall back to the candidate's helpers
            pass
    if entry:
        if candidate is None:
            tns.pop(entry, None)
        else:
            tns[entry] = candidate
    return tns, candidate


def _tests(job: dict) -> None:
    ch = Channel(job["rfd"], job["wfd"], strict=True, ops=_TESTS_OPS, peer_getattr=True)
    rfd = job["result_fd"]

    def emit(i: int, ok: bool, error: str | None) -> None:
        data = json.dumps({"t": i, "ok": ok, "error": error}).encode() + b"\n"
        while data:
            data = data[os.write(rfd, data):]

    sources = [job["test"]] if job["mode"] == "humaneval" else list(job["tests"])
    try:
        hello = ch.recv()
    except ProtocolError as e:
        hello = {"hello": None, "error": str(e)}
    if hello.get("hello") is None:
        for i in range(len(sources)):
            emit(i, False, f"candidate did not load: {str(hello.get('error'))[:100]}")
        return
    try:
        tns, candidate = _test_namespace(ch, hello["hello"], job, sources)
    except Exception:  # noqa: BLE001 - a malformed hello: every test fails below
        tns, candidate = {"__builtins__": builtins}, None
    for i, src in enumerate(sources):
        ok, err = True, None
        try:
            exec(compile(src, f"<test {i}>", "exec"), tns)
            if job["mode"] == "humaneval":
                if candidate is None:
                    raise NameError(job["entry_point"])
                tns["check"](candidate)
        except BaseException as e:  # noqa: BLE001 - any failure fails this test
            ok, err = False, _name(e)
        emit(i, ok, err)


def _stdio(job: dict) -> None:
    ns = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(job["code"], "<solution>", "exec"), ns)
    finally:
        try:
            sys.stdout.flush()
        finally:
            os._exit(0)


# ---------------------------------------------------------------------------------------------
# start-up
# ---------------------------------------------------------------------------------------------


def _apply_limits(lim: dict) -> None:
    for name, key in (("RLIMIT_CPU", "cpu_s"), ("RLIMIT_AS", "as_bytes"), ("RLIMIT_FSIZE", "fsize"),
                      ("RLIMIT_NOFILE", "nofile"), ("RLIMIT_NPROC", "nproc"), ("RLIMIT_CORE", "core"),
                      ("RLIMIT_MSGQUEUE", "msgqueue"), ("RLIMIT_MEMLOCK", "memlock")):
        if lim.get(key) is None:
            continue
        v = int(lim[key])
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        v = v if hard == resource.RLIM_INFINITY else min(v, hard)
        resource.setrlimit(which, (v, v))


def _undumpable() -> None:
    """/proc/<pid> of ours belongs to root from now on: the candidate cannot lower its
    oom_score_adj, nor open the fds or memory of another process of its uid (our init, or the
    tests in unsafe mode). The seccomp filter forbids setting the flag back."""
    import ctypes

    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


def _fork_init() -> None:
    """We are pid 1 of the sandbox's pid namespace: fork, and stay behind as its init. The init
    holds no descriptor, reaps, and leaves with the child; its exit makes the kernel kill every
    other process of the namespace. It keeps its parent-death signal (set by bwrap
    ``--die-with-parent`` or ``unshare --kill-child``; it never changes uid), and the candidate
    cannot reach it to clear it (undumpable)."""
    child = os.fork()
    if child == 0:
        return
    os.closerange(0, 1 << 16)
    status = 1
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            status = os.waitstatus_to_exitcode(st)
            break
    os._exit(status if 0 <= status < 256 else 1)


def _lifeline_ok(fd: int | None) -> bool:
    """False if the trainer is gone: the pipe's write end lives only in the trainer, so the read
    end hangs up when it dies (data someone wrote into the pipe does not count)."""
    if fd is None:
        return True
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


def main() -> None:
    job_fd = int(sys.argv[1])
    with os.fdopen(job_fd, "rb") as f:
        job = json.loads(f.read())
    if not _lifeline_ok(job.get("lifeline")):
        os._exit(70)
    jail = job.get("jail")
    if jail:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import _jail

        del sys.path[0]
        _jail.enter(jail)
    else:
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # first in line for the OOM killer
        except OSError:
            pass
    _undumpable()
    if job.get("init"):
        _fork_init()
    if jail:
        _jail.drop(jail)
        _undumpable()
    os.chdir(job.get("cwd") or "/tmp")
    keep = sorted({0, 1, 2} | {job[k] for k in ("rfd", "wfd", "result_fd") if job.get(k) is not None})
    for lo, hi in zip(keep, keep[1:] + [1 << 16]):
        os.closerange(lo + 1, hi)
    _apply_limits(job["limits"])
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3000))
    role = {"candidate": _candidate, "tests": _tests, "stdio": _stdio}[job["role"]]
    try:
        role(job)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)  # no atexit hooks; the parent decides from the records


if __name__ == "__main__":
    main()
