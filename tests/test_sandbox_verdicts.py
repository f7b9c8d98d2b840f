"""Forged passes: wrong solutions that attack the verdict instead of solving the task must score 0
on both backends. The candidate runs in a process that holds no test and no result channel; the
tests run elsewhere, rebuild values from data and keep every other candidate object a reference
that decides nothing (see rewards/_harness.py and docs/sandbox.md)."""

import pytest

from helpers.sandbox import MODES, code_reward, expected, score_cases

# Each test below is failed by the wrong solution; together they touch builtins the tests use,
# comparisons, truth values, iteration over the candidate's results and a stdlib module the
# candidate imported (MBPP tests often use `math` without importing it).
TESTS = [
    "assert f(2) == 4",
    "assert abs(f(3) - 6) < 1e-9",
    "assert round(f(1.25), 1) == 2.5",
    "assert sorted(g([3, 1, 2])) == [1, 2, 3]",
    "assert len(g([1, 2])) == 2",
    "assert f(1) != 0",
    "assert bool(f(1))",
    "assert f(5) > 9",
    "assert isinstance(f(1), int) and f(1) == 2",
    "assert all(f(i) == 2 * i for i in range(1, 5))",
    "assert list(map(f, [1, 2])) == [2, 4]",
    "n = 0\nfor got, want in zip(map(f, [1, 2]), [2, 4]):\n    assert got == want\n    n += 1\nassert n == 2",
    "assert math.isclose(f(1.5), 3.0)",
]
GOOD = "import math\ndef f(x):\n    return 2 * x\ndef g(x):\n    return list(x)\n"
WRONG = "import math\ndef f(x):\n    return 0\ndef g(x):\n    return []\n"
LIAR = ("class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n        return True\n"
        "    def __lt__(self, o):\n        return True\n    def __gt__(self, o):\n        return True\n"
        "    def __bool__(self):\n        return True\n    def __sub__(self, o):\n        return A()\n"
        "    def __abs__(self):\n        return 0\n    def __round__(self, n=0):\n        return 2.5\n"
        "    def __hash__(self):\n        return 0\n    def __iter__(self):\n        return iter([1, 2, 3])\n"
        "    def __len__(self):\n        return 2\n")
FORGED = '{"t": %d, "ok": true, "error": null}\\n'
FORGE_FDS = ("import os, glob\nrec = ''.join('" + FORGED + "' % t for t in range(20)).encode()\n"
             "for p in glob.glob('/proc/*/fd/*') + glob.glob('/proc/self/fd/*'):\n    try:\n"
             "        fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)\n        os.write(fd, rec)\n    except OSError:\n        pass\n"
             "for fd in range(1024):\n    try:\n        os.write(fd, rec)\n    except OSError:\n        pass\n")

