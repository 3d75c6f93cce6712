"""Tests for fastworker, in the order of the module: protocol, data
structures, registry, the roles in-process, the roles as real processes, the
command line.  Real sockets on loopback port 0 only; no fixed ports, no
sleeping as synchronisation (``wait_until`` polls a condition with a
deadline); every process and thread a test starts is gone when it ends.
"""

import asyncio
import base64
import collections
import concurrent.futures
import datetime
import itertools
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zoneinfo

import pynng
import pytest

import fastworker as fw

HERE = os.path.dirname(os.path.abspath(__file__))
FASTWORKER = os.path.join(HERE, "fastworker.py")


# -- helpers -------------------------------------------------------------------


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def free_port():
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids():
    pids = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


def live_threads():
    return {t for t in threading.enumerate() if not isinstance(t, threading._DummyThread)}


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no thread and no process behind."""
    threads, children = live_threads(), child_pids()
    yield
    wait_until(lambda: live_threads() <= threads, 10, "the test's threads to end")
    wait_until(lambda: child_pids() <= children, 10, "the test's processes to end")


class Proc:
    """``python fastworker.py ARGV`` with its stdout lines in a queue."""

    def __init__(self, *argv, cwd=None, env=None, prefix=(), script=FASTWORKER):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.argv = argv
        self.p = subprocess.Popen(
            [*prefix, sys.executable, script, *argv],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        self.stderr = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self.p.stdout, self.lines.put), daemon=True),
            threading.Thread(target=self._pump, args=(self.p.stderr, self.stderr.append), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _pump(stream, put):
        for line in stream:
            put(line)

    def line(self, timeout=20.0):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from {self.argv} in {timeout} s; stderr: {''.join(self.stderr)}") from None

    def ready(self, timeout=20.0):
        msg = json.loads(self.line(timeout))
        assert msg["event"] == "ready", msg
        return msg

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            return self.p.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        for t in self._readers:
            t.join(10)


@pytest.fixture
def procs():
    """Start processes with ``procs(*argv)``; all are killed at the end."""
    started = []

    def start(*argv, **kw):
        p = Proc(*argv, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


TASKS_MODULE = """
import asyncio
import os
import time

import fastworker
from fastworker import task


@task
def add(x, y):
    return x + y


@fastworker.task(name="fail", retries=0)
def fail(message="boom"):
    raise ValueError(message)


@task
def sleepy(seconds):
    time.sleep(seconds)
    return seconds


@task
def pid():
    return os.getpid()


def mark(path):
    if path:
        open(path, "w").close()


@task
def wait_file(path, timeout=20, started=None):
    \"\"\"Holds a slot until the test creates ``path`` (a gate between processes);
    creates ``started`` first, to say it runs.\"\"\"
    mark(started)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return os.getpid()


@task
async def async_wait_file(path, timeout=20, started=None):
    mark(started)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        await asyncio.sleep(0.01)
    return os.getpid()


@task
def record(path, tag):
    with open(path, "a") as f:
        f.write(tag + "\\n")
    return tag


@task
def mark_and_sleep(started, seconds):
    mark(started)
    time.sleep(seconds)
    return seconds


@task
def gated_record(gate, log, tag, timeout=20):
    \"\"\"Writes "start TAG" to ``log``, waits for ``gate``, writes "end TAG".\"\"\"
    with open(log, "a") as f:
        f.write(f"start {tag}\\n")
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.01)
    with open(log, "a") as f:
        f.write(f"end {tag}\\n")
    return tag


@task
def raise_base(kind):
    raise {"interrupt": KeyboardInterrupt, "exit": SystemExit}[kind]("stop it")


@task(timeout=0.3)
def stuck(seconds):
    time.sleep(seconds)
    return seconds


def stamp(path, what):
    with open(path, "a") as f:
        f.write(f"{what} {time.time()!r}\\n")


@task(concurrency=2)
def limited(log, seconds):
    stamp(log, "start")
    time.sleep(seconds)
    stamp(log, "end")


@task(rate="20/s")
def paced(log):
    stamp(log, "start")
"""


@pytest.fixture(scope="session")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "fwtasks.py").write_text(TASKS_MODULE)
    return str(d)


@pytest.fixture
def plane_proc(procs, tasks_dir):
    """A plane process serving the test task module; returns its ready line."""

    def start(*extra):
        p = procs(
            "plane",
            "--listen",
            "tcp://127.0.0.1:0",
            "--dashboard",
            "127.0.0.1:0",
            "--tasks",
            "fwtasks",
            *extra,
            cwd=tasks_dir,
        )
        ready = p.ready()
        ready["proc"] = p
        return ready

    return start


def raw_request(address, data, timeout=5.0):
    """Send raw bytes to the plane, return the decoded reply."""
    with pynng.Req0(dial=address, recv_timeout=int(timeout * 1000), send_timeout=int(timeout * 1000)) as s:
        s.send(data)
        return fw.decode(s.recv())


# -- wire protocol -----------------------------------------------------------------


def test_encode_decode_round_trip_for_every_request():
    task = fw.encode_task("c-1", "add", (1, 2), {"z": 3}, priority="high", retries=2, timeout=1.5, delay=0.5)
    submit = fw.decode(fw.encode_batch("submit", "tasks", [task], client="c"))
    assert submit["op"] == "submit" and submit["client"] == "c"
    assert submit["tasks"] == [
        {
            "id": "c-1",
            "name": "add",
            "args": [1, 2],
            "kwargs": {"z": 3},
            "priority": "high",
            "retries": 2,
            "timeout": 1.5,
            "delay": 0.5,
        }
    ]
    for op, fields in [
        ("poll", {"client": "c", "wait": 1}),
        ("fetch", {"ids": ["a"], "wait": 0}),
        ("status", {"ids": ["a"]}),
        ("cancel", {"ids": ["a", "b"]}),
        ("stats", {}),
        ("hello", {}),
        ("bye", {"client": "c"}),
    ]:
        msg = fw.decode(fw.encode(op, **fields))
        assert msg == {"v": fw.PROTOCOL_VERSION, "op": op, **fields}


def test_results_travel_as_lists():
    items = [fw.encode_result("a", "succeeded", [1, "x"]), fw.encode_result("b", "cancelled")]
    msg = fw.decode(fw.encode_batch("results", "results", items, plane="p"))
    assert msg["results"] == [{"id": "a", "state": "succeeded", "result": [1, "x"]}, {"id": "b", "state": "cancelled"}]
    empty = fw.decode(fw.encode_batch("results", "results", [], plane="p", closing=True))
    assert empty["results"] == [] and empty["closing"] is True


def test_client_ids_are_one_character_at_least():
    for op, fields in (("submit", {"tasks": []}), ("poll", {"wait": 0})):
        with pytest.raises(fw.ProtocolError, match="a client id is a string of 1 to 200 characters"):
            fw.decode(fw.encode(op, client="", **fields))


@pytest.mark.parametrize(
    "data, complaint",
    [
        (b"\xff\xfe\x00garbage", "not a JSON"),
        (b"not json at all", "not a JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'{"op": "stats"}', "version"),
        (b'{"v": 99, "op": "stats"}', "version"),
        (b'{"v": 2}', "unknown op"),
        (b'{"v": 2, "op": "launch"}', "unknown op"),
        (b'{"v": 2, "op": "submit", "client": "c"}', "'tasks'"),
        (b'{"v": 2, "op": "submit", "client": 7, "tasks": []}', "'client'"),
        (b'{"v": 2, "op": "submit", "client": "c", "tasks": [{"id": "x"}]}', "'name'"),
        (b'{"v": 2, "op": "submit", "client": "c", "tasks": [{"id": "x", "name": "n", "args": {}}]}', "'args'"),
        (
            b'{"v": 2, "op": "submit", "client": "c", "tasks": [{"id": "x", "name": "n", "priority": "urgent"}]}',
            "'priority'",
        ),
        (b'{"v": 2, "op": "submit", "client": "c", "tasks": [{"id": "x", "name": "n", "retries": true}]}', "'retries'"),
        (b'{"v": 2, "op": "poll", "client": "c", "wait": "soon"}', "'wait'"),
        (b'{"v": 2, "op": "cancel", "ids": [1]}', "ids"),
        (b'{"v": 2, "op": "results", "plane": "p", "results": [{"id": "a", "state": "weird"}]}', "state"),
    ],
)
def test_decode_rejects_malformed_messages(data, complaint):
    with pytest.raises(fw.ProtocolError, match=complaint):
        fw.decode(data)


def test_secret_tags_every_message():
    data = fw.encode("stats", b"s3cret")
    assert fw.decode(data, b"s3cret")["op"] == "stats"
    with pytest.raises(fw.AuthenticationError):
        fw.decode(data, b"other")
    with pytest.raises(fw.AuthenticationError):
        fw.decode(fw.encode("stats"), b"s3cret")
    with pytest.raises(fw.AuthenticationError, match="secret"):  # a tagged message, read without the secret
        fw.decode(data)
    refusal = fw.encode("error", error=fw._error("auth", "AuthenticationError", "no valid tag"))  # sent unsigned
    with pytest.raises(fw.AuthenticationError, match="refused"):  # read with a (wrong) secret
        fw.decode(refusal, b"s3cret")


def test_encode_task_refuses_what_json_cannot_carry():
    with pytest.raises(TypeError):
        fw.encode_task("i", "add", (object(),))
    with pytest.raises(ValueError, match="priority"):
        fw.encode_task("i", "add", priority="urgent")
    with pytest.raises(ValueError, match="retries"):
        fw.encode_task("i", "add", retries=-1)


BAD_OPTIONS = [
    ("timeout", True),
    ("timeout", 0),
    ("timeout", float("nan")),
    ("timeout", float("inf")),
    ("timeout", 1e10),
    ("delay", float("nan")),
    ("delay", 10**400),
    ("delay", -1),
    ("retries", True),
    ("retries", -1),
    ("retries", 2.0),
    ("priority", ["high"]),
    ("priority", "urgent"),
]


@pytest.mark.parametrize("option, value", BAD_OPTIONS)
def test_one_validator_refuses_a_bad_option_wherever_it_comes_from(option, value):
    with pytest.raises(ValueError, match=option):  # submit_with / encode_task
        fw.encode_task("i-1", "add", **{option: value})
    with pytest.raises(fw.ProtocolError, match=option):  # a TASK on the wire
        fw._check_task({"id": "i-1", "name": "add", option: value})
    with pytest.raises(fw.ProtocolError, match=option):  # a worker's catalog
        fw._catalog_of({"add": {option: value}})
    if option != "delay":
        with pytest.raises(ValueError, match=option):  # @task
            fw.task(name="never.registered", **{option: value})(lambda: None)


def test_decode_wants_the_version_exactly_and_finite_waits():
    for v in (b"true", b"1.0", b'"1"'):
        with pytest.raises(fw.ProtocolError, match="version"):
            fw.decode(b'{"v": %s, "op": "stats"}' % v)
    for wait in (b"NaN", b"Infinity", b"-1", b"1e400"):
        with pytest.raises(fw.ProtocolError, match="wait"):
            fw.decode(b'{"v": 2, "op": "poll", "client": "c", "wait": %s}' % wait)
    assert fw.decode(b'{"v": 2, "op": "poll", "client": "c", "wait": 600}')["wait"] == fw.MAX_WAIT
    with pytest.raises(fw.ProtocolError, match="id"):
        fw.decode(b'{"v": 2, "op": "heartbeat", "worker": {"id": ["x"]}}')


# -- data structures -----------------------------------------------------------------


def make_task(tid, priority):
    return fw._Task({"id": tid, "name": "n", "args": [], "kwargs": {}}, fw._RANK[priority], 0, None, "c", 0.0)


def test_task_queue_runs_higher_priority_first_and_fifo_within_a_level():
    q = fw.TaskQueue()
    order = [("l1", "low"), ("n1", "normal"), ("c1", "critical"), ("h1", "high"), ("l2", "low"), ("c2", "critical")]
    for tid, p in order:
        q.push(make_task(tid, p))
    assert len(q) == 6 and q.counts == [2, 1, 1, 2]
    assert [q.pop().id for _ in range(6)] == ["c1", "c2", "h1", "n1", "l1", "l2"]
    assert q.pop() is None and not q


def test_task_queue_skips_cancelled_tasks():
    q = fw.TaskQueue()
    a, b = make_task("a", "high"), make_task("b", "low")
    q.push(a)
    q.push(b)
    q.remove(a)
    assert len(q) == 1
    assert q.pop() is b and q.pop() is None


def test_task_queue_removals_in_any_order_keep_turns_fair_and_forget_emptied_tenants():
    q = fw.TaskQueue()
    tasks = [make_task(f"t{i}", "normal") for i in range(20_000)]
    for i, t in enumerate(tasks):
        t.tenant = f"tenant-{i}"  # a tenant each (the red team's case): a removal must not scan the tenants
        q.push(t)
    for t in reversed(tasks[10:]):  # newest first
        q.remove(t)
    assert len(q) == 10 and q.counts == [0, 0, 10, 0]
    again = make_task("again", "normal")
    again.tenant = "tenant-3"  # a tenant that still has a task: its line, its one turn
    q.push(again)
    back = make_task("back", "normal")
    back.tenant = "tenant-15000"  # a tenant emptied by a removal, back: one turn, not two
    q.push(back)
    order = [q.pop().id for _ in range(12)]
    assert order[:10] == [f"t{i}" for i in range(10)] and sorted(order[10:]) == ["again", "back"]
    assert q.pop() is None and not q and q._lines[2] == {} and not q._turns[2]  # nothing kept of the 20,000
    for t in tasks[:5]:
        q.push(t)
    for t in tasks[:5]:
        q.remove(t)
    assert q._lines[2] == {} and not q._turns[2]  # a priority emptied by removals forgets its tenants at once


def test_dispatch_queue_puts_names_the_same_slots_run_in_one_lane_and_regroups_when_they_change():
    slots = {"a": frozenset({"w1"}), "b": frozenset({"w1"}), "c": frozenset({"w2"})}
    q = fw.DispatchQueue(lambda name: slots[name])
    made = []
    for i, name in enumerate("abcab"):
        t = make_task(f"{name}{i}", "normal")
        t.name = name
        made.append(t)
        q.push(t)
    assert q.lane("a") is q.lane("b") is not q.lane("c") and q.counts == [0, 0, 5, 0]
    assert q.best() is q.lane("a")  # its next task (a0) came first
    assert q.best([q.lane("a")]) is q.lane("c")  # a lane passed over: the next one
    slots["b"] = frozenset({"w1", "w3"})  # a worker that runs b came
    q.regroup()
    assert q.lane("a") is not q.lane("b") and len(q) == 5
    assert [q.pop(q.lane("b")).id for _ in range(2)] == ["b1", "b4"] and [q.pop(q.lane("a")).id] == ["a0"]
    slots["b"] = frozenset({"w1"})  # it left: a and b share their slots again, and one lane
    q.regroup()
    assert q.lane("a") is q.lane("b") and [q.pop(q.lane("a")).id] == ["a3"] and q.counts == [0, 0, 1, 0]
    q.pop(q.lane("c"))
    for i, tenant in enumerate(["x", "y", "x", "y"]):  # tenants moved to another lane keep their turns
        t = make_task(f"b-{tenant}{i}", "normal")
        t.name, t.tenant = "b", tenant
        q.push(t)
    slots["b"] = frozenset({"w4"})
    q.regroup()
    assert [q.pop(q.lane("b")).id for _ in range(4)] == ["b-x0", "b-y1", "b-x2", "b-y3"]


def test_result_cache_evicts_least_recently_used():
    c = fw.ResultCache(max_size=2, ttl=100)
    c.put("a", 1, now=0)
    c.put("b", 2, now=0)
    assert c.get("a", now=1) == 1  # a is now the most recent
    c.put("c", 3, now=1)
    assert c.get("b", now=1) is None and c.get("a", now=1) == 1 and c.get("c", now=1) == 3
    info = c.info()
    assert (info.evictions, info.hits, info.misses, info.size) == (1, 3, 1, 2)


def test_result_cache_honours_ttl_on_read_and_reap():
    c = fw.ResultCache(max_size=10, ttl=5)
    c.put("a", 1, now=0)
    c.put("b", 2, now=3)
    assert c.get("a", now=4.9) == 1
    assert c.get("a", now=5.0) is None  # expired on read even before a sweep
    assert c.reap(now=7) == 0 and len(c) == 1
    assert c.reap(now=8) == 1 and len(c) == 0
    assert c.info().expired == 2


# -- registry ---------------------------------------------------------------------------

RECORD: list = []
GATES: dict = {}
COUNTS: dict = {}


@fw.task(name="t.add")
def t_add(x, y):
    return x + y


@fw.task(name="t.fail")
def t_fail(message):
    raise ValueError(message)


@fw.task(name="t.block")
def t_block(key):
    """Runs until the test opens GATES[key] (10 s at most)."""
    GATES.setdefault(key, threading.Event()).wait(10)
    return key


@fw.task(name="t.record")
def t_record(tag):
    RECORD.append(tag)
    return tag


@fw.task(name="t.flaky", retries=2)
def t_flaky(key, failures):
    COUNTS[key] = COUNTS.get(key, 0) + 1
    if COUNTS[key] <= failures:
        raise RuntimeError(f"attempt {COUNTS[key]} fails")
    return COUNTS[key]


@fw.task(name="t.bad_result")
def t_bad_result():
    return object()


@fw.task(name="t.async_add")
async def t_async_add(x, y):
    await asyncio.sleep(0.01)
    return x + y


def test_task_decorator_registers_and_keeps_a_plain_function():
    @fw.task
    def plain_task(x):
        return x * 2

    @fw.task(name="reports.build", priority="high", retries=3, timeout=30.0)
    def build(report_id):
        return report_id

    assert plain_task(21) == 42 and build(7) == 7  # still local calls
    spec = fw._registry["plain_task"]
    assert spec.fn is plain_task and (spec.priority, spec.retries, spec.timeout) == ("normal", 0, None)
    spec = fw._registry["reports.build"]
    assert (spec.priority, spec.retries, spec.timeout) == ("high", 3, 30.0)
    assert fw._registry["t.async_add"].is_async


def test_task_names_are_unique_and_options_checked():
    def other(x, y):
        return x

    other.__name__ = "t_add"
    with pytest.raises(ValueError, match="already registered"):
        fw.task(name="t.add")(other)
    with pytest.raises(ValueError, match="priority"):
        fw.task(priority="urgent")(other)
    with pytest.raises(ValueError, match="retries"):
        fw.task(retries=-2)(other)


# -- the plane's core: no sockets, no threads, a fake clock -------------------------------


def spec(name, **options):
    return fw.TaskSpec(lambda *a, **k: None, name, **options)


def check_invariant(core):
    """The accounting of SPEC §5, and every index agreeing with every state:
    the queue and the timers, held tasks, the running per limit, keys,
    aliases and the schedules' running counts."""
    table, flow = core.table, core.flow
    c = table.counts
    assert table.submitted == sum(c.values()), c
    assert sum(table.queue.counts) + flow.held_count == c["queued"]
    held = [e[2] for heap in flow.held.values() for e in heap if e[2].blocked is not None]
    assert len(held) == len(set(held)) == flow.held_count  # a task is held in one place at most
    assert table.timers.live + table.calendar.live == c["scheduled"]
    workers = [core.workers.zero, *core.workers.by_id.values()]
    assert sum(len(w.in_flight) for w in workers) == c["running"]
    assert len(table.tasks) == c["queued"] + c["scheduled"] + c["running"]
    running, running_tenant = collections.Counter(), collections.Counter()
    for t in table.tasks.values():
        if t.state == "queued":
            assert (t.queued or t.blocked is not None) and not (t.queued and t.blocked) and t.holder is None
        elif t.state == "scheduled":
            assert t.timer is not None and not t.queued
        else:
            assert t.state == "running" and t.holder.in_flight[t.id] is t
            if t.limits is not None:
                running[t.name] += 1
                if t.tenant is not None:
                    running_tenant[t.name, t.tenant] += 1
    assert +flow.running == running and +flow.running_tenant == running_tenant  # what the limits count
    for (name, key), t in flow.keys.items():  # a key is held by an unfinished task of that name, with that key
        assert t.state not in fw.TERMINAL and t.name == name and t.key == key and table.tasks[t.id] is t
    for alias, t in table.aliases.items():  # a joined id answers for the task it joined
        assert t.joined is not None and alias in t.joined and (table.tasks.get(t.id) or table.cache.peek(t.id, 0))
    for s in core.schedules.by_name.values():  # a schedule's running runs are its unfinished tasks
        assert s.running == sum(1 for t in table.tasks.values() if t.schedule == s.name) >= 0
    parked = sum(cs.poll is not None for cs in core.waiters.clients.values()) + len(core.waiters.fetches)
    assert core.waiters.parked == parked == sum(core.waiters.parked_by_conn.values())
    for w in workers:  # never beyond its slots (the plane's own: its depth with a journal)
        assert len(w.in_flight) <= w.concurrency * (core.workers.zero_depth if w is core.workers.zero else 1)


class Core:
    """A PlaneCore driven by hand: a fake clock, request handles that must
    each be answered at most once, worker zero's jobs, and what each client
    received."""

    def __init__(self, local=("a", "b"), zero_depth=None, **kw):
        self.now = 1000.0  # the wall clock; the monotonic one is it less ``offset`` (a clock step changes that)
        self.offset = 0.0
        kw.setdefault("concurrency", 2)
        kw.setdefault("retry_backoff", 1.0)
        self.kw, self.local, self.zero_depth = kw, local, zero_depth
        self.core = self.new_core("plane-1")
        self.disk = FakeDisk()
        self.handles = itertools.count(1)
        self.open = set()  # requests sent and not answered
        self.replies = {}  # request -> its Reply
        self.polls = {}  # poll request -> client
        self.jobs = []  # given to worker zero, not finished
        self.delivered = collections.defaultdict(list)  # task id -> RESULTs its client received
        self.closed = []  # connections the core cut

    @property
    def at(self):
        return fw.At(self.now, self.now - self.offset)

    def new_core(self, plane_id):
        specs = [n if isinstance(n, fw.TaskSpec) else spec(n) for n in self.local]
        core = fw.PlaneCore(plane_id, {s.name: s for s in specs}, self.at, **self.kw)
        if self.zero_depth is not None:
            core.workers.zero_depth = self.zero_depth
        return core

    def ev(self, event):
        """The core takes an event now; its actions are applied."""
        return self.apply(self.core.handle(event, self.at))

    def deadline(self):
        """When (by the wall clock) the core next has something to do."""
        return self.now + self.core.next_deadline(self.at)

    def request(self):
        h = next(self.handles)
        self.open.add(h)
        return h

    def apply(self, acts):
        for a in acts or ():
            if type(a) is fw.Journal:
                assert a is acts[0]  # committed before anything else is done
                self.disk.write(a)
            elif type(a) is fw.Reply:
                assert a.req in self.open, f"request {a.req} answered twice, or never made"
                self.open.discard(a.req)
                self.replies[a.req] = a
                if a.req in self.polls:
                    for item in a.items:
                        r = json.loads(item)
                        self.delivered[r["id"]].append(r)
            elif type(a) is fw.Run:
                self.jobs.extend(a.jobs)
            elif type(a) is fw.Cut:
                self.closed.append(a.conn)
        check_invariant(self.core)
        return acts

    def submit(self, client, *tasks):
        h = self.request()
        self.ev(fw.Submit(h, client, [dict(t) for t in tasks]))
        return self.replies[h].fields["rejected"]

    def poll(self, client, wait=5.0):
        if client not in self.core.waiters.clients:  # a first poll is answered at once; a real client has polled before
            self.ev(fw.Poll(self.request(), 7, client, 0))
        h = self.request()
        self.polls[h] = client
        self.ev(fw.Poll(h, 7, client, wait))
        return h

    def finish(self, job, state="succeeded", value=None, error=None):
        self.jobs.remove(job)
        item = fw.encode_result(job.id, state, value, error, run=job.run)
        self.ev(fw.LocalDone([(job.id, job.run, state, item, error)]))

    def tick(self, dt=0.0):
        self.now += dt
        return self.ev(fw.TICK)

    def reply(self, h):
        return self.replies.get(h)

    def restart(self, dt=0.0):
        """The plane crashes and a new one starts from the journal."""
        self.now += dt
        self.core = self.new_core("new-id")
        self.jobs, self.open, self.polls = [], set(), {}
        return self.ev(fw.Restore(self.disk.saved()))


class FakeDisk:
    """What a journal file would hold, from the Journal actions (the columns
    of _JOURNAL_SCHEMA, in order)."""

    def __init__(self):
        self.rows, self.counters = {}, None

    def write(self, journal):
        for r in journal.records:  # [id, body or None (kept), columns ...], or [id] (forgotten)
            if len(r) == 1:
                self.rows.pop(r[0], None)
            elif r[1] is not None:
                self.rows[r[0]] = [r[0], json.dumps(r[1]), *r[2:]]
            else:
                self.rows[r[0]][2:] = list(r[2:])
        self.counters = json.loads(json.dumps(journal.counters))

    def saved(self):
        return {"plane": "plane-1", "counters": self.counters, "rows": [tuple(r) for r in self.rows.values()]}


def item(tid, name="a", **options):
    return {"id": tid, "name": name, "args": [], "kwargs": {}, **options}


def raised(message="boom"):
    return fw._error("raised", "ValueError", message)


class FakeWorker:
    """A subworker as the core sees it: pulls (each a request) on a connection."""

    def __init__(self, h, wid, tasks, concurrency=2, conn=None, max_message_size=None):
        self.h, self.id, self.concurrency = h, wid, concurrency
        self.max_message_size = max_message_size
        self.tasks = {name: {} for name in tasks}
        self.conn = conn if conn is not None else 100_000 + next(h.handles)
        self.running = {}  # task id -> run
        self.pulls = []  # requests outstanding

    def pull(self, results=(), returned=(), credit=None, info=False, holding=None, leaving=False):
        h = self.h.request()
        self.pulls.append(h)
        info = {"name": self.id, "concurrency": self.concurrency, "tasks": self.tasks} if info else None
        if holding is not None:
            info["holding"] = holding
        if info and self.max_message_size:
            info["max_message_size"] = self.max_message_size
        credit = self.concurrency if credit is None else credit
        self.h.ev(fw.Pull(h, self.conn, self.id, credit, list(results), list(returned), info, leaving))
        self.collect()
        return h

    def collect(self):
        for h in list(self.pulls):
            r = self.h.replies.get(h)
            if r is not None:
                self.pulls.remove(h)
                for t in r.items or ():
                    t = json.loads(t)
                    self.running[t["id"]] = t["run"]
        return self

    def register(self):
        """Register, then park a request for work (its handle)."""
        self.pull(info=True)
        return self.pull()

    def park(self):
        """Keep a request parked, as a real worker does while it has room."""
        if not self.pulls:
            self.pull()
        return self

    def result(self, tid, state="succeeded", value=None, error=None, run=None):
        run = self.running.pop(tid) if run is None else run
        r = {"id": tid, "state": state, "run": run}
        if error is not None:
            r["error"] = error
        elif state == "succeeded":
            r["result"] = value
        return r


def test_core_runs_a_task_on_worker_zero_and_answers_the_parked_poll():
    h = Core()
    poll = h.poll("c1")
    assert h.reply(poll) is None  # parked: nothing to deliver yet
    assert h.submit("c1", item("c1-1", args=[1])) == []
    [job] = h.jobs
    assert (job.id, job.name, job.run) == ("c1-1", "a", 1)
    assert h.core.table.counts["running"] == 1 and h.core.table.tasks["c1-1"].worker == "plane"
    h.finish(job, value=42)
    assert [r["result"] for r in h.delivered["c1-1"]] == [42]
    assert h.core.table.counts["succeeded"] == 1 and h.core.table.cache.peek("c1-1", h.at.mono).state == "succeeded"


def test_core_orders_the_queue_by_priority_then_first_in_first_out():
    h = Core(concurrency=1)
    h.submit("c", item("block"))
    order = [("l1", "low"), ("n1", "normal"), ("c1", "critical"), ("h1", "high"), ("n2", "normal"), ("c2", "critical")]
    h.submit("c", *[item(tid, priority=p) for tid, p in order[:3]])
    h.submit("c", *[item(tid, priority=p) for tid, p in order[3:]])
    ran = []
    while h.jobs:
        job = h.jobs[0]
        ran.append(job.id)
        h.finish(job)
    assert ran == ["block", "c1", "c2", "h1", "n1", "n2", "l1"]


