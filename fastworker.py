#!/usr/bin/env python3
"""fastworker: a brokerless distributed task queue in one file.

Three roles speak one JSON protocol over NNG (pynng):

* the **client** lives in your application and submits tasks by name;
  results come back as ``concurrent.futures.Future`` objects;
* the **control plane** (``python fastworker.py plane``) queues tasks by
  priority, dispatches them to the least-loaded subworker, keeps a result
  cache and serves a dashboard.  With no subworker connected it runs the
  tasks itself, so one process is a complete deployment;
* **subworkers** (``python fastworker.py worker``) add capacity, on this
  machine or others.

Quick start::

    # tasks.py
    import fastworker

    @fastworker.task
    def add(x, y):
        return x + y

    $ python fastworker.py plane --tasks tasks          # terminal 1
    $ python fastworker.py submit add 1 2               # terminal 2 -> 3

    with fastworker.Client("tcp://127.0.0.1:5555") as client:
        print(client.submit("add", 1, 2).result(timeout=5))

Runtime dependencies: the standard library and pynng.  MIT licence.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = [
    "task",
    "Client",
    "Future",
    "Plane",
    "Worker",
    "TaskSpec",
    "FastworkerError",
    "TaskError",
    "WorkerLost",
    "TaskTimeout",
    "UnknownTask",
    "ResultExpired",
    "ProtocolError",
    "AuthenticationError",
    "PlaneUnavailable",
    "PRIORITIES",
    "main",
]

###############################################################################
# Imports ######################################################################
###############################################################################

import argparse
import asyncio
import collections
import concurrent.futures
import functools
import gc
import heapq
import importlib
import inspect
import itertools
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# Loaded only where needed, to keep a worker small: http.server, urllib.parse
# and base64 (dashboard), hmac and hashlib (shared secret), ipaddress.

try:
    import pynng
    from pynng import ffi as _ffi
    from pynng import lib as _nng
    from pynng.exceptions import check_err as _check_err
except ImportError:  # pragma: no cover - reported when a role starts, not on import
    pynng = None

logger = logging.getLogger("fastworker")

###############################################################################
# Constants and defaults #######################################################
###############################################################################

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_DASHBOARD = "127.0.0.1:8080"

#: Priority names, highest first.  A task's rank is its index here: the
#: dispatch heap pops the lowest rank first, so "critical" runs first.
PRIORITIES = ("critical", "high", "normal", "low")
_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = STATES = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
TERMINAL = frozenset((SUCCEEDED, FAILED, CANCELLED))

DEFAULT_CONCURRENCY = 8  # threads that run tasks in the plane or a worker
DEFAULT_CACHE_SIZE = 10_000  # results kept by the plane
DEFAULT_CACHE_TTL = 3600.0  # seconds a result stays readable
REAP_INTERVAL = 60.0  # seconds between sweeps of expired results
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0  # seconds a client waits to reach the plane
DEFAULT_RETRY_BACKOFF = 1.0  # first retry delay; doubles on every attempt
HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 5.0
POLL_WAIT = 5.0  # seconds the plane holds a client's empty result poll
PULL_WAIT = 10.0  # seconds the plane holds a worker's request for work
CLIENT_IDLE_TTL = 300.0  # forget a client's undelivered results after this
RECENT_TASKS = 500  # finished tasks remembered for the dashboard
SHUTDOWN_GRACE = 5.0  # seconds running tasks get to finish on stop
_BATCH_BYTES = 1024 * 1024  # a client sends at most this much per message

###############################################################################
# Exceptions ###################################################################
###############################################################################


class FastworkerError(Exception):
    """Base class of every error fastworker raises."""


class TaskError(FastworkerError):
    """The task raised.  ``type``, ``message`` and ``traceback`` come from
    the process that ran it."""

    def __init__(self, type: str, message: str = "", traceback: str = "") -> None:
        super().__init__(type, message, traceback)
        self.type = type
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


class WorkerLost(TaskError):
    """The subworker running the task died and no retries were left."""


class TaskTimeout(TaskError):
    """The task ran past its time limit."""


class UnknownTask(FastworkerError, LookupError):
    """No plane or connected worker knows the task name."""


class ResultExpired(FastworkerError, LookupError):
    """The plane's result cache no longer holds (or never held) this result."""


class ProtocolError(FastworkerError, ValueError):
    """A message broke the wire protocol."""


class AuthenticationError(FastworkerError):
    """A message did not carry a valid tag for the shared secret."""


class PlaneUnavailable(FastworkerError, ConnectionError):
    """The plane could not be reached in time, or went away."""


# The "kind" of an error on the wire picks the exception the client raises.
_ERROR_KINDS: dict[str, type[BaseException]] = {
    "raised": TaskError,
    "lost": WorkerLost,
    "timeout": TaskTimeout,
    "unknown_task": UnknownTask,
    "expired": ResultExpired,
    "protocol": ProtocolError,
    "auth": AuthenticationError,
    "unavailable": PlaneUnavailable,
    "cancelled": concurrent.futures.CancelledError,
}


def _error(kind: str, type: str, message: str, tb: str = "") -> dict:
    """An error as it travels on the wire."""
    return {"kind": kind, "type": type, "message": message, "traceback": tb}


def _exception_from_wire(err: Any) -> BaseException:
    """Turn a wire error into the exception that ``Future.result()`` raises."""
    if not isinstance(err, dict):
        return ProtocolError(f"malformed error: {err!r}")
    cls = _ERROR_KINDS.get(err.get("kind"), FastworkerError)
    message = str(err.get("message", ""))
    if issubclass(cls, TaskError):
        return cls(str(err.get("type", cls.__name__)), message, str(err.get("traceback") or ""))
    return cls(message)


###############################################################################
# Utilities ####################################################################
###############################################################################

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


def _json_bytes(obj: Any) -> bytes:
    return _dumps(obj).encode()


def _require_pynng() -> None:
    if pynng is None:
        raise RuntimeError("fastworker needs pynng: pip install pynng==0.9.0")


def _nng_ms(timeout: float | None) -> int:
    """Seconds (None = forever) as an NNG duration in milliseconds."""
    return -1 if timeout is None else max(0, int(timeout * 1000))


class _Chan:
    """One pynng context with its own aio: one request or reply at a time,
    and a deadline on every wait.  Not shared between threads at once; it may
    change hands (a parked request is answered by whichever thread has the
    result)."""

    __slots__ = ("_ctx", "_aio")

    def __init__(self, sock: Any) -> None:
        self._ctx = sock.new_context()
        aio_p = _ffi.new("nng_aio **")
        _check_err(_nng.nng_aio_alloc(aio_p, _ffi.NULL, _ffi.NULL))
        self._aio = aio_p[0]

    def send(self, data: bytes, timeout: float | None) -> None:
        msg_p = _ffi.new("nng_msg **")
        _check_err(_nng.nng_msg_alloc(msg_p, 0))
        msg = msg_p[0]
        _check_err(_nng.nng_msg_append(msg, data, len(data)))
        aio = self._aio
        _nng.nng_aio_set_msg(aio, msg)
        _nng.nng_aio_set_timeout(aio, _nng_ms(timeout))
        _nng.nng_ctx_send(self._ctx.context, aio)
        _nng.nng_aio_wait(aio)
        rv = _nng.nng_aio_result(aio)
        if rv:
            _nng.nng_msg_free(msg)  # NNG gives the message back on failure
            _check_err(rv)

    def recv(self, timeout: float | None) -> tuple[bytes, Any]:
        """The next message and the pipe (an ``nng_pipe``) it came on."""
        aio = self._aio
        _nng.nng_aio_set_timeout(aio, _nng_ms(timeout))
        _nng.nng_ctx_recv(self._ctx.context, aio)
        _nng.nng_aio_wait(aio)
        _check_err(_nng.nng_aio_result(aio))
        msg = _nng.nng_aio_get_msg(aio)
        data = bytes(_ffi.buffer(_nng.nng_msg_body(msg), _nng.nng_msg_len(msg)))
        pipe = _nng.nng_msg_get_pipe(msg)
        _nng.nng_msg_free(msg)
        return data, pipe

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            ctx.close()
        except (pynng.NNGException, TypeError):
            pass  # the socket is already closed, which closed the context too
        ctx._context = None
        _nng.nng_aio_free(self._aio)


def _join(threads: Iterable[threading.Thread], deadline: float) -> None:
    """Wait for threads to end, all by one monotonic ``deadline``."""
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


class _Role:
    """What the plane and a worker share: ``with`` starts and stops them."""

    _sock: Any = None

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self if self._sock is not None else self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _real_address(sock: Any, address: str) -> str:
    """The address a socket really listens on (port 0 becomes the real port)."""
    if address.startswith(("tcp://", "tls+tcp://", "ws://")):
        scheme = address.split("://", 1)[0]
        return f"{scheme}://{sock.listeners[-1].local_address}"
    return address


def _host_of(address: str) -> str:
    rest = address.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1 : rest.index("]")]
    return rest.rsplit(":", 1)[0]


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_exposure(address: str, secret: bytes | None, insecure: bool, what: str) -> None:
    """Refuse to listen beyond loopback without a secret (unless told to)."""
    if address.startswith(("ipc://", "inproc://", "abstract://")):
        return
    if not secret and not insecure and not _is_loopback(_host_of(address)):
        raise ValueError(
            f"refusing to serve the {what} on non-loopback address {address} without a "
            "secret: set --secret (or FASTWORKER_SECRET), or pass --insecure"
        )


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        secret = os.environ.get("FASTWORKER_SECRET") or None
    if isinstance(secret, str):
        secret = secret.encode()
    return secret or None


def _memory(pid: int | str = "self") -> tuple[float, float]:
    """(current, peak) resident memory of a process, in MB."""
    out = {"VmRSS:": 0.0, "VmHWM:": 0.0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in out:
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out["VmRSS:"], out["VmHWM:"]


###############################################################################
# Wire protocol ################################################################
###############################################################################
#
# Every message is one JSON object (UTF-8) with the protocol version "v" and
# an "op".  With a shared secret, the object is preceded by a 32-byte
# HMAC-SHA256 tag over the JSON bytes.  Messages that carry tasks, results or
# events carry a *list* of them, so batching needs no new message.
#
#   op         from -> to        fields
#   ---------  ----------------  --------------------------------------------
#   submit     client -> plane   client:str, tasks:[TASK]
#   accepted   plane -> client   plane:str, rejected:[{id, error:ERROR}]
#   poll       client -> plane   client:str, wait:num   (held until results)
#   results    plane -> client   plane:str, results:[RESULT], closing?:bool
#   fetch      client -> plane   ids:[str], wait:num    (results of any task)
#   status     client -> plane   ids:[str]
#   statuses   plane -> client   statuses:[{id, state, ...}]
#   cancel     client -> plane   ids:[str]
#   cancelled  plane -> client   ids:[str]              (those it cancelled)
#   stats      client -> plane   -
#   report     plane -> client   stats:{...}            (as /api/stats)
#   hello      any -> plane      -
#   welcome    plane -> any      plane:str, version:str, events:str, heartbeat:str
#   bye        client -> plane   client:str
#   ok         plane -> client   -
#   pull       worker -> plane   worker:str, credit:int, results:[RESULT],
#                                info?:WORKER (to register), returned?:[str]
#                                (ids handed back unfinished); held until
#                                there is work for the worker
#   tasks      plane -> worker   plane:str, tasks:[TASK], register?:bool (send
#                                info), heartbeat?:str, heartbeat_interval?:num
#   heartbeat  worker -> plane   worker:WORKER              (PUB/SUB)
#   events     plane -> any      events:[{id, name, state, ...}]  (PUB/SUB)
#   error      plane -> any      error:ERROR
#
#   TASK   = {id:str, name:str, args:list, kwargs:dict, priority?:str,
#             retries?:int, timeout?:num, delay?:num}
#   RESULT = {id:str, state:"succeeded"|"failed"|"cancelled",
#             result?:any, error?:ERROR}  (a fetch also answers
#             "queued", "running" or "unknown" for tasks without a result)
#   ERROR  = {kind:str, type:str, message:str, traceback:str}
#   WORKER = {id, name, host, pid, concurrency, version, in_flight?,
#             tasks:{name: {priority, retries, timeout}}}
#
# A malformed message, an unknown op or version, or a missing or mistyped
# field is a ProtocolError: a REQ/REP peer gets an "error" reply and the
# receiver counts it; PUB/SUB messages are counted and dropped.

PROTOCOL_VERSION = 1
_NUM = (int, float)

# op -> {field: type}; every listed field is required.
OPS: dict[str, dict[str, Any]] = {
    "submit": {"client": str, "tasks": list},
    "accepted": {"plane": str, "rejected": list},
    "poll": {"client": str, "wait": _NUM},
    "results": {"plane": str, "results": list},
    "fetch": {"ids": list, "wait": _NUM},
    "status": {"ids": list},
    "statuses": {"statuses": list},
    "cancel": {"ids": list},
    "cancelled": {"ids": list},
    "stats": {},
    "report": {"stats": dict},
    "hello": {},
    "welcome": {"plane": str, "version": str},
    "bye": {"client": str},
    "ok": {},
    "pull": {"worker": str, "credit": int, "results": list},
    "tasks": {"plane": str, "tasks": list},
    "heartbeat": {"worker": dict},
    "events": {"events": list},
    "error": {"error": dict},
}

_TAG = 32  # bytes of HMAC-SHA256
_FETCH_STATES = frozenset((*STATES, "unknown"))


def _tag(secret: bytes, body: bytes) -> bytes:
    import hashlib
    import hmac

    return hmac.new(secret, body, hashlib.sha256).digest()


def _same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    import hmac

    return hmac.compare_digest(a, b)


def _sign(body: bytes, secret: bytes | None) -> bytes:
    return body if secret is None else _tag(secret, body) + body


def encode(op: str, secret: bytes | None = None, **fields: Any) -> bytes:
    """Encode one message.  Raises TypeError for values JSON cannot encode."""
    msg = {"v": PROTOCOL_VERSION, "op": op}
    msg.update(fields)
    return _sign(_json_bytes(msg), secret)


def encode_batch(op: str, key: str, items: Iterable[bytes], secret: bytes | None = None, **fields: Any) -> bytes:
    """Encode a message whose ``key`` is a list of already-encoded JSON items,
    so that each task or result is encoded once, when it is made."""
    head = _dumps({"v": PROTOCOL_VERSION, "op": op, **fields})
    body = b"".join((head[:-1].encode(), b',"', key.encode(), b'":[', b",".join(items), b"]}"))
    return _sign(body, secret)


def encode_task(
    id: str,
    name: str,
    args: Iterable = (),
    kwargs: dict | None = None,
    *,
    priority: str | None = None,
    retries: int | None = None,
    timeout: float | None = None,
    delay: float | None = None,
) -> bytes:
    """One TASK item.  Raises TypeError if an argument is not JSON-serializable
    and ValueError for a bad option."""
    task: dict[str, Any] = {"id": id, "name": name, "args": list(args), "kwargs": kwargs or {}}
    if priority is not None:
        if priority not in _RANK:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        task["priority"] = priority
    if retries is not None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        task["retries"] = retries
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, _NUM) or timeout <= 0:
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        task["timeout"] = timeout
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, _NUM) or delay < 0:
            raise ValueError(f"delay must be a number of seconds >= 0, not {delay!r}")
        task["delay"] = delay
    return _json_bytes(task)