ATTACKS = {
    # the tests' builtins are their own: names the candidate defines never replace them
    "shadow_builtins": ("abs = lambda v: 0\nround = lambda *a: 2.5\nsorted = lambda v: [1, 2, 3]\nlen = lambda v: 2\n"
                        "isinstance = lambda *a: True\nall = lambda v: True\nlist = lambda v: [2, 4]\n"
                        "bool = lambda v: True\nmap = lambda *a: iter([2, 4])\nzip = lambda *a: iter([])\n" + WRONG),
    "patch_builtins_module": ("import builtins\nbuiltins.abs = lambda v: 0\nbuiltins.sorted = lambda v: [1, 2, 3]\n"
                              "builtins.AssertionError = type('X', (BaseException,), {})\n"
                              "builtins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n" + WRONG),
    # what the old in-process recorder used: irrelevant now, the candidate's interpreter writes no verdict
    "patch_json_os_and_harness": ("import json, os, sys\njson.JSONEncoder.encode = lambda self, o: '{\"ok\": true}'\n"
                                  "json.dumps = lambda *a, **k: '{\"t\": 0, \"ok\": true}'\n"
                                  "for m in list(sys.modules.values()):\n"
                                  "    for name in ('emit', '_make_emitter', 'verify_record', '_verdicts'):\n"
                                  "        if hasattr(m, name):\n            setattr(m, name, lambda *a, **k: True)\n" + WRONG),
    "gc_and_frames": ("import gc, sys\nfor o in gc.get_objects():\n    if isinstance(o, dict) and 'result_fd' in o:\n"
                      "        o['forged'] = True\n    if type(o).__name__ == 'Channel':\n"
                      "        o.serve = lambda msg, o=o: o.send({'ok': ['R', 7, 'int'], 'after': []})\n"
                      "fr = sys._getframe()\nwhile fr is not None:\n    fr.f_globals.setdefault('hacked', True)\n    fr = fr.f_back\n"
                      + WRONG),
    "forge_records_on_every_fd": FORGE_FDS + WRONG,
    "forge_from_a_thread": ("import threading, time, os\ndef spam():\n    while True:\n" +
                            "".join("        " + ln + "\n" for ln in FORGE_FDS.splitlines()) +
                            "        time.sleep(0.01)\nthreading.Thread(target=spam, daemon=True).start()\n" + WRONG),
    "print_passed": ("import sys\nprint('PASSED\\nAll tests passed!\\nOK')\nsys.stderr.write('" + FORGED % 0 + "')\n"
                     "print('" + FORGED % 1 + "')\n" + WRONG),
    "liar_objects": LIAR + "import math\ndef f(x):\n    return A()\ndef g(x):\n    return A()\n",
    "liar_subclasses": ("class I(int):\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n        return True\n"
                        "    def __gt__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                        "class L(list):\n    def __eq__(self, o):\n        return True\n    def __len__(self):\n        return 2\n"
                        "import math\ndef f(x):\n    return I(0)\ndef g(x):\n    return L()\n"),
    "class_property_lies": ("class Fake:\n    @property\n    def __class__(self):\n        return int\n"
                            "    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
                            "import math\ndef f(x):\n    return Fake()\ndef g(x):\n    return Fake()\n"),
    "stop_iteration_from_calls": "import math\ndef f(x):\n    raise StopIteration\ndef g(x):\n    raise StopIteration\n",
    "exit_in_call": "import sys, math\ndef f(x):\n    sys.exit(0)\ndef g(x):\n    raise SystemExit(0)\n",
    "os_exit_in_call": "import os, math\ndef f(x):\n    os._exit(0)\ndef g(x):\n    os._exit(0)\n",
    "base_exceptions": "import math\ndef f(x):\n    raise KeyboardInterrupt\ndef g(x):\n    raise GeneratorExit\n",
    "exit_at_import": WRONG + "import sys\nsys.exit(0)\n",
    "os_exit_at_import": WRONG + "import os\nos._exit(0)\n",
    "atexit": WRONG + "import atexit, os\natexit.register(lambda: print('PASSED'))\natexit.register(lambda: os._exit(0))\n",
    "alarm_kills_candidate": WRONG + "import signal\nsignal.alarm(1)\n",
    "fake_math_module": ("import types\nmath = types.ModuleType('math')\nmath.isclose = lambda *a, **k: True\n"
                         "def f(x):\n    return 0\ndef g(x):\n    return []\n"),
    "fake_math_object": ("class M:\n    def isclose(self, *a, **k):\n        return True\n    def __call__(self, *a):\n"
                         "        return True\nmath = M()\ndef f(x):\n    return 0\ndef g(x):\n    return []\n"),
    "claims_stdlib_origin": WRONG + "f.__module__ = 'math'\nf.__qualname__ = 'isclose'\n",
    # huge and deep results cross as what they are and decide nothing they should not (f stays wrong:
    # a huge list from f would pass `f(1) != 0` legitimately, as in plain Python)
    "huge_and_deep_results": ("import math\ndef f(x):\n    return 0\ndef g(x):\n    if len(x) == 3:\n"
                              "        return list(range(3 * 10 ** 6))\n    v = []\n"
                              "    for _ in range(5000):\n        v = [v]\n    return v\n"),
    "sleep_forever": "import time, math\ndef f(x):\n    time.sleep(100)\ndef g(x):\n    time.sleep(100)\n",
    "look_for_the_tests": ("import os, glob\nfound = []\nfor p in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ'):\n"
                           "    try:\n        found.append(open(p, 'rb').read())\n    except OSError:\n        pass\n"
                           "KNOWN = any(b'assert f(2)' in b for b in found)\nimport math\n"
                           "def f(x):\n    return 2 * x if KNOWN else 0\ndef g(x):\n    return list(x) if KNOWN else []\n"),
}