def test_core_retries_wait_their_backoff_then_run_again():
    h = Core()
    h.submit("c", item("t", retries=2))
    h.finish(h.jobs[0], "failed", error=raised("first"))
    task = h.core.table.tasks["t"]
    assert task.state == "scheduled" and task.due == h.now + 1.0 and task.error == "ValueError: first"
    assert h.core.table.timers.next_due() == h.now + 1.0 and h.deadline() <= h.now + 1.0
    h.tick(0.999)
    assert not h.jobs
    h.tick(0.001)
    assert [j.run for j in h.jobs] == [2]
    h.finish(h.jobs[0], "failed", error=raised("second"))
    assert h.core.table.tasks["t"].due == h.now + 2.0  # doubles
    h.tick(2.0)
    h.finish(h.jobs[0], value="ok")
    status = h.core.task_detail("t", h.at)
    assert (status["state"], status["attempts"], status["error"]) == ("succeeded", 3, None)
    assert h.core.figures.counters["retried"] == 2


def test_core_a_timeout_or_a_final_failure_is_not_retried():
    h = Core()
    poll = h.poll("c")
    h.submit("c", item("t1", retries=3), item("t2"))
    h.finish(h.jobs[0], "failed", error=fw._error("timeout", "TaskTimeout", "too slow"))
    h.finish(h.jobs[0], "failed", error=raised())
    assert h.reply(poll) is not None
    assert [r["error"]["kind"] for r in h.delivered["t1"]] == ["timeout"]
    assert h.core.table.counts["failed"] == 2 and h.core.figures.counters["retried"] == 0


def test_core_delayed_task_runs_at_its_time_and_a_cancel_frees_it():
    h = Core()
    h.submit("c", item("later", delay=10), item("never", delay=5))
    assert h.core.table.counts["scheduled"] == 2 and not h.jobs
    assert h.core.table.timers.next_due() == h.now + 5
    h.ev(fw.Cancel(h.request(), ["never"]))
    assert h.core.table.counts["cancelled"] == 1 and h.core.table.timers.live == 1
    h.tick(5)
    assert not h.jobs
    h.tick(5)
    assert [j.id for j in h.jobs] == ["later"]
    cancelled = h.request()
    h.ev(fw.Cancel(cancelled, ["later"]))  # running: not cancelled
    assert h.reply(cancelled).fields["ids"] == []


def test_core_refuses_duplicate_ids_unknown_names_and_submissions_while_stopping():
    h = Core()
    assert h.submit("c", item("x")) == []
    rejected = h.submit("other", item("x"), item("y", name="nobody"))
    assert [(r["id"], r["error"]["kind"]) for r in rejected] == [("x", "protocol"), ("y", "unknown_task")]
    assert h.submit("c", item("x")) == [] and h.core.table.submitted == 1  # its client sent it again: accepted once
    h.finish(h.jobs[0])
    assert [r["id"] for r in h.submit("other", item("x"))] == ["x"]  # still in the result cache
    assert h.submit("c", item("x")) == [] and h.core.table.submitted == 1
    h.ev(fw.Stop())
    r = h.request()
    h.ev(fw.Submit(r, "c", [item("z")]))
    assert h.reply(r).op == "error" and "stopping" in h.reply(r).fields["error"]["message"]
    assert h.core.table.submitted == 1


def test_core_parked_fetch_is_answered_on_completion_or_at_its_deadline():
    h = Core()
    h.submit("c", item("t1"), item("t2"))
    f = h.request()
    h.ev(fw.Fetch(f, 7, ["t1", "t2"], 30.0))
    h.finish(h.jobs[0], value=1)
    assert h.reply(f) is None  # t2 still runs
    h.finish(h.jobs[0], value=2)
    assert [json.loads(i)["result"] for i in h.reply(f).items] == [1, 2]
    h.submit("c", item("t3", delay=100))
    g = h.request()
    h.ev(fw.Fetch(g, 7, ["t3", "nope"], 2.0))
    h.tick(1.0)
    assert h.reply(g) is None
    h.tick(1.5)
    assert [json.loads(i)["state"] for i in h.reply(g).items] == ["scheduled", "unknown"]


def test_core_dispatch_is_least_loaded_and_never_beyond_a_workers_slots():
    h = Core(local=())
    ws = [FakeWorker(h, f"w{i}", ["job"], concurrency=2) for i in range(3)]
    for w in ws:
        w.register()
    h.submit("c", *[item(f"t{i}", "job") for i in range(4)])
    for w in ws:
        w.collect().park()
    assert sorted(len(w.running) for w in ws) == [1, 1, 2]  # spread before doubling up
    h.submit("c", *[item(f"u{i}", "job") for i in range(4)])
    for w in ws:
        w.collect().park()
    assert [len(w.running) for w in ws] == [2, 2, 2] and h.core.table.counts["queued"] == 2
    busy = ws[1]
    tid = next(iter(busy.running))
    busy.pull(results=[busy.result(tid)])  # a slot frees: that worker gets the next task
    for w in ws:
        w.collect()
    assert [len(w.running) for w in ws] == [2, 2, 2] and h.core.table.counts["queued"] == 1


def test_core_a_full_workers_request_is_parked_not_answered():
    h = Core(local=())
    w = FakeWorker(h, "w", ["job"], concurrency=1)
    w.register()
    h.submit("c", item("t1", "job"), item("t2", "job"))
    w.collect()
    parked = w.pull()
    assert h.reply(parked) is None  # no answer until there is room and work: no busy loop
    w.pull(results=[w.result("t1")])  # a second request carrying the result
    assert h.reply(parked).items  # the parked one takes t2
    assert list(w.collect().running) == ["t2"]


def test_core_a_batch_stays_within_the_workers_message_limit_and_a_task_too_large_fails():
    h = Core(local=())
    w = FakeWorker(h, "w", ["job"], concurrency=8, max_message_size=65536)
    parked = w.register()
    arg = "x" * 25_000
    h.submit("c", item("big", "job", args=["y" * 70_000]), *[item(f"t{i}", "job", args=[arg]) for i in range(3)])
    assert sum(len(i) for i in h.reply(parked).items) < 65536 - 4096
    assert sorted(w.collect().running) == ["t0", "t1"]  # the third waits for the next request
    w.pull()
    assert sorted(w.collect().running) == ["t0", "t1", "t2"]
    poll = h.poll("c", wait=0)
    (big,) = [json.loads(i) for i in h.reply(poll).items]
    assert big["state"] == "failed" and big["error"]["type"] == "TaskTooLarge"
    assert "65536" in big["error"]["message"] and h.core.table.tasks.keys() == {"t0", "t1", "t2"}


def test_core_parked_polls_and_fetches_are_bounded_per_connection_and_in_all(monkeypatch):
    monkeypatch.setattr(fw, "MAX_PARKED_PER_CONN", 3)
    monkeypatch.setattr(fw, "MAX_PARKED", 5)
    h = Core()
    h.submit("c0", item("t"))  # it runs, and runs: every poll and fetch would wait
    conn_polls = []
    for i in range(4):  # one connection, four clients: the fourth is answered at once
        h.ev(fw.Poll(h.request(), 9, f"c{i}", 0))  # known to the plane (a first poll is not parked)
        r = h.request()
        h.ev(fw.Poll(r, 1, f"c{i}", 30.0))
        conn_polls.append(h.reply(r))
    assert conn_polls[:3] == [None] * 3 and conn_polls[3].items == []
    f = h.request()
    h.ev(fw.Fetch(f, 1, ["t"], 30.0))  # a fetch counts too
    assert h.reply(f) is not None
    parked = [h.request() for _ in range(3)]
    for r, conn in zip(parked, (2, 2, 3), strict=True):
        h.ev(fw.Fetch(r, conn, ["t"], 30.0))
    assert [h.reply(r) is None for r in parked] == [True, True, False]  # five in all
    assert h.core.waiters.parked == 5
    h.tick(31.0)  # all answered at their deadline, and the counts are back to zero
    assert h.core.waiters.parked == 0 and h.core.waiters.parked_by_conn == {}


def test_freshness_takes_each_message_once_under_a_good_ticket_and_forgets_safely():
    f = fw._Freshness("boot", window=8, sessions=2)
    assert f.take("s1", 1, "") == "stale" and f.take("s1", 1, "other.1") == "stale"
    assert f.take("s1", 1, "boot.1") == "stale"  # a ticket it never gave
    t1 = f.ticket()
    assert [f.take("s1", n, t1) for n in (1, 1, 3, 2, 2)] == ["ok", "replay", "ok", "ok", "replay"]
    assert f.take("s1", 20, t1) == "ok" and f.take("s1", 12, t1) == "replay"  # older than the window
    t2, t3 = f.ticket(), f.ticket()
    assert f.take("s2", 1, t2) == "ok" and f.take("s3", 1, t3) == "ok"  # s1 is forgotten ...
    assert f.take("s1", 21, t1) == "stale"  # ... and with it its ticket: nothing it sent is taken again
    assert f.take("s2", 2, t2) == "ok"  # later tickets stay good
    t4 = f.ticket()
    assert f.take("s4", 1, t4) == "ok"  # s2 is forgotten now: its ticket goes, and every one before it
    assert f.take("s2", 3, t2) == "stale" and f.take("s3", 2, t3) == "ok"
    t5 = f.ticket()  # a sender told "stale" sends again with a new ticket, numbering on
    assert f.take("s2", 3, t5) == "ok" and f.take("s2", 3, t5) == "replay"


def test_core_worker_zero_runs_what_no_connected_worker_knows():
    h = Core(local=("a", "both"))
    w = FakeWorker(h, "w", ["w.only", "both"])
    w.register()
    assert h.submit("c", item("1", "a"), item("2", "w.only"), item("3", "both")) == []
    w.collect()
    assert [j.id for j in h.jobs] == ["1"]  # the plane's own task runs while a worker is connected
    assert sorted(w.running) == ["2", "3"]  # the worker runs the tasks it knows
    assert h.core.table.tasks["1"].worker == "plane" and h.core.table.tasks["2"].worker == "w"


def test_core_an_idle_slot_never_waits_behind_tasks_only_a_busy_worker_can_run():
    h = Core(local=("plane.only",), concurrency=1)
    a = FakeWorker(h, "wa", ["job"], concurrency=1)
    a.register()
    h.submit("c", item("busy", "job"))
    a.collect()
    h.submit("c", *[item(f"j{i}", "job", tenant=f"t{i % 7}") for i in range(500)])  # only wa runs them: it is busy
    h.submit("c", item("mine", "plane.only"))
    assert [j.id for j in h.jobs] == ["mine"]  # the plane's idle slot took it at once
    b = FakeWorker(h, "wb", ["other"], concurrency=2)
    b.register()
    h.submit("c", item("o1", "other"), item("o2", "other", priority="low"), item("o3", "other"))
    assert sorted(b.collect().running) == ["o1", "o3"]  # wb's two slots, in priority order, at once
    a.park()
    a.pull(results=[a.result("busy")])
    assert list(a.collect().running) == ["j0"]  # wa's own tasks keep their order
    assert h.core.statuses(["j7"], h.at)[0]["waiting"] == "tenant_turn"  # behind the other tenants' turns


def test_core_a_lost_worker_requeues_at_once_or_fails_with_worker_lost():
    h = Core(local=())
    poll = h.poll("c")
    w = FakeWorker(h, "w", ["job"], concurrency=2)
    w.register()
    h.submit("c", item("keep", "job", retries=1), item("lose", "job"))
    w.collect()
    h.ev(fw.ConnClosed(w.conn))
    assert h.reply(poll) is not None
    assert [r["error"]["kind"] for r in h.delivered["lose"]] == ["lost"]
    assert (
        h.core.table.tasks["keep"].state == "queued"
        and h.core.figures.counters["requeued"] == 1
        and h.core.figures.counters["workers_lost"] == 1
    )
    again = FakeWorker(h, "w2", ["job"])
    again.register()
    assert list(again.collect().running) == ["keep"]
    assert h.core.table.tasks["keep"].attempts == 2


def test_core_a_worker_that_leaves_cleanly_is_counted_as_left_and_its_tasks_run_elsewhere():
    h = Core(local=())
    w = FakeWorker(h, "w", ["job"], concurrency=2)
    w.register()
    h.submit("c", item("done", "job"), item("back", "job"))
    w.collect()
    h.ev(fw.TICK)
    w.pull(results=[w.result("done", value=1)], returned=["back"], credit=0, leaving=True)
    d = h.core.stats(h.at)["dispatch"]
    assert (d["workers_left"], d["workers_lost"]) == (1, 0) and "w" not in h.core.workers.by_id
    assert h.core.table.tasks["back"].state == "queued" and h.core.table.tasks["back"].attempts == 0
    assert not w.pulls  # every request of the worker answered
    other = FakeWorker(h, "w2", ["job"])
    other.register()
    assert list(other.collect().running) == ["back"]


def test_core_task_page_has_every_run_and_a_success_shows_no_earlier_error():
    h = Core(local=(), retry_backoff=1.0)
    w = FakeWorker(h, "w", ["job"], concurrency=1)
    w.register()
    h.submit("c", item("t", "job", retries=1, args=["secret-arg"]))
    w.park().collect()
    err = fw._error("raised", "ValueError", "<img src=x>", "Traceback ...\nValueError: <img src=x>\n")
    h.now += 0.5
    w.pull(results=[w.result("t", "failed", error=err)])
    h.tick(1.5)
    w.park().collect()
    h.now += 0.25
    w.pull(results=[w.result("t", value=2)])
    summary = h.core.statuses(["t"], h.at)[0]
    assert summary["state"] == "succeeded" and summary["error"] is None  # the retry succeeded
    page = h.core.task_detail("t", h.at)
    assert [(r["run"], r["state"], r["worker"]) for r in page["runs"]] == [(1, "failed", "w"), (2, "succeeded", "w")]
    assert page["runs"][0]["error"] == "ValueError: <img src=x>" and "Traceback" in page["runs"][0]["traceback"]
    assert page["runs"][0]["finished_at"] - page["runs"][0]["started_at"] == 0.5
    assert page["traceback"] is None and "args" not in page  # arguments only when the operator opts in
    shown = Core(local=("a",), log_args=True)
    shown.submit("c", item("x", "a", args=["visible"]))
    [job] = shown.jobs
    shown.finish(job, "failed", error=err)
    page = shown.core.task_detail("x", shown.at)
    assert page["args"] == ["visible"] and page["traceback"].endswith("ValueError: <img src=x>\n")


def test_core_figures_per_name_throughput_chart_and_failures_kept_in_view():
    h = Core(local=("a", "b"), concurrency=1)
    h.submit("c", item("bad", "b"))
    h.now += 2
    h.finish(h.jobs[0], "failed", error=raised("nope"))
    for i in range(fw.RECENT_TASKS + 10):  # a flood of successes after one failure
        h.submit("c", item(f"ok{i}", "a"))
        h.now += 0.1
        h.finish(h.jobs[0], value=i)
    figures = {f["name"]: f for f in h.core.figures.summaries()}
    assert figures["a"]["succeeded"] == fw.RECENT_TASKS + 10 and figures["a"]["failure_rate"] == 0
    assert figures["a"]["p50"] == pytest.approx(0.1) and figures["a"]["p95"] == pytest.approx(0.1)
    assert figures["b"]["failed"] == 1 and figures["b"]["failure_rate"] == 1.0
    assert figures["b"]["last_failure"]["id"] == "bad" and figures["b"]["p50"] == pytest.approx(2.0)
    chart = h.core.figures.chart(h.at)
    assert len(chart) == 60 and sum(b[1] for b in chart) == fw.RECENT_TASKS + 10 and sum(b[2] for b in chart) == 1
    assert [t["id"] for t in h.core.recent_tasks(5, "failed", h.at)] == ["bad"]  # still in view
    assert [t["id"] for t in h.core.recent_tasks(5, None, h.at, "bad")] == ["bad"]
    assert len(h.core.recent_tasks(3, None, h.at, "ok")) == 3
    h.now += fw.THROUGHPUT_WINDOW + 20
    assert sum(b[1] + b[2] for b in h.core.figures.chart(h.at)) == 0  # older than 10 minutes


def test_core_purge_cancels_queued_tasks_only():
    h = Core(local=("a",), concurrency=1)
    h.submit("c", item("run", "a"), item("q1", "a"), item("q2", "a", priority="low"), item("later", "a", delay=60))
    ids = h.core.queued_ids(None)
    assert ids == ["q1", "q2"] and h.core.queued_ids("low") == ["q2"]
    cancelled = []
    h.ev(fw.Cancel(None, h.core.queued_ids("low"), cancelled, True))
    h.ev(fw.Cancel(None, ["q1", "later", "run"], cancelled, True))
    assert cancelled == ["q2", "q1"]
    t = h.core.stats(h.at)["tasks"]
    assert (t["cancelled"], t["scheduled"], t["running"], t["queued"]) == (2, 1, 1, 0)


def test_core_heartbeat_expiry_drops_a_silent_worker_and_cuts_it_off():
    h = Core(local=(), heartbeat_timeout=5.0)
    w = FakeWorker(h, "w", ["job"])
    w.register()
    h.now += 3
    h.ev(fw.Heartbeat("w"))
    assert h.deadline() <= h.now + 5.001
    h.tick(4.9)
    assert "w" in h.core.workers.by_id and not h.closed
    h.tick(0.2)
    assert "w" not in h.core.workers.by_id and h.closed == [w.conn]


def test_core_late_and_stale_results_are_ignored_so_a_task_completes_once():
    h = Core(local=(), heartbeat_timeout=5.0)
    h.poll("c")
    w = FakeWorker(h, "w", ["job"], concurrency=1)
    w.register()
    h.submit("c", item("t", "job", retries=2))
    w.collect()
    run = w.running["t"]
    w.pull(results=[w.result("t", run=run + 7)])  # not the run the plane sent: ignored
    assert h.core.figures.counters["late"] == 1 and h.core.table.tasks["t"].state == "running"
    h.tick(6)  # silent: dropped, the task goes back to the queue
    other = FakeWorker(h, "w2", ["job"], conn=99)
    other.register()
    w.pull(results=[w.result("t", run=run)])  # the zombie's copy arrives: it registered afresh
    assert h.core.figures.counters["late"] >= 2
    other.pull(results=[other.result("t", value="done")])
    assert [r["state"] for r in h.delivered["t"]] == []  # the client has not polled again yet
    h.poll("c")
    assert [r.get("result") for r in h.delivered["t"]] == ["done"]


def test_core_a_worker_that_lost_an_answer_registers_again_and_what_it_never_got_runs_again():
    h = Core(local=())
    h.poll("c")
    w = FakeWorker(h, "w", ["job"], concurrency=2)
    w.register()
    h.submit("c", item("a", "job"), item("b", "job"))
    w.collect()
    first = dict(w.running)
    assert sorted(first) == ["a", "b"]
    del w.running["b"]  # the answer that carried "b" was damaged on its way: it holds only "a"
    w.pull(info=True, holding=["a"])
    assert h.core.table.tasks["b"].state == "queued" and h.core.table.tasks["a"].state == "running"
    w.park()
    assert w.running["b"] == first["b"] + 1  # dispatched again, as a new run
    w.pull(results=[w.result("b", run=first["b"], value="old")])  # the lost dispatch reached it after all
    assert h.core.table.tasks["b"].state == "running" and h.core.figures.counters["late"] == 1
    w.pull(results=[w.result("a", value=1), w.result("b", value=2)])
    h.poll("c")
    assert {tid: [r.get("result") for r in rs] for tid, rs in h.delivered.items()} == {"a": [1], "b": [2]}
    check_invariant(h.core)


def test_core_hand_back_keeps_the_tasks_place_and_its_attempt_count():
    h = Core(local=())
    w = FakeWorker(h, "w", ["job"], concurrency=1)
    w.register()
    h.submit("c", item("first", "job"), item("second", "job"))
    w.collect()
    w.pull(returned=["first"], credit=0)
    assert h.core.figures.counters["handed_back"] == 1 and h.core.table.tasks["first"].attempts == 0
    other = FakeWorker(h, "w2", ["job"], concurrency=1)
    other.register()
    assert list(other.collect().running) == ["first"]  # it kept its place ahead of "second"


def test_core_close_answers_every_parked_request():
    h = Core(local=("a",))
    poll = h.poll("c")
    w = FakeWorker(h, "w", ["job"])
    parked = w.register()
    h.submit("c", item("t", "a", delay=50))
    f = h.request()
    h.ev(fw.Fetch(f, 7, ["t"], 30))
    h.ev(fw.Stop())
    h.ev(fw.Close())
    assert h.reply(poll).fields == {"closing": True, "lost": [["t", "scheduled"]]}  # what will not finish
    assert h.reply(parked).op == "tasks" and h.reply(f).op == "error"
    assert not h.open


def journaled(**kw):
    return Core(journaling=True, **kw)


def test_core_with_a_journal_the_planes_own_runs_wait_committed_in_priority_order():
    h = journaled(concurrency=1)
    h.submit("c", *[item(f"t{i}", priority="low") for i in range(6)])
    assert len(h.jobs) == 4 * 1  # its slots times its depth: committed as running, waiting for a runner
    assert [j.rank for j in h.jobs] == [3] * 4 and h.core.table.counts["queued"] == 2


def test_core_restarts_from_its_journal_with_queue_order_times_and_results():
    h = journaled(concurrency=1, zero_depth=1)
    h.submit("c", item("block"), item("q1", priority="low"), item("q2", priority="high"), item("q3", priority="high"))
    h.submit("c", item("later", delay=30), item("done"))
    h.ev(fw.Cancel(h.request(), ["done"]))
    assert [r["id"] for r in h.submit("c", item("block"))] == []  # sent twice: accepted once
    due = h.core.table.tasks["later"].due
    h.restart(dt=5)
    core = h.core
    assert core.id == "plane-1"  # the plane keeps its identity
    t = core.stats(h.at)["tasks"]
    assert (t["submitted"], t["queued"], t["scheduled"], t["running"], t["cancelled"]) == (6, 3, 1, 1, 1)
    assert core.table.cache.peek("done", h.at.mono).state == "cancelled" and core.table.tasks["later"].due == due
    ran = []
    while h.jobs:  # "block" ran on the plane when it died: queued again, at its old place (behind "high")
        ran.append(h.jobs[0].id)
        h.finish(h.jobs[0])
    assert ran == ["q2", "q3", "block", "q1"] and core.table.tasks["later"].state == "scheduled"
    assert core.task_detail("block", h.at)["attempts"] == 1
    h.tick(25)
    assert [j.id for j in h.jobs] == ["later"]


def test_core_a_task_running_at_two_plane_crashes_fails_instead_of_running_again():
    h = journaled()
    h.poll("c")
    h.submit("c", item("poison"))
    h.restart()
    assert [j.id for j in h.jobs] == ["poison"] and h.core.table.tasks["poison"].crashes == 1
    h.restart()
    status = h.core.task_detail("poison", h.at)
    assert status["state"] == "failed" and "crashed, twice" in status["error"] and not h.jobs


def test_core_a_worker_back_after_a_restart_reports_its_runs_and_a_late_one_is_queued_again():
    h = journaled(local=(), heartbeat_timeout=5.0)
    w1, w2 = FakeWorker(h, "w1", ["job"], 1), FakeWorker(h, "w2", ["job"], 1)
    w1.register()
    w2.register()
    h.submit("c", item("t1", "job"), item("t2", "job"))
    w1.collect(), w2.collect()
    h.restart()
    assert [ghost.ghost for ghost in h.core.workers.by_id.values()] == [True, True]
    assert h.core.table.counts["running"] == 2 and sorted(h.core.workers.by_id) == ["w1", "w2"]
    w1.pulls.clear()
    w1.pull(results=[w1.result(next(iter(w1.running)), value="v1")], info=True)  # back, with its result
    assert h.core.table.counts["succeeded"] == 1 and not h.core.workers.by_id["w1"].ghost
    w1.pull()  # ready for more
    h.now += 3
    h.ev(fw.Heartbeat("w1"))
    h.tick(3)  # w2 never came back: its task is queued again, not failed
    assert (
        "w2" not in h.core.workers.by_id
        and h.core.table.counts["queued"] == 0
        and h.core.figures.counters["workers_lost"] == 0
    )
    assert list(w1.collect().running) == ["t2"]  # w1 took it


def test_core_a_dispatch_lost_in_a_crash_is_queued_again_when_its_worker_comes_back():
    h = journaled(local=())
    w = FakeWorker(h, "w", ["job"], 2)
    w.register()
    h.submit("c", item("got", "job"), item("lost", "job"))
    w.collect()
    w.running.pop("lost")  # the reply carrying it died with the plane
    h.restart()
    w.pulls.clear()
    info = {"tasks": w.tasks, "concurrency": 2, "holding": ["got"]}
    h.ev(fw.Pull(h.request(), w.conn, "w", 2, [], [], info, False))
    assert h.core.table.tasks["got"].state == "running" and h.core.table.tasks["lost"].state == "queued"
    assert h.core.table.tasks["lost"].attempts == 0


