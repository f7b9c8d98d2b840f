"""Code sandbox: a mixed adversarial batch and stdin/stdout jobs on both backends; mode selection.
The attack classes have their own files: test_sandbox_verdicts.py (forged passes),
test_sandbox_host.py (privilege and view), test_sandbox_limits.py (resources),
test_sandbox_lifetime.py (trainer killed mid-batch); the channel's value encoding is tested
in-process in test_sandbox_channel.py and the fidelity corpus in test_code_fidelity.py."""

import socket
import time
import uuid
from pathlib import Path

import pytest

from helpers.sandbox import GOOD, MODES, TESTS, code_reward, expected, sandbox_processes, score_cases
from rewards.sandbox import Sandbox, SandboxUnavailable


def _cases(marker: str, port: int, tmp_path: Path) -> dict[str, tuple[str, float]]:
    home_file = Path.home() / f".dllm-sbx-{marker}"
    tmp_file = Path("/tmp") / f"dllm-sbx-{marker}"
    late_file = tmp_path / "late"
    return {
        "good": (GOOD, 1.0),
        "loop_in_function": ("def f(x):\n    while True:\n        pass\n", 0.0),
        "loop_at_import": ("while True:\n    pass\n" + GOOD, 0.0),
        "alloc_4gib": ("x = bytearray(4 * 1024 ** 3)\n" + GOOD, 0.0),
        "fork_200": (
            "import os, time\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n" + GOOD, 1.0),
        "write_home_and_tmp": (
            f"for p in [{str(home_file)!r}, {str(tmp_file)!r}, {str(tmp_path / 'direct')!r}]:\n"
            "    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n" + GOOD, 1.0),
        "loopback_connect": (
            "import socket\ntry:\n"
            f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    s.sendall(b'leak')\n"
            "except OSError:\n    pass\n" + GOOD, 1.0),
        "kill_parent": (
            "import os, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
            "    except OSError:\n        pass\n" + GOOD, 1.0),
        "output_2gib": ("import sys\nfor _ in range(2048):\n    sys.stdout.write('x' * (1 << 20))\n" + GOOD, 0.0),
        "detached_child": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(4)\n"
            f"        open({str(late_file)!r}, 'w').write('late')\n    os._exit(0)\n" + GOOD, 1.0),
        "env_secret": (
            "import os, glob\ndef visible():\n    if any('hunter2' in v for v in os.environ.values()):\n        return True\n"
            "    for p in glob.glob('/proc/*/environ'):\n        try:\n            if b'hunter2' in open(p, 'rb').read():\n"
            "                return True\n        except OSError:\n            pass\n    return False\n"
            "LEAK = visible()\ndef f(x):\n    return 2 * x if not LEAK else -1\n", 1.0),
        "syntax_error": ("def f(x)\n    return 2 * x\n", 0.0),
        "infinite_recursion": ("def f(x):\n    return f(x) + 1\n", 0.0),
        "non_utf8_output": ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x80\\n')\nsys.stdout.flush()\n" + GOOD, 1.0),
    }


@pytest.mark.parametrize("mode", MODES)
def test_adversarial_batch(mode, tmp_path, monkeypatch):
    reward = code_reward(mode, timeout_s=3.0, pool_size=4)
    monkeypatch.setenv("DLLM_SECRET_TOKEN", "hunter2")
    marker = uuid.uuid4().hex
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    cases = _cases(marker, listener.getsockname()[1], tmp_path)
    t0 = time.monotonic()
    assert score_cases(reward, cases) == expected(cases)
    assert reward([""], ["no code block here"], tests=[TESTS]) == [0.0]
    # no process outlives the call, and the host is untouched
    assert sandbox_processes() == []
    with pytest.raises(OSError):  # socket.timeout: nothing ever connected
        listener.accept()
    listener.close()
    assert not (Path.home() / f".dllm-sbx-{marker}").exists()
    assert not (Path("/tmp") / f"dllm-sbx-{marker}").exists()
    assert not (tmp_path / "direct").exists()
    while time.monotonic() - t0 < 4.5:  # the detached child would have written by now
        time.sleep(0.1)
    assert not (tmp_path / "late").exists()
    assert sandbox_processes() == []