def encode_result(id: str, state: str, result: Any = None, error: dict | None = None) -> bytes:
    """One RESULT item.  Raises TypeError/ValueError if ``result`` is not JSON."""
    if error is not None:
        return _json_bytes({"id": id, "state": state, "error": error})
    if state == SUCCEEDED:
        return _json_bytes({"id": id, "state": state, "result": result})
    return _json_bytes({"id": id, "state": state})


def _typed(value: Any, kind: Any) -> bool:
    if isinstance(value, bool) and kind is not bool:
        return False  # JSON true is not a number
    return isinstance(value, kind)


def _check_task(t: Any) -> dict:
    """Validate one TASK item in place (filling in empty args and kwargs).
    Written with exact type checks: it runs once per task on every hop."""
    if type(t) is not dict:
        raise ProtocolError("a task must be an object")
    tid, name = t.get("id"), t.get("name")
    if type(tid) is not str or not 0 < len(tid) <= 200:
        raise ProtocolError("task field 'id' must be a non-empty string")
    if type(name) is not str or not name:
        raise ProtocolError("task field 'name' must be a non-empty string")
    args, kwargs = t.get("args"), t.get("kwargs")
    if args is None:
        t["args"] = []
    elif type(args) is not list:
        raise ProtocolError("task field 'args' must be a list")
    if kwargs is None:
        t["kwargs"] = {}
    elif type(kwargs) is not dict:
        raise ProtocolError("task field 'kwargs' must be an object")
    if len(t) > 4:  # options, or fields to ignore
        p, r = t.get("priority"), t.get("retries")
        if p is not None and p not in _RANK:
            raise ProtocolError(f"task field 'priority' must be one of {', '.join(PRIORITIES)}")
        if r is not None and (type(r) is not int or r < 0):
            raise ProtocolError("task field 'retries' must be an integer >= 0")
        for key in ("timeout", "delay"):
            x = t.get(key)
            if x is not None and (type(x) not in _NUM or x < 0):
                raise ProtocolError(f"task field {key!r} must be a number >= 0")
    return t


def _check_ids(ids: list) -> None:
    if not all(_typed(i, str) for i in ids):
        raise ProtocolError("'ids' must be a list of strings")


def decode(data: bytes, secret: bytes | None = None) -> dict:
    """Decode and validate one message.

    Raises:
        AuthenticationError: a secret is set and the tag is missing or wrong.
        ProtocolError: anything else that is not a valid message.
    """
    if secret is not None:
        tag, data = data[:_TAG], data[_TAG:]
        if len(tag) < _TAG or not _same(tag, _tag(secret, data)):
            raise AuthenticationError("message has no valid tag for the shared secret")
    try:
        msg = _loads(data)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON
        raise ProtocolError(f"not a JSON message: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {msg.get('v')!r}")
    op = msg.get("op")
    fields = OPS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise ProtocolError(f"unknown op {op!r}")
    for name, kind in fields.items():
        if not _typed(msg.get(name), kind):
            raise ProtocolError(f"op {op!r}: field {name!r} missing or of the wrong type")
    if op == "submit":
        for t in msg["tasks"]:
            _check_task(t)
    elif op == "tasks":
        for t in msg["tasks"]:
            _check_task(t)
    elif op in ("fetch", "status", "cancel"):
        _check_ids(msg["ids"])
    elif op in ("results", "pull"):
        # a worker reports final states only; a fetch may find a task unfinished
        states = TERMINAL if op == "pull" else _FETCH_STATES
        for r in msg["results"]:
            if not isinstance(r, dict) or not _typed(r.get("id"), str) or r.get("state") not in states:
                raise ProtocolError("a result must be an object with 'id' and a valid 'state'")
    return msg


###############################################################################
# Data structures ##############################################################
###############################################################################


class _Task:
    """A task as the plane tracks it from submission to its final state."""

    __slots__ = (
        "id",
        "name",
        "args",
        "kwargs",
        "rank",
        "retries",
        "timeout",
        "client",
        "state",
        "attempts",
        "submitted",
        "started",
        "finished",
        "worker",
        "error",
        "watchers",
        "item",
        "seq",
        "assigned",
    )

    def __init__(self, t: dict, rank: int, retries: int, timeout: float | None, client: str) -> None:
        self.id = t["id"]
        self.name = t["name"]
        self.args = t["args"]
        self.kwargs = t["kwargs"]
        self.rank = rank
        self.retries = retries
        self.timeout = timeout
        self.client = client
        self.state = QUEUED
        self.attempts = 0
        self.submitted = time.time()
        self.started = None
        self.finished = None
        self.worker = None
        self.error = None
        self.watchers = None  # parked "fetch" requests waiting for this task
        self.item = None  # the encoded RESULT, once final
        self.seq = None  # its place in the queue, kept when it is put back
        self.assigned = None  # id of the worker running it now (None: the plane)

    def wire(self) -> dict:
        """The TASK item a worker receives."""
        t: dict[str, Any] = {"id": self.id, "name": self.name, "args": self.args, "kwargs": self.kwargs}
        if self.timeout is not None:
            t["timeout"] = self.timeout
        return t

    def summary(self) -> dict:
        """What status() and the dashboard show."""
        end = self.finished or time.time()
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "priority": PRIORITIES[self.rank],
            "attempts": self.attempts,
            "worker": self.worker,
            "submitted_at": self.submitted,
            "started_at": self.started,
            "finished_at": self.finished,
            "duration": None if self.started is None else round(end - self.started, 6),
            "error": self.error,
        }


class TaskQueue:
    """The one dispatch heap: higher priority first, FIFO within a priority.

    Entries are ``(rank, seq, task)``; rank 0 is "critical", and ``seq`` keeps
    equal ranks in submission order (tasks themselves are never compared).
    A cancelled task stays in the heap and is skipped when popped.  Not
    thread-safe: the plane's lock guards it.
    """

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()
        self.counts = [0] * len(PRIORITIES)  # live (not cancelled) tasks per rank

    def push(self, task: _Task, keep_seq: bool = False) -> None:
        """Queue a task; ``keep_seq`` puts it back where it was (a task handed
        back or whose worker died keeps its turn)."""
        if not keep_seq or task.seq is None:
            task.seq = next(self._seq)
        heapq.heappush(self._heap, (task.rank, task.seq, task))
        self.counts[task.rank] += 1

    def pop(self) -> _Task | None:
        heap = self._heap
        while heap:
            task = heapq.heappop(heap)[2]
            if task.state == QUEUED:
                self.counts[task.rank] -= 1
                return task
        return None

    def discard(self, task: _Task) -> None:
        """Account for a task that left the queue without being popped."""
        self.counts[task.rank] -= 1

    def __len__(self) -> int:
        return sum(self.counts)

    def __bool__(self) -> bool:
        return any(self.counts)


CacheInfo = collections.namedtuple("CacheInfo", "hits misses evictions expired size max_size ttl")


class ResultCache:
    """An LRU of finished results with a time to live.

    ``OrderedDict`` in recency order: a read moves the entry to the end, an
    insert past ``max_size`` drops the oldest, and an entry older than ``ttl``
    seconds is gone whether it is read or swept by ``reap()``.
    """

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE, ttl: float = DEFAULT_CACHE_TTL) -> None:
        if max_size < 0 or ttl < 0:
            raise ValueError("result cache size and TTL must be >= 0")
        self.max_size = max_size
        self.ttl = ttl
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()  # guards _data and the counters
        self.hits = self.misses = self.evictions = self.expired = 0

    def put(self, key: str, value: Any, now: float | None = None) -> None:
        if self.max_size == 0:
            return
        expires = (time.monotonic() if now is None else now) + self.ttl
        with self._lock:
            data = self._data
            data[key] = (expires, value)
            data.move_to_end(key)
            while len(data) > self.max_size:
                data.popitem(last=False)
                self.evictions += 1

    def get(self, key: str, now: float | None = None) -> Any:
        """The value, or None if it was never stored, was evicted or expired."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.misses += 1
                return None
            if entry[0] <= now:
                del self._data[key]
                self.expired += 1
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return entry[1]

    def peek(self, key: str, now: float | None = None) -> Any:
        """Like get(), but neither counts nor refreshes recency."""
        now = time.monotonic() if now is None else now
        entry = self._data.get(key)
        return None if entry is None or entry[0] <= now else entry[1]

    def __contains__(self, key: str) -> bool:
        return key in self._data  # expired but not yet reaped counts too

    def reap(self, now: float | None = None) -> int:
        """Drop every expired entry; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = [k for k, (expires, _) in self._data.items() if expires <= now]
            for k in dead:
                del self._data[k]
            self.expired += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._data)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, self.evictions, self.expired, len(self._data), self.max_size, self.ttl)


###############################################################################
# Task registry ################################################################
###############################################################################


class TaskSpec:
    """A registered task: the function and its defaults."""

    __slots__ = ("fn", "name", "priority", "retries", "timeout", "is_async")

    def __init__(
        self,
        fn: Callable,
        name: str,
        priority: str = "normal",
        retries: int = 0,
        timeout: float | None = None,
    ) -> None:
        if priority not in _RANK:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
        if timeout is not None and (not isinstance(timeout, _NUM) or timeout <= 0):
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        self.fn = fn
        self.name = name
        self.priority = priority
        self.retries = retries
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(fn)

    def defaults(self) -> dict:
        return {"priority": self.priority, "retries": self.retries, "timeout": self.timeout}

    def __repr__(self) -> str:
        return f"<TaskSpec {self.name!r} priority={self.priority} retries={self.retries}>"


#: name -> TaskSpec for every task this process can run.
_registry: dict[str, TaskSpec] = {}


def task(
    fn: Callable | None = None,
    *,
    name: str | None = None,
    priority: str = "normal",
    retries: int = 0,
    timeout: float | None = None,
) -> Any:
    """Register a function as a task, under its ``__name__`` or ``name``.

    Use it bare (``@task``) or with options (``@task(name=..., priority=...,
    retries=..., timeout=...)``).  The function is returned unchanged, so
    calling it still runs it locally; ``async def`` functions work too.

    Raises:
        ValueError: another function is already registered under the name,
            or an option is invalid.
    """

    def register(fn: Callable) -> Callable:
        spec = TaskSpec(fn, name or fn.__name__, priority, retries, timeout)
        old = _registry.get(spec.name)
        if old is not None and _origin(old.fn) != _origin(fn):
            raise ValueError(f"task name {spec.name!r} is already registered by {_origin(old.fn)}")
        _registry[spec.name] = spec
        fn.__fastworker_task__ = spec
        return fn

    return register(fn) if fn is not None else register


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def _task_name(fn: str | Callable) -> str:
    if isinstance(fn, str):
        return fn
    spec = getattr(fn, "__fastworker_task__", None)
    if spec is not None:
        return spec.name
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a task name or a function, got {fn!r}")
    return name