def run_random_sequence(seed, steps=40):
    """Random events thrown at the core; the invariant is checked after each
    (``Core.apply``).  Submissions with priorities, retries, delays, ETAs,
    tenants, limits, keys shared across clients and debounce, under a
    ``max_queued``; a periodic task; workers that come, report, hand back,
    leave and vanish; cancels, purges, fetches, polls, time passing and the
    wall clock stepping; with a journal, stops, crashes and restarts that
    carry on.  Then everything is driven to its end, and every submission
    the core accepted (a joined one too, under its own id) must have
    reached its client with one outcome."""
    rng = random.Random(seed)
    journaling = seed % 2 == 1
    local = ("a", "b", "both", periodic("beat", every=rng.choice([1.5, 4.0])))
    # (results are kept 10 days: a result restored after the wall clock stepped an hour counts as an hour old)
    h = Core(local=local, concurrency=rng.randint(1, 3), heartbeat_timeout=5.0, journaling=journaling,
             max_queued=rng.choice([None, None, 6, 30]), result_cache_ttl=864000.0)  # fmt: skip
    clients = ["c1", "c2"]
    accepted = {}  # submission id -> client
    joins = set()  # those that joined another task by its key
    workers = []
    names = ["a", "b", "both", "w", "both", "a", "nobody"]
    n = itertools.count()
    for _ in range(steps):
        event = rng.random()
        if event < 0.25:
            client = rng.choice(clients)
            tasks = []
            for _ in range(rng.randint(1, 4)):
                tid = f"{client}-{next(n)}" if rng.random() > 0.05 or not accepted else rng.choice(list(accepted))
                options = {"priority": rng.choice(fw.PRIORITIES), "retries": rng.randint(0, 2)}
                if rng.random() < 0.3:
                    options["delay"] = rng.choice([0, 0.5, 3.0])
                elif rng.random() < 0.1:
                    options["eta"] = h.now + rng.choice([-1.0, 0.5, 3.0])  # (on the wall clock)
                if rng.random() < 0.3:  # flow control: tenants, limits, keys (shared by the clients)
                    options["tenant"] = rng.choice(["x", "y"])
                if rng.random() < 0.2:
                    options.update(rng.choice([{"concurrency": 1}, {"tenant_concurrency": 1}, {"rate": "4/s"}]))
                if rng.random() < 0.2:
                    options["key"] = f"k{rng.randint(0, 2)}"
                    if rng.random() < 0.3:
                        options.update(debounce=0.5, debounce_max=1.5)
                tasks.append(item(tid, rng.choice(names), **options))
            h.submit(client, *tasks)
            joins.update(pair[0] for pair in h.replies[max(h.replies)].fields.get("joined", ()))
            for t in tasks:
                if t["id"] not in accepted and (t["id"] in h.core.table.tasks or t["id"] in h.core.table.aliases):
                    accepted[t["id"]] = client
        elif event < 0.35:
            h.poll(rng.choice(clients), wait=rng.choice([0, 5.0]))
        elif event < 0.45 and h.jobs:
            job = rng.choice(h.jobs)
            outcome = rng.random()
            if outcome < 0.6:
                h.finish(job, value=job.id)
            elif outcome < 0.9:
                h.finish(job, "failed", error=raised())
            else:
                h.finish(job, "failed", error=fw._error("timeout", "TaskTimeout", "late"))
        elif event < 0.52:
            ids = rng.sample(list(accepted), min(len(accepted), rng.randint(1, 3))) if accepted else ["nope"]
            h.ev(fw.Cancel(h.request(), ids))
        elif event < 0.58 and len(workers) < 3:
            w = FakeWorker(h, f"w{next(n)}", rng.choice([["w", "both"], ["w"], ["both", "a"]]), rng.randint(1, 3))
            w.register()
            workers.append(w)
        elif event < 0.72 and workers:
            w = rng.choice(workers)
            w.collect()
            if len(w.pulls) >= 2:
                continue
            results, returned = [], []
            for tid in list(w.running):
                roll = rng.random()
                if roll < 0.5:
                    results.append(w.result(tid, value=tid))
                elif roll < 0.6:
                    results.append(w.result(tid, "failed", error=raised()))
                elif roll < 0.65:
                    returned.append(tid)
                    w.running.pop(tid)
            w.pull(results=results, returned=returned)
        elif event < 0.77 and workers:
            w = workers.pop(rng.randrange(len(workers)))
            if rng.random() < 0.5:
                h.ev(fw.ConnClosed(w.conn))
            else:  # it stops cleanly: reports some, hands back the rest, leaves
                w.collect()
                done = [w.result(tid, value=tid) for tid in list(w.running)[: rng.randint(0, len(w.running))]]
                w.pull(results=done, returned=list(w.running), credit=0, leaving=True)
                h.ev(fw.ConnClosed(w.conn))
        elif event < 0.79:
            cancelled = []
            h.ev(fw.Cancel(None, h.core.queued_ids(rng.choice([None, *fw.PRIORITIES])), cancelled, True))
        elif event < 0.82 and accepted:
            ids = rng.sample(list(accepted), min(len(accepted), 2))
            h.ev(fw.Fetch(h.request(), 7, ids, rng.choice([0, 2.0])))
        elif event < 0.84:  # the wall clock steps (NTP, a suspended laptop): deadlines do not move
            step = rng.choice([3600.0, -60.0])
            h.now += step
            h.offset += step
            for w in workers:
                h.ev(fw.Heartbeat(w.id))
            before = set(h.core.workers.by_id)
            h.tick(0.0)
            assert set(h.core.workers.by_id) >= before, f"seed {seed}: a clock step dropped a live worker"
        elif event < 0.87 and journaling:  # the plane stops (or crashes) and starts again from its journal
            if rng.random() < 0.5:
                h.ev(fw.Stop())
                h.ev(fw.Close())
            h.restart(rng.choice([0.0, 2.0]))
            for w in workers:  # they come back on their own, saying what they hold
                w.pulls = []
                w.pull(info=True, holding=list(w.running))
                w.pull()
            for client in clients:
                h.poll(client, wait=0)
        else:
            for w in workers:
                if rng.random() < 0.8:
                    h.ev(fw.Heartbeat(w.id))
            h.tick(rng.choice([0.0, 0.3, 1.0, 2.5]))
            workers = [w for w in workers if w.id in h.core.workers.by_id]
        if journaling and rng.random() < 0.1:  # the journal holds what the plane holds, flow options and all
            fields = ("state", "seq", "attempts", "key", "tenant", "limits", "joined", "schedule")
            before = {t.id: tuple(getattr(t, k) for k in fields) for t in h.core.table.tasks.values()}
            copy = fw.PlaneCore("x", {}, h.at, journaling=True)
            copy.handle(fw.Restore(h.disk.saved()), h.at)
            waiting = {k: v for k, v in before.items() if v[0] != "running"}
            got = {t.id: tuple(getattr(t, k) for k in fields) for t in copy.table.tasks.values() if t.id in waiting}
            second_crash = {t.id for t in h.core.workers.zero.in_flight.values() if t.crashes}  # (they fail)
            assert got == waiting and set(copy.table.tasks) == set(before) - second_crash
            assert set(copy.flow.keys) == {k for k, t in h.core.flow.keys.items() if t.id not in second_crash}
    # The end: a worker that knows everything, every run finishes, time passes.
    finisher = FakeWorker(h, "finisher", ["a", "b", "both", "w", "nobody"], concurrency=8, conn=10**9)
    finisher.register()
    for _ in range(200):
        if not h.core.table.tasks:
            break
        while h.jobs:
            h.finish(h.jobs[0], value="end")
        for w in [*workers, finisher]:
            if len(w.collect().pulls) < 2:
                w.pull(results=[w.result(tid, value="end") for tid in list(w.running)])
            h.ev(fw.Heartbeat(w.id))
        for client in clients:
            h.poll(client, wait=0)
        h.tick(1.0)
    periodic_left = [t for t in h.core.table.tasks.values() if t.schedule is not None]
    assert len(h.core.table.tasks) == len(periodic_left), (
        f"seed {seed}: tasks never finished: {list(h.core.table.tasks)}"
    )
    for client in clients:
        h.poll(client, wait=0)
    missed = [tid for tid in accepted if not h.delivered.get(tid)]  # (a client that missed some asks for them)
    if missed:
        r = h.request()
        h.ev(fw.Fetch(r, 7, missed, 0))
        for item_ in h.replies[r].items:
            h.delivered[json.loads(item_)["id"]].append(json.loads(item_))
    for tid in accepted:  # a task its client sent twice may reach it twice: with the same outcome
        got = {json.dumps(r, sort_keys=True) for r in h.delivered.get(tid, [])}
        assert len(got) == 1, f"seed {seed}: task {tid} reached its client with {len(got)} outcomes: {got}"
        assert json.loads(got.pop())["state"] in fw.TERMINAL
    own = [tid for tid in accepted if tid not in joins]  # (the joined are not tasks of their own)
    periodic_runs = sum(s.runs for s in h.core.schedules.by_name.values())
    assert h.core.table.submitted == len(own) + periodic_runs, f"seed {seed}: the accounting"


def test_core_random_event_sequences_keep_the_accounting_and_end_every_task_once():
    for seed in range(1500):
        run_random_sequence(seed)


# -- flow control (the core) ---------------------------------------------------------------------


def test_core_a_key_joins_the_unfinished_task_and_is_free_once_it_ends():
    h = Core(local=("a",), concurrency=1)
    p1, p2 = h.poll("c1"), h.poll("c2")
    h.submit("c1", item("t1", "a", key="invoice-42"))
    reply = h.replies[max(h.replies)]
    h.submit("c2", item("t2", "a", key="invoice-42"), item("t3", "a", key="other"))
    assert h.replies[max(h.replies)].fields["joined"] == [["t2", "t1"]]
    assert "t2" not in h.core.table.tasks and h.core.table.submitted == 2 and reply.fields["rejected"] == []
    [job] = h.jobs
    h.finish(job, value="paid")
    assert [r["result"] for r in h.delivered["t1"] + h.delivered["t2"]] == ["paid", "paid"]  # one run, two futures
    assert h.delivered["t2"][0]["id"] == "t2"  # c2 hears of it under the id its submission had
    assert h.reply(p1) and h.reply(p2)
    assert ("a", "invoice-42") not in h.core.flow.keys  # free again: a new submission runs anew
    h.submit("c1", item("t4", "a", key="invoice-42"))
    assert "t4" in h.core.table.tasks and h.core.stats(h.at)["flow"]["joined"] == 1


def test_core_debounce_takes_the_newest_arguments_and_runs_by_its_maximum():
    h = Core(local=("a",))
    h.poll("c")
    h.submit("c", item("d1", "a", args=[1], key="k", debounce=1.0, debounce_max=2.5))
    assert h.core.statuses(["d1"], h.at)[0]["waiting"] == "debounce"
    for i, step in enumerate([0.75, 0.75, 0.75], start=2):  # each newer one restarts the wait...
        h.tick(step)
        assert not h.jobs
        h.submit("c", item(f"d{i}", "a", args=[i], key="k", debounce=1.0))
    assert h.core.table.tasks["d1"].due == 1000.0 + 2.5  # ...but not past the burst's maximum
    h.tick(0.125)
    assert not h.jobs
    h.tick(0.125)
    [job] = h.jobs
    assert job.id == "d1" and job.args == [4]  # one run, with the newest arguments
    h.finish(job, value="done")
    assert h.core.table.submitted == 1 and h.core.flow.joined == 3


def test_core_a_concurrency_limit_holds_across_workers_and_never_blocks_other_tasks():
    h = Core(local=())
    w1, w2 = FakeWorker(h, "w1", ["lim", "free"], concurrency=4), FakeWorker(h, "w2", ["lim", "free"], concurrency=4)
    w1.register(), w2.register()
    h.submit("c", *[item(f"l{i}", "lim", concurrency=2) for i in range(6)], item("f1", "free"), item("f2", "free"))
    running = lambda: [t for w in (w1, w2) for t in w.collect().running]  # noqa: E731
    assert sorted(running()) == ["f1", "f2", "l0", "l1"]  # two of the limited, and the others beside them
    status = h.core.statuses(["l2"], h.at)[0]
    assert status["waiting"] == "concurrency" and "2 of 'lim'" in status["why"]
    most = 0
    while h.core.table.tasks:
        w = w1 if w1.running else w2
        tid = sorted(w.running)[0]
        w.pull(results=[w.result(tid, value=1)])
        w1.park(), w2.park()
        most = max(most, sum(1 for t in running() if t.startswith("l")))
    assert most == 2 and h.core.stats(h.at)["tasks"]["succeeded"] == 8


def test_core_a_rate_spaces_starts_and_a_tenant_limit_caps_one_tenant():
    h = Core(local=("paced", "t"), concurrency=8)
    h.submit("c", *[item(f"p{i}", "paced", rate="4/s") for i in range(6)])
    starts = {}
    for _ in range(40):
        for job in list(h.jobs):
            starts.setdefault(job.id, h.now)
            h.finish(job)
        h.now = max(h.now, min(h.deadline(), h.now + 1))
        h.tick()
    times = [starts[f"p{i}"] - 1000.0 for i in range(6)]
    assert [round(b - a, 2) for a, b in itertools.pairwise(times)] == [0.25] * 5  # 4 per second, evenly
    h2 = Core(local=("t",), concurrency=8)
    h2.submit("c", *[item(f"a{i}", "t", tenant="acme", tenant_concurrency=2) for i in range(4)],
              *[item(f"b{i}", "t", tenant="bolt", tenant_concurrency=2) for i in range(4)])  # fmt: skip
    assert sorted(j.id for j in h2.jobs) == ["a0", "a1", "b0", "b1"]
    assert h2.core.statuses(["a2"], h2.now)[0]["waiting"] == "tenant_concurrency"


def test_core_a_task_held_by_a_limit_is_never_stranded():
    h = Core(local=("lim", "x"), concurrency=2)
    h.submit("c", *[item(i, "lim", concurrency=1) for i in ("A", "B", "C")], item("X", "x"))
    assert sorted(j.id for j in h.jobs) == ["A", "X"]
    h.submit("c", item("Y", "x", priority="high"))  # will take the slot A frees, before B
    h.finish(next(j for j in h.jobs if j.id == "A"))
    assert h.core.table.tasks["B"].state == "queued" and h.core.table.tasks["B"].blocked is None  # let out, no slot
    h.ev(fw.Cancel(h.request(), ["B"]))  # ...and cancelled before its turn
    while h.jobs:
        h.finish(h.jobs[0])
    assert "C" not in h.core.table.tasks and h.core.stats(h.at)["tasks"]["succeeded"] == 4  # C ran all the same
    r = Core(local=("r",), concurrency=1)
    r.submit("c", *[item(f"R{i}", "r", rate="1/s") for i in range(3)])
    r.finish(r.jobs[0])
    r.now = r.deadline()
    r.tick()  # R1 is let out...
    r.ev(fw.Cancel(r.request(), ["R1"]))  # ...and cancelled
    for _ in range(5):
        while r.jobs:
            r.finish(r.jobs[0])
        r.now = max(r.now, min(r.deadline(), r.now + 1))
        r.tick()
    assert "R2" not in r.core.table.tasks  # the rate let the next one out all the same


def test_core_keys_are_per_task_name():
    h = Core(local=("a", "b"), concurrency=1)
    h.submit("c", item("busy", "a"))
    h.submit("c", item("ka", "a", key="user:1"), item("kb", "b", key="user:1"), item("ka2", "a", key="user:1"))
    assert (
        "kb" in h.core.table.tasks and "ka2" not in h.core.table.tasks
    )  # the same key on another task name does not join


def test_core_tenants_take_turns_within_a_priority_behind_a_busy_slot():
    h = Core(local=("a",), concurrency=1)
    h.submit("c", item("busy", "a"))
    h.submit(
        "c",
        *[item(f"A{i}", "a", tenant="acme") for i in range(5)],
        *[item(f"B{i}", "a", tenant="bolt") for i in range(2)],
    )
    h.submit("c", item("urgent", "a", priority="high", tenant="bolt"), item("N", "a"))
    assert h.core.statuses(["B0"], h.at)[0]["waiting"] == "tenant_turn"
    assert h.core.statuses(["A2"], h.at)[0]["waiting"] == "queue"
    order = []
    while h.jobs:
        order.append(h.jobs[0].id)
        h.finish(h.jobs[0])
    assert order == ["busy", "urgent", "A0", "B0", "N", "A1", "B1", "A2", "A3", "A4"]


def test_core_max_queued_refuses_what_would_wait_and_drops_nothing():
    h = Core(local=("a",), concurrency=1, max_queued=3)
    h.poll("c")
    rejected = h.submit("c", *[item(f"t{i}", "a") for i in range(6)], item("later", "a", delay=5))
    assert [r["id"] for r in rejected] == ["t4", "t5", "later"]  # one runs, three wait
    assert {r["error"]["kind"] for r in rejected} == {"queue_full"}
    assert isinstance(fw._exception_from_wire(rejected[0]["error"]), fw.QueueFull)
    s = h.core.stats(h.at)
    assert s["flow"]["refused"] == 3 and s["tasks"]["submitted"] == 4  # the accounting holds (checked at each step)
    while h.jobs:
        h.finish(h.jobs[0])
    assert h.core.stats(h.at)["tasks"]["succeeded"] == 4  # every accepted task ran


def test_core_checks_every_move_against_the_table_of_legal_moves():
    h = Core(local=("a",), concurrency=1)
    h.submit("c", item("t", "a"), item("q", "a"))
    task = h.core.table.tasks["q"]
    for illegal in ("succeeded", "scheduled"):  # a queued task cannot finish or be scheduled without running
        with pytest.raises(RuntimeError, match="is not a move a task can make"):
            h.core.table.move(task, illegal, h.at)
    assert task.state == "queued" and fw._TRANSITIONS["queued"] == {"running", "cancelled", "failed"}
    check_invariant(h.core)  # a refused move changed nothing


def test_core_a_defect_inside_an_event_is_answered_logged_and_leaves_nothing_for_the_next(monkeypatch):
    h = Core(local=("a",), concurrency=1)
    h.submit("c", item("t", "a"))
    boom = [True]
    real = h.core.waiters.poll

    def failing(ev, now):
        real(ev, now)
        h.core.out.log(logging.INFO, "scratch of the failing event")
        if boom[0]:
            raise KeyError("a defect")

    monkeypatch.setattr(h.core.waiters, "poll", failing)
    h.core._handlers[fw.Poll] = failing
    r = h.request()
    acts = h.core.handle(fw.Poll(r, 7, "c", 0), h.at)
    h.apply(acts)
    assert h.reply(r) is not None and h.core.stats(h.at)["errors"]["internal"] == 1
    assert [a.msg % a.args for a in acts if type(a) is fw.Log][-1].startswith(
        "internal error in the plane's core on Poll"
    )
    boom[0] = False
    later = h.ev(fw.TICK)
    assert not any(type(a) is fw.Log and "scratch" in a.msg for a in later)  # nothing of it came out later


def test_core_wall_clock_steps_move_the_calendar_and_no_deadline():
    h = Core(local=("a",), concurrency=1, heartbeat_timeout=5.0)
    w = FakeWorker(h, "w", ["job"])
    w.register()
    h.submit("c", item("running", "job"), item("eta", "a", eta=h.now + 600), item("delay", "a", delay=30))
    w.collect()
    poll = h.poll("c", wait=5.0)
    for step in (3600.0, -60.0):  # the wall clock jumps an hour ahead, then a minute back
        h.now += step
        h.offset += step
        h.ev(fw.Heartbeat("w"))
        h.tick(0.5)
        assert "w" in h.core.workers.by_id and h.core.table.tasks["running"].state == "running"  # not dropped
    assert h.core.table.tasks["eta"].state == "running"  # the calendar: an hour ahead, the ETA has come
    assert h.core.table.tasks["delay"].state == "scheduled" and h.reply(poll) is None  # deadlines did not move
    h.tick(4.5)
    assert h.reply(poll) is not None  # the parked poll answered at its deadline, by the monotonic clock
    h.ev(fw.Heartbeat("w"))
    h.tick(25.0)
    assert h.core.table.tasks["delay"].state in ("queued", "running")  # 30 s after it was submitted


def test_core_says_why_a_task_waits():
    h = Core(local=("a",), concurrency=1, retry_backoff=1.0)
    h.submit("c", item("busy", "a"))
    h.submit("c", item("q1", "a", priority="high"), item("q2", "a"), item("t", "a", delay=30))
    why = {s["id"]: (s.get("waiting"), s.get("why")) for s in h.core.statuses(["busy", "q1", "q2", "t"], h.at)}
    assert why["busy"] == (None, None) and why["q1"] == ("slot", "waits for a free slot on a worker that knows it")
    assert why["q2"] == ("queue", "behind 1 task(s) of higher or equal priority")
    assert why["t"] == ("scheduled", "waits 30.0 s for its time")
    h.finish(h.jobs[0], "failed", error=raised())  # "busy" had no retries; q1 runs now
    h.submit("c", item("r", "a", retries=1))
    h.finish(h.jobs[0])
    h.finish(h.jobs[0])  # q2
    h.finish(h.jobs[0], "failed", error=raised())
    assert h.core.statuses(["r"], h.at)[0]["waiting"] == "retry"
    h.submit("c", item("nobody", "w.only"))  # a worker's task, the worker gone since
    assert h.core.task_detail("t", h.at)["waiting"] == "scheduled"


# -- time: ETA, periodic and cron tasks (the core's clock) ----------------------------------


UTC = datetime.timezone.utc
CRON_NAMES = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "oct": 10,
              "nov": 11, "dec": 12, "sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}  # fmt: skip


def reference_values(text, lo, hi):
    """What one cron field allows, the slow obvious way."""
    values = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        step = int(step) if step else 1
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a, b = (int(CRON_NAMES.get(x, x)) for x in base.split("-"))
        else:
            a = int(CRON_NAMES.get(base, base))
            b = hi if "/" in part else a
        values |= {v for v in range(a, b + 1) if (v - a) % step == 0}
    return {0 if v == 7 and hi == 7 else v for v in values}


def reference_next(expr, after):
    """The next minute after ``after`` (UTC) that ``expr`` matches, found by
    walking the days and then the minutes of a matching day."""
    fields = expr.split()
    minute, hour, dom, month, dow = (
        reference_values(f, lo, hi)
        for f, (lo, hi) in zip(fields, [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)], strict=True)
    )
    either = not fields[2].startswith("*") and not fields[4].startswith("*")
    t = after.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    for _ in range(30 * 366):
        in_dom, in_dow = t.day in dom, (t.isoweekday() % 7) in dow
        if t.month in month and ((in_dom or in_dow) if either else (in_dom and in_dow)):
            while True:
                if t.hour in hour and t.minute in minute:
                    return t
                t += datetime.timedelta(minutes=1)
                if t.hour == 0 and t.minute == 0:
                    break
        else:
            t = (t + datetime.timedelta(days=1)).replace(hour=0, minute=0)
    return None


def random_field(rng, lo, hi, names):
    def one():
        kind = rng.randrange(6)
        a = rng.randint(lo, hi)
        b = rng.randint(a, hi)
        if kind == 0:
            return "*"
        if kind == 1:
            return f"*/{rng.randint(1, hi - lo + 1)}"
        if kind == 2:
            return f"{a}-{b}" + (f"/{rng.randint(1, 5)}" if rng.random() < 0.4 else "")
        if kind == 3 and names:
            return rng.choice(names)
        return str(a)

    return ",".join(one() for _ in range(rng.choice([1, 1, 1, 2, 3])))


def test_cron_matches_a_brute_force_reference_on_random_expressions_and_dates():
    rng = random.Random(10)
    months, days = list(CRON_NAMES)[:12], list(CRON_NAMES)[12:]
    checked = 0
    while checked < 1500:
        expr = " ".join(
            [random_field(rng, 0, 59, []), random_field(rng, 0, 23, []), random_field(rng, 1, 31, []),
             random_field(rng, 1, 12, months), random_field(rng, 0, 7, days)]
        )  # fmt: skip
        try:
            cron = fw.Cron(expr)
        except ValueError as e:
            assert "never matches" in str(e), (expr, e)
            continue
        after = datetime.datetime(2024, 1, 1, tzinfo=UTC) + datetime.timedelta(seconds=rng.randrange(5 * 365 * 86400))
        expected = reference_next(expr, after)
        assert cron.next(after) == expected, expr
        checked += 1


@pytest.mark.parametrize(
    "expr, after, expected",
    [
        ("@hourly", "2026-11-26T10:15:00", "2026-11-26T11:00:00"),
        ("@daily", "2026-11-26T10:15:00", "2026-11-27T00:00:00"),
        ("@weekly", "2026-11-26T10:15:00", "2026-11-29T00:00:00"),  # a Sunday
        ("@monthly", "2026-11-26T10:15:00", "2026-12-01T00:00:00"),
        ("@yearly", "2026-11-26T10:15:00", "2027-01-01T00:00:00"),
        ("0 9 * * 7", "2026-11-26T10:15:00", "2026-11-29T09:00:00"),  # Sunday as 7
        ("0 9 * * sun", "2026-11-26T10:15:00", "2026-11-29T09:00:00"),
        ("0 9 13 * fri", "2026-11-26T10:15:00", "2026-11-27T09:00:00"),  # Vixie: the 13th or a Friday
        ("1-30/5 * * * *", "2026-11-26T10:15:00", "2026-11-26T10:16:00"),
        ("0 0 29 feb *", "2026-11-26T10:15:00", "2028-02-29T00:00:00"),
        ("15 10 26 nov thu", "2026-11-26T10:15:00", "2027-11-04T10:15:00"),  # strictly after; November only
    ],
)
def test_cron_fields_names_macros_and_the_vixie_day_rule(expr, after, expected):
    got = fw.Cron(expr).next(datetime.datetime.fromisoformat(after).replace(tzinfo=UTC))
    assert got == datetime.datetime.fromisoformat(expected).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    "expr, field",
    [("* * * * * *", "5 fields"), ("61 * * * *", "minute"), ("*/0 * * * *", "minute"), ("5-1 * * * *", "minute"),
     ("", "5 fields"), ("* 24 * * *", "hour"), ("* * 0 * *", "day of month"), ("* * * 13 *", "month"),
     ("* * * * 8", "day of week"), ("* * * foo *", "month"), ("0 0 31 2 *", "never matches"), ("* * * * mon-", "week")],
)  # fmt: skip
def test_cron_refuses_a_bad_expression_naming_the_field(expr, field):
    with pytest.raises(ValueError, match=field):
        fw.Cron(expr)
    with pytest.raises(ValueError, match=field):
        fw.task(name="never.registered", cron=expr)(lambda: None)


def test_cron_wants_aware_datetimes_and_a_real_zone():
    with pytest.raises(ValueError, match="aware"):
        fw.Cron("* * * * *").next(datetime.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="zone"):
        fw.Cron("* * * * *", tz="Mars/Olympus")
    got = fw.Cron("0 9 * * *", tz="Europe/Paris").next(datetime.datetime(2026, 11, 26, tzinfo=UTC))
    assert got.utcoffset() == datetime.timedelta(hours=1) and got.astimezone(UTC).hour == 8


def periodic(name, **schedule):
    return fw.TaskSpec(lambda: None, name, schedule=schedule)


def epoch(text, tz="Europe/Paris"):
    return datetime.datetime.fromisoformat(text).replace(tzinfo=zoneinfo.ZoneInfo(tz)).timestamp()


def run_schedule_until(h, end, step=60.0):
    """Tick the core's clock minute by minute to ``end``; finish each run of
    worker zero at once; the (wall clock in Paris) times runs started."""
    started = []
    while h.now < end:
        h.tick(step)
        for job in list(h.jobs):
            started.append(datetime.datetime.fromtimestamp(h.now, zoneinfo.ZoneInfo("Europe/Paris")))
            h.finish(job)
    return [t.strftime("%m-%d %H:%M%z") for t in started]


def test_a_cron_task_across_both_daylight_saving_changes_runs_once_per_day():
    h = Core(local=(periodic("nightly", cron="30 2 * * *", tz="Europe/Paris"),))
    h.now = epoch("2026-03-27T12:00:00")
    h.core = h.new_core("plane-1")
    spring = run_schedule_until(h, epoch("2026-03-31T12:00:00"))
    assert spring == ["03-28 02:30+0100", "03-29 03:00+0200", "03-30 02:30+0200", "03-31 02:30+0200"]
    h.now = epoch("2026-10-23T12:00:00")
    h.core = h.new_core("plane-1")
    autumn = run_schedule_until(h, epoch("2026-10-27T12:00:00"))
    assert autumn == ["10-24 02:30+0200", "10-25 02:30+0200", "10-26 02:30+0100", "10-27 02:30+0100"]


def test_an_every_15_minutes_cron_neither_doubles_nor_skips_around_the_changes():
    h = Core(local=(periodic("often", cron="*/15 * * * *", tz="Europe/Paris"),))
    h.now = epoch("2026-10-25T01:50:00")
    h.core = h.new_core("plane-1")
    autumn = run_schedule_until(h, epoch("2026-10-25T03:35:00"))
    # 02:00-02:45 happen twice (CEST, then CET): the first time only
    assert autumn[:7] == ["10-25 02:00+0200", "10-25 02:15+0200", "10-25 02:30+0200", "10-25 02:45+0200",
                          "10-25 03:00+0100", "10-25 03:15+0100", "10-25 03:30+0100"]  # fmt: skip
    h.now = epoch("2026-03-29T01:20:00")
    h.core = h.new_core("plane-1")
    spring = run_schedule_until(h, epoch("2026-03-29T03:35:00"))
    assert spring == ["03-29 01:30+0100", "03-29 01:45+0100", "03-29 03:00+0200", "03-29 03:15+0200",
                      "03-29 03:30+0200"]  # fmt: skip


def test_every_counts_from_the_due_time_and_a_run_still_going_skips_the_next():
    h = Core(local=(periodic("tick", every=10.0),))
    s = h.core.schedules.by_name["tick"]
    assert s.next_due == h.now + 10
    h.tick(10.4)  # a little late: the next is still due 20 s after the start (no drift)
    assert [j.name for j in h.jobs] == ["tick"] and s.next_due == 1020.0
    h.tick(10.0)  # the first run is still going: skipped and counted
    assert len(h.jobs) == 1 and s.skipped == 1 and s.running == 1
    h.finish(h.jobs[0])
    assert s.last_state == "succeeded" and s.running == 0
    h.tick(10.0)
    assert len(h.jobs) == 1 and s.runs == 2
    stats = h.core.stats(h.at)["schedules"]
    assert stats == [{"name": "tick", "every": 10.0, "overlap": False, "next_run": 1040.0, "last_run": 1030.0,
                      "last_task": "tick@1030.000", "last_state": "running", "runs": 2, "skipped": 1,
                      "running": 1, "orphaned": False}]  # fmt: skip


def test_overlap_lets_runs_go_on_at_once():
    h = Core(local=(periodic("tick", every=10.0, overlap=True),), concurrency=4)
    h.tick(10)
    h.tick(10)
    assert len(h.jobs) == 2 and h.core.schedules.by_name["tick"].skipped == 0


def test_a_schedule_no_one_runs_is_said_once_looked_at_once_a_second_and_forgotten():
    h = Core(local=(), heartbeat_timeout=5.0)
    w = FakeWorker(h, "w", [])
    w.tasks["beat"] = {"every": 0.05}
    w.register()
    s = h.core.schedules.by_name["beat"]
    h.ev(fw.Pull(h.request(), w.conn, w.id, 0, [], [], None, True))  # it leaves
    logs = []
    for _ in range(30):  # 3 s: 60 due times
        logs += [a for a in h.tick(0.1) if type(a) is fw.Log and "beat" in a.msg % a.args]
    assert [a.level for a in logs] == [logging.WARNING] and "no connected worker" in logs[0].msg
    # looked at 0.1, 1.1 and 2.1 s after it left: the 42 due times by then are counted as skipped
    assert s.orphaned and s.skipped == 42 and s.runs == 0 and h.core.stats(h.at)["schedules"][0]["orphaned"]
    assert h.deadline() == pytest.approx(h.now + 0.1)  # its next look, a second after the last one
    h.tick(5.0 * fw.SCHEDULE_FORGET)
    assert "beat" not in h.core.schedules.by_name and h.core.stats(h.at)["schedules"] == []
    w2 = FakeWorker(h, "w2", [])
    w2.tasks["beat"] = {"every": 0.05}
    w2.register()  # announced again: it comes back
    assert not h.core.schedules.by_name["beat"].orphaned
    h.tick(0.06)
    assert h.core.schedules.by_name["beat"].runs == 1


