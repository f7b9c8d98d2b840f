"""The channel between the tests and the candidate (rewards/_harness.py), in one process, no
sandbox: values cross with their types (both ways), aliasing and cycles survive at any depth,
and what the candidate sends never makes the tests' process run its code, import what it names
or trust its objects (hostile node tables are refused; its objects stay references that decide
nothing)."""

from __future__ import annotations

import array
import collections
import collections.abc
import datetime as dt
import decimal
import enum
import fractions
import http
import json
import math
import os
import re
import statistics
import time
import types
import urllib.parse

import numpy as np
import pytest

from rewards._harness import Channel, ProtocolError, _Dec, _Enc, _RefObject


@pytest.fixture()
def ends():
    """(candidate end, tests end), connected by pipes (nothing is sent in these tests)."""
    fds = [*os.pipe(), *os.pipe()]
    cand, tests = Channel(fds[0], fds[3], tests=False), Channel(fds[2], fds[1], tests=True)
    yield cand, tests
    for fd in fds:
        os.close(fd)


def cross(src: Channel, dst: Channel, value):
    """`value` encoded by `src`, through JSON, rebuilt by `dst`."""
    enc = _Enc(src)
    v = enc.value(value)
    enc.flush()
    msg = json.loads(json.dumps({"v": v, "n": enc.nodes}))
    return _Dec(dst, msg["n"]).value(msg["v"])


def receive(tests: Channel, nodes: list, root=None):
    """What the tests' end makes of a node table the candidate sent (root: node 0)."""
    return _Dec(tests, json.loads(json.dumps(nodes))).value([0] if root is None else root)


Point = collections.namedtuple("Point", "x y")


class Color(enum.Enum):
    RED = 1


try:
    json.loads("{bad")
except json.JSONDecodeError as e:
    JSON_ERROR = e
try:
    b"\xff".decode()
except UnicodeDecodeError as e:
    UNICODE_ERROR = e

VALUES = [
    None, True, False, 0, -7, 1 << 70, -(1 << 200), 2.5, -0.0, float("inf"), "s\u00e9\ud800", b"\x00\xff", bytearray(b"ab"),
    [1, "a", None], (1, [2, {3: "x"}]), {1, 2}, frozenset({"a", (1, 2)}), {"k": [1.5], (1, 2): {"n": None}}, 1 + 2j,
    range(1, 10, 3), slice(1, None, 2), Ellipsis, collections.Counter("abbc"), collections.OrderedDict([("b", 1), ("a", 2)]),
    collections.deque([1, 2, 3], maxlen=5), collections.deque("xy"), Point(1, 2), urllib.parse.urlparse("http://a/b?c"),
    time.gmtime(0), fractions.Fraction(-3, 7), decimal.Decimal("1.2300"), decimal.Decimal("-Infinity"),
    dt.date(2024, 2, 29), dt.datetime(2024, 1, 2, 3, 4, 5, 6), dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc),
    dt.time(1, 2, 3, tzinfo=dt.timezone(dt.timedelta(hours=-5), "EST")), dt.timedelta(days=-1, seconds=5),
    dt.timezone(dt.timedelta(minutes=90)), http.HTTPStatus.NOT_FOUND, re.compile(rb"a+", re.I), re.compile("x|y"),
    KeyError("k"), KeyError((1, 2)), ValueError("v", 3), StopIteration(5), FileNotFoundError(2, "No such file", "/x"),
    JSON_ERROR, UNICODE_ERROR, statistics.StatisticsError("empty"), int, ValueError, collections.Counter, type(None),
    types.SimpleNamespace(a=1, b=[2]), array.array("d", [1.5, 2.5]), math, np.arange(6).reshape(2, 3),
    np.array([1.5, np.nan]), np.array([], dtype=np.int8), np.array(3.0), np.array(["ab", "c"]),
    np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8", (2,))]), np.array([1, "x", None], dtype=object),
    np.int64(7), np.float32(0.5), np.bool_(True), np.dtype("<M8[ns]"),
]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and (a.tobytes() == b.tobytes() or a.dtype.hasobject
                                                               and a.tolist() == b.tolist())
    if isinstance(a, BaseException):
        return type(a) is type(b) and a.args == b.args and str(a) == str(b) and vars(a) == vars(b)
    if isinstance(a, float) and math.isnan(a) or isinstance(a, decimal.Decimal) and a.is_nan():
        return str(a) == str(b)
    if isinstance(a, collections.deque):
        return a == b and a.maxlen == b.maxlen
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@pytest.mark.parametrize("direction", ["to_tests", "to_candidate"])
@pytest.mark.parametrize("value", VALUES, ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(VALUES)])
def test_values_keep_their_types(ends, value, direction):
    cand, tests = ends
    got = cross(cand, tests, value) if direction == "to_tests" else cross(tests, cand, value)
    if type(value) is Point:  # a namedtuple class of the sender: the receiver's own, same name and fields
        assert type(got).__name__ == "Point" and got._fields == ("x", "y")
    else:
        assert type(got) is type(value)
    assert _same(value, got), (value, got)


