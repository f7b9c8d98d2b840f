"""Adversarial batch for the code sandbox, on the bwrap path and the unshare path."""

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from rewards.code import CodeReward
from rewards.sandbox import HARNESS, Sandbox, SandboxUnavailable

TESTS = ["assert f(2) == 4", "assert abs(f(3) - 6) < 1e-9"]
GOOD = "def f(x):\n    return 2 * x\n"


def _unavailable(mode: str, error: Exception) -> None:
    """Skip on a developer machine without that sandbox; in CI (which installs bubblewrap and
    runs as root) a missing sandbox is a failure, so the strong path is always exercised."""
    if os.environ.get("CI"):
        pytest.fail(f"{mode} sandbox must be available in CI: {error}")
    pytest.skip(f"{mode} sandbox not available here: {error}")


def _block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def _harness_procs() -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if HARNESS.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                    out.append(int(p))
            except OSError:
                pass
    return out


def _cases(marker: str, port: int, tmp_path: Path) -> dict[str, tuple[str, float]]:
    home_file = Path.home() / f".dllm-sbx-{marker}"
    tmp_file = Path("/tmp") / f"dllm-sbx-{marker}"
    late_file = tmp_path / "late"
    return {
        "good": (_block(GOOD), 1.0),
        "loop_in_function": (_block("def f(x):\n    while True:\n        pass\n"), 0.0),
        "loop_at_import": (_block("while True:\n    pass\n" + GOOD), 0.0),
        "alloc_4gib": (_block("x = bytearray(4 * 1024 ** 3)\n" + GOOD), 0.0),
        "fork_200": (_block(
            "import os, time\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n" + GOOD), 1.0),
        "write_home_and_tmp": (_block(
            f"for p in [{str(home_file)!r}, {str(tmp_file)!r}, {str(tmp_path / 'direct')!r}]:\n"
            "    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n" + GOOD), 1.0),
        "loopback_connect": (_block(
            "import socket\ntry:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    s.sendall(b'leak')\n"
            "except OSError:\n    pass\n" + GOOD), 1.0),
        "kill_parent": (_block(
            "import os, signal\nppid = os.getppid()\nif ppid > 0:\n    os.kill(ppid, signal.SIGKILL)\n"
            f"try:\n    os.kill({os.getpid()}, signal.SIGKILL)\nexcept OSError:\n    pass\n" + GOOD), 1.0),
        "output_2gib": (_block("import sys\nfor _ in range(2048):\n    sys.stdout.write('x' * (1 << 20))\n" + GOOD), 0.0),
        "detached_child": (_block(
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(4)\n"
            f"        open({str(late_file)!r}, 'w').write('late')\n    os._exit(0)\n" + GOOD), 1.0),
        "env_secret": (_block(
            "import os, glob\ndef visible():\n    if any('hunter2' in v for v in os.environ.values()):\n        return True\n"
            "    for p in glob.glob('/proc/*/environ'):\n        try:\n            if b'hunter2' in open(p, 'rb').read():\n"
            "                return True\n        except OSError:\n            pass\n    return False\n"
            "LEAK = visible()\ndef f(x):\n    return 2 * x if not LEAK else -1\n"), 1.0),
        "sys_exit_0": (_block("def f(x):\n    return 0\nimport sys\nsys.exit(0)\n"), 0.0),
        "os_exit_0": (_block("def f(x):\n    return 0\nimport os\nos._exit(0)\n"), 0.0),
        "atexit": (_block("import atexit, os\ndef f(x):\n    return 0\natexit.register(lambda: print('PASSED'))\n"
                          "atexit.register(lambda: os._exit(0))\n"), 0.0),
        "print_passed_and_forge": (_block(
            "import os\ndef f(x):\n    return 0\nprint('PASSED\\nAll tests passed!\\nOK')\n"
            "for fd in range(1, 64):\n    for t in range(2):\n        try:\n"
            "            os.write(fd, ('{\"t\": %d, \"ok\": true, \"asserts\": [[[\"v\", true, true]]]}\\n' % t).encode())\n"
            "        except OSError:\n            pass\n"), 0.0),
        "always_equal": (_block(
            "class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n        return False\n"
            "    def __bool__(self):\n        return True\n    def __sub__(self, o):\n        return 0\n"
            "    def __lt__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
            "def f(x):\n    return A()\n"), 0.0),
        "patch_builtins": (_block("import builtins\nbuiltins.abs = lambda v: 0\nbuiltins.AssertionError = None\n"
                                  "def f(x):\n    return 2 * x if x == 2 else 0\n"), 0.5),
        "syntax_error": (_block("def f(x)\n    return 2 * x\n"), 0.0),
        "infinite_recursion": (_block("def f(x):\n    return f(x) + 1\n"), 0.0),
        "non_utf8_output": (_block("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x80\\n')\nsys.stdout.flush()\n" + GOOD), 1.0),
        "no_code_block": ("The function doubles its input: f(x) = 2x.", 0.0),
    }