def test_a_long_period_schedule_is_not_forgotten_the_first_time_it_finds_no_runner():
    h = Core(local=(), heartbeat_timeout=5.0)
    w = FakeWorker(h, "w", [])
    w.tasks["daily"] = {"every": 600.0}
    w.register()
    h.tick(590.0)
    h.ev(fw.Pull(h.request(), w.conn, w.id, 0, [], [], None, True))  # it restarts...
    h.tick(20.0)  # ...just as its run is due
    s = h.core.schedules.by_name["daily"]
    assert s.orphaned and s.skipped == 1
    w.register()  # back within the forget time: the same schedule, its phase and counts kept
    assert h.core.schedules.by_name["daily"] is s and not s.orphaned and s.next_due == 1000.0 + 1200.0


def test_after_a_long_pause_a_missed_schedule_runs_once():
    h = Core(local=(periodic("tick", every=10.0), periodic("hourly", cron="0 * * * *")))
    h.tick(7200.0)  # two hours with nothing to fire them (a paused process)
    assert sorted(j.name for j in h.jobs) == ["hourly", "tick"]
    s = h.core.schedules.by_name["tick"]
    assert s.next_due == 1000.0 + 7210.0 and s.skipped == 0


def test_with_a_journal_the_last_run_of_a_schedule_survives_a_restart():
    h = Core(local=(periodic("tick", every=10.0),), journaling=True, zero_depth=1)
    h.tick(10)
    h.finish(h.jobs[0])
    h.tick(5)
    h.restart(600)  # down for ten minutes: the run due meanwhile happens once, at start
    s = h.core.schedules.by_name["tick"]
    assert (s.runs, s.last_due, s.last_state) == (1, 1010.0, "succeeded")
    h.tick(0)
    assert [j.name for j in h.jobs] == ["tick"] and s.runs == 2 and s.next_due == 1620.0


def test_eta_and_delay_schedule_a_task_and_cancel_frees_it_at_once():
    h = Core()
    h.poll("c")
    h.submit("c", item("late", eta=h.now - 50), item("later", eta=h.now + 30), item("d", delay=30.0))
    assert h.core.table.tasks["late"].state == "running"  # an ETA in the past: at once
    timers = h.core.table.timers, h.core.table.calendar  # (a delay on the monotonic clock, an ETA on the wall's)
    assert h.core.table.counts["scheduled"] == 2 and [len(t) for t in timers] == [1, 1]
    cancel = h.request()
    h.ev(fw.Cancel(cancel, ["later"]))
    assert h.reply(cancel).fields["ids"] == ["later"] and [len(t) for t in timers] == [1, 0]
    h.tick(29)
    assert h.core.table.tasks["d"].state == "scheduled"
    h.tick(1)
    assert h.core.table.tasks["d"].state in ("queued", "running")


def test_eta_wants_an_aware_time_and_not_with_a_delay(client):
    with pytest.raises(ValueError, match="aware"):
        client.submit_with("t.add", (1, 2), eta=datetime.datetime.now())
    with pytest.raises(ValueError, match="eta"):
        client.submit_with("t.add", (1, 2), eta=time.time() + 5, delay=5)
    for bad in (float("nan"), float("inf"), -1, True, "tomorrow"):
        with pytest.raises(ValueError, match="eta"):
            client.submit_with("t.add", (1, 2), eta=bad)
    at = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=5))) + datetime.timedelta(seconds=0.3)
    fut = client.submit_with("t.add", (1, 2), eta=at)
    assert client.status(fut.task_id)["state"] == "scheduled"
    assert fut.result(timeout=5) == 3 and time.time() >= at.timestamp()
    assert client.submit_with("t.add", (2, 2), eta=time.time() - 3600).result(timeout=5) == 4  # the past: at once


def test_cli_submit_takes_an_eta_with_an_offset(plane_proc):
    ready = plane_proc()
    soon = (datetime.datetime.now(UTC) + datetime.timedelta(seconds=0.5)).isoformat().replace("+00:00", "Z")
    r = run_cli("submit", "add", "2", "3", "--eta", soon, "--plane", ready["listen"])
    assert (r.returncode, r.stdout) == (0, "5\n"), r.stderr
    r = run_cli("submit", "add", "2", "3", "--eta", "2026-11-26T10:00:00", "--plane", ready["listen"])
    assert r.returncode == 2 and "offset" in r.stderr and len(r.stderr.strip().splitlines()) == 1


PERIODIC_MODULE = """
import os, time
import fastworker

@fastworker.task(every=0.3)
def beat():
    path = os.environ["BEAT_LOG"]
    with open(path, "a") as f:
        f.write(f"start {time.time()}\\n")
    time.sleep(0.5)  # longer than the period: the next due time finds it running
    with open(path, "a") as f:
        f.write(f"end {time.time()}\\n")
"""


def test_a_periodic_task_runs_again_and_again_and_never_twice_at_once(procs, tmp_path):
    (tmp_path / "beats.py").write_text(PERIODIC_MODULE)
    log = tmp_path / "beats.log"
    env = {"BEAT_LOG": str(log)}
    plane = procs("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--tasks", "beats",
                  cwd=tmp_path, env=env)  # fmt: skip
    ready = plane.ready()
    procs("worker", "--plane", ready["listen"], "--tasks", "beats", cwd=tmp_path, env=env).ready()

    def lines():
        return log.read_text().split() if log.exists() else []

    wait_until(lambda: lines().count("end") >= 4, 20, "four runs")
    depth = 0
    for kind in lines()[::2]:  # never two at once: starts and ends alternate
        depth += 1 if kind == "start" else -1
        assert depth in (0, 1)
    with fw.Client(ready["listen"]) as c:
        (s,) = c.stats()["schedules"]
    assert s["name"] == "beat" and s["runs"] >= 4 and s["skipped"] >= 1 and s["every"] == 0.3


# -- the journal file (SQLite, no sockets) ---------------------------------------------------


def files_of(path):
    """Every file of a journal, with its bytes and its modification time."""
    out = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        f = path + suffix
        if os.path.exists(f):
            with open(f, "rb") as fh:
                out[suffix] = (fh.read(), os.stat(f).st_mtime_ns)
    return out


def flush(journal):
    """Commit what the journal holds, as the plane's shell does: the action
    lists that waited for it, in order."""
    done = []
    while (batch := journal.take()) is not None:
        records, counters, queued, upto = batch
        journal.commit(records, counters)
        done += queued
        journal.done(upto)
    return done


def test_journal_file_is_created_reopened_and_keeps_the_planes_identity(tmp_path):
    path = str(tmp_path / "j.db")
    j = fw._Journal(path)
    first = j.open()
    assert first["rows"] == [] and first["plane"]
    new = ["t-1", ["add", [1, 2], {}, 2, 0, None, "c", 5.0], 0, "queued", 0, 0, None, None, None, None, None, None,
           None, 0]  # fmt: skip
    j.add([new], {"submitted": 1}, ["first"])
    j.add(
        [["t-1", None, 0, "succeeded", 1, 1, None, 6.0, 7.0, "w", None, None, b"{}", 0]], {"submitted": 1}, ["second"]
    )
    assert (
        flush(j) == [["first"], ["second"]] and j.commits == 1
    )  # one transaction for both, then their actions in order
    j.close()
    again = fw._Journal(path)
    second = again.open()
    assert second["plane"] == first["plane"] and second["counters"] == {"submitted": 1}
    [saved] = second["rows"]
    assert saved[0] == "t-1" and saved[3] == "succeeded" and json.loads(saved[1])[:2] == ["add", [1, 2]]
    with pytest.raises(fw.JournalError, match="in use by another plane"):
        fw._Journal(path).open()
    again.close()
    fw._Journal(path).open()  # free again once closed


def test_journal_gives_back_the_space_of_a_drained_backlog(tmp_path):
    import sqlite3

    path = str(tmp_path / "j.db")
    j = fw._Journal(path)
    j.open()
    j.accept()

    def row(i, state="queued"):
        body = ["add", ["x" * 200], {}, 2, 0, None, "c", 5.0]
        return [f"t-{i}", body, i, state, 0, 0, None, None, None, None, None, None, None, 0]

    def file_pages():
        db = sqlite3.connect(path)
        try:
            return db.execute("PRAGMA page_count").fetchone()[0], db.execute("PRAGMA freelist_count").fetchone()[0]
        finally:
            db.close()

    j.add([row(i) for i in range(500)], {"submitted": 500}, [])  # what a steady flow keeps: a few hundred rows
    flush(j)
    steady = file_pages()[0]
    j.add([row(i) for i in range(500, 30_500)], {"submitted": 30_500}, [])  # a backlog of 30,000
    flush(j)
    peak = file_pages()[0]
    for k in range(500, 30_500, 1000):  # it drains: its tasks are forgotten, a thousand at a time
        j.add([[f"t-{i}"] for i in range(k, k + 1000)], {"submitted": 30_500}, [])
        flush(j)
    pages, free = file_pages()
    assert peak > 20 * steady and pages <= 2 * steady + 256  # while it runs (free pages are given back past 1 MB)
    j.close()
    pages, free = file_pages()
    assert pages <= 2 * steady and free == 0, (steady, peak, pages)  # stopped: the backlog's space is given back
    again = fw._Journal(path)
    assert len(again.open()["rows"]) == 500
    again.close()


def test_journal_from_before_it_gave_space_back_is_rebuilt_once_accepted(tmp_path):
    import sqlite3

    path = str(tmp_path / "old.db")
    sqlite_file(path, fw._JOURNAL_SCHEMA + f"INSERT INTO meta VALUES ('format', '{fw._JOURNAL_FORMAT}'), "
                f"('version', '{fw._JOURNAL_VERSION}'), ('plane', 'p');")  # fmt: skip
    j = fw._Journal(path)
    assert j.open()["plane"] == "p"
    j.accept()
    j.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
    db.close()


def test_journal_with_a_malformed_row_is_refused_naming_the_file_and_left_as_it_was(tmp_path):
    import sqlite3

    path = str(tmp_path / "plane.db")
    j = fw._Journal(path)
    j.open()
    j.add([["t-1", ["add", [1, 2], {}, 2, 0, None, "c", 5.0], 0, "queued", 0, 0] + [None] * 7 + [0]], {}, [])
    flush(j)
    j.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE tasks SET state='bogus' WHERE id != ''")
    db.commit()
    db.close()
    before = files_of(path)
    with pytest.raises(fw.JournalError) as info:
        fw.Plane("tcp://127.0.0.1:0", journal=path).start()
    assert str(info.value).startswith(f"journal {path} holds a malformed task row") and "bogus" in str(info.value)
    assert files_of(path) == before


def sqlite_file(path, script):
    import sqlite3

    db = sqlite3.connect(path)
    db.executescript(script)
    db.commit()
    db.close()


@pytest.mark.parametrize("kind", ["text", "foreign", "newer", "corrupt"])
def test_journal_that_is_not_ours_is_refused_and_left_untouched(tmp_path, kind):
    path = str(tmp_path / "j.db")
    if kind == "text":
        with open(path, "w") as f:
            f.write("these are my notes, not a journal\n")
    elif kind == "foreign":
        sqlite_file(path, "CREATE TABLE accounts (id INTEGER, balance REAL); INSERT INTO accounts VALUES (1, 9.5);")
    else:
        version = 99 if kind == "newer" else fw._JOURNAL_VERSION
        sqlite_file(
            path,
            fw._JOURNAL_SCHEMA
            + f"INSERT INTO meta VALUES ('format', '{fw._JOURNAL_FORMAT}'), ('version', '{version}'), ('plane', 'p');",
        )
        if kind == "corrupt":
            with open(path, "r+b") as f:  # keep the header, wreck the pages behind it
                f.seek(4096)
                f.write(os.urandom(4096))
    before = files_of(path)
    with pytest.raises(fw.JournalError) as info:
        fw._Journal(path).open()
    assert path in str(info.value)
    expected = {
        "text": "not an SQLite file",
        "foreign": "not a fastworker journal",
        "newer": "newer",
        "corrupt": "corrupt",
    }
    assert expected[kind] in str(info.value)
    assert files_of(path) == before  # byte for byte, and no new file beside it


def test_journal_in_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(fw.JournalError, match="does not exist"):
        fw._Journal(str(tmp_path / "nope" / "j.db")).open()


# -- in-process plane and client ---------------------------------------------------------


@pytest.fixture
def plane():
    p = fw.Plane("tcp://127.0.0.1:0", concurrency=4, retry_backoff=0.05).start()
    yield p
    for gate in GATES.values():
        gate.set()
    p.stop()
    GATES.clear()


@pytest.fixture
def client(plane):
    with fw.Client(plane.address, timeout=5) as c:
        yield c


def gate(key):
    return GATES.setdefault(key, threading.Event())


def test_a_plane_runs_deadlines_on_its_monotonic_clock_and_the_calendar_on_its_wall_clock():
    wall = [2_000_000_000.0]  # a wall clock that stands still (an injected one, as tests and simulations use)
    with fw.Plane("tcp://127.0.0.1:0", clock=lambda: wall[0], heartbeat_timeout=1.0) as plane:
        with fw.Client(plane.address, timeout=5) as c:
            assert c.submit_with("fastworker.echo", (1,), delay=0.3).result(timeout=5) == 1  # a delay: monotonic
            eta = c.submit_with("fastworker.echo", (2,), eta=wall[0] + 60)
            assert c.status(eta.task_id)["due_at"] == wall[0] + 60  # the calendar: the wall clock
            wall[0] += 61  # the calendar moves: the ETA has come
            assert eta.result(timeout=10) == 2


def test_worker_stop_past_the_grace_leaves_no_runner_behind(plane):
    GATES["stop"] = threading.Event()
    worker = fw.Worker(plane.address, concurrency=1, name="w-stop").start()
    try:
        wait_until(worker.registered.is_set, 5, "the worker to register")
        with fw.Client(plane.address, timeout=5) as c:
            fut = c.submit("t.block", "stop")
            wait_until(lambda: c.status(fut.task_id)["worker"] == "w-stop", 5, "the task to run on the worker")
            worker.stop(grace=0.1)  # the task outlives the grace: it is handed back
            GATES["stop"].set()
            assert fut.result(timeout=5) == "stop"  # run again by the plane
    finally:
        worker.stop()
    wait_until(lambda: not [t for t in threading.enumerate() if t.name == "fastworker-worker-runner"], 5,
               "the runner whose task outlived the grace to end")  # fmt: skip


def test_every_role_checks_sizes_alike():
    for make in (lambda: fw.Worker("tcp://127.0.0.1:1", max_message_size=32768),
                 lambda: fw.Client("tcp://127.0.0.1:1", max_message_size=32768),
                 lambda: fw.Plane("tcp://127.0.0.1:0", max_message_size=32768)):  # fmt: skip
        with pytest.raises(ValueError, match="max_message_size must be a number of bytes from 65536"):
            make()


def test_with_a_journal_no_reply_leaves_before_what_it_follows_is_on_disk(tmp_path, monkeypatch):
    with fw.Plane("tcp://127.0.0.1:0", journal=str(tmp_path / "j.db")) as plane:
        release, real = threading.Event(), plane._journal.commit

        def slow_disk(records, counters):
            release.wait(10)
            real(records, counters)

        monkeypatch.setattr(plane._journal, "commit", slow_disk)
        with fw.Client(plane.address, timeout=10) as a, fw.Client(plane.address, timeout=10) as b:
            fut = a.submit("fastworker.echo", 1)  # its acceptance waits for the disk
            wait_until(lambda: plane._journal._committing, 5, "its commit to be under way")
            answers = {}
            asking = [threading.Thread(target=lambda k=k, call=call: answers.setdefault(k, call()))
                      for k, call in (("stats", b.stats), ("tasks", b.tasks), ("hello", lambda: b._call("hello", "welcome")))]  # fmt: skip
            for t in asking:
                t.start()
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # (a window in which nothing may answer: not a synchronisation)
                assert not answers, answers
                time.sleep(0.02)
            release.set()
            for t in asking:
                t.join(10)
            assert sorted(answers) == ["hello", "stats", "tasks"] and fut.result(timeout=5) == 1


def test_a_client_dropped_without_close_delivers_its_results_and_lets_its_threads_go(plane):
    import gc

    before = live_threads()
    futs = []
    for i in range(20):
        c = fw.Client(plane.address, timeout=5)
        assert c.submit("fastworker.echo", i).result(timeout=5) == i
        futs.append(fw.Client(plane.address, timeout=5).submit("fastworker.sleep", 0.2))  # dropped at once
        del c
    gc.collect()
    assert [f.result(timeout=5) for f in futs] == [0.2] * 20  # a dropped client still delivers what it owes
    wait_until(lambda: live_threads() <= before, 10, "the dropped clients' threads to end")


def test_a_joined_id_never_changes_and_answers_for_the_task_it_joined(plane):
    GATES["ids"] = threading.Event()
    with fw.Client(plane.address, timeout=5) as a, fw.Client(plane.address, timeout=5) as b:
        first = a.submit_with("t.block", ("ids",), key="same")
        wait_until(lambda: a.status(first.task_id)["state"] == "running", 5, "the first to run")
        mine = b.submit_with("t.block", ("ids",), key="same")
        other = b.submit_with("t.block", ("ids",), key="same")
        tid = mine.task_id
        status = b.status(tid)
        assert (status["id"], status["joined"], status["state"]) == (tid, first.task_id, "running")
        assert mine.task_id == tid and plane.task(tid)["id"] == first.task_id  # its page is the task's
        assert not b.cancel(other.task_id)  # it runs already: the waiter stays
        GATES["ids"].set()
        assert mine.result(timeout=5) == other.result(timeout=5) == first.result(timeout=5) == "ids"
        assert mine.task_id == tid and b.result(tid) == "ids" and b.status(tid)["state"] == "succeeded"
        GATES["ids2"] = threading.Event()
        lead = a.submit_with("t.block", ("ids2",), key="again", delay=30)  # waits: its joiners may be cancelled
        assert a.status(lead.task_id)["state"] == "scheduled"  # (the leader, before b submits)
        quit_ = b.submit_with("t.block", ("ids2",), key="again")
        stay = b.submit_with("t.block", ("ids2",), key="again")
        assert b.cancel(quit_.task_id) and quit_.cancelled()  # only that waiter stops
        assert b.status(quit_.task_id)["state"] == "cancelled" and a.status(lead.task_id)["state"] == "scheduled"
        assert a.cancel(lead.task_id)
        wait_until(stay.cancelled, 5, "the task it joined, cancelled, to cancel it")


def test_a_dropped_client_still_delivers_a_joined_future_and_close_works_from_a_callback(plane):
    import gc

    GATES["joined"] = threading.Event()
    before = live_threads()
    with fw.Client(plane.address, timeout=5) as a:
        first = a.submit_with("t.block", ("joined",), key="k")
        wait_until(lambda: a.status(first.task_id)["state"] == "running", 5, "the keyed task to run")
        joined = fw.Client(plane.address, timeout=5).submit_with("t.block", ("joined",), key="k")  # client dropped
        gc.collect()
        GATES["joined"].set()
        assert joined.result(timeout=5) == first.result(timeout=5) == "joined"
        c = fw.Client(plane.address, timeout=5)
        closed = []
        fut = c.submit("fastworker.echo", 1)
        fut.add_done_callback(lambda f, c=c: closed.append(c.close()))  # on the client's own thread: no waiting
        assert fut.result(timeout=5) == 1
        wait_until(lambda: closed, 5, "the callback")
        del fut, c
    wait_until(lambda: live_threads() <= before, 10, "every client thread to end")


def test_a_subscription_keeps_its_client_and_ends_with_it(plane):
    import gc

    before = live_threads()
    seen = []
    stop = fw.Client(plane.address, timeout=5).on_complete(seen.append)  # the client itself is not kept
    gc.collect()
    with fw.Client(plane.address, timeout=5) as c:
        wait_until(lambda: c.submit("fastworker.echo", 1).result(timeout=5) and seen, 10, "an event")
    stop()
    gc.collect()
    wait_until(lambda: live_threads() <= before, 10, "the subscription's threads to end")


CLIENT_LEFT_OPEN = """
import sys
sys.path.insert(0, sys.argv[1])
import fastworker
c = fastworker.Client(sys.argv[2], timeout=5)
assert c.submit("fastworker.echo", 1).result(timeout=5) == 1
c.submit("fastworker.sleep", 0.5)  # still running at the end
print("done", flush=True)
"""


def test_a_program_that_ends_without_closing_its_client_exits_cleanly(plane, tmp_path):
    prog = tmp_path / "left_open.py"
    prog.write_text(CLIENT_LEFT_OPEN)
    for _ in range(4):  # two at a time (an abort at exit shows under concurrency)
        pair = [subprocess.Popen([sys.executable, str(prog), HERE, plane.address], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
        for p in pair:
            out, err = p.communicate(timeout=30)
            assert (p.returncode, out) == (0, "done\n"), err


def test_submit_returns_futures_with_unique_ids(client):
    futs = [
        client.submit("t.add", 1, 2),
        client.submit(t_add, 3, 4),
        client.submit_with("t.add", args=(5,), kwargs={"y": 6}),
    ]
    assert [f.result(timeout=5) for f in futs] == [3, 7, 11]
    assert len({f.task_id for f in futs}) == 3 and all(isinstance(f.task_id, str) for f in futs)
    assert isinstance(futs[0], concurrent.futures.Future)


def test_map_yields_results_in_order(client):
    assert list(client.map("t.add", range(50), range(50, 100))) == [i + 50 + i for i in range(50)]


def test_unknown_task_fails_fast(client):
    t0 = time.monotonic()
    fut = client.submit("no.such.task", 1)
    with pytest.raises(fw.UnknownTask, match="no.such.task"):
        fut.result(timeout=5)
    assert time.monotonic() - t0 < 2


def test_non_json_arguments_raise_type_error_before_sending(client):
    with pytest.raises(TypeError):
        client.submit("t.add", object(), 1)
    with pytest.raises(TypeError):
        client.submit_with("t.add", (1,), {"y": {1, 2}})
    assert client.stats()["tasks"]["submitted"] == 0


def test_task_error_carries_remote_type_message_and_traceback(client):
    fut = client.submit("t.fail", "it broke")
    with pytest.raises(fw.TaskError) as info:
        fut.result(timeout=5)
    err = info.value
    assert (err.type, err.message) == ("ValueError", "it broke")
    assert "t_fail" in err.traceback and "ValueError: it broke" in err.traceback
    assert isinstance(fut.exception(), fw.TaskError)


def test_a_result_json_cannot_carry_fails_the_task(client):
    with pytest.raises(fw.TaskError, match="not JSON-serializable"):
        client.submit("t.bad_result").result(timeout=5)


def test_async_tasks_run(client):
    assert client.submit("t.async_add", 2, 3).result(timeout=5) == 5


def test_retries_rerun_a_failing_task(client):
    COUNTS.clear()
    t0 = time.monotonic()
    fut = client.submit("t.flaky", "twice", 2)  # default retries=2: the third run succeeds
    assert fut.result(timeout=10) == 3
    assert time.monotonic() - t0 >= 0.05 + 0.1  # backoff 0.05 s, then twice that
    assert client.status(fut.task_id)["attempts"] == 3
    fut = client.submit_with("t.flaky", ("always", 5), retries=1)
    with pytest.raises(fw.TaskError, match="attempt 2 fails"):
        fut.result(timeout=10)
    assert COUNTS["always"] == 2
    assert client.stats()["tasks"]["retried"] == 3


def test_futures_work_with_wait_as_completed_callbacks_and_asyncio(client):
    futs = [client.submit("t.add", i, i) for i in range(20)]
    done, not_done = concurrent.futures.wait(futs, timeout=5)
    assert len(done) == 20 and not not_done
    assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=5)) == [2 * i for i in range(20)]
    seen = []
    fut = client.submit("t.add", 1, 1)
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.result(timeout=5)
    wait_until(lambda: seen == [2], 5, "the callback")

    async def main():
        return await client.submit("t.add", 20, 22), await asyncio.gather(
            *(client.submit("t.add", i, 1) for i in range(3))
        )

    assert asyncio.run(main()) == (42, [1, 2, 3])


def test_result_status_and_cancel_by_id_from_another_client(plane, client):
    blocker = client.submit("t.block", "b1")
    wait_until(lambda: client.status(blocker.task_id)["state"] == "running", 5, "the blocker to run")
    with fw.Client(plane.address, timeout=5) as other:
        assert other.status(blocker.task_id)["state"] == "running"
        gate("b1").set()
        assert other.result(blocker.task_id, timeout=5) == "b1"
        status = other.status(blocker.task_id)
        assert status["state"] == "succeeded" and status["name"] == "t.block" and status["duration"] >= 0
        assert other.status("nobody-knows")["state"] == "unknown"
        with pytest.raises(fw.ResultExpired):
            other.result("nobody-knows", timeout=1)
        later = client.submit_with("t.add", (1, 1), delay=60)
        client.status(later.task_id)  # it is at the plane
        assert other.cancel(later.task_id) is True and other.cancel(later.task_id) is False
        wait_until(later.cancelled, 5, "the submitter's future to learn of the cancel")


def test_cancel_only_cancels_queued_tasks():
    with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane, fw.Client(plane.address, timeout=5) as c:
        try:
            running = c.submit("t.block", "c1")
            wait_until(lambda: c.status(running.task_id)["state"] == "running", 5, "the blocker to run")
            queued, queued2 = c.submit("t.add", 1, 1), c.submit("t.add", 2, 2)
            wait_until(lambda: c.stats()["tasks"]["queued"] == 2, 5, "two queued tasks")
            assert queued.cancel() is True and queued.cancelled()
            assert c.cancel(queued2.task_id) is True
            assert queued2.cancelled() and c.status(queued2.task_id)["state"] == "cancelled"
            with pytest.raises(concurrent.futures.CancelledError):
                queued.result(timeout=1)
            assert c.cancel(running.task_id) is False  # it runs: the plane cannot cancel it
        finally:
            gate("c1").set()
        assert running.result(timeout=5) == "c1"
        t = c.stats()["tasks"]
        assert (t["cancelled"], t["succeeded"], t["queued"], t["running"]) == (2, 1, 0, 0)
    GATES.clear()


def test_priority_orders_the_queue_with_one_busy_slot():
    RECORD.clear()
    with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane, fw.Client(plane.address, timeout=5) as c:
        try:
            blocker = c.submit("t.block", "p1")
            wait_until(lambda: c.status(blocker.task_id)["state"] == "running", 5, "the blocker to run")
            futs = [
                c.submit_with("t.record", (f"{p}{i}",), priority=p)
                for p in ("low", "normal", "high", "critical")
                for i in range(5)
            ]
            wait_until(lambda: c.stats()["queues"] == {"critical": 5, "high": 5, "normal": 5, "low": 5}, 5, "queues")
        finally:
            gate("p1").set()
        concurrent.futures.wait(futs, timeout=10)
    GATES.clear()
    assert RECORD == [f"{p}{i}" for p in ("critical", "high", "normal", "low") for i in range(5)]


def test_delay_holds_a_task_back(client):
    t0 = time.monotonic()
    fut = client.submit_with("t.add", (1, 2), delay=0.3)
    assert client.status(fut.task_id)["state"] == "scheduled" and client.stats()["tasks"]["scheduled"] == 1
    assert fut.result(timeout=5) == 3
    assert time.monotonic() - t0 >= 0.3