@pytest.mark.parametrize("mode", MODES)
def test_forged_passes_score_zero(mode):
    reward = code_reward(mode, timeout_s=4.0, pool_size=4)
    cases = {"good": (GOOD, 1.0), "wrong": (WRONG, 0.0), **{k: (v, 0.0) for k, v in ATTACKS.items()}}
    assert score_cases(reward, cases, TESTS) == expected(cases)


@pytest.mark.parametrize("mode", MODES)
def test_humaneval_check_and_callbacks_cannot_be_hijacked(mode):
    """HumanEval-style ``check(candidate)``: a candidate defining its own ``check`` (or ``assert``
    helpers) is ignored; objects the tests pass in can be called but not inspected."""
    reward = code_reward(mode, timeout_s=4.0, pool_size=4)
    test = ("def check(candidate):\n    assert candidate(lambda v: v + 1, 1) == 2\n"
            "    assert candidate(lambda v: v * 3, 2) == 6\n")
    comps = {
        "good": ("def apply(fn, x):\n    return fn(x)\n", 1.0),
        "own_check": ("def check(candidate):\n    pass\nMETADATA = {}\ndef apply(fn, x):\n    return 0\n", 0.0),
        "inspects_callback": ("def apply(fn, x):\n    g = fn.__globals__\n    g['check'] = lambda c: None\n    return 0\n", 0.0),
        "raw_getattr_request": ("import gc\ndef apply(fn, x):\n    ch = fn._ch\n"
                                "    v = ch.request('getattr', fn._rid, ('__globals__',), {})\n    return 0\n", 0.0),
        "unknown_reference": ("def apply(fn, x):\n    ch = fn._ch\n    return ch.request('call', 10 ** 6, (x,), {})\n", 0.0),
    }
    names = list(comps)
    scores = reward([""] * len(names), [f"```python\n{comps[n][0]}```" for n in names],
                    test=[test] * len(names), entry_point=["apply"] * len(names))
    assert dict(zip(names, scores)) == {n: comps[n][1] for n in names}


# Forges against the typed channel (issue #27): each wrong solution below attacks one of the ways
# values now cross; every test it faces fails.
LIAR_DUNDERS = ("    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n        return True\n"
                "    def __lt__(self, o):\n        return True\n    def __gt__(self, o):\n        return True\n"
                "    def __sub__(self, o):\n        return 0\n    def __rsub__(self, o):\n        return 0\n"
                "    def __abs__(self):\n        return 0\n    def __hash__(self):\n        return 4\n"
                "    def __contains__(self, o):\n        return True\n")