@pytest.mark.parametrize("mode", MODES)
def test_stdio_mode(mode):
    reward = code_reward(mode, timeout_s=3.0, pool_size=2)
    progs = {
        "echo_double": ("import sys\nfor line in sys.stdin:\n    print(int(line) * 2)\n", 1.0),
        "half_right": ("n = int(input())\nprint(4 if n == 2 else 0)\n", 0.5),
        "non_utf8": ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe')\n", 0.0),
        "exit_zero_no_output": ("import sys\nsys.exit(0)\n", 0.0),
        "stderr_is_ignored": ("import sys\nprint('noise', file=sys.stderr)\nprint(int(input()) * 2)\n", 1.0),
        "crash_after_output": ("print(int(input()) * 2)\nraise SystemExit(3)\n", 1.0),
    }
    names = list(progs)
    scores = reward([""] * len(names), [f"```python\n{progs[n][0]}```" for n in names],
                    inputs=[["2\n", "5\n"]] * len(names), outputs=[["4\n", "10"]] * len(names))
    assert dict(zip(names, scores)) == {n: progs[n][1] for n in names}


@pytest.mark.parametrize("mode", MODES)
def test_stdio_compares_the_whole_output(mode):
    """Outputs are compared in full as they stream in (they used to be cut at 64 kB): 1.3 MB right
    passes, a difference after 300 kB fails, a missing or extra line fails, trailing blanks do not
    matter, and a flood stops at twice the expected size."""
    reward = code_reward(mode, timeout_s=10.0, pool_size=4)
    n = 200_000
    progs = {
        "right": (f"for i in range({n}):\n    print(i)\n", 1.0),
        "trailing_blanks": (f"import sys\nsys.stdout.write(''.join(f'{{i}}  \\r\\n' for i in range({n})) + '\\n\\n')\n", 1.0),
        "wrong_after_300kb": (f"for i in range({n}):\n    print(i if i != 50000 else -1)\n", 0.0),
        "one_line_missing": (f"for i in range({n - 1}):\n    print(i)\n", 0.0),
        "one_line_extra": (f"for i in range({n + 1}):\n    print(i)\n", 0.0),
        "flood": ("import sys\nwhile True:\n    sys.stdout.write('1\\n' * 65536)\n", 0.0),
    }
    names = list(progs)
    want = "".join(f"{i}\n" for i in range(n))
    scores = reward([""] * len(names), [f"```python\n{progs[k][0]}```" for k in names],
                    inputs=[[""]] * len(names), outputs=[[want]] * len(names))
    assert dict(zip(names, scores)) == {k: progs[k][1] for k in names}


def test_refuses_without_isolation(monkeypatch):
    """No sandbox: refuse unless unsafe=True; unsafe still keeps tests and candidate apart."""
    import rewards.sandbox as sb

    monkeypatch.setattr(sb, "_MODE_CACHE", {"bwrap": False, "unshare": False})
    with pytest.raises(SandboxUnavailable, match="unsafe"):
        Sandbox("auto")
    s = Sandbox("auto", unsafe=True, timeout_s=3.0)
    assert s.mode == "unsafe"
    assert s.run({"mode": "asserts", "code": GOOD, "tests": TESTS}).passed == [True, True]
    res = s.run({"mode": "asserts", "code": "def f(x):\n    return 0\nimport os\nos._exit(0)\n", "tests": TESTS})
    assert res.passed == [False, False]
    # unsafe means unconfined: the candidate is only kept from its own descriptors' neighbours
    forge = ("import os\nfor fd in range(3, 1024):\n    try:\n"
             "        os.write(fd, b'{\"t\": 0, \"ok\": true}\\n{\"t\": 1, \"ok\": true}\\n')\n"
             "    except OSError:\n        pass\ndef f(x):\n    return 0\n")
    assert s.run({"mode": "asserts", "code": forge, "tests": TESTS}).passed == [False, False]


def test_mode_is_logged_once(caplog):
    import rewards.sandbox as sb

    sb._LOGGED_MODE.clear()
    with caplog.at_level("INFO", logger="rewards"):
        Sandbox("auto", unsafe=True)
        Sandbox("auto", unsafe=True)
    assert len([r for r in caplog.records if "sandbox mode" in r.getMessage()]) == 1


@pytest.mark.parametrize("option", ["timeout_s", "memory_mb", "max_procs", "scratch_mb"])
@pytest.mark.parametrize("value", [0, -1, float("nan"), "5"])
def test_bad_sandbox_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        Sandbox("unsafe", unsafe=True, **{option: value})