def test_stats_shape_and_accounting_invariant(client):
    client.submit("t.add", 1, 2).result(timeout=5)
    with pytest.raises(fw.TaskError):
        client.submit("t.fail", "x").result(timeout=5)
    s = client.stats()
    assert set(s["tasks"]) >= {"submitted", "queued", "scheduled", "running", "succeeded", "failed", "cancelled"}
    assert set(s["queues"]) == {"critical", "high", "normal", "low"}
    assert s["workers"] == []
    assert set(s["cache"]) >= {"size", "max_size", "ttl", "hits", "misses", "evictions"}
    t = s["tasks"]
    assert t["submitted"] == 2 and (t["succeeded"], t["failed"]) == (1, 1)
    assert t["submitted"] == sum(t[state] for state in fw.STATES)
    assert all(isinstance(v, int) for v in list(t.values()) + list(s["queues"].values()))
    assert (s["cache"]["max_size"], s["cache"]["ttl"], s["cache"]["size"]) == (10_000, 3600.0, 2)


def test_results_expire_by_lru_and_by_ttl():
    with fw.Plane("tcp://127.0.0.1:0", result_cache_size=2, result_cache_ttl=0.3).start() as plane:
        with fw.Client(plane.address, timeout=5) as c:
            first = c.submit("t.add", 1, 1)
            assert first.result(timeout=5) == 2
            for i in range(2):
                c.submit("t.add", i, 0).result(timeout=5)
            with pytest.raises(fw.ResultExpired):  # evicted: the cache holds 2
                c.result(first.task_id, timeout=1)
            last = c.submit("t.add", 5, 5)
            assert c.result(last.task_id, timeout=1) == 10
            wait_until(lambda: c.status(last.task_id)["state"] == "unknown", 5, "the TTL to pass")
            with pytest.raises(fw.ResultExpired):
                c.result(last.task_id, timeout=1)
            assert c.stats()["cache"]["evictions"] >= 1


def test_2000_tasks_back_to_back_each_get_their_own_result(client):
    futs = [client.submit("t.add", i, i) for i in range(2000)]
    assert [f.result(timeout=30) for f in futs] == [2 * i for i in range(2000)]