def _import_tasks(modules: Iterable[str]) -> None:
    """Import task modules by name, from the current directory too."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        importlib.import_module(name)


###############################################################################
# Running tasks ################################################################
###############################################################################


class _AsyncRunner:
    """An event loop on its own thread for ``async def`` tasks, started on
    first use so that processes without async tasks never pay for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the lazy start and stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def submit(self, coro: Any, done: Callable[[concurrent.futures.Future], None]) -> None:
        """Run ``coro`` on the loop; ``done(future)`` is called on the loop's thread."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="fastworker-async", daemon=True)
                self._thread.start()
            loop = self._loop
        asyncio.run_coroutine_threadsafe(coro, loop).add_done_callback(done)

    def stop(self, timeout: float = SHUTDOWN_GRACE) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None:
            return

        def halt() -> None:
            for t in asyncio.all_tasks(loop):
                t.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(halt)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


def _failure(kind: str, exc: BaseException, skip_frames: int = 1) -> dict:
    tb = exc.__traceback__
    for _ in range(skip_frames):  # start the traceback at the task, not at us
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return _error(kind, type(exc).__name__, str(exc), text)


def _failed(job: Any, err: dict) -> tuple[str, bytes, dict]:
    return FAILED, encode_result(job.id, FAILED, error=err), err


class _Job:
    """A task as a worker runs it."""

    __slots__ = ("id", "name", "args", "kwargs", "timeout", "plane")

    def __init__(self, t: dict, plane: str) -> None:
        self.id = t["id"]
        self.name = t["name"]
        self.args = t["args"]
        self.kwargs = t["kwargs"]
        self.timeout = t.get("timeout")
        self.plane = plane


class _Executor:
    """Runs jobs for the plane (when it has no subworker) and for workers.

    ``concurrency`` threads take jobs with ``take()`` (None means stop) and
    run them; ``async def`` tasks run on one event loop instead, so they hold
    no thread.  ``take()`` hands out at most as many jobs as its owner has
    slots (the plane counts its own; a worker gets no more than its slots).
    Every outcome goes to ``report(job, state, item, error)``, whatever the
    task does.  A job with a time limit runs on a thread of its own: past the
    limit it is reported as TaskTimeout and its thread is abandoned, and if it
    is still running ``margin`` seconds later ``on_overrun(job)`` is called.
    """

    def __init__(
        self,
        concurrency: int,
        take: Callable[[], Any],
        report: Callable[[Any, str, bytes, dict | None], None],
        max_size: int,
        on_overrun: Callable[[Any], None] | None = None,
        margin: float = 1.0,
    ) -> None:
        self.concurrency = concurrency
        self.margin = margin
        self._take = take
        self._report = report
        self._max_size = max_size
        self._on_overrun = on_overrun
        self._loop = _AsyncRunner()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards abandoned
        self.abandoned = 0  # task threads still running past their time limit

    def start(self, prefix: str) -> None:
        for _ in range(self.concurrency):
            t = threading.Thread(target=self._serve, name=f"{prefix}-runner", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, deadline: float) -> None:
        """Wait until ``deadline`` for the runners, which exit once ``take()``
        returns None, then stop the event loop."""
        _join(self._threads, deadline)
        self._loop.stop(max(0.1, deadline - time.monotonic()))

    def _serve(self) -> None:
        while (job := self._take()) is not None:
            self._run(job)

    def _done(self, job: Any, state: str, item: bytes, error: dict | None) -> None:
        try:
            self._report(job, state, item, error)
        except Exception:
            logger.exception("could not report the outcome of task %s", job.id)

    def _encode(self, job: Any, value: Any) -> tuple[str, bytes, dict | None]:
        try:
            item = encode_result(job.id, SUCCEEDED, value)
        except (TypeError, ValueError) as e:
            err = _error("raised", "TypeError", f"the result of task {job.name!r} is not JSON-serializable: {e}")
            return _failed(job, err)
        if len(item) > self._max_size - 4096:
            err = _error(
                "raised", "ValueError", f"the result of task {job.name!r} is {len(item)} bytes, over the limit"
            )
            return _failed(job, err)
        return SUCCEEDED, item, None

    def _call(self, job: Any, spec: TaskSpec) -> tuple[str, bytes, dict | None]:
        try:
            value = spec.fn(*job.args, **job.kwargs)
        except (Exception, SystemExit) as e:
            return _failed(job, _failure("raised", e))
        return self._encode(job, value)

    def _run(self, job: Any) -> None:
        spec = _registry.get(job.name)
        if spec is None:
            err = _error("unknown_task", "UnknownTask", f"no task named {job.name!r} is registered here")
            self._done(job, *_failed(job, err))
        elif spec.is_async:
            try:
                coro = spec.fn(*job.args, **job.kwargs)
            except Exception as e:  # wrong arguments fail before there is a coroutine
                return self._done(job, *_failed(job, _failure("raised", e)))
            if job.timeout:
                coro = asyncio.wait_for(coro, job.timeout)
            started = time.monotonic()
            self._loop.submit(coro, lambda fut: self._async_done(job, fut, started))
        elif job.timeout:
            self._run_limited(job, spec)
        else:
            self._done(job, *self._call(job, spec))

    def _async_done(self, job: Any, fut: concurrent.futures.Future, started: float) -> None:
        try:
            outcome = self._encode(job, fut.result())
        except (asyncio.TimeoutError, TimeoutError) as e:
            if job.timeout and time.monotonic() - started >= job.timeout * 0.999:
                outcome = _failed(job, self._overran(job))
            else:
                outcome = _failed(job, _failure("raised", e, 0))
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            outcome = _failed(job, _error("raised", "CancelledError", "the task was cancelled at shutdown"))
        except (Exception, SystemExit) as e:
            outcome = _failed(job, _failure("raised", e, 0))
        self._done(job, *outcome)

    @staticmethod
    def _overran(job: Any) -> dict:
        return _error("timeout", "TaskTimeout", f"task {job.name!r} ran past its time limit of {job.timeout:g} s")

    def _run_limited(self, job: Any, spec: TaskSpec) -> None:
        box: list = []
        state = ["running"]  # -> "done", or -> "abandoned" -> "done"; guarded by self._lock

        def target() -> None:
            try:
                box.append(self._call(job, spec))
            finally:
                with self._lock:
                    if state[0] == "abandoned":
                        self.abandoned -= 1
                    state[0] = "done"

        t = threading.Thread(target=target, name="fastworker-task", daemon=True)
        t.start()
        t.join(job.timeout)
        with self._lock:
            finished = state[0] == "done"
            if not finished:
                state[0] = "abandoned"
                self.abandoned += 1
        if finished and box:
            return self._done(job, *box[0])
        self._done(job, *_failed(job, self._overran(job)))
        if self._on_overrun is not None:
            t.join(self.margin)
            if t.is_alive():
                self._on_overrun(job)


###############################################################################
# Client #######################################################################
###############################################################################


class Future(concurrent.futures.Future):
    """The future result of one task.

    A ``concurrent.futures.Future``: use ``result()``, ``exception()``,
    ``done()``, ``add_done_callback()``, ``concurrent.futures.wait`` and
    ``as_completed``, or ``await`` it in asyncio.  A background receiver in
    the client completes it; nobody polls.  ``task_id`` identifies the task
    on the plane (``Client.result``/``status``/``cancel`` take it).
    """

    def __init__(self, client: Client, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
        self._client = client
        self._plane: str | None = None  # id of the plane that accepted the task

    def cancel(self) -> bool:
        """Cancel the task if it is still queued; True if it was."""
        if self.done():
            return self.cancelled()
        return self._client._cancel_future(self)

    def _set_cancelled(self) -> None:
        if concurrent.futures.Future.cancel(self):
            self.set_running_or_notify_cancel()

    def _settle(self, value: Any = None, exc: BaseException | None = None) -> None:
        try:
            if exc is None:
                self.set_result(value)
            else:
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile: the first outcome stands

    def __await__(self) -> Any:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<fastworker.Future {self.task_id} {self._state.lower()}>"


class Client(concurrent.futures.Executor):
    """Submits tasks to a plane and hands back futures.

    One client is safe to share between threads.  Submissions that are
    waiting to go out travel together in one message, and results come back
    in batches on a long-poll, so ``submit()`` returns at once.

    Args:
        address: the plane's address.
        secret: shared secret for message tags; defaults to the
            ``FASTWORKER_SECRET`` environment variable.
        timeout: seconds to reach the plane before an operation fails with
            ``PlaneUnavailable``.  Waiting for a result has no limit unless
            you give ``result()`` a timeout.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        secret: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        _require_pynng()
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.address = address
        self.timeout = timeout
        self.max_message_size = max_message_size
        self._secret = _secret_bytes(secret)
        self._id = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self._sock = pynng.Req0(recv_max_size=max_message_size + 65536)
        self._sock.resend_time = -1  # never resend: a resent submit would run twice
        self._sock.reconnect_time_min = 50
        self._sock.reconnect_time_max = 1000
        try:
            self._sock.dial(address, block=False)
        except pynng.NNGException as e:
            self._sock.close()
            raise ValueError(f"cannot dial {address!r}: {e}") from None
        self._lock = threading.Lock()  # guards _outbox, _pending, _threads and the flags
        self._has_work = threading.Condition(self._lock)  # lanes wait for submissions
        self._has_pending = threading.Condition(self._lock)  # the poller waits for futures
        self._flushed = threading.Condition(self._lock)  # queries wait for submissions to land
        self._outbox: list[tuple[bytes, Future]] = []
        self._sending = 0  # batches sent and not yet answered
        self._pending: dict[str, Future] = {}
        self._threads: list[threading.Thread] = []
        self._plane_id: str | None = None
        self._closing = False  # no new submissions; lanes flush and exit
        self._stopping = False  # the poller exits

    # -- submitting -----------------------------------------------------

    def submit(self, fn: str | Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Submit a task by name (or by its decorated function) with the
        task's default options.

        Raises:
            TypeError: an argument is not JSON-serializable (nothing is sent).
        """
        return self.submit_with(fn, args, kwargs)

    def submit_with(
        self,
        fn: str | Callable,
        args: Iterable = (),
        kwargs: dict | None = None,
        *,
        priority: str | None = None,
        delay: float | None = None,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> Future:
        """Submit a task with explicit options; ``None`` keeps the task's
        default.  ``priority`` is one of critical, high, normal, low;
        ``delay`` is seconds before the task may run; ``retries`` how often a
        failed run is retried; ``timeout`` the time limit of one run.

        Raises:
            TypeError: an argument is not JSON-serializable (nothing is sent).
            ValueError: an option is invalid or the task is too large.
        """
        tid = f"{self._id}-{next(self._ids)}"
        data = encode_task(
            tid, _task_name(fn), args, kwargs, priority=priority, retries=retries, timeout=timeout, delay=delay
        )
        if len(data) > self.max_message_size - 4096:
            raise ValueError(f"task {tid} is {len(data)} bytes, over the message size limit")
        fut = Future(self, tid)
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._threads:
                self._start()
            if not self._pending:
                self._has_pending.notify()
            self._pending[tid] = fut
            self._outbox.append((data, fut))
            self._has_work.notify()
        return fut

    def _start(self) -> None:
        for target, name in ((self._lane, "lane"), (self._lane, "lane"), (self._poll, "poller")):
            t = threading.Thread(target=target, name=f"fastworker-client-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _lane(self) -> None:
        """Send whatever is waiting in the outbox as one message; repeat."""
        chan = _Chan(self._sock)
        try:
            while True:
                with self._lock:
                    while not self._outbox and not self._closing:
                        self._has_work.wait(1.0)
                    if not self._outbox:
                        return
                    batch, size = [], 0
                    for item in self._outbox:
                        if batch and size + len(item[0]) > _BATCH_BYTES:
                            break
                        batch.append(item)
                        size += len(item[0])
                    del self._outbox[: len(batch)]
                    self._sending += 1
                try:
                    self._send_batch(chan, batch)
                finally:
                    with self._lock:
                        self._sending -= 1
                        if not self._sending and not self._outbox:
                            self._flushed.notify_all()
        finally:
            chan.close()

    def _send_batch(self, chan: _Chan, batch: list[tuple[bytes, Future]]) -> None:
        data = encode_batch("submit", "tasks", [d for d, _ in batch], self._secret, client=self._id)
        try:
            chan.send(data, self.timeout)
            reply = decode(chan.recv(self.timeout)[0], self._secret)
        except pynng.Timeout:
            # Nothing queued behind this batch can get through either: fail
            # it all now rather than one timeout per batch.
            with self._lock:
                batch += self._outbox
                self._outbox = []
            return self._fail([f for _, f in batch], self._unreachable())
        except pynng.NNGException as e:
            return self._fail([f for _, f in batch], PlaneUnavailable(f"lost the plane at {self.address}: {e}"))
        except FastworkerError as e:
            return self._fail([f for _, f in batch], e)
        if reply["op"] == "error":
            return self._fail([f for _, f in batch], _exception_from_wire(reply["error"]))
        if reply["op"] != "accepted":
            return self._fail([f for _, f in batch], ProtocolError(f"unexpected reply {reply['op']!r}"))
        plane = reply["plane"]
        for _, fut in batch:
            fut._plane = plane
        rejected = {r.get("id"): r.get("error") for r in reply["rejected"] if isinstance(r, dict)}
        if rejected:
            self._fail([f for _, f in batch if f.task_id in rejected], None, rejected)

    def _unreachable(self) -> PlaneUnavailable:
        return PlaneUnavailable(f"no answer from the plane at {self.address} within {self.timeout:g} s")

    def _fail(self, futs: list[Future], exc: BaseException | None, errors: dict | None = None) -> None:
        with self._lock:
            for fut in futs:
                self._pending.pop(fut.task_id, None)
        for fut in futs:
            fut._settle(exc=exc if errors is None else _exception_from_wire(errors[fut.task_id]))

    # -- receiving --------------------------------------------------------

    def _poll(self) -> None:
        """Keep one long-poll parked at the plane while results are due, and
        complete futures with whatever it brings back."""
        chan = _Chan(self._sock)
        lost_at = None
        busy_until = 0.0  # keep polling a while after the last result
        poll = encode("poll", self._secret, client=self._id, wait=POLL_WAIT)
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._pending and time.monotonic() > busy_until:
                        self._has_pending.wait(1.0)
                    if self._stopping:
                        return
                try:
                    chan.send(poll, self.timeout)
                    msg = decode(chan.recv(POLL_WAIT + self.timeout)[0], self._secret)
                except pynng.Closed:
                    return
                except (pynng.NNGException, FastworkerError) as e:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    lost_at = lost_at or now
                    if now - lost_at >= self.timeout:
                        self._fail_pending(PlaneUnavailable(f"lost the plane at {self.address}: {e}"))
                        lost_at = None
                    with self._lock:  # brief pause so a dead plane is not hammered
                        self._has_pending.wait(0.05)
                    continue
                lost_at = None
                if msg["op"] != "results":
                    logger.warning("unexpected %r reply to a poll", msg["op"])
                    continue
                plane = msg["plane"]
                if plane != self._plane_id:
                    if self._plane_id is not None:  # the plane restarted: its queue is gone
                        self._fail_pending(PlaneUnavailable("the plane restarted; the task was lost"), plane)
                    self._plane_id = plane
                self._deliver(msg["results"])
                if msg.get("closing"):
                    self._fail_pending(PlaneUnavailable("the plane shut down before the task finished"))
                busy_until = time.monotonic() + POLL_WAIT
        finally:
            chan.close()

    def _deliver(self, results: list[dict]) -> None:
        with self._lock:
            done = [(self._pending.pop(r["id"], None), r) for r in results]
        for fut, r in done:
            if fut is None:
                continue
            state = r["state"]
            if state == SUCCEEDED:
                fut._settle(r.get("result"))
            elif state == CANCELLED:
                fut._set_cancelled()
            else:
                fut._settle(exc=_exception_from_wire(r.get("error")))

    def _fail_pending(self, exc: BaseException, keep_plane: str | None = None) -> None:
        """Fail pending futures the plane had accepted (all, or those accepted
        by another plane than ``keep_plane``)."""
        with self._lock:
            lost = [f for f in self._pending.values() if f._plane is not None and f._plane != keep_plane]
            for f in lost:
                del self._pending[f.task_id]
        for f in lost:
            f._settle(exc=exc)

    # -- requests ---------------------------------------------------------

    def _flush(self) -> None:
        """Wait (up to the timeout) until this client's submissions have
        reached the plane, so a query sees every task submitted before it."""
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while (self._outbox or self._sending) and time.monotonic() < deadline:
                self._flushed.wait(deadline - time.monotonic())

    def _call(self, op: str, hold: float = 0.0, timeout: float | None = None, **fields: Any) -> dict:
        """One request/reply on a context of its own, within ``timeout``
        (default: the client's); the plane may hold the request ``hold``
        seconds more before it answers."""
        timeout = self.timeout if timeout is None else timeout
        try:
            chan = _Chan(self._sock)
        except pynng.NNGException:
            raise PlaneUnavailable("the client is closed") from None
        try:
            chan.send(encode(op, self._secret, **fields), timeout)
            data = chan.recv(timeout + hold)[0]
        except pynng.Timeout:
            raise self._unreachable() from None
        except pynng.NNGException as e:
            raise PlaneUnavailable(f"lost the plane at {self.address}: {e}") from None
        finally:
            chan.close()
        msg = decode(data, self._secret)
        if msg["op"] == "error":
            raise _exception_from_wire(msg["error"])
        return msg

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """The result of any task by id, waiting up to ``timeout`` seconds.

        Raises:
            ResultExpired: the plane does not hold the result (unknown id,
                evicted or expired).
            TaskError: the task failed.  TimeoutError: not done in time.
        """
        with self._lock:
            fut = self._pending.get(task_id)
        if fut is not None:
            return fut.result(timeout)
        self._flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_WAIT if deadline is None else max(0.0, min(POLL_WAIT, deadline - time.monotonic()))
            r = self._call("fetch", wait, ids=[task_id], wait=wait)["results"][0]
            state = r.get("state")
            if state == SUCCEEDED:
                return r.get("result")
            if state == FAILED:
                raise _exception_from_wire(r.get("error"))
            if state == CANCELLED:
                raise concurrent.futures.CancelledError(task_id)
            if state not in (QUEUED, RUNNING):
                raise ResultExpired(f"the plane holds no result for task {task_id!r} (unknown, evicted or expired)")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id!r} is still {state}")

    def status(self, task_id: str) -> dict:
        """The task's state and timings: ``{"id", "state", ...}``; state is
        "unknown" when the plane no longer remembers it."""
        self._flush()
        return self._call("status", ids=[task_id])["statuses"][0]

    def cancel(self, task_id: str) -> bool:
        """Cancel a task that is still queued; True if it was."""
        self._flush()
        cancelled = task_id in self._call("cancel", ids=[task_id])["ids"]
        if cancelled:
            with self._lock:
                fut = self._pending.pop(task_id, None)
            if fut is not None:
                fut._set_cancelled()
        return cancelled

    def _cancel_future(self, fut: Future) -> bool:
        with self._lock:
            for i, (_, queued) in enumerate(self._outbox):
                if queued is fut:  # never sent: cancel it here
                    del self._outbox[i]
                    self._pending.pop(fut.task_id, None)
                    fut._set_cancelled()
                    return True
        try:
            return self.cancel(fut.task_id)
        except FastworkerError:
            return False

    def stats(self) -> dict:
        """The plane's statistics, the same JSON as the dashboard's /api/stats."""
        self._flush()
        return self._call("stats")["stats"]

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Completion events published by the plane, one dict per finished
        task, as they happen.  Stops after ``timeout`` seconds without one.
        Events are best effort (PUB/SUB): use results for anything that matters."""
        address = self._call("hello").get("events")
        if not address:
            raise PlaneUnavailable("the plane publishes no events")
        sub = pynng.Sub0(recv_timeout=1000, recv_max_size=self.max_message_size)
        try:
            sub.subscribe(b"")
            sub.dial(address, block=False)
            last = time.monotonic()
            while True:
                try:
                    data = sub.recv()
                except pynng.Timeout:
                    if timeout is not None and time.monotonic() - last >= timeout:
                        return
                    continue
                last = time.monotonic()
                try:
                    msg = decode(data, self._secret)
                except FastworkerError:
                    continue
                if msg["op"] == "events":
                    yield from msg["events"]
        finally:
            sub.close()

    # -- lifetime ---------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the client.  Submissions already made are sent first.  With
        ``wait`` it then waits for every pending future; without, futures
        still pending fail (their results stay fetchable with ``result()``
        from another client).  ``cancel_futures`` cancels queued tasks."""
        with self._lock:
            if self._stopping:
                return
            self._closing = True
            self._has_work.notify_all()
            lanes = [t for t in self._threads if t.name.endswith("lane")]
        for t in lanes:
            t.join()  # each batch has a deadline, so this ends
        if cancel_futures:
            for fut in list(self._pending.values()):
                fut.cancel()
        if wait:
            concurrent.futures.wait(list(self._pending.values()))
        with self._lock:
            self._stopping = True
            self._has_pending.notify_all()
            left = list(self._pending.values())
            self._pending.clear()
        for fut in left:
            fut._settle(exc=FastworkerError("the client closed before the result arrived"))
        if self._threads:
            try:
                self._call("bye", timeout=0.2, client=self._id)  # a courtesy: one short try
            except FastworkerError:
                pass
        self._sock.close()  # wakes the poller
        for t in self._threads:
            t.join(self.timeout)

    def close(self) -> None:
        """Send what was submitted, then stop without waiting for results."""
        self.shutdown(wait=False)

    def __enter__(self) -> Client:
        return self

    def __repr__(self) -> str:
        return f"<fastworker.Client {self.address}>"


###############################################################################
# Control plane ################################################################
###############################################################################


class _ClientState:
    """What the plane keeps per client: results not yet delivered and the
    client's parked long-poll, if any."""

    __slots__ = ("outbox", "poll", "deadline", "seen")

    def __init__(self, now: float) -> None:
        self.outbox: list[bytes] = []
        self.poll: _Chan | None = None
        self.deadline = 0.0
        self.seen = now


class _Fetch:
    """A parked "fetch" request, answered when all its tasks are done."""

    __slots__ = ("chan", "ids", "deadline")

    def __init__(self, chan: _Chan, ids: list, deadline: float) -> None:
        self.chan = chan
        self.ids = ids
        self.deadline = deadline


class _WorkerState:
    """A connected subworker as the plane sees it."""

    __slots__ = (
        "id",
        "name",
        "host",
        "pid",
        "concurrency",
        "tasks",
        "in_flight",
        "credit",
        "pull",
        "pull_deadline",
        "pipe",
        "pipe_id",
        "last_seen",
        "last_heartbeat",
        "registered_at",
        "turn",
        "completed",
    )

    def __init__(self, wid: str, info: dict, pipe: Any, now: float) -> None:
        self.id = wid
        self.name = str(info.get("name") or wid)[:200]
        self.host = str(info.get("host") or "?")[:200]
        pid = info.get("pid")
        self.pid = pid if _typed(pid, int) else 0
        conc = info.get("concurrency")
        self.concurrency = conc if _typed(conc, int) and conc > 0 else 1
        self.tasks = _catalog_of(info.get("tasks"))
        self.in_flight: dict[str, _Task] = {}
        self.credit = self.concurrency
        self.pull: _Chan | None = None  # its parked "pull" request
        self.pull_deadline = 0.0
        self.pipe = pipe
        self.pipe_id = _nng.nng_pipe_id(pipe)
        self.last_seen = now  # monotonic: any sign of life (pull or heartbeat)
        self.last_heartbeat = time.time()
        self.registered_at = time.time()
        self.turn = 0  # breaks ties between equally loaded workers: least recently served first
        self.completed = 0

    def free(self) -> int:
        return min(self.credit, self.concurrency) - len(self.in_flight)

    def summary(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "concurrency": self.concurrency,
            "in_flight": len(self.in_flight),
            "load": round(len(self.in_flight) / self.concurrency, 3),
            "completed": self.completed,
            "last_heartbeat": self.last_heartbeat,
            "registered_at": self.registered_at,
            "tasks": sorted(self.tasks),
            "state": "draining" if self.credit == 0 else "connected",
        }


def _catalog_of(tasks: Any) -> dict:
    """Task defaults as a worker announced them, cleaned up."""
    out = {}
    if not isinstance(tasks, dict):
        return out
    for name, d in tasks.items():
        d = d if isinstance(d, dict) else {}
        p, r, t = d.get("priority"), d.get("retries"), d.get("timeout")
        out[str(name)] = {
            "priority": p if p in _RANK else "normal",
            "retries": r if _typed(r, int) and r >= 0 else 0,
            "timeout": t if _typed(t, _NUM) and t > 0 else None,
        }
    return out


class Plane(_Role):
    """The control plane: queue, dispatch, result cache, dashboard.

    ``Plane(...).start()`` serves in background threads of this process
    (``stop()`` ends it; it is also a context manager);
    ``python fastworker.py plane`` runs one as a process.  With no subworker
    connected it runs tasks itself on ``concurrency`` threads; with one or
    more, it dispatches every task to the least-loaded one.

    Args:
        listen: address clients and workers connect to (port 0 picks one;
            ``address`` has the real one after ``start()``).
        dashboard: ``"host:port"`` for the web dashboard, or None for none.
        concurrency: threads that run tasks in the plane itself.
        result_cache_size, result_cache_ttl: how many finished results are
            kept, and for how many seconds.
        heartbeat_timeout: seconds of silence after which a worker is dead.
        max_message_size: largest message accepted, in bytes.
        retry_backoff: seconds before the first retry; doubles each time.
        secret: shared secret for message tags (default FASTWORKER_SECRET).
        insecure: allow a non-loopback address without a secret.
    """

    def __init__(
        self,
        listen: str = DEFAULT_ADDRESS,
        *,
        dashboard: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        result_cache_size: int = DEFAULT_CACHE_SIZE,
        result_cache_ttl: float = DEFAULT_CACHE_TTL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        reap_interval: float = REAP_INTERVAL,
        secret: str | bytes | None = None,
        insecure: bool = False,
        receivers: int = 2,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_message_size < 65536:
            raise ValueError("max_message_size must be >= 65536")
        if heartbeat_timeout <= 0 or retry_backoff < 0 or reap_interval <= 0:
            raise ValueError("heartbeat_timeout and reap_interval must be > 0, retry_backoff >= 0")
        self.listen = listen
        self.dashboard = dashboard
        self.concurrency = concurrency
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size
        self.retry_backoff = retry_backoff
        self.reap_interval = reap_interval
        self.insecure = insecure
        self.id = os.urandom(8).hex()
        self.cache = ResultCache(result_cache_size, result_cache_ttl)
        self.address: str | None = None  # the real addresses, set by start()
        self.dashboard_url: str | None = None
        self.events_address: str | None = None
        self.heartbeat_address: str | None = None
        self._secret = _secret_bytes(secret)
        self._receivers = receivers
        # the empty replies never change: encode them once
        self._no_results = encode_batch("results", "results", [], self._secret, plane=self.id)
        self._no_tasks = encode_batch("tasks", "tasks", [], self._secret, plane=self.id)
        self._lock = threading.Lock()  # guards every task, queue, client, worker and counter below
        self._work = threading.Condition(self._lock)  # local runners wait for queued tasks
        self._tick = threading.Condition(self._lock)  # the housekeeper waits for its next deadline
        self._drained = threading.Condition(self._lock)  # stop() waits for local runs to end
        self._tasks: dict[str, _Task] = {}  # every task not yet finished
        self._queue = TaskQueue()
        self._timers: list = []  # heap of (due, seq, task): delayed tasks and retries
        self._timer_seq = itertools.count()
        self._clients: dict[str, _ClientState] = {}
        self._fetches: set[_Fetch] = set()
        self._ripe: set[_ClientState] = set()  # clients with a parked poll and results for it
        self._workers: dict[str, _WorkerState] = {}
        self._pipe_workers: dict[int, _WorkerState] = {}
        self._catalog: dict[str, dict] = {}  # task name -> defaults, over all connected workers
        self._turns = itertools.count(1)
        self._counts = dict.fromkeys(STATES, 0)
        self._submitted = self._retried = self._scheduled = self._late = 0
        self._workers_lost = self._requeued = self._handed_back = 0
        self._errors = {"protocol": 0, "auth": 0, "internal": 0, "send": 0}
        self._recent: collections.deque = collections.deque(maxlen=RECENT_TASKS)
        self._local_running = 0
        self._started_at = time.time()
        self._stopping = False  # no new work; running tasks may finish
        self._closed = False  # threads exit
        self._threads: list[threading.Thread] = []
        self._free: collections.deque = collections.deque()  # idle _Chans (deque ops are atomic)
        self._gone: queue.SimpleQueue = queue.SimpleQueue()  # ids of pipes that closed
        self._executor = _Executor(concurrency, self._take_local, self._report_local, max_message_size)
        self._sock: Any = None
        self._pub: Any = None
        self._hb: Any = None
        self._subs = 0  # event subscribers connected (guarded by _subs_lock)
        self._subs_lock = threading.Lock()
        self._http: Any = None  # the dashboard's ThreadingHTTPServer

    # -- lifetime ---------------------------------------------------------

    def start(self) -> Plane:
        """Bind the sockets and start serving; returns self."""
        if self._sock is not None:
            raise RuntimeError("the plane is already started")
        _require_pynng()
        _check_exposure(self.listen, self._secret, self.insecure, "plane")
        sock = pynng.Rep0(recv_max_size=2 * self.max_message_size)
        # NNG calls this on its own thread with a socket lock held: hand the
        # pipe id over and return at once.
        sock.add_post_pipe_remove_cb(lambda pipe: self._gone.put(pipe.id))
        opened = [sock]
        try:
            sock.listen(self.listen)
            self.address = _real_address(sock, self.listen)
            self._pub = pub = pynng.Pub0()
            opened.append(pub)
            pub.add_post_pipe_connect_cb(lambda pipe: self._count_subs(1))
            pub.add_post_pipe_remove_cb(lambda pipe: self._count_subs(-1))
            pub.listen(_sibling_address(self.address, "events"))
            self.events_address = _real_address(pub, _sibling_address(self.address, "events"))
            self._hb = hb = pynng.Sub0(recv_timeout=1000, recv_max_size=1024 * 1024)
            opened.append(hb)
            hb.subscribe(b"")
            hb.listen(_sibling_address(self.address, "heartbeat"))
            self.heartbeat_address = _real_address(hb, _sibling_address(self.address, "heartbeat"))
            if self.dashboard:
                self._http = _start_dashboard(self, self.dashboard, self._secret, self.insecure)
                host, port = self._http.server_address[:2]
                self.dashboard_url = f"http://{host}:{port}/"
        except BaseException:
            for s in opened:
                s.close()
            raise
        self._sock = sock
        spawn = [(self._serve, "receiver")] * self._receivers
        spawn += [(self._housekeep, "housekeeper"), (self._heartbeats, "heartbeats"), (self._watch_pipes, "pipes")]
        if self._http is not None:
            spawn.append((self._http.serve_forever, "dashboard"))
        for target, name in spawn:
            t = threading.Thread(target=target, name=f"fastworker-plane-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._executor.start("fastworker-plane")
        logger.info("plane %s listening on %s", self.id, self.address)
        return self

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop taking work, give running tasks ``grace`` seconds to finish
        and deliver their results, then close everything."""
        with self._lock:
            if self._stopping or self._sock is None:
                return
            self._stopping = True
            self._work.notify_all()
            deadline = time.monotonic() + grace
            while (self._local_running or any(w.in_flight for w in self._workers.values())) and (
                time.monotonic() < deadline
            ):
                self._drained.wait(deadline - time.monotonic())
            sends = []
            bye = encode_batch("results", "results", [], self._secret, plane=self.id, closing=True)
            for cs in self._clients.values():
                if cs.poll is not None:
                    sends.append((cs.poll, bye))
                    cs.poll = None
            gone = self._encode_error(_error("unavailable", "PlaneUnavailable", "the plane is shutting down"))
            sends += [(f.chan, gone) for f in self._fetches]
            self._fetches.clear()
            for w in self._workers.values():
                if w.pull is not None:
                    sends.append((w.pull, self._no_tasks))
                    w.pull = None
        self._send_all(sends)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        with self._lock:
            self._closed = True
            self._tick.notify_all()
        self._gone.put(None)
        for s in (self._sock, self._pub, self._hb):
            s.close()  # wakes every receiver
        self._executor.join(time.monotonic() + 1.0)
        _join(self._threads, time.monotonic() + grace)
        while self._free:
            self._free.pop().close()
        logger.info("plane %s stopped", self.id)

    # -- receiving requests -------------------------------------------------

    def _serve(self) -> None:
        """Receive requests on a context; answer at once or park it."""
        chan = None
        try:
            while not self._closed:
                if chan is None:
                    try:
                        chan = self._free.pop()
                    except IndexError:
                        chan = _Chan(self._sock)
                try:
                    data, pipe = chan.recv(1.0)
                except pynng.Timeout:
                    continue
                reply = self._handle(data, chan, pipe)
                if reply is None:
                    chan = None  # parked: whoever answers it recycles it
                    continue
                try:
                    chan.send(reply, self._send_timeout())
                except pynng.NNGException:
                    with self._lock:
                        self._errors["send"] += 1
                    chan.close()
                    chan = None
        except pynng.Closed:
            pass
        except pynng.NNGException:
            if not self._closed:
                logger.exception("plane receiver failed")
        finally:
            if chan is not None:
                chan.close()

    def _send_timeout(self) -> float:
        return 1.0 if self._stopping else 5.0

    def _answer(self, chan: _Chan, data: bytes) -> None:
        """Answer a parked request (from any thread) and recycle its context."""
        try:
            chan.send(data, self._send_timeout())
        except pynng.NNGException:
            with self._lock:
                self._errors["send"] += 1
            chan.close()
            return
        if len(self._free) < 64 and not self._closed:
            self._free.append(chan)
        else:
            chan.close()

    def _encode_error(self, err: dict) -> bytes:
        return encode("error", self._secret, error=err)

    def _handle(self, data: bytes, chan: _Chan, pipe: Any) -> bytes | None:
        """One request -> its reply, or None when the request is parked."""
        try:
            if len(data) > self.max_message_size:
                raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {self.max_message_size}")
            msg = decode(data, self._secret)
            handler = getattr(self, "_op_" + msg["op"], None)
            if handler is None:
                raise ProtocolError(f"op {msg['op']!r} is not a request the plane serves")
            return handler(msg, chan, pipe)
        except AuthenticationError as e:
            kind, err = "auth", _error("auth", "AuthenticationError", str(e))
        except ProtocolError as e:
            kind, err = "protocol", _error("protocol", "ProtocolError", str(e))
        except Exception as e:
            logger.exception("internal error while serving a request")
            kind, err = "internal", _error("internal", type(e).__name__, str(e))
        with self._lock:
            self._errors[kind] += 1
        return self._encode_error(err)

    # -- client ops ------------------------------------------------------------

    def _known(self, name: str) -> dict | None:
        """The defaults of a task that will run, or None (lock held).  With
        subworkers connected, they run everything, so only their tasks count."""
        if self._workers:
            return self._catalog.get(name)
        spec = _registry.get(name)
        return None if spec is None else spec.defaults()

    def _op_submit(self, msg: dict, chan: _Chan, pipe: Any) -> bytes:
        rejected = []
        sends: list = []
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return self._encode_error(_error("unavailable", "PlaneUnavailable", "the plane is shutting down"))
            client = msg["client"]
            self._client(client, now)
            ready = 0
            for t in msg["tasks"]:
                tid = t["id"]
                if tid in self._tasks or tid in self.cache:
                    rejected.append({"id": tid, "error": _error("protocol", "ProtocolError", "duplicate task id")})
                    continue
                spec = self._known(t["name"])
                if spec is None:
                    err = _error(
                        "unknown_task", "UnknownTask", f"no plane or connected worker knows task {t['name']!r}"
                    )
                    rejected.append({"id": tid, "error": err})
                    continue
                retries = t.get("retries")
                task = _Task(
                    t,
                    _RANK[t.get("priority") or spec["priority"]],
                    spec["retries"] if retries is None else retries,
                    t.get("timeout") or spec["timeout"],
                    client,
                )
                self._tasks[tid] = task
                self._submitted += 1
                self._counts[QUEUED] += 1
                delay = t.get("delay")
                if delay:
                    self._schedule(task, delay, now)
                else:
                    self._queue.push(task)
                    ready += 1
            if ready:
                self._ready(ready, sends)
        self._send_all(sends)
        return encode("accepted", self._secret, plane=self.id, rejected=rejected)

    def _ready(self, n: int, sends: list) -> None:
        """``n`` tasks were queued: wake local runners or dispatch (lock held)."""
        if self._workers:
            self._dispatch(sends)
        else:
            self._work.notify(n)

    def _client(self, cid: str, now: float) -> _ClientState:
        cs = self._clients.get(cid)
        if cs is None:
            cs = self._clients[cid] = _ClientState(now)
        cs.seen = now
        return cs

    def _schedule(self, task: _Task, delay: float, now: float) -> None:
        """Queue a task after ``delay`` seconds (lock held)."""
        due = now + delay
        if not self._timers or due < self._timers[0][0]:
            self._tick.notify()
        heapq.heappush(self._timers, (due, next(self._timer_seq), task))
        self._scheduled += 1

    def _take_results(self, cs: _ClientState, closing: bool = False) -> bytes:
        """Encode as many of a client's waiting results as fit one message."""
        items, size = cs.outbox, 0
        for n, item in enumerate(items):
            size += len(item)
            if size > _BATCH_BYTES and n:
                cs.outbox = items[n:]
                items = items[:n]
                break
        else:
            cs.outbox = []
        extra = {"closing": True} if closing else {}
        return encode_batch("results", "results", items, self._secret, plane=self.id, **extra)

    def _op_poll(self, msg: dict, chan: _Chan, pipe: Any) -> bytes | None:
        wait = min(max(float(msg["wait"]), 0.0), 60.0)
        now = time.monotonic()
        with self._lock:
            cs = self._client(msg["client"], now)
            if cs.outbox or wait == 0 or self._stopping:
                return self._take_results(cs, closing=self._stopping)
            old, cs.poll, cs.deadline = cs.poll, chan, now + wait
        if old is not None:  # the client gave up on it; it has a new one now
            self._answer(old, self._no_results)
        return None

    def _fetch_reply(self, ids: list) -> bytes:
        """RESULT items (or the current state) of tasks by id (lock held)."""
        items = []
        for tid in ids:
            task = self._tasks.get(tid)
            if task is None:
                task = self.cache.get(tid)
            if task is None:
                items.append(_json_bytes({"id": tid, "state": "unknown"}))
            elif task.state in TERMINAL:
                items.append(task.item)
            else:
                items.append(_json_bytes({"id": tid, "state": task.state}))
        return encode_batch("results", "results", items, self._secret, plane=self.id)

    def _op_fetch(self, msg: dict, chan: _Chan, pipe: Any) -> bytes | None:
        ids = msg["ids"]
        wait = min(max(float(msg["wait"]), 0.0), 60.0)
        with self._lock:
            pending = [self._tasks[i] for i in ids if i in self._tasks]
            if not pending or wait == 0 or self._stopping:
                return self._fetch_reply(ids)
            fetch = _Fetch(chan, ids, time.monotonic() + wait)
            for task in pending:
                if task.watchers is None:
                    task.watchers = []
                task.watchers.append(fetch)
            self._fetches.add(fetch)
        return None

    def _op_status(self, msg: dict, chan: _Chan, pipe: Any) -> bytes:
        with self._lock:
            statuses = [self._status(tid) for tid in msg["ids"]]
        return encode("statuses", self._secret, statuses=statuses)

    def _status(self, tid: str) -> dict:
        task = self._tasks.get(tid) or self.cache.peek(tid)
        return {"id": tid, "state": "unknown"} if task is None else task.summary()

    def _op_cancel(self, msg: dict, chan: _Chan, pipe: Any) -> bytes:
        cancelled, sends = [], []
        with self._lock:
            for tid in msg["ids"]:
                task = self._tasks.get(tid)
                if task is None or task.state != QUEUED:
                    continue
                if not self._unschedule(task):
                    self._queue.discard(task)
                self._terminal(task, CANCELLED, encode_result(tid, CANCELLED), None, sends)
                cancelled.append(tid)
        self._send_all(sends)
        return encode("cancelled", self._secret, ids=cancelled)

    def _unschedule(self, task: _Task) -> bool:
        """Is the task waiting in the timer heap?  It is skipped there once it
        leaves the queued state (lock held)."""
        for entry in self._timers:
            if entry[2] is task:
                self._scheduled -= 1
                return True
        return False

    def _op_stats(self, msg: dict, chan: _Chan, pipe: Any) -> bytes:
        return encode("report", self._secret, stats=self.stats())

    def _op_hello(self, msg: dict, chan: _Chan, pipe: Any) -> bytes:
        with self._lock:
            names = sorted(self._catalog if self._workers else _registry)
        return encode(
            "welcome",
            self._secret,
            plane=self.id,
            version=__version__,
            events=self.events_address,
            heartbeat=self.heartbeat_address,
            tasks=names,
        )

    def _op_bye(self, msg: dict, chan: _Chan, pipe: Any) -> bytes:
        with self._lock:
            cs = self._clients.pop(msg["client"], None)
        if cs is not None and cs.poll is not None:
            self._answer(cs.poll, self._no_results)
        return encode("ok", self._secret)

    # -- subworkers --------------------------------------------------------------

    def _tasks_reply(self, items: list, **extra: Any) -> bytes:
        return encode_batch("tasks", "tasks", items, self._secret, plane=self.id, **extra)

    def _op_pull(self, msg: dict, chan: _Chan, pipe: Any) -> bytes | None:
        """A worker's request for work.  It carries the results of earlier
        tasks; the reply carries new tasks, as soon as there are any."""
        wid = msg["worker"]
        now = time.monotonic()
        sends: list = []
        with self._lock:
            w = self._workers.get(wid)
            if w is None:  # a new worker, or one this plane declared dead: register it
                self._late += len(msg["results"])
                info = msg.get("info")
                if not isinstance(info, dict) or self._stopping:
                    return self._tasks_reply([], register=not self._stopping)
                self._register(wid, info, pipe, now)
                return self._tasks_reply(
                    [], heartbeat=self.heartbeat_address, heartbeat_interval=self.heartbeat_timeout / 5
                )
            pipe_id = _nng.nng_pipe_id(pipe)
            if pipe_id != w.pipe_id:  # it reconnected: its old pipe's removal must not drop it
                self._pipe_workers.pop(w.pipe_id, None)
                w.pipe, w.pipe_id = pipe, pipe_id
                self._pipe_workers[pipe_id] = w
            w.last_seen = now
            for r in msg["results"]:
                task = w.in_flight.pop(r["id"], None)
                if task is None or task.state != RUNNING:
                    self._late += 1  # its worker was declared dead, or it was handed back
                    continue
                w.completed += 1
                self._settle(task, r["state"], _json_bytes(r), r.get("error"), sends)
            returned = msg.get("returned")
            if isinstance(returned, list):
                for tid in returned:
                    task = w.in_flight.pop(tid, None) if isinstance(tid, str) else None
                    if task is not None:
                        task.attempts -= 1  # it never ran to the end: not an attempt
                        self._requeue(task)
                        self._handed_back += 1
            credit = msg["credit"]
            w.credit = credit if credit >= 0 else 0
            # A worker keeps at most one request parked here.  Tasks go to the
            # parked one; a second request (it brought results) is answered
            # at once, or takes the parked one's place once that is answered.
            if w.pull is None:
                w.pull, w.pull_deadline = chan, now + PULL_WAIT
                chan = None
            self._dispatch(sends)
            if w.pull is None and chan is not None:
                w.pull, w.pull_deadline, chan = chan, now + PULL_WAIT, None
                self._dispatch(sends)
            if w.free() <= 0 or self._stopping:  # nothing to wait for: answer now
                if w.pull is not None:
                    sends.append((w.pull, self._no_tasks))
                    w.pull = None
            if chan is not None:
                sends.append((chan, self._no_tasks))
            if self._stopping and not w.in_flight:
                self._drained.notify_all()  # stop() waits for work in flight
        self._send_all(sends)
        return None

    def _register(self, wid: str, info: dict, pipe: Any, now: float) -> _WorkerState:
        """A new worker connected (lock held)."""
        w = _WorkerState(wid, info, pipe, now)
        w.turn = next(self._turns)
        self._workers[wid] = w
        self._pipe_workers[w.pipe_id] = w
        self._rebuild_catalog()
        logger.info("worker %s (%s, pid %s, %d slots) registered", w.name, w.host, w.pid, w.concurrency)
        return w

    def _rebuild_catalog(self) -> None:
        """The tasks the connected workers can run (lock held)."""
        self._catalog = {}
        for w in self._workers.values():
            for name, spec in w.tasks.items():
                self._catalog.setdefault(name, spec)

    def _dispatch(self, sends: list) -> None:
        """Hand queued tasks to workers with parked requests and free slots,
        each to the least-loaded worker that knows the task, and each worker
        its share in one message (lock held)."""
        if not self._queue or self._stopping:
            return
        ready = []  # heap of [load, turn, worker, free slots]
        for w in self._workers.values():
            if w.pull is not None:
                room = min(w.credit, w.concurrency) - len(w.in_flight)
                if room > 0:
                    ready.append([len(w.in_flight) / w.concurrency, w.turn, w, room])
        if not ready:
            return
        heapq.heapify(ready)
        batches: dict[_WorkerState, list] = {}
        skipped = []
        while ready and self._queue:
            task = self._queue.pop()
            passed = []
            while ready:
                entry = heapq.heappop(ready)
                if task.name in entry[2].tasks:
                    break
                passed.append(entry)
            else:
                entry = None
            for e in passed:
                heapq.heappush(ready, e)
            if entry is None:  # no free worker knows it: it waits for one
                skipped.append(task)
                if len(skipped) >= 64:
                    break
                continue
            w = entry[2]
            self._start(task, w.name, w.id)
            w.in_flight[task.id] = task
            batches.setdefault(w, []).append(task.wire())
            entry[3] -= 1
            if entry[3]:
                entry[0] = len(w.in_flight) / w.concurrency
                entry[1] = w.turn = next(self._turns)
                heapq.heappush(ready, entry)
        for task in skipped:
            self._queue.push(task, keep_seq=True)
        for w, items in batches.items():
            w.turn = next(self._turns)
            sends.append((w.pull, encode("tasks", self._secret, plane=self.id, tasks=items)))
            w.pull = None

    def _requeue(self, task: _Task) -> None:
        """Put a running task back at its place in the queue (lock held)."""
        self._counts[RUNNING] -= 1
        self._counts[QUEUED] += 1
        task.state = QUEUED
        task.assigned = None
        self._queue.push(task, keep_seq=True)
        self._requeued += 1

    def _drop_worker(self, w: _WorkerState, why: str, sends: list) -> None:
        """A worker is gone: requeue or fail what it was running (lock held)."""
        if self._workers.get(w.id) is not w:
            return
        del self._workers[w.id]
        self._pipe_workers.pop(w.pipe_id, None)
        self._rebuild_catalog()
        self._workers_lost += 1
        if w.pull is not None:
            sends.append((w.pull, self._tasks_reply([], register=True)))
            w.pull = None
        lost = list(w.in_flight.values())
        w.in_flight.clear()
        err = _error("lost", "WorkerLost", f"worker {w.name} was lost ({why}) while running the task")
        for task in lost:
            self._settle(task, FAILED, encode_result(task.id, FAILED, error=err), err, sends)
        logger.warning("worker %s lost (%s): %d task(s) in flight", w.name, why, len(lost))
        if not self._workers:
            self._work.notify_all()  # the plane runs tasks itself again
            self._drained.notify_all()
        self._dispatch(sends)

    def _watch_pipes(self) -> None:
        """Drop a worker the moment its connection closes."""
        while True:
            pipe_id = self._gone.get()
            if pipe_id is None:
                return
            sends: list = []
            with self._lock:
                w = self._pipe_workers.get(pipe_id)
                if w is not None:
                    self._drop_worker(w, "connection closed", sends)
            self._send_all(sends)

    def _heartbeats(self) -> None:
        """Receive workers' heartbeats (PUB/SUB): proof of life for workers
        whose connection stays up while they hang."""
        while not self._closed:
            try:
                data = self._hb.recv()
            except pynng.Timeout:
                continue
            except pynng.NNGException:
                return
            try:
                msg = decode(data, self._secret)
                if msg["op"] != "heartbeat":
                    raise ProtocolError("not a heartbeat")
            except FastworkerError as e:
                with self._lock:
                    self._errors["auth" if isinstance(e, AuthenticationError) else "protocol"] += 1
                continue
            wid = msg["worker"].get("id")
            with self._lock:
                w = self._workers.get(wid)
                if w is not None:
                    w.last_seen = time.monotonic()
                    w.last_heartbeat = time.time()

    # -- running and finishing tasks ------------------------------------------

    def _take_local(self) -> _Task | None:
        """The next task for a local runner, while no subworker is connected;
        None when the plane stops."""
        with self._lock:
            while not self._stopping and (self._workers or not self._queue or self._local_running >= self.concurrency):
                self._work.wait(1.0)
            if self._stopping:
                return None
            task = self._queue.pop()
            self._start(task, "plane", None)
            self._local_running += 1
            return task

    def _report_local(self, task: _Task, state: str, item: bytes, error: dict | None) -> None:
        sends: list = []
        with self._lock:
            self._local_running -= 1
            if self._stopping and not self._local_running:
                self._drained.notify_all()
            if self._queue and self._local_running == self.concurrency - 1:
                self._work.notify()  # a runner may wait for this slot (async tasks hold slots, not threads)
            if task.state == RUNNING:
                self._settle(task, state, item, error, sends)
        self._send_all(sends)

    def _start(self, task: _Task, worker: str, assigned: str | None) -> None:
        """Mark a task as running (lock held)."""
        self._counts[QUEUED] -= 1
        self._counts[RUNNING] += 1
        task.state = RUNNING
        task.attempts += 1
        task.started = time.time()
        task.worker = worker
        task.assigned = assigned

    def _settle(self, task: _Task, state: str, item: bytes, error: dict | None, sends: list) -> None:
        """Record the outcome of one run: retry it, or make it final (lock
        held; the task is running).  A task that raised waits 1 s, 2 s, 4 s ...
        before its next run; one whose worker was lost is requeued at once."""
        if state == FAILED and error and error.get("kind") in ("raised", "lost") and task.attempts <= task.retries:
            task.error = f"{error.get('type')}: {error.get('message')}"
            self._retried += 1
            if error["kind"] == "lost":
                self._requeue(task)
                self._ready(1, sends)
                return
            self._counts[RUNNING] -= 1
            self._counts[QUEUED] += 1
            task.state = QUEUED
            self._schedule(task, self.retry_backoff * 2 ** (task.attempts - 1), time.monotonic())
            return
        self._terminal(task, state, item, error, sends)

    def _terminal(self, task: _Task, state: str, item: bytes, error: dict | None, sends: list) -> None:
        """Give a task its final state and tell whoever waits (lock held);
        replies to send go to ``sends``."""
        self._counts[task.state] -= 1
        self._counts[state] += 1
        task.state = state
        task.finished = time.time()
        task.item = item
        if error is not None:
            task.error = f"{error.get('type')}: {error.get('message')}"
        del self._tasks[task.id]
        self.cache.put(task.id, task)
        self._recent.append(task)
        cs = self._clients.get(task.client)
        if cs is not None:
            cs.outbox.append(item)
            if cs.poll is not None:
                self._ripe.add(cs)  # answered once the whole batch is settled
        if task.watchers:
            for fetch in task.watchers:
                if fetch in self._fetches and not any(i in self._tasks for i in fetch.ids):
                    self._fetches.discard(fetch)
                    sends.append((fetch.chan, self._fetch_reply(fetch.ids)))
            task.watchers = None
        if self._subs:
            sends.append((None, task))

    def _send_all(self, sends: list) -> None:
        """Send replies collected under the lock; publish completion events.
        Clients' parked polls are answered here, after every result of the
        message at hand is in, so that they all travel in one reply."""
        if self._ripe:
            with self._lock:
                for cs in self._ripe:
                    if cs.poll is not None and cs.outbox:
                        sends.append((cs.poll, self._take_results(cs)))
                        cs.poll = None
                self._ripe.clear()
        events = []
        for chan, data in sends:
            if chan is None:
                events.append(data.summary())
            else:
                self._answer(chan, data)
        if events:
            try:
                self._pub.send(encode("events", self._secret, events=events))
            except pynng.NNGException:
                pass  # events are best effort

    def _count_subs(self, delta: int) -> None:
        with self._subs_lock:
            self._subs += delta

    # -- housekeeping -------------------------------------------------------

    def _housekeep(self) -> None:
        """Move due timers to the queue, answer expired parked requests, drop
        silent workers, reap the result cache, forget idle clients."""
        next_reap = time.monotonic() + self.reap_interval
        tick = min(1.0, self.heartbeat_timeout / 4)
        while True:
            sends: list = []
            silent: list = []
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                ready = 0
                while self._timers and self._timers[0][0] <= now:
                    task = heapq.heappop(self._timers)[2]
                    if task.state == QUEUED:
                        self._scheduled -= 1
                        self._queue.push(task)
                        ready += 1
                if ready:
                    self._ready(ready, sends)
                for cid, cs in list(self._clients.items()):
                    if cs.poll is not None:
                        if cs.deadline <= now:
                            sends.append((cs.poll, self._no_results))
                            cs.poll = None
                    elif now - cs.seen > CLIENT_IDLE_TTL:
                        del self._clients[cid]
                for fetch in [f for f in self._fetches if f.deadline <= now]:
                    self._fetches.discard(fetch)
                    sends.append((fetch.chan, self._fetch_reply(fetch.ids)))
                for w in list(self._workers.values()):
                    if now - w.last_seen > self.heartbeat_timeout:
                        self._drop_worker(w, f"no heartbeat for {now - w.last_seen:.1f} s", sends)
                        silent.append(w.pipe)
                    elif w.pull is not None and w.pull_deadline <= now:
                        sends.append((w.pull, self._no_tasks))
                        w.pull = None
                if now >= next_reap:
                    self.cache.reap()
                    next_reap = now + self.reap_interval
                if not sends and not silent:
                    wake = min(next_reap, now + tick)
                    if self._timers:
                        wake = min(wake, self._timers[0][0])
                    for w in self._workers.values():  # the moment the quietest worker times out
                        wake = min(wake, w.last_seen + self.heartbeat_timeout + 0.001)
                    self._tick.wait(max(0.0, wake - now))
                    continue
            self._send_all(sends)
            for pipe in silent:  # cut it off: if it wakes up, it registers afresh
                _nng.nng_pipe_close(pipe)

    # -- observing ------------------------------------------------------------

    def stats(self) -> dict:
        """Counts per state and priority, workers and the result cache."""
        with self._lock:
            counts = dict(self._counts)
            tasks = {"submitted": self._submitted, **counts, "retried": self._retried}
            queues = dict(zip(PRIORITIES, self._queue.counts, strict=True))
            errors = dict(self._errors)
            scheduled = self._scheduled
            clients = len(self._clients)
            local = {
                "concurrency": self.concurrency,
                "running": self._local_running,
                "abandoned": self._executor.abandoned,
            }
            workers = [w.summary() for w in self._workers.values()]
            dispatch = {
                "workers_lost": self._workers_lost,
                "requeued": self._requeued,
                "handed_back": self._handed_back,
                "late_results": self._late,
            }
        info = self.cache.info()
        return {
            "plane": {
                "id": self.id,
                "version": __version__,
                "address": self.address,
                "pid": os.getpid(),
                "uptime": round(time.time() - self._started_at, 3),
                "rss_mb": _memory()[0],
            },
            "tasks": tasks,
            "queues": queues,
            "scheduled": scheduled,
            "workers": workers,
            "dispatch": dispatch,
            "local": local,
            "cache": {
                "size": info.size,
                "max_size": info.max_size,
                "ttl": info.ttl,
                "hits": info.hits,
                "misses": info.misses,
                "evictions": info.evictions,
                "expired": info.expired,
            },
            "clients": clients,
            "errors": errors,
        }

    def tasks(self, limit: int = 50, state: str | None = None) -> list[dict]:
        """Recent tasks, newest first: running and queued ones, then finished."""
        out: list[dict] = []
        with self._lock:
            for task in itertools.chain(reversed(self._tasks.values()), reversed(self._recent)):
                if len(out) >= limit:
                    break
                if state is None or task.state == state:
                    out.append(task.summary())
        return out

    def task(self, task_id: str) -> dict | None:
        """The status of one task, or None if the plane does not know it."""
        with self._lock:
            status = self._status(task_id)
        return None if status["state"] == "unknown" else status


def _sibling_address(address: str, suffix: str) -> str:
    """Where the plane's extra sockets listen: the same host, any port."""
    scheme, rest = address.split("://", 1)
    if scheme in ("tcp", "tls+tcp", "ws"):
        host = rest.rsplit(":", 1)[0]
        return f"{scheme}://{host}:0"
    return f"{address}.{suffix}"


###############################################################################
# Subworker ####################################################################
###############################################################################


class Worker(_Role):
    """A subworker: runs tasks the plane sends it, to add capacity.

    ``Worker(...).start()`` runs in threads of this process (``stop()`` ends
    it; it is also a context manager); ``python fastworker.py worker`` runs
    one as a process.  It pulls work: the plane answers its requests with at
    most ``concurrency`` tasks in flight, results travel back on the next
    request, and heartbeats go out on PUB/SUB.  A worker whose plane goes
    away keeps trying and resumes when a plane answers at the same address.

    Args:
        plane: the plane's address.
        concurrency: tasks run at once: threads for plain functions, an event
            loop for ``async def`` tasks.
        name: shown in stats and the dashboard (default host-pid).
        secret: shared secret for message tags (default FASTWORKER_SECRET).
        overrun_margin: a task still running this many seconds after its time
            limit (already reported as TaskTimeout) sets ``replace``: its
            thread cannot be killed, so the process should be replaced
            (``python fastworker.py worker`` re-executes itself).
    """

    def __init__(
        self,
        plane: str = DEFAULT_ADDRESS,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        name: str | None = None,
        secret: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        overrun_margin: float = 1.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.plane = plane
        self.concurrency = concurrency
        self.host = socket.gethostname()
        self.name = name or f"{self.host}-{os.getpid()}"
        self.id = os.urandom(8).hex()
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.registered = threading.Event()  # set once a plane has accepted this worker
        self.replace = threading.Event()  # set when a task overran its limit by the margin
        self._secret = _secret_bytes(secret)
        self._lock = threading.Lock()  # guards the job lists, counters and flags below
        self._wake = threading.Condition(self._lock)  # lanes wait for something to send
        self._idle = threading.Condition(self._lock)  # stop() waits for running jobs
        self._beat = threading.Condition(self._lock)  # the heartbeat thread waits for its next beat
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # received, not started (None: stop)
        self._running: dict[str, _Job] = {}
        self._done: list[bytes] = []  # RESULT items not yet sent
        self._returned: list[str] = []  # ids of tasks handed back, not yet sent
        self._pulls = 0  # requests for work in flight (at most two)
        self._announce = False  # the credit changed: tell the plane
        self._plane_id: str | None = None
        self._registered = False
        self._draining = False  # take no more work
        self._stopped = False
        self._hb_address: str | None = None
        self._hb_interval = HEARTBEAT_INTERVAL
        self._sock: Any = None
        self._dialer: Any = None
        self._threads: list[threading.Thread] = []
        self._executor = _Executor(
            concurrency, self._take, self._report, max_message_size, on_overrun=self._overrun, margin=overrun_margin
        )

    def start(self) -> Worker:
        """Connect to the plane (in the background) and start working."""
        if self._sock is not None:
            raise RuntimeError("the worker is already started")
        _require_pynng()
        sock = pynng.Req0(recv_max_size=self.max_message_size + 65536)
        sock.resend_time = -1  # a resent request could run tasks twice
        sock.reconnect_time_min = 50
        sock.reconnect_time_max = 1000
        try:
            self._dialer = sock.dial(self.plane, block=False)
        except pynng.NNGException as e:
            sock.close()
            raise ValueError(f"cannot dial {self.plane!r}: {e}") from None
        self._sock = sock
        for target, name in ((self._lane, "lane"), (self._lane, "lane"), (self._heartbeat, "heartbeat")):
            t = threading.Thread(target=target, name=f"fastworker-worker-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._executor.start("fastworker-worker")
        logger.info("worker %s (%d slots) connecting to %s", self.name, self.concurrency, self.plane)
        return self

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop taking work, give running tasks ``grace`` seconds to finish,
        hand the rest back to the plane, and close."""
        with self._lock:
            if self._draining or self._sock is None:
                return
            self._draining = self._announce = True
            self._wake.notify_all()
            deadline = time.monotonic() + grace
            while self._running and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())
            self._stopped = True
            self._wake.notify_all()
            self._beat.notify_all()
            for _ in range(self.concurrency):
                self._inbox.put(None)  # wake every idle runner: nothing more comes
        # Idle runners exit at once; one still busy past the grace is left
        # behind (its task is handed back below, its result will be dropped).
        self._executor.join(time.monotonic() + 0.2)
        with self._lock:
            returned = self._returned + [job.id for job in self._drain_inbox()] + list(self._running)
            results, registered = self._done, self._registered
            self._running.clear()
            self._done, self._returned = [], []
        if registered and (results or returned):  # hand back what is left, briefly
            try:
                chan = _Chan(self._sock)
                try:
                    data = encode_batch(
                        "pull", "results", results, self._secret, worker=self.id, credit=0, returned=returned
                    )
                    chan.send(data, min(2.0, self.timeout))
                    chan.recv(min(2.0, self.timeout))
                finally:
                    chan.close()
            except pynng.NNGException:
                logger.warning("could not hand %d task(s) back to the plane", len(returned))
        self._sock.close()
        _join(self._threads, time.monotonic() + 2.0)
        logger.info("worker %s stopped", self.name)

    def _info(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "pid": os.getpid(),
            "concurrency": self.concurrency,
            "version": __version__,
            "tasks": {name: spec.defaults() for name, spec in _registry.items()},
        }

    # -- talking to the plane ---------------------------------------------------

    def _should_pull(self) -> bool:
        """Keep one request parked at the plane while there is room for work;
        send a second one when results or news wait (lock held)."""
        news = bool(self._done or self._returned or self._announce)
        if self._pulls == 0:
            return news or not self._draining
        return self._pulls == 1 and news

    def _lane(self) -> None:
        """Send a request for work carrying finished results; take the tasks
        the reply brings."""
        chan = _Chan(self._sock)
        try:
            while True:
                with self._lock:
                    while not self._stopped and not self._should_pull():
                        self._wake.wait(1.0)
                    if self._stopped:
                        return
                    results, returned = self._done, self._returned
                    self._done, self._returned = [], []
                    self._announce = False
                    self._pulls += 1
                    fields: dict[str, Any] = {"worker": self.id, "credit": 0 if self._draining else self.concurrency}
                    if not self._registered:
                        fields["info"] = self._info()
                    if returned:
                        fields["returned"] = returned
                reply = None
                hung = False
                try:
                    chan.send(encode_batch("pull", "results", results, self._secret, **fields), self.timeout)
                    try:
                        reply = decode(chan.recv(PULL_WAIT + self.timeout)[0], self._secret)
                    except pynng.Timeout:
                        hung = True
                except pynng.Closed:
                    return
                except (pynng.NNGException, FastworkerError) as e:
                    logger.debug("request for work failed: %s", e)
                if hung:  # the plane holds our request and says nothing: start afresh
                    logger.warning("the plane at %s stopped answering; reconnecting", self.plane)
                    self._redial()
                with self._lock:
                    self._pulls -= 1
                    if reply is not None and reply["op"] == "tasks":
                        self._accept(reply)
                        if self._draining:
                            self._idle.notify_all()
                    else:  # not delivered, or delivered to a plane that is gone: keep it for the next one
                        if reply is not None and reply["op"] == "error":
                            logger.error("the plane refused this worker: %s", reply["error"].get("message"))
                        self._done[:0] = results
                        self._returned[:0] = returned
                        self._registered = False
                        if not self._stopped:
                            self._wake.wait(0.1)  # brief pause: do not hammer a plane that is away
                    self._wake.notify()
        finally:
            chan.close()

    def _redial(self) -> None:
        """Close the connection and dial again, so the plane sees this worker
        go (and requeues what it had sent it) and then register anew."""
        try:
            self._dialer.close()
            self._dialer = self._sock.dial(self.plane, block=False)
        except pynng.NNGException as e:
            logger.warning("could not redial %s: %s", self.plane, e)

    def _accept(self, reply: dict) -> None:
        """Take a plane's reply (lock held)."""
        plane = reply["plane"]
        if plane != self._plane_id:
            if self._plane_id is not None:
                dropped = self._drain_inbox()
                logger.warning(
                    "the plane changed (%s -> %s): dropped %d queued job(s)", self._plane_id, plane, len(dropped)
                )
            self._plane_id = plane
        if reply.get("register"):
            self._registered = False
            return
        if "heartbeat" in reply:
            self._registered = True
            self._hb_address = reply["heartbeat"]
            interval = reply.get("heartbeat_interval")
            if _typed(interval, _NUM) and interval > 0:
                self._hb_interval = min(HEARTBEAT_INTERVAL, interval)
            self._beat.notify_all()  # announce ourselves on the new address now
            self.registered.set()
        for t in reply["tasks"]:
            job = _Job(t, plane)
            if self._draining:
                self._returned.append(job.id)  # hand it straight back
            else:
                self._inbox.put(job)

    def _heartbeat(self) -> None:
        """Publish this worker's state every interval (PUB/SUB, may be lost)."""
        pub, address = None, None
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    want, interval = self._hb_address, self._hb_interval
                    info = self._info()
                    info["in_flight"] = len(self._running) + self._inbox.qsize()
                if want != address:
                    if pub is not None:
                        pub.close()
                    pub, address = pynng.Pub0(), want
                    pub.dial(address, block=False)
                if pub is not None:
                    try:
                        pub.send(encode("heartbeat", self._secret, worker=info))
                    except pynng.NNGException:
                        pass
                with self._lock:
                    if not self._stopped:
                        self._beat.wait(interval)
        finally:
            if pub is not None:
                pub.close()

    # -- running tasks ------------------------------------------------------------

    def _take(self) -> _Job | None:
        while True:
            try:
                job = self._inbox.get(timeout=1.0)
            except queue.Empty:
                if self._draining:
                    return None
                continue
            with self._lock:
                if job is None or self._draining:
                    if job is not None:
                        self._returned.append(job.id)  # too late to start: hand it back
                    return None
                self._running[job.id] = job
                return job

    def _drain_inbox(self) -> list[_Job]:
        """Take every job not yet started (lock held)."""
        jobs = []
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)

    def _report(self, job: _Job, state: str, item: bytes, error: dict | None) -> None:
        with self._lock:
            if self._running.pop(job.id, None) is None or job.plane != self._plane_id:
                return  # handed back, or its plane is gone: nobody wants it
            self._done.append(item)
            self._wake.notify()  # a lane sends it
            if self._draining:
                self._idle.notify_all()

    def _overrun(self, job: _Job) -> None:
        logger.error(
            "task %s (%s) is still running %.1f s past its %g s limit; this worker process must be replaced",
            job.id,
            job.name,
            self._executor.margin,
            job.timeout,
        )
        self.replace.set()


###############################################################################
# Dashboard ####################################################################
###############################################################################

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fastworker</title><link rel="stylesheet" href="app.css"></head>
<body><header><h1>fastworker</h1><span id="plane"></span><span id="status"></span></header>
<section class="cards" id="cards"></section>
<h2>Queues</h2><table id="queues"></table>
<h2>Workers</h2><table id="workers"></table>
<h2>Recent tasks</h2><table id="tasks"></table>
<script src="app.js"></script></body></html>
"""

_CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
header{display:flex;gap:1em;align-items:baseline}h1{margin:0}#status{color:#888}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:7em}
.card b{display:block;font-size:1.6em}table{border-collapse:collapse;background:#fff;margin-bottom:1em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}.failed{color:#b00}.succeeded{color:#070}.cancelled{color:#888}
"""

# Every value reaches the page through textContent, never as HTML, so task
# names, arguments and error texts cannot inject markup.
_JS = """"use strict";
let last = null;
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach(r => {
    const row = el("tr");
    r.forEach((c, i) => row.appendChild(el("td", c, i === 2 && id === "tasks" ? c : "")));
    t.appendChild(row);
  });
}
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
async function refresh() {
  try {
    const [s, tasks] = await Promise.all([
      fetch("api/stats").then(r => r.json()),
      fetch("api/tasks?limit=50").then(r => r.json())]);
    const now = Date.now() / 1000, done = s.tasks.succeeded + s.tasks.failed;
    const rate = last ? (done - last.done) / (now - last.t) : 0;
    last = {done: done, t: now};
    const c = s.cache, reads = c.hits + c.misses;
    const cards = [["submitted", s.tasks.submitted], ["queued", s.tasks.queued],
      ["running", s.tasks.running], ["succeeded", s.tasks.succeeded], ["failed", s.tasks.failed],
      ["cancelled", s.tasks.cancelled], ["tasks/s", rate.toFixed(1)],
      ["cache", c.size + " / " + c.max_size],
      ["hit rate", reads ? (100 * c.hits / reads).toFixed(1) + " %" : "-"]];
    const box = document.getElementById("cards");
    box.replaceChildren();
    cards.forEach(([k, v]) => { const d = el("div", null, "card"); d.appendChild(el("b", v));
      d.appendChild(el("span", k)); box.appendChild(d); });
    document.getElementById("plane").textContent = s.plane.address + " (pid " + s.plane.pid + ")";
    table("queues", ["priority", "queued"], Object.entries(s.queues));
    table("workers", ["name", "host", "pid", "load", "in flight", "concurrency", "last heartbeat", "state"],
      s.workers.map(w => [w.name, w.host, w.pid, (100 * w.in_flight / w.concurrency).toFixed(0) + " %",
        w.in_flight, w.concurrency, when(w.last_heartbeat), w.state || "connected"]));
    table("tasks", ["id", "name", "state", "priority", "attempts", "worker", "submitted", "duration s", "error"],
      tasks.map(t => [t.id, t.name, t.state, t.priority, t.attempts, t.worker, when(t.submitted_at),
        t.duration === null ? "" : t.duration.toFixed(4), t.error]));
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("status").textContent = "plane unreachable";
  }
}
refresh();
setInterval(refresh, 1000);
"""

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _metrics(stats: dict) -> str:
    """The plane's statistics in the Prometheus text format."""
    lines = []

    def metric(name: str, kind: str, help: str, samples: list) -> None:
        lines.append(f"# HELP fastworker_{name} {help}")
        lines.append(f"# TYPE fastworker_{name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"fastworker_{name}{{{label}}} {value}" if label else f"fastworker_{name} {value}")

    t = stats["tasks"]
    metric("tasks_submitted_total", "counter", "Tasks accepted.", [({}, t["submitted"])])
    metric(
        "tasks_finished_total",
        "counter",
        "Tasks in a final state.",
        [({"state": s}, t[s]) for s in (SUCCEEDED, FAILED, CANCELLED)],
    )
    metric("tasks_retried_total", "counter", "Runs retried after a failure.", [({}, t["retried"])])
    metric("tasks", "gauge", "Tasks queued or running now.", [({"state": s}, t[s]) for s in (QUEUED, RUNNING)])
    metric(
        "queue_depth", "gauge", "Queued tasks per priority.", [({"priority": p}, n) for p, n in stats["queues"].items()]
    )
    metric("workers", "gauge", "Connected subworkers.", [({}, len(stats["workers"]))])
    c = stats["cache"]
    metric("cache_entries", "gauge", "Results in the cache.", [({}, c["size"])])
    for key in ("hits", "misses", "evictions", "expired"):
        metric(f"cache_{key}_total", "counter", f"Result cache {key}.", [({}, c[key])])
    metric(
        "errors_total",
        "counter",
        "Rejected or failed requests.",
        [({"kind": k}, n) for k, n in stats["errors"].items()],
    )
    return "\n".join(lines) + "\n"


@functools.cache
def _dashboard_handler() -> type:
    """The request handler class (http.server is imported on first use)."""
    import urllib.parse
    from http.server import BaseHTTPRequestHandler

    class _DashboardHandler(BaseHTTPRequestHandler):
        """Serves the page, the JSON API, /metrics and /healthz of one plane."""

        server_version = f"fastworker/{__version__}"
        plane: Plane  # set on the subclass made per server
        secret: bytes | None

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if path != "/healthz" and not self._authorized():
                return self._send(
                    401, b"authentication required\n", "text/plain", {"WWW-Authenticate": 'Basic realm="fastworker"'}
                )
            query = urllib.parse.parse_qs(url.query)
            plane = self.plane
            try:
                if path == "/":
                    return self._send(200, _PAGE.encode(), "text/html; charset=utf-8")
                if path == "/app.js":
                    return self._send(200, _JS.encode(), "text/javascript; charset=utf-8")
                if path == "/app.css":
                    return self._send(200, _CSS.encode(), "text/css; charset=utf-8")
                if path == "/healthz":
                    return self._json({"status": "ok"})
                if path == "/api/stats":
                    return self._json(plane.stats())
                if path == "/api/workers":
                    return self._json(plane.stats()["workers"])
                if path == "/api/tasks":
                    limit = int(query.get("limit", ["50"])[0])
                    state = query.get("state", [None])[0]
                    if not 0 <= limit <= 10_000 or (state is not None and state not in STATES):
                        raise ValueError("limit must be 0..10000 and state one of " + ", ".join(STATES))
                    return self._json(plane.tasks(limit, state))
                if path.startswith("/api/tasks/"):
                    status = plane.task(urllib.parse.unquote(path[len("/api/tasks/") :]))
                    if status is None:
                        return self._json({"error": "unknown task"}, 404)
                    return self._json(status)
                if path == "/metrics":
                    return self._send(200, _metrics(plane.stats()).encode(), "text/plain; version=0.0.4")
            except ValueError as e:
                return self._json({"error": str(e)}, 400)
            self._json({"error": "not found"}, 404)

        def _authorized(self) -> bool:
            if self.secret is None:
                return True
            auth = self.headers.get("Authorization", "")
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip().encode()
            elif scheme.lower() == "basic":
                import base64
                import binascii

                try:
                    given = base64.b64decode(value.strip()).partition(b":")[2]
                except (binascii.Error, ValueError):
                    return False
            else:
                return False
            return _same(given, self.secret)

        def _json(self, obj: Any, status: int = 200) -> None:
            self._send(status, _json_bytes(obj), "application/json")

        def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", _CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("dashboard: " + format, *args)

    return _DashboardHandler


def _start_dashboard(plane: Plane, bind: str, secret: bytes | None, insecure: bool) -> Any:
    from http.server import ThreadingHTTPServer

    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"dashboard address must be host:port, not {bind!r}")
    _check_exposure(f"tcp://{host}:{port}", secret, insecure, "dashboard")
    handler = type("DashboardHandler", (_dashboard_handler(),), {"plane": plane, "secret": secret})
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
    server.daemon_threads = True
    return server


###############################################################################
# Built-in tasks ###############################################################
###############################################################################


@task(name="fastworker.noop")
def _noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: for health checks and the benchmark."""


@task(name="fastworker.echo")
def _echo(value: Any = None) -> Any:
    """Returns its argument."""
    return value


@task(name="fastworker.sleep")
def _sleep(seconds: float) -> float:
    """Sleeps, then returns the seconds slept."""
    time.sleep(seconds)
    return seconds


def _demo_tasks() -> None:
    """The example tasks that ``python fastworker.py demo`` serves."""

    @task(name="demo.add")
    def add(x: float, y: float) -> float:
        return x + y

    @task(name="demo.slow")
    def slow(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @task(name="demo.fail")
    def fail(message: str = "this task always fails") -> None:
        raise ValueError(message)

    @task(name="demo.fib")
    def fib(n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a


###############################################################################
# Benchmark ####################################################################
###############################################################################


def _percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


def _spawn_role(argv: list[str], timeout: float = 30.0) -> tuple[Any, dict]:
    """Start ``python fastworker.py ARGV`` and wait for its ready line."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    box: list = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = box[0] if box else ""
    try:
        ready = json.loads(line)
    except ValueError:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(argv[:1])} did not start: {line!r}") from None
    return proc, ready


def _stop_role(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except Exception:
        proc.kill()
        proc.wait()


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of ``pids``)."""
    hz = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        ours = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            ours += int(stat[11]) + int(stat[12])
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0
    return busy / hz, ours / hz


def _progress(text: str) -> None:
    """The bench's progress display, on stderr."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
    elif text:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _bench_topology(workers: int, n: int, m: int, map_n: int, concurrency: int) -> dict:
    """Throughput, latency and memory with ``workers`` subworkers."""
    label = "plane only" if workers == 0 else f"{workers} worker" + ("s" if workers > 1 else "")
    _progress(f"{label}: starting")
    plane, ready = _spawn_role(["plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off"])
    procs = []
    try:
        plane_idle = _memory(plane.pid)[0]
        for _ in range(workers):
            argv = ["worker", "--plane", ready["listen"], "--concurrency", str(concurrency)]
            procs.append(_spawn_role(argv)[0])
        worker_idle = max((_memory(p.pid)[0] for p in procs), default=None)
        pids = [os.getpid(), plane.pid] + [p.pid for p in procs]
        with Client(ready["listen"]) as client:
            noop = "fastworker.noop"
            for f in [client.submit(noop) for _ in range(50)]:  # warm-up, as the peer harness does
                f.result(30)
            for _ in range(10):
                client.submit(noop).result(30)
            _progress(f"{label}: throughput, {n} tasks")
            busy0, ours0 = _cpu_seconds(pids)
            t0 = time.perf_counter()
            futs = [client.submit(noop) for _ in range(n)]
            for f in futs:
                f.result(60)
            elapsed = time.perf_counter() - t0
            busy1, ours1 = _cpu_seconds(pids)
            _progress(f"{label}: latency, {m} round trips")
            lat = []
            for _ in range(m):
                t = time.perf_counter()
                client.submit(noop).result(30)
                lat.append((time.perf_counter() - t) * 1000)
            lat.sort()
            row = {
                "topology": label,
                "workers": workers,
                "tasks": n,
                "tasks_per_s": round(n / elapsed),
                "p50_ms": round(_percentile(lat, 50), 3),
                "p99_ms": round(_percentile(lat, 99), 3),
                "foreign_cores": round(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / elapsed, 2),
            }
            if map_n:
                _progress(f"{label}: map over {map_n} items")
                t0 = time.perf_counter()
                count = sum(1 for _ in client.map("fastworker.echo", range(map_n)))
                row["map_items"] = count
                row["map_per_s"] = round(count / (time.perf_counter() - t0))
        row["plane_rss_mb"] = {"idle": plane_idle, "peak": _memory(plane.pid)[1]}
        if procs:
            row["worker_rss_mb"] = {"idle": worker_idle, "peak": max(_memory(p.pid)[1] for p in procs)}
    finally:
        for p in procs:
            _stop_role(p)
        _stop_role(plane)
        _progress("")
    return row


def _bench_queued(n: int) -> dict:
    """The plane's memory while ``n`` tasks wait in its queue."""
    _progress(f"queue: {n} tasks")
    plane, ready = _spawn_role(["plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off", "--concurrency", "1"])
    try:
        client = Client(ready["listen"], timeout=30)
        try:
            client.submit("fastworker.sleep", 60)  # holds the only slot
            for _ in range(n):
                client.submit("fastworker.noop")
            queued = client.stats()["tasks"]["queued"]
            rss = _memory(plane.pid)[0]
        finally:
            client.close()
    finally:
        _stop_role(plane)
        _progress("")
    return {"queued": queued, "plane_rss_mb": rss}


def _bench_balance(workers: int, n: int, concurrency: int) -> dict:
    """How evenly ``n`` short tasks spread over ``workers`` subworkers."""
    plane, ready = _spawn_role(["plane", "--listen", "tcp://127.0.0.1:0", "--dashboard", "off"])
    procs = []
    try:
        for i in range(workers):
            _progress(f"balance: starting worker {i + 1} of {workers}")
            argv = ["worker", "--plane", ready["listen"], "--concurrency", str(concurrency)]
            procs.append(_spawn_role(argv)[0])
        with Client(ready["listen"]) as client:
            _progress(f"balance: {n} tasks over {workers} workers")
            for f in [client.submit("fastworker.sleep", 0.001) for _ in range(n)]:
                f.result(120)
            done = [w["completed"] for w in client.stats()["workers"]]
    finally:
        for p in procs:
            _stop_role(p)
        _stop_role(plane)
        _progress("")
    mean = sum(done) / len(done)
    return {
        "workers": len(done),
        "tasks": n,
        "min": min(done),
        "max": max(done),
        "busiest_over_mean": round(max(done) / mean, 3),
    }


def bench(
    tasks: int = 2000,
    latency: int = 200,
    map_items: int = 100_000,
    workers: Iterable[int] = (0, 1, 2),
    concurrency: int = DEFAULT_CONCURRENCY,
    queued: int = 100_000,
    balance: int = 32,
    balance_tasks: int = 20_000,
) -> dict:
    """Measure like the peer harness: one client process, one ``submit()``
    per task; every role a process of its own on loopback."""
    result: dict[str, Any] = {"bench": [_bench_topology(w, tasks, latency, map_items, concurrency) for w in workers]}
    if queued:
        result["queued"] = _bench_queued(queued)
    if balance:
        result["balance"] = _bench_balance(balance, balance_tasks, concurrency)
    return result


###############################################################################
# Command line #################################################################
###############################################################################


_GRACE_HELP = "on SIGTERM/Ctrl-C, seconds running tasks get to finish"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_STOP = threading.Event()  # set by SIGTERM or SIGINT once _stop_event() installed the handlers


def _stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT (the handlers only set it).  Call it
    first from the main thread; later calls, from any thread, return it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _STOP.set())
        signal.signal(signal.SIGINT, lambda signum, frame: _STOP.set())
    return _STOP


def _trim_heap() -> None:
    """Hand the C heap's free memory back to the OS.  Python compiles this
    file from source when it runs as a script, and the compiler's freed
    memory (about 6 MB) otherwise stays with the process for its lifetime."""
    if sys.platform.startswith("linux"):
        gc.collect()  # the argument parser, for one, is a web of cycles
        try:
            import ctypes

            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


def _ready(role: str, **fields: Any) -> None:
    print(json.dumps({"event": "ready", "role": role, **fields}), flush=True)


def _wait(stop: threading.Event) -> None:
    while not stop.wait(1.0):
        pass


def _plane_from_args(args: argparse.Namespace, **overrides: Any) -> Plane:
    return Plane(
        overrides.get("listen", args.listen),
        dashboard=None if args.dashboard == "off" else args.dashboard,
        concurrency=args.concurrency,
        result_cache_size=args.result_cache_size,
        result_cache_ttl=args.result_cache_ttl,
        heartbeat_timeout=args.heartbeat_timeout,
        max_message_size=args.max_message_size,
        retry_backoff=args.retry_backoff,
        secret=args.secret,
        insecure=args.insecure,
    )


def _cmd_plane(args: argparse.Namespace) -> int:
    _import_tasks(args.tasks)
    plane = _plane_from_args(args)
    stop = _stop_event()
    plane.start()
    _trim_heap()
    _ready("plane", listen=plane.address, dashboard=plane.dashboard_url, events=plane.events_address, pid=os.getpid())
    _wait(stop)
    plane.stop(args.shutdown_grace)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    _import_tasks(args.tasks)
    worker = Worker(
        args.plane,
        concurrency=args.concurrency,
        name=args.name,
        secret=args.secret,
        timeout=args.timeout,
        overrun_margin=args.overrun_margin,
    )
    stop = _stop_event()
    worker.start()
    while not stop.is_set() and not worker.registered.wait(0.2):
        pass
    _trim_heap()
    if worker.registered.is_set():
        _ready(
            "worker", plane=args.plane, id=worker.id, name=worker.name, pid=os.getpid(), concurrency=args.concurrency
        )
    while not stop.is_set() and not worker.replace.is_set():
        stop.wait(0.2)
    worker.stop(args.shutdown_grace)
    if worker.replace.is_set() and not stop.is_set():
        # A task thread is stuck past its time limit and cannot be killed:
        # become a fresh process (same pid, same arguments) instead.
        logger.warning("worker %s replaces itself", worker.name)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return 0


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _cmd_submit(args: argparse.Namespace) -> int:
    kwargs = _parse_arg(args.kwargs) if args.kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError("--kwargs must be a JSON object")
    client = Client(args.plane, secret=args.secret, timeout=args.timeout)
    try:
        fut = client.submit_with(
            args.task,
            [_parse_arg(a) for a in args.args],
            kwargs,
            priority=args.priority,
            retries=args.retries,
            delay=args.delay,
        )
        if args.no_wait:
            client.close()  # sends it and waits for the plane to accept it
            if fut._plane is None:  # rejected, or the plane was unreachable
                raise fut.exception()
            print(fut.task_id, flush=True)
            return 0
        try:
            value = fut.result()
        except TaskError as e:
            print(f"fastworker submit: task {fut.task_id} failed: {e}", file=sys.stderr)
            if e.traceback:
                print(e.traceback.rstrip(), file=sys.stderr)
            return 1
        print(json.dumps(value), flush=True)
        return 0
    finally:
        client.close()


def _cmd_status(args: argparse.Namespace) -> int:
    with Client(args.plane, secret=args.secret, timeout=args.timeout) as client:
        out = client.status(args.task_id) if args.task_id else client.stats()
    print(json.dumps(out, indent=2), flush=True)
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C
    with Client(args.plane, secret=args.secret, timeout=args.timeout) as client:
        try:
            for event in client.events():
                print(json.dumps(event), flush=True)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _demo_tasks()
    stop = _stop_event()
    plane = _plane_from_args(args)
    try:
        plane.start()
    except (pynng.AddressInUse, OSError):  # the default ports are taken: pick free ones
        plane = _plane_from_args(args, listen=_sibling_address(args.listen, "plane"))
        if args.dashboard != "off":
            plane.dashboard = args.dashboard.rpartition(":")[0] + ":0"
        plane.start()
    _ready("demo", listen=plane.address, dashboard=plane.dashboard_url, pid=os.getpid())
    print(f"plane listening on {plane.address}")
    with Client(plane.address) as client:
        futs = [(p, client.submit_with("demo.add", (i, 100), priority=p)) for i, p in enumerate(PRIORITIES)]
        for p, fut in futs:
            print(f"  demo.add({PRIORITIES.index(p)}, 100) at priority {p:<8} -> {fut.result(30)}")
        print(f"  demo.fib(90) -> {client.submit('demo.fib', 90).result(30)}")
        try:
            client.submit("demo.fail").result(30)
        except TaskError as e:
            print(f"  demo.fail() -> TaskError {e}")
        for i in range(8):
            client.submit_with("demo.slow", (0.5 + i / 4,), priority=PRIORITIES[i % 4])
    if plane.dashboard_url:
        print(f"dashboard: {plane.dashboard_url}")
    print(f"try: python {sys.argv[0]} submit demo.add 2 3 --plane {plane.address}")
    print("serving; press Ctrl-C to stop", flush=True)
    _wait(stop)
    plane.stop(args.shutdown_grace)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    out = bench(
        args.tasks,
        args.latency,
        args.map,
        [int(w) for w in args.workers.split(",") if w.strip()],
        args.concurrency,
        args.queued,
        args.balance,
        args.balance_tasks,
    )
    head = ("topology", "tasks/s", "p50 ms", "p99 ms", "map/s", "plane MB idle/peak", "worker MB idle/peak", "foreign")
    print(" | ".join(head))
    print(" | ".join("-" * len(h) for h in head))
    for r in out["bench"]:
        mem = r["plane_rss_mb"], r.get("worker_rss_mb")
        cells = (
            r["topology"],
            r["tasks_per_s"],
            r["p50_ms"],
            r["p99_ms"],
            r.get("map_per_s", "-"),
            f"{mem[0]['idle']} / {mem[0]['peak']}",
            f"{mem[1]['idle']} / {mem[1]['peak']}" if mem[1] else "-",
            r["foreign_cores"],
        )
        print(" | ".join(str(c) for c in cells))
    if "queued" in out:
        q = out["queued"]
        print(f"plane with {q['queued']} queued tasks: {q['plane_rss_mb']} MB")
    if "balance" in out:
        b = out["balance"]
        print(
            f"dispatch over {b['workers']} workers ({b['tasks']} tasks): busiest {b['busiest_over_mean']}x "
            f"the mean (min {b['min']}, max {b['max']})"
        )
    print("(foreign: CPU cores used by other processes during the throughput run)")
    print(json.dumps(out), flush=True)
    return 0


def _build_parser() -> _Parser:
    parser = _Parser(prog="fastworker", description="A brokerless distributed task queue in one file.")
    parser.add_argument("--version", action="version", version=f"fastworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, level: str = "warning") -> None:
        p.add_argument("--secret", help="shared secret for message tags (default: $FASTWORKER_SECRET)")
        p.add_argument("--log-level", default=level, choices=["debug", "info", "warning", "error"])

    def client_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plane", default=DEFAULT_ADDRESS, help=f"the plane's address (default {DEFAULT_ADDRESS})")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to reach the plane")
        common(p)

    def plane_opts(p: argparse.ArgumentParser, listen: str, dashboard: str) -> None:
        p.add_argument("--listen", default=listen, help=f"address to listen on (default {listen})")
        p.add_argument(
            "--dashboard", default=dashboard, help=f"HOST:PORT of the dashboard, or off (default {dashboard})"
        )
        p.add_argument(
            "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="threads running tasks in the plane"
        )
        p.add_argument("--result-cache-size", type=int, default=DEFAULT_CACHE_SIZE, metavar="N")
        p.add_argument("--result-cache-ttl", type=float, default=DEFAULT_CACHE_TTL, metavar="SECONDS")
        p.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT, metavar="SECONDS")
        p.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE, metavar="BYTES")
        p.add_argument(
            "--retry-backoff",
            type=float,
            default=DEFAULT_RETRY_BACKOFF,
            metavar="SECONDS",
            help="first retry delay (doubles)",
        )
        p.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a secret")
        p.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE, metavar="SECONDS", help=_GRACE_HELP)
        common(p, "info")

    p = sub.add_parser("plane", help="run the control plane", description="Run the control plane.")
    plane_opts(p, DEFAULT_ADDRESS, DEFAULT_DASHBOARD)
    p.add_argument("--tasks", nargs="+", action="extend", default=[], metavar="MODULE", help="task modules to import")
    p.set_defaults(func=_cmd_plane)

    p = sub.add_parser("worker", help="run a subworker", description="Run a subworker that adds capacity to a plane.")
    p.add_argument("--plane", default=DEFAULT_ADDRESS, help=f"the plane's address (default {DEFAULT_ADDRESS})")
    p.add_argument("--tasks", nargs="+", action="extend", default=[], metavar="MODULE", help="task modules to import")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="tasks run at once")
    p.add_argument("--name", help="name shown in stats (default HOST-PID)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to reach the plane per attempt")
    p.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE, metavar="SECONDS", help=_GRACE_HELP)
    p.add_argument(
        "--overrun-margin",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="replace this process when a task runs this long past its time limit",
    )
    common(p, "info")
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser(
        "submit", help="submit a task and print its result", description="Submit a task; print its result as JSON."
    )
    p.add_argument("task", help="task name")
    p.add_argument("args", nargs="*", metavar="ARG", help="arguments, parsed as JSON where they parse")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    p.add_argument("--priority", choices=PRIORITIES)
    p.add_argument("--retries", type=int)
    p.add_argument("--delay", type=float, metavar="SECONDS")
    p.add_argument("--no-wait", action="store_true", help="print the task id instead of waiting")
    client_opts(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser(
        "status",
        help="print the plane's statistics or a task's status",
        description="Print the plane's statistics, or one task's status.",
    )
    p.add_argument("task_id", nargs="?", metavar="TASK_ID")
    client_opts(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "events",
        help="print completion events as JSON lines",
        description="Print completion events, one JSON line each.",
    )
    client_opts(p)
    p.set_defaults(func=_cmd_events)

    p = sub.add_parser(
        "demo",
        help="run a plane with example tasks",
        description="Run a plane and dashboard on loopback with example tasks.",
    )
    plane_opts(p, DEFAULT_ADDRESS, DEFAULT_DASHBOARD)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench", help="run the built-in benchmark", description="Measure throughput, latency and memory on loopback."
    )
    p.add_argument("--tasks", type=int, default=2000, help="no-op tasks for the throughput run (2000)")
    p.add_argument("--latency", type=int, default=200, help="sequential round trips (200)")
    p.add_argument("--map", type=int, default=100_000, metavar="N", help="time map() over N items (100000; 0: skip)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated subworker counts (0,1,2)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="slots per subworker (8)")
    p.add_argument("--queued", type=int, default=100_000, metavar="N", help="plane memory with N queued (0: skip)")
    p.add_argument("--balance", type=int, default=32, metavar="W", help="spread over W subworkers (32; 0: skip)")
    p.add_argument("--balance-tasks", type=int, default=20_000, metavar="N", help="tasks for the spread run")
    common(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python fastworker.py COMMAND ...``."""
    # A task module's "import fastworker" must find this very module, even
    # when it runs as __main__, so that both share one task registry.
    sys.modules.setdefault("fastworker", sys.modules[__name__])
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    errors: tuple = (FastworkerError, ValueError, OSError, ImportError, RuntimeError)
    if pynng is not None:
        errors += (pynng.NNGException,)
    try:
        return args.func(args)
    except errors as e:
        print(f"fastworker {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _script() -> None:
    """``python fastworker.py ...``.  Python keeps a script's syntax tree
    until the script's top level returns, about 7 MB for this file, so the
    long-running commands run on a thread of their own and the top level
    returns at once; the main thread then only receives signals."""
    sys.modules.setdefault("fastworker", sys.modules["__main__"])
    if len(sys.argv) < 2 or sys.argv[1] not in ("plane", "worker", "demo"):
        sys.exit(main())
    _stop_event()  # signal handlers can only be installed by the main thread

    def run() -> None:
        try:
            code = main()
        except SystemExit as e:  # --help and usage errors
            code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)

    threading.Thread(target=run, name="fastworker-main").start()


if __name__ == "__main__":
    _script()