def test_exception_details_survive(ends):
    cand, tests = ends
    e = cross(cand, tests, JSON_ERROR)
    assert (e.msg, e.doc, e.pos, e.lineno, e.colno) == (JSON_ERROR.msg, "{bad", 1, 1, 2)
    e = cross(cand, tests, UNICODE_ERROR)
    assert (e.encoding, e.object, e.start, e.end, e.reason) == ("utf-8", b"\xff", 0, 1, "invalid start byte")
    e = cross(cand, tests, FileNotFoundError(2, "No such file", "/x"))
    assert (e.errno, e.strerror, e.filename) == (2, "No such file", "/x")
    assert str(cross(cand, tests, KeyError("k"))) == "'k'"


def test_candidate_exception_classes_keep_their_base(ends):
    """A candidate-defined exception arrives as an instance of a class of the same name deriving
    from its nearest standard base, with the same args and the text it had there."""
    cand, tests = ends

    class InvalidAge(ValueError):
        def __str__(self):
            return "custom text"

    class Quit(SystemExit):
        pass

    e = cross(cand, tests, InvalidAge("bad", 3))
    assert isinstance(e, ValueError) and type(e).__name__ == "InvalidAge" and e.args == ("bad", 3)
    assert str(e) == "custom text"
    q = cross(cand, tests, Quit(1))
    assert isinstance(q, SystemExit) and not isinstance(q, Exception)


def test_aliasing_and_cycles(ends):
    cand, tests = ends
    row = [1]
    got = cross(cand, tests, [row, row, (row,)])
    assert got[0] is got[1] is got[2][0]
    cyc: list = []
    cyc.append(cyc)
    got = cross(cand, tests, cyc)
    assert got[0] is got
    d: dict = {}
    d["self"] = d
    t = ([],)
    t[0].append(t)
    got = cross(tests, cand, [d, t])
    assert got[0]["self"] is got[0] and got[1][0][0] is got[1]


def test_any_depth(ends):
    """Node tables are flat and built without recursion: a 100,000-deep structure crosses."""
    cand, tests = ends
    x: list = []
    for _ in range(100_000):
        x = [x]
    got, depth = cross(cand, tests, x), 0
    while got:
        got, depth = got[0], depth + 1
    assert depth == 100_000


def test_setup_classes_cross_by_value(ends):
    """Instances of the setup code's classes are rebuilt as the same class on the other end
    (found by qualified name; both ends ran the same setup code); a class the candidate wrote with
    the same name (LeetCode answers often repeat ListNode) crosses as the setup's class."""
    cand, tests = ends
    setup = "class ListNode:\n    def __init__(self, val=0, next=None):\n        self.val = val\n        self.next = next\n"
    ns_c, ns_t = {"__name__": "__solution__"}, {"__name__": "__test__"}
    exec(setup, ns_c)
    exec(setup, ns_t)
    cand.register_setup(ns_c, "")
    tests.register_setup(ns_t, "")
    head = ns_c["ListNode"](1, ns_c["ListNode"](2))
    head.next.next = head  # a cycle
    got = cross(cand, tests, head)
    assert type(got) is ns_t["ListNode"] and got.val == 1 and got.next.val == 2 and got.next.next is got
    own: dict = {"__name__": "__solution__"}
    exec(setup, own)  # the candidate's own class of the same name
    got = cross(cand, tests, own["ListNode"](5))
    assert type(got) is ns_t["ListNode"] and got.val == 5


def test_data_subclasses_arrive_as_their_data(ends):
    """An object of a candidate class derived from a data type, which the tests do not name,
    arrives as its value of that type (its methods, lying or not, stay behind)."""
    cand, tests = ends

    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class Rows(list):
        pass

    got = cross(cand, tests, [Liar(3), Rows([1, 2])])
    assert type(got[0]) is int and got[0] == 3 and got[0] != 4
    assert type(got[1]) is list and got[1] == [1, 2]