def test_8_threads_share_one_client(client):
    def work(k):
        return [(k, i, client.submit("t.add", k * 1000, i).result(timeout=30)) for i in range(200)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        rows = [r for rs in pool.map(work, range(8)) for r in rs]
    assert len(rows) == 1600 and all(v == k * 1000 + i for k, i, v in rows)


def test_unreachable_plane_raises_a_connection_error():
    with fw.Client(f"tcp://127.0.0.1:{free_port()}", timeout=0.5) as c:
        t0 = time.monotonic()
        fut = c.submit("t.add", 1, 2)
        with pytest.raises(ConnectionError):
            fut.result(timeout=5)
        assert isinstance(fut.exception(), fw.PlaneUnavailable)
        with pytest.raises(fw.PlaneUnavailable):
            c.stats()
        assert time.monotonic() - t0 < 3


def test_pending_futures_fail_when_the_plane_stops():
    plane = fw.Plane("tcp://127.0.0.1:0").start()
    try:
        with fw.Client(plane.address, timeout=1) as c:
            fut = c.submit("t.block", "s1")
            wait_until(lambda: c.status(fut.task_id)["state"] == "running", 5, "the task to run")
            stopper = threading.Thread(target=plane.stop, kwargs={"grace": 0.2})
            t0 = time.monotonic()
            stopper.start()
            with pytest.raises(fw.PlaneUnavailable, match="stopped before the task finished .it was running"):
                fut.result(timeout=5)
            assert time.monotonic() - t0 < 2
            with pytest.raises(ConnectionError):
                c.submit("t.add", 1, 1).result(timeout=10)
    finally:
        gate("s1").set()
        stopper.join(10)
        plane.stop()
        GATES.clear()


def test_a_secret_is_required_when_the_plane_has_one():
    with fw.Plane("tcp://127.0.0.1:0", secret="s3cret").start() as plane:
        with fw.Client(plane.address, secret="s3cret", timeout=5) as good:
            assert good.submit("t.add", 1, 2).result(timeout=5) == 3
        with fw.Client(plane.address, secret="wrong", timeout=2) as bad:
            with pytest.raises(fw.AuthenticationError):
                bad.stats()
        assert plane.stats()["errors"]["auth"] == 1


def test_non_loopback_address_refused_without_a_secret():
    with pytest.raises(ValueError, match="secret"):
        fw.Plane("tcp://0.0.0.0:0").start()
    with pytest.raises(ValueError, match="secret"):
        fw.Plane("tcp://127.0.0.1:0", dashboard="0.0.0.0:0").start()


def test_one_clients_submissions_run_in_the_order_submit_was_called():
    """A blocker, then 3,000 tasks of one priority from one thread, to a plane
    with one slot: they run in submission order, every time."""
    for trial in range(5):
        RECORD.clear()
        key = f"order{trial}"
        with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane, fw.Client(plane.address, timeout=10) as c:
            try:
                c.submit("t.block", key)
                futs = [c.submit("t.record", i) for i in range(3000)]
                assert c.stats()["tasks"]["queued"] >= 2999  # all at the plane, waiting
            finally:
                gate(key).set()
            concurrent.futures.wait(futs, timeout=30)
        assert RECORD == list(range(3000)), f"trial {trial}: out of order"
    GATES.clear()


@fw.task(name="t.raise_base")
def t_raise_base(kind):
    raise {"interrupt": KeyboardInterrupt, "exit": SystemExit}[kind]("stop it")


@fw.task(name="t.async_raise_base")
async def t_async_raise_base(kind):
    await asyncio.sleep(0)
    raise {"interrupt": KeyboardInterrupt, "exit": SystemExit}[kind]("stop it")


def test_a_task_raising_keyboardinterrupt_or_systemexit_fails_and_its_runner_survives():
    with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane, fw.Client(plane.address, timeout=5) as c:
        for name in ("t.raise_base", "t.async_raise_base"):
            for kind, exc in (("interrupt", "KeyboardInterrupt"), ("exit", "SystemExit")):
                with pytest.raises(fw.TaskError) as info:
                    c.submit(name, kind).result(timeout=5)
                assert (info.value.type, info.value.message) == (exc, "stop it")
                assert "stop it" in info.value.traceback
        assert c.submit("t.add", 1, 2).result(timeout=5) == 3  # the one runner lives
        assert c.submit("t.async_add", 1, 2).result(timeout=5) == 3  # and so does the event loop
        s = c.stats()
        assert (s["local"]["running"], s["tasks"]["running"], s["tasks"]["failed"]) == (0, 0, 4)


def test_future_cancel_never_blocks_even_on_an_event_loop():
    with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane, fw.Client(plane.address, timeout=5) as c:
        try:
            blocker = c.submit("t.block", "fc1")
            wait_until(lambda: c.status(blocker.task_id)["state"] == "running", 5, "the blocker to run")
            queued = [c.submit("t.add", i, i) for i in range(2)]
            assert c.stats()["tasks"]["queued"] == 2
            with plane._lock:  # the plane can answer nothing now: a network call would wait
                t0 = time.monotonic()
                assert queued[0].cancel() is True and queued[0].cancelled()
                assert time.monotonic() - t0 < 0.5

                async def main():
                    gaps, last = [], time.monotonic()

                    async def ticker():
                        nonlocal last
                        while True:
                            await asyncio.sleep(0.01)
                            gaps.append(time.monotonic() - last)
                            last = time.monotonic()

                    tick = asyncio.ensure_future(ticker())
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(queued[1], 0.1)  # cancels the future on the loop's thread
                    await asyncio.sleep(0.05)
                    tick.cancel()
                    return max(gaps)

                assert asyncio.run(main()) < 0.5  # the loop never stalled on the cancel
            assert queued[1].cancelled()
            wait_until(lambda: c.stats()["tasks"]["cancelled"] == 2, 5, "the plane to cancel both in the background")
        finally:
            gate("fc1").set()
        assert blocker.result(timeout=5) == "fc1"
    GATES.clear()


def test_future_cancel_of_a_running_task_leaves_it_running_at_the_plane():
    with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane, fw.Client(plane.address, timeout=5) as c:
        try:
            running = c.submit("t.block", "fc2")
            wait_until(lambda: c.status(running.task_id)["state"] == "running", 5, "the task to run")
            assert running.cancel() is True and running.cancelled()
            with pytest.raises(concurrent.futures.CancelledError):
                running.result(timeout=1)
        finally:
            gate("fc2").set()
        wait_until(lambda: c.status(running.task_id)["state"] == "succeeded", 5, "the task to finish at the plane")
        assert c.result(running.task_id, timeout=5) == "fc2"
    GATES.clear()


def test_a_worker_with_the_wrong_secret_says_so_once_at_error_and_backs_off(caplog):
    with fw.Plane("tcp://127.0.0.1:0", secret="right").start() as plane:
        with caplog.at_level(logging.INFO, logger="fastworker"):
            with fw.Worker(plane.address, secret="wrong", concurrency=1) as worker:
                t0 = time.monotonic()
                wait_until(lambda: plane.stats()["errors"]["auth"] >= 6, 20, "six refused requests")
                elapsed = time.monotonic() - t0
                assert not worker.registered.is_set()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "secret" in errors[0].getMessage(), [r.getMessage() for r in errors]
    assert elapsed >= 0.7  # 0.1 s, 0.2 s, 0.4 s ... between tries, not 0.1 s for ever


DONE: list = []


@fw.task(name="t.quick")
def t_quick(tag):
    time.sleep(0.1)
    DONE.append(tag)
    return tag


def stop_under_load(trial, n_workers, grace):
    DONE.clear()
    key = f"stop{trial}"
    plane = fw.Plane("tcp://127.0.0.1:0", concurrency=6).start()
    workers = [fw.Worker(plane.address, concurrency=3, timeout=1).start() for _ in range(n_workers)]
    c = fw.Client(plane.address, timeout=10)
    try:
        for w in workers:
            wait_until(w.registered.is_set, 5, "workers to register")
        held = [c.submit("t.block", key) for _ in range(2)]  # still running when the grace ends
        quick = [c.submit("t.quick", f"{trial}-{i}") for i in range(4)]  # finish within the grace
        waiting = [c.submit("t.block", key) for _ in range(2)]  # never get a slot
        wait_until(lambda: c.stats()["tasks"]["running"] == 6, 5, "six running tasks")
        stopper = threading.Thread(target=plane.stop, kwargs={"grace": grace})
        t0 = time.monotonic()
        stopper.start()
        wait_until(lambda: c.submit("t.add", 1, 1).exception(timeout=5) is not None, 5, "submissions refused")
        with pytest.raises(fw.PlaneUnavailable, match="stopping"):
            c.submit("t.add", 2, 2).result(timeout=2)
        done, pending = concurrent.futures.wait(held + quick + waiting, timeout=grace + 2)
        assert not pending and time.monotonic() - t0 < grace + 2, f"trial {trial}"
        for f in quick:  # every one finished within the grace, and delivered its value
            assert f.result() in DONE
        for f in held:
            with pytest.raises(fw.PlaneUnavailable, match="it was running"):
                f.result()
        for f in waiting:
            with pytest.raises(fw.PlaneUnavailable, match="it was queued"):
                f.result()
        gate(key).set()  # let the runs it gave up on end, so that the plane's threads can
        stopper.join(10)
    finally:
        gate(key).set()
        c.close()
        for w in workers:
            w.stop(grace=0)
        plane.stop()


def test_a_clean_stop_under_load_delivers_every_result_and_fails_the_rest_at_once():
    """Stops under load (8, or $FW_STOP_TRIALS), alone and with 2 workers:
    what finished within the grace reaches its client; the rest fail at
    once, saying why."""
    for trial in range(int(os.environ.get("FW_STOP_TRIALS", "8"))):
        stop_under_load(trial, 2 * (trial % 2), grace=0.4)
    GATES.clear()


# -- the plane as a process ----------------------------------------------------------------


def test_plane_process_reports_real_addresses_and_serves_a_task_module(plane_proc):
    ready = plane_proc()
    assert ready["role"] == "plane" and not ready["listen"].endswith(":0")
    assert ready["dashboard"].startswith("http://127.0.0.1:") and not ready["dashboard"].endswith(":0/")
    with fw.Client(ready["listen"], timeout=5) as c:
        assert c.submit("add", 1, 2).result(timeout=5) == 3  # from fwtasks, via "import fastworker"
        with pytest.raises(fw.TaskError, match="boom"):
            c.submit("fail").result(timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_plane_exits_zero_on_signal_within_seconds(plane_proc, sig):
    ready = plane_proc()
    with fw.Client(ready["listen"], timeout=5) as c:
        assert c.submit("add", 2, 2).result(timeout=5) == 4
    t0 = time.monotonic()
    assert ready["proc"].stop(sig) == 0
    assert time.monotonic() - t0 < 5


def test_bad_messages_get_error_replies_and_are_counted(plane_proc):
    ready = plane_proc()
    address = ready["listen"]
    bad = [
        b"\x00\xffgarbage",
        b"[]",
        b'{"v": 2, "op": "launch"}',
        b'{"v": 7, "op": "stats"}',
        b'{"v": 2, "op": "submit", "client": "c", "tasks": [{"id": 5, "name": "add"}]}',
        b'{"v": 2, "op": "results", "plane": "x", "results": []}',
    ]
    for data in bad:
        reply = raw_request(address, data)
        assert reply["op"] == "error" and reply["error"]["kind"] == "protocol", reply
    with fw.Client(address, timeout=5) as c:
        assert c.submit("add", 20, 22).result(timeout=5) == 42
        assert c.stats()["errors"]["protocol"] == len(bad)


def test_oversize_message_gets_an_error_reply(plane_proc):
    ready = plane_proc("--max-message-size", "65536")
    big = fw.encode_batch("submit", "tasks", [fw.encode_task("x-1", "add", ("a" * 100_000, "b"))], client="x")
    reply = raw_request(ready["listen"], big)
    assert reply["op"] == "error" and "exceeds" in reply["error"]["message"]
    with fw.Client(ready["listen"], timeout=5) as c:
        assert c.submit("add", 1, 1).result(timeout=5) == 2
        assert c.stats()["errors"]["protocol"] == 1


def test_result_cache_flags(plane_proc):
    ready = plane_proc("--result-cache-size", "3", "--result-cache-ttl", "120")
    with fw.Client(ready["listen"], timeout=5) as c:
        for i in range(5):
            c.submit("add", i, i).result(timeout=5)
        cache = c.stats()["cache"]
    assert (cache["max_size"], cache["ttl"], cache["size"], cache["evictions"]) == (3, 120.0, 3, 2)


def test_process_plane_keeps_results_apart_under_load(plane_proc):
    ready = plane_proc()
    with fw.Client(ready["listen"], timeout=10) as c:
        futs = [c.submit("add", i, i) for i in range(2000)]
        assert [f.result(timeout=30) for f in futs] == [2 * i for i in range(2000)]

        def work(k):
            return all(c.submit("add", k, i).result(timeout=30) == k + i for i in range(200))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(work, range(8)))
        t = c.stats()["tasks"]
        assert t["submitted"] == t["succeeded"] == 3600


def test_pending_futures_fail_when_the_plane_is_killed(plane_proc):
    ready = plane_proc()
    with fw.Client(ready["listen"], timeout=1) as c:
        fut = c.submit("sleepy", 30)
        wait_until(lambda: c.status(fut.task_id)["state"] == "running", 5, "the task to run")
        ready["proc"].stop(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(fw.PlaneUnavailable):
            fut.result(timeout=10)
        assert time.monotonic() - t0 < 5


# -- subworkers -----------------------------------------------------------------------------


@pytest.fixture
def worker_proc(procs, tasks_dir):
    """Start a worker process for a plane; returns its ready line (after it registered)."""

    def start(address, *extra):
        p = procs("worker", "--plane", address, "--tasks", "fwtasks", *extra, cwd=tasks_dir)
        ready = p.ready()
        assert ready["role"] == "worker" and ready["pid"] == p.p.pid
        ready["proc"] = p
        return ready

    return start


def running_on(c, futs, n=None):
    """Wait until ``n`` (default all) of the futures run; their workers' names."""
    n = len(futs) if n is None else n

    def check():
        states = [c.status(f.task_id) for f in futs]
        running = [s["worker"] for s in states if s["state"] == "running"]
        return running if len(running) >= n else None

    return wait_until(check, 10, f"{n} running task(s)")


def test_worker_takes_over_and_the_plane_resumes_when_it_leaves(plane_proc, worker_proc):
    ready = plane_proc()
    plane_pid = ready["pid"]
    with fw.Client(ready["listen"], timeout=5) as c:
        assert c.submit("pid").result(timeout=5) == plane_pid  # nobody else yet
        w = worker_proc(ready["listen"], "--concurrency", "3", "--name", "w-one")
        [info] = c.stats()["workers"]
        assert (info["name"], info["pid"], info["concurrency"], info["in_flight"]) == ("w-one", w["pid"], 3, 0)
        assert info["host"] and info["last_heartbeat"] > 0 and "add" in info["tasks"]
        assert {c.submit("pid").result(timeout=5) for _ in range(20)} == {w["pid"]}
        assert w["proc"].stop() == 0
        wait_until(lambda: c.stats()["workers"] == [], 5, "the worker to leave")
        assert c.submit("pid").result(timeout=5) == plane_pid


def test_the_plane_runs_the_tasks_only_it_knows_while_workers_are_connected(plane_proc, procs):
    ready = plane_proc()
    bare = procs("worker", "--plane", ready["listen"])  # built-in tasks only, no --tasks
    bare_pid = bare.ready()["pid"]
    with fw.Client(ready["listen"], timeout=5) as c:
        assert c.submit("pid").result(timeout=5) == ready["pid"]  # only the plane knows "pid"
        echo = c.submit("fastworker.echo", 7)
        assert echo.result(timeout=5) == 7 and c.status(echo.task_id)["worker"] != "plane"
        assert [w["pid"] for w in c.stats()["workers"]] == [bare_pid]


def test_dispatch_is_least_loaded_and_never_beyond_concurrency(plane_proc, worker_proc, tmp_path):
    ready = plane_proc()
    for name in ("a", "b"):
        worker_proc(ready["listen"], "--concurrency", "2", "--name", name)
    gate = str(tmp_path / "gate")
    with fw.Client(ready["listen"], timeout=5) as c:
        futs = [c.submit("wait_file", gate) for _ in range(4)]
        assert sorted(running_on(c, futs)) == ["a", "a", "b", "b"]  # the idle worker is not starved
        extra = [c.submit("wait_file", gate) for _ in range(3)]
        wait_until(lambda: c.stats()["tasks"]["queued"] == 3, 5, "3 queued tasks")
        assert sorted(w["in_flight"] for w in c.stats()["workers"]) == [2, 2]  # no worker beyond its slots
        assert extra[2].cancel() and c.stats()["tasks"]["cancelled"] == 1
        open(gate, "w").close()
        assert len({f.result(timeout=10) for f in futs + extra[:2]}) == 2


def test_priority_order_holds_across_the_system(plane_proc, worker_proc, tmp_path):
    ready = plane_proc()
    worker_proc(ready["listen"], "--concurrency", "1")
    gate, log = str(tmp_path / "gate"), str(tmp_path / "order")
    with fw.Client(ready["listen"], timeout=5) as c:
        blocker = c.submit("wait_file", gate)
        running_on(c, [blocker])
        futs = [
            c.submit_with("record", (log, f"{p}{i}"), priority=p)
            for p in ("low", "normal", "high", "critical")
            for i in range(5)
        ]
        wait_until(lambda: c.stats()["tasks"]["queued"] == 20, 5, "20 queued tasks")
        open(gate, "w").close()
        concurrent.futures.wait(futs, timeout=10)
    with open(log) as f:
        assert f.read().split() == [f"{p}{i}" for p in ("critical", "high", "normal", "low") for i in range(5)]


def test_sigkill_of_a_worker_requeues_or_fails_its_tasks_at_once(plane_proc, worker_proc, tmp_path):
    ready = plane_proc()
    w = worker_proc(ready["listen"], "--concurrency", "2")
    gate = str(tmp_path / "gate")
    with fw.Client(ready["listen"], timeout=5) as c:
        retried = c.submit_with("wait_file", (gate,), retries=1)
        doomed = c.submit_with("wait_file", (gate,), retries=0)
        running_on(c, [retried, doomed])
        failed_at = []
        doomed.add_done_callback(lambda f: failed_at.append(time.monotonic()))
        killed_at = time.monotonic()
        w["proc"].p.kill()
        with pytest.raises(fw.WorkerLost):
            doomed.result(timeout=5)
        assert failed_at[0] - killed_at < 1.0
        # the other one had a retry left: re-queued, and the plane (now alone) runs it
        assert running_on(c, [retried]) == ["plane"]
        open(gate, "w").close()
        assert retried.result(timeout=10) == ready["pid"]
        s = c.stats()
        assert c.status(retried.task_id)["attempts"] == 2
        assert (s["dispatch"]["workers_lost"], s["dispatch"]["requeued"], s["workers"]) == (1, 1, [])


def test_sigstop_is_caught_by_heartbeats_and_its_late_result_ignored(plane_proc, worker_proc, tmp_path):
    ready = plane_proc("--heartbeat-timeout", "1")
    w = worker_proc(ready["listen"], "--concurrency", "1")
    gate = str(tmp_path / "gate")
    with fw.Client(ready["listen"], timeout=5) as c:
        fut = c.submit_with("wait_file", (gate,), retries=1)
        running_on(c, [fut])
        stopped_at = time.monotonic()
        os.kill(w["pid"], signal.SIGSTOP)
        try:
            wait_until(lambda: c.stats()["workers"] == [], 5, "the hung worker to be dropped")
            assert time.monotonic() - stopped_at < 3
            assert running_on(c, [fut]) == ["plane"]  # re-queued
            open(gate, "w").close()
            assert fut.result(timeout=10) == ready["pid"]
        finally:
            os.kill(w["pid"], signal.SIGCONT)
        # it wakes up, finishes its copy, reports it (ignored) and registers again
        wait_until(lambda: c.stats()["dispatch"]["late_results"] >= 1, 10, "the late result")
        wait_until(lambda: len(c.stats()["workers"]) == 1, 10, "the worker to come back")
        t = c.stats()["tasks"]
        assert (t["submitted"], t["succeeded"], t["failed"], t["running"]) == (1, 1, 0, 0)
        assert c.status(fut.task_id)["worker"] == "plane"


def test_time_limit_raises_task_timeout_and_a_stuck_worker_is_replaced(plane_proc, worker_proc):
    ready = plane_proc()
    w = worker_proc(ready["listen"], "--overrun-margin", "0.3")
    with fw.Client(ready["listen"], timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(fw.TaskTimeout, match="time limit of 0.3 s"):
            c.submit("stuck", 60).result(timeout=10)  # its task default: timeout=0.3
        assert time.monotonic() - t0 < 2
        with pytest.raises(fw.TaskTimeout):
            c.submit_with("sleepy", (0.1,), timeout=0.05).result(timeout=10)
        again = w["proc"].ready()  # the process re-executed itself: same pid, fresh interpreter
        assert again["pid"] == w["pid"] and again["id"] != w["id"]
        wait_until(lambda: [x["id"] for x in c.stats()["workers"]] == [again["id"]], 5, "the new registration")
        assert c.submit("pid").result(timeout=5) == w["pid"]
        assert c.submit_with("sleepy", (0.01,), timeout=5).result(timeout=5) == 0.01


def test_worker_runs_concurrency_threads_and_async_tasks(plane_proc, worker_proc, tmp_path):
    ready = plane_proc()
    worker_proc(ready["listen"], "--concurrency", "6")
    gate = str(tmp_path / "gate")
    marks = [str(tmp_path / f"started-{i}") for i in range(6)]
    with fw.Client(ready["listen"], timeout=5) as c:
        futs = [c.submit("wait_file", gate, started=m) for m in marks[:3]]
        futs += [c.submit("async_wait_file", gate, started=m) for m in marks[3:]]
        wait_until(lambda: all(os.path.exists(m) for m in marks), 10, "six tasks running at once")
        open(gate, "w").close()
        assert len({f.result(timeout=10) for f in futs}) == 1


def test_worker_reconnects_when_its_plane_comes_back(plane_proc, worker_proc):
    ready = plane_proc()
    address = ready["listen"]
    w = worker_proc(address)
    ready["proc"].stop(signal.SIGKILL)
    again = plane_proc("--listen", address)  # the same address, a new plane
    assert again["listen"] == address
    with fw.Client(address, timeout=5) as c:
        wait_until(lambda: [x["pid"] for x in c.stats()["workers"]] == [w["pid"]], 10, "the worker to return")
        assert c.submit("pid").result(timeout=5) == w["pid"]


def test_worker_sigterm_finishes_or_hands_back_its_tasks(plane_proc, worker_proc, tmp_path):
    ready = plane_proc()
    w = worker_proc(ready["listen"], "--concurrency", "2", "--shutdown-grace", "1.0")
    gate, started = str(tmp_path / "gate"), [str(tmp_path / "quick"), str(tmp_path / "slow")]
    with fw.Client(ready["listen"], timeout=5) as c:
        quick = c.submit("mark_and_sleep", started[0], 0.2)
        slow = c.submit_with("wait_file", (gate,), {"started": started[1]}, retries=0)
        wait_until(lambda: all(os.path.exists(m) for m in started), 10, "both tasks to start on the worker")
        t0 = time.monotonic()
        assert w["proc"].stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 5
        assert quick.result(timeout=5) == 0.2 and c.status(quick.task_id)["worker"] != "plane"
        assert running_on(c, [slow]) == ["plane"]  # handed back, not lost
        open(gate, "w").close()
        assert slow.result(timeout=10) == ready["pid"]
        assert c.status(slow.task_id)["attempts"] == 1
        assert c.stats()["dispatch"]["handed_back"] == 1


def test_chaos_every_task_ends_exactly_once(plane_proc, worker_proc):
    """Workers are SIGKILLed and restarted while thousands of tasks flow."""
    ready = plane_proc("--concurrency", "2")
    address = ready["listen"]
    workers = [worker_proc(address, "--concurrency", "4") for _ in range(3)]
    futs = []
    with fw.Client(address, timeout=10) as c:

        def submit_waves():  # 4000 tasks in waves, while workers die
            for _ in range(20):
                futs.extend(c.submit_with("sleepy", (0.003,), retries=(i % 2) * 5) for i in range(200))
                time.sleep(0.2)

        submitter = threading.Thread(target=submit_waves)
        submitter.start()
        kills = 0
        while kills < 5 or submitter.is_alive() or not all(f.done() for f in list(futs)):
            victim = workers.pop(0)
            victim["proc"].p.kill()
            victim["proc"].kill()
            kills += 1
            workers.append(worker_proc(address, "--concurrency", "4"))
            assert kills < 100
        submitter.join()
        done, pending = concurrent.futures.wait(futs, timeout=30)
        assert not pending and kills >= 5 and len(futs) == 4000, kills
        outcomes = {"ok": 0, "lost": 0}
        for i, f in enumerate(futs):
            if f.exception() is None:
                assert f.result() == 0.003
                outcomes["ok"] += 1
            else:  # only tasks without retries may be lost with their worker
                assert isinstance(f.exception(), fw.WorkerLost) and i % 2 == 0, f.exception()
                outcomes["lost"] += 1
        s = c.stats()
    t = s["tasks"]
    assert t["submitted"] == 4000 and t["queued"] == t["running"] == 0
    assert (t["succeeded"], t["failed"], t["cancelled"]) == (outcomes["ok"], outcomes["lost"], 0)
    assert s["dispatch"]["workers_lost"] >= 5 and outcomes["ok"] >= 2000


def test_journal_a_restart_keeps_keys_tenants_limits_joins_and_debounce(plane_proc, tmp_path):
    journal, gate = str(tmp_path / "plane.db"), str(tmp_path / "gate")
    ready = plane_proc("--journal", journal, "--concurrency", "2")
    address = ready["listen"]
    with fw.Client(address, timeout=10) as a, fw.Client(address, timeout=10) as b:
        keyed = a.submit_with("wait_file", (gate,), key="invoice-7", tenant="acme", concurrency=1)
        wait_until(lambda: a.status(keyed.task_id)["state"] == "running", 5, "the keyed task to run")
        held = a.submit_with("wait_file", (gate,), concurrency=1)  # waits for the limit: one of them at once
        joined = b.submit_with("wait_file", (gate,), key="invoice-7")
        debounced = a.submit_with("add", (1, 2), key="d", debounce=1.0)
        assert a.status(debounced.task_id)["waiting"] == "debounce"  # (the leader, before b submits)
        newer = b.submit_with("add", (3, 4), key="d", debounce=1.0)  # newer arguments: those run
        assert b.status(newer.task_id)["joined"] == debounced.task_id  # (accepted, so on disk)
        assert a.status(held.task_id)["waiting"] == "concurrency"
        ready["proc"].stop(signal.SIGKILL)
        plane_proc("--journal", journal, "--concurrency", "2", "--listen", address)
        again = b.submit_with("wait_file", (gate,), key="invoice-7")  # the key is still taken: it joins
        s = b.status(again.task_id)
        assert s["joined"] == keyed.task_id and b.status(joined.task_id)["joined"] == keyed.task_id
        assert a.status(held.task_id)["waiting"] == "concurrency"  # the limit still holds it back
        assert debounced.result(timeout=10) == newer.result(timeout=10) == 7  # one run, the newest arguments
        open(gate, "w").close()
        results = [f.result(timeout=15) for f in (keyed, joined, again, held)]
        assert results[0] == results[1] == results[2]  # one run for the key, whoever joined it, before or after
        assert a.stats()["tasks"]["submitted"] == 3


def test_journal_queued_tasks_results_and_times_survive_kill_9(plane_proc, tmp_path):
    journal, gate = str(tmp_path / "plane.db"), str(tmp_path / "gate")
    ready = plane_proc("--journal", journal, "--concurrency", "1")
    address = ready["listen"]
    with fw.Client(address, timeout=10) as c:
        done = c.submit("add", 1, 2)
        assert done.result(timeout=5) == 3
        blocker = c.submit("wait_file", gate)
        queued = [c.submit("add", i, i) for i in range(20)]
        later = c.submit_with("add", (5, 5), delay=2.0)
        due = c.status(later.task_id)["due_at"]
        wait_until(lambda: c.status(blocker.task_id)["state"] == "running", 5, "the blocker to run")
        before = c.stats()
        ready["proc"].stop(signal.SIGKILL)
        again = plane_proc("--journal", journal, "--concurrency", "1", "--listen", address)
        open(gate, "w").close()
        assert [f.result(timeout=15) for f in queued] == [2 * i for i in range(20)]  # the same futures
        assert blocker.result(timeout=15) == again["pid"]  # it was running when the plane died: it ran again
        assert later.result(timeout=15) == 10
        started = c.status(later.task_id)["started_at"]
        assert due <= started < due + 1.0  # at its old time, not 2 s after the restart
        after = c.stats()
        assert after["plane"]["id"] == before["plane"]["id"]
        t = after["tasks"]
        assert t["submitted"] == 23 == t["succeeded"] and t["submitted"] == sum(t[x] for x in fw.STATES)
    with fw.Client(address, timeout=5) as other:
        assert other.result(done.task_id, timeout=5) == 3  # a result from before the crash


def test_journal_a_task_running_on_a_worker_when_the_plane_dies_completes_exactly_once(
    plane_proc, worker_proc, tmp_path
):
    journal, gate, log = str(tmp_path / "plane.db"), str(tmp_path / "gate"), str(tmp_path / "log")
    ready = plane_proc("--journal", journal)
    address = ready["listen"]
    w = worker_proc(address, "--name", "w1")
    with fw.Client(address, timeout=10) as c:
        fut = c.submit("gated_record", gate, log, "x")
        wait_until(lambda: os.path.exists(log), 10, "the task to start on the worker")
        ready["proc"].stop(signal.SIGKILL)
        plane_proc("--journal", journal, "--listen", address)
        wait_until(lambda: [x["pid"] for x in c.stats()["workers"]] == [w["pid"]], 10, "the worker to come back")
        open(gate, "w").close()
        assert fut.result(timeout=15) == "x"
        with open(log) as f:
            assert f.read().split("\n")[:-1] == ["start x", "end x"]  # it ran once
        status = c.status(fut.task_id)
        assert (status["attempts"], status["worker"]) == (1, "w1")


def test_journal_a_task_running_at_two_plane_crashes_fails_with_worker_lost(plane_proc, tmp_path):
    journal, gate, log = str(tmp_path / "plane.db"), str(tmp_path / "gate"), str(tmp_path / "log")
    ready = plane_proc("--journal", journal)
    address = ready["listen"]
    with fw.Client(address, timeout=10) as c:
        fut = c.submit("gated_record", gate, log, "p")  # runs in the plane: it dies with it
        for crash in (1, 2):
            wait_until(lambda n=crash: open(log).read().count("start") == n if os.path.exists(log) else False, 10)
            ready["proc"].stop(signal.SIGKILL)
            ready = plane_proc("--journal", journal, "--listen", address)
        with pytest.raises(fw.WorkerLost, match="crashed, twice"):
            fut.result(timeout=10)
        assert c.stats()["tasks"]["failed"] == 1


def test_journal_the_cli_refuses_a_file_that_is_not_its_own_and_a_second_plane(plane_proc, tmp_path):
    notes = tmp_path / "notes.db"
    notes.write_text("my notes")
    r = run_cli("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--journal", str(notes))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and str(notes) in lines[0], r.stderr
    assert notes.read_text() == "my notes" and os.listdir(tmp_path) == ["notes.db"]
    journal = str(tmp_path / "plane.db")
    plane_proc("--journal", journal)
    r = run_cli("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--journal", journal)
    assert r.returncode == 1 and "in use by another plane" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_without_a_journal_the_plane_writes_no_file(procs, tmp_path):
    p = procs("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", cwd=str(tmp_path))
    ready = p.ready()
    with fw.Client(ready["listen"], timeout=5) as c:
        assert [f.result(timeout=5) for f in [c.submit("fastworker.echo", i) for i in range(50)]] == list(range(50))
    assert p.stop() == 0
    assert os.listdir(tmp_path) == []


def test_chaos_the_plane_is_killed_again_and_again_under_load(plane_proc, worker_proc, tmp_path):
    """kill -9 of the plane, five times, while tasks flow through it and two
    workers: every future ends once; no result changes after it was
    delivered; the accounting holds."""
    journal = str(tmp_path / "plane.db")
    ready = plane_proc("--journal", journal, "--concurrency", "2")
    address = ready["listen"]
    for _ in range(2):
        worker_proc(address, "--concurrency", "4")
    futs = []
    c = fw.Client(address, timeout=20)
    try:

        def submit_waves():
            for wave in range(12):
                futs.extend(c.submit_with("add", (wave, i), retries=1) for i in range(100))
                time.sleep(0.15)  # paces the load; nothing waits on it

        submitter = threading.Thread(target=submit_waves)
        submitter.start()
        done_before = 0
        for _ in range(5):  # each kill after some progress since the last one

            def progressed(last=done_before):
                return sum(f.done() for f in list(futs)) >= last + 30 or not submitter.is_alive()

            wait_until(progressed, 30, "progress")
            done_before = sum(f.done() for f in list(futs))
            ready["proc"].stop(signal.SIGKILL)
            ready = plane_proc("--journal", journal, "--concurrency", "2", "--listen", address)
        submitter.join()
        done, pending = concurrent.futures.wait(futs, timeout=60)
        assert not pending and len(futs) == 1200, [c.status(f.task_id) for f in list(pending)[:5]]
        delivered = {}
        for f in futs:
            exc = f.exception()
            if exc is None:
                delivered[f.task_id] = f.result()
            else:  # a task running through two crashes, or a submit the plane never answered
                assert isinstance(exc, (fw.WorkerLost, fw.PlaneUnavailable)), exc
        assert len(delivered) >= 1000
        for i, f in enumerate(futs):
            if f.task_id in delivered:
                assert delivered[f.task_id] == (i // 100) + (i % 100)
        with fw.Client(address, timeout=10) as other:  # what the plane holds is what was delivered
            for tid in random.Random(1).sample(sorted(delivered), 200):
                assert other.result(tid, timeout=5) == delivered[tid]
        t = c.stats()["tasks"]
        assert t["submitted"] == sum(t[x] for x in fw.STATES) and t["queued"] == t["running"] == 0
    finally:
        c.close()


def test_sigterm_on_a_busy_plane_delivers_what_finishes_and_exits_zero(plane_proc, tmp_path):
    gate = str(tmp_path / "gate")
    ready = plane_proc("--concurrency", "4", "--shutdown-grace", "1.0")
    with fw.Client(ready["listen"], timeout=10) as c:
        slow = [c.submit("wait_file", gate) for _ in range(2)]
        quick = [c.submit("sleepy", 0.3) for _ in range(2)]
        waiting = [c.submit("wait_file", gate) for _ in range(2)]
        wait_until(lambda: c.stats()["tasks"]["running"] == 4, 5, "four running tasks")
        t0 = time.monotonic()
        assert ready["proc"].stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 1.0 + 2
        assert [f.result(timeout=1) for f in quick] == [0.3, 0.3]
        for f in slow + waiting:
            with pytest.raises(fw.PlaneUnavailable, match="stopped before the task finished"):
                f.result(timeout=1)


def test_embedded_worker_in_threads():
    with fw.Plane("tcp://127.0.0.1:0").start() as plane:
        with fw.Worker(plane.address, concurrency=2, name="embedded", overrun_margin=0.2) as worker:
            wait_until(worker.registered.is_set, 5, "registration")
            with fw.Client(plane.address, timeout=5) as c:
                assert [w["name"] for w in c.stats()["workers"]] == ["embedded"]
                fut = c.submit("t.add", 2, 3)
                assert fut.result(timeout=5) == 5 and c.status(fut.task_id)["worker"] == "embedded"
                with pytest.raises(fw.TaskTimeout):
                    c.submit_with("t.block", ("never-opened",), timeout=0.1).result(timeout=5)
                wait_until(worker.replace.is_set, 5, "the overrun to be noticed")
                gate("never-opened").set()
                assert c.submit("t.async_add", 1, 1).result(timeout=5) == 2
    GATES.clear()


def test_a_worker_never_sends_more_results_in_one_request_than_the_plane_takes():
    w = fw.Worker("tcp://127.0.0.1:1", max_message_size=4 * 1024 * 1024)  # (not started: no socket)
    w._done = [b"r" * (1024 * 1024)] * 5  # five finished results of 1 MB
    with w._lock:  # (the lane's hold, as it takes a reply and then the results to send)
        w._accept({"plane": "p", "heartbeat": "tcp://127.0.0.1:2", "max_message_size": 2 * 1024 * 1024, "tasks": []})
        batches = []
        while w._done:
            batches.append(len(w._take_done()))
    assert batches == [1, 1, 1, 1, 1]  # the plane's limit (2 MB) holds one at a time
    w._limit = 4 * 1024 * 1024
    w._done = [b"r" * (1024 * 1024)] * 5
    with w._lock:
        assert len(w._take_done()) == 3 and len(w._done) == 2  # within 4 MB (less the envelope)


# -- trust boundaries ---------------------------------------------------------------------------


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class Relay:
    """A man in the middle on NNG's TCP transport: after an 8-byte handshake
    each way, every message is an 8-byte big-endian length and its bytes (a
    REQ/REP message starts with its 4-byte request id).  It forwards each
    message, records it, lets ``hook`` rewrite or drop it, and can send its
    own to either side."""

    def __init__(self, address):
        host, port = address.rpartition("/")[2].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.frames = []  # (connection number, "up" or "down", message), in the order seen
        self.hook = None  # (connection, direction, message) -> the message to forward, or None
        self.conns = []  # (the peer's socket, the plane's socket) per connection
        self.locks = {}  # socket -> the lock its writers take
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while True:
            try:
                down, _ = self.server.accept()
                up = socket.create_connection(self.upstream)
            except OSError:
                return
            n = len(self.conns)
            self.conns.append((down, up))
            self.locks[down], self.locks[up] = threading.Lock(), threading.Lock()
            for src, dst, direction in ((down, up, "up"), (up, down, "down")):
                t = threading.Thread(target=self._pump, args=(n, src, dst, direction), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, n, src, dst, direction):
        try:
            handshake = recv_exactly(src, 8)
            with self.locks[dst]:
                dst.sendall(handshake)
            while True:
                msg = recv_exactly(src, int.from_bytes(recv_exactly(src, 8), "big"))
                self.frames.append((n, direction, msg))
                hook = self.hook
                if hook is not None:
                    msg = hook(n, direction, msg)
                if msg is not None:
                    self.send(n, direction, msg)
        except OSError:
            for s in self.conns[n]:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def send(self, n, direction, msg):
        """Send ``msg`` on connection ``n``: "up" to the plane, "down" to the peer."""
        dst = self.conns[n][1 if direction == "up" else 0]
        with self.locks[dst]:
            dst.sendall(len(msg).to_bytes(8, "big") + msg)

    def messages(self, direction, op):
        """The recorded REQ/REP messages of one op: (connection, header, body)."""
        out = []
        for n, d, msg in self.frames:
            body = msg[4:]
            if d == direction and f'"op":"{op}"'.encode() in body:
                out.append((n, msg[:4], body))
        return out

    def close(self):
        for s in [self.server, *itertools.chain.from_iterable(self.conns)]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def relay():
    made = []

    def make(address):
        made.append(Relay(address))
        return made[-1]

    yield make
    for r in made:
        r.close()


def sign(body, secret):
    return fw._tag(secret, body) + body if secret else body


def nested(depth):
    v = []
    for _ in range(depth):
        v = [v]
    return v


POISON = [None, True, False, -1, 0, 2**63, 1e308, float("nan"), float("inf"), "", "x" * 5000, [], {}, [[[]]],
          {"id": []}, "\ud800", nested(200), 3.5, "normal"]  # fmt: skip


def mutate_value(rng, msg):
    """A copy of ``msg`` with one value somewhere in it replaced or removed."""
    msg = json.loads(json.dumps(msg))
    node = msg
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return msg
        k = rng.choice(keys)
        child = node[k]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
            node = child
            continue
        if isinstance(node, dict) and rng.random() < 0.2:
            del node[k]
        else:
            node[k] = rng.choice(POISON)
        return msg


def mutate_bytes(rng, data):
    """``data`` damaged on the byte level."""
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:
        i = rng.randrange(len(data) + 1)
        data[i:i] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3:
        data = bytearray()
    elif kind == 4:
        data = data * 2
    else:
        data = bytearray(rng.randbytes(rng.randint(1, 64)))
    return bytes(data)


def request_templates(rng, secret, ticket):
    """A valid body of every request the plane takes, stamped when signed."""
    session = {"s": "fuzz", "n": rng.randint(1, 10**6), "b": ticket} if secret else {}
    tid = f"fz-{rng.randrange(10**9)}"
    task = {"id": tid, "name": "fastworker.echo", "args": [1], "kwargs": {}, "priority": "high"}
    info = {"id": "fz-w", "name": "fz", "concurrency": 1, "tasks": {"fastworker.echo": {}}, "holding": []}
    return [
        {"op": "submit", "client": "fz-c", "tasks": [task, dict(task, id=tid + "b", delay=0.01)]},
        {"op": "poll", "client": "fz-c", "wait": 0},
        {"op": "fetch", "ids": [tid, "nope"], "wait": 0},
        {"op": "status", "ids": [tid]},
        {"op": "cancel", "ids": [tid]},
        {"op": "stats"},
        {"op": "hello"},
        {"op": "bye", "client": "fz-c"},
        {"op": "pull", "worker": "fz-w", "credit": 0, "results": [], "info": info},
        {"op": "pull", "worker": "fz-w", "credit": 0, "results": [{"id": tid, "state": "succeeded", "run": 1}]},
    ], session


def fuzz_requests(address, secret, rng, count):
    """Send ``count`` damaged requests; returns how many got no reply
    (only requests that may wait for work, a pull, are allowed none)."""
    unanswered = 0
    ticket = ""
    with pynng.Req0(dial=address, recv_timeout=2000, send_timeout=2000) as s:
        s.resend_time = -1
        for _ in range(count):
            templates, stamp = request_templates(rng, secret, ticket)
            msg = {"v": fw.PROTOCOL_VERSION, **rng.choice(templates), **stamp}
            if rng.random() < 0.5:
                data = sign(json.dumps(mutate_value(rng, msg)).encode(), secret)
            else:
                data = mutate_bytes(rng, sign(json.dumps(msg).encode(), secret))
            s.send(data)
            try:
                reply = s.recv()
            except pynng.Timeout:
                assert msg["op"] == "pull", msg
                unanswered += 1
                continue
            if reply[:1] != b"{" and secret:  # a signed reply: learn the ticket from a "stale" one
                r = fw.decode(reply, secret)
                if r["op"] == "error" and r["error"]["kind"] == "stale":
                    ticket = r["b"]
    return unanswered


@pytest.mark.parametrize("secret", [None, b"s3cret"], ids=["unsigned", "signed"])
def test_fuzzed_requests_and_heartbeats_leave_the_plane_serving(secret, caplog):
    """Thousands of damaged messages on the plane's request and heartbeat
    sockets, next to a real worker and client: each request gets an answer,
    nothing is counted as an internal error, the heartbeat receiver lives on,
    the real worker is never dropped, and the accounting holds."""
    rng = random.Random(9)
    with fw.Plane("tcp://127.0.0.1:0", secret=secret, heartbeat_timeout=3.0).start() as plane:
        worker = fw.Worker(plane.address, secret=secret, concurrency=2).start()
        try:
            wait_until(worker.registered.is_set, 10, "the worker to register")
            unanswered = fuzz_requests(plane.address, secret, rng, 1500)
            with pynng.Pub0(dial=plane.heartbeat_address) as pub:
                beat = {"v": fw.PROTOCOL_VERSION, "op": "heartbeat", "worker": {"id": worker.id, "in_flight": 0}}
                for _ in range(800):
                    if rng.random() < 0.5:
                        data = sign(json.dumps(mutate_value(rng, beat)).encode(), secret)
                    else:
                        data = mutate_bytes(rng, sign(json.dumps(beat).encode(), secret))
                    pub.send(data)
                pub.send(b"")  # the empty message that used to end the receiver
                counted = plane.stats()["errors"]

                def still_receiving():
                    pub.send(b"not a heartbeat")
                    return sum(plane.stats()["errors"].values()) > sum(counted.values())

                wait_until(still_receiving, 10, "the heartbeat receiver to count one more bad message")
            with fw.Client(plane.address, secret=secret, timeout=5) as c:
                futs = [c.submit("t.add", i, 1) for i in range(200)]
                assert [f.result(timeout=10) for f in futs] == [i + 1 for i in range(200)]
                stats = c.stats()
            errors = stats["errors"]
            assert errors["internal"] == 0 and errors["protocol"] + errors["auth"] > 1000, errors
            assert worker.id in [w["id"] for w in stats["workers"]]
            assert f"worker {worker.id} lost" not in caplog.text
            assert unanswered < 50
            with plane._lock:
                check_invariant(plane.core)
        finally:
            worker.stop()


class FakePlane:
    """A REP socket on loopback that answers every request with
    ``answer(request)`` (bytes), counting the requests of each op."""

    def __init__(self, answer):
        self.answer, self.ops = answer, collections.Counter()
        self.sock = pynng.Rep0(recv_timeout=100)
        self.sock.listen("tcp://127.0.0.1:0")
        self.address = f"tcp://{self.sock.listeners[0].local_address}"
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                req = json.loads(self.sock.recv())
            except pynng.Timeout:
                continue
            self.ops[req["op"]] += 1
            self.sock.send(self.answer(req))

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


def test_client_calls_raise_protocol_error_for_replies_they_cannot_use():
    def answer(req):
        if req["op"] == "submit":
            return fw.encode("accepted", plane="p", rejected=[])
        if req["op"] == "status" and req["ids"] == ["empty"]:
            return fw.encode("statuses", plane="p", statuses=[])
        if req["op"] == "fetch" and req["ids"] == ["empty"]:
            return fw.encode_batch("results", "results", [], plane="p", boot="b")
        return fw.encode("ok", plane="p")  # the wrong op, whatever was asked

    fake = FakePlane(answer)
    try:
        with fw.Client(fake.address, timeout=2) as c:
            calls = {
                "report": c.stats, "statuses": lambda: c.status("x"), "cancelled": lambda: c.cancel("x"),
                "results": lambda: c.result("x", timeout=1), "purged": c.purge, "statuses ": lambda: c.tasks(),
            }  # fmt: skip
            for expected, call in calls.items():
                with pytest.raises(fw.ProtocolError, match=repr(expected.strip())):
                    call()
            for call in (lambda: c.status("empty"), lambda: c.result("empty", timeout=1)):
                with pytest.raises(fw.ProtocolError, match="holds 0 item"):
                    call()
    finally:
        fake.close()


def test_client_does_not_spin_on_a_plane_that_answers_polls_at_once():
    def answer(req):
        if req["op"] == "submit":
            return fw.encode("accepted", plane="p", rejected=[])
        if req["op"] == "poll":
            return fw.encode_batch("results", "results", [], plane="p", boot="b")
        return fw.encode("ok", plane="p")

    fake = FakePlane(answer)
    c = fw.Client(fake.address, timeout=5)
    try:
        c.submit("never.done")  # a pending future: the client keeps polling for it
        wait_until(lambda: fake.ops["poll"] >= 3, 5, "the first polls")
        first = fake.ops["poll"]
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # (the window in which to count polls, not a synchronisation)
            time.sleep(0.05)
        assert fake.ops["poll"] - first < 30  # it backs off (without: thousands in 1.5 s)
    finally:
        c.close()
        fake.close()


@pytest.mark.parametrize("secret", [None, b"s3cret"], ids=["unsigned", "signed"])
def test_clients_and_workers_survive_damaged_traffic(relay, secret):
    """A relay damages one message in ten, both ways, between the plane and a
    client and a worker: every future ends; once the line is clean again
    everything works, and with a secret no damaged value is ever taken."""
    rng = random.Random(11)
    lock = threading.Lock()  # guards rng: the relay's threads share it

    def damage(n, direction, msg):
        with lock:
            if rng.random() < 0.1:
                return msg[:4] + mutate_bytes(rng, msg[4:])
        return msg

    with fw.Plane("tcp://127.0.0.1:0", secret=secret, heartbeat_timeout=3.0).start() as plane:
        r = relay(plane.address)
        worker = fw.Worker(r.address, secret=secret, concurrency=4, timeout=2)
        worker.start()
        try:
            wait_until(worker.registered.is_set, 10, "the worker to register")
            with fw.Client(r.address, secret=secret, timeout=3) as c:
                r.hook = damage
                futs = [c.submit("t.add", i, 1) for i in range(300)]
                concurrent.futures.wait(futs, timeout=60)
                assert all(f.done() for f in futs)
                values = [f.result() for f in futs if f.exception() is None]
                if secret:
                    assert values == [i + 1 for i, f in enumerate(futs) if f.exception() is None]
                r.hook = None
                futs = [c.submit("t.add", i, 1) for i in range(100)]
                assert [f.result(timeout=20) for f in futs] == [i + 1 for i in range(100)]
                stats = c.stats()
            assert stats["errors"]["internal"] == 0
            wait_until(lambda: worker.id in [w["id"] for w in plane.stats()["workers"]], 10, "the worker")
            with plane._lock:
                check_invariant(plane.core)
        finally:
            worker.stop()


def test_a_recorded_message_is_never_taken_again(relay, tmp_path, monkeypatch):
    """With a secret, recorded submit, poll, pull and heartbeat messages sent
    again are refused, by the plane and by the plane restarted."""
    secret, journal = b"s3cret", str(tmp_path / "j.db")
    plane = fw.Plane("tcp://127.0.0.1:0", secret=secret, journal=journal).start()
    worker = None
    try:
        r = relay(plane.address)
        RECORD.clear()
        beats = []
        real_encode = fw.encode

        def recording_encode(op, *args, **fields):
            data = real_encode(op, *args, **fields)
            if op == "heartbeat":
                beats.append(data)
            return data

        monkeypatch.setattr(fw, "encode", recording_encode)
        worker = fw.Worker(r.address, secret=secret, concurrency=1).start()
        wait_until(lambda: len(beats) >= 1, 10, "a heartbeat")
        with fw.Client(r.address, secret=secret, timeout=5) as c:
            assert c.submit("t.record", "once").result(timeout=5) == "once"
            submit = r.messages("up", "submit")[-1][2]  # the one taken (an earlier one may have fetched a ticket)
            poll = r.messages("up", "poll")[-1][2]
            pull = r.messages("up", "pull")[-1][2]
            before = c.stats()["errors"]["replay"]
            for body in (submit, poll, pull):
                reply = fw.decode(raw_request_bytes(plane.address, body), secret)
                assert reply["op"] == "error" and "already taken" in reply["error"]["message"], reply
            assert c.stats()["errors"]["replay"] == before + 3
            with pynng.Pub0(dial=plane.heartbeat_address) as pub:

                def replayed_beats_counted():
                    pub.send(beats[0])  # PUB/SUB may drop it while the line comes up: send it until one arrives
                    return c.stats()["errors"]["replay"] > before + 3

                wait_until(replayed_beats_counted, 10, "the replayed heartbeat to be refused")
            assert RECORD == ["once"]
        worker.stop()
        plane.stop()
        worker = None
        plane = fw.Plane(plane.address, secret=secret, journal=journal).start()  # same port, new boot
        for body in (submit, poll, pull):  # a stale ticket: told to get a new one, and nothing is done
            reply = fw.decode(raw_request_bytes(plane.address, body), secret)
            assert reply["op"] == "error" and reply["error"]["kind"] == "stale", reply
        with fw.Client(plane.address, secret=secret, timeout=5) as c:
            assert c.stats()["tasks"]["submitted"] == 1 and RECORD == ["once"]
    finally:
        if worker is not None:
            worker.stop()
        plane.stop()


def raw_request_bytes(address, data, timeout=5.0):
    with pynng.Req0(dial=address, recv_timeout=int(timeout * 1000), send_timeout=int(timeout * 1000)) as s:
        s.send(data)
        return s.recv()


def test_a_recorded_reply_is_not_taken_as_the_answer_to_another_request(relay):
    """A man in the middle answers a submit with the plane's recorded answer
    to an earlier one: the client does not take it."""
    secret = b"s3cret"
    with fw.Plane("tcp://127.0.0.1:0", secret=secret).start() as plane:
        r = relay(plane.address)
        with fw.Client(r.address, secret=secret, timeout=3) as c:
            assert c.submit("t.add", 1, 1).result(timeout=5) == 2
            (_, _, accepted), *_ = r.messages("down", "accepted")

            def answer_with_the_recording(n, direction, msg):
                if direction == "up" and b'"op":"submit"' in msg:
                    r.send(n, "down", msg[:4] + accepted)  # the request's own id, the old answer
                    return None
                return msg

            r.hook = answer_with_the_recording
            fut = c.submit("t.add", 2, 2)
            with pytest.raises(fw.ProtocolError, match="does not answer this request"):
                fut.result(timeout=5)
            r.hook = None
            assert c.submit("t.add", 3, 3).result(timeout=5) == 6


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA, a plane certificate for 127.0.0.1 and a client certificate
    signed by it, and a client certificate signed by another CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is not installed")
    d = tmp_path_factory.mktemp("certs")
    leaves = [("plane", "ca", "server"), ("client", "ca", "client"), ("intruder", "rogue", "client")]
    return fw._make_certs(str(d), leaves, cas=("ca", "rogue"))


def test_tls_and_mutual_tls_serve_every_role_and_refuse_strangers(plane_proc, procs, tasks_dir, certs):
    ca, cert, key = certs["ca.pem"], certs["client.pem"], certs["client.key"]
    tls = ["--tls-cert", certs["plane.pem"], "--tls-key", certs["plane.key"]]
    ready = plane_proc("--listen", "tls+tcp://127.0.0.1:0", *tls, "--tls-ca", ca, "--secret", "s3cret")
    address = ready["listen"]
    assert address.startswith("tls+tcp://127.0.0.1:") and ready["dashboard"].startswith("https://")
    w = procs("worker", "--plane", address, "--tasks", "fwtasks", "--tls-ca", ca, "--tls-cert", cert,
              "--tls-key", key, "--secret", "s3cret", cwd=tasks_dir)  # fmt: skip
    worker_pid = w.ready()["pid"]
    mine = dict(secret="s3cret", tls_ca=ca, tls_cert=cert, tls_key=key)
    with fw.Client(address, timeout=5, **mine) as c:
        assert c.submit("pid").result(timeout=10) == worker_pid
        seen = EventLog(c)
        wait_until(lambda: c.submit("add", 1, 2).result(timeout=5) == 3 and seen.named("add"), 10, "an event")
        assert seen.named("add")[0]["state"] == "succeeded"
        seen.close()
    r = run_cli("submit", "add", "2", "3", "--plane", address, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key,
                "--secret", "s3cret")  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "5\n"), r.stderr
    # strangers: no client certificate, one from another CA, a client that does not trust the plane, plain TCP
    strangers = [
        dict(secret="s3cret", tls_ca=ca),
        dict(secret="s3cret", tls_ca=ca, tls_cert=certs["intruder.pem"], tls_key=certs["intruder.key"]),
        dict(secret="s3cret", tls_ca=certs["rogue.pem"], tls_cert=cert, tls_key=key),
    ]
    for kw in strangers:
        with fw.Client(address, timeout=1, **kw) as c:
            with pytest.raises(fw.PlaneUnavailable):
                c.submit("add", 1, 1).result(timeout=5)
    with fw.Client(address.replace("tls+tcp", "tcp"), timeout=1, secret="s3cret") as c:
        with pytest.raises(fw.PlaneUnavailable):
            c.stats()
    import ssl

    context = ssl.create_default_context(cafile=ca)
    token = fw.derived_dashboard_token("s3cret")
    req = urllib.request.Request(ready["dashboard"] + "api/stats", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5, context=context) as resp:
        assert json.loads(resp.read())["tasks"]["succeeded"] >= 3


def test_tls_without_client_certificates(certs):
    with fw.Plane("tls+tcp://127.0.0.1:0", tls_cert=certs["plane.pem"], tls_key=certs["plane.key"]).start() as plane:
        with fw.Client(plane.address, tls_ca=certs["ca.pem"], timeout=5) as c:
            assert c.submit("t.add", 2, 2).result(timeout=5) == 4
        with pytest.raises(ValueError, match="--tls-ca"):
            fw.Client(plane.address)
    with pytest.raises(ValueError, match="--tls-cert"):
        fw.Plane("tls+tcp://127.0.0.1:0")


class EventLog:
    """A client's event stream, read in a thread of its own into a list."""

    def __init__(self, client):
        self.events = []
        self._thread = threading.Thread(target=self._read, args=(client,), daemon=True)
        self._thread.start()

    def _read(self, client):
        for e in client.events(timeout=2):
            self.events.append(e)

    def named(self, name):
        return [e for e in list(self.events) if e["name"] == name]

    def close(self):
        self._thread.join(15)


@pytest.mark.parametrize("details", [False, True], ids=["default", "event-details"])
def test_with_a_secret_events_are_signed_and_carry_no_details(details):
    with fw.Plane("tcp://127.0.0.1:0", secret="s3cret", event_details=details).start() as plane:
        with pynng.Sub0(dial=plane.events_address, recv_timeout=100) as sniffer:
            sniffer.subscribe(b"")
            sniffed = []
            with fw.Client(plane.address, secret="s3cret", timeout=5) as c:
                seen = EventLog(c)

                def one_round():
                    with pytest.raises(fw.TaskError):
                        c.submit("t.fail", "the-secret-error-text").result(timeout=5)
                    try:
                        sniffed.append(sniffer.recv())
                    except pynng.Timeout:
                        pass
                    return sniffed and seen.named("t.fail")

                wait_until(one_round, 10, "an event, sniffed and received")
                seen.close()
    event = seen.named("t.fail")[0]
    assert fw.decode(sniffed[0], b"s3cret")["op"] == "events"  # signed
    assert (b"the-secret-error-text" in sniffed[0]) is details and ("error" in event) is details
    assert event["state"] == "failed"
    with pytest.raises(fw.AuthenticationError):
        fw.decode(sniffed[0], b"another secret")


class RawSender:
    """Signed requests with any body, stamped as a client stamps them."""

    def __init__(self, address, secret):
        self.sock = pynng.Req0(dial=address, recv_timeout=5000, send_timeout=5000)
        self.session = fw._Session(secret)

    def ask(self, body):
        for _ in range(2):  # the first may only fetch a ticket
            stamp = self.session.stamp()
            text = json.dumps({**body, **stamp}).replace('"<deep>"', "[" * 985 + "]" * 985)  # too deep for json
            self.sock.send(sign(text.encode(), self.session.secret))
            reply = fw.decode(self.sock.recv(), self.session.secret)
            if self.session.answers(reply, stamp):
                return reply
        raise AssertionError("no ticket")

    def close(self):
        self.sock.close()


def test_poison_options_are_refused_and_no_runner_dies(plane_proc, procs, tasks_dir):
    ready = plane_proc("--secret", "s3cret")
    address = ready["listen"]
    procs("worker", "--plane", address, "--tasks", "fwtasks", "--secret", "s3cret", cwd=tasks_dir).ready()
    with fw.Client(address, secret="s3cret", timeout=5) as c:
        for option, value in BAD_OPTIONS:  # checked before sending
            with pytest.raises(ValueError, match=option):
                c.submit_with("add", (1, 2), **{option: value})
        with pytest.raises(ValueError, match="nested"):  # JSON can carry it, the plane could not send it on
            c.submit("add", nested(985), [])
        # the same through the wire, bypassing the client: refused as a whole, nothing half-applied
        raw = RawSender(address, b"s3cret")
        try:
            for option, value in [*BAD_OPTIONS, ("args", "<deep>")]:
                good = {"id": f"ok-{option}", "name": "add", "args": [1, 2], "kwargs": {}}
                bad = {"id": f"bad-{option}", "name": "add", "args": [1, 2], "kwargs": {}, option: value}
                reply = raw.ask({"v": fw.PROTOCOL_VERSION, "op": "submit", "client": "x", "tasks": [good, bad]})
                assert reply["op"] == "error" and reply["error"]["kind"] == "protocol", (option, reply)
            for wait in (float("nan"), float("inf"), 10**400, -1, True):
                reply = raw.ask({"v": fw.PROTOCOL_VERSION, "op": "poll", "client": "x", "wait": wait})
                assert reply["op"] == "error" and "wait" in reply["error"]["message"], reply
        finally:
            raw.close()
        stats = c.stats()
        assert stats["tasks"]["submitted"] == 0 and stats["errors"]["internal"] == 0
        assert stats["errors"]["protocol"] == len(BAD_OPTIONS) + 1 + 5
        # every runner is alive: the plane's and the worker's slots all run at once
        futs = [c.submit_with("sleepy", (0.2,), timeout=30) for _ in range(16)]
        assert [f.result(timeout=10) for f in futs] == [0.2] * 16


def test_a_batch_to_a_worker_stays_within_its_message_limit(plane_proc, procs, tasks_dir):
    """Three 6 MB tasks for a worker that takes 16 MB messages go in more
    than one message and all run; one larger than every worker takes fails
    clearly, and nothing else is hurt."""
    ready = plane_proc("--max-message-size", str(32 << 20))
    procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", cwd=tasks_dir).ready()
    small = procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--max-message-size", "200000",
                  "--name", "small", cwd=tasks_dir)  # fmt: skip
    small.ready()
    with fw.Client(ready["listen"], timeout=10, max_message_size=32 << 20) as c:
        big = "x" * (6 << 20)
        futs = [c.submit("add", big, str(i)) for i in range(3)]
        assert [f.result(timeout=30) for f in futs] == [big + str(i) for i in range(3)]
        with pytest.raises(fw.TaskError, match="at most") as e:
            c.submit("add", "y" * (20 << 20), "").result(timeout=30)
        assert e.value.type == "TaskTooLarge"
        assert c.submit("add", 1, 2).result(timeout=10) == 3
        stats = c.stats()
        assert stats["dispatch"]["workers_lost"] == 0 and stats["tasks"]["failed"] == 1 and len(stats["workers"]) == 2


def test_a_client_with_no_or_the_wrong_secret_is_told_so_at_once():
    with fw.Plane("tcp://127.0.0.1:0", secret="s3cret").start() as plane:
        for secret in (None, "wrong"):
            with fw.Client(plane.address, secret=secret, timeout=10) as c:
                t0 = time.monotonic()
                with pytest.raises(fw.AuthenticationError):
                    c.stats()
                with pytest.raises(fw.AuthenticationError):
                    c.submit("t.add", 1, 2).result(timeout=10)
                assert time.monotonic() - t0 < 2
        assert plane.stats()["errors"]["auth"] >= 4


def test_a_client_whose_plane_restarts_before_its_first_poll_reply_does_not_hang(plane_proc):
    ready = plane_proc()
    with fw.Client(ready["listen"], timeout=3) as c:
        fut = c.submit("sleepy", 60)
        wait_until(lambda: c.status(fut.task_id)["state"] == "running", 10, "the task to run")
        ready["proc"].kill()
        t0 = time.monotonic()
        again = plane_proc("--listen", ready["listen"])  # the same port, a new plane without the task
        assert again["listen"] == ready["listen"]
        with pytest.raises(fw.PlaneUnavailable):
            fut.result(timeout=15)
        assert time.monotonic() - t0 < 3 + 3
        assert c.submit("add", 1, 2).result(timeout=10) == 3


def test_status_and_cancel_of_100000_ids_are_answered_a_piece_at_a_time():
    with fw.Plane("tcp://127.0.0.1:0", concurrency=1).start() as plane:
        with fw.Client(plane.address, timeout=10) as c:
            blocker = c.submit("t.block", "100k")
            futs = [c.submit_with("t.add", (i, 1), priority="low") for i in range(2000)]
            ids = [f.task_id for f in futs] + [f"no-such-{i}" for i in range(fw.MAX_IDS - len(futs))]
            wait_until(lambda: c.status(blocker.task_id)["state"] == "running", 10, "the blocker")
            acquired = []
            real_lock = plane._lock

            class CountingLock:  # counts how often the long requests take the plane's lock
                def __enter__(self):
                    acquired.append(1)
                    return real_lock.__enter__()

                def __exit__(self, *exc):
                    return real_lock.__exit__(*exc)

            plane._lock = CountingLock()
            try:
                reply = raw_request(plane.address, fw.encode("status", ids=ids), timeout=30)
                states = collections.Counter(s["state"] for s in reply["statuses"])
                assert states == {"queued": 2000, "unknown": fw.MAX_IDS - 2000}
                reply = raw_request(plane.address, fw.encode("cancel", ids=ids), timeout=30)
                assert sorted(reply["ids"]) == sorted(f.task_id for f in futs)
            finally:
                plane._lock = real_lock
            assert len(acquired) >= 2 * fw.MAX_IDS // fw.QUERY_CHUNK
            wait_until(lambda: all(f.cancelled() for f in futs), 10, "the cancels to reach the futures")
            gate("100k").set()
            assert blocker.result(timeout=10) == "100k"
            stats = c.stats()["tasks"]
            assert stats["cancelled"] == 2000 and stats["queued"] == 0
    GATES.clear()


# -- dashboard ---------------------------------------------------------------------------------


def http_get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_dashboard_serves_page_api_and_metrics(plane_proc):
    ready = plane_proc()
    base = ready["dashboard"]
    with fw.Client(ready["listen"], timeout=5) as c:
        fut = c.submit("add", "<script>alert(1)</script>", "")
        assert fut.result(timeout=5) == "<script>alert(1)</script>"
        with pytest.raises(fw.TaskError):
            c.submit("fail", "<img src=x onerror=alert(1)>").result(timeout=5)
    status, headers, body = http_get(base)
    assert status == 200 and b"<title>fastworker</title>" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "innerHTML" not in fw._JS and "textContent" in fw._JS  # values never become markup
    status, headers, body = http_get(base + "api/stats")
    stats = json.loads(body)
    assert headers["Content-Type"] == "application/json" and stats["tasks"]["submitted"] == 2
    tasks = json.loads(http_get(base + "api/tasks?limit=5")[2])
    assert [t["state"] for t in tasks] == ["failed", "succeeded"]
    assert "onerror" in tasks[0]["error"]  # raw in JSON, rendered as text by the page
    assert json.loads(http_get(base + f"api/tasks/{fut.task_id}")[2])["state"] == "succeeded"
    assert http_get(base + "api/tasks/nope")[0] == 404
    assert http_get(base + "api/tasks?limit=abc")[0] == 400
    assert json.loads(http_get(base + "api/workers")[2]) == []
    status, _, body = http_get(base + "metrics")
    assert status == 200 and b"fastworker_tasks_submitted_total 2" in body
    assert b'fastworker_tasks_finished_total{state="failed"} 1' in body
    assert json.loads(http_get(base + "healthz")[2]) == {"status": "ok"}


def test_dashboard_asks_for_a_token_derived_from_the_secret_never_the_secret(plane_proc):
    ready = plane_proc("--secret", "s3cret")
    base = ready["dashboard"]
    token = fw.derived_dashboard_token("s3cret")
    assert "s3cret" not in token and token == fw.derived_dashboard_token(b"s3cret")
    assert http_get(base + "api/stats")[0] == 401
    for wrong in ("wrong", "s3cret"):  # the signing key itself opens nothing
        assert http_get(base + "api/stats", {"Authorization": f"Bearer {wrong}"})[0] == 401
    assert http_get(base + "api/stats", {"Authorization": f"Bearer {token}"})[0] == 200
    basic = base64.b64encode(f"user:{token}".encode()).decode()
    assert http_get(base + "api/stats", {"Authorization": f"Basic {basic}"})[0] == 200
    assert http_get(base + "healthz")[0] == 200


def test_dashboard_token_flag_and_host_check(plane_proc):
    ready = plane_proc("--dashboard-token", "t0ken")
    base = ready["dashboard"]
    port = base.rstrip("/").rpartition(":")[2]
    bearer = {"Authorization": "Bearer t0ken"}
    assert http_get(base + "api/stats")[0] == 401
    assert http_get(base + "api/stats", bearer)[0] == 200
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1"):
        assert http_get(base + "api/stats", {**bearer, "Host": host})[0] == 200
    # a page of another site whose name now points here (DNS rebinding) reads nothing
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        assert http_get(base + "api/stats", {**bearer, "Host": host})[0] == 403


def test_dashboard_caps_connections_and_times_idle_ones_out(monkeypatch):
    monkeypatch.setattr(fw, "DASHBOARD_TIMEOUT", 0.5)
    monkeypatch.setattr(fw, "DASHBOARD_CONNECTIONS", 4)
    with fw.Plane("tcp://127.0.0.1:0", dashboard="127.0.0.1:0").start() as plane:
        host, port = plane.dashboard_url.split("/")[2].split(":")
        idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
        try:
            extra = socket.create_connection((host, int(port)), timeout=5)
            with extra:  # past the cap: closed at once, so the plane keeps its files for clients and workers
                assert extra.recv(1) == b""
            t0 = time.monotonic()
            for s in idle:  # an idle connection is closed after the timeout
                assert s.recv(1) == b""
            assert time.monotonic() - t0 < 3
            with socket.create_connection((host, int(port)), timeout=5) as trickle:
                t0 = time.monotonic()

                def cut_off():  # a request trickled in a byte at a time is cut off too
                    try:
                        trickle.send(b"G")
                        trickle.settimeout(0.1)
                        return trickle.recv(1) == b""
                    except TimeoutError:
                        return False
                    except OSError:
                        return True

                wait_until(cut_off, 5, "the trickled request to be cut off")
                assert time.monotonic() - t0 < 3
            assert http_get(plane.dashboard_url + "healthz")[0] == 200
            with fw.Client(plane.address, timeout=5) as c:
                assert c.submit("fastworker.echo", 7).result(timeout=5) == 7
        finally:
            for s in idle:
                s.close()


# -- flow control (processes) ----------------------------------------------------------------------


def test_a_key_coalesces_eight_threads_into_one_run(plane_proc, tmp_path):
    ready = plane_proc()
    gate = tmp_path / "gate"
    with fw.Client(ready["listen"], timeout=5) as c:
        first = c.submit_with("wait_file", (str(gate),), key="invoice-42")
        wait_until(lambda: c.status(first.task_id)["state"] == "running", 5, "the first to run")
        futs, start = [], threading.Barrier(8)

        def submit():
            start.wait(5)
            futs.append(c.submit_with("wait_file", (str(gate),), key="invoice-42"))

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert c.stats()["flow"]["joined"] == 8  # (stats waits for our submissions to arrive)
        assert futs[0].cancel()  # a joined future stops waiting; the task and the others go on
        gate.touch()
        futs = futs[1:]
        assert {f.result(timeout=5) for f in futs} == {first.result(timeout=5)}  # one run's outcome for all
        assert first.task_id not in {f.task_id for f in futs} and c.stats()["tasks"]["submitted"] == 1
        assert {c.status(f.task_id)["joined"] for f in futs} == {first.task_id}  # each id answers for the one task
        again = c.submit_with("wait_file", (str(gate),), key="invoice-42")  # finished: the key is free
        assert again.result(timeout=5) and again.task_id != first.task_id


def test_a_concurrency_limit_holds_over_two_workers(plane_proc, procs, tasks_dir, tmp_path):
    ready = plane_proc()
    for name in ("w1", "w2"):
        procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--name", name, "--concurrency", "4",
              cwd=tasks_dir).ready()  # fmt: skip
    log = tmp_path / "log"
    with fw.Client(ready["listen"], timeout=5) as c:
        futs = [c.submit("limited", str(log), 0.05) for _ in range(12)]
        others = [c.submit("sleepy", 0.3) for _ in range(4)]  # the limit holds no slot: these run beside
        t0 = time.monotonic()
        assert [f.result(timeout=5) for f in others] == [0.3] * 4 and time.monotonic() - t0 < 2
        for f in futs:
            f.result(timeout=20)
    events = sorted((float(t), kind) for kind, t in (line.split() for line in log.read_text().splitlines()))
    running = most = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    assert most == 2 and len(events) == 24


def test_a_rate_limit_spaces_the_starts(plane_proc, procs, tasks_dir, tmp_path):
    ready = plane_proc()
    procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--concurrency", "8", cwd=tasks_dir).ready()
    log = tmp_path / "log"
    with fw.Client(ready["listen"], timeout=5) as c:
        for f in [c.submit("paced", str(log)) for _ in range(30)]:
            f.result(timeout=10)
    starts = sorted(float(line.split()[1]) for line in log.read_text().splitlines())
    in_a_second = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert in_a_second <= 21 and starts[-1] - starts[0] >= 29 * 0.05 * 0.9  # 20/s, whatever the 8 slots could do


def test_max_queued_refuses_with_queue_full_and_keeps_the_accounting(plane_proc, tmp_path):
    ready = plane_proc("--max-queued", "3", "--concurrency", "1")
    gate = tmp_path / "gate"
    with fw.Client(ready["listen"], timeout=5) as c:
        futs = [c.submit("wait_file", str(gate)) for _ in range(6)]
        wait_until(lambda: all(f.done() for f in futs[4:]), 5, "the refusals")
        for f in futs[4:]:
            with pytest.raises(fw.QueueFull, match="--max-queued"):
                f.result(timeout=1)
        r = run_cli("submit", "add", "1", "2", "--plane", ready["listen"])
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "max-queued" in r.stderr, r.stderr
        s = c.stats()
        t = s["tasks"]
        assert s["flow"]["refused"] == 3 and t["submitted"] == 4 == t["queued"] + t["running"]
        gate.touch()
        assert all(f.result(timeout=10) for f in futs[:4])  # nothing accepted was dropped


def test_bad_flow_options_raise_before_anything_is_sent():
    with fw.Client(f"tcp://127.0.0.1:{free_port()}", timeout=5) as c:
        for options, what in [
            ({"rate": "fast"}, "rate"),
            ({"concurrency": 0}, "concurrency"),
            ({"key": 5}, "key"),
            ({"debounce": 1.0}, "debounce"),
            ({"tenant": ""}, "tenant"),
            ({"tenant_concurrency": True}, "tenant_concurrency"),
            ({"key": "k", "debounce": 2.0, "debounce_max": 1.0}, "debounce_max"),
        ]:
            with pytest.raises(ValueError, match=what):
                c.submit_with("fastworker.noop", **options)
    for options in ({"rate": "10/d"}, {"concurrency": 0}, {"debounce": 1.0}, {"key": "not callable"}):
        with pytest.raises(ValueError):
            fw.task(name="never_registered", **options)(lambda: None)
    assert "never_registered" not in fw._registry


# -- many machines ---------------------------------------------------------------------------------


def free_ports(n):
    """A loopback port P with P .. P+n-1 all free (bound, then released)."""
    for _ in range(50):
        first = free_port()
        socks = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} free ports in a row")


