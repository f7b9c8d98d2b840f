"""A small process pool with a hard per-item deadline.

`concurrent.futures.ProcessPoolExecutor` cannot cancel one running item, and math-verify's own
timeout uses SIGALRM, which only works on a main thread. Here every item runs on the main
thread of a worker process; a worker that overruns its deadline is SIGKILLed and replaced, and
that item (only) reports a timeout. Workers are fresh interpreters started with `subprocess`
(safe next to threads and torch, and unlike multiprocessing's "spawn" they never re-import the
caller's ``__main__``); they announce readiness after importing their function, so start-up
time never counts against an item.
"""

from __future__ import annotations

import atexit
import importlib
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any

TIMEOUT = "timeout"


def _load(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve(rfd: int, wfd: int, fn_path: str) -> None:
    """Worker entry point (``python -c``): serve items from the pipe until EOF."""
    conn = Connection(rfd, writable=False)
    out = Connection(wfd, readable=False)
    _worker(conn, out, fn_path)


def _worker(conn: Connection, out: Connection, fn_path: str) -> None:
    fn = _load(fn_path)
    out.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        try:
            out.send(("ok", fn(item)))
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            out.send(("err", f"{type(e).__name__}: {e}"[:500]))


class _Worker:
    def __init__(self, fn_path: str):
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
        code = "import sys; from rewards._pool import _serve; _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(to_r), str(from_w), fn_path],
                                     pass_fds=(to_r, from_w), env=env, stdin=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self.send = Connection(to_w, readable=False).send
        self.conn = Connection(from_r, writable=False)
        self._tx = self.send.__self__
        self.ready = False
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()
        self._tx.close()


class TimeoutPool:
    """`map(items)` -> list of ``(status, value)`` with status "ok" | "err" | "timeout"."""

    def __init__(self, fn_path: str, workers: int = 2, timeout_s: float = 5.0):
        self.fn_path, self.n, self.timeout_s = fn_path, max(1, int(workers)), float(timeout_s)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._start_failures = 0
        atexit.register(self.close)

    def _spawn(self) -> _Worker:
        return _Worker(self.fn_path)

    def map(self, items: list[Any]) -> list[tuple[str, Any]]:
        with self._lock:  # one batch at a time per pool
            return self._map(items)

    def _map(self, items: list[Any]) -> list[tuple[str, Any]]:
        while len(self._workers) < self.n:
            self._workers.append(self._spawn())
        out: list[tuple[str, Any] | None] = [None] * len(items)
        todo = list(range(len(items)))[::-1]
        remaining = len(items)
        while remaining:
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.job is None and todo:
                    w.job = todo.pop()
                    w.deadline = now + self.timeout_s
                    w.send(items[w.job])
            conns = {w.conn: w for w in self._workers}
            busy = [w.deadline for w in self._workers if w.job is not None]
            wait_s = max(0.0, min(busy) - now) if busy else 1.0
            for c in wait(list(conns), timeout=min(wait_s, 1.0)):
                w = conns[c]
                try:
                    kind, val = c.recv()
                except (EOFError, OSError):
                    kind, val = "err", "worker died"
                    if not w.ready:
                        self._start_failures += 1
                        if self._start_failures > 3:
                            raise RuntimeError(f"reward worker for {self.fn_path} keeps dying at start-up")
                    self._replace(w)
                if kind == "ready":
                    w.ready = True
                    continue
                if w.job is not None:
                    out[w.job] = (kind, val)
                    w.job = None
                    remaining -= 1
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now > w.deadline:
                    out[w.job] = (TIMEOUT, None)
                    w.job = None
                    remaining -= 1
                    self._replace(w)
        return out  # type: ignore[return-value]

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.kill()
            except Exception:
                pass
        self._workers = []