# -- what the tests' end refuses --------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [
    [["SO", "builtins", "eval"]], [["SO", "os", "system"]], [["SO", "builtins", "type"]],
    [["SO", "subprocess", "Popen"]], [["SO", "_io", "FileIO"]], [["SO", "ctypes", "CDLL"]], [["M", "os"]],
    [["M", "subprocess"]], [["M", "antigravity"]], [["EN", "os", "system", "x"]], [["O", "NoSuchClass", []]],
    [["OC", "nothing"]], [["P", 999]], [["NP", "|O", [1], "AAAAAAAAAAA="]], [["NS", "|O", "AAAAAAAAAAA="]],
    [["T", [[0]]]], [["L", "not a list"]], [["D", [1]]], [["zz", 1]], [["R", 0, "q"]], [["R", 0, "c", None]],
    [["FR", 1, 0]], [["DT", "datetime", 1, 1, 1, 0, 0, 0, 0, 0, [1]], ["L", []]], [["d", [[1]], [2]]],
    [["DV", [1]], ["L", []]], [["RM", [1], "ab", 0, 2, [[0, 2]]], ["RP", "a", 0]],
])
def test_hostile_nodes_are_refused(ends, nodes):
    _, tests = ends
    with pytest.raises((ProtocolError, TypeError, ValueError, KeyError, IndexError)):
        receive(tests, nodes)


def test_named_objects_are_not_run(ends):
    """Names in node tables are looked up, never called: an exception, enum or namedtuple that
    names a function of another module gets nothing from it."""
    _, tests = ends
    e = receive(tests, [["E", "os", "system", [1], [], "x", None, None], ["T", ["echo hi"]]])
    assert type(e) is Exception and e.args == ("echo hi",)
    nt = receive(tests, [["NT", "os", "system", "P", ["a"], [1], None]])
    assert nt == (1,) and type(nt).__name__ == "P"


def _ref(rid: int, name: str, ops: list[str], eq: int = 0, hashing: int = 0) -> list:
    return ["R", rid, "o", rid + 1, [name, name, "__solution__", None, [], ops, eq, hashing, None, None]]


def test_references_decide_nothing_unless_named(ends):
    """A candidate object of a class the tests do not name: calls and attribute reads only.
    Comparisons, truth value, length, iteration, str/repr are refused, whatever its class
    defines; introspection answers what the real object has."""
    _, tests = ends
    ops = ["__len__", "__iter__", "__bool__", "__lt__", "__str__", "__repr__", "__sub__", "__abs__", "__contains__"]
    liar = receive(tests, [_ref(0, "Found a match!", ops, eq=1, hashing=1)])
    assert isinstance(liar, _RefObject)
    for check in (lambda: liar == 4, lambda: liar != 4, lambda: 4 == liar, lambda: liar < 5, lambda: bool(liar),
                  lambda: len(liar), lambda: list(liar), lambda: str(liar), lambda: repr(liar), lambda: liar - 6,
                  lambda: abs(liar), lambda: 3 in liar, lambda: f"{liar}", lambda: liar in [4], lambda: [liar] == [4],
                  lambda: sorted([liar, 1]), lambda: math.isclose(liar, 3.0)):
        with pytest.raises(TypeError):
            check()
    assert hasattr(liar, "__iter__") and isinstance(liar, collections.abc.Iterable) and not callable(liar)
    plain = receive(tests, [_ref(10, "Plain", [])])
    assert not callable(plain) and not hasattr(plain, "__iter__") and not hasattr(plain, "__len__")
    assert not isinstance(plain, (collections.abc.Iterable, collections.abc.Sized, collections.abc.Callable, int))
    with pytest.raises(TypeError):
        bool(plain)
    assert plain != 4 and not (plain == 4) and plain == plain  # no __eq__: identity, as in Python
    assert receive(tests, [_ref(10, "Plain", [])]) is plain  # the same object gives the same stand-in
    assert type(plain).__name__ == "Plain" and repr(type(plain)) == "<class '__solution__.Plain'>"


def test_named_classes_never_equal_plain_data(ends):
    """Even a class the tests name (so its objects answer len/bool/str themselves) is never
    compared or combined with plain data: that would let its __eq__/__sub__ see the expected value."""
    _, tests = ends
    tests.named.add(21)
    obj = receive(tests, [_ref(20, "f", ["__sub__", "__lt__", "__abs__"], eq=1)])
    for check in (lambda: obj == 4, lambda: obj != 4, lambda: obj - 6, lambda: 6 - obj, lambda: obj < 5,
                  lambda: obj in [4], lambda: sorted([obj, 3])):
        with pytest.raises(TypeError):
            check()
    assert {obj: 1} != {4: 1}  # its hash is its identity: it is not the key 4


def test_function_references(ends):
    _, tests = ends
    f = receive(tests, [["R", 3, "f", "add", "add", "__solution__", "Add two numbers."]])
    assert callable(f) and f.__name__ == "add" and f.__qualname__ == "add" and f.__doc__ == "Add two numbers."
    assert repr(f).startswith("<function add at 0x") and bool(f)