def test_the_planes_ports_are_its_listen_port_plus_one_and_two_or_as_told(procs, tasks_dir):
    port = free_ports(3)
    p = procs("plane", "--listen", f"tcp://127.0.0.1:{port}", "--dashboard", "off", "--tasks", "fwtasks", cwd=tasks_dir)
    ready = p.ready()
    assert (ready["events"], ready["heartbeats"]) == (f"tcp://127.0.0.1:{port + 1}", f"tcp://127.0.0.1:{port + 2}")
    welcome = raw_request(ready["listen"], fw.encode("hello"))
    assert (welcome["events"], welcome["heartbeats"]) == (ready["events"], ready["heartbeats"])
    w = procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--name", "ported", cwd=tasks_dir)
    w.ready()
    with fw.Client(ready["listen"], timeout=5) as c:
        stream = c.events(timeout=5)
        assert c.submit("add", 1, 2).result(timeout=5) == 3
        assert next(stream)["state"] == "succeeded"
        stream.close()
        wait_until(lambda: c.stats()["workers"][0]["last_heartbeat"] > c.stats()["workers"][0]["registered_at"], 5,
                   "a heartbeat on port + 2")  # fmt: skip
    r = run_cli("plane", "--listen", f"tcp://127.0.0.1:{free_port()}", "--events-listen", ready["events"],
                "--dashboard", "off")  # fmt: skip
    assert r.returncode == 1 and f"address {ready['events']} is in use" in r.stderr and "--events-listen" in r.stderr
    with fw.Plane("tcp://127.0.0.1:0", events_listen="tcp://127.0.0.1:0").start() as plane:  # port 0: any ports
        ports = {a.rpartition(":")[2] for a in (plane.address, plane.events_address, plane.heartbeat_address)}
        assert len(ports) == 3 and "0" not in ports


# -- test hosts: network namespaces on a bridge -----------------------------------------------------


class TestHosts:
    """``n`` Linux network namespaces ("hosts" 1..n at 10.251.0.1..n/24), each
    with its loopback up and one veth to a bridge that lives in a namespace
    of its own: nothing changes in the root namespace.  A role runs on a
    host with ``ip netns exec``; a host's link to the bridge can be cut and
    healed.  ``close()`` kills what ran on the hosts (by PID) and deletes
    the namespaces (by name), whatever happened before."""

    __test__ = False  # (not a test class)
    _made = itertools.count(1)

    def __init__(self, n):
        self.prefix = f"fwt{os.getpid()}n{next(self._made)}"
        self.bridge = f"{self.prefix}-br"
        self.names = [f"{self.prefix}-h{i}" for i in range(1, n + 1)]
        self.procs = []
        self.made = []
        try:
            self.ip("netns", "add", self.bridge)
            self.made.append(self.bridge)
            self.ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            self.ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, name in enumerate(self.names, 1):
                self.ip("netns", "add", name)
                self.made.append(name)
                self.ip("-n", name, "link", "set", "lo", "up")
                self.ip(
                    "-n", self.bridge, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", name
                )
                self.ip("-n", self.bridge, "link", "set", f"v{i}", "master", "br0", "up")
                self.ip("-n", name, "addr", "add", f"10.251.0.{i}/24", "dev", "eth0")
                self.ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ip(*argv):
        r = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, f"ip {' '.join(argv)}: {r.stderr}"

    @staticmethod
    def addr(i):
        return f"10.251.0.{i}"

    def run(self, i, *argv, script=FASTWORKER, **kw):
        """``python fastworker.py ARGV`` (or another script) on host ``i``."""
        p = Proc(*argv, prefix=["ip", "netns", "exec", self.names[i - 1]], script=script, **kw)
        self.procs.append(p)
        return p

    def cut(self, i):
        self.ip("-n", self.bridge, "link", "set", f"v{i}", "down")

    def heal(self, i):
        self.ip("-n", self.bridge, "link", "set", f"v{i}", "up")

    def close(self):
        for p in self.procs:
            p.kill()
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.made = []


def _test_hosts_missing():
    if not sys.platform.startswith("linux"):
        return "test hosts are Linux network namespaces"
    if os.geteuid() != 0:
        return "test hosts need root (ip netns)"
    if shutil.which("ip") is None:
        return "test hosts need the ip command (apt-get install iproute2)"
    return None


@pytest.fixture
def test_hosts():
    """``test_hosts(n)``: n hosts (see TestHosts), torn down at the end.
    Skipped without root or ip, except under CI, which must run them."""
    missing = _test_hosts_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the multi-host tests: {missing}")
        pytest.skip(missing)
    made = []

    def make(n):
        made.append(TestHosts(n))
        return made[-1]

    yield make
    for net in made:
        net.close()


HOSTS_CLIENT = """
import json, os, subprocess, sys, time, urllib.request
sys.path.insert(0, os.environ["FW_HERE"])
import fastworker as fw

def say(**fields):
    print(json.dumps(fields), flush=True)

def link(i, state):
    subprocess.run(["ip", "-n", os.environ["FW_BRIDGE"], "link", "set", f"v{i}", state], check=True)

def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)
    return value

plane, secret = sys.argv[1], os.environ.get("FW_SECRET")
exec(sys.stdin.read())
"""


def run_on_host(net, i, body, *args, env=None, tmp_path, timeout=120):
    """Run ``body`` (Python, with say(), link(), wait_until() and fw) on host
    ``i``; return what it said, as a list of dicts."""
    script = tmp_path / "hosts_client.py"
    script.write_text(HOSTS_CLIENT)
    p = subprocess.run(
        ["ip", "netns", "exec", net.names[i - 1], sys.executable, str(script), *args],
        input=body, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, FW_HERE=HERE, FW_BRIDGE=net.bridge, **(env or {})),
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def test_across_hosts_work_flows_least_loaded_and_every_worker_shows_its_host(test_hosts, tasks_dir, tmp_path):
    net = test_hosts(5)
    plane = net.run(1, "plane", "--listen", "tcp://10.251.0.1:0", "--dashboard", "10.251.0.1:0", "--secret", "s3",
                    "--tasks", "fwtasks", cwd=tasks_dir)  # fmt: skip
    ready = plane.ready()
    for i in (2, 3, 4):
        net.run(i, "worker", "--plane", ready["listen"], "--secret", "s3", "--tasks", "fwtasks", "--name", f"w{i}",
                "--concurrency", "2", cwd=tasks_dir).ready()  # fmt: skip
    [out] = run_on_host(net, 5, f"""
with fw.Client(plane, secret=secret, timeout=5) as c:
    t0 = time.monotonic()
    futs = [c.submit("sleepy", 0.01) for _ in range(300)]
    assert all(f.result(timeout=60) == 0.01 for f in futs)
    elapsed = time.monotonic() - t0
    try:
        c.submit("fail", "across").result(timeout=10)
        error = None
    except fw.TaskError as e:
        error = str(e)
    stats = c.stats()
req = urllib.request.Request({ready["dashboard"]!r} + "api/workers",
                             headers={{"Authorization": "Bearer " + fw.derived_dashboard_token(secret)}})
shown = json.loads(urllib.request.urlopen(req, timeout=5).read())
say(per_s=300 / elapsed, error=error, workers=stats["workers"], shown=shown)
""", ready["listen"], env={"FW_SECRET": "s3"}, tmp_path=tmp_path)  # fmt: skip
    assert out["error"] == "ValueError: across"
    done = {w["name"]: w["completed"] for w in out["workers"]}
    assert sorted(done) == ["w2", "w3", "w4"] and sum(done.values()) == 301
    assert max(done.values()) <= 1.5 * (sum(done.values()) / 3)  # least-loaded across hosts
    assert sorted((w["name"], w["address"]) for w in out["shown"]) == [(f"w{i}", f"10.251.0.{i}") for i in (2, 3, 4)]
    print(f"across 3 worker hosts: {out['per_s']:.0f} tasks/s of 10 ms")