BOX = "class Box:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, o):\n        return type(o) is Box and self.v == o.v\n"
TYPED_CASES = {
    # str()/repr() of a reference used to carry the candidate's type name
    "type_name_in_str": ("Found = type('Found a match!', (), {})\ndef f(x):\n    return Found()\n",
                         ["assert 'Found a match' in str(f(1))", "assert 'match' in repr(f(1))",
                          "assert f'{f(1)}'.startswith('<')", "assert 'Found' in '%s' % (f(1),)"], None),
    # callable()/hasattr()/isinstance(Iterable) used to be true for any reference
    "introspection": ("class Opaque:\n    pass\ndef f(x):\n    return Opaque()\n",
                      ["assert callable(f(1))", "assert hasattr(f(1), '__iter__')", "assert hasattr(f(1), '__len__')",
                       "import collections.abc\nassert isinstance(f(1), collections.abc.Iterable)",
                       "import collections.abc\nassert isinstance(f(1), collections.abc.Sized)"], None),
    # the dataset's setup code fails: the candidate's names never stand in for its names
    "setup_fails_fake_np": ("class np:\n    @staticmethod\n    def allclose(*a, **k):\n        return True\n"
                            "reference = lambda x: 0\ndef f(x):\n    return 0\n",
                            ["assert np.allclose(f(1), 2)", "assert f(3) == reference(3)"],
                            "import numpy_is_not_installed as np\ndef reference(x):\n    return 2 * x\n"),
    # a class the tests name (here the entry point itself) answers about itself, never about plain data
    "named_class_liar": ("class f:\n    def __init__(self, x):\n        pass\n" + LIAR_DUNDERS,
                         ["assert f(2) == 4", "assert 4 == f(2)", "assert f(2) != 5", "assert abs(f(3) - 6) < 1e-9",
                          "assert abs(6 - f(3)) < 1e-9", "assert f(5) > 9", "assert f(2) in [4]", "assert [f(2)] == [4]",
                          "assert {f(2): 1} == {4: 1}", "assert 4 in f(2) and 5 not in f(2)", "assert sorted([3, f(1)])[0] == 3"],
                         None),
    # a lying object inside an instance of the setup's class: the setup's __eq__ compares, refuses the liar
    "liar_inside_setup_object": ("class A:\n" + LIAR_DUNDERS + "def f(x):\n    return Box(A())\n",
                                 ["assert f(1) == Box(2)", "assert f(1).v == 2"], BOX),
    # the candidate's own class named like the setup's: it crosses as the setup's class (its __eq__)
    "duck_setup_class_lying_eq": ("class Box:\n    def __init__(self, v):\n        self.v = v\n" + LIAR_DUNDERS.replace(
        "    def __contains__", "    def __bool__(self):\n        return True\n    def __contains__") +
                                  "def f(x):\n    return Box(0)\n", ["assert f(1) == Box(2)", "assert Box(2) == f(1)"], BOX),
    # forged records printed during calls reach the tests' stdout, never their result pipe
    "print_records_during_calls": ("def f(x):\n    for t in range(4):\n        print('" + FORGED + "' % t)\n"
                                   "        print('" + FORGED + "' % t, file=__import__('sys').stderr)\n    return 0\n",
                                   ["assert f(2) == 4", "assert f(3) == 6", "assert f(1) == 2", "assert f(0) == 1"], None),
    # an exception whose args hold a lying object
    "exception_with_liar_args": ("class A:\n" + LIAR_DUNDERS + "def f(x):\n    raise ValueError(A())\n",
                                 ["try:\n    f(1)\nexcept ValueError as e:\n    assert e.args[0] == 'expected'\nelse:\n    assert False",
                                  "try:\n    f(1)\nexcept ValueError as e:\n    assert str(e) == 'expected'"], None),
    # the candidate rewrites its own end of the channel: hostile node tables, fake references
    "crafted_replies": ("import gc\nch = next(o for o in gc.get_objects() if type(o).__name__ == 'Channel')\n"
                        "send = ch.send\nhostile = [[['SO', 'builtins', 'eval']], [['M', 'os']], [['P', 0]], [['O', 'Box', []]],\n"
                        "           [['R', 0, 'c', ['int', 'int', 'builtins', None, [], [], 1, 0, None, None]]], [['T', [[0]]]]]\n"
                        "n = [0]\ndef forged(msg):\n    if 'ok' in msg:\n        msg = {'ok': [0], 'n': hostile[n[0] % len(hostile)]}\n"
                        "        n[0] += 1\n    send(msg)\nch.send = forged\ndef f(x):\n    return 2 * x\n",
                        ["assert f(2) == 4", "assert f(3) == 6", "assert f(1) == 2", "assert f(0) == 0", "assert f(5) == 10",
                         "assert f(4) == 8"], None),
}


@pytest.mark.parametrize("mode", MODES)
def test_typed_channel_forges_score_zero(mode):
    """The issue #27 forges (type names in str/repr, introspection that said yes to any reference,
    a failing setup replaced by the candidate's names) and attacks on the new value kinds."""
    reward = code_reward(mode, timeout_s=6.0, pool_size=4)
    names = list(TYPED_CASES)
    comps = [f"```python\n{TYPED_CASES[n][0]}```" for n in names]
    scores = reward([""] * len(names), comps, tests=[TYPED_CASES[n][1] for n in names],
                    test_setup_code=[TYPED_CASES[n][2] for n in names])
    assert dict(zip(names, scores)) == {n: 0.0 for n in names}
    # the same tests pass with honest solutions: the zeros above come from the attacks
    honest = {"type_name_in_str": None, "named_class_liar": "def f(x):\n    return 2 * x\n",
              "print_records_during_calls": "def f(x):\n    print('computing')\n    return 2 * x\n"}
    ok = reward([""] * 2, [f"```python\n{honest[n]}```" for n in ("named_class_liar", "print_records_during_calls")],
                tests=[["assert f(2) == 4", "assert abs(f(3) - 6) < 1e-9", "assert f(5) > 9"],
                       TYPED_CASES["print_records_during_calls"][1][:3]])
    assert ok == [1.0, 1.0]