@pytest.mark.parametrize("mode", ["bwrap", "unshare"])
def test_adversarial_batch(mode, tmp_path, monkeypatch, caplog):
    try:
        reward = CodeReward(mode=mode, timeout_s=3.0, pool_size=4)
    except SandboxUnavailable as e:
        _unavailable(mode, e)
    monkeypatch.setenv("DLLM_SECRET_TOKEN", "hunter2")
    marker = uuid.uuid4().hex
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    cases = _cases(marker, port, tmp_path)
    names = list(cases)
    t0 = time.monotonic()
    scores = reward([""] * len(names), [cases[n][0] for n in names], tests=[TESTS] * len(names))
    got = dict(zip(names, scores))
    assert got == {n: cases[n][1] for n in names}
    # no process outlives the call, and the host is untouched
    assert _harness_procs() == []
    with pytest.raises(OSError):  # socket.timeout: nothing ever connected
        listener.accept()
    listener.close()
    assert not (Path.home() / f".dllm-sbx-{marker}").exists()
    assert not (Path("/tmp") / f"dllm-sbx-{marker}").exists()
    assert not (tmp_path / "direct").exists()
    time.sleep(max(0.0, 4.5 - (time.monotonic() - t0)))
    assert not (tmp_path / "late").exists()
    assert _harness_procs() == []


@pytest.mark.parametrize("mode", ["bwrap", "unshare"])
def test_stdio_mode(mode):
    try:
        reward = CodeReward(mode=mode, timeout_s=3.0, pool_size=2)
    except SandboxUnavailable as e:
        _unavailable(mode, e)
    progs = {
        "echo_double": ("import sys\nfor line in sys.stdin:\n    print(int(line) * 2)\n", 1.0),
        "half_right": ("n = int(input())\nprint(4 if n == 2 else 0)\n", 0.5),
        "non_utf8": ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe')\n", 0.0),
        "exit_zero_no_output": ("import sys\nsys.exit(0)\n", 0.0),
        "stderr_is_ignored": ("import sys\nprint('noise', file=sys.stderr)\nprint(int(input()) * 2)\n", 1.0),
    }
    names = list(progs)
    scores = reward([""] * len(names), [_block(progs[n][0]) for n in names],
                    inputs=[["2\n", "5\n"]] * len(names), outputs=[["4\n", "10"]] * len(names))
    assert dict(zip(names, scores)) == {n: progs[n][1] for n in names}


def test_refuses_without_isolation(monkeypatch):
    import rewards.sandbox as sb

    monkeypatch.setattr(sb, "_MODE_CACHE", {"bwrap": False, "unshare": False})
    with pytest.raises(SandboxUnavailable, match="unsafe"):
        Sandbox("auto")
    s = Sandbox("auto", unsafe=True, timeout_s=3.0)
    assert s.mode == "unsafe"
    res = s.run({"mode": "asserts", "code": GOOD, "tests": TESTS})
    assert res.passed == [True, True]
    res = s.run({"mode": "asserts", "code": "def f(x):\n    return 0\nimport os\nos._exit(0)\n", "tests": TESTS})
    assert res.passed == [False, False]


def test_mode_is_logged_once(caplog):
    import rewards.sandbox as sb

    sb._LOGGED_MODE.clear()
    with caplog.at_level("INFO", logger="rewards"):
        Sandbox("auto", unsafe=True)
        Sandbox("auto", unsafe=True)
    msgs = [r.getMessage() for r in caplog.records if "sandbox mode" in r.getMessage()]
    assert len(msgs) == 1


def test_plain_data_codec_round_trip():
    from rewards import _harness as h

    values = [None, True, 3, -(1 << 80), 2.5, float("nan"), "s\u00e9", b"\x00\xff", (1, [2, {3: "x"}]), {1, 2},
              frozenset({"a"}), 1 + 2j]
    for v in values:
        d = h.decode(h.encode(v))
        assert type(d) is type(v)
        assert d == v or (isinstance(v, float) and v != v and d != d)

    class Sub(int):
        pass

    assert isinstance(h.decode(h.encode(Sub(3))), h.Opaque)
    assert not h.compare("Eq", h.decode(h.encode(Sub(3))), 3)
    assert h.compare("Eq", (1, 2), (1, 2)) and not h.compare("Eq", (1, 2), [1, 2])