def test_partitions_a_cut_worker_expires_and_comes_back_a_cut_client_fails_a_cut_plane_resumes(
    test_hosts, tasks_dir, tmp_path
):
    net = test_hosts(3)
    plane = net.run(
        1,
        "plane",
        "--listen",
        "tcp://10.251.0.1:0",
        "--dashboard",
        "off",
        "--secret",
        "s3",
        "--heartbeat-timeout",
        "2",
        cwd=tasks_dir,
    )  # fmt: skip (it runs none of the tasks itself)
    ready = plane.ready()
    net.run(2, "worker", "--plane", ready["listen"], "--secret", "s3", "--tasks", "fwtasks", "--name", "w2",
            "--concurrency", "2", "--timeout", "2", cwd=tasks_dir).ready()  # fmt: skip
    gate = tmp_path / "gate"
    said = run_on_host(net, 3, f"""
gate = {str(gate)!r}
with fw.Client(plane, secret=secret, timeout=2) as c:
    keep = c.submit_with("wait_file", (gate, 60), retries=1)  # runs again elsewhere... (on w2, once it is back)
    lose = c.submit_with("wait_file", (gate, 60), retries=0)  # ...or fails: WorkerLost
    wait_until(lambda: all(c.status(f.task_id)["state"] == "running" for f in (keep, lose)), 10, "both to run")
    link(2, "down")
    t0 = time.monotonic()
    wait_until(lambda: c.status(keep.task_id)["state"] == "queued", 15, "the cut worker's task to be queued again")
    requeued = time.monotonic() - t0
    try:
        lose.result(timeout=5)
    except fw.WorkerLost as e:
        lost = str(e)
    open(gate, "w").close()  # the cut worker finishes both: its late results must be ignored
    link(2, "up")
    t1 = time.monotonic()
    value = keep.result(timeout=30)  # w2 registers again and runs it anew
    back = time.monotonic() - t1
    time.sleep(0.5)
    s = c.stats()
    say(requeued=requeued, lost=lost, value=value, back=back, stats=s["tasks"], late=s["dispatch"]["late_results"],
        attempts=c.status(keep.task_id)["attempts"])
    # the client's own host is cut: its pending futures fail after its timeout
    stuck = c.submit("sleepy", 30)
    wait_until(lambda: c.status(stuck.task_id)["state"] == "running", 10, "the long task to run")
    link(3, "down")
    t2 = time.monotonic()
    try:
        stuck.result(timeout=30)
        client_error = None
    except fw.PlaneUnavailable as e:
        client_error = str(e)
    say(client_error=client_error, client_after=time.monotonic() - t2)
    link(3, "up")
def add(c, x, y):  # (on a loaded machine the 2 s heartbeat timeout may drop the worker: it comes back)
    for _ in range(100):
        try:
            return c.submit("add", x, y).result(timeout=20)
        except fw.UnknownTask:
            time.sleep(0.1)
with fw.Client(plane, secret=secret, timeout=5) as c:  # the plane's host is cut for 3 s, then healed
    assert add(c, 1, 2) == 3
    link(1, "down")
    time.sleep(3)
    link(1, "up")
    t3 = time.monotonic()
    assert add(c, 2, 3) == 5
    said_workers = [w["name"] for w in c.stats()["workers"]]
    say(plane_back=time.monotonic() - t3, workers=said_workers)
""", ready["listen"], env={"FW_SECRET": "s3"}, tmp_path=tmp_path)  # fmt: skip
    first, client, last = said
    assert first["requeued"] < 2 + 1.5 and first["lost"].startswith("WorkerLost: worker w2 was lost")
    assert first["value"] and first["attempts"] == 2 and first["late"] >= 1  # the cut run's result was ignored
    t = first["stats"]
    assert t["succeeded"] == 1 and t["failed"] == 1 and t["submitted"] == 2  # nothing completed twice
    assert client["client_error"] and "lost the plane" in client["client_error"] and client["client_after"] < 2 + 5 + 2
    assert last["workers"] == ["w2"]
    print(f"cut worker: queued again after {first['requeued']:.2f} s, back at work {first['back']:.2f} s after the "
          f"heal; cut client: futures failed after {client['client_after']:.1f} s; plane cut 3 s: the next task "
          f"done {last['plane_back']:.2f} s after the heal")  # fmt: skip


WORKERS_ON_A_HOST = """
import json, os, sys, time
sys.path.insert(0, os.environ["FW_HERE"])
import fastworker as fw
host, plane, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
workers = [fw.Worker(plane, name=f"{host}-w{k}", concurrency=1, secret="s3").start() for k in range(n)]
for w in workers:
    w.registered.wait(30)
print(json.dumps({"event": "ready", "workers": n}), flush=True)
while True:  # until the test ends: it kills this process
    time.sleep(60)
"""


def test_thirty_two_workers_over_four_hosts_are_registered_and_balanced(test_hosts, tasks_dir, tmp_path):
    net = test_hosts(6)
    plane = net.run(1, "plane", "--listen", "tcp://10.251.0.1:0", "--dashboard", "off", "--secret", "s3",
                    cwd=tasks_dir)  # fmt: skip
    ready = plane.ready()
    script = tmp_path / "workers_on_a_host.py"
    script.write_text(WORKERS_ON_A_HOST)
    hosts = [net.run(i, f"h{i}", ready["listen"], "8", script=str(script), env={"FW_HERE": HERE}) for i in (2, 3, 4, 5)]
    for h in hosts:
        assert h.ready(60)["workers"] == 8
    [out] = run_on_host(net, 6, """
with fw.Client(plane, secret=secret, timeout=5) as c:
    try:
        wait_until(lambda: len(c.stats()["workers"]) == 32, 20, "32 workers")
    except AssertionError:
        say(debug=[(w["name"], w["state"]) for w in c.stats()["workers"]])
        raise
    t0 = time.monotonic()
    futs = [c.submit("fastworker.sleep", 0.01) for _ in range(1600)]
    for f in futs:
        f.result(timeout=60)
    elapsed = time.monotonic() - t0
    say(per_s=1600 / elapsed, workers=c.stats()["workers"])
""", ready["listen"], env={"FW_SECRET": "s3"}, tmp_path=tmp_path)  # fmt: skip
    done = [w["completed"] for w in out["workers"]]
    names = sorted(w["name"] for w in out["workers"])
    assert names == sorted(f"h{i}-w{k}" for i in (2, 3, 4, 5) for k in range(8))
    assert {w["address"] for w in out["workers"]} == {f"10.251.0.{i}" for i in (2, 3, 4, 5)}
    assert sum(done) == 1600 and max(done) <= 1.5 * (1600 / 32), done
    print(f"32 workers over 4 hosts: {out['per_s']:.0f} tasks/s of 10 ms; busiest {max(done)}, mean 50")


# -- the operator's day ---------------------------------------------------------------------------


def test_logs_name_each_roles_tasks_and_every_run_but_never_arguments_unless_asked(tasks_dir, procs):
    plane = procs(
        "plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--tasks", "fwtasks",
        "--log-level", "debug", "--log-format", "json", cwd=tasks_dir,
    )  # fmt: skip
    ready = plane.ready()
    quiet = procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--name", "w-quiet", "--log-level",
                  "debug", "--concurrency", "1", cwd=tasks_dir)  # fmt: skip
    quiet.ready()
    with fw.Client(ready["listen"], timeout=5) as c:
        ok = c.submit("add", "hush-1", "hush-2")
        assert ok.result(timeout=5) == "hush-1hush-2"
        bad = c.submit("fail")
        with pytest.raises(fw.TaskError):
            bad.result(timeout=5)
        assert quiet.stop() == 0  # a clean stop: the plane counts it as left, not lost
        d = wait_until(lambda: (s := c.stats()["dispatch"])["workers_left"] and s, 5, "the worker to leave")
        assert (d["workers_left"], d["workers_lost"]) == (1, 0)
        talker = procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--name", "w-talker",
                       "--log-level", "debug", "--log-args", cwd=tasks_dir)  # fmt: skip
        talker.ready()
        assert c.submit("add", "told-1", "told-2").result(timeout=5) == "told-1told-2"
    assert talker.stop() == 0 and plane.stop() == 0
    records = [json.loads(line) for line in "".join(plane.stderr).splitlines()]  # every line is one JSON object
    text = "\n".join(f"{r['level']} {r['message']}" for r in records)
    assert f"INFO plane {ready['listen']}" not in text  # (the id comes first)
    assert any(r["level"] == "INFO" and ready["listen"] in r["message"] and "add" in r["message"] for r in records)
    assert f"DEBUG task {ok.task_id} add started on w-quiet" in text
    assert f"DEBUG task {ok.task_id} add succeeded on w-quiet in " in text
    assert f"WARNING task {bad.task_id} fail failed on w-quiet" in text and "ValueError: boom" in text
    assert "INFO worker w-quiet" in text and "left" in text and "lost" not in text
    quiet_log = "".join(quiet.stderr)
    assert "connecting to " + ready["listen"] in quiet_log and "tasks: add, async_wait_file" in quiet_log
    assert f"task {ok.task_id} add succeeded on w-quiet" in quiet_log and "WARNING" in quiet_log
    assert "hush" not in text + quiet_log  # argument values stay out of the log...
    assert "told-1" in "".join(talker.stderr) and "told-1" not in text  # ...unless the worker is told


def test_errors_a_newcomer_causes_say_what_to_do(plane_proc, tmp_path):
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    r = run_cli("submit", "add", "1", "2", "--plane", nowhere, "--timeout", "0.5")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"is `python fastworker.py plane` running at {nowhere}?" in r.stderr
    r = run_cli("submit", "add", "1", "2", "--plane", "127.0.0.1:5555")
    assert r.returncode == 1 and "has no scheme" in r.stderr and "tcp://127.0.0.1:5555" in r.stderr
    ready = plane_proc()
    r = run_cli("plane", "--listen", ready["listen"], "--dashboard", "off")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"address {ready['listen']} is in use" in r.stderr and "--listen" in r.stderr
    with fw.Client(ready["listen"], timeout=5) as c:
        with pytest.raises(TypeError, match=r"argument 2 of task 'add' cannot be sent: .*set.*convert it first"):
            c.submit("add", 1, {1, 2})
        with pytest.raises(TypeError, match=r"argument 'y' of task 'add' cannot be sent: .*object"):
            c.submit("add", 1, y=object())

        @fw.task(name="known_here")
        def known_here(x, y):
            return x + y

        try:  # this process knows the function: checked before anything is sent
            with pytest.raises(TypeError, match=r"task 'known_here' cannot take these arguments: .*\(x, y\)"):
                c.submit("known_here", 1, 2, 3)
            with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
                c.submit(known_here, 1, 2, z=3)
        finally:
            del fw._registry["known_here"]
        with pytest.raises(fw.TaskError) as e:  # only the plane knows "add": its failure points at the task
            c.submit("add", 1, 2, 3).result(timeout=5)
        assert e.value.type == "TypeError" and "takes 2 positional arguments but 3 were given" in str(e.value)
        lines = e.value.traceback.strip().splitlines()
        assert "fwtasks.py" in lines[-3] and "in add" in lines[-3] and lines[-2].strip() == "def add(x, y):"
        assert "fastworker.py" not in e.value.traceback


def test_events_subscribe_when_called_and_on_complete_pushes_them(plane_proc):
    ready = plane_proc()
    with fw.Client(ready["listen"], timeout=5) as c:
        stream = c.events(timeout=5)
        fut = c.submit("add", 1, 1)
        assert fut.result(timeout=5) == 2
        event = next(stream)  # published before the first next(): not missed
        assert (event["id"], event["state"]) == (fut.task_id, "succeeded")
        stream.close()
        assert list(stream) == []
        got = queue.Queue()
        stop = c.on_complete(got.put)
        futs = [c.submit("add", i, 1) for i in range(5)]
        assert [f.result(timeout=5) for f in futs] == [1, 2, 3, 4, 5]
        seen = {got.get(timeout=5)["id"] for _ in futs}
        assert seen == {f.task_id for f in futs}
        stop()
        t0 = time.monotonic()
        assert list(c.events(timeout=0.3)) == []  # nothing happens: it ends after its timeout
        assert time.monotonic() - t0 < 3


def test_cli_result_cancel_purge_status_workers_and_tasks(plane_proc, procs, tasks_dir, tmp_path):
    ready = plane_proc()
    plane = ready["listen"]
    worker = procs("worker", "--plane", plane, "--tasks", "fwtasks", "--name", "cli-w", "--concurrency", "1",
                   cwd=tasks_dir)  # fmt: skip
    worker.ready()
    gate = tmp_path / "gate"
    c = fw.Client(plane, timeout=5)
    try:
        blocker = c.submit("wait_file", str(gate))
        wait_until(lambda: c.status(blocker.task_id)["state"] == "running", 5, "the blocker to run")
        lows = [c.submit_with("add", (i, 1), priority="low") for i in range(3)]
        high = c.submit_with("add", (9, 9), priority="high")
        later = c.submit_with("add", (1, 1), delay=600)
        assert c.status(later.task_id)["state"] == "scheduled"
        r = run_cli("result", blocker.task_id, "--plane", plane)
        assert r.returncode == 1 and "is still running" in r.stderr and "--wait" in r.stderr
        r = run_cli("cancel", later.task_id, "nope", "--plane", plane)
        assert r.returncode == 1 and r.stdout.splitlines() == [
            f"{later.task_id}: cancelled",
            "nope: not cancelled (it is unknown)",
        ]
        r = run_cli("purge", "--priority", "low", "--plane", plane)
        assert (r.returncode, r.stdout) == (0, "cancelled 3 queued task(s) of priority low\n"), r.stderr
        r = run_cli("status", "--plane", plane)
        assert r.returncode == 0 and len(r.stdout.splitlines()) <= 8, r.stdout
        assert "queued 1 (critical 0, high 1, normal 0, low 0), scheduled 0, running 1" in r.stdout
        assert "4 cancelled" in r.stdout and "workers: 1 (1 of 1 slots busy)" in r.stdout
        r = run_cli("status", "--json", "--plane", plane)
        assert json.loads(r.stdout)["tasks"]["cancelled"] == 4
        r = run_cli("workers", "--plane", plane)
        [head, row] = r.stdout.splitlines()
        assert head.split()[:4] == ["name", "host", "address", "pid"] and row.split()[0] == "cli-w"
        gate.touch()
        r = run_cli("result", blocker.task_id, "--wait", "10", "--plane", plane)
        assert r.returncode == 0 and json.loads(r.stdout) == worker.p.pid
        assert high.result(timeout=5) == 18
        r = run_cli("result", lows[0].task_id, "--plane", plane)
        assert r.returncode == 1 and "was cancelled" in r.stderr
        r = run_cli("tasks", "--state", "cancelled", "--plane", plane)
        ids = [line.split()[0] for line in r.stdout.splitlines()[1:]]
        assert sorted(ids) == sorted([later.task_id] + [f.task_id for f in lows])
        r = run_cli("tasks", "--json", "--limit", "2", "--plane", plane)
        assert [t["id"] for t in json.loads(r.stdout)] == [high.task_id, blocker.task_id]  # the last to finish
        r = run_cli("status", blocker.task_id, "--plane", plane)
        assert r.stdout.startswith(f"task {blocker.task_id}: succeeded (wait_file, priority normal, 1 attempt(s)")
    finally:
        c.shutdown(wait=False, cancel_futures=True)


def chromium():
    """The path of a Chromium, or skip (fail under CI, which installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must run the browser test: apt-get install -y chromium")
    pytest.skip("no Chromium here (CI installs it: apt-get install -y chromium)")


def browse(url, tmp_path, *, screenshot=None, size="1280,1800"):
    """Load ``url`` in headless Chromium and let its scripts run; return the DOM as HTML."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={size}",
            "--virtual-time-budget=4000"]  # fmt: skip
    if screenshot:
        r = subprocess.run([*argv, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
        assert r.returncode == 0 and os.path.getsize(screenshot) > 10_000, r.stderr[-2000:]
    r = subprocess.run([*argv, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_dashboard_in_a_real_browser_shows_live_data_and_injected_markup_as_text(
    plane_proc, procs, tasks_dir, tmp_path
):
    ready = plane_proc("--log-args")
    worker = procs("worker", "--plane", ready["listen"], "--tasks", "fwtasks", "--name", "browser-w", cwd=tasks_dir)
    worker.ready()
    attack = "<img src=x onerror=alert(1)>"
    marker = "<img src=y onerror=\"document.title='pwned'\">"
    with fw.Client(ready["listen"], timeout=5) as c:
        assert [c.submit("add", i, 1).result(timeout=5) for i in range(3)] == [1, 2, 3]
        failed = c.submit("fail", attack)
        with pytest.raises(fw.TaskError):
            failed.result(timeout=5)
        with pytest.raises(fw.TaskError):
            c.submit("fail", marker).result(timeout=5)
        gate = tmp_path / "gate"
        holds = [c.submit_with("wait_file", (str(gate),), priority="low") for _ in range(10)]  # 8 run, 2 wait
        wait_until(lambda: c.stats()["queues"]["low"] == 2, 5, "two tasks queued")
        dom = browse(ready["dashboard"], tmp_path, screenshot=tmp_path / "overview.png")
        page = browse(ready["dashboard"] + "#/task/" + failed.task_id, tmp_path, screenshot=tmp_path / "task.png")
        [w] = c.stats()["workers"]
        drill = browse(ready["dashboard"] + "#/worker/" + w["id"], tmp_path)
        gate.touch()
        assert all(f.result(timeout=10) for f in holds)
    assert "<title>fastworker</title>" in dom and "pwned" not in dom.split("<body")[0]  # no script ran
    assert "<img" not in dom and "<img" not in page  # markup shows as text...
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "browser-w" in dom and 'id="banner" hidden' in dom  # live data, the plane reachable
    assert "<td>low</td><td>2</td>" in dom  # queue depths
    assert failed.task_id in dom and "<td>add</td>" in dom and "<rect" in dom  # recent tasks, names, the chart
    assert "raise ValueError(message)" in page and "fwtasks.py" in page  # the failed task's traceback
    assert "ValueError: &lt;img src=x onerror=alert(1)&gt;" in page and '"args": [' in page
    running = {f.task_id for f in holds if f.task_id in drill}  # the worker's page: what it runs now
    assert "<h2>Worker <span" in drill and len(running) == 8 and drill.count("<td>wait_file</td>") == 8


def test_dashboard_in_a_real_browser_says_when_the_plane_is_unreachable(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Gone(BaseHTTPRequestHandler):  # the page as the plane served it; the plane has gone since
        def do_GET(self):
            assets = {"/": (fw._PAGE, "text/html"), "/app.js": (fw._JS, "text/javascript"),
                      "/app.css": (fw._CSS, "text/css")}  # fmt: skip
            body, kind = assets.get(self.path, ("", ""))
            if not kind:
                self.connection.close()
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gone)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        dom = browse(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path, screenshot=tmp_path / "gone.png")
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)
    assert 'class="stale"' in dom and 'id="banner">Plane unreachable' in dom


# -- command line -------------------------------------------------------------------------------


def run_cli(*argv, cwd=None, timeout=30):
    return subprocess.run([sys.executable, FASTWORKER, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cli_submit_prints_the_result_as_json(plane_proc):
    ready = plane_proc()
    r = run_cli("submit", "add", "2", "3", "--plane", ready["listen"])
    assert (r.returncode, r.stdout) == (0, "5\n"), r.stderr
    r = run_cli("submit", "add", "x", '"y"', "--plane", ready["listen"])
    assert (r.returncode, r.stdout) == (0, '"xy"\n'), r.stderr
    r = run_cli(
        "submit", "add", "--kwargs", '{"x": [1], "y": [2]}', "--priority", "critical", "--plane", ready["listen"]
    )
    assert (r.returncode, json.loads(r.stdout)) == (0, [1, 2]), r.stderr


def test_cli_submit_no_wait_prints_the_id_and_status_follows_it(plane_proc):
    ready = plane_proc()
    r = run_cli("submit", "add", "1", "1", "--no-wait", "--plane", ready["listen"])
    assert r.returncode == 0, r.stderr
    task_id = r.stdout.strip()
    with fw.Client(ready["listen"], timeout=5) as c:
        assert c.result(task_id, timeout=5) == 2
    r = run_cli("status", task_id, "--json", "--plane", ready["listen"])
    assert r.returncode == 0 and json.loads(r.stdout)["state"] == "succeeded"
    r = run_cli("status", "--json", "--plane", ready["listen"])
    assert r.returncode == 0 and json.loads(r.stdout)["tasks"]["succeeded"] == 1


def test_cli_reports_task_failures_and_unknown_tasks(plane_proc):
    ready = plane_proc()
    r = run_cli("submit", "fail", "broken", "--plane", ready["listen"])
    assert r.returncode == 1 and "ValueError: broken" in r.stderr and r.stdout == ""
    r = run_cli("submit", "nope", "--plane", ready["listen"])
    assert r.returncode == 1 and "nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_errors_are_one_line_and_non_zero():
    for argv in (["plane", "--bogus"], ["submit"], ["submit", "add", "--priority", "urgent"], ["nope"], []):
        r = run_cli(*argv)
        assert r.returncode == 2, argv
        assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr, (argv, r.stderr)
    r = run_cli("submit", "add", "1", "--plane", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "no answer" in r.stderr
    r = run_cli("plane", "--tasks", "no_such_module_here", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off")
    assert r.returncode == 1 and "no_such_module_here" in r.stderr


@pytest.mark.parametrize(
    "body, what",
    [
        ("import os\n\nraise RuntimeError('config missing')\n", "RuntimeError: config missing at "),
        ("def broken(:\n    pass\n", "SyntaxError: "),
    ],
)
def test_a_role_whose_task_module_fails_exits_1_with_one_line_naming_it(tmp_path, body, what):
    (tmp_path / "badtasks.py").write_text(body)
    line = "3" if "raise" in body else "1"
    for role in (["plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off"], ["worker"]):
        r = run_cli(*role, "--tasks", "badtasks", cwd=str(tmp_path))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (role, r.returncode, r.stderr)
        assert "task module 'badtasks'" in lines[0] and what in lines[0] and f"badtasks.py:{line}" in lines[0]


def test_exit_handlers_of_task_modules_run_when_a_role_stops(tmp_path, procs):
    (tmp_path / "exittasks.py").write_text(
        "import atexit\n\n\n@atexit.register\ndef bye():\n    open('exited.marker', 'w').close()\n"
    )
    p = procs("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--tasks", "exittasks", cwd=str(tmp_path))
    p.ready()
    assert p.stop(signal.SIGTERM) == 0
    assert (tmp_path / "exited.marker").exists()


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["plane"],
        ["worker"],
        ["submit"],
        ["status"],
        ["result"],
        ["cancel"],
        ["purge"],
        ["workers"],
        ["tasks"],
        ["events"],
        ["demo"],
        ["bench"],
    ],  # fmt: skip
)
def test_cli_help_everywhere(command):
    r = run_cli(*command, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout and r.stderr == ""


def test_cli_events_prints_completions(plane_proc, procs):
    ready = plane_proc()
    events = procs("events", "--plane", ready["listen"])
    with fw.Client(ready["listen"], timeout=5) as c:

        def an_event():  # PUB/SUB drops what is sent before it connects: keep sending
            c.submit("add", 1, 1).result(timeout=5)
            try:
                return json.loads(events.lines.get(timeout=0.2))
            except queue.Empty:
                return None

        event = wait_until(an_event, 10, "a completion event")
    assert event["name"] == "add" and event["state"] == "succeeded"
    assert events.stop(signal.SIGINT) == 0


def test_demo_serves_tasks_and_the_dashboard(procs):
    p = procs("demo", "--listen", "tcp://127.0.0.1:0", "--dashboard", "127.0.0.1:0")
    ready = p.ready()
    lines = [p.line() for _ in range(10)]
    text = "".join(lines)
    for priority in fw.PRIORITIES:
        assert f"priority {priority}" in text
    assert "TaskError ValueError" in text and f"dashboard: {ready['dashboard']}" in text
    assert http_get(ready["dashboard"] + "api/stats")[0] == 200
    assert p.stop(signal.SIGINT) == 0


def test_a_role_finds_the_task_modules_beside_it_from_any_directory_and_runs_under_dash_m(procs, tmp_path):
    (tmp_path / "fastworker.py").write_text(open(FASTWORKER).read())
    (tmp_path / "beside.py").write_text("import fastworker\n\n@fastworker.task\ndef beside():\n    return 7\n")
    p = procs("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--tasks", "beside", cwd="/",
              script=str(tmp_path / "fastworker.py"))  # fmt: skip
    with fw.Client(p.ready()["listen"], timeout=5) as c:
        assert c.submit("beside").result(timeout=5) == 7
    assert p.stop() == 0
    m = procs("fastworker", "plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", cwd=HERE, script="-m")
    assert m.ready()["role"] == "plane" and m.stop() == 0  # python -m fastworker plane: it runs in place


def test_every_command_starts_serves_and_stops_on_this_python(procs, tasks_dir, tmp_path):
    """CI runs this on every interpreter it finds (3.10 and up): the long
    roles start, serve and stop with status 0, every other command answers,
    and a role that cannot start exits 1 with one line."""
    plane = procs("plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "127.0.0.1:0", "--tasks", "fwtasks",
                  cwd=tasks_dir)  # fmt: skip
    address = plane.ready()["listen"]
    worker = procs("worker", "--plane", address, "--tasks", "fwtasks", "--concurrency", "2", cwd=tasks_dir)
    worker_pid = worker.ready()["pid"]
    at = ["--plane", address]

    def cli(*argv, status=0):
        r = run_cli(*argv, cwd=tasks_dir)
        assert r.returncode == status, (argv, r.stdout, r.stderr)
        return r.stdout

    assert cli("submit", "pid", *at) == f"{worker_pid}\n"  # the worker runs what it knows
    tid = cli("submit", "add", "2", "3", "--no-wait", *at).strip()
    assert cli("result", tid, "--wait", "10", *at) == "5\n"
    assert f"task {tid}: succeeded" in cli("status", tid, *at)
    assert "workers: 1" in cli("status", *at) and str(worker_pid) in cli("workers", *at)
    assert tid in cli("tasks", *at)
    later = cli("submit", "add", "1", "1", "--delay", "600", "--no-wait", *at).strip()
    assert f"{later}: cancelled" in cli("cancel", later, *at)
    assert "cancelled 0 queued task(s)" in cli("purge", *at)
    events = procs("events", *at)
    with fw.Client(address, timeout=5) as c:
        wait_until(lambda: c.submit("add", 1, 1).result(timeout=5) and not events.lines.empty(), 10, "an event")
    assert json.loads(events.line())["state"] == "succeeded" and events.stop(signal.SIGINT) == 0
    bench = cli("bench", "--tasks", "20", "--latency", "5", "--map", "0", "--workers", "0", "--queued", "0",
                "--balance", "0", "--journal", "", "--secure", "", "--flow", "")  # fmt: skip
    assert json.loads(bench.splitlines()[-1])["bench"][0]["tasks"] == 20
    demo = procs("demo", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off")
    demo.ready()
    while "serving" not in demo.line():  # (its example tasks first)
        pass
    assert demo.stop(signal.SIGINT) == 0
    assert worker.stop() == 0 and plane.stop() == 0
    failed = procs("demo", "--listen", "tcp://127.0.0.1:0", "--journal", str(tmp_path / "no" / "such.db"))
    assert failed.p.wait(20) == 1 and "does not exist" in "".join(failed.stderr)


def test_bench_reports_well_formed_figures():
    r = run_cli(
        "bench", "--tasks", "200", "--latency", "20", "--map", "500", "--workers", "0,1",
        "--queued", "1000", "--balance", "2", "--balance-tasks", "200", "--journal", "full",
        "--journal-workers", "0", "--secure", "secret,tls+secret", "--secure-workers", "1", "--flow", "0",
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "plane only: throughput" in r.stderr  # the progress display
    out = json.loads(r.stdout.strip().splitlines()[-1])
    plane_only, one, journaled, signed, *tls, flow = out["bench"]
    assert flow["topology"] == "plane only, 10k tenants + 1k keys" and flow["tasks_per_s"] > 0
    assert (plane_only["topology"], one["topology"]) == ("plane only", "1 worker")
    assert journaled["topology"] == "plane only, journal full" and signed["topology"] == "1 worker, secret"
    assert [row["topology"] for row in tls] == (["1 worker, tls+secret"] if shutil.which("openssl") else [])
    for row in (plane_only, one, journaled, signed, *tls):
        assert row["tasks"] == 200 and row["map_items"] == 500
        assert row["tasks_per_s"] > 0 and row["map_per_s"] > 0 and row["foreign_cores"] >= 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert 0 < row["plane_rss_mb"]["idle"] <= row["plane_rss_mb"]["peak"]
    assert 0 < one["worker_rss_mb"]["idle"] <= one["worker_rss_mb"]["peak"]
    assert out["queued"]["queued"] == 1000 and out["queued"]["plane_rss_mb"] > 0
    b = out["balance"]
    assert (b["workers"], b["tasks"], b["min"] + b["max"] <= 200) == (2, 200, True) and b["busiest_over_mean"] >= 1
