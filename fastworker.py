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
    "Cron",
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
    "TaskTooLarge",
    "ResultExpired",
    "ProtocolError",
    "JournalError",
    "AuthenticationError",
    "PlaneUnavailable",
    "AddressInUse",
    "QueueFull",
    "PRIORITIES",
    "TLSFiles",
    "derived_dashboard_token",
    "main",
]


###############################################################################
# Imports #####################################################################
###############################################################################

import argparse
import asyncio
import atexit
import collections
import concurrent.futures
import errno
import functools
import gc
import heapq
import importlib
import inspect
import itertools
import json
import linecache
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
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
# Constants and defaults ######################################################
###############################################################################

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_DASHBOARD = "127.0.0.1:8080"

#: Priority names, highest first.  A task's rank is its index here: the
#: dispatch heap pops the lowest rank first, so "critical" runs first.
PRIORITIES = ("critical", "high", "normal", "low")
_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}

#: Task states.  "scheduled": waiting for its time (a delay, a retry's backoff).
QUEUED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, CANCELLED = STATES = (
    "queued",
    "scheduled",
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
MIN_MESSAGE_SIZE = 65536  # the smallest --max-message-size any role takes
DEFAULT_TIMEOUT = 10.0  # seconds a client waits to reach the plane
DEFAULT_RETRY_BACKOFF = 1.0  # first retry delay; doubles on every attempt
HEARTBEAT_INTERVAL = 1.0
DEFAULT_HEARTBEAT_TIMEOUT = 5.0
POLL_WAIT = 5.0  # seconds the plane holds a client's empty result poll
PULL_WAIT = 10.0  # seconds the plane holds a worker's request for work
CLIENT_IDLE_TTL = 300.0  # forget a client that has not asked for anything for this long
OUTBOX_IDLE = 60.0  # a client that has not asked for this long keeps its undelivered results in the cache only
MAX_OUTBOX = 100_000  # undelivered results kept per client (past that the oldest go; it asks for them)
MAX_PARKED = 10_000  # client polls the plane holds at once...
MAX_PARKED_PER_CONN = 64  # ...and per connection
QUERY_CHUNK = 1000  # a long status or fetch request is done this many ids at a time...
CANCEL_CHUNK = 200  # ...and a cancel this many (each cancelled task settles: a few ms under the lock in all)
RECENT_TASKS = 500  # finished tasks remembered for the dashboard
MAX_RECENT = 10_000  # tasks one listing of recent tasks may ask for...
RECENT_SCAN = 50_000  # ...and how many it looks at, at most
WHY_IDS = 10  # a status request for at most this many tasks says why each one waits
MAX_RUNS_KEPT = 10  # failed runs of one task kept for its page (the newest)
MAX_TRACEBACK = 16 * 1024  # characters of a failed run's traceback kept for its page (the end)
MAX_NAMES = 1000  # task names the plane keeps figures for (more are counted under "(other)")
NAME_DURATIONS = 1000  # durations kept per task name for its percentiles (the newest)
SCHEDULE_FORGET = 12  # heartbeat timeouts after which a periodic task no one can run is forgotten
THROUGHPUT_WINDOW = 600  # seconds of finished-task counts kept for the dashboard's chart
SHUTDOWN_GRACE = 5.0  # seconds running tasks get to finish on stop
_BATCH_BYTES = 1024 * 1024  # a client sends at most this much per message
HEARTBEAT_MAX_SIZE = 64 * 1024  # bytes a heartbeat message may have

# Limits on what a task option or a wait may be (checked in one place).
MAX_RETRIES = 1000
MAX_TIMEOUT = 30 * 86400.0  # a month, in seconds
MAX_DELAY = 366 * 86400.0  # a year, in seconds
MAX_ETA = 1e11  # seconds since the epoch (the year 5138): an ETA past this is a mistake
MIN_EVERY = 0.05  # the shortest period of a periodic task, in seconds
MAX_WAIT = 60.0  # the longest a request is held at the plane
MAX_BACKOFF = 3600.0  # the longest pause before a retry
MAX_DEPTH = 64  # how deep a task's arguments may nest
MAX_IDS = 100_000  # task ids in one status, cancel or fetch request

RECONNECT_MIN_MS = 50  # a dialer's first pause before it redials...
RECONNECT_MAX_MS = 1000  # ...doubling up to this
RETRY_PAUSE = 0.1  # a worker's first pause after a failed request to its plane...
MAX_RETRY_PAUSE = 5.0  # ...doubling up to this
MAX_SLEEP = 5.0  # the housekeeper wakes at least this often (in case the clock jumps)
IDLE_WAKE = 5.0  # an idle thread waiting for work wakes this often to look again
FRESH_WINDOW = 1024  # with a secret: how far below a session's newest message an older one is still taken
FRESH_SESSIONS = 100_000  # with a secret: how many senders' sessions the plane keeps
DASHBOARD_TIMEOUT = 10.0  # seconds a dashboard connection may take to send its request
DASHBOARD_CONNECTIONS = 64  # dashboard connections served at once (more are closed)
LINGER = 1.0  # seconds a stopping plane waits for clients to collect their last results
ZERO_JOURNAL_DEPTH = 4  # with a journal, the plane's executor holds up to this many times its slots
JOURNAL_RETRY = 0.5  # seconds between attempts to commit to a journal that failed
_BATCH_MARGIN = 4096  # bytes of a message to a worker kept for its envelope
_NUM = (int, float)
_MAX_ID = 200  # characters in a task, client or worker id and a task name


###############################################################################
# Exceptions ##################################################################
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


class TaskTooLarge(TaskError):
    """The task (its arguments) is larger than every worker that runs it
    accepts (their ``--max-message-size``)."""


class UnknownTask(FastworkerError, LookupError):
    """No plane or connected worker knows the task name."""


class ResultExpired(FastworkerError, LookupError):
    """The plane's result cache no longer holds (or never held) this result."""


class ProtocolError(FastworkerError, ValueError):
    """A message broke the wire protocol."""

    stamp: tuple | None = None  # (session, number) of the signed message it was about, if known


class AuthenticationError(FastworkerError):
    """A message did not carry a valid tag for the shared secret."""


class PlaneUnavailable(FastworkerError, ConnectionError):
    """The plane could not be reached in time, or went away."""


class QueueFull(FastworkerError):
    """The plane holds as many waiting tasks as its ``--max-queued`` allows:
    the submission was refused at once (nothing accepted is ever dropped)."""


class AddressInUse(FastworkerError, OSError):
    """A plane cannot listen: another process has the address."""


class JournalError(FastworkerError):
    """The plane's journal file cannot be used (not a journal, corrupt,
    written by a newer version, in use by another plane) or written."""


# The "kind" of an error on the wire picks the exception the client raises:
# every kind the plane, a worker or the executor sends, and only those.
_ERROR_KINDS: dict[str, type[BaseException]] = {
    "raised": TaskError,  # the task raised
    "too_large": TaskTooLarge,  # no worker that can run it accepts a message that large
    "lost": WorkerLost,
    "timeout": TaskTimeout,
    "unknown_task": UnknownTask,
    "protocol": ProtocolError,
    "stale": ProtocolError,  # (a sender with a secret asks again with the new ticket: it never raises)
    "auth": AuthenticationError,
    "unavailable": PlaneUnavailable,
    "queue_full": QueueFull,
    "internal": FastworkerError,  # the plane could not handle a request (a defect, logged there)
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
# Utilities ###################################################################
###############################################################################

_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.loads


def _json_bytes(obj: Any) -> bytes:
    return _dumps(obj).encode()


def _percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


def _require_pynng() -> None:
    if pynng is None:
        raise RuntimeError("fastworker needs pynng: pip install pynng==0.9.0")


def _join(threads: Iterable[threading.Thread], deadline: float) -> None:
    """Wait for threads to end, all by one monotonic ``deadline`` (the
    calling thread, if among them, does not wait for itself)."""
    me = threading.current_thread()
    for t in threads:
        if t is not me:
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


def _check_size(max_message_size: Any) -> None:
    """The one check of ``max_message_size`` (every role: a worker's batches
    and a client's messages are planned against it)."""
    if type(max_message_size) is not int or not MIN_MESSAGE_SIZE <= max_message_size <= 2**31:
        raise ValueError(f"max_message_size must be a number of bytes from {MIN_MESSAGE_SIZE} to 2**31, "
                         f"not {max_message_size!r}")  # fmt: skip


def _check_address(address: str) -> None:
    if not isinstance(address, str) or "://" not in address:
        raise ValueError(f"address {address!r} has no scheme: write it like tcp://127.0.0.1:5555")


def _sibling_address(requested: str, real: str, offset: int, suffix: str) -> str:
    """Where one of the plane's extra sockets listens: on the host of its
    main address, at the port ``offset`` above it (so that an operator
    knows every port before the start), or at any port if the main one was
    asked for as port 0."""
    scheme, rest = real.split("://", 1)
    if scheme in ("tcp", "tls+tcp", "ws"):
        host, _, port = rest.rpartition(":")
        wanted = requested.rpartition(":")[2]
        if wanted == "0" or not port.isdigit() or int(port) + offset > 65535:
            return f"{scheme}://{host}:0"
        return f"{scheme}://{host}:{int(port) + offset}"
    return f"{real}.{suffix}"


def _any_port(address: str) -> str:
    """The same address at any free port."""
    scheme, rest = address.split("://", 1)
    return f"{scheme}://{rest.rpartition(':')[0]}:0" if ":" in rest else address


###############################################################################
# Time ########################################################################
###############################################################################


def _rate_interval(rate: Any) -> float | None:
    """Seconds between starts for a rate like "100/s" ("/m", "/h"), or None
    if it is not one."""
    if type(rate) is not str or len(rate) > 20:
        return None
    count, _, unit = rate.partition("/")
    seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip())
    if seconds is None or not count.strip().isdigit() or not 1 <= int(count) <= 1_000_000:
        return None
    return seconds / int(count)


def _epoch(when: Any) -> float:
    """Seconds since the epoch of an ETA: an aware datetime or a number.

    Raises:
        ValueError: a naive datetime (its time zone would be a guess), or neither.
    """
    if type(when) in _NUM:
        return when
    import datetime as dt

    if isinstance(when, dt.datetime):
        if when.utcoffset() is None:
            raise ValueError(f"eta must be an aware datetime (with a time zone), not the naive {when.isoformat()}")
        return when.timestamp()
    raise ValueError(f"eta must be an aware datetime or seconds since the epoch, not {when!r}")


# Cron: when a periodic task is due.  Standard five fields; wall-clock
# semantics in a time zone, so a daylight-saving change neither skips nor
# doubles a run: a wall time the change skips runs at the first minute that
# exists after it, one that occurs twice runs at its first occurrence only.

_CRON_FIELDS = (  # name, lowest, highest, names
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_CRON_HORIZON = 29 * 366  # days searched for the next match (a given day and weekday can be 28 years apart)


def _cron_field(text: str, name: str, lo: int, hi: int, names: tuple) -> frozenset:
    """The values one cron field allows ("*/15", "1-5,mon", ...)."""

    def value(v: str) -> int:
        v = v.lower()
        if v in names:
            return names.index(v) + (1 if name == "month" else 0)
        if not v.isdigit():
            raise ValueError(f"cron {name} field {text!r}: {v!r} is not a number{' or a name' if names else ''}")
        n = int(v)
        if not lo <= n <= hi:
            raise ValueError(f"cron {name} field {text!r}: {n} is out of range {lo}-{hi}")
        return n

    out: set[int] = set()
    for part in text.split(","):
        rng, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"cron {name} field {text!r}: the step {step_text!r} must be a whole number > 0")
            step = int(step_text)
        if rng == "*":
            first, last = lo, hi
        elif "-" in rng:
            a, _, b = rng.partition("-")
            first, last = value(a), value(b)
            if first > last:
                raise ValueError(f"cron {name} field {text!r}: the range {rng!r} runs backwards")
        elif rng:
            first = value(rng)
            last = hi if step_text else first
        else:
            raise ValueError(f"cron {name} field {text!r}: an empty item")
        out.update(range(first, last + 1, step))
    if name == "day of week" and 7 in out:  # Sunday is 0 or 7
        out = (out - {7}) | {0}
    return frozenset(out)


class Cron:
    """A cron schedule: ``Cron("*/15 9-17 * * mon-fri", tz="Europe/Paris")``.

    Five fields (minute, hour, day of month, month, day of week) with ``*``,
    lists, ranges, steps and month and weekday names (Sunday is 0 or 7); when
    both day fields are restricted, a day matching either runs (as Vixie
    cron does).  ``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and
    ``@yearly`` too.  ``tz`` is a zone name (default UTC): the fields are
    wall-clock times there.

    Raises:
        ValueError: the expression or the zone is not valid (naming the field).
    """

    def __init__(self, expression: str, tz: str | None = None) -> None:
        if type(expression) is not str:
            raise ValueError(f"a cron expression is a string, not {expression!r}")
        self.expression = expression
        self.tz = tz
        self._zone = _zone(tz)
        text = _CRON_MACROS.get(expression.strip().lower(), expression)
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(
                f"cron expression {expression!r} must have 5 fields (minute hour day-of-month month day-of-week), "
                f"not {len(fields)}"
            )
        self.minutes, self.hours, self.days, self.months, self.weekdays = (
            _cron_field(f, *spec) for f, spec in zip(fields, _CRON_FIELDS, strict=True)
        )
        self._sorted_minutes = sorted(self.minutes)
        self._sorted_hours = sorted(self.hours)
        # Vixie cron: a day field that starts with "*" does not restrict the day
        self._any_day = fields[2].startswith("*") or fields[4].startswith("*")
        import datetime as dt

        if self._next_day(dt.date(2000, 1, 1)) is None:
            raise ValueError(f"cron expression {expression!r} never matches a day")

    def __repr__(self) -> str:
        return f"Cron({self.expression!r}" + (f", tz={self.tz!r})" if self.tz else ")")

    def _day_ok(self, day: Any) -> bool:
        if day.month not in self.months:
            return False
        dom, dow = day.day in self.days, (day.isoweekday() % 7) in self.weekdays
        return (dom and dow) if self._any_day else (dom or dow)

    def _next_day(self, day: Any) -> Any:
        """The first day from ``day`` on that matches (None within the horizon)."""
        import datetime as dt

        for _ in range(_CRON_HORIZON):
            if self._day_ok(day):
                return day
            day += dt.timedelta(days=1)
        return None

    def next(self, after: Any) -> Any:
        """The first time strictly after ``after`` (an aware datetime) that
        the schedule runs, as an aware datetime in its zone."""
        import datetime as dt

        if not isinstance(after, dt.datetime) or after.utcoffset() is None:
            raise ValueError(f"Cron.next wants an aware datetime, not {after!r}")
        zone = self._zone
        local = after.astimezone(zone)
        day = local.date()
        start = (local.hour, local.minute)  # wall minutes before this one are past on the first day
        while True:
            found = self._next_day(day)
            if found is None:
                raise ValueError(f"cron expression {self.expression!r} has no run after {after.isoformat()}")
            if found != day:
                day, start = found, (0, 0)
            for hour in self._sorted_hours:
                if (hour, 59) < start:
                    continue
                for minute in self._sorted_minutes:
                    if (hour, minute) < start:
                        continue
                    when = _wall_instant(dt.datetime(day.year, day.month, day.day, hour, minute), zone)
                    if when > after:
                        return when
            day += dt.timedelta(days=1)
            start = (0, 0)


def _zone(tz: str | None) -> Any:
    """The tzinfo of a zone name (None: UTC)."""
    import datetime as dt

    if tz is None:
        return dt.timezone.utc
    if type(tz) is not str:
        raise ValueError(f"a time zone is a name such as 'Europe/Paris', not {tz!r}")
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {tz!r}: {e}") from None


def _wall_instant(wall: Any, zone: Any) -> Any:
    """The instant a wall-clock time (naive) first shows in ``zone``; for a
    time the zone skips (spring forward), the first minute after it that
    exists."""
    import datetime as dt

    while True:
        when = wall.replace(tzinfo=zone, fold=0)
        if when.astimezone(dt.timezone.utc).astimezone(zone).replace(tzinfo=None) == wall:
            return when
        wall += dt.timedelta(minutes=1)  # in a gap: the next wall minute may exist


#
# Everything the plane decides happens in its core, and only there.  The core
# has no sockets, no threads and no clock of its own.  The shell turns what
# happens (a request, a closed connection, a finished run, the time passing)
# into an event record (see the wire protocol) and calls
# ``PlaneCore.handle(event, now)``, which returns the actions to carry out,
# in order:
#
#   Reply(req, op, fields, items)  answer request ``req``; ``items`` are
#                                  encoded TASK or RESULT items, if any
#   Run(jobs)                      give jobs to the plane's own executor
#   Publish(events)                completion events for subscribers
#   Cut(conn)                      cut a silent worker's connection
#   Log(level, msg, args)          a line for the plane's log
#   Wake()                         the core's next deadline came sooner
#   Journal(records, counters)     (first, with a journal) what changed, to
#                                  commit before any other action is done
#
# ``now`` is an At: the wall clock (seconds since the epoch) for what belongs
# to the calendar (ETAs, periodic tasks) and for what people read (the times
# in a status); the monotonic clock for every deadline (heartbeats, parked
# requests, delays, retries' backoff, debounce, rates, the cache's time to
# live).  So a step of the wall clock moves the calendar and nothing else.
#
# The core is a façade over parts, each with its own state: the task table
# (every task, its state, its indices; the one place a task changes state),
# flow control, the workers, the waiters (clients and parked requests), the
# schedules and the figures.  A task moves through these states, and the
# table checks each move against _TRANSITIONS:
#
#   (new) -> queued | scheduled           (a restore also loads running ones)
#   scheduled -> queued (due) | scheduled (a debounce waits again) | cancelled
#   queued -> running (dispatched) | cancelled | failed (too large for every
#             worker that runs it)
#   running -> succeeded | failed | scheduled (a retry after its backoff)
#            | queued (its worker was lost and it has retries left, the
#              worker handed it back, or the plane's own run died with it)
#
# The plane's own executor is "worker zero": a worker like the others in
# the same dispatch, which runs the tasks no connected worker knows.  The
# accounting holds at every step:  submitted == queued + scheduled + running
# + succeeded + failed + cancelled.

At = collections.namedtuple("At", "wall mono")


###############################################################################
# Security ####################################################################
###############################################################################


def _check_exposure(address: str, secret: bytes | None, insecure: bool, what: str) -> None:
    """Refuse to listen beyond loopback without a secret (unless told to)."""
    if address.startswith(("ipc://", "inproc://", "abstract://")):
        return
    if not secret and not insecure and not _is_loopback(_host_of(address)):
        raise ValueError(
            f"refusing to serve the {what} on non-loopback address {address} without a "
            "secret: set --secret (or FASTWORKER_SECRET), use mutual TLS (--tls-ca), or pass --insecure"
        )


def _secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        secret = os.environ.get("FASTWORKER_SECRET") or None
    if isinstance(secret, str):
        secret = secret.encode()
    return secret or None


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


class _Session:
    """A sender's side of freshness, with a secret (see the table): its
    session id, the numbers of its messages, the ticket the plane gave it.
    Shared by the threads of one client or worker."""

    def __init__(self, secret: bytes | None) -> None:
        self.secret = secret
        self.id = os.urandom(8).hex()
        self._numbers = itertools.count(1)  # next() is atomic: threads share it
        self.ticket = ""  # the plane's, once it gave one

    def stamp(self) -> dict:
        """The fields that make one message fresh (none without a secret)."""
        if self.secret is None:
            return {}
        return {"s": self.id, "n": next(self._numbers), "b": self.ticket}

    def answers(self, reply: dict, stamp: dict) -> bool:
        """Does ``reply`` answer the message stamped ``stamp``?  False if the
        plane gave a new ticket instead (send it again).

        Raises:
            ProtocolError: it answers another request (a replay, or a man in
                the middle).
        """
        if self.secret is None:
            return True
        if reply.get("re") != [stamp["s"], stamp["n"]]:
            raise ProtocolError("a reply that does not answer this request (replayed or misrouted): dropped")
        if reply["op"] == "error" and reply["error"].get("kind") == "stale":
            self.ticket = reply.get("b") or ""
            return False
        return True


class TLSFiles(collections.namedtuple("TLSFiles", "cert key ca")):
    """PEM files for ``tls+tcp://`` addresses: this side's certificate and
    key, and the CA that signed the other side's.  The plane needs ``cert``
    and ``key``; given ``ca`` too, it wants a certificate signed by it from
    every client and worker (mutual TLS).  A client or worker needs ``ca``
    (to check the plane), and ``cert``/``key`` when the plane wants them."""

    __slots__ = ()

    def config(self, server: bool, address: str = "") -> Any:
        """A pynng TLSConfig (for the plane's side if ``server``).

        Raises:
            ValueError: a file is missing or unreadable, or one is lacking.
        """

        def read(path: str | None, what: str) -> str | None:
            if path is None:
                return None
            try:
                with open(path) as f:
                    return f.read()
            except OSError as e:
                raise ValueError(f"cannot read the TLS {what} {path}: {e.strerror}") from None

        T = pynng.TLSConfig
        if server:
            if not (self.cert and self.key):
                raise ValueError("a tls+tcp:// address needs --tls-cert and --tls-key")
            cfg = T(T.MODE_SERVER, own_cert_string=read(self.cert, "certificate"),
                    own_key_string=read(self.key, "key"), ca_string=read(self.ca, "CA"))  # fmt: skip
            # AUTH_MODE_NONE given to TLSConfig() is ignored by pynng 0.9.0: set it
            cfg.set_auth_mode(T.AUTH_MODE_REQUIRED if self.ca else T.AUTH_MODE_NONE)
            return cfg
        if not self.ca:
            raise ValueError("a tls+tcp:// address needs --tls-ca (the CA that signed the plane's certificate)")
        if bool(self.cert) != bool(self.key):
            raise ValueError("--tls-cert and --tls-key go together")
        cfg = T(T.MODE_CLIENT, server_name=_host_of(address), ca_string=read(self.ca, "CA"),
                own_cert_string=read(self.cert, "certificate"), own_key_string=read(self.key, "key"))  # fmt: skip
        cfg.set_auth_mode(T.AUTH_MODE_REQUIRED)
        return cfg


def _tls_for(address: str, tls: TLSFiles | None, server: bool) -> Any:
    """The TLS configuration a socket on ``address`` needs, or None."""
    if not address.startswith("tls+tcp://"):
        return None
    return (tls or TLSFiles(None, None, None)).config(server, address)


class _Freshness:
    """The plane's side of freshness (see the protocol table): the tickets
    of this boot and the message numbers each session has used.  A number is
    taken once, and only within ``window`` of the session's highest.  At
    most ``sessions`` sessions are kept: the one that came first is forgotten
    first, and with it every ticket up to its own, so that what it sent can
    never be taken again."""

    def __init__(self, boot: str, window: int = FRESH_WINDOW, sessions: int = FRESH_SESSIONS) -> None:
        self._boot = boot + "."
        self._window = window
        self._full = (1 << window) - 1
        self._max = sessions
        self._lock = threading.Lock()  # guards _seen, _issued and _floor
        self._seen: dict[str, list] = {}  # session -> [highest n, bits below it, its ticket's K] (oldest first)
        self._issued = 0  # the last ticket's K
        self._floor = 0  # tickets up to this K are no longer good

    def ticket(self) -> str:
        """A new ticket (for a "stale" error)."""
        with self._lock:
            self._issued += 1
            return f"{self._boot}{self._issued}"

    def take(self, session: str, n: int, ticket: Any) -> str:
        """Take message ``n`` of ``session``: "ok" if it is new and recent
        enough, under a good ticket; "stale" if the ticket is not (or no
        longer) good; "replay" if the number was taken or is too old."""
        if type(ticket) is not str or not ticket.startswith(self._boot):
            return "stale"
        k = ticket[len(self._boot) :]
        if not k.isdigit() or len(k) > 18:
            return "stale"
        k = int(k)
        with self._lock:
            if not self._floor < k <= self._issued:
                return "stale"
            entry = self._seen.get(session)
            if entry is None:
                self._seen[session] = [n, 1, k]
                while len(self._seen) > self._max:  # forget the oldest, and every ticket up to its newest
                    self._floor = max(self._floor, self._seen.pop(next(iter(self._seen)))[2])
                return "ok"
            high, bits = entry[0], entry[1]
            if n > high:
                shift = n - high
                entry[0], entry[1] = n, ((bits << shift) | 1) & self._full if shift < self._window else 1
            else:
                bit = 1 << (high - n)
                if high - n >= self._window or bits & bit:
                    return "replay"
                entry[1] = bits | bit
            if k > entry[2]:  # a new ticket: its place is now at the back
                entry[2] = k
                del self._seen[session]
                self._seen[session] = entry
            return "ok"


def derived_dashboard_token(secret: str | bytes) -> str:
    """The dashboard token a plane with this secret asks for when it is not
    given one: derived by a one-way function (HMAC-SHA256), so that knowing
    it (the dashboard may travel over plain HTTP) does not give the secret."""
    return _tag(_secret_bytes(secret) or b"", b"fastworker dashboard token").hex()[:32]


def _host_name(header: str) -> str:
    """The name part of a Host header ("[::1]:8080" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0]


###############################################################################
# Task options and registry ###################################################
###############################################################################


def _check_options(opts: Any, error: type[Exception] = ValueError) -> None:
    """The one validator of task options, wherever they come from: ``@task``,
    ``submit_with``, a TASK on the wire and a worker's task catalog.  Raises
    ``error`` (ValueError for the API, ProtocolError for the wire) naming the
    option.  Numbers must be finite and in range; booleans are not numbers."""

    def bad(name: str, rule: str, value: Any) -> Exception:
        what = f"task field {name!r}" if issubclass(error, ProtocolError) else name
        return error(f"{what} must be {rule}, not {value!r}"[:300])

    p = opts.get("priority")
    if p is not None and (type(p) is not str or p not in _RANK):
        raise bad("priority", f"one of {', '.join(PRIORITIES)}", p)
    for name in ("key", "tenant"):
        v = opts.get(name)
        if v is not None and (type(v) is not str or not 0 < len(v) <= _MAX_ID):
            raise bad(name, f"a string of 1 to {_MAX_ID} characters", v)
    for name in ("concurrency", "tenant_concurrency"):
        v = opts.get(name)
        if v is not None and (type(v) is not int or not 1 <= v <= 1_000_000):
            raise bad(name, "an integer from 1 to 1000000", v)
    rate = opts.get("rate")
    if rate is not None and _rate_interval(rate) is None:
        raise bad("rate", "a rate like '100/s', '10/m' or '500/h' (1 to 1000000 per unit)", rate)
    deb, deb_max = opts.get("debounce"), opts.get("debounce_max")
    for name, v in (("debounce", deb), ("debounce_max", deb_max)):
        if v is not None and (type(v) not in _NUM or not 0 < v <= MAX_DELAY):
            raise bad(name, f"a number of seconds > 0 and <= {MAX_DELAY:g}", v)
    if deb is not None and opts.get("key") is None:
        raise bad("debounce", "given with a key (debouncing groups the submissions of one key)", deb)
    if deb_max is not None and (deb is None or deb_max < deb):
        raise bad("debounce_max", "given with a debounce, and at least as long", deb_max)
    r = opts.get("retries")
    if r is not None and (type(r) is not int or not 0 <= r <= MAX_RETRIES):
        raise bad("retries", f"an integer from 0 to {MAX_RETRIES}", r)
    t = opts.get("timeout")
    if t is not None and (type(t) not in _NUM or not 0 < t <= MAX_TIMEOUT):
        raise bad("timeout", f"a number of seconds > 0 and <= {MAX_TIMEOUT:g}", t)
    d = opts.get("delay")
    if d is not None and (type(d) not in _NUM or not 0 <= d <= MAX_DELAY):
        raise bad("delay", f"a number of seconds >= 0 and <= {MAX_DELAY:g}", d)
    e = opts.get("eta")
    if e is not None:
        if type(e) not in _NUM or not 0 < e <= MAX_ETA:
            raise bad("eta", "a time in seconds since the epoch (a finite number > 0)", e)
        if d is not None:
            raise bad("eta", "given without a delay (one or the other)", e)
    every, cron, tz, overlap = opts.get("every"), opts.get("cron"), opts.get("tz"), opts.get("overlap")
    if every is not None and (type(every) not in _NUM or not MIN_EVERY <= every <= MAX_DELAY):
        raise bad("every", f"a number of seconds from {MIN_EVERY:g} to {MAX_DELAY:g}", every)
    if cron is not None:
        if every is not None:
            raise bad("cron", "given without 'every' (one or the other)", cron)
        try:
            Cron(cron, tz)
        except ValueError as x:
            raise error(str(x)[:300]) from None
    elif tz is not None:
        raise bad("tz", "given with a cron schedule only", tz)
    if overlap is not None and type(overlap) is not bool:
        raise bad("overlap", "True or False", overlap)


_FLOW_OPTIONS = ("key", "debounce", "debounce_max", "tenant", "concurrency", "rate", "tenant_concurrency")
_NO_FLOW: dict = {}
_NO_FLOW_VALUES = (None,) * len(_FLOW_OPTIONS)
_LIMITS = ("concurrency", "rate", "tenant_concurrency")  # a task name's limits, known to the plane


class TaskSpec:
    """A registered task: the function and its default options.

    ``options`` is what the plane needs to know of it (priority, retries,
    timeout, and a periodic task's schedule), validated by the same rules as
    every submission.
    """

    __slots__ = ("fn", "name", "options", "is_async", "_arity", "key", "debounce", "debounce_max")

    def __init__(
        self,
        fn: Callable,
        name: str,
        priority: str = "normal",
        retries: int = 0,
        timeout: float | None = None,
        schedule: dict | None = None,
        limits: dict | None = None,
        key: Callable[..., str] | None = None,
        debounce: float | None = None,
        debounce_max: float | None = None,
    ) -> None:
        if type(name) is not str or not 0 < len(name) <= _MAX_ID:
            raise ValueError(f"a task name must be a string of 1 to {_MAX_ID} characters, not {name!r}")
        self.options = {"priority": priority, "retries": retries, "timeout": timeout}
        given = {k: v for k, v in (schedule or {}).items() if v is not None}  # every | cron (+ tz), overlap
        if given:
            self.options.update(given)
            if "every" not in given and "cron" not in given:
                raise ValueError("'tz' and 'overlap' go with a periodic task ('every' or 'cron')")
        self.options.update({k: v for k, v in (limits or {}).items() if v is not None})
        _check_options(self.options)
        if key is not None and not callable(key):
            raise ValueError(f"key must be a function of the task's arguments that returns a string, not {key!r}")
        _check_options({"key": "k" if key else None, "debounce": debounce, "debounce_max": debounce_max})
        self.key, self.debounce, self.debounce_max = key, debounce, debounce_max
        self.fn = fn
        self.name = name
        self.is_async = inspect.iscoroutinefunction(fn)
        self._arity: tuple | None = None  # (fewest, most positional, needs keywords); worked out on first use

    def check_call(self, args: tuple | list, kwargs: dict | None) -> None:
        """Raise TypeError, naming the task, if its function cannot take
        these arguments.  Cheap for positional arguments: the common case
        compares two numbers."""
        if self._arity is None:
            try:
                sig = inspect.signature(self.fn)
            except (TypeError, ValueError):  # a builtin without a signature: the worker will tell
                self._arity = (0, None, False, None)
                return
            params = sig.parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            fewest = sum(1 for p in positional if p.default is p.empty)
            most = None if any(p.kind == p.VAR_POSITIONAL for p in params) else len(positional)
            needs_kw = any(p.kind == p.KEYWORD_ONLY and p.default is p.empty for p in params)
            self._arity = (fewest, most, needs_kw, sig)
        fewest, most, needs_kw, sig = self._arity
        if not kwargs and not needs_kw and fewest <= len(args) and (most is None or len(args) <= most):
            return
        if sig is None:
            return
        try:
            sig.bind(*args, **(kwargs or {}))
        except TypeError as e:
            raise TypeError(f"task {self.name!r} cannot take these arguments: {e} (its signature: {sig})") from None

    @property
    def priority(self) -> str:
        return self.options["priority"]

    @property
    def retries(self) -> int:
        return self.options["retries"]

    @property
    def timeout(self) -> float | None:
        return self.options["timeout"]

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
    every: float | None = None,
    cron: str | None = None,
    tz: str | None = None,
    overlap: bool | None = None,
    key: Callable[..., str] | None = None,
    debounce: float | None = None,
    debounce_max: float | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    tenant_concurrency: int | None = None,
) -> Any:
    """Register a function as a task, under its ``__name__`` or ``name``.

    Use it bare (``@task``) or with options (``@task(name=..., priority=...,
    retries=..., timeout=...)``).  The function is returned unchanged, so
    calling it still runs it locally; ``async def`` functions work too.

    A periodic task (it takes no arguments) gets ``every=SECONDS`` or
    ``cron="EXPR"`` (with ``tz="Europe/Paris"``, default UTC): the plane runs
    it at each due time, never two runs at once unless ``overlap=True``.

    Flow control: ``key(*args, **kwargs)`` gives each submission a key (a
    string): a submission whose key is taken by an unfinished task joins it
    (see ``Client.submit_with``), and with ``debounce=SECONDS`` waits that
    long for newer ones.  ``concurrency=N`` caps the runs of this task at
    once, over the plane and every worker; ``rate="100/s"`` ("/m", "/h")
    spaces their starts; ``tenant_concurrency=N`` caps one tenant's runs.

    Raises:
        ValueError: another function is already registered under the name,
            or an option is invalid.
    """

    def register(fn: Callable) -> Callable:
        schedule = {"every": every, "cron": cron, "tz": tz, "overlap": overlap}
        limits = {"concurrency": concurrency, "rate": rate, "tenant_concurrency": tenant_concurrency}
        spec = TaskSpec(fn, name or fn.__name__, priority, retries, timeout, schedule, limits, key, debounce,
                        debounce_max)  # fmt: skip
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


def _catalog_of(tasks: Any) -> dict[str, dict]:
    """A worker's announced task catalog, checked by the one validator.

    Raises:
        ProtocolError: it is not ``{name: {option: value}}`` with valid options.
    """
    if not isinstance(tasks, dict):
        raise ProtocolError("a worker's 'tasks' must be an object")
    out = {}
    for name, options in tasks.items():
        if not 0 < len(name) <= _MAX_ID or type(options) is not dict:
            raise ProtocolError(f"a worker's task {name[:_MAX_ID]!r} must have a short name and an options object")
        _check_options(options, ProtocolError)
        out[name] = {
            "priority": options.get("priority") or "normal",
            "retries": options.get("retries") or 0,
            "timeout": options.get("timeout"),
        }
        for key in ("every", "cron", "tz", "overlap", *_LIMITS):  # a periodic task's schedule, its limits
            if options.get(key) is not None:
                out[name][key] = options[key]
    return out


class _StartupError(Exception):
    """A role could not start for a reason the user must fix (one line)."""


def _import_tasks(modules: Iterable[str]) -> None:
    """Import task modules by name, from the current directory too.

    Raises:
        _StartupError: a module is missing or fails on import; the message
            names the module and, where it can, the file and line at fault.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:
            hint = ""
            if isinstance(e, ModuleNotFoundError) and name.endswith(".py"):
                hint = f" (give the module name, {name[:-3]!r}, not the file name)"
            where, text = "", str(e)
            if isinstance(e, SyntaxError) and e.filename:
                where, text = f" at {e.filename}:{e.lineno}", str(e.msg)
            elif e.__traceback__ is not None and not isinstance(e, ModuleNotFoundError):
                last = traceback.extract_tb(e.__traceback__)[-1]
                where = f" at {last.filename}:{last.lineno}"
            raise _StartupError(f"cannot import task module {name!r}: {type(e).__name__}: {text}{where}{hint}") from e


###############################################################################
# Wire protocol ###############################################################
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
#   results    plane -> client   plane:str, boot:str (new each time the plane
#                                process starts), results:[RESULT], resync?:bool
#                                (results were dropped: ask for them), closing?:bool,
#                                lost?:[[id, state]] (a closing plane's tasks
#                                of this client that will not finish)
#   fetch      client -> plane   ids:[str], wait:num    (results of any task)
#   status     client -> plane   ids:[str]
#   statuses   plane -> client   statuses:[{id, state, ...}]
#   cancel     client -> plane   ids:[str]
#   cancelled  plane -> client   ids:[str]              (those it cancelled)
#   purge      client -> plane   priority?:str          (cancel every queued task
#                                of that priority, or of all)
#   purged     plane -> client   count:int
#   recent     client -> plane   limit:int, state?:str, search?:str (recent
#                                tasks, newest first: answered with "statuses")
#   stats      client -> plane   -
#   report     plane -> client   stats:{...}            (as /api/stats)
#   hello      any -> plane      -
#   welcome    plane -> any      plane:str, version:str, events:str, heartbeats:str,
#                                tasks:[str]
#   bye        client -> plane   client:str
#   ok         plane -> client   -
#   pull       worker -> plane   worker:str, credit:int, results:[RESULT],
#                                info?:WORKER (to register), returned?:[str]
#                                (ids handed back unfinished), leaving?:bool
#                                (its last: it stops); held until there is
#                                work for the worker
#   tasks      plane -> worker   plane:str, tasks:[TASK], register?:bool (send
#                                info), heartbeat?:str, heartbeat_interval?:num
#   heartbeat  worker -> plane   worker:{id:str, ...}       (PUB/SUB)
#   events     plane -> any      events:[{id, name, state, ...}]  (PUB/SUB)
#   error      plane -> any      error:ERROR
#
#   TASK   = {id:str, name:str, args:list, kwargs:dict, priority?:str,
#             retries?:int, timeout?:num, delay?:num, run?:int}
#            (the plane numbers each run of a task it dispatches: "run")
#   RESULT = {id:str, state:"succeeded"|"failed"|"cancelled",
#             result?:any, error?:ERROR, run?:int}  (a fetch also
#             answers "queued", "scheduled", "running" or "unknown" for tasks
#             without a result; a worker's result names the run it is from)
#   ERROR  = {kind:str, type:str, message:str, traceback:str}
#   WORKER = {id, name, host, pid, concurrency, version, in_flight?,
#             tasks:{name: {priority?, retries?, timeout?}},
#             holding?:[str] (ids of the tasks it has and has not reported)}
#
# With a secret, messages are also fresh and bound.  Every request and
# heartbeat carries s:str (its sender's session), n:int (numbered from 1 in
# that session) and b:str (a ticket "BOOT.K" the plane gave the session: BOOT
# is new each time the plane process starts, K numbers the tickets of that
# boot; "" until the sender has one).  The plane takes each (s, n) once,
# only within a window below the highest n of the session, and only with a
# ticket of its own boot that is still good, so no recorded message is taken
# again, by it or by a restarted plane.  The plane keeps FRESH_SESSIONS
# sessions; forgetting one makes every ticket up to its K no longer good.
# Every reply carries re:[s, n] (the request it answers) and b (the boot);
# an "error" of kind "stale" carries a new ticket in b: send again with it.
# Events carry b and n (numbered by the plane).  All of it is under the tag.
#
# A malformed message, an unknown op or version, or a missing or mistyped
# field is a ProtocolError: a REQ/REP peer gets an "error" reply and the
# receiver counts it; PUB/SUB messages are counted and dropped.  A message
# whose tag is wrong is answered with an unsigned "error" of kind "auth", so
# that a client with no secret, or the wrong one, can read why.

PROTOCOL_VERSION = 2

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
    "purge": {},
    "purged": {"count": int},
    "recent": {"limit": int},
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
    eta: float | None = None,
    **flow: Any,
) -> bytes:
    """One TASK item.  ``flow`` holds the flow-control options (key,
    debounce, debounce_max, tenant, concurrency, rate, tenant_concurrency).
    Raises TypeError if an argument is not JSON-serializable and ValueError
    for a bad option."""
    task: dict[str, Any] = {"id": id, "name": name, "args": list(args), "kwargs": kwargs or {}}
    options = (("priority", priority), ("retries", retries), ("timeout", timeout), ("delay", delay), ("eta", eta))
    for key, value in options:
        if value is not None:
            task[key] = value
    for key, value in flow.items():
        if value is not None:
            if key not in _FLOW_OPTIONS:
                raise TypeError(f"unknown task option {key!r}")
            task[key] = value
    if len(task) > 4:
        _check_options(task)
    try:
        data = _json_bytes(task)
    except RecursionError:
        data = b""
    except TypeError:
        raise TypeError(_not_json(name, task["args"], task["kwargs"])) from None
    if not data or ((task["args"] or task["kwargs"]) and (_too_deep(task["args"]) or _too_deep(task["kwargs"]))):
        raise ValueError(f"the arguments of task {name!r} are nested more than {MAX_DEPTH} deep")
    return data


def _not_json(name: str, args: list, kwargs: dict) -> str:
    """Which argument of a task JSON cannot carry, and what to do."""
    where = [(f"argument {i + 1}", v) for i, v in enumerate(args)] + [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in where:
        try:
            _json_bytes(value)
        except (TypeError, ValueError, RecursionError) as e:
            return (f"{label} of task {name!r} cannot be sent: {e}; pass JSON values only (str, int, float, bool, "
                    "None, list, dict with str keys): convert it first, e.g. list(a_set) or a_datetime.isoformat()")  # fmt: skip
    return f"the arguments of task {name!r} cannot be sent as JSON"


def encode_result(id: str, state: str, result: Any = None, error: dict | None = None, run: int | None = None) -> bytes:
    """One RESULT item.  Raises TypeError/ValueError if ``result`` is not JSON."""
    if state == CANCELLED and error is None and run is None:  # (a cancel: its item is the same but for the id)
        return b'{"id":%s,"state":"cancelled"}' % _dumps(id).encode()
    r: dict[str, Any] = {"id": id, "state": state}
    if error is not None:
        r["error"] = error
    elif state == SUCCEEDED:
        r["result"] = result
    if run is not None:
        r["run"] = run
    return _json_bytes(r)


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
    if type(tid) is not str or not 0 < len(tid) <= _MAX_ID:
        raise ProtocolError("task field 'id' must be a non-empty string")
    if type(name) is not str or not 0 < len(name) <= _MAX_ID:
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
    if (args or kwargs) and (_too_deep(t["args"]) or _too_deep(t["kwargs"])):
        raise ProtocolError(f"task {tid!r}: its arguments are nested more than {MAX_DEPTH} deep")
    if len(t) > 4:  # options, or fields to ignore
        _check_options(t, ProtocolError)
        run = t.get("run")
        if run is not None and type(run) is not int:
            raise ProtocolError("task field 'run' must be an integer")
    return t


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Is a JSON value nested deeper than ``limit``?  (Deep values decode,
    but the plane cannot encode them again on every thread's stack.)"""
    todo = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if depth > limit:
            return True
        if type(v) is list:
            todo.extend((x, depth + 1) for x in v if type(x) is list or type(x) is dict)
        elif type(v) is dict:
            todo.extend((x, depth + 1) for x in v.values() if type(x) is list or type(x) is dict)
    return False


def _check_ids(ids: list) -> None:
    if len(ids) > MAX_IDS or not all(type(i) is str and len(i) <= _MAX_ID for i in ids):
        raise ProtocolError(f"'ids' must be a list of at most {MAX_IDS} task ids")


def _check_stamp(msg: dict) -> None:
    """The freshness fields, where present (see the table)."""
    s, n, b = msg.get("s"), msg.get("n"), msg.get("b")
    if s is not None and (type(s) is not str or not 0 < len(s) <= 64):
        raise ProtocolError("field 's' must be a session id")
    if n is not None and (type(n) is not int or not 0 < n < 2**62):
        raise ProtocolError("field 'n' must be a positive integer")
    if b is not None and (type(b) is not str or len(b) > 64):
        raise ProtocolError("field 'b' must be a boot id")
    re = msg.get("re")
    if re is not None and (type(re) is not list or len(re) != 2 or type(re[0]) is not str or type(re[1]) is not int):
        raise ProtocolError("field 're' must be [session, number]")


def _check_wait(msg: dict) -> None:
    w = msg["wait"]
    if not 0 <= w <= 86400:  # NaN and infinities fail too
        raise ProtocolError("field 'wait' must be a number of seconds from 0 to 86400")
    msg["wait"] = min(float(w), MAX_WAIT)


def decode(data: bytes, secret: bytes | None = None) -> dict:
    """Decode and validate one message.

    Raises:
        AuthenticationError: a secret is set and the tag is missing or wrong.
        ProtocolError: anything else that is not a valid message.
    """
    if secret is not None:
        tag, body = data[:_TAG], data[_TAG:]
        if len(tag) < _TAG or not _same(tag, _tag(secret, body)):
            raise AuthenticationError(_refusal(data) or "message has no valid tag for the shared secret")
        data = body
    try:
        msg = _loads(data)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON
        if len(data) > _TAG and data[_TAG : _TAG + 1] == b"{" and _is_json(data[_TAG:]):
            raise AuthenticationError(
                "the plane signs its messages: give this side its secret (--secret or FASTWORKER_SECRET)"
            ) from None
        raise ProtocolError(f"not a JSON message: {e}") from None
    if type(msg) is not dict:
        raise ProtocolError("a message must be a JSON object")
    try:
        return _validate(msg)
    except ProtocolError as e:
        s, n = msg.get("s"), msg.get("n")
        if secret is not None and type(s) is str and 0 < len(s) <= 64 and type(n) is int:
            e.stamp = (s, n)  # an authentic sender's message: its error reply is bound to it
        raise


def _validate(msg: dict) -> dict:
    """Every field of a decoded message, by type and range (see OPS)."""
    v = msg.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {v!r}")
    op = msg.get("op")
    fields = OPS.get(op) if type(op) is str else None
    if fields is None:
        raise ProtocolError(f"unknown op {op!r}")
    for name, kind in fields.items():
        if not _typed(msg.get(name), kind):
            raise ProtocolError(f"op {op!r}: field {name!r} missing or of the wrong type")
    if "s" in msg or "re" in msg:
        _check_stamp(msg)
    if op == "submit" or op == "tasks":
        if op == "submit" and not 0 < len(msg["client"]) <= _MAX_ID:
            raise ProtocolError("a client id is a string of 1 to 200 characters")
        for t in msg["tasks"]:
            _check_task(t)
    elif op in ("fetch", "status", "cancel", "cancelled"):
        _check_ids(msg["ids"])
        if op == "fetch":
            _check_wait(msg)
    elif op == "poll":
        _check_wait(msg)
        if not 0 < len(msg["client"]) <= _MAX_ID:
            raise ProtocolError("a client id is a string of 1 to 200 characters")
    elif op in ("results", "pull"):
        # a worker reports final states only; a fetch may find a task unfinished
        states = TERMINAL if op == "pull" else _FETCH_STATES
        for r in msg["results"]:
            if type(r) is not dict or type(r.get("id")) is not str or type(r.get("state")) is not str:
                raise ProtocolError("a result must be an object with 'id' and a valid 'state'")
            if r["state"] not in states:
                raise ProtocolError("a result must be an object with 'id' and a valid 'state'")
            run = r.get("run")
            if run is not None and type(run) is not int:
                raise ProtocolError("result field 'run' must be an integer")
        lost = msg.get("lost")
        if lost is not None and (
            type(lost) is not list or not all(type(x) is list and len(x) == 2 and type(x[0]) is str for x in lost)
        ):
            raise ProtocolError("field 'lost' must be a list of [task id, state]")
        if op == "pull":
            if not 0 < len(msg["worker"]) <= _MAX_ID or not 0 <= msg["credit"] <= 1_000_000:
                raise ProtocolError("a pull needs a worker id of 1 to 200 characters and a credit from 0")
            returned = msg.get("returned")
            if returned is not None and (type(returned) is not list or not all(type(i) is str for i in returned)):
                raise ProtocolError("field 'returned' must be a list of task ids")
            info = msg.get("info")
            if info is not None and type(info) is not dict:
                raise ProtocolError("field 'info' must be an object")
            if type(msg.get("leaving", False)) is not bool:
                raise ProtocolError("field 'leaving' must be true or false")
    elif op == "purge":
        if msg.get("priority") not in (None, *PRIORITIES):
            raise ProtocolError("field 'priority' must be one of " + ", ".join(PRIORITIES))
    elif op == "recent":
        state, search = msg.get("state"), msg.get("search")
        if not 0 <= msg["limit"] <= MAX_RECENT or state not in (None, *STATES):
            raise ProtocolError(f"a 'recent' needs a limit of 0 to {MAX_RECENT} and a state of " + ", ".join(STATES))
        if search is not None and (type(search) is not str or len(search) > _MAX_ID):
            raise ProtocolError("field 'search' must be a string of at most 200 characters")
    elif op == "statuses":
        for s in msg["statuses"]:
            if type(s) is not dict or type(s.get("id")) is not str or type(s.get("state")) is not str:
                raise ProtocolError("a status must be an object with an 'id' and a 'state'")
    elif op == "heartbeat":
        wid = msg["worker"].get("id")
        if type(wid) is not str or not 0 < len(wid) <= _MAX_ID:
            raise ProtocolError("a heartbeat's worker must have a string 'id'")
    return msg


def _is_json(data: bytes) -> bool:
    try:
        _loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def _refusal(data: bytes) -> str | None:
    """The text of an unsigned "auth" error (how a plane answers a message it
    could not verify), or None."""
    if data[:1] != b"{":
        return None
    try:
        msg = _loads(data)
        err = msg["error"]
        if msg["op"] == "error" and err["kind"] == "auth":
            return f"the plane refused this side's message: {err['message']} (check --secret)"[:500]
    except (ValueError, RecursionError, TypeError, KeyError):
        pass
    return None


def _aliased(item: bytes, tid: str, alias: str) -> bytes:
    """A RESULT item under another task id (for a submission that joined it)."""
    head = b'{"id":' + _json_bytes(tid)
    if item.startswith(head):
        return b'{"id":' + _json_bytes(alias) + item[len(head) :]
    r = _loads(item)
    r["id"] = alias
    return _json_bytes(r)


###############################################################################
# Wire protocol: the plane's events ###########################################
###############################################################################
# What happens to the plane, as records: the shell makes one of each request
# (request_event), of each closed connection, finished run and passing of
# time, and gives it to the plane's core (PlaneCore.handle).  ``req`` is the
# handle the shell answers a request on; ``conn`` the connection it came on.
Submit = collections.namedtuple("Submit", "req client tasks")
Poll = collections.namedtuple("Poll", "req conn client wait")
Fetch = collections.namedtuple("Fetch", "req conn ids wait")
Status = collections.namedtuple("Status", "req ids")
#: ``req`` None: a piece of a longer request, whose cancelled ids go ``into`` a list.
Cancel = collections.namedtuple("Cancel", "req ids into only_queued", defaults=(None, False))
Purge = collections.namedtuple("Purge", "req priority")  # (the shell cancels the queued ones in pieces)
Recent = collections.namedtuple("Recent", "req limit state search")
Stats = collections.namedtuple("Stats", "req shell", defaults=(None,))  # shell: what only the shell knows
Hello = collections.namedtuple("Hello", "req fields", defaults=(None,))
Bye = collections.namedtuple("Bye", "req client")
Pull = collections.namedtuple("Pull", "req conn worker credit results returned info leaving")
Answer = collections.namedtuple("Answer", "req op fields items")  # a reply the shell made in pieces
Heartbeat = collections.namedtuple("Heartbeat", "worker")
ConnClosed = collections.namedtuple("ConnClosed", "conn")
LocalDone = collections.namedtuple("LocalDone", "finished")  # runs of the plane's own executor
Tick = collections.namedtuple("Tick", ())  # time passed
TICK = Tick()
Stop = collections.namedtuple("Stop", ())  # take no more work
Close = collections.namedtuple("Close", ())  # say the last word to every client
Restore = collections.namedtuple("Restore", "saved")  # what a journal holds
Listening = collections.namedtuple("Listening", "heartbeats max_message_size")
Subscribed = collections.namedtuple("Subscribed", "delta")  # event subscribers came or went


def request_event(msg: dict, req: int, conn: int) -> Any:
    """The event a decoded, valid request is.

    Raises:
        ProtocolError: the op is not a request the plane serves.
    """
    op = msg["op"]
    if op == "submit":
        return Submit(req, msg["client"], msg["tasks"])
    if op == "poll":
        return Poll(req, conn, msg["client"], msg["wait"])
    if op == "pull":
        return Pull(req, conn, msg["worker"], msg["credit"], msg["results"], msg.get("returned") or [],
                    msg.get("info"), bool(msg.get("leaving")))  # fmt: skip
    if op == "fetch":
        return Fetch(req, conn, msg["ids"], msg["wait"])
    if op == "status":
        return Status(req, msg["ids"])
    if op == "cancel":
        return Cancel(req, msg["ids"])
    if op == "purge":
        return Purge(req, msg.get("priority"))
    if op == "recent":
        return Recent(req, msg["limit"], msg.get("state"), msg.get("search"))
    if op == "stats":
        return Stats(req)
    if op == "hello":
        return Hello(req)
    if op == "bye":
        return Bye(req, msg["client"])
    raise ProtocolError(f"op {op!r} is not a request the plane serves")


###############################################################################
# Data structures #############################################################
###############################################################################
#
# None of these is thread-safe: the plane's lock guards them all.


class _Task:
    """A task as the plane tracks it from submission to its final state.
    Its times for people (``submitted``, ``started``, ``finished``) are on
    the wall clock; ``t0`` (a run's start) and ``due`` of a delay or a
    retry are on the monotonic clock, an ETA's ``due`` on the wall clock."""

    __slots__ = ("id", "name", "args", "kwargs", "rank", "retries", "timeout", "client", "state", "attempts", "runs",
                 "submitted", "started", "finished", "t0", "took", "worker", "holder", "error", "watchers", "item",
                 "seq", "queued", "due", "on_wall", "timer", "wire", "crashes", "failures", "tenant", "key", "limits",
                 "blocked", "joined", "burst", "schedule")  # fmt: skip

    def __init__(self, t: dict, rank: int, retries: int, timeout: float | None, client: str, now: float) -> None:
        self.id = t["id"]
        self.name = t["name"]
        self.args = t["args"]
        self.kwargs = t["kwargs"]
        self.rank = rank
        self.retries = retries
        self.timeout = timeout
        self.client = client
        self.state = None  # set by the table's first move
        self.attempts = 0  # runs started (an attempt handed back unfinished does not count)
        self.runs = 0  # dispatches: a result must name the run it is from
        self.submitted = now  # (wall)
        self.started = None  # its last run's start (wall)
        self.finished = None  # (wall)
        self.t0 = None  # its last run's start (mono)
        self.took = None  # how long its last run took, once final
        self.worker = None  # name of the worker running or last running it
        self.holder = None  # the _WorkerState running it now
        self.error = None  # "Type: message" of the last failed attempt
        self.watchers = None  # parked "fetch" requests waiting for this task
        self.item = None  # the encoded RESULT, once final
        self.seq = None  # its place in the queue, kept when it is put back
        self.queued = False  # it has a live entry in the queue's heap
        self.due = None  # when a scheduled task comes due (on the clock ``on_wall`` says)
        self.on_wall = False  # its due time is an ETA, on the wall clock (else the monotonic one)
        self.timer = None  # its live entry in a timer heap
        self.wire = None  # the TASK item a worker receives, encoded once
        self.crashes = 0  # plane crashes it was running through (journal)
        self.failures = None  # its failed runs, oldest first (at most MAX_RUNS_KEPT): see detail()
        self.tenant = None  # whose turn it waits for in its priority (None: the untenanted line)
        self.key = None  # while it is unfinished, submissions with this key join it
        self.limits = None  # (concurrency, seconds between starts, per-tenant concurrency) or None: no limit
        self.blocked = None  # set aside by a limit while queued: "concurrency", "rate" or "tenant"
        self.joined = None  # id -> [client, cancelled] of the submissions that joined it (by its key)
        self.burst = None  # a debounced task: (its burst's first submission (mono), debounce, debounce_max)
        self.schedule = None  # the name of the periodic task it is a run of

    def wire_bytes(self) -> bytes:
        """The TASK item for a worker, without the run number."""
        if self.wire is None:
            t: dict[str, Any] = {"id": self.id, "name": self.name, "args": self.args, "kwargs": self.kwargs}
            if self.timeout is not None:
                t["timeout"] = self.timeout
            self.wire = _json_bytes(t)
        return self.wire

    def due_at(self, now: At) -> float | None:
        """When a scheduled task is due, by the wall clock (for people)."""
        if self.state != SCHEDULED or self.due is None:
            return None
        return self.due if self.on_wall else now.wall + (self.due - now.mono)

    def duration(self, now: At) -> float | None:
        if self.took is not None:
            return round(self.took, 6)
        if self.started is None:
            return None
        if self.finished is not None:
            return round(self.finished - self.started, 6)
        return round(now.mono - self.t0 if self.t0 is not None else now.wall - self.started, 6)

    def summary(self, now: At) -> dict:
        """What status() and the dashboard show."""
        return {"id": self.id, "name": self.name, "state": self.state, "priority": PRIORITIES[self.rank],
                "attempts": self.attempts, "worker": self.worker, "submitted_at": self.submitted,
                "started_at": self.started, "finished_at": self.finished, "due_at": self.due_at(now),
                "duration": self.duration(now), "error": self.error}  # fmt: skip

    def detail(self, now: At, show_args: bool) -> dict:
        """What a task's page shows: its summary, every run with worker,
        times and error (the last failure's traceback in full), and its
        arguments if the operator opted in."""
        out = self.summary(now)
        runs = [dict(f) for f in self.failures or ()]
        if self.started is not None and (self.state != FAILED or not runs or runs[-1]["started_at"] != self.started):
            end = self.finished if self.state in TERMINAL else None
            runs.append({"run": self.runs, "worker": self.worker, "started_at": self.started, "finished_at": end,
                         "state": self.state, "error": None, "traceback": None})  # fmt: skip
        out["runs"] = runs
        out["traceback"] = runs[-1]["traceback"] if runs and self.state == FAILED else None
        if show_args and self.args is not None:
            out["args"], out["kwargs"] = self.args, self.kwargs
        if self.schedule is not None:
            out["schedule"] = self.schedule
        return out


class _Job:
    """One run of a task, as the process that runs it sees it."""

    __slots__ = ("id", "name", "args", "kwargs", "timeout", "run", "plane", "rank", "seq", "started")

    def __init__(
        self,
        id: str,
        name: str,
        args: list,
        kwargs: dict,
        timeout: float | None,
        run: int | None,
        plane: str = "",
        rank: int = 0,
        seq: int = 0,
    ) -> None:
        self.id = id
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.run = run  # the plane's number for this run, sent back with the result
        self.plane = plane  # the plane that sent it
        self.rank, self.seq = rank, seq  # its place in the plane's queue
        self.started = 0.0  # time.monotonic() when a worker's runner took it


class _Line:
    """One tenant's queued tasks of one priority: a heap of ``(seq, task)``.
    A task taken out (cancelled) stays in the heap, marked, until it comes
    up; ``live`` counts the others."""

    __slots__ = ("heap", "live")

    def __init__(self) -> None:
        self.heap: list = []
        self.live = 0


class TaskQueue:
    """A dispatch queue: higher priority first; within a priority, the
    tenants take turns (round robin), and each tenant's tasks go first in,
    first out (tasks without a tenant are one more tenant, ``None``).

    Per priority and tenant a line: a heap of ``(seq, task)``; ``seq`` keeps
    submission order (tasks themselves are never compared).  Every change
    costs O(log n) whatever the order and the number of tenants: ``remove()``
    only marks a task (its entry is skipped when it comes up), and a line
    that removals empty is dropped at once while its place in the turns is
    passed over when it comes (a tenant that comes back waits for its turn
    at the end, as a new one does).  ``counts`` holds the live tasks per rank.
    """

    def __init__(self) -> None:
        self._lines: list[dict] = [{} for _ in PRIORITIES]  # rank -> {tenant: _Line}
        self._turns: list[collections.deque] = [collections.deque() for _ in PRIORITIES]  # (tenant, its line)
        self._seq = itertools.count()
        self.counts = [0] * len(PRIORITIES)

    def push(self, task: _Task, keep_seq: bool = False) -> None:
        """Queue a task; ``keep_seq`` puts it back where it was (a task handed
        back or whose worker died keeps its turn)."""
        if not keep_seq or task.seq is None:
            task.seq = next(self._seq)
        task.queued = True
        rank, tenant = task.rank, task.tenant
        lines = self._lines[rank]
        line = lines.get(tenant)
        if line is None:
            line = lines[tenant] = _Line()
            self._turns[rank].append((tenant, line))
        heapq.heappush(line.heap, (task.seq, task))
        line.live += 1
        self.counts[rank] += 1

    def _front(self, rank: int) -> _Line:
        """The line whose turn it is, in a priority with live tasks (the
        places of lines that removals emptied are passed over)."""
        turns, lines = self._turns[rank], self._lines[rank]
        while True:
            tenant, line = turns[0]
            if lines.get(tenant) is line:
                return line
            turns.popleft()

    def peek(self) -> _Task | None:
        """The task pop() would return."""
        for rank, n in enumerate(self.counts):
            if n:
                heap = self._front(rank).heap
                while not heap[0][1].queued:  # removed: skip it
                    heapq.heappop(heap)
                return heap[0][1]
        return None

    def pop(self) -> _Task | None:
        counts = self.counts
        for rank, n in enumerate(counts):
            if n:
                turns = self._turns[rank]
                line = self._front(rank)
                heap = line.heap
                task = heapq.heappop(heap)[1]
                while not task.queued:  # removed: skip it
                    task = heapq.heappop(heap)[1]
                task.queued = False
                counts[rank] = n - 1
                line.live -= 1
                if not line.live:
                    del self._lines[rank][turns.popleft()[0]]
                elif len(turns) > 1:
                    turns.rotate(-1)  # its next task waits for the other tenants' turns
                return task
        return None

    def remove(self, task: _Task) -> None:
        """Take a task out of the queue (its heap entry is skipped later)."""
        task.queued = False
        rank = task.rank
        self.counts[rank] -= 1
        lines = self._lines[rank]
        line = lines[task.tenant]
        line.live -= 1
        if not self.counts[rank]:  # the priority is empty: forget its lines and turns now
            lines.clear()
            self._turns[rank].clear()
        elif not line.live:  # (its place in the turns is passed over when it comes)
            del lines[task.tenant]
        elif len(line.heap) > 2 * line.live + 64:  # mostly dead entries: rebuild
            line.heap = [e for e in line.heap if e[1].queued]
            heapq.heapify(line.heap)

    def take(self, names: set | None = None) -> list[_Task]:
        """Take out every queued task (of these names), oldest first; their
        entries go too."""
        out = []
        for rank, lines in enumerate(self._lines):
            if not self.counts[rank]:
                continue
            for tenant, line in list(lines.items()):
                keep = []
                for entry in line.heap:
                    if entry[1].queued:
                        (out if names is None or entry[1].name in names else keep).append(entry)
                heapq.heapify(keep)
                line.heap, line.live = keep, len(keep)
                if not keep:
                    del lines[tenant]
            self.counts[rank] = sum(line.live for line in lines.values())
            if not self.counts[rank]:
                self._turns[rank].clear()
        out.sort(key=lambda entry: entry[0])
        tasks = [entry[1] for entry in out]
        for task in tasks:
            task.queued = False
        return tasks

    def ahead_of(self, task: _Task) -> tuple[int, int, int]:
        """The queued tasks that go before this one: of a higher priority; of
        its own, ahead in its tenant's line; and of its own, the other
        tenants' turns (round robin: up to one more than its own line)."""
        lines = self._lines[task.rank]
        own = lines.get(task.tenant)
        mine = 0 if own is None else sum(1 for seq, t in own.heap if t.queued and seq < task.seq)
        others = sum(min(line.live, mine + 1) for tenant, line in lines.items() if tenant != task.tenant)
        return sum(self.counts[: task.rank]), mine, others

    def __len__(self) -> int:
        return sum(self.counts)

    def __bool__(self) -> bool:
        return any(self.counts)


class DispatchQueue:
    """Every queued task, in lanes.  Tasks whose names the same slots can
    run share a lane (a ``TaskQueue``: priority, tenants' turns, first in
    first out); dispatch takes the most urgent task of the lanes that still
    have a free slot, so a task an idle slot can run never waits behind
    tasks only a busy worker can run, however many there are.  Where every
    worker knows every task there is one lane.

    ``runs_on(name)`` says which slots (a frozenset of worker ids, empty: no
    one) can run a name; when that changes (a worker came or went),
    ``regroup()`` moves each name's tasks to the lane of its slots.  One
    numbering (``seq``) runs through all lanes."""

    def __init__(self, runs_on: Callable[[str], frozenset]) -> None:
        self._runs_on = runs_on
        self._seq = itertools.count()
        self._lanes: dict[frozenset, TaskQueue] = {}  # slots -> their lane
        self._lane_of: dict[str, TaskQueue] = {}  # task name -> its lane
        self.counts = [0] * len(PRIORITIES)  # queued tasks per rank, over the lanes

    def lane(self, name: str) -> TaskQueue:
        lane = self._lane_of.get(name)
        if lane is None:
            slots = self._runs_on(name)
            lane = self._lanes.get(slots)
            if lane is None:
                lane = self._lanes[slots] = TaskQueue()
            self._lane_of[name] = lane
        return lane

    def push(self, task: _Task, keep_seq: bool = False) -> None:
        if not keep_seq or task.seq is None:
            task.seq = next(self._seq)
        self.lane(task.name).push(task, True)
        self.counts[task.rank] += 1

    def remove(self, task: _Task) -> None:
        self._lane_of[task.name].remove(task)
        self.counts[task.rank] -= 1

    def best(self, passed: Iterable[TaskQueue] = ()) -> TaskQueue | None:
        """The lane whose next task is the most urgent, of the lanes with
        tasks and slots that are not in ``passed``."""
        found, first = None, None
        for slots, lane in self._lanes.items():
            if not slots or not lane or lane in passed:
                continue
            if found is None:
                found = lane
                continue
            if first is None:
                first = found.peek()
            t = lane.peek()
            if (t.rank, t.seq) < (first.rank, first.seq):
                found, first = lane, t
        return found

    def pop(self, lane: TaskQueue) -> _Task:
        task = lane.pop()
        self.counts[task.rank] -= 1
        return task

    def regroup(self) -> None:
        """Which slots run some names changed: each name's tasks go to the
        lane of its slots now.  A lane whose names still share their slots
        is only relabelled; the tasks of the others move, in one pass over
        the lane, oldest first."""
        names_of: dict[TaskQueue, list[str]] = {}
        for name, lane in self._lane_of.items():
            names_of.setdefault(lane, []).append(name)
        self._lanes, self._lane_of = {}, {}
        for lane, names in names_of.items():
            groups: dict[frozenset, list[str]] = {}
            for name in names:
                groups.setdefault(self._runs_on(name), []).append(name)
            moving: dict[str, TaskQueue] = {}  # name -> the lane its tasks go to
            for k, (slots, group) in enumerate(sorted(groups.items(), key=lambda g: -len(g[1]))):
                target = self._lanes.get(slots)
                if target is None:
                    target = self._lanes[slots] = lane if k == 0 else TaskQueue()  # the largest group keeps the lane
                for name in group:
                    self._lane_of[name] = target
                    if target is not lane:
                        moving[name] = target
            if moving and lane:
                for task in lane.take(set(moving)):
                    moving[task.name].push(task, True)

    def ahead_of(self, task: _Task) -> tuple[int, int, int]:
        """See TaskQueue.ahead_of: the tasks that go first on its slots."""
        return self._lane_of[task.name].ahead_of(task)

    def resume_after(self, seq: int) -> None:
        self._seq = itertools.count(seq + 1)

    def __len__(self) -> int:
        return sum(self.counts)

    def __bool__(self) -> bool:
        return any(self.counts)


class TimerHeap:
    """Tasks waiting for a time (a delay, a retry's backoff), soonest first.

    Entries are ``(due, seq, task)``; a task taken out early (cancelled) is
    only marked, skipped when it comes up, and the heap is rebuilt once dead
    entries are the majority, so it does not stay referenced for long.
    """

    def __init__(self) -> None:
        self._heap: list = []
        self._seq = itertools.count()
        self.live = 0

    def push(self, task: _Task, due: float) -> bool:
        """Schedule a task; True if it is now the soonest."""
        task.due, task.timer = due, next(self._seq)
        heapq.heappush(self._heap, (due, task.timer, task))
        self.live += 1
        return self._heap[0][2] is task

    def remove(self, task: _Task) -> None:
        task.timer = None
        self.live -= 1
        if len(self._heap) > 2 * self.live + 64:
            self._heap = [e for e in self._heap if e[2].timer == e[1]]
            heapq.heapify(self._heap)

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].timer != heap[0][1]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[_Task]:
        """Take every task due at ``now``, soonest first."""
        due, heap = [], self._heap
        while heap and heap[0][0] <= now:
            _, seq, task = heapq.heappop(heap)
            if task.timer == seq:
                task.timer = None
                self.live -= 1
                due.append(task)
        return due

    def __len__(self) -> int:
        return self.live


CacheInfo = collections.namedtuple("CacheInfo", "hits misses evictions expired size max_size ttl")


class ResultCache:
    """An LRU of finished results with a time to live.

    ``OrderedDict`` in recency order: a read moves the entry to the end, an
    insert past ``max_size`` drops the oldest, and an entry older than ``ttl``
    seconds is gone whether it is read or swept by ``reap()``.  Times are
    passed in (``now``), from the plane's clock.
    """

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE, ttl: float = DEFAULT_CACHE_TTL) -> None:
        if max_size < 0 or ttl < 0:
            raise ValueError("result cache size and TTL must be >= 0")
        self.max_size = max_size
        self.ttl = ttl
        self._data: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = self.evictions = self.expired = 0
        self.dropped: list | None = None  # when a list: the (key, value) entries dropped, for whoever keeps a copy

    def put(self, key: str, value: Any, now: float) -> None:
        """Store ``value``; it expires ``ttl`` seconds after ``now``."""
        if self.max_size == 0:
            if self.dropped is not None:
                self.dropped.append((key, value))
            return
        data = self._data
        data[key] = (now + self.ttl, value)
        data.move_to_end(key)
        while len(data) > self.max_size:
            old, (_, value) = data.popitem(last=False)
            self.evictions += 1
            if self.dropped is not None:
                self.dropped.append((old, value))

    def get(self, key: str, now: float) -> Any:
        """The value, or None if it was never stored, was evicted or expired."""
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] <= now:
            del self._data[key]
            self.expired += 1
            self.misses += 1
            if self.dropped is not None:
                self.dropped.append((key, entry[1]))
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[1]

    def peek(self, key: str, now: float) -> Any:
        """Like get(), but neither counts nor refreshes recency."""
        entry = self._data.get(key)
        return None if entry is None or entry[0] <= now else entry[1]

    def __contains__(self, key: str) -> bool:
        return key in self._data  # expired but not yet reaped counts too

    def reap(self, now: float) -> int:
        """Drop every expired entry; returns how many."""
        dead = [(k, value) for k, (expires, value) in self._data.items() if expires <= now]
        for k, _ in dead:
            del self._data[k]
        self.expired += len(dead)
        if self.dropped is not None:
            self.dropped.extend(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._data)

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, self.evictions, self.expired, len(self._data), self.max_size, self.ttl)


###############################################################################
# Plane core: records and the task table ######################################
###############################################################################

Reply = collections.namedtuple("Reply", "req op fields items")
Run = collections.namedtuple("Run", "jobs")
Publish = collections.namedtuple("Publish", "events")
Cut = collections.namedtuple("Cut", "conn")
Log = collections.namedtuple("Log", "level msg args")
Wake = collections.namedtuple("Wake", ())
Journal = collections.namedtuple("Journal", "records counters")

_NOTHING: dict = {}  # the empty fields of a reply (shared, never changed)
_WAKE = Wake()

_TRANSITIONS: dict[str | None, frozenset] = {
    None: frozenset((QUEUED, SCHEDULED)),
    SCHEDULED: frozenset((QUEUED, SCHEDULED, CANCELLED)),
    QUEUED: frozenset((RUNNING, CANCELLED, FAILED)),
    RUNNING: frozenset((SUCCEEDED, FAILED, SCHEDULED, QUEUED)),
}
_LOADED = frozenset((QUEUED, SCHEDULED, RUNNING))  # what a restore takes a task back as


class _Actions:
    """The actions of the event at hand, which every part adds to."""

    __slots__ = ("acts", "events", "wake")

    def __init__(self) -> None:
        self.acts: list = []
        self.events: list[dict] = []  # completion events (published in one action)
        self.wake = False

    def reply(self, req: int, op: str, fields: dict = _NOTHING, items: list | None = None) -> None:
        self.acts.append(Reply(req, op, fields, items))

    def log(self, level: int, msg: str, *args: Any) -> None:
        self.acts.append(Log(level, msg, args))

    def take(self) -> list:
        """The actions so far, and a clean slate for the next event."""
        acts = self.acts
        if self.events:
            acts.append(Publish(self.events))
            self.events = []
        if self.wake:
            acts.append(_WAKE)
            self.wake = False
        self.acts = []
        return acts


class TaskTable:
    """Every task the plane knows: the unfinished ones by id, in submission
    order, with the counts per state and the indices of their states (the
    queue for queued tasks, the timers for scheduled ones: the monotonic
    clock's for delays and retries, the wall clock's for ETAs); the finished
    ones in the result cache; the ids of submissions that joined a task
    (aliases).  ``move()`` is the one place a task changes state: it checks
    the move against _TRANSITIONS, keeps the counts and indices, and tells
    each part in one line."""

    def __init__(self, core: PlaneCore, cache: ResultCache, journaling: bool) -> None:
        self.core = core
        self.tasks: dict[str, _Task] = {}
        self.counts = dict.fromkeys(STATES, 0)
        self.submitted = 0
        self.queue = DispatchQueue(core.workers.runs_on)
        self.timers = TimerHeap()  # on the monotonic clock
        self.calendar = TimerHeap()  # on the wall clock
        self.cache = cache
        self.aliases: dict[str, _Task] = {}  # id of a submission that joined a task -> that task
        self.journaling = journaling
        self.touched: dict[str, tuple] = {}  # with a journal: tasks the event at hand changed -> (task, new)

    def add(self, task: _Task) -> None:
        self.tasks[task.id] = task
        self.submitted += 1

    def find(self, tid: str, now: At) -> _Task | None:
        """A task by its id, or by the id of a submission that joined it."""
        task = self.tasks.get(tid) or self.cache.peek(tid, now.mono)
        if task is None:
            task = self.aliases.get(tid)
        return task

    def move(self, task: _Task, state: str, now: At, *, due: float = 0.0, worker: Any = None,
             keep_seq: bool = False, load: bool = False) -> None:  # fmt: skip
        """Move ``task`` to ``state`` (``due``: when a scheduled task comes
        due, on its clock; ``worker``: who runs it; ``keep_seq``: it goes back
        to its old place in the queue; ``load``: a restore takes it back).

        Raises:
            RuntimeError: the move is not in _TRANSITIONS (a defect).
        """
        old = task.state
        if state not in (_LOADED if load and old is None else _TRANSITIONS.get(old, ())):
            raise RuntimeError(f"task {task.id}: {old} -> {state} is not a move a task can make")
        counts = self.counts
        if old is not None:
            counts[old] -= 1
            if old == QUEUED and task.queued:  # not yet dispatched: cancelled, or failed
                self.queue.remove(task)
            elif old == SCHEDULED and task.timer is not None:  # not come due: cancelled, or waits anew
                (self.calendar if task.on_wall else self.timers).remove(task)
        counts[state] += 1
        task.state = state
        if state == QUEUED:
            self.queue.push(task, keep_seq or load)
        elif state == SCHEDULED and (self.calendar if task.on_wall else self.timers).push(task, due):
            self.core.out.wake = True  # it is now the soonest
        self.core.workers.moved(task, old, state, worker, now, load)  # who runs it
        self.core.flow.moved(task, old, state, now)  # the limits it counts against
        if state in TERMINAL:
            self._settle(task, now)
        if self.journaling and task.id not in self.touched:
            self.touched[task.id] = (task, old is None)

    def _settle(self, task: _Task, now: At) -> None:
        """A task reached its final state (``task.item`` holds its RESULT)."""
        task.finished = now.wall
        if task.t0 is not None:
            task.took = now.mono - task.t0
        del self.tasks[task.id]
        task.wire = None
        if not self.core.log_args:
            task.args = task.kwargs = None  # keep the outcome, not the input
        self.cache.put(task.id, task, now.mono)
        self.core.figures.settled(task, now)  # counts, per-name figures, recent tasks
        self.core.waiters.settled(task, now)  # its client and those that joined it get its result
        self.core.flow.settled(task)  # its key is free
        self.core.schedules.settled(task)  # a periodic run ended

    def outcome(self, task: _Task, state: str, item: bytes, error: Any, now: At) -> None:
        """The outcome of one run of a running task: retry it, or make it
        final.  A task that raised waits 1 s, 2 s, 4 s ... (from the retry
        backoff, on the monotonic clock) before its next run; one whose worker
        was lost is queued again at once, at its old place."""
        err = error if type(error) is dict else None
        figures = self.core.figures
        if err is not None:
            task.error = f"{err.get('type')}: {err.get('message')}"
            figures.failed_run(task, err, now)
        kind = err.get("kind") if err is not None else None
        if state == FAILED and kind in ("raised", "lost") and task.attempts <= task.retries:
            figures.counters["retried"] += 1
            if kind == "lost":
                figures.counters["requeued"] += 1
                self.move(task, QUEUED, now, keep_seq=True)
            else:
                backoff = self.core.retry_backoff * 2 ** min(task.attempts - 1, 30)
                task.on_wall = False
                self.move(task, SCHEDULED, now, due=now.mono + min(backoff, MAX_BACKOFF))
            return
        if state == SUCCEEDED:
            task.error = None  # an earlier attempt's error is history
        task.item = item
        self.move(task, state, now)

    def hand_back(self, task: _Task, now: At, counted: bool = True) -> None:
        """A running task goes back to its place in the queue without its
        run counting as an attempt (its worker handed it back, left, or the
        plane's own run was cut short)."""
        task.attempts -= 1
        if counted:
            self.core.figures.counters["handed_back"] += 1
        self.move(task, QUEUED, now, keep_seq=True)

    def run_again(self, task: _Task, now: At) -> None:
        """A run that died with the plane (a crash, or a stop past its grace)
        runs again, unless the task was running at two plane crashes already:
        then it fails, so that a task that crashes the plane cannot crash it
        for ever."""
        if task.crashes >= 2:
            self.fail(task, _error("lost", "WorkerLost", "the task was running when the plane crashed, twice; "
                                   "not run again"), now)  # fmt: skip
        else:
            self.hand_back(task, now, counted=False)

    def fail(self, task: _Task, err: dict, now: At) -> None:
        """Make a task final as failed with ``err`` (no run to blame)."""
        task.error = f"{err['type']}: {err['message']}"
        task.item = encode_result(task.id, FAILED, error=err)
        self.move(task, FAILED, now)

    def cancel(self, ids: list, now: At, states: tuple = (QUEUED, SCHEDULED)) -> list[str]:
        """Cancel those of ``ids`` that are in ``states``; the ids cancelled.
        The id of a submission that joined a task only stops waiting."""
        cancelled = []
        for tid in ids:
            task = self.tasks.get(tid)
            if task is not None and task.state in states:
                task.item = encode_result(tid, CANCELLED)
                self.move(task, CANCELLED, now)
                cancelled.append(tid)
            elif tid in self.aliases and self.aliases[tid].state in states and not self.aliases[tid].joined[tid][1]:
                leader = self.aliases[tid]
                client = leader.joined[tid][0]
                leader.joined[tid] = [client, True]  # (it stays known, as cancelled, while its task is)
                cs = self.core.waiters.clients.get(client)
                if cs is not None:  # its client learns, whoever cancelled it
                    self.core.waiters.post(cs, encode_result(tid, CANCELLED))
                if self.journaling:
                    self.touched[leader.id] = (leader, True)  # its body (who joined it) changed
                cancelled.append(tid)
        return cancelled

    def forget(self, dropped: list[_Task]) -> None:
        """Results the cache let go: the aliases of their tasks go too."""
        for task in dropped:
            for alias in task.joined or ():
                self.aliases.pop(alias, None)

    def due(self, now: At) -> list[_Task]:
        """The scheduled tasks whose time has come, on either clock."""
        return self.timers.pop_due(now.mono) + self.calendar.pop_due(now.wall)

    def next_due(self, now: At) -> float | None:
        """Seconds until the soonest scheduled task is due, or None."""
        soon = [d - n for d, n in ((self.timers.next_due(), now.mono), (self.calendar.next_due(), now.wall))
                if d is not None]  # fmt: skip
        return min(soon) if soon else None

    def due_wall(self, task: _Task, now: At) -> float | None:
        """When a scheduled task is due, by the wall clock (for people)."""
        if task.state != SCHEDULED or task.due is None:
            return None
        return task.due if task.on_wall else now.wall + (task.due - now.mono)

    # -- the journal's view -------------------------------------------------------

    def row(self, task: _Task, new: bool, now: At) -> list:
        """A journal record: the task's row (see _JOURNAL_SCHEMA) as it is
        now; its body (what it is, with its flow options) only if it is new
        or that changed.  Times on the monotonic clock are written as wall
        clock times."""
        body = None
        if new:
            flow = {}
            if task.tenant is not None:
                flow["tenant"] = task.tenant
            if task.key is not None:
                flow["key"] = task.key
            if task.limits is not None:
                flow["limits"] = list(task.limits)
            if task.joined:
                flow["joined"] = task.joined
            if task.burst is not None:
                first, debounce, longest = task.burst
                flow["burst"] = [now.wall + first - now.mono, debounce, longest]
            if task.schedule is not None:
                flow["schedule"] = task.schedule
            body = [task.name, task.args, task.kwargs, task.rank, task.retries, task.timeout, task.client,
                    task.submitted, flow]  # fmt: skip
        due = self.due_wall(task, now)
        if due is not None and task.on_wall:
            due = -due  # (an ETA: negative, so that a restore puts it on the wall clock again)
        return [task.id, body, task.seq, task.state, task.attempts, task.runs, due, task.started, task.finished,
                task.worker, None if task.holder is None else task.holder.id, task.error, task.item, task.crashes]  # fmt: skip

    def records(self, now: At) -> list:
        """What the event at hand changed, for the journal: each task it
        touched once, as it is now, and the results the cache dropped."""
        records = [self.row(task, new, now) for task, new in self.touched.values()]
        self.touched.clear()
        return records

    def load(self, rows: list, now: At) -> tuple[list, list, int]:
        """Tasks from a journal's rows: (unfinished ones, finished ones, the
        highest queue number).  Malformed rows raise JournalError; nothing
        is taken in then."""
        unfinished, finished, last_seq = [], [], -1
        try:
            for row in rows:
                tid, body, seq, state, attempts, runs, due, started, ended, worker, holder, error, item, crashes = row
                body = _loads(body)
                name, args, kwargs, rank, retries, timeout, client, submitted = body[:8]
                flow = body[8] if len(body) > 8 else {}
                if state not in STATES or (seq is not None and type(seq) is not int) or not 0 <= rank < len(PRIORITIES):
                    raise ValueError(f"state {state!r}, seq {seq!r}, rank {rank!r}")
                if type(flow) is not dict:
                    raise ValueError(f"flow options {flow!r}")
                task = _Task({"id": tid, "name": name, "args": args, "kwargs": kwargs}, rank, retries, timeout,
                             client, submitted)  # fmt: skip
                task.seq, task.attempts, task.runs, task.crashes = seq, attempts, runs, crashes
                task.started, task.finished, task.worker, task.error = started, ended, worker, error
                task.tenant, task.key, task.schedule = flow.get("tenant"), flow.get("key"), flow.get("schedule")
                limits = flow.get("limits")
                task.limits = None if limits is None else tuple(limits)
                task.joined = flow.get("joined") or None
                burst = flow.get("burst")
                if burst is not None:
                    task.burst = (now.mono + burst[0] - now.wall, burst[1], burst[2])
                if state in TERMINAL:
                    if type(item) is not bytes:
                        raise ValueError("a final task without its result")
                    task.state, task.item, task.args, task.kwargs = state, item, None, None
                    if started is not None and ended is not None:
                        task.took = ended - started
                    finished.append(task)
                else:
                    if state == SCHEDULED:
                        if type(due) is not float:
                            raise ValueError("a scheduled task without its time")
                        if due < 0:  # an ETA: on the wall clock
                            task.on_wall, task.due = True, -due
                        else:  # a delay or a backoff: the same wait on this boot's monotonic clock
                            task.on_wall, task.due = False, now.mono + due - now.wall
                    unfinished.append((task, state, holder))
                if seq is not None:
                    last_seq = max(last_seq, seq)
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise JournalError(f"holds a malformed task row ({e})") from None
        return unfinished, finished, last_seq


###############################################################################
# Plane core: flow control ####################################################
###############################################################################
#: Where a limit holds tasks back: ("concurrency", name, None), ("tenant",
#: name, tenant) or ("rate", name, None).
Hold = collections.namedtuple("Hold", "kind name tenant")


class FlowControl:
    """What lets a task in and when it may start: keys (a submission whose
    key an unfinished task holds joins it), debounce (a keyed task waits for
    newer submissions), ``--max-queued``, and the limits that hold across
    every worker (concurrency, per-tenant concurrency, rate).  A task a
    limit holds back is set aside here, holding no slot, and goes back into
    the queue at its place when a run of its name ends or its rate lets it
    start."""

    def __init__(self, core: PlaneCore, max_queued: int | None) -> None:
        self.core = core
        self.max_queued = max_queued  # more tasks waiting (queued or scheduled) are refused: QueueFull
        self.keys: dict[tuple[str, str], _Task] = {}  # (name, key) -> its unfinished task
        self.running: collections.Counter = collections.Counter()  # name -> its limited runs going on
        self.running_tenant: collections.Counter = collections.Counter()  # (name, tenant) -> the same
        self.next_start: dict[str, float] = {}  # a rate-limited name -> the earliest its next run may start (mono)
        self.held: dict[Hold, list] = {}  # -> heap of (rank, order, task) set aside by that limit
        self.held_count = 0
        self._order = itertools.count()  # the order tasks were set aside in
        self.rate_wake: float | None = None  # the earliest a task held by its rate may start (mono)
        self.joined = 0  # submissions that joined an unfinished task of their key
        self.refused = 0  # submissions refused because the queue was full

    # -- letting tasks in ---------------------------------------------------------

    def full(self) -> bool:
        """Would one more waiting task be past ``--max-queued``?"""
        counts = self.core.table.counts
        return self.max_queued is not None and counts[QUEUED] + counts[SCHEDULED] >= self.max_queued

    @staticmethod
    def limits_of(t: dict, opts: dict) -> tuple | None:
        """A task's limits: (concurrency, seconds between starts, per-tenant
        concurrency) from its own options, else its name's defaults."""
        conc = t.get("concurrency") or opts.get("concurrency")
        rate = t.get("rate") or opts.get("rate")
        tenant_conc = t.get("tenant_concurrency") or opts.get("tenant_concurrency")
        if conc is None and rate is None and tenant_conc is None:
            return None
        return conc, None if rate is None else _rate_interval(rate), tenant_conc

    def keep(self, task: _Task, t: dict, due: tuple | None, now: At) -> tuple | None:
        """A new keyed task takes its key; debounced, it waits for newer
        submissions.  ``due`` is when it may be queued: ``(time, on the wall
        clock?)``, or None for now; the same comes back, later if debounced."""
        self.keys[task.name, task.key] = task
        debounce = t.get("debounce")
        if debounce is None:
            return due
        task.burst = (now.mono, debounce, t.get("debounce_max") or 10 * debounce)
        when = now.mono + debounce
        if due is not None:
            at, on_wall = due
            when = max(when, now.mono + at - now.wall if on_wall else at)
        return when, False

    def join(self, task: _Task, alias: str, t: dict, client: str, now: At) -> None:
        """A submission whose key ``task`` holds joins it: ``alias`` (its
        id) answers for the task and its client gets the task's result.  A
        debounced task that is still waiting takes the newer arguments and
        waits again (no later than its burst's limit)."""
        self.joined += 1
        if task.joined is None:
            task.joined = {}
        task.joined[alias] = [client, False]
        self.core.table.aliases[alias] = task
        if task.burst is not None and task.state == SCHEDULED and not task.attempts:
            first, debounce, longest = task.burst
            task.args, task.kwargs, task.wire = t["args"], t["kwargs"], None
            self.core.table.move(task, SCHEDULED, now, due=min(now.mono + debounce, first + longest))
        if self.core.table.journaling:
            self.core.table.touched[task.id] = (task, True)  # its arguments or its joined changed: its body again

    def submit(self, ev: Submit, now: At) -> None:
        """A client submits TASK items (validated): queue or schedule each,
        join it to the unfinished task of its key, or reject it (a duplicate
        id, an unknown name, a full queue); answer "accepted"."""
        core = self.core
        table, workers, out = core.table, core.workers, core.out
        if core.stopping:
            out.reply(ev.req, "error", {"error": _error("unavailable", "PlaneUnavailable", "the plane is stopping")})
            return
        cs = core.waiters.client(ev.client, now)
        rejected, joined = [], []
        for t in ev.tasks:
            tid = t["id"]
            known = table.tasks.get(tid) or table.cache.peek(tid, now.mono)
            if known is not None or tid in table.aliases:
                if known is None:  # (a joined submission sent again)
                    leader = table.aliases[tid]
                    client, cancelled = leader.joined[tid]
                    if client == ev.client:
                        if cancelled:
                            core.waiters.post(cs, encode_result(tid, CANCELLED))
                        elif leader.state in TERMINAL:
                            core.waiters.post(cs, _aliased(leader.item, leader.id, tid))
                        continue
                elif known.client == ev.client:  # sent again after its reply was lost
                    if known.state in TERMINAL:
                        core.waiters.post(cs, known.item)
                    continue
                rejected.append({"id": tid, "error": _error("protocol", "ProtocolError", "duplicate task id")})
                continue
            opts = workers.options_of(t["name"])
            if opts is None:
                err = _error("unknown_task", "UnknownTask", f"no plane or connected worker knows task {t['name']!r}")
                rejected.append({"id": tid, "error": err})
                continue
            plain = len(t) == 4  # no options: the common case, kept short
            key = None if plain else t.get("key")
            if key is not None:
                leader = self.keys.get((t["name"], key))
                if leader is not None:
                    self.join(leader, tid, t, ev.client, now)
                    joined.append([tid, leader.id])
                    continue
            if self.full():
                workers.dispatch(now)  # what can start now does not wait
                if self.full():
                    self.refused += 1
                    err = _error("queue_full", "QueueFull",
                                 f"the plane holds {self.max_queued} waiting tasks (--max-queued)")  # fmt: skip
                    rejected.append({"id": tid, "error": err})
                    continue
            due = None  # when it may be queued: (time, on the wall clock?), or None: now
            if plain:
                task = _Task(t, _RANK[opts["priority"]], opts["retries"], opts["timeout"], ev.client, now.wall)
            else:
                retries = t.get("retries")
                task = _Task(t, _RANK[t.get("priority") or opts["priority"]],
                             opts["retries"] if retries is None else retries, t.get("timeout") or opts["timeout"],
                             ev.client, now.wall)  # fmt: skip
                task.tenant, task.key = t.get("tenant"), key
                eta, delay = t.get("eta"), t.get("delay")
                if eta is not None and eta > now.wall:
                    due = (eta, True)
                elif delay:
                    due = (now.mono + delay, False)
            if not plain or len(opts) > 3:  # options beyond the plain ones: limits among them?
                task.limits = self.limits_of(t, opts)
            table.add(task)
            if key is not None:
                due = self.keep(task, t, due, now)
            if due is None:
                table.move(task, QUEUED, now)
            else:
                task.on_wall = due[1]
                table.move(task, SCHEDULED, now, due=due[0])
        workers.dispatch(now)  # the work goes out first: it is what takes time
        out.reply(ev.req, "accepted", {"rejected": rejected, "joined": joined} if joined else {"rejected": rejected})

    def settled(self, task: _Task) -> None:
        """A task is final: its key is free again."""
        if task.key is not None and self.keys.get((task.name, task.key)) is task:
            del self.keys[task.name, task.key]

    # -- limits ---------------------------------------------------------------------

    def moved(self, task: _Task, old: str | None, state: str, now: At) -> None:
        """A task with limits moved: count its runs, let held ones out."""
        if task.limits is None:
            return
        name = task.name
        if old == QUEUED:
            if task.blocked is not None:  # held by a limit, and cancelled
                task.blocked = None
                self.held_count -= 1
            if state != RUNNING and self.held:
                self._release(task)  # it may have been let out for a turn it will not take
        elif old == RUNNING:
            self.running[name] -= 1
            if task.tenant is not None:
                self.running_tenant[name, task.tenant] -= 1
            if self.held:
                self._release(task)
        if state == RUNNING:
            self.running[name] += 1
            if task.tenant is not None:
                self.running_tenant[name, task.tenant] += 1
            interval = task.limits[1]
            if interval is not None:  # its rate: the next start waits
                at = self.next_start[name] = max(now.mono, self.next_start.get(name, now.mono)) + interval
                if Hold("rate", name, None) in self.held:
                    self._wake_for_rate(at)

    def must_wait(self, task: _Task, now: At) -> bool:
        """Does a limit keep this (just popped) task from starting now?  Then
        it is set aside until one of its name's runs ends, or its rate lets
        it start; it holds no worker's slot meanwhile."""
        conc, interval, tenant_conc = task.limits
        name = task.name
        if conc is not None and self.running[name] >= conc:
            return self._hold(task, Hold("concurrency", name, None))
        if tenant_conc is not None and self.running_tenant[name, task.tenant] >= tenant_conc:
            return self._hold(task, Hold("tenant", name, task.tenant))
        if interval is not None:
            at = self.next_start.get(name, now.mono)
            if at > now.mono:
                self._wake_for_rate(at)
                return self._hold(task, Hold("rate", name, None))
        return False

    def _wake_for_rate(self, at: float) -> None:
        if self.rate_wake is None or at < self.rate_wake:
            self.rate_wake = at
            self.core.out.wake = True

    def _hold(self, task: _Task, hold: Hold) -> bool:
        """Set a task aside; the held go back in the order the queue gave
        them (priority, then the tenants' turns)."""
        task.blocked = hold.kind
        heapq.heappush(self.held.setdefault(hold, []), (task.rank, next(self._order), task))
        self.held_count += 1
        return True

    def _release(self, task: _Task) -> None:
        """A run of ``task``'s name ended: the first task held by its name's
        (or its tenant's) concurrency goes back into the queue."""
        for hold in (Hold("concurrency", task.name, None), Hold("tenant", task.name, task.tenant)):
            if hold in self.held:
                self._let_out(hold)

    def _let_out(self, hold: Hold) -> _Task | None:
        """The first task held at ``hold`` (skipping those cancelled
        meanwhile) goes back into the queue, at its place."""
        heap = self.held[hold]
        task = None
        while heap:
            task = heapq.heappop(heap)[2]
            if task.blocked is not None:
                task.blocked = None
                self.held_count -= 1
                self.core.table.queue.push(task, keep_seq=True)
                break
            task = None
        if not heap:
            del self.held[hold]
        return task

    def release_rates(self, now: At) -> bool:
        """Tasks held by a rate whose time has come go back into the queue;
        True if it was time to look."""
        if self.rate_wake is None or now.mono < self.rate_wake:
            return False
        self.rate_wake = None
        for hold in [h for h in self.held if h.kind == "rate"]:
            at = self.next_start.get(hold.name, now.mono)
            if at > now.mono:
                self.rate_wake = at if self.rate_wake is None else min(self.rate_wake, at)
                continue
            task = self._let_out(hold)
            if task is not None and hold in self.held:  # look again (the one let out may never start)
                self._wake_for_rate(now.mono + task.limits[1])
        return True

    # -- observing -------------------------------------------------------------------

    def waiting(self, task: _Task, now: At) -> tuple[str, str] | None:
        """Why flow control keeps a waiting task back, if it does."""
        if task.state == SCHEDULED and task.burst is not None:
            left = f"{max(0.0, task.due - now.mono):.1f} s"
            return "debounce", f"waits {left} for newer submissions of its key {task.key!r} (debounce)"
        if task.blocked == "concurrency":
            return "concurrency", f"waits for its concurrency limit: {task.limits[0]} of {task.name!r} run at once"
        if task.blocked == "tenant":
            return "tenant_concurrency", (f"waits for its tenant's limit: {task.limits[2]} of {task.name!r} "
                                          f"for tenant {task.tenant!r} run at once")  # fmt: skip
        if task.blocked == "rate":
            at = self.next_start.get(task.name, now.mono)
            return "rate", f"waits {max(0.0, at - now.mono):.2f} s for its rate limit ({task.name!r})"
        return None

    def summary(self) -> dict:
        return {"held": self.held_count, "keys": len(self.keys), "joined": self.joined, "refused": self.refused,
                "max_queued": self.max_queued}  # fmt: skip


###############################################################################
# Plane core: workers #########################################################
###############################################################################


class _WorkerState:
    """A worker as the plane sees it: a connected subworker, or the plane's
    own executor (``local``, worker zero), which is always ready for work."""

    __slots__ = ("id", "name", "host", "pid", "concurrency", "tasks", "in_flight", "credit", "pull", "pull_deadline",
                 "conn", "local", "ghost", "last_seen", "last_heartbeat", "registered_at", "turn", "completed",
                 "max_bytes", "address")  # fmt: skip

    def __init__(self, wid: str, info: dict, tasks: Any, conn: int | None, now: At) -> None:
        self.id = wid
        self.name = str(info.get("name") or wid)[:_MAX_ID]
        self.host = str(info.get("host") or "?")[:_MAX_ID]
        self.address = str(info.get("address") or "")[:_MAX_ID]  # its IP, as it connects to the plane
        pid = info.get("pid")
        self.pid = pid if type(pid) is int else 0
        conc = info.get("concurrency")
        self.concurrency = conc if type(conc) is int and 0 < conc <= 1_000_000 else 1
        size = info.get("max_message_size")  # the largest message it accepts: a batch stays below it
        self.max_bytes = size if type(size) is int and MIN_MESSAGE_SIZE <= size <= 2**31 else DEFAULT_MAX_MESSAGE_SIZE
        self.tasks = tasks  # the names it can run -> their default options
        self.in_flight: dict[str, _Task] = {}
        self.credit = self.concurrency  # 0 while it drains
        self.pull: int | None = None  # request handle of its parked "pull"
        self.pull_deadline = 0.0  # (mono)
        self.conn = conn
        self.local = conn is None
        self.ghost = False  # known from the journal only: it ran tasks before the plane restarted
        self.last_seen = now.mono  # any sign of life: a pull or a heartbeat
        self.last_heartbeat = now.wall
        self.registered_at = now.wall
        self.turn = 0  # breaks ties between equally loaded workers: least recently served first
        self.completed = 0

    def free(self) -> int:
        """Slots it would take work for."""
        return min(self.credit, self.concurrency) - len(self.in_flight)

    def summary(self) -> dict:
        return {"id": self.id, "name": self.name, "host": self.host, "address": self.address, "pid": self.pid,
                "concurrency": self.concurrency, "in_flight": len(self.in_flight),
                "load": round(len(self.in_flight) / self.concurrency, 3), "completed": self.completed,
                "last_heartbeat": self.last_heartbeat, "registered_at": self.registered_at, "tasks": sorted(self.tasks),
                "state": "reconnecting" if self.ghost else "draining" if self.credit == 0 else "connected"}  # fmt: skip


class Workers:
    """Who runs tasks: the connected subworkers (by id and by connection),
    the plane's own slots (worker zero), what each can run (the catalog),
    whether each is alive (heartbeats, a parked request's deadline), and the
    dispatch that hands queued tasks to them."""

    def __init__(self, core: PlaneCore, local_tasks: dict[str, TaskSpec], concurrency: int, heartbeat_timeout: float,
                 zero_depth: int, now: At) -> None:  # fmt: skip
        self.core = core
        self.local = local_tasks
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_address: str | None = None  # told to workers when they register (the shell's)...
        self.message_limit = DEFAULT_MAX_MESSAGE_SIZE  # ...and the largest message the plane takes
        self.by_id: dict[str, _WorkerState] = {}  # connected subworkers (and ghosts after a restore)
        self.by_conn: dict[int, _WorkerState] = {}
        self.catalog: dict[str, dict] = {}  # task name -> default options, over the connected subworkers
        self.zero = _WorkerState("plane", {"name": "plane", "concurrency": concurrency}, local_tasks, None, now)
        # With a journal, a run of the plane's own starts only once it is
        # committed as running; so that commits carry more than a slot's
        # worth, its executor holds up to this many times its slots.
        self.zero_depth = zero_depth
        self._known = -1  # len(local_tasks) when the catalog was made (-1: never)
        self._zero_useful = True  # the plane knows a task no connected worker knows: it takes part in dispatch
        self._turns = itertools.count(1)
        self.zero.turn = next(self._turns)

    # -- what runs where --------------------------------------------------------------

    def options_of(self, name: str) -> dict | None:
        """The default options of a task some worker can run, or None.
        Connected subworkers run the tasks they know; the plane the rest."""
        opts = self.catalog.get(name)
        if opts is None:
            spec = self.local.get(name)
            opts = None if spec is None else spec.options
        return opts

    def runs_on(self, name: str) -> frozenset:
        """The slots that can run a task of this name: the connected workers
        that know it, else the plane's own if it knows it, else none."""
        ids = frozenset(w.id for w in self.by_id.values() if name in w.tasks)
        if ids or name not in self.local:
            return ids
        return frozenset((self.zero.id,))

    def changed(self) -> None:
        """The connected workers or the plane's registry changed: what runs
        where (the catalog, worker zero's share, the queue's lanes)."""
        self.catalog = {}
        for w in self.by_id.values():
            for name, options in w.tasks.items():
                self.catalog.setdefault(name, options)
        self._known = len(self.local)
        self._zero_useful = any(name not in self.catalog for name in self.local)
        self.core.table.queue.regroup()

    def names(self) -> list[str]:
        return sorted(set(self.catalog) | set(self.local))

    def moved(self, task: _Task, old: str | None, state: str, worker: Any, now: At, load: bool) -> None:
        """Who runs a task that moved into or out of RUNNING."""
        if old == RUNNING:
            del task.holder.in_flight[task.id]
            task.holder = None
        if state != RUNNING:
            return
        task.holder = worker
        worker.in_flight[task.id] = task
        if load:  # (a restore: its run goes on, or it runs again)
            return
        task.attempts += 1
        task.runs += 1
        task.started, task.t0, task.worker = now.wall, now.mono, worker.name
        if self.core.log_tasks:
            args = f" args={task.args!r} kwargs={task.kwargs!r}" if self.core.log_args else ""
            self.core.out.log(logging.DEBUG, "task %s %s started on %s (run %d)%s", task.id, task.name, worker.name,
                              task.runs, args)  # fmt: skip

    # -- a worker's requests --------------------------------------------------------------

    def pull(self, ev: Pull, now: At) -> None:
        """A worker's request for work.  It carries the results of earlier
        runs and the ids of tasks it hands back; the reply carries new tasks,
        as soon as there are any.  The first pull (with ``info``) registers
        the worker; one that ran tasks for this plane before it restarted
        (a journal) registers again and reports them.  A worker that stops
        cleanly says it is ``leaving`` in its last pull.

        Raises:
            ProtocolError: the registration info is invalid (nothing changed).
        """
        core, out, table = self.core, self.core.out, self.core.table
        w = self.by_id.get(ev.worker)
        registered = False
        if w is None or ev.info is not None:
            if ev.info is None or core.stopping:  # unknown here (a plane that restarted, or dropped it): say so
                core.figures.counters["late"] += len(ev.results)
                out.reply(ev.req, "tasks", {"register": not core.stopping}, [])
                return
            w = self._register(ev.worker, ev.info, ev.conn, {r["id"] for r in ev.results}, now)
            registered = True
        elif ev.conn != w.conn:  # it reconnected: its old connection's close must not drop it
            self.by_conn.pop(w.conn, None)
            w.conn = ev.conn
            self.by_conn[ev.conn] = w
        w.last_seen = now.mono
        for r in ev.results:
            task = table.tasks.get(r["id"])
            if task is None or task.holder is not w or r.get("run") != task.runs:
                core.figures.counters["late"] += 1  # declared dead, handed back, or not of this run: ignored
                continue
            w.completed += 1
            table.outcome(task, r["state"], _json_bytes(r), r.get("error"), now)
        for tid in ev.returned:
            task = w.in_flight.get(tid)
            if task is not None:
                table.hand_back(task, now)
        if ev.leaving and not registered:
            self._remove(w, False)
            for task in list(w.in_flight.values()):
                table.hand_back(task, now)
            core.figures.counters["workers_left"] += 1
            out.log(logging.INFO, "worker %s (%s, pid %s) left", w.name, w.host, w.pid)
            out.reply(ev.req, "tasks", items=[])
            self.dispatch(now)  # what it handed back runs elsewhere
            return
        if registered or w.ghost:
            fields = {"register": True} if w.ghost else self._welcome()
            out.reply(ev.req, "tasks", fields, [])
            self.dispatch(now)
            return
        w.credit = max(0, ev.credit)
        # A worker keeps at most one request parked here.  Tasks go to the
        # parked one; a second request (it brought results) is answered at
        # once, or takes the parked one's place once that is answered.
        second = None
        if w.pull is None:
            w.pull, w.pull_deadline = ev.req, now.mono + PULL_WAIT
        else:
            second = ev.req
        self.dispatch(now)
        if second is not None and w.pull is None:
            w.pull, w.pull_deadline, second = second, now.mono + PULL_WAIT, None
            self.dispatch(now)
        if w.pull is not None and w.credit == 0:  # it drains: nothing to wait for
            out.reply(w.pull, "tasks", items=[])
            w.pull = None
        if second is not None:
            out.reply(second, "tasks", items=[])

    def _welcome(self) -> dict:
        """What a worker learns when it registers."""
        return {
            "heartbeat": self.heartbeat_address,
            "heartbeat_interval": self.heartbeat_timeout / 5,
            "max_message_size": self.message_limit,
        }

    def _register(self, wid: str, info: dict, conn: int, reported: set, now: At) -> _WorkerState:
        """A worker registers.  One this plane knows already (it lost an
        answer on its way, or the plane restarted and it is a ghost) keeps
        only the tasks it says it holds or reports; the others never reached
        it and run again (with a new run number: should a dispatch still on
        its way reach it after all, that run's result is ignored)."""
        tasks = _catalog_of(info.get("tasks"))
        held = info.get("holding")
        if held is not None and (type(held) is not list or not all(type(tid) is str for tid in held)):
            raise ProtocolError("a worker's 'holding' must be a list of task ids")
        if wid == self.zero.id:
            raise ProtocolError(f"worker id {wid!r} is reserved for the plane itself")
        w = _WorkerState(wid, info, tasks, conn, now)
        old = self.by_id.get(wid)
        if old is not None:
            keep = None if held is None else set(held) | reported
            if old.pull is not None:  # its request parked from before: answered, empty
                self.core.out.reply(old.pull, "tasks", items=[])
            for task in list(old.in_flight.values()):
                if keep is not None and task.id not in keep:
                    self.core.table.run_again(task, now)
            w.in_flight = old.in_flight
            for task in w.in_flight.values():
                task.holder = w
            if old.conn is not None and old.conn != conn:
                self.by_conn.pop(old.conn, None)
            self.core.out.log(logging.INFO, "worker %s is back: %d task(s) it was running", w.name, len(w.in_flight))
        w.turn = next(self._turns)
        self.by_id[wid] = w
        self.by_conn[conn] = w
        self.changed()
        self.core.schedules.sync(now)
        self.core.out.log(logging.INFO, "worker %s (%s, pid %s, %d slots) registered", w.name, w.host, w.pid,
                          w.concurrency)  # fmt: skip
        return w

    def _remove(self, w: _WorkerState, register: bool) -> None:
        """A worker leaves the registry; its parked request is answered
        (``register``: it should register again, if it is still there)."""
        del self.by_id[w.id]
        self.by_conn.pop(w.conn, None)
        self.changed()
        if w.pull is not None:
            self.core.out.reply(w.pull, "tasks", {"register": True} if register else _NOTHING, [])
            w.pull = None

    def drop(self, w: _WorkerState, why: str, now: At) -> None:
        """A worker is gone: requeue or fail what it was running."""
        if self.by_id.get(w.id) is not w:
            return
        self._remove(w, True)
        table, lost = self.core.table, list(w.in_flight.values())
        if w.ghost:  # its runs died with the plane, not by the task's fault
            for task in lost:
                table.run_again(task, now)
            self.core.out.log(logging.WARNING, "worker %s did not come back: %d task(s) queued again", w.name,
                              len(lost))  # fmt: skip
        else:
            self.core.figures.counters["workers_lost"] += 1
            err = _error("lost", "WorkerLost", f"worker {w.name} was lost ({why}) while running the task")
            for task in lost:
                table.outcome(task, FAILED, encode_result(task.id, FAILED, error=err), err, now)
            self.core.out.log(logging.WARNING, "worker %s lost (%s): %d task(s) in flight", w.name, why, len(lost))
        self.dispatch(now)

    def heartbeat(self, wid: str, now: At) -> None:
        w = self.by_id.get(wid)
        if w is not None:
            w.last_seen, w.last_heartbeat = now.mono, now.wall

    def sweep(self, now: At) -> float:
        """Drop the workers silent past the heartbeat timeout (and cut their
        connection: if one wakes up, it registers afresh); answer parked
        requests past their deadline.  Returns when to look again (mono)."""
        wake = now.mono + min(1.0, self.heartbeat_timeout / 4)
        for w in list(self.by_id.values()):
            if now.mono - w.last_seen > self.heartbeat_timeout:
                self.drop(w, f"no heartbeat for {now.mono - w.last_seen:.1f} s", now)
                if w.conn is not None:
                    self.core.out.acts.append(Cut(w.conn))
                continue
            wake = min(wake, w.last_seen + self.heartbeat_timeout + 0.001)  # when the quietest times out
            if w.pull is not None and w.pull_deadline <= now.mono:
                self.core.out.reply(w.pull, "tasks", items=[])
                w.pull = None
        return wake

    def ghost(self, wid: str | None, name: str | None, now: At) -> _WorkerState:
        """A worker that ran tasks before the plane restarted, not back yet."""
        wid = wid or "?"
        w = self.by_id.get(wid)
        if w is None:
            w = self.by_id[wid] = _WorkerState(wid, {"name": name or wid}, {}, None, now)
            w.local, w.ghost, w.turn = False, True, next(self._turns)
        return w

    def close(self) -> None:
        """The plane closes: every parked request is answered."""
        for w in self.by_id.values():
            if w.pull is not None:
                self.core.out.reply(w.pull, "tasks", items=[])
                w.pull = None

    # -- dispatch ---------------------------------------------------------------------------

    def dispatch(self, now: At) -> None:
        """Hand queued tasks to workers with room: each task to the
        least-loaded worker that can run it (worker zero only takes what no
        connected subworker knows), and each worker its share in one message.
        A lane (see DispatchQueue) whose next task no worker with room can
        take this round is passed over as a whole."""
        core = self.core
        queue = core.table.queue
        if not queue or core.stopping:
            return
        if self._known != len(self.local):  # the plane's registry grew
            self.changed()
        ready = []  # heap of [load, turn, worker, free slots]
        for w in self.by_id.values():
            if w.pull is not None:
                room = w.free()
                if room > 0:
                    ready.append([len(w.in_flight) / w.concurrency, w.turn, w, room])
        zero = self.zero
        room = zero.concurrency * self.zero_depth - len(zero.in_flight)
        if room > 0 and self._zero_useful:
            ready.append([len(zero.in_flight) / zero.concurrency, zero.turn, zero, room])
        if not ready:
            return
        heapq.heapify(ready)
        catalog, flow, table = self.catalog, core.flow, core.table
        batches: dict[_WorkerState, list] = {}
        room_left: dict[_WorkerState, int] = {}  # bytes a subworker's batch may still take
        passed_lanes: list[TaskQueue] = []  # lanes none of whose workers can take their next task this round
        while ready:
            lane = queue.best(passed_lanes)
            if lane is None:
                break
            task = lane.peek()  # taken only once a worker can have it: a lane that waits keeps its tenants' turns
            name = task.name
            size = 0  # bytes it takes in a message to a subworker (once one is considered)
            entry, passed = None, []
            while ready:
                e = heapq.heappop(ready)
                w = e[2]
                if name in w.tasks and (w is not zero or name not in catalog):
                    if w is zero:
                        entry = e
                        break
                    size = size or len(task.wire_bytes()) + 16
                    left = room_left.get(w, w.max_bytes - _BATCH_MARGIN)
                    if size <= left:
                        entry = e
                        break
                    if size <= w.max_bytes - _BATCH_MARGIN:  # its batch is full: it leaves this round
                        continue
                passed.append(e)
            for e in passed:
                heapq.heappush(ready, e)
            if entry is None:
                if not size or not self._too_large(task, size, now):
                    passed_lanes.append(lane)  # it waits for a slot, and so does the rest of its lane
                continue
            queue.pop(lane)
            if task.limits is not None and flow.must_wait(task, now):
                heapq.heappush(ready, entry)
                continue
            w = entry[2]
            if w is not zero:
                room_left[w] = room_left.get(w, w.max_bytes - _BATCH_MARGIN) - size
            table.move(task, RUNNING, now, worker=w)
            batches.setdefault(w, []).append(task)
            entry[3] -= 1
            if entry[3]:
                entry[0] = len(w.in_flight) / w.concurrency
                entry[1] = w.turn = next(self._turns)
                heapq.heappush(ready, entry)
        for w, tasks in batches.items():
            w.turn = next(self._turns)
            if w is zero:
                jobs = [_Job(t.id, t.name, t.args, t.kwargs, t.timeout, t.runs, "", t.rank, t.seq) for t in tasks]
                core.out.acts.append(Run(jobs))
            else:
                items = [b'{"run":%d,' % t.runs + t.wire_bytes()[1:] for t in tasks]
                core.out.reply(w.pull, "tasks", items=items)
                w.pull = None

    def _too_large(self, task: _Task, size: int, now: At) -> bool:
        """A task too large for every connected worker that knows it fails
        (True); otherwise it waits for one that can take it (False)."""
        largest = max((w.max_bytes for w in self.by_id.values() if task.name in w.tasks), default=0)
        if size <= largest - _BATCH_MARGIN:
            return False
        self.core.table.fail(task, _error("too_large", "TaskTooLarge",
            f"the task takes {size} bytes in a message; the workers that run {task.name!r} accept at most "
            f"{largest} bytes (their --max-message-size)"), now)  # fmt: skip
        return True

    # -- observing ---------------------------------------------------------------------------

    def running_on_ghosts(self) -> int:
        """Tasks held by workers that have not come back since a restart (a
        stopping plane does not wait for them)."""
        return sum(len(w.in_flight) for w in self.by_id.values() if w.ghost)

    def detail(self, wid: str, now: At) -> dict | None:
        """A worker (or "plane", the plane's own executor) and what it runs."""
        w = self.zero if wid == self.zero.id else self.by_id.get(wid)
        if w is None:
            return None
        running = itertools.islice(w.in_flight.values(), MAX_RECENT)
        return {**w.summary(), "running": [t.summary(now) for t in running]}


###############################################################################
# Plane core: waiters #########################################################
###############################################################################


class _ClientState:
    """What the plane keeps per client: results not yet delivered and the
    client's parked long-poll, if any."""

    __slots__ = ("outbox", "poll", "conn", "deadline", "seen", "resync")

    def __init__(self, now: At) -> None:
        self.outbox: list[bytes] = []  # results not yet delivered (bounded: MAX_OUTBOX)
        self.poll: int | None = None  # request handle of its parked poll
        self.conn = 0  # the connection it came on
        self.deadline = 0.0  # (mono)
        self.seen = now.mono  # when it last asked for anything
        self.resync = False  # results were dropped from its outbox: it must ask for them


class _Fetch:
    """A parked "fetch" request, answered when all its tasks are done."""

    __slots__ = ("req", "conn", "ids", "deadline", "waiting")

    def __init__(self, req: int, conn: int, ids: list, deadline: float, waiting: int) -> None:
        self.req = req
        self.conn = conn
        self.ids = ids
        self.deadline = deadline  # (mono)
        self.waiting = waiting  # watched tasks not yet finished


class Waiters:
    """Who waits for what: the clients (their undelivered results and their
    parked poll), the parked fetches, how many requests are parked per
    connection and in all, and, once the plane closed, each client's tasks
    that will not finish.  A result goes into its client's outbox; parked
    polls are answered at the end of the event (``finish``), so every result
    of one event travels in one reply."""

    def __init__(self, core: PlaneCore) -> None:
        self.core = core
        self.clients: dict[str, _ClientState] = {}
        self.fetches: set[_Fetch] = set()
        self.parked = 0  # polls and fetches parked, over all connections
        self.parked_by_conn: dict[int, int] = {}
        self._ripe: set[_ClientState] = set()  # clients with a parked poll and results for it
        self._lost: dict[str, list] = {}  # once closed: client -> [[task id, state]] that will not finish
        self.subscribers = 0  # event subscribers connected (the shell counts them)

    def client(self, cid: str, now: At) -> _ClientState:
        cs = self.clients.get(cid)
        if cs is None:
            cs = self.clients[cid] = _ClientState(now)
        cs.seen = now.mono
        return cs

    def post(self, cs: _ClientState, item: bytes) -> None:
        """A result for a client.  An outbox past MAX_OUTBOX loses its oldest
        results (they stay in the cache) and the client is told to ask for
        what it misses."""
        cs.outbox.append(item)
        if len(cs.outbox) > MAX_OUTBOX * 1.25:
            del cs.outbox[: len(cs.outbox) - MAX_OUTBOX]
            cs.resync = True
        if cs.poll is not None:
            self._ripe.add(cs)

    def settled(self, task: _Task, now: At) -> None:
        """A task is final: its client gets its result, and so does each
        submission that joined it (under its own id); parked fetches that
        waited for it are answered once all their tasks are; subscribers get
        an event."""
        clients = self.clients
        cs = clients.get(task.client)
        if cs is not None:
            self.post(cs, task.item)
        for alias, (client, cancelled) in (task.joined or {}).items():
            other = None if cancelled else clients.get(client)
            if other is not None:
                self.post(other, _aliased(task.item, task.id, alias))
        if task.watchers:
            for fetch in task.watchers:
                fetch.waiting -= 1
                if fetch.waiting == 0 and fetch in self.fetches:
                    self._unpark_fetch(fetch)
                    self.core.out.reply(fetch.req, "results", items=self.core.fetch_items(fetch.ids, now))
            task.watchers = None
        if self.subscribers:
            self.core.out.events.append(task.summary(now))

    # -- parking --------------------------------------------------------------------

    def _may_park(self, conn: int) -> bool:
        """Room for one more parked poll or fetch (MAX_PARKED in all,
        MAX_PARKED_PER_CONN per connection)?"""
        return self.parked < MAX_PARKED and self.parked_by_conn.get(conn, 0) < MAX_PARKED_PER_CONN

    def _count_parked(self, conn: int, delta: int) -> None:
        self.parked += delta
        left = self.parked_by_conn.get(conn, 0) + delta
        if left:
            self.parked_by_conn[conn] = left
        else:
            del self.parked_by_conn[conn]

    def _unpark(self, cs: _ClientState) -> int:
        """Take a client's parked poll (to answer it)."""
        req, cs.poll = cs.poll, None
        self._count_parked(cs.conn, -1)
        return req

    def _unpark_fetch(self, fetch: _Fetch) -> None:
        self.fetches.discard(fetch)
        self._count_parked(fetch.conn, -1)

    def _results(self, req: int, cs: _ClientState, items: list) -> None:
        """Answer a client's poll with results (and say if it missed some)."""
        fields = _NOTHING
        if cs.resync:
            cs.resync = False
            fields = {"resync": True}
        self.core.out.reply(req, "results", fields, items)

    def _answer(self, cs: _ClientState, items: list) -> None:
        """Answer a client's parked poll."""
        self._results(self._unpark(cs), cs, items)

    @staticmethod
    def _take_results(cs: _ClientState) -> list[bytes]:
        """As many of a client's waiting results as fit one message."""
        items, size = cs.outbox, 0
        for n, item in enumerate(items):
            size += len(item)
            if size > _BATCH_BYTES and n:
                cs.outbox = items[n:]
                return items[:n]
        cs.outbox = []
        return items

    # -- requests ------------------------------------------------------------------

    def poll(self, ev: Poll, now: At) -> None:
        """A client's long-poll for its results: answered at once if any
        wait, else parked until some arrive or ``wait`` seconds pass.  At
        most MAX_PARKED polls are parked, MAX_PARKED_PER_CONN per connection;
        past that, polls are answered at once, and so is the first poll of
        a client this plane does not know (it may be a restarted plane: the
        client learns so from the answer)."""
        new = ev.client not in self.clients
        cs = self.client(ev.client, now)
        if cs.poll is not None:  # the client gave up on it: it has a new one now
            self._answer(cs, [])
        if self.core.closed:
            self._last_word(ev.req, ev.client, cs)
        elif new or cs.outbox or ev.wait <= 0 or not self._may_park(ev.conn):
            self._results(ev.req, cs, self._take_results(cs))
        else:
            cs.poll, cs.conn, cs.deadline = ev.req, ev.conn, now.mono + ev.wait
            self._count_parked(ev.conn, 1)

    def fetch(self, ev: Fetch, pending: list[_Task], now: At) -> None:
        """Results of any tasks by id (``pending``: those unfinished), parked
        up to ``wait`` seconds while some of them are unfinished (parked like
        a poll: see poll())."""
        core = self.core
        if not pending or ev.wait <= 0 or core.stopping or len(ev.ids) > QUERY_CHUNK or not self._may_park(ev.conn):
            core.out.reply(ev.req, "results", items=core.fetch_items(ev.ids, now))
            return
        fetch = _Fetch(ev.req, ev.conn, ev.ids, now.mono + ev.wait, len(pending))
        self._count_parked(ev.conn, 1)
        for task in pending:
            if task.watchers is None:
                task.watchers = []
            task.watchers.append(fetch)
        self.fetches.add(fetch)

    def bye(self, ev: Bye, now: At) -> None:
        """A client leaves: forget it (and answer its parked poll)."""
        cs = self.clients.get(ev.client)
        if cs is not None:
            if cs.poll is not None:
                self._answer(cs, [])
            del self.clients[ev.client]
        self.core.out.reply(ev.req, "ok")

    def finish(self) -> None:
        """(The end of an event.)  Answer the parked polls that have results."""
        if self._ripe:
            for cs in self._ripe:
                if cs.poll is not None and cs.outbox:
                    self._answer(cs, self._take_results(cs))
            self._ripe.clear()

    def sweep(self, now: At) -> None:
        """Answer parked requests past their deadline; forget clients long
        silent; keep a silent client's results in the cache only."""
        for cid, cs in list(self.clients.items()):
            if cs.poll is not None:
                if cs.deadline <= now.mono:
                    self._answer(cs, [])
            elif now.mono - cs.seen > CLIENT_IDLE_TTL:
                del self.clients[cid]
            elif cs.outbox and now.mono - cs.seen > OUTBOX_IDLE:
                cs.outbox = []
                cs.resync = True
        for fetch in [f for f in self.fetches if f.deadline <= now.mono]:
            self._unpark_fetch(fetch)
            self.core.out.reply(fetch.req, "results", items=self.core.fetch_items(fetch.ids, now))

    # -- closing ------------------------------------------------------------------

    def close(self, tasks: Iterable[_Task] | None) -> None:
        """The plane closes: every client gets its last results and the list
        of ``tasks`` of its own that will not finish (None: they wait in the
        journal for the next plane); parked fetches get an error."""
        for task in tasks or ():
            self._lost.setdefault(task.client, []).append([task.id, task.state])
        for cid, cs in self.clients.items():
            if cs.poll is not None:
                self._last_word(self._unpark(cs), cid, cs)
        err = _error("unavailable", "PlaneUnavailable", "the plane is shutting down")
        for fetch in list(self.fetches):
            self._unpark_fetch(fetch)
            self.core.out.reply(fetch.req, "error", {"error": err})

    def _last_word(self, req: int, cid: str, cs: _ClientState) -> None:
        """A closed plane's answer to a poll: results, and the tasks that
        will not finish."""
        fields = {"closing": True, "lost": self._lost.pop(cid, [])}
        self.core.out.reply(req, "results", fields, self._take_results(cs))

    def undelivered(self) -> int:
        """Clients that have not collected their last word from a closed plane."""
        return len(self._lost) + sum(1 for cs in self.clients.values() if cs.outbox)


###############################################################################
# Plane core: schedules and figures ###########################################
###############################################################################


class _Schedule:
    """A periodic task as the plane keeps it: when it is next due (wall
    clock), and how its runs went.  ``every`` counts from the previous due
    time (no drift); a due time that passed while nothing could fire it
    (downtime, a pause) is made up once, not once per missed slot."""

    __slots__ = ("name", "every", "cron", "overlap", "next_due", "last_due", "last_run", "last_state", "runs",
                 "skipped", "running", "orphaned", "seen", "wake")  # fmt: skip

    def __init__(self, name: str, options: dict, now: At) -> None:
        self.name = name
        self.every = options.get("every")
        self.cron = Cron(options["cron"], options.get("tz")) if options.get("cron") else None
        self.overlap = bool(options.get("overlap"))
        self.next_due = self.following(now.wall, now.wall)
        self.last_due: float | None = None
        self.last_run: str | None = None  # id of its latest run
        self.last_state: str | None = None  # that run's state
        self.runs = self.skipped = 0
        self.running = 0  # runs not finished (retries included)
        self.orphaned = False  # neither a connected worker nor the plane knows it: its due times are skipped
        self.seen = now.mono  # when someone last could run it (an orphan long unseen is forgotten)
        self.wake = self.next_due  # when the core looks at it next (wall; an orphan: at most once a second)

    def following(self, due: float, now: float) -> float:
        """The first due time after ``now``, counting from ``due``."""
        if self.every is not None:
            return due + (int((now - due) // self.every) + 1) * self.every
        import datetime as dt

        return self.cron.next(dt.datetime.fromtimestamp(now, dt.timezone.utc)).timestamp()

    def missed(self, now: float) -> int:
        """How many of its due times have passed by ``now`` (at least one)."""
        return 1 if self.every is None else int((now - self.next_due) // self.every) + 1

    def saved(self) -> list:
        return [self.next_due, self.last_due, self.last_run, self.last_state, self.runs, self.skipped]

    def summary(self, tasks: dict) -> dict:
        """What stats() and the dashboard show (``tasks``: the core's unfinished ones)."""
        s: dict[str, Any] = {"name": self.name}
        if self.every is not None:
            s["every"] = self.every
        else:
            s["cron"], s["tz"] = self.cron.expression, self.cron.tz or "UTC"
        s.update(overlap=self.overlap, next_run=self.next_due, last_run=self.last_due, last_task=self.last_run,
                 runs=self.runs, skipped=self.skipped, running=self.running, orphaned=self.orphaned)  # fmt: skip
        last = tasks.get(self.last_run) if self.last_run else None
        s["last_state"] = self.last_state if last is None else last.state
        return s


def _saved_schedule_ok(v: Any) -> bool:
    return (type(v) is list and len(v) == 6 and type(v[0]) in _NUM and type(v[1]) in (*_NUM, type(None))
            and type(v[2]) in (str, type(None)) and type(v[3]) in (str, type(None)) and type(v[4]) is int
            and type(v[5]) is int)  # fmt: skip


class Schedules:
    """The periodic tasks (``every`` / ``cron``) the plane or a connected
    worker knows: when each is next due, and how its runs went.  A run is
    marked as its schedule's (``task.schedule``).  One that no one can run
    is said once, looked at once a second, and forgotten after
    SCHEDULE_FORGET heartbeat timeouts without a runner."""

    def __init__(self, core: PlaneCore, journaling: bool) -> None:
        self.core = core
        self.journaling = journaling
        self.by_name: dict[str, _Schedule] = {}
        self.saved: dict[str, list] = {}  # from a journal: schedules not yet known again, where they left off
        self.known = -1  # len(local_tasks) when they were last looked for
        self.next = float("inf")  # the soonest wake (wall)
        self.dirty = False  # with a journal: a schedule changed in the event at hand

    def sync(self, now: At) -> None:
        """Take up the periodic tasks the plane or a connected worker knows."""
        workers = self.core.workers
        self.known = len(workers.local)
        for source in (workers.local, workers.catalog):
            for name, spec in source.items():
                options = spec.options if isinstance(spec, TaskSpec) else spec
                if "every" not in options and "cron" not in options:
                    continue
                s = self.by_name.get(name)
                if s is not None:
                    self._adopted(s, now)
                    continue
                s = self.by_name[name] = _Schedule(name, options, now)
                saved = self.saved.pop(name, None)
                if saved is not None:
                    s.next_due, s.last_due, s.last_run, s.last_state, s.runs, s.skipped = saved
                    s.wake = s.next_due
                    s.running = sum(1 for t in self.core.table.tasks.values() if t.schedule == name)
                self.core.out.wake = True
        self.next = min((s.wake for s in self.by_name.values()), default=float("inf"))

    def _adopted(self, s: _Schedule, now: At) -> None:
        """Someone can run a schedule (again)."""
        s.seen = now.mono
        if s.orphaned:
            s.orphaned, s.wake = False, s.next_due
            self.core.out.wake = True
            self.core.out.log(logging.INFO, "periodic task %s has a runner again: its runs resume", s.name)

    def fire(self, now: At) -> bool:
        """Queue one run of each periodic task that is due (or skip it if its
        last run is still going); True if any was queued."""
        core, out = self.core, self.core.out
        if len(core.workers.local) != self.known:
            self.sync(now)
        if now.wall < self.next:
            return False
        fired = False
        for s in list(self.by_name.values()):
            if s.wake > now.wall:
                continue
            self.dirty = self.journaling
            opts = core.workers.options_of(s.name)
            if opts is None:
                self._orphan(s, now)
                continue
            self._adopted(s, now)
            due, s.next_due = s.next_due, s.following(s.next_due, now.wall)
            s.wake = s.next_due
            tid = f"{s.name}@{due:.3f}"
            if core.stopping or (s.running and not s.overlap) or tid in core.table.tasks:
                s.skipped += 1
                why = "the plane stops" if core.stopping else "still running"
                out.log(logging.DEBUG, "periodic task %s: run due at %.3f skipped (%s)", s.name, due, why)
                continue
            task = _Task({"id": tid, "name": s.name, "args": [], "kwargs": {}}, _RANK[opts["priority"]],
                         opts["retries"], opts["timeout"], "", now.wall)  # fmt: skip
            task.schedule = s.name
            core.table.add(task)
            s.runs += 1
            s.running += 1
            s.last_due, s.last_run, s.last_state = due, tid, QUEUED
            core.table.move(task, QUEUED, now)
            fired = True
        self.next = min((s.wake for s in self.by_name.values()), default=float("inf"))
        return fired

    def _orphan(self, s: _Schedule, now: At) -> None:
        """A due schedule no one can run: said once, its due times counted as
        skipped, looked at again in a second; forgotten once long unseen."""
        if not s.orphaned:
            s.orphaned, s.seen = True, now.mono  # (forgotten only SCHEDULE_FORGET timeouts from now)
            self.core.out.log(logging.WARNING, "periodic task %s: no connected worker or the plane knows it; its "
                              "runs are skipped (and counted) until one does", s.name)  # fmt: skip
        if now.mono - s.seen >= self.core.workers.heartbeat_timeout * SCHEDULE_FORGET:
            del self.by_name[s.name]
            self.core.out.log(logging.INFO, "periodic task %s forgotten: no one has run it for %.0f s", s.name,
                              now.mono - s.seen)  # fmt: skip
            return
        if s.next_due <= now.wall:
            s.skipped += s.missed(now.wall)
            s.next_due = s.following(s.next_due, now.wall)
        s.wake = max(s.next_due, now.wall + 1.0)

    def settled(self, task: _Task) -> None:
        """A periodic run ended."""
        if task.schedule is not None:
            s = self.by_name.get(task.schedule)
            if s is not None:
                s.running -= 1
                if s.last_run == task.id:
                    s.last_state = task.state
                self.dirty = self.journaling

    def load(self, saved: dict, now: At) -> None:
        """Schedules from a journal pick up where they left off, once known again.

        Raises:
            JournalError: one is malformed.
        """
        for name, v in saved.items():
            if not _saved_schedule_ok(v):
                raise JournalError(f"holds a malformed schedule for {name!r}")
        self.saved, self.by_name = dict(saved), {}  # (taken up by sync(), once the tasks are back)

    def summaries(self) -> list[dict]:
        return [s.summary(self.core.table.tasks) for s in self.by_name.values()]


class _NameStats:
    """What the plane knows of one task name's finished runs: counts, the
    newest durations (for percentiles) and the last failure."""

    __slots__ = ("succeeded", "failed", "cancelled", "durations", "last_failure")

    def __init__(self) -> None:
        self.succeeded = self.failed = self.cancelled = 0
        self.durations: collections.deque = collections.deque(maxlen=NAME_DURATIONS)
        self.last_failure: dict | None = None

    def summary(self, name: str) -> dict:
        done = self.succeeded + self.failed
        ds = sorted(self.durations)
        return {"name": name, "succeeded": self.succeeded, "failed": self.failed, "cancelled": self.cancelled,
                "failure_rate": round(self.failed / done, 4) if done else 0.0,
                "p50": round(_percentile(ds, 50), 6) if ds else None,
                "p95": round(_percentile(ds, 95), 6) if ds else None, "last_failure": self.last_failure}  # fmt: skip


class Figures:
    """What the plane counts, kept once for stats(), the journal and a
    restore (``counters``); per task name (counts, durations, the last
    failure); finished tasks per second (the dashboard's chart); the tasks
    that finished lately (failed ones apart, so that a flood of successes
    does not hide them)."""

    COUNTERS = ("retried", "late", "workers_lost", "workers_left", "requeued", "handed_back")

    def __init__(self, core: PlaneCore) -> None:
        self.core = core
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.errors = {"protocol": 0, "internal": 0}  # requests the core refused, events it could not handle
        self.names: dict[str, _NameStats] = {}
        self.throughput: collections.deque = collections.deque(maxlen=THROUGHPUT_WINDOW)  # [second, ok, failed]
        self._bucket: list = [None, 0, 0]  # the newest of them
        self.recent: collections.deque = collections.deque(maxlen=RECENT_TASKS)  # finished tasks, oldest first
        self.recent_failed: collections.deque = collections.deque(maxlen=RECENT_TASKS)  # ...that failed

    def settled(self, task: _Task, now: At) -> None:
        """A task is final: the figures of its name, the chart, the recent lists."""
        state = task.state
        figures = self._of(task.name)
        if state == SUCCEEDED:
            figures.succeeded += 1
        elif state == FAILED:
            figures.failed += 1
            figures.last_failure = {"id": task.id, "at": now.wall, "error": task.error}
        else:
            figures.cancelled += 1
        took = task.took if state != CANCELLED else None
        if took is not None:
            figures.durations.append(took)
        if self.core.log_tasks:
            where = "" if took is None else f" on {task.worker} in {took:.6f} s"
            self.core.out.log(logging.DEBUG, "task %s %s %s%s", task.id, task.name, state, where)
        if state != CANCELLED:
            bucket = self._bucket
            if bucket[0] != int(now.wall):
                bucket = self._bucket = [int(now.wall), 0, 0]
                self.throughput.append(bucket)
            bucket[1 if state == SUCCEEDED else 2] += 1
        self.recent.append(task)
        if state == FAILED:
            self.recent_failed.append(task)

    def _of(self, name: str) -> _NameStats:
        if len(self.names) >= MAX_NAMES:
            name = "(other)"
        return self.names.get(name) or self.names.setdefault(name, _NameStats())

    def failed_run(self, task: _Task, err: dict, now: At) -> None:
        """Keep a failed run for the task's page, and say so at WARNING."""
        tb = str(err.get("traceback") or "")
        if len(tb) > MAX_TRACEBACK:  # the end says the most
            tb = "...\n" + tb[-MAX_TRACEBACK:]
        run = {"run": task.runs, "worker": task.worker, "started_at": task.started, "finished_at": now.wall,
               "state": FAILED, "error": task.error, "traceback": tb or None}  # fmt: skip
        if task.failures is None:
            task.failures = []
        elif len(task.failures) >= MAX_RUNS_KEPT:
            del task.failures[0]
        task.failures.append(run)
        took = "" if task.t0 is None else f" after {now.mono - task.t0:.3f} s"
        args = f" args={task.args!r} kwargs={task.kwargs!r}" if self.core.log_args else ""
        self.core.out.log(logging.WARNING, "task %s %s failed on %s%s (run %d): %s%s", task.id, task.name,
                          task.worker, took, task.runs, task.error, args)  # fmt: skip

    def chart(self, now: At, step: int = 10) -> list[list]:
        """Tasks finished per ``step`` seconds over THROUGHPUT_WINDOW seconds,
        oldest first: [[start, succeeded, failed], ...]."""
        last = int(now.wall) // step * step
        first = last - THROUGHPUT_WINDOW + step
        chart = [[t, 0, 0] for t in range(first, last + step, step)]
        for second, ok, failed in self.throughput:
            if second >= first:
                bucket = chart[min((second - first) // step, len(chart) - 1)]
                bucket[1] += ok
                bucket[2] += failed
        return chart

    def summaries(self) -> list[dict]:
        """Per task name: counts, failure rate, p50/p95 durations, last failure."""
        return [f.summary(name) for name, f in sorted(self.names.items())]


###############################################################################
# Plane core: the façade ######################################################
###############################################################################


class PlaneCore:
    """The plane's state machine (see "Plane core: records and the task
    table"): ``handle(event, now)`` is the one way in, and returns the
    actions to carry out; the other methods are queries.  Not thread-safe:
    the shell calls it under one lock.

    Args:
        plane_id: the plane's identity, stamped on its replies.
        local_tasks: name -> TaskSpec of the tasks the plane can run itself.
        now: the time at creation (an At).
        concurrency: slots of the plane's own executor (worker zero).
    """

    def __init__(self, plane_id: str, local_tasks: dict[str, TaskSpec], now: At, *,
                 concurrency: int = DEFAULT_CONCURRENCY, result_cache_size: int = DEFAULT_CACHE_SIZE,
                 result_cache_ttl: float = DEFAULT_CACHE_TTL, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 retry_backoff: float = DEFAULT_RETRY_BACKOFF, reap_interval: float = REAP_INTERVAL,
                 journaling: bool = False, log_args: bool = False, max_queued: int | None = None) -> None:  # fmt: skip
        self.id = plane_id
        self.out = _Actions()  # what the event at hand says to do
        self.log_args = log_args  # the operator opted in: arguments in the log and on the dashboard
        self.log_tasks = logger.isEnabledFor(logging.DEBUG)  # a DEBUG line per start and finish
        self.retry_backoff, self.reap_interval, self.journaling = retry_backoff, reap_interval, journaling
        self.stopping = False  # no new work; running tasks may finish
        self.closed = False  # stopped: clients collect their last results and learn what will not finish
        self.started_at = now.wall
        self.figures = Figures(self)
        depth = ZERO_JOURNAL_DEPTH if journaling else 1
        self.workers = Workers(self, local_tasks, concurrency, heartbeat_timeout, depth, now)
        self.table = TaskTable(self, ResultCache(result_cache_size, result_cache_ttl), journaling)
        self.table.cache.dropped = []  # (the aliases of a dropped result go with it, and its journal row)
        self.flow = FlowControl(self, max_queued)
        self.waiters = Waiters(self)
        self.schedules = Schedules(self, journaling)
        self._next_sweep = now.mono + min(1.0, heartbeat_timeout / 4)
        self._next_reap = now.mono + reap_interval
        self._handlers: dict[type, Callable] = {
            Submit: self.flow.submit, Poll: self.waiters.poll, Fetch: self._fetch, Status: self._status,
            Cancel: self._cancel, Answer: self._answer, Recent: self._recent, Stats: self._stats, Hello: self._hello,
            Bye: self.waiters.bye, Pull: self.workers.pull, Heartbeat: self._heartbeat, ConnClosed: self._conn_closed,
            LocalDone: self._local_done, Tick: self._tick, Stop: self._stop, Close: self._close, Restore: self._restore,
            Listening: self._listening, Subscribed: self._subscribed,
        }  # fmt: skip
        self.schedules.sync(now)
        self.out.take()

    def handle(self, event: Any, now: At) -> list:
        """Take one event at ``now``; the actions to carry out, in order.  A
        request the core refuses (a worker's bad registration) is answered
        with an error; an event the core cannot handle (a defect) is logged
        and counted, and what it did until then is still carried out: no
        action of one event is ever left for the next."""
        try:
            self._handlers[type(event)](event, now)
        except JournalError:  # (a restore refused: nothing was taken in)
            self.out.take()
            raise
        except ProtocolError as e:
            self.figures.errors["protocol"] += 1
            self._refuse(event, _error("protocol", "ProtocolError", str(e)))
        except Exception as e:
            self.figures.errors["internal"] += 1
            self.out.log(logging.ERROR, "internal error in the plane's core on %s: %s", type(event).__name__,
                         traceback.format_exc())  # fmt: skip
            self._refuse(event, _error("internal", type(e).__name__, str(e)))
        self.waiters.finish()
        acts = self.out.take()
        dropped = self.table.cache.dropped
        if dropped:
            self.table.forget([task for _, task in dropped])
        if self.journaling and (self.table.touched or dropped or self.schedules.dirty):
            self.schedules.dirty = False
            records = self.table.records(now) + [[tid] for tid, _ in dropped]
            acts.insert(0, Journal(records, self._counters()))
        dropped.clear()
        return acts

    def _refuse(self, event: Any, err: dict) -> None:
        """Answer the event's request with ``err``, unless it was answered."""
        req = getattr(event, "req", None)
        if req is not None and not any(type(a) is Reply and a.req == req for a in self.out.acts):
            self.out.reply(req, "error", {"error": err})

    def _counters(self) -> dict:
        """What the journal keeps besides the tasks (and a restore takes back)."""
        table = self.table
        schedules = {name: s.saved() for name, s in self.schedules.by_name.items()}
        return {"submitted": table.submitted, "counts": dict(table.counts), **self.figures.counters,
                "schedules": schedules}  # fmt: skip

    # -- events -----------------------------------------------------------------------

    def _fetch(self, ev: Fetch, now: At) -> None:
        table = self.table
        pending = [t for t in map(table.tasks.get, ev.ids) if t is not None]
        pending += [t for t in (table.aliases.get(i) for i in ev.ids) if t is not None and t.state not in TERMINAL]
        self.waiters.fetch(ev, pending, now)

    def _status(self, ev: Status, now: At) -> None:
        self.out.reply(ev.req, "statuses", {"statuses": self.statuses(ev.ids, now)})

    def _cancel(self, ev: Cancel, now: At) -> None:
        """Cancel the tasks that have not started (queued or scheduled; a
        purge: queued only).  A piece of a longer request (no ``req``) adds
        the ids it cancelled to ``into``."""
        cancelled = self.table.cancel(ev.ids, now, (QUEUED,) if ev.only_queued else (QUEUED, SCHEDULED))
        if ev.req is None:
            ev.into.extend(cancelled)
        else:
            self.out.reply(ev.req, "cancelled", {"ids": cancelled})

    def _answer(self, ev: Answer, now: At) -> None:
        self.out.reply(ev.req, ev.op, ev.fields, ev.items)

    def _recent(self, ev: Recent, now: At) -> None:
        self.out.reply(ev.req, "statuses", {"statuses": self.recent_tasks(ev.limit, ev.state, now, ev.search)})

    def _stats(self, ev: Stats, now: At) -> None:
        self.out.reply(ev.req, "report", {"stats": self.stats(now, ev.shell)})

    def _hello(self, ev: Hello, now: At) -> None:
        self.out.reply(ev.req, "welcome", {**ev.fields, "tasks": self.workers.names()})

    def _heartbeat(self, ev: Heartbeat, now: At) -> None:
        self.workers.heartbeat(ev.worker, now)

    def _conn_closed(self, ev: ConnClosed, now: At) -> None:
        w = self.workers.by_conn.get(ev.conn)
        if w is not None:
            self.workers.drop(w, "connection closed", now)

    def _local_done(self, ev: LocalDone, now: At) -> None:
        """The plane's own executor finished runs: ``(task id, run, state,
        RESULT item, error)`` each."""
        table, zero = self.table, self.workers.zero
        for tid, run, state, item, error in ev.finished:
            task = table.tasks.get(tid)
            if task is None or task.holder is not zero or run != task.runs:
                self.figures.counters["late"] += 1
                continue
            zero.completed += 1
            table.outcome(task, state, item, error, now)
        self.workers.dispatch(now)

    def _tick(self, ev: Tick, now: At) -> None:
        """Time passed: queue what came due, let rate-held tasks out, fire
        schedules; now and then answer expired parked requests, drop silent
        workers and reap the cache."""
        due = self.table.due(now)
        for task in due:
            self.table.move(task, QUEUED, now)
        let_out = self.flow.release_rates(now)
        if self.schedules.fire(now) or due or let_out:
            self.workers.dispatch(now)
        if now.mono >= self._next_sweep:
            self.waiters.sweep(now)
            self._next_sweep = self.workers.sweep(now)
        if now.mono >= self._next_reap:
            self.table.cache.reap(now.mono)
            self._next_reap = now.mono + self.reap_interval

    def _stop(self, ev: Stop, now: At) -> None:
        """Stop taking work: submissions are refused and nothing more is
        dispatched; running tasks may finish and report."""
        self.stopping = True

    def _close(self, ev: Close, now: At) -> None:
        """The plane closes: every client gets its last results and the list
        of its tasks that will not finish.  With a journal nothing is lost:
        unfinished tasks wait in it for the next plane (a run of the plane's
        own that is cut short runs again then)."""
        self.stopping = self.closed = True
        if self.journaling:
            for task in list(self.workers.zero.in_flight.values()):
                self.table.hand_back(task, now, counted=False)
        self.waiters.close(None if self.journaling else list(self.table.tasks.values()))
        self.workers.close()

    def _listening(self, ev: Listening, now: At) -> None:
        self.workers.heartbeat_address, self.workers.message_limit = ev.heartbeats, ev.max_message_size

    def _subscribed(self, ev: Subscribed, now: At) -> None:
        self.waiters.subscribers += ev.delta

    def _restore(self, ev: Restore, now: At) -> None:
        """Take back the state a journal holds (``_Journal.open``): the
        plane's id and counters, unfinished tasks (queued in their old order,
        scheduled for their old times, with their keys, tenants, limits,
        joined submissions and debounce) and cached results.  A task that was
        running stays running on its worker, which has until the heartbeat
        timeout to come back and report; one the plane itself ran is queued
        again, or fails if it was running at the crash before too.

        Raises:
            JournalError: a row is malformed (nothing is taken back).
        """
        table, saved = self.table, ev.saved
        unfinished, finished, last_seq = table.load(saved["rows"], now)
        counters = saved.get("counters") or {}
        self.schedules.load(counters.get("schedules") or {}, now)  # (JournalError: before anything changed)
        self.id = saved["plane"]
        for key in Figures.COUNTERS:
            self.figures.counters[key] = counters.get(key, 0)
        table.counts.update({s: n for s, n in (counters.get("counts") or {}).items() if s in TERMINAL})
        for task in sorted(finished, key=lambda t: t.finished or 0.0):
            table.cache.put(task.id, task, now.mono - max(0.0, now.wall - (task.finished or now.wall)))
            self.figures.recent.append(task)
            if task.state == FAILED:
                self.figures.recent_failed.append(task)
            for alias in task.joined or ():
                table.aliases[alias] = task
        zero = self.workers.zero
        for task, state, holder in unfinished:
            table.tasks[task.id] = task
            for alias in task.joined or ():
                table.aliases[alias] = task
            if task.key is not None:
                self.flow.keys[task.name, task.key] = task
            w = None
            if state == RUNNING:
                task.crashes += 1
                w = zero if holder == zero.id else self.workers.ghost(holder, task.worker, now)
                w.concurrency = max(w.concurrency, len(w.in_flight) + 1)  # a ghost's slots: at least what it holds
            table.move(task, state, now, due=task.due, worker=w, load=True)
            if w is zero:  # its run died with the plane
                table.run_again(task, now)
            elif w is not None and self.journaling:
                table.touched.setdefault(task.id, (task, False))  # it was running at this crash
        table.submitted = sum(table.counts.values())  # the accounting holds whatever the counters said
        table.queue.resume_after(last_seq)
        self.schedules.sync(now)
        self.out.log(logging.INFO, "plane %s restored from its journal: %d queued, %d scheduled, %d running, %d "
                     "results", self.id, table.counts[QUEUED], table.counts[SCHEDULED], table.counts[RUNNING],
                     len(table.cache))  # fmt: skip
        self.workers.dispatch(now)

    # -- queries -------------------------------------------------------------------------

    def next_deadline(self, now: At) -> float:
        """Seconds until the core has something to do without an event."""
        soon = [self._next_sweep - now.mono, self._next_reap - now.mono, self.schedules.next - now.wall]
        if self.flow.rate_wake is not None:
            soon.append(self.flow.rate_wake - now.mono)
        due = self.table.next_due(now)
        if due is not None:
            soon.append(due)
        return max(0.0, min(soon))

    def fetch_items(self, ids: list, now: At) -> list[bytes]:
        """RESULT items (or the current state) of tasks by id; the id of a
        submission that joined a task answers for that task."""
        table, items = self.table, []
        for tid in ids:
            task = table.tasks.get(tid) or table.cache.get(tid, now.mono)
            alias = task is None and table.aliases.get(tid)
            if alias:
                task = alias
            if task is None:
                items.append(_json_bytes({"id": tid, "state": "unknown"}))
            elif alias and task.joined[tid][1]:  # a joined submission that was cancelled
                items.append(encode_result(tid, CANCELLED))
            elif task.state in TERMINAL:
                items.append(_aliased(task.item, task.id, tid) if alias else task.item)
            else:
                items.append(_json_bytes({"id": tid, "state": task.state}))
        return items

    def statuses(self, ids: list, now: At) -> list[dict]:
        """The status of each task (of a few: why one waits, too); the id of
        a submission that joined a task says which (``"joined"``)."""
        why = len(ids) <= WHY_IDS
        return [self._status_of(tid, now, why) for tid in ids]

    def _status_of(self, tid: str, now: At, why: bool) -> dict:
        table = self.table
        task = table.tasks.get(tid) or table.cache.peek(tid, now.mono)
        joined = task is None and table.aliases.get(tid)
        if joined:
            task = joined
        if task is None:
            return {"id": tid, "state": "unknown"}
        out = task.summary(now)
        if joined:
            out["id"], out["joined"] = tid, task.id
            if task.joined[tid][1]:
                return {**out, "state": CANCELLED}
        if why and (task.state == QUEUED or task.state == SCHEDULED):
            out["waiting"], out["why"] = self._waiting(task, now)
        return out

    def _waiting(self, task: _Task, now: At) -> tuple[str, str]:
        """Why a queued or scheduled task does not run yet: a short reason
        and a sentence."""
        reason = self.flow.waiting(task, now)
        if reason is not None:
            return reason
        if task.state == SCHEDULED:
            left = f"{max(0.0, task.due_at(now) - now.wall):.1f} s"
            if task.attempts:
                return "retry", f"waits {left} of its retry backoff after {task.attempts} failed run(s)"
            return "scheduled", f"waits {left} for its time"
        if self.workers.options_of(task.name) is None:
            return "worker", f"waits for a worker that knows {task.name!r}"
        higher, mine, others = self.table.queue.ahead_of(task)
        ahead = higher + mine + others
        if task.tenant is not None and others and not mine:
            return "tenant_turn", f"waits for its tenant's turn: {ahead} task(s) go first"
        if ahead:
            return "queue", f"behind {ahead} task(s) of higher or equal priority"
        return "slot", "waits for a free slot on a worker that knows it"

    def running(self) -> int:
        """Runs a stopping plane waits for (not those of workers that did not
        come back since a restart)."""
        return self.table.counts[RUNNING] - self.workers.running_on_ghosts()

    def undelivered(self) -> int:
        """Clients that have not collected their last word from a closed plane."""
        return self.waiters.undelivered()

    def queued_ids(self, priority: str | None) -> list[str]:
        """The ids of the queued tasks, of one priority or of all."""
        rank = None if priority is None else _RANK[priority]
        return [t.id for t in self.table.tasks.values() if t.state == QUEUED and (rank is None or t.rank == rank)]

    def stats(self, now: At, shell: dict | None = None) -> dict:
        """Counts per state and priority, workers, the result cache, flow
        control, schedules, errors; ``shell``: what only the shell knows
        ("plane": its facts, "errors": its counts, "abandoned")."""
        table, workers, figures, zero = self.table, self.workers, self.figures, self.workers.zero
        c, info, shell = figures.counters, table.cache.info(), shell or {}
        theirs = shell.get("errors") or {}
        errors = {
            k: theirs.get(k, 0) + figures.errors.get(k, 0) for k in ("protocol", "auth", "replay", "internal", "send")
        }
        out = {
            "tasks": {"submitted": table.submitted, **table.counts, "retried": c["retried"]},
            "queues": dict(zip(PRIORITIES, table.queue.counts, strict=True)),
            "workers": [w.summary() for w in workers.by_id.values()],
            "dispatch": {"workers_lost": c["workers_lost"], "workers_left": c["workers_left"],
                         "requeued": c["requeued"], "handed_back": c["handed_back"], "late_results": c["late"]},
            "local": {"concurrency": zero.concurrency, "running": len(zero.in_flight), "completed": zero.completed,
                      "abandoned": shell.get("abandoned", 0)},
            "cache": {"size": info.size, "max_size": info.max_size, "ttl": info.ttl, "hits": info.hits,
                      "misses": info.misses, "evictions": info.evictions, "expired": info.expired},
            "clients": len(self.waiters.clients),
            "flow": self.flow.summary(),
            "schedules": self.schedules.summaries(),
            "errors": errors,
        }  # fmt: skip
        if "plane" in shell:
            out = {"plane": {**shell["plane"], "uptime": round(now.wall - self.started_at, 3)}, **out}
        return out

    def recent_tasks(self, limit: int, state: str | None, now: At, search: str | None = None) -> list[dict]:
        """Recent tasks, newest first: unfinished ones, then finished (failed
        ones are kept apart, so a flood of successes does not hide them).
        ``search`` is a task's id, or part of its name or of its id.  At most
        RECENT_SCAN tasks are looked at."""
        table, figures = self.table, self.figures
        if search:
            task = table.tasks.get(search) or table.cache.peek(search, now.mono)
            if task is not None:
                return [task.summary(now)] if state is None or task.state == state else []
        out: list[dict] = []
        unfinished = () if state in TERMINAL else reversed(table.tasks.values())
        finished = (() if state in (QUEUED, SCHEDULED, RUNNING)
                    else reversed(figures.recent_failed if state == FAILED else figures.recent))  # fmt: skip
        for task in itertools.islice(itertools.chain(unfinished, finished), RECENT_SCAN):
            if len(out) >= limit:
                break
            if (state is None or task.state == state) and (not search or search in task.name or search in task.id):
                out.append(task.summary(now))
        return out

    def task_detail(self, tid: str, now: At) -> dict | None:
        """A task's page: see _Task.detail(); why it waits, if it does."""
        task = self.table.find(tid, now)
        if task is None:
            return None
        out = task.detail(now, self.log_args)
        if task.state == QUEUED or task.state == SCHEDULED:
            out["waiting"], out["why"] = self._waiting(task, now)
        return out


###############################################################################
# Running tasks ###############################################################
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


class _Escaped(Exception):
    """A task's KeyboardInterrupt or SystemExit, carried as an ordinary
    exception: asyncio lets those two stop the event loop itself."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(exc)
        self.exc = exc


async def _contained(coro: Any) -> Any:
    try:
        return await coro
    except (KeyboardInterrupt, SystemExit) as e:
        raise _Escaped(e) from None


def _failure(kind: str, exc: BaseException, skip_frames: int = 1, fn: Callable | None = None) -> dict:
    """The ERROR of a run that raised ``exc``, its traceback starting at the
    task (``skip_frames`` of ours dropped).  An exception that never got
    into ``fn`` (the call itself failed: wrong arguments) gets a traceback
    that points at ``fn``'s definition, not at fastworker."""
    tb = exc.__traceback__
    if fn is not None and skip_frames and (tb is None or tb.tb_next is None):
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if code is not None:
            line = code.co_firstlineno  # its first decorator: find the "def" line below it
            for n in range(line, line + 20):
                if linecache.getline(code.co_filename, n).lstrip().startswith(("def ", "async def ")):
                    line = n
                    break
            frame = traceback.FrameSummary(code.co_filename, line, code.co_name)
            text = "Traceback (most recent call last):\n" + "".join(traceback.format_list([frame]))
            text += "".join(traceback.format_exception_only(type(exc), exc))
            return _error(kind, type(exc).__name__, str(exc), text)
    for _ in range(skip_frames):  # start the traceback at the task, not at us
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return _error(kind, type(exc).__name__, str(exc), text)


class _Executor:
    """Runs jobs: the plane's own (worker zero) and a subworker's.

    ``concurrency`` threads take jobs from ``inbox`` (None stops one) and run
    them; ``async def`` tasks run on one event loop instead, so they hold a
    slot but no thread.  ``begin(job)``, if given, is asked before a job
    starts (False: skip it).  Every outcome goes to ``report(job, state,
    item, error)``, whatever the task does: a task that raises anything,
    ``KeyboardInterrupt`` and ``SystemExit`` included, fails with its type
    and message, and the runner goes on.  A job with a time limit runs on a
    thread of its own: past the limit it is reported as TaskTimeout and its
    thread is abandoned, and if it is still running ``margin`` seconds later
    ``on_overrun(job)`` is called.
    """

    def __init__(
        self,
        concurrency: int,
        report: Callable[[_Job, str, bytes, dict | None], None],
        max_size: int,
        begin: Callable[[_Job], bool] | None = None,
        on_overrun: Callable[[_Job], None] | None = None,
        margin: float = 1.0,
        prioritized: bool = False,
    ) -> None:
        self.concurrency = concurrency
        self.margin = margin
        # Jobs not yet started: first come first served in ``inbox`` (None
        # stops a runner), or, ``prioritized``, one queue per priority with a
        # token per job in ``inbox``: a runner takes a token, then the best job.
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ranks = [queue.SimpleQueue() for _ in PRIORITIES] if prioritized else None
        self._report = report
        self._begin = begin
        self._max_size = max_size
        self._on_overrun = on_overrun
        self._loop = _AsyncRunner()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards abandoned and each limited job's state cell
        self.abandoned = 0  # task threads still running past their time limit

    def start(self, prefix: str) -> None:
        for _ in range(self.concurrency):
            t = threading.Thread(target=self._serve, name=f"{prefix}-runner", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, deadline: float) -> None:
        """Tell every runner to exit once it is idle, wait for them until
        ``deadline``, then stop the event loop."""
        for _ in self._threads:
            self.inbox.put(None)
        _join(self._threads, deadline)
        self._loop.stop(max(0.1, deadline - time.monotonic()))

    def _serve(self) -> None:
        get, ranks = self.inbox.get, self._ranks
        while (job := get()) is not None:
            if ranks is not None:  # a token: the most urgent job waiting (there is one per token)
                for q in ranks:
                    try:
                        job = q.get_nowait()
                        break
                    except queue.Empty:
                        continue  # empty, or another runner was quicker
            if self._begin is None or self._begin(job):
                self._run(job)

    def put(self, job: _Job) -> None:
        if self._ranks is not None:
            self._ranks[job.rank].put(job)
            job = True  # its token
        self.inbox.put(job)

    def _done(self, job: _Job, state: str, item: bytes, error: dict | None) -> None:
        try:
            self._report(job, state, item, error)
        except Exception:
            logger.exception("could not report the outcome of task %s", job.id)

    def _failed(self, job: _Job, err: dict) -> tuple[str, bytes, dict]:
        return FAILED, encode_result(job.id, FAILED, error=err, run=job.run), err

    def _encode(self, job: _Job, value: Any) -> tuple[str, bytes, dict | None]:
        try:
            item = encode_result(job.id, SUCCEEDED, value, run=job.run)
        except (TypeError, ValueError, RecursionError) as e:
            err = _error("raised", "TypeError", f"the result of task {job.name!r} is not JSON-serializable: {e}")
            return self._failed(job, err)
        if len(item) > self._max_size - 4096:
            err = _error(
                "raised", "ValueError", f"the result of task {job.name!r} is {len(item)} bytes, over the limit"
            )
            return self._failed(job, err)
        return SUCCEEDED, item, None

    def _call(self, job: _Job, spec: TaskSpec) -> tuple[str, bytes, dict | None]:
        try:
            value = spec.fn(*job.args, **job.kwargs)
        except BaseException as e:  # noqa: B036 - a task's exception, whatever it is, is its outcome
            return self._failed(job, _failure("raised", e, fn=spec.fn))
        return self._encode(job, value)

    def _run(self, job: _Job) -> None:
        spec = _registry.get(job.name)
        if spec is None:
            err = _error("unknown_task", "UnknownTask", f"no task named {job.name!r} is registered here")
            self._done(job, *self._failed(job, err))
        elif spec.is_async:
            try:
                coro = spec.fn(*job.args, **job.kwargs)
            except BaseException as e:  # noqa: B036 - wrong arguments fail before there is a coroutine
                return self._done(job, *self._failed(job, _failure("raised", e, fn=spec.fn)))
            coro = _contained(coro)
            if job.timeout:
                coro = asyncio.wait_for(coro, job.timeout)
            started = time.monotonic()
            self._loop.submit(coro, lambda fut: self._async_done(job, fut, started))
        elif job.timeout:
            self._run_limited(job, spec)
        else:
            self._done(job, *self._call(job, spec))

    def _async_done(self, job: _Job, fut: concurrent.futures.Future, started: float) -> None:
        try:
            outcome = self._encode(job, fut.result())
        except (asyncio.TimeoutError, TimeoutError) as e:
            if job.timeout and time.monotonic() - started >= job.timeout * 0.999:
                outcome = self._failed(job, self._overran(job))
            else:
                outcome = self._failed(job, _failure("raised", e, 0))
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            outcome = self._failed(job, _error("raised", "CancelledError", "the task was cancelled at shutdown"))
        except _Escaped as e:
            outcome = self._failed(job, _failure("raised", e.exc, 1))
        except BaseException as e:  # noqa: B036 - the task's own exception
            outcome = self._failed(job, _failure("raised", e, 0))
        self._done(job, *outcome)

    @staticmethod
    def _overran(job: _Job) -> dict:
        return _error("timeout", "TaskTimeout", f"task {job.name!r} ran past its time limit of {job.timeout:g} s")

    def _run_limited(self, job: _Job, spec: TaskSpec) -> None:
        outcome: list = []
        state = ["running"]  # -> "done", or -> "abandoned" -> "done"; guarded by self._lock

        def target() -> None:
            try:
                outcome.append(self._call(job, spec))
            finally:
                with self._lock:
                    if state[0] == "abandoned":
                        self.abandoned -= 1
                    state[0] = "done"

        t = threading.Thread(target=target, name="fastworker-task", daemon=True)
        t.start()
        t.join(job.timeout)  # bounded by MAX_TIMEOUT, so it cannot overflow
        with self._lock:
            finished = state[0] == "done"
            if not finished:
                state[0] = "abandoned"
                self.abandoned += 1
        if finished and outcome:
            return self._done(job, *outcome[0])
        self._done(job, *self._failed(job, self._overran(job)))
        if self._on_overrun is not None:
            t.join(self.margin)
            if t.is_alive():
                self._on_overrun(job)


###############################################################################
# NNG transport ###############################################################
###############################################################################


def _nng_ms(timeout: float | None) -> int:
    """Seconds (None = forever) as an NNG duration in milliseconds."""
    return -1 if timeout is None else max(0, int(timeout * 1000))


# Why _Chan calls NNG through pynng's cffi layer (pynng.ffi, pynng.lib and
# the private Context.context / Context._context) instead of Context.send
# and Context.recv:
#   * a deadline on every wait: pynng 0.9.0 has no per-context timeout (a
#     context copies the socket's timeouts when it is made, and the option
#     setter ignores errors), and we need a different one per call;
#   * one aio per context, reused: Context.send/recv allocate an nng_aio on
#     every call, which costs more than the send itself on the hot path;
#   * the pipe a request came on, without building pynng Pipe objects under
#     the socket lock that pynng's pipe callbacks also take.
# This ties the module to pynng 0.9.0 (NNG 1.11), which the README and CI
# pin; `research/pynng.md` has the measurements.  Only nng_aio_*, nng_ctx_*,
# nng_msg_* and nng_pipe_* functions of NNG's public C API are called.
class _Chan:
    """One pynng context with its own aio: one request or reply at a time,
    and a deadline on every wait.  Not shared between threads at once; it may
    change hands (a parked request is answered by whichever thread has the
    outcome)."""

    __slots__ = ("_ctx", "_aio", "_sock")

    def __init__(self, sock: Any) -> None:
        self._ctx = sock.new_context()
        aio_p = _ffi.new("nng_aio **")
        _check_err(_nng.nng_aio_alloc(aio_p, _ffi.NULL, _ffi.NULL))
        self._aio = aio_p[0]
        self._sock = sock
        with _OPEN_LOCK:
            _OPEN_CHANS.add(self)

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

    def recv(self, timeout: float | None) -> tuple[bytes, int]:
        """The next message and the id of the pipe (connection) it came on."""
        aio = self._aio
        _nng.nng_aio_set_timeout(aio, _nng_ms(timeout))
        _nng.nng_ctx_recv(self._ctx.context, aio)
        _nng.nng_aio_wait(aio)
        _check_err(_nng.nng_aio_result(aio))
        msg = _nng.nng_aio_get_msg(aio)
        data = bytes(_ffi.buffer(_nng.nng_msg_body(msg), _nng.nng_msg_len(msg)))
        pipe = _nng.nng_pipe_id(_nng.nng_msg_get_pipe(msg))
        _nng.nng_msg_free(msg)
        return data, pipe

    def cancel(self) -> None:
        """End the send or receive under way at once (from another thread;
        _OPEN_LOCK held, so that it is not freed meanwhile)."""
        _nng.nng_aio_cancel(self._aio)

    def close(self) -> None:
        with _OPEN_LOCK:  # (claimed under the lock: two closers never free it twice)
            if self._ctx is None:
                return
            _OPEN_CHANS.discard(self)
            ctx, self._ctx = self._ctx, None
        try:
            ctx.close()
        except (pynng.NNGException, TypeError):
            pass  # the socket is already closed, which closed the context too
        ctx._context = None
        _nng.nng_aio_free(self._aio)


# NNG aborts the process when a context is used while its socket closes.
# So a socket that threads may be waiting on through channels is closed by
# _close_socket: it ends those waits first (the threads see Canceled and go),
# then closes what channels are left, then the socket.
_OPEN_CHANS: set[_Chan] = set()
# Guards _OPEN_CHANS and each open channel's aio against being freed while
# cancelled; re-entrant, as a client's finalizer may cancel a wait under it.
_OPEN_LOCK = threading.RLock()


def _close_socket(sock: Any, threads: list[threading.Thread], deadline: float) -> None:
    """Close ``sock`` once ``threads`` (which use channels on it and exit
    when their wait is cancelled) are gone, or at ``deadline``."""
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        with _OPEN_LOCK:
            for chan in _OPEN_CHANS:
                if chan._sock is sock:
                    chan.cancel()
        _join(threads, min(deadline, time.monotonic() + 0.05))
    if not any(t.is_alive() for t in threads):  # nobody uses the rest (parked, idle): close them first
        with _OPEN_LOCK:
            left = [chan for chan in _OPEN_CHANS if chan._sock is sock]
        for chan in left:
            chan.close()
    sock.close()


def _close_pipe(pipe_id: int) -> None:
    """Close one connection by its pipe id (cut off a silent worker)."""
    _nng.nng_pipe_close(_ffi.new("nng_pipe *", {"id": pipe_id})[0])


def _listen(sock: Any, address: str, flag: str) -> None:
    try:
        sock.listen(address)
    except pynng.AddressInUse:
        raise AddressInUse(
            f"address {address} is in use: is another plane running there? Stop it, or pick another with {flag}"
        ) from None


def _dial(address: str, max_message_size: int, tls: TLSFiles | None = None) -> Any:
    """A REQ socket dialling ``address`` in the background, for a client or
    a worker: it never resends a request (a resent submit would run twice)
    and redials quickly when the plane comes back."""
    _require_pynng()
    _check_address(address)
    sock = pynng.Req0(recv_max_size=max_message_size + 65536, tls_config=_tls_for(address, tls, False))
    sock.resend_time = -1
    sock.reconnect_time_min = RECONNECT_MIN_MS
    sock.reconnect_time_max = RECONNECT_MAX_MS
    try:
        sock.dial(address, block=False)
    except pynng.NNGException as e:
        sock.close()
        raise ValueError(f"cannot dial {address!r}: {e}") from None
    return sock


def _exchange(
    chan: _Chan,
    session: _Session,
    op: str,
    timeout: float,
    hold: float = 0.0,
    key: str = "",
    items: list | None = None,
    **fields: Any,
) -> dict:
    """One request on ``chan`` and its reply, decoded and checked: it must
    answer this very request.  A plane that says its boot changed is asked
    again (once).  The reply may take ``hold`` seconds more than ``timeout``.

    Raises:
        pynng.NNGException: the request or the reply did not get through.
        AuthenticationError: the plane refused the request (the secret).
        FastworkerError: the reply is not valid, or not for this request.
    """
    secret = session.secret
    for _ in range(2):
        stamp = session.stamp()
        if items is None:
            data = encode(op, secret, **fields, **stamp)
        else:
            data = encode_batch(op, key, items, secret, **fields, **stamp)
        chan.send(data, timeout)
        data = chan.recv(timeout + hold)[0]
        try:
            reply = decode(data, secret)
        except AuthenticationError:
            if secret is not None and _refusal(data) is None:  # not the plane refusing us
                raise ProtocolError("a reply without a valid tag (damaged on its way, or forged): dropped") from None
            raise
        if reply["op"] == "error" and reply["error"].get("kind") == "auth":  # the plane refused us
            raise _exception_from_wire(reply["error"])
        if session.answers(reply, stamp):
            return reply
    raise ProtocolError("the plane keeps refusing this sender's ticket")


###############################################################################
# Journal #####################################################################
###############################################################################
#
# With --journal PATH the plane keeps a write-ahead journal in one SQLite
# file (WAL mode): a row per task it has not forgotten (unfinished, or its
# result still in the cache) and a few facts in "meta" (format, version, the
# plane's id, its counters).  The core says what changed (Journal actions);
# the shell hands the records over under its lock, so they keep the core's
# order, and performs the actions that depend on them only once they are
# committed.  Commits are grouped: whoever needs a commit while none is in
# flight commits everything that has accumulated, in one transaction, and
# whoever arrives meanwhile waits for the next one.  No timers.

_JOURNAL_FORMAT = "fastworker-journal"
_JOURNAL_VERSION = 2  # 2: bodies carry flow options; an ETA's due is negative; auto_vacuum
_SQLITE_MAGIC = b"SQLite format 3\x00"

_JOURNAL_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,  -- "" is the row of the plane's counters (JSON in body)
    body TEXT NOT NULL,   -- [name, args, kwargs, rank, retries, timeout, client, submitted, flow options]
    seq INTEGER,          -- its place in the queue (none until first queued)
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    runs INTEGER NOT NULL,
    due REAL,             -- a scheduled task's time (epoch seconds; negative: an ETA, on the wall clock)
    started REAL,
    finished REAL,
    worker TEXT,
    holder TEXT,          -- id of the worker running it
    error TEXT,
    item BLOB,            -- its RESULT, once final
    crashes INTEGER NOT NULL  -- plane crashes it was running through
) WITHOUT ROWID;
"""

# A group commit is one statement: each task's row as it is at the end of
# the group (a row's body is written when the task is new and kept after),
# and the counters' row.  One statement is one transaction and one trip
# through SQLite, which matters: every trip gives up and takes back the GIL.
_SQL_ROWS = "INSERT INTO tasks VALUES {} ON CONFLICT(id) DO UPDATE SET " + ", ".join(
    ["body=CASE WHEN excluded.body != '' THEN excluded.body ELSE body END"]
    + [
        f"{c}=excluded.{c}"
        for c in "seq state attempts runs due started finished worker holder error item crashes".split()
    ]
)
_SQL_ROW = "(" + ",".join("?" * 14) + ")"
_SQL_DELETE = "DELETE FROM tasks WHERE id IN ({})"
_ROWS_PER_STATEMENT = 2000  # 14 values each, under SQLite's 32,766 variables
_DELETE_BATCH = 256  # forgotten tasks leave the file this many at a time
_VACUUM_STEP = 2000  # pages (of 4 KB) given back per commit at most, once most of the file is free


class _Journal:
    """The plane's journal file: open and check it, hold it against a second
    plane, load what it holds, and commit records in groups."""

    def __init__(self, path: str, sync: str = "normal") -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"journal sync must be normal or full, not {sync!r}")
        self.path = os.path.abspath(path)
        self.sync = sync
        self._fd: int | None = None  # held open: its flock keeps a second plane out
        self._db: Any = None
        self._lock = threading.Lock()  # guards the fields below (never held across I/O)
        self._committed_cv = threading.Condition(self._lock)  # wait_for() waits for the writer
        self._pending: list = []  # records not yet committed, in the core's order
        self._queued: list[list] = []  # the actions of each hand-over, waiting for its records
        self._counters: Any = None  # the core's counters as of the last records
        self._added = 0  # hand-overs so far
        self._performed = 0  # ... committed and performed
        self._committing = False  # a thread is the writer: it owns the connection (and _dels)
        self._dels: set[str] = set()  # tasks forgotten, not yet deleted from the file
        self.commits = 0
        self.error: str | None = None  # the last write error, until a commit succeeds
        self.closed = False
        self.accepted = False  # the plane took back what it holds (until then the file is left as it is)

    # -- opening ------------------------------------------------------------------

    def open(self) -> dict:
        """Check and lock the file (creating it if new) and load it.

        Returns:
            ``{"plane": id or None, "counters": dict or None, "rows": [...]}``.

        Raises:
            JournalError: the file is not a journal, is corrupt, was written
                by a newer version, or another plane holds it; a file that is
                refused is left exactly as it was.
        """
        import fcntl
        import sqlite3

        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise JournalError(f"journal {self.path}: the directory {folder} does not exist")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise JournalError(f"journal {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(f"journal {self.path} is in use by another plane") from None
        self._fd = fd
        try:
            new = os.fstat(fd).st_size == 0
            if not new:
                self._check(sqlite3)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
            if new:  # (only before the first table: pages freed by forgotten tasks can then go back)
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.sync.upper()}")
            db.execute("PRAGMA journal_size_limit=67108864")  # a WAL file shrinks back to 64 MB after a checkpoint
            if new:
                plane = os.urandom(8).hex()
                db.executescript(_JOURNAL_SCHEMA)
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("format", _JOURNAL_FORMAT), ("version", str(_JOURNAL_VERSION)), ("plane", plane)],
                )
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # so a later check finds all this in the file itself
                return {"plane": plane, "counters": None, "rows": []}
            meta = dict(db.execute("SELECT key, value FROM meta"))
            rows = db.execute("SELECT * FROM tasks WHERE id != ''").fetchall()
            counters = db.execute("SELECT body FROM tasks WHERE id = ''").fetchone()
            return {"plane": meta["plane"], "counters": _loads(counters[0]) if counters else None, "rows": rows}
        except (sqlite3.Error, ValueError, KeyError) as e:
            self.close()
            raise JournalError(f"journal {self.path} cannot be read: {e}") from None
        except BaseException:
            self.close()
            raise

    def accept(self) -> None:
        """The plane took back what the file holds: from now on it may
        change it.  A journal from before journals gave space back is
        rebuilt once so that they do (a refused file is never touched)."""
        import sqlite3

        self.accepted = True
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(_JOURNAL_VERSION),))
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            try:
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._db.execute("VACUUM")
            except sqlite3.Error as e:  # (it needs room for a copy of the file): it is only an optimisation
                logger.warning("journal %s: not converted to give space back (%s); it works as it is", self.path, e)

    def _check(self, sqlite3: Any) -> None:
        """Is the file a journal of ours, readable, not from a newer version?
        Read without side effects: no -wal or -shm file is made, nothing
        is written."""
        with open(self.path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC:
            raise JournalError(f"journal {self.path} is not a fastworker journal (not an SQLite file)")
        from urllib.parse import quote

        uri = "file:" + quote(self.path) + "?immutable=1"
        try:
            db = sqlite3.connect(uri, uri=True)
            try:
                if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise JournalError(f"journal {self.path} is corrupt (SQLite's quick_check failed)")
                try:
                    meta = dict(db.execute("SELECT key, value FROM meta"))
                except sqlite3.Error:
                    meta = {}
            finally:
                db.close()
        except sqlite3.DatabaseError as e:
            raise JournalError(f"journal {self.path} is corrupt: {e}") from None
        if meta.get("format") != _JOURNAL_FORMAT:
            raise JournalError(f"journal {self.path} is an SQLite file but not a fastworker journal")
        version = meta.get("version", "")
        if not version.isdigit() or int(version) > _JOURNAL_VERSION:
            raise JournalError(
                f"journal {self.path} was written by a newer fastworker (journal version {version}, "
                f"this one reads {_JOURNAL_VERSION})"
            )

    # -- writing --------------------------------------------------------------------
    #
    # The journal only keeps what it is handed and writes it: the plane's shell
    # hands over, under its lock, each core call's records with the actions
    # that must wait for them (add), and drives the group commit (take, commit,
    # done): one writer at a time takes everything handed over, commits it in
    # one transaction, carries out its actions, and looks again.

    def add(self, records: list, counters: dict | None, acts: list) -> None:
        """Hand over a core call's records and the actions that must wait
        for them (the plane's lock is held, so everything keeps the core's
        order)."""
        with self._lock:
            self._pending.extend(records)
            if counters is not None:
                self._counters = counters
            self._queued.append(acts)
            self._added += 1

    def idle(self) -> bool:
        """Nothing handed over is waiting: actions that need no record may go
        out at once (the plane's lock is held)."""
        with self._lock:
            return not self._queued and not self._committing

    def take(self) -> tuple | None:
        """Become the writer and take what was handed over: ``(records,
        counters, action lists, how many hand-overs that makes)``; None if
        another thread is the writer (it looks again after its commit) or
        nothing waits."""
        with self._lock:
            if self._committing or not self._queued or self.closed:
                return None
            self._committing = True
            batch = (self._pending, self._counters, self._queued, self._added)
            self._pending, self._queued = [], []
            return batch

    def commit(self, records: list, counters: Any) -> None:
        """(The writer.)  Commit a group, trying again until it is written
        (the plane answers nothing that is not on disk) or the journal closes."""
        while not self._write_batch(records, counters) and not self.closed:
            time.sleep(JOURNAL_RETRY)

    def done(self, upto: int) -> None:
        """(The writer.)  The actions of the first ``upto`` hand-overs are
        carried out: it is no longer the writer."""
        with self._lock:
            self._committing = False
            self._performed = upto
            self._committed_cv.notify_all()

    def wait_for(self, target: int) -> None:
        """Wait until the actions of the first ``target`` hand-overs are
        carried out (by whichever thread is the writer)."""
        with self._lock:
            while self._performed < target and not self.closed:
                self._committed_cv.wait(IDLE_WAKE)

    @property
    def added(self) -> int:
        return self._added

    def _write_batch(self, batch: list, counters: Any) -> bool:
        """Commit a group: each task's last word only (a task new in the
        group is written as it is at its end), then the counters, in one
        statement.  Forgotten tasks are deleted a few hundred at a time.
        False (said once at ERROR) if it failed."""
        rows: dict[str, list] = {}
        dels = self._dels
        for r in batch:
            tid = r[0]
            if len(r) == 1:  # forgotten
                rows.pop(tid, None)
                dels.add(tid)
                continue
            if r[1] is not None:
                dels.discard(tid)  # new: its id is in use again
            else:
                earlier = rows.get(tid)
                if earlier is not None:
                    r[1] = earlier[1]  # the body of a task new in this group
            rows[tid] = r
        if counters is not None:
            rows[""] = ["", counters, None, "counters", 0, 0, None, None, None, None, None, None, None, 0]
        for row in rows.values():
            row[1] = "" if row[1] is None else _dumps(row[1])
        params = list(rows.values())
        db = self._db
        try:
            if len(params) <= _ROWS_PER_STATEMENT:
                self._upsert(db, params)  # autocommit: one statement, one transaction
            else:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for k in range(0, len(params), _ROWS_PER_STATEMENT):
                        self._upsert(db, params[k : k + _ROWS_PER_STATEMENT])
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            if len(dels) >= _DELETE_BATCH:
                self._delete(db, dels)
        except Exception as e:
            if self.error is None:
                logger.error("cannot write the journal %s (retrying; the plane waits): %s", self.path, e)
            self.error = str(e)
            return False
        self.commits += 1
        self.error = None
        return True

    @staticmethod
    def _upsert(db: Any, rows: list) -> None:
        if rows:
            db.execute(_SQL_ROWS.format(",".join([_SQL_ROW] * len(rows))), [v for row in rows for v in row])

    @staticmethod
    def _delete(db: Any, dels: set) -> None:
        """Delete forgotten tasks; then, if most of the file is free pages
        (a backlog drained), give some of them back."""
        ids = list(dels)
        for k in range(0, len(ids), _ROWS_PER_STATEMENT):
            chunk = ids[k : k + _ROWS_PER_STATEMENT]
            db.execute(_SQL_DELETE.format(",".join("?" * len(chunk))), chunk)
        dels.clear()
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        if free > 256 and 2 * free > db.execute("PRAGMA page_count").fetchone()[0]:
            _Journal._give_back(db, _VACUUM_STEP)

    @staticmethod
    def _give_back(db: Any, pages: int | None = None) -> None:
        """Return free pages (all, or up to ``pages``) to the file system.
        (executescript steps the pragma to its end; execute frees one page.)"""
        db.executescript("PRAGMA incremental_vacuum" + ("" if pages is None else f"({int(pages)})"))

    def close(self) -> None:
        """Checkpoint and close (what is still pending is dropped: only a
        run past the shutdown grace can still report now)."""
        with self._lock:
            self.closed = True
            while self._committing:
                self._committed_cv.wait(IDLE_WAKE)
            self._pending, self._queued = [], []
        if self._db is not None:
            try:
                if self._dels:
                    self._delete(self._db, self._dels)
                if self.accepted:
                    self._give_back(self._db)  # every free page
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except Exception as e:
                logger.warning("journal %s: the last checkpoint failed: %s", self.path, e)
            self._db.close()
            self._db = None
        if self._fd is not None:  # closed last: SQLite's own locks live on the same file
            os.close(self._fd)
            self._fd = None


###############################################################################
# Client: the link ############################################################
###############################################################################

_LINKS: weakref.WeakSet = weakref.WeakSet()  # links not yet closed (guarded by _LINKS_LOCK)
_LINKS_LOCK = threading.RLock()  # (re-entrant: a finalizer may take it on a thread that holds it)
_links_at_exit = False  # _close_links is registered with atexit (guarded by _LINKS_LOCK)


def _close_links() -> None:
    """At exit: close every client link still open, all at once, so that
    none of their threads waits in NNG while the interpreter finalizes."""
    with _LINKS_LOCK:
        links = list(_LINKS)
    for link in links:
        link._begin_close(wait=False)
    for link in links:
        link._wait_threads(time.monotonic() + 2 * link.timeout + 1)


def _the_one(items: list, reply: str, tid: str) -> Any:
    """The one item a reply about one task must hold."""
    if len(items) != 1 or items[0]["id"] != tid:
        raise ProtocolError(f"a {reply!r} reply about task {tid!r} holds {len(items)} item(s), not that one")
    return items[0]


class _Link:
    """A client's connection to its plane: one socket; the sender thread,
    which sends submissions and cancels in the order they were made; the
    poller thread, which brings results back and completes the futures
    waiting for them.  Safe to share between threads."""

    def __init__(
        self, address: str, secret: bytes | None, timeout: float, max_message_size: int, tls: TLSFiles
    ) -> None:
        self._sock = _dial(address, max_message_size, tls)
        self.address = address
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.secret = secret
        self._session = _Session(secret)
        self.id = os.urandom(8).hex()
        self._ids = itertools.count(1)
        # Guards _outbox, _sending, _pending, _streams,
        # _threads, _poll_chan and the flags; never held across I/O.  Re-entrant:
        # release() may run as a finalizer on a thread that holds it already.
        self._lock = threading.RLock()
        self._has_work = threading.Condition(self._lock)  # the sender waits for something to send
        self._has_pending = threading.Condition(self._lock)  # the poller waits for futures
        self._flushed = threading.Condition(self._lock)  # queries wait for what was sent before them
        # What the sender sends, in call order: ("submit", TASK bytes, future)
        # or ("cancel", task id, None).
        self._outbox: list[tuple[str, Any, Future | None]] = []
        self._sending = False  # a batch is on its way
        self._pending: dict[str, Future] = {}
        self._threads: list[threading.Thread] = []
        self._poll_chan: _Chan | None = None  # the poller's, while it polls (its wait is cut short by release())
        self._plane_id: str | None = None  # the plane that answers (read and written by the poller only)
        self._boot: str | None = None  # ... and its process (the poller only)
        # Closing: no new submissions; the sender sends what waits and exits;
        # the poller goes on while futures wait for results (if _wait), and
        # the last of the two to exit finishes (_finish: the socket closes).
        self._closing = False
        self._wait = True  # closing waits for the pending futures' results
        self._sent_all = False  # the sender exited
        self._live = 0  # the link's threads still running
        self._finished = False  # _finish() has run (or runs)
        self._streams: list[_EventStream] = []  # on_complete's subscriptions, closed with the link
        global _links_at_exit
        with _LINKS_LOCK:
            _LINKS.add(self)
            if not _links_at_exit:
                atexit.register(_close_links)
                _links_at_exit = True

    def new_id(self) -> str:
        return f"{self.id}-{next(self._ids)}"

    # -- sending ---------------------------------------------------------

    def enqueue(self, fut: Future, data: bytes) -> None:
        """Send a submission (a TASK item) after everything before it."""
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._threads:
                self._start()
            if not self._pending:
                self._has_pending.notify()
            self._pending[fut.task_id] = fut
            self._outbox.append(("submit", data, fut))
            self._has_work.notify()

    def _start(self) -> None:
        """Start the sender and the poller (lock held)."""
        for target, name in ((self._send, "sender"), (self._poll, "poller")):
            t = threading.Thread(target=target, name=f"fastworker-client-{name}", daemon=True)
            self._live += 1
            t.start()
            self._threads.append(t)

    def _exit(self) -> None:
        """A thread of the link ends; the last one finishes the link if it
        is closing (so the socket closes after every use of it)."""
        with self._lock:
            self._live -= 1
            last = self._live == 0 and self._closing
        if last:
            self._finish()

    def _send(self) -> None:
        """Send whatever waits in the outbox, in order: a run of submissions
        as one message (up to a size), a run of cancels as another; repeat.
        One message at a time, so nothing overtakes what was sent before."""
        chan = _Chan(self._sock)
        try:
            while True:
                with self._lock:
                    while not self._outbox and not self._closing:
                        self._has_work.wait(IDLE_WAKE)
                    if not self._outbox:
                        return
                    kind = self._outbox[0][0]
                    batch, size = [], 0
                    for entry in self._outbox:
                        if entry[0] != kind or (batch and size + len(entry[1]) > _BATCH_BYTES):
                            break
                        batch.append(entry)
                        size += len(entry[1])
                    del self._outbox[: len(batch)]
                    if kind == "submit":
                        batch = [e for e in batch if not e[2]._dropped]
                        for _, _, fut in batch:
                            fut._sent = True
                    self._sending = True
                try:
                    if kind == "submit":
                        if batch:
                            self._send_batch(chan, [(data, fut) for _, data, fut in batch])
                    else:
                        self._send_cancels(chan, [tid for _, tid, _ in batch])
                finally:
                    with self._lock:
                        self._sending = False
                        if not self._outbox:
                            self._flushed.notify_all()
        finally:
            chan.close()
            with self._lock:
                self._sent_all = True
                self._has_pending.notify_all()
                if not self._wait:  # closing without waiting: the poller stops now
                    self._cut_poll()
            self._exit()

    def _send_batch(self, chan: _Chan, batch: list[tuple[bytes, Future]]) -> None:
        items = [d for d, _ in batch]
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                try:
                    left = max(0.0, deadline - time.monotonic())
                    reply = _exchange(chan, self._session, "submit", left, key="tasks", items=items, client=self.id)
                    break
                except pynng.ConnectionReset:
                    # The connection dropped with the batch on its way: the
                    # plane may have it or not.  Send it again once it is
                    # back; a plane accepts a task its client sends twice once.
                    if time.monotonic() >= deadline:
                        raise pynng.Timeout("no answer", 0) from None
        except pynng.Timeout:
            # Nothing queued behind this batch can get through either: fail
            # it all now rather than one timeout per batch.
            with self._lock:
                batch += [(d, f) for kind, d, f in self._outbox if kind == "submit"]
                self._outbox = [e for e in self._outbox if e[0] != "submit"]
            return self._fail([f for _, f in batch], self.unreachable())
        except pynng.NNGException as e:
            return self._fail([f for _, f in batch], PlaneUnavailable(f"lost the plane at {self.address}: {e}"))
        except FastworkerError as e:
            return self._fail([f for _, f in batch], e)
        if reply["op"] == "error":
            return self._fail([f for _, f in batch], _exception_from_wire(reply["error"]))
        if reply["op"] != "accepted":
            err = ProtocolError(f"the plane answered a 'submit' request with {reply['op']!r}, not 'accepted'")
            return self._fail([f for _, f in batch], err)
        plane = reply["plane"]
        with self._lock:
            for _, fut in batch:
                fut._plane = plane
        rejected = {r.get("id"): r.get("error") for r in reply["rejected"] if isinstance(r, dict)}
        if rejected:
            self._fail([f for _, f in batch if f.task_id in rejected], None, rejected)
        joined = reply.get("joined")
        if type(joined) is list:
            self._join(joined)

    def _join(self, joined: list) -> None:
        """Submissions the plane joined to an unfinished task of their key:
        each future keeps its own id (the plane answers for it with that
        task's state and outcome) and notes which task it joined."""
        with self._lock:
            for pair in joined:
                if type(pair) is list and len(pair) == 2 and all(type(x) is str for x in pair):
                    fut = self._pending.get(pair[0])
                    if fut is not None:
                        fut._joined_to = pair[1]

    def _send_cancels(self, chan: _Chan, ids: list[str]) -> None:
        """Tell the plane about futures cancelled here (best effort: the
        futures are cancelled already)."""
        try:
            _exchange(chan, self._session, "cancel", self.timeout, ids=ids)
        except (pynng.NNGException, FastworkerError) as e:
            logger.debug("could not tell the plane of %d cancelled task(s): %s", len(ids), e)

    def unreachable(self) -> PlaneUnavailable:
        return PlaneUnavailable(
            f"no answer from the plane at {self.address} within {self.timeout:g} s: "
            f"is `python fastworker.py plane` running at {self.address}?"
        )

    def _fail(self, futs: list[Future], exc: BaseException | None, errors: dict | None = None) -> None:
        with self._lock:
            for fut in futs:
                self._pending.pop(fut.task_id, None)
        for fut in futs:
            fut._settle(exc=exc if errors is None else _exception_from_wire(errors[fut.task_id]))

    def forget(self, fut: Future) -> None:
        """A future is being cancelled here: stop waiting for it, and cancel
        its task at the plane too (after what was sent before), or never send
        it if it has not gone yet.  A future that joined another submission's
        task (by key) only stops waiting, and so does one whose task other
        futures here joined."""
        with self._lock:
            if self._pending.pop(fut.task_id, None) is None:
                return
            if fut._sent and not self._closing:
                self._outbox.append(("cancel", fut.task_id, None))
                if not self._threads:
                    self._start()
                self._has_work.notify()
            else:
                fut._dropped = True

    # -- receiving --------------------------------------------------------

    def _waited(self) -> bool:
        """Does a future still wait for a result here (lock held)?"""
        return bool(self._pending)

    def _idle(self) -> bool:
        """Has the poller nothing to wait for, for good (lock held)?"""
        return self._closing and self._sent_all and (not self._wait or not self._waited())

    def _cut_poll(self) -> None:
        """End the poll under way at once (lock held)."""
        if self._poll_chan is not None:
            with _OPEN_LOCK:
                self._poll_chan.cancel()

    def _poll(self) -> None:
        """Keep one long-poll parked at the plane while results are due, and
        complete futures with whatever it brings back."""
        chan = _Chan(self._sock)
        lost_at = None
        busy_until = 0.0  # keep polling a while after the last result
        quick = 0  # empty answers in a row that came back at once (then it pauses: a plane must not make it spin)
        try:
            while True:
                with self._lock:
                    while not (self._idle() or self._waited()) and (self._closing or time.monotonic() > busy_until):
                        self._has_pending.wait(IDLE_WAKE)
                    if self._idle():
                        return
                    self._poll_chan = chan
                asked = time.monotonic()
                try:
                    msg = _exchange(
                        chan, self._session, "poll", self.timeout, POLL_WAIT, client=self.id, wait=POLL_WAIT
                    )
                    if msg["op"] != "results":
                        raise ProtocolError(f"the plane answered a 'poll' request with {msg['op']!r}, not 'results'")
                    plane = msg["plane"]
                    if plane != self._plane_id:  # a plane restarted without its journal: its tasks are gone
                        self._plane_id = plane
                        self._fail_pending(PlaneUnavailable("the plane restarted; the task was lost"), plane)
                    self._deliver(msg["results"])
                    boot, self._boot = self._boot, msg.get("boot")
                    if msg.get("closing"):
                        self._fail_lost(msg.get("lost") or [])
                    elif lost_at is not None or boot not in (None, self._boot) or msg.get("resync"):
                        self._resync(chan, plane)  # back after a break, or the plane restarted: what did we miss?
                    lost_at = None
                    quick = 0 if msg["results"] or time.monotonic() - asked > POLL_WAIT / 2 else quick + 1
                except pynng.Closed:
                    return
                except AuthenticationError as e:  # no use asking again: say so now
                    self._fail_pending(e)
                    with self._lock:
                        self._has_pending.wait(1.0)
                    continue
                except (pynng.NNGException, FastworkerError) as e:
                    with self._lock:
                        if self._idle():
                            return
                    now = time.monotonic()
                    # silent past the poll's hold: lost since the plane should have answered
                    lost_at = lost_at or (asked + POLL_WAIT if isinstance(e, pynng.Timeout) else now)
                    if now - lost_at >= self.timeout:
                        why = "no answer" if isinstance(e, pynng.Timeout) else str(e)
                        self._fail_pending(PlaneUnavailable(
                            f"lost the plane at {self.address} ({why} for {now - lost_at:.0f} s): is it running, "
                            "and can this machine reach it?"))  # fmt: skip
                        lost_at = None
                    with self._lock:  # brief pause so a dead plane is not hammered
                        self._has_pending.wait(0.05)
                    continue
                finally:
                    with self._lock:
                        self._poll_chan = None
                if quick > 1:  # a plane that answers at once again and again: ask less often
                    with self._lock:
                        self._has_pending.wait(min(0.01 * 2 ** (quick - 2), 1.0))
                busy_until = time.monotonic() + POLL_WAIT
        finally:
            chan.close()
            self._exit()

    def _deliver(self, results: list[dict]) -> None:
        with self._lock:
            done = [(self._pending.pop(r["id"], None), r) for r in results]
        for fut, r in done:
            if fut is not None:
                self._complete(fut, r)

    @staticmethod
    def _complete(fut: Future, r: dict) -> None:
        """Complete a future with a RESULT item."""
        state = r["state"]
        if state == SUCCEEDED:
            fut._settle(r.get("result"))
        elif state == CANCELLED:
            fut._set_cancelled()
        else:
            fut._settle(exc=_exception_from_wire(r.get("error")))

    def _fail_lost(self, lost: list) -> None:
        """A plane that stopped named this client's tasks that will not finish."""
        state = dict(lost)
        with self._lock:
            futs = [self._pending.pop(tid) for tid in state if tid in self._pending]
        for fut in futs:
            why = f"the plane at {self.address} stopped before the task finished (it was {state[fut.task_id]})"
            fut._settle(exc=PlaneUnavailable(why))

    def _resync(self, chan: _Chan, plane: str) -> None:
        """After a break (or when the plane says it dropped undelivered
        results), ask the plane about every task still pending here: results
        sent while we were away (or by a plane that restarted with its
        journal) are collected, and tasks it no longer knows fail."""
        with self._lock:
            ids = [tid for tid, f in self._pending.items() if f._plane == plane]
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            msg = _exchange(chan, self._session, "fetch", self.timeout, ids=chunk, wait=0)
            if msg["op"] != "results" or [r["id"] for r in msg["results"]] != chunk:
                raise ProtocolError(f"the plane answered a 'fetch' of {len(chunk)} tasks with something else")
            self._deliver([r for r in msg["results"] if r["state"] in TERMINAL])
            gone = [r["id"] for r in msg["results"] if r["state"] == "unknown"]
            if gone:
                with self._lock:
                    futs = [self._pending.pop(tid) for tid in gone if tid in self._pending]
                for fut in futs:
                    fut._settle(exc=PlaneUnavailable("the plane no longer knows the task (it restarted without it)"))

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

    def pending(self, task_id: str) -> Future | None:
        with self._lock:
            return self._pending.get(task_id)

    def take(self, task_id: str) -> Future | None:
        """Stop waiting for a task's future here (the plane cancelled it)."""
        with self._lock:
            return self._pending.pop(task_id, None)

    def flush(self) -> None:
        """Wait (up to the timeout) until everything this client sent before
        has reached the plane, so a query sees every task submitted before it."""
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while (self._outbox or self._sending) and time.monotonic() < deadline:
                self._flushed.wait(deadline - time.monotonic())

    def call(self, op: str, expect: str, hold: float = 0.0, timeout: float | None = None, **fields: Any) -> dict:
        """One request/reply on a context of its own, within ``timeout``
        (default: the client's); the plane may hold the request ``hold``
        seconds more before it answers.

        Raises:
            ProtocolError: the plane answered with something else than ``expect``.
            PlaneUnavailable: no answer in time, or the connection failed.
            FastworkerError: the plane answered with an error.
        """
        timeout = self.timeout if timeout is None else timeout
        try:
            chan = _Chan(self._sock)
        except pynng.NNGException:
            raise PlaneUnavailable("the client is closed") from None
        try:
            msg = _exchange(chan, self._session, op, timeout, hold, **fields)
        except pynng.Timeout:
            raise self.unreachable() from None
        except pynng.NNGException as e:
            raise PlaneUnavailable(f"lost the plane at {self.address}: {e}") from None
        finally:
            chan.close()
        if msg["op"] == "error":
            raise _exception_from_wire(msg["error"])
        if msg["op"] != expect:
            raise ProtocolError(f"the plane answered a {op!r} request with {msg['op']!r}, not {expect!r}")
        return msg

    # -- lifetime ---------------------------------------------------------

    def add_stream(self, stream: _EventStream) -> None:
        with self._lock:
            if self._closing:
                stream.close()
                raise RuntimeError("the client is closed")
            self._streams.append(stream)

    def _begin_close(self, wait: bool) -> bool:
        """Start closing (``wait``: for the pending futures' results too; a
        later call can only make it stop waiting); False if it was closing
        already.  It never waits itself."""
        with self._lock:
            first = not self._closing
            self._closing = True
            self._wait = self._wait and wait if not first else wait
            self._has_work.notify_all()
            self._has_pending.notify_all()
            if (self._sent_all and not self._wait) or not self._waited():
                self._cut_poll()  # nothing to wait for: stop polling now
            started = bool(self._threads)
        if first and not started:  # nothing ever used the socket
            self._finish()
        return first

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Close: send what was submitted; with ``wait``, wait for every
        pending future; then fail the futures still pending, and close.  On
        one of the link's own threads (a done-callback) it only starts
        closing; a second call waits for the first one's close."""
        if cancel_futures:
            with self._lock:
                pending = list(self._pending.values())
            for fut in pending:
                fut.cancel()
        own = threading.current_thread() in self._threads
        self._begin_close(wait and not own)
        if not own:
            self._wait_threads(None)

    def _wait_threads(self, deadline: float | None) -> None:
        """Wait for the link's threads to end (the sender's every message
        has a deadline, and so has the poller's every wait), cutting the
        poll short again and again once there is nothing left to wait for
        (a cut can come just before the poll starts, and be lost)."""
        while any(t.is_alive() for t in self._threads):
            if deadline is not None and time.monotonic() >= deadline:
                return
            with self._lock:
                if self._sent_all and not (self._wait and self._waited()):
                    self._cut_poll()
            _join(self._threads, time.monotonic() + 0.05)

    def release(self) -> None:
        """Its Client was collected: send what was submitted, deliver the
        results still due, then close, in the background.  This may run on
        any thread (a finalizer, in the middle of anything), so it never
        waits."""
        self._begin_close(wait=True)

    def _finish(self) -> None:
        """(The last thread out, or the closer of a link that never started
        them.)  Fail what is still pending, say goodbye, close the socket."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            left = list(self._pending.values())
            self._pending.clear()
            streams, self._streams = self._streams, []
        for stream in streams:
            stream.close()
        for fut in left:
            fut._settle(exc=FastworkerError("the client closed before the result arrived"))
        if self._threads:
            try:
                self.call("bye", "ok", timeout=0.2, client=self.id)  # a courtesy: one short try
            except FastworkerError:
                pass
        _close_socket(self._sock, [], time.monotonic())
        with _LINKS_LOCK:
            _LINKS.discard(self)


###############################################################################
# Client ######################################################################
###############################################################################
#
# A Client is the user's handle; its _Link is the machinery: the socket, the
# sender and poller threads and the futures they complete.  The threads and
# the futures hold the link, never the Client, so a Client the program drops
# without close() is collected: its link then sends what was submitted,
# delivers the results still due and closes by itself.  At exit every link
# still open is closed before the interpreter finalizes (NNG aborts the
# process if one of its waits is still under way then).


class Future(concurrent.futures.Future):
    """The future result of one task.

    A ``concurrent.futures.Future``: use ``result()``, ``exception()``,
    ``done()``, ``add_done_callback()``, ``concurrent.futures.wait`` and
    ``as_completed``, or ``await`` it in asyncio.  A background receiver in
    the client completes it; nobody polls.  ``task_id`` identifies the task
    on the plane (``Client.result``/``status``/``cancel`` take it).
    """

    def __init__(self, link: _Link, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id
        self._link = link
        self._plane: str | None = None  # id of the plane that accepted it (guarded by the link's lock)
        self._sent = False  # taken into a batch (guarded by the link's lock)
        self._dropped = False  # cancelled before it was sent: never send it (guarded by the link's lock)
        self._joined_to: str | None = None  # the task it joined by its key, if it did (guarded by the link's lock)

    def cancel(self) -> bool:
        """Cancel this future at once, without waiting for the network.

        The plane is told in the background: a task that has not started yet
        (queued or scheduled) is cancelled there too; one already running
        runs to its end, but this future stays cancelled.  Returns False only
        if the future was already done (with a result or an error).
        ``Client.cancel(task_id)`` asks the plane and says what it did.
        """
        if self.done():
            return self.cancelled()
        self._link.forget(self)
        return self._set_cancelled()

    def _set_cancelled(self) -> bool:
        if not concurrent.futures.Future.cancel(self):
            return False
        self.set_running_or_notify_cancel()
        return True

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

    One client is safe to share between threads.  Submissions go out in the
    order ``submit`` was called, on one sender thread: what piles up while a
    message is on its way leaves together in the next one, so ``submit()``
    returns at once.  Results come back in batches on a long-poll.  A client
    the program drops without ``close()`` still sends what was submitted and
    delivers its futures' results, then closes itself; one still open at
    exit is closed then.

    Args:
        address: the plane's address.
        secret: shared secret for message tags; defaults to the
            ``FASTWORKER_SECRET`` environment variable.
        timeout: seconds to reach the plane before an operation fails with
            ``PlaneUnavailable``.  Waiting for a result has no limit unless
            you give ``result()`` a timeout.
        max_message_size: the largest message it sends or takes, in bytes.
        tls_cert, tls_key, tls_ca: PEM files for a ``tls+tcp://`` address:
            this client's certificate and key, if the plane wants one (mutual
            TLS), and the CA that signed the plane's certificate.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        secret: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> None:
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        _check_size(max_message_size)
        self._tls = TLSFiles(tls_cert, tls_key, tls_ca)
        self._secret = _secret_bytes(secret)
        self._link = _Link(address, self._secret, timeout, max_message_size, self._tls)
        weakref.finalize(self, self._link.release).atexit = False  # (at exit _close_links closes it)
        self.address = address
        self.timeout = timeout
        self.max_message_size = max_message_size

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
        eta: Any = None,
        key: str | None = None,
        debounce: float | None = None,
        debounce_max: float | None = None,
        tenant: str | None = None,
        concurrency: int | None = None,
        rate: str | None = None,
        tenant_concurrency: int | None = None,
    ) -> Future:
        """Submit a task with explicit options; ``None`` keeps the task's
        default.  ``priority`` is one of critical, high, normal, low;
        ``delay`` is seconds before the task may run, or ``eta`` the time
        (an aware ``datetime`` or seconds since the epoch; by the plane's
        clock); ``retries`` how often a failed run is retried; ``timeout``
        the time limit of one run.

        Flow control: while a task with the same ``key`` is unfinished, this
        submission joins it: the future keeps its own ``task_id``, which
        answers for that task (``status`` says which: ``"joined"``), gets its
        outcome, and nothing runs twice (the task's ``key=`` function gives a key when
        none is given).  With ``debounce`` seconds (and a key) the task waits
        that long; a newer submission of the key replaces its arguments and
        restarts the wait, up to ``debounce_max`` (default 10 x debounce)
        after the burst's first.  ``tenant`` names whose task it is: within
        a priority, tenants take turns.  ``concurrency``, ``rate`` ("100/s",
        "/m", "/h") and ``tenant_concurrency`` override the task's limits.

        Raises:
            TypeError: an argument is not JSON-serializable, or the task's
                function (when this process knows it: the function itself,
                or a task of that name registered here) cannot take the
                arguments.  Nothing is sent.
            ValueError: an option is invalid (a naive datetime too) or the
                task is too large.
        """
        link = self._link
        tid = link.new_id()
        name = _task_name(fn)
        spec = _registry.get(name) if isinstance(fn, str) else getattr(fn, "__fastworker_task__", None)
        if spec is not None:
            if type(args) is not tuple and type(args) is not list:
                args = tuple(args)
            spec.check_call(args, kwargs)
            if spec.key is not None and key is None:
                key = spec.key(*args, **(kwargs or {}))
                if type(key) is not str:
                    raise ValueError(f"the key function of task {name!r} must return a string, not {key!r}")
            if key is not None and debounce is None and spec.debounce is not None:
                debounce, debounce_max = spec.debounce, debounce_max or spec.debounce_max
        flow = (key, debounce, debounce_max, tenant, concurrency, rate, tenant_concurrency)
        data = encode_task(
            tid,
            name,
            args,
            kwargs,
            priority=priority,
            retries=retries,
            timeout=timeout,
            delay=delay,
            eta=None if eta is None else _epoch(eta),
            **(_NO_FLOW if flow == _NO_FLOW_VALUES else dict(zip(_FLOW_OPTIONS, flow, strict=True))),
        )
        if len(data) > self.max_message_size - _BATCH_MARGIN:
            raise ValueError(f"task {tid} is {len(data)} bytes, over the message size limit")
        fut = Future(link, tid)
        link.enqueue(fut, data)
        return fut

    # -- requests ---------------------------------------------------------

    def _flush(self) -> None:
        """Wait until everything submitted before has reached the plane."""
        self._link.flush()

    def _call(self, op: str, expect: str, hold: float = 0.0, timeout: float | None = None, **fields: Any) -> dict:
        return self._link.call(op, expect, hold, timeout, **fields)

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """The result of any task by id, waiting up to ``timeout`` seconds.

        Raises:
            ResultExpired: the plane does not hold the result (unknown id,
                evicted or expired).
            TaskError: the task failed.  TimeoutError: not done in time.
        """
        fut = self._link.pending(task_id)
        if fut is not None:
            return fut.result(timeout)
        self._flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_WAIT if deadline is None else max(0.0, min(POLL_WAIT, deadline - time.monotonic()))
            r = _the_one(self._call("fetch", "results", wait, ids=[task_id], wait=wait)["results"], "results", task_id)
            state = r.get("state")
            if state == SUCCEEDED:
                return r.get("result")
            if state == FAILED:
                raise _exception_from_wire(r.get("error"))
            if state == CANCELLED:
                raise concurrent.futures.CancelledError(task_id)
            if state not in (QUEUED, SCHEDULED, RUNNING):
                raise ResultExpired(f"the plane holds no result for task {task_id!r} (unknown, evicted or expired)")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id!r} is still {state}")

    def status(self, task_id: str) -> dict:
        """The task's state and timings: ``{"id", "state", ...}``; state is
        "unknown" when the plane no longer remembers it."""
        self._flush()
        return _the_one(self._call("status", "statuses", ids=[task_id])["statuses"], "statuses", task_id)

    def cancel(self, task_id: str) -> bool:
        """Cancel a task that has not started (queued or scheduled); True if
        the plane cancelled it.  Asks the plane and waits for its answer."""
        self._flush()
        cancelled = task_id in self._call("cancel", "cancelled", ids=[task_id])["ids"]
        if cancelled:
            fut = self._link.take(task_id)
            if fut is not None:
                fut._set_cancelled()
        return cancelled

    def stats(self) -> dict:
        """The plane's statistics, the same JSON as the dashboard's /api/stats."""
        self._flush()
        return self._call("stats", "report")["stats"]

    def purge(self, priority: str | None = None) -> int:
        """Cancel every queued task (of one priority, or of all); tasks that
        are scheduled or running are left alone.  Returns how many it
        cancelled (they count as cancelled)."""
        if priority is not None and priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        self._flush()
        fields = {} if priority is None else {"priority": priority}
        return self._call("purge", "purged", **fields)["count"]

    def tasks(self, limit: int = 50, state: str | None = None, search: str | None = None) -> list[dict]:
        """Recent tasks as the dashboard lists them, newest first: unfinished
        ones, then finished; ``state`` keeps one state, ``search`` is a
        task id, or part of a name or an id."""
        if not 0 <= limit <= MAX_RECENT or state not in (None, *STATES):
            raise ValueError(f"limit must be 0..{MAX_RECENT} and state one of {', '.join(STATES)}")
        fields: dict[str, Any] = {"limit": limit}
        if state is not None:
            fields["state"] = state
        if search:
            fields["search"] = search
        return self._call("recent", "statuses", **fields)["statuses"]

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        """Completion events published by the plane from now on, one dict per
        finished task (``{"id", "name", "state", ...}``), as they happen.

        It subscribes when called, before it returns: events published
        before the call are not replayed.  The iterator stops after
        ``timeout`` seconds without an event (None: never; ``close()`` it
        to stop).  Events are best effort (PUB/SUB): use results for
        anything that matters.
        """
        welcome = self._call("hello", "welcome")
        address = welcome.get("events")
        if not address:
            raise PlaneUnavailable("the plane publishes no events")
        sub = pynng.Sub0(
            recv_timeout=1000, recv_max_size=self.max_message_size, tls_config=_tls_for(address, self._tls, False)
        )
        try:
            sub.subscribe(b"")
            sub.dial(address, block=True)
            welcome = self._call("hello", "welcome")  # one round trip: the plane has seen the subscriber by now
        except pynng.NNGException as e:
            sub.close()
            raise PlaneUnavailable(f"cannot subscribe to the plane's events at {address}: {e}") from None
        except BaseException:
            sub.close()
            raise
        return _EventStream(self, sub, welcome.get("b"), timeout)

    def on_complete(self, callback: Callable[[dict], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` for every completion event from now on
        (see ``events()``), on a thread of its own, until the returned
        function is called or the client closes.  An exception in the
        callback is logged, and the next event still comes."""
        stream = self.events()

        def deliver() -> None:
            for event in stream:
                try:
                    callback(event)
                except Exception:
                    logger.exception("the on_complete callback failed on event %s", event.get("id"))

        t = threading.Thread(target=deliver, name="fastworker-client-events", daemon=True)
        self._link.add_stream(stream)
        t.start()
        return stream.close

    # -- lifetime ---------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the client.  Submissions already made are sent first.  With
        ``wait`` it then waits for every pending future; without, futures
        still pending fail (their results stay fetchable with ``result()``
        from another client).  ``cancel_futures`` cancels them first."""
        self._link.shutdown(wait, cancel_futures)

    def close(self) -> None:
        """Send what was submitted, then stop without waiting for results."""
        self.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"<fastworker.Client {self.address}>"


class _EventStream:
    """What ``Client.events()`` returns: an iterator over completion events,
    subscribed from the start.  With a secret, only fresh events of the
    plane's current boot are taken (a replay is dropped)."""

    def __init__(self, client: Client, sub: Any, boot: str | None, timeout: float | None) -> None:
        self._client = client  # (held: a stream keeps the client it came from open)
        self._sub = sub
        self._boot = boot
        self._number = 0  # the newest event message taken (with a secret)
        self._timeout = timeout
        self._events: collections.deque = collections.deque()  # of the message at hand
        self._last = time.monotonic()

    def __iter__(self) -> _EventStream:
        return self

    def __next__(self) -> dict:
        while not self._events:
            try:
                data = self._sub.recv()
            except pynng.Timeout:
                if self._timeout is not None and time.monotonic() - self._last >= self._timeout:
                    self.close()
                    raise StopIteration from None
                continue
            except pynng.NNGException:  # closed
                raise StopIteration from None
            self._take(data)
        return self._events.popleft()

    def _take(self, data: bytes) -> None:
        secret = self._client._secret
        try:
            msg = decode(data, secret)
        except FastworkerError:
            return
        if msg["op"] != "events":
            return
        if secret is not None:  # fresh: from this plane's boot, numbered up (no replays)
            n = msg.get("n")
            if msg.get("b") != self._boot and time.monotonic() - self._last >= 1.0:
                try:
                    self._boot, self._number = (
                        self._client._call("hello", "welcome").get("b"),
                        0,
                    )  # it may have restarted
                except FastworkerError:
                    return
            if msg.get("b") != self._boot or type(n) is not int or n <= self._number:
                return
            self._number = n
        self._last = time.monotonic()
        self._events.extend(msg["events"])

    def close(self) -> None:
        """Stop: the iterator ends (also when another thread waits in it)."""
        self._sub.close()

    def __enter__(self) -> _EventStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


###############################################################################
# Dashboard ###################################################################
###############################################################################

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fastworker</title><link rel="stylesheet" href="app.css"></head>
<body><header><h1><a href="#/">fastworker</a></h1><span id="plane"></span><span id="status"></span></header>
<div id="banner" hidden></div>
<main>
<section id="view-overview">
<section class="cards" id="cards"></section>
<h2>Finished per 10 s, last 10 minutes</h2><div id="chart"></div>
<div class="cols"><div><h2>Queues</h2><table id="queues"></table></div>
<div><h2>Periodic tasks</h2><table id="schedules"></table></div></div>
<h2>Workers</h2><table id="workers"></table>
<h2>Task names</h2><table id="names"></table>
<h2>Recent tasks</h2>
<div class="filters"><label>state <select id="state"><option value="">any</option></select></label>
<label>search <input id="search" type="search" placeholder="task id or name" maxlength="200"></label></div>
<table id="tasks"></table>
</section>
<section id="view-task" hidden><h2>Task <span id="task-id"></span></h2>
<table id="task-fields"></table><h3>Runs</h3><table id="task-runs"></table>
<h3>Traceback</h3><pre id="task-traceback"></pre><h3>Arguments</h3><pre id="task-args"></pre></section>
<section id="view-worker" hidden><h2>Worker <span id="worker-name"></span></h2>
<table id="worker-fields"></table><h3>Running now</h3><table id="worker-tasks"></table></section>
</main>
<script src="app.js"></script></body></html>
"""

_CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
header{display:flex;gap:1em;align-items:baseline}h1{margin:0}h1 a{color:inherit;text-decoration:none}
#status{color:#888}a{color:#0550ae}
#banner{background:#b00;color:#fff;font-weight:bold;font-size:1.2em;padding:.6em 1em;margin:.8em 0;border-radius:6px}
body.stale main{opacity:.4;filter:grayscale(1)}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:7em}
.card b{display:block;font-size:1.6em}table{border-collapse:collapse;background:#fff;margin-bottom:1em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums;vertical-align:top}
th{background:#f0f0f0}.failed{color:#b00}.succeeded{color:#070}.cancelled{color:#888}
.cols{display:flex;gap:2em;flex-wrap:wrap}.filters{display:flex;gap:1em;margin:.4em 0}
pre{background:#fff;border:1px solid #ddd;padding:.8em;overflow:auto;max-height:30em;white-space:pre-wrap}
svg{background:#fff;border:1px solid #ddd}.ok{fill:#2a7}.bad{fill:#c33}.axis{fill:#666;font-size:10px}
"""

# Every value reaches the page through textContent (or an SVG attribute
# holding a number), never as HTML, so task names, arguments and error
# texts cannot inject markup.
_JS = """"use strict";
const STATES = ["queued", "scheduled", "running", "succeeded", "failed", "cancelled"];
let last = null, lastGood = null, timer = null;
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function link(text, href) { const a = el("a", text); a.href = href; return a; }
function $(id) { return document.getElementById(id); }
// A cell is a value (shown as text) or a node made by el()/link().
function table(id, head, rows, empty) {
  const t = $(id);
  t.replaceChildren();
  const tr = el("tr");
  head.forEach(h => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach(r => {
    const row = el("tr");
    r.forEach(c => {
      const td = el("td");
      if (c instanceof Node) td.appendChild(c); else if (c !== null && c !== undefined) td.textContent = String(c);
      if (STATES.includes(c)) td.className = c;
      row.appendChild(td);
    });
    t.appendChild(row);
  });
  if (!rows.length && empty) { const row = el("tr"), td = el("td", empty); td.colSpan = head.length;
    row.appendChild(td); t.appendChild(row); }
}
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
function secs(x) { return x === null || x === undefined ? "" : Number(x).toFixed(4); }
function taskLink(id) { return link(id, "#/task/" + encodeURIComponent(id)); }
async function get(path) {
  const r = await fetch(path, {cache: "no-store", signal: AbortSignal.timeout(5000)});
  if (r.status === 401) throw new Error("the dashboard wants its token (--dashboard-token)");
  if (r.status === 404) return null;
  if (!r.ok) throw new Error("the plane answered " + r.status);
  return r.json();
}
function chart(points) {
  const NS = "http://www.w3.org/2000/svg", W = 600, H = 120, bw = W / points.length;
  const top = Math.max(1, ...points.map(p => p[1] + p[2]));
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16); svg.setAttribute("role", "img");
  points.forEach((p, i) => {
    [[p[1], "ok", 0], [p[2], "bad", p[1]]].forEach(([n, cls, below]) => {
      if (!n) return;
      const r = document.createElementNS(NS, "rect"), h = H * n / top;
      r.setAttribute("x", i * bw + 1); r.setAttribute("width", bw - 2);
      r.setAttribute("y", H - H * below / top - h); r.setAttribute("height", h);
      r.setAttribute("class", cls);
      const tip = document.createElementNS(NS, "title");
      tip.textContent = when(p[0]) + ": " + n + (cls === "ok" ? " succeeded" : " failed");
      r.appendChild(tip); svg.appendChild(r);
    });
  });
  [[2, 10, "start", top + " per 10 s"], [2, H + 12, "start", "10 min ago"], [W - 2, H + 12, "end", "now"]]
    .forEach(([x, y, anchor, text]) => { const t = document.createElementNS(NS, "text");
      t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("text-anchor", anchor);
      t.setAttribute("class", "axis"); t.textContent = text; svg.appendChild(t); });
  $("chart").replaceChildren(svg);
}
async function overview() {
  const state = $("state").value, search = $("search").value.trim();
  let q = "api/tasks?limit=50";
  if (state) q += "&state=" + encodeURIComponent(state);
  if (search) q += "&search=" + encodeURIComponent(search);
  const [s, tasks, names, points] = await Promise.all([get("api/stats"), get(q), get("api/names"),
    get("api/throughput")]);
  const now = Date.now() / 1000, done = s.tasks.succeeded + s.tasks.failed;
  const rate = last ? (done - last.done) / (now - last.t) : 0;
  last = {done: done, t: now};
  const c = s.cache, reads = c.hits + c.misses;
  const cards = [["submitted", s.tasks.submitted], ["queued", s.tasks.queued],
    ["scheduled", s.tasks.scheduled], ["running", s.tasks.running], ["succeeded", s.tasks.succeeded],
    ["failed", s.tasks.failed], ["cancelled", s.tasks.cancelled], ["tasks/s", rate.toFixed(1)],
    ["workers", s.workers.length], ["cache", c.size + " / " + c.max_size],
    ["hit rate", reads ? (100 * c.hits / reads).toFixed(1) + " %" : "-"]];
  const box = $("cards");
  box.replaceChildren();
  cards.forEach(([k, v]) => { const d = el("div", null, "card"); d.appendChild(el("b", v));
    d.appendChild(el("span", k)); box.appendChild(d); });
  $("plane").textContent = s.plane.address + " (pid " + s.plane.pid + ")";
  chart(points);
  table("queues", ["priority", "queued"], Object.entries(s.queues));
  const plane = {id: "plane", name: "plane (its own slots)", host: "", pid: s.plane.pid, in_flight: s.local.running,
    concurrency: s.local.concurrency, completed: s.local.completed, last_heartbeat: null, state: "connected"};
  table("workers", ["name", "host", "pid", "load", "running", "slots", "completed", "last heartbeat", "state"],
    [plane].concat(s.workers).map(w => [link(w.name, "#/worker/" + encodeURIComponent(w.id)),
      w.host + (w.address ? " (" + w.address + ")" : ""), w.pid,
      (100 * w.in_flight / w.concurrency).toFixed(0) + " %", w.in_flight, w.concurrency, w.completed,
      when(w.last_heartbeat), w.state]));
  table("schedules", ["name", "schedule", "next run", "last run", "last outcome", "runs", "skipped"],
    s.schedules.map(p => [p.name, p.cron ? p.cron + " (" + p.tz + ")" : "every " + p.every + " s",
      when(p.next_run), when(p.last_run), p.orphaned ? "no one runs it" : p.last_state || "", p.runs, p.skipped]),
    "none");
  table("names", ["name", "succeeded", "failed", "failure rate", "p50 s", "p95 s", "last failure"],
    names.map(n => { const f = n.last_failure, cell = el("span");
      if (f) { cell.appendChild(taskLink(f.id)); cell.appendChild(el("span", " " + when(f.at) + " " + (f.error || ""))); }
      const name = link(n.name, "#/");
      name.addEventListener("click", ev => { ev.preventDefault(); $("search").value = n.name;
        if (location.hash.length > 2) location.hash = "#/"; else refresh(); });
      return [name, n.succeeded, n.failed, (100 * n.failure_rate).toFixed(1) + " %", secs(n.p50), secs(n.p95), cell];
    }), "no finished tasks yet");
  table("tasks", ["id", "name", "state", "priority", "attempts", "worker", "submitted", "duration s", "error"],
    tasks.map(t => [taskLink(t.id), t.name, t.state, t.priority, t.attempts, t.worker, when(t.submitted_at),
      secs(t.duration), t.error]), "no tasks match");
}
async function taskView(id) {
  const t = await get("api/tasks/" + encodeURIComponent(id));
  $("task-id").textContent = id;
  if (t === null) { table("task-fields", ["unknown task"], []); table("task-runs", [], []);
    $("task-traceback").textContent = ""; $("task-args").textContent = ""; return; }
  table("task-fields", ["field", "value"], [["name", t.name], ["state", t.state], ["priority", t.priority],
    ["attempts", t.attempts], ["worker", t.worker], ["submitted", when(t.submitted_at)],
    ["finished", when(t.finished_at)], ["due", when(t.due_at)], ["duration s", secs(t.duration)], ["error", t.error],
    ["waiting", t.why ? t.why + " (" + t.waiting + ")" : ""]]);
  table("task-runs", ["run", "worker", "started", "finished", "duration s", "state", "error"],
    t.runs.map(r => [r.run, r.worker, when(r.started_at), when(r.finished_at),
      r.finished_at && r.started_at ? secs(r.finished_at - r.started_at) : "", r.state, r.error]), "not run yet");
  const tb = t.traceback || t.runs.map(r => r.traceback).filter(Boolean).pop();
  $("task-traceback").textContent = tb || "(none)";
  $("task-args").textContent = "args" in t ? JSON.stringify({args: t.args, kwargs: t.kwargs}, null, 2)
    : "hidden (start the plane with --log-args to show them)";
}
async function workerView(id) {
  const w = await get("api/workers/" + encodeURIComponent(id));
  $("worker-name").textContent = w ? w.name : id + " (gone)";
  if (w === null) { table("worker-fields", [], []); table("worker-tasks", [], []); return; }
  table("worker-fields", ["field", "value"], [["id", w.id], ["host", w.host], ["pid", w.pid],
    ["slots", w.concurrency], ["running", w.in_flight], ["completed", w.completed],
    ["registered", when(w.registered_at)], ["last heartbeat", when(w.last_heartbeat)], ["state", w.state],
    ["tasks", w.tasks.join(", ")]]);
  table("worker-tasks", ["id", "name", "priority", "run", "started", "running for s"],
    w.running.map(t => [taskLink(t.id), t.name, t.priority, t.attempts, when(t.started_at), secs(t.duration)]),
    "idle");
}
function route() {
  const h = location.hash.slice(1), parts = h.split("/");
  const view = parts[1] === "task" || parts[1] === "worker" ? parts[1] : "overview";
  ["overview", "task", "worker"].forEach(v => { $("view-" + v).hidden = v !== view; });
  return [view, decodeURIComponent(parts.slice(2).join("/"))];
}
async function refresh() {
  clearTimeout(timer);
  const [view, arg] = route();
  try {
    if (view === "task") await taskView(arg); else if (view === "worker") await workerView(arg); else await overview();
    lastGood = new Date();
    document.body.classList.remove("stale");
    $("banner").hidden = true;
    $("status").textContent = "updated " + lastGood.toLocaleTimeString();
  } catch (e) {
    document.body.classList.add("stale");
    const b = $("banner");
    b.hidden = false;
    b.textContent = "Plane unreachable: " + e.message + ". The figures below are from " +
      (lastGood ? lastGood.toLocaleTimeString() : "never") + " and may be stale.";
    $("status").textContent = "plane unreachable";
  }
  timer = setTimeout(refresh, 1000);
}
STATES.forEach(s => { const o = el("option", s); o.value = s; $("state").appendChild(o); });
$("state").addEventListener("change", refresh);
$("search").addEventListener("input", refresh);
window.addEventListener("hashchange", refresh);
refresh();
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
    unfinished = (QUEUED, SCHEDULED, RUNNING)
    metric("tasks", "gauge", "Tasks not finished yet.", [({"state": s}, t[s]) for s in unfinished])
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
        timeout = DASHBOARD_TIMEOUT  # seconds a connection may take to send its request (each read...)
        plane: Plane  # set on the subclass made per server
        token: bytes | None  # what a request must show (None: nothing)
        host_ok: Callable[[str], bool]  # whether a Host header names this machine

        def setup(self) -> None:
            super().setup()
            # ...and the whole request: one trickled in a byte at a time is cut off all the same
            self._watchdog = threading.Timer(self.timeout, self._cut_off)
            self._watchdog.daemon = True
            self._watchdog.start()

        def _cut_off(self) -> None:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # gone already

        def finish(self) -> None:
            self._watchdog.cancel()
            super().finish()

        def do_GET(self) -> None:
            self._watchdog.cancel()  # the request is in
            url = urllib.parse.urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if not self.host_ok(self.headers.get("Host") or ""):  # a page on another name (DNS rebinding)
                return self._send(403, b"unexpected Host header\n", "text/plain")
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
                if path == "/api/names":
                    return self._json(plane.names())
                if path == "/api/throughput":
                    return self._json(plane.throughput())
                if path == "/api/tasks":
                    limit = int(query.get("limit", ["50"])[0])
                    state = query.get("state", [None])[0]
                    search = query.get("search", [""])[0][:_MAX_ID]
                    if not 0 <= limit <= MAX_RECENT or (state is not None and state not in STATES):
                        raise ValueError(f"limit must be 0..{MAX_RECENT} and state one of " + ", ".join(STATES))
                    return self._json(plane.tasks(limit, state, search or None))
                for prefix, lookup in (("/api/tasks/", plane.task), ("/api/workers/", plane.worker)):
                    if path.startswith(prefix):
                        found = lookup(urllib.parse.unquote(path[len(prefix) :]))
                        return self._json({"error": "unknown"}, 404) if found is None else self._json(found)
                if path == "/metrics":
                    return self._send(200, _metrics(plane.stats()).encode(), "text/plain; version=0.0.4")
            except ValueError as e:
                return self._json({"error": str(e)}, 400)
            self._json({"error": "not found"}, 404)

        def _authorized(self) -> bool:
            if self.token is None:
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
            return _same(given, self.token)

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


def _start_dashboard(plane: Plane, bind: str, insecure: bool) -> Any:
    import ipaddress
    import ssl
    from http.server import ThreadingHTTPServer

    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"dashboard address must be host:port, not {bind!r}")
    token = plane.dashboard_token.encode() if plane.dashboard_token else None
    _check_exposure(f"tcp://{host}:{port}", token, insecure, "dashboard")
    # The Host header a browser sends names what it thinks it talks to.  A
    # page on another name whose DNS now points here (DNS rebinding) is
    # refused: only this machine's names and IP literals are served.
    names = {"localhost", host.lower(), socket.gethostname().lower(), socket.getfqdn().lower()}

    def host_ok(header: str) -> bool:
        name = _host_name(header)
        if name in names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    handler_class = type("DashboardHandler", (_dashboard_handler(),), {"plane": plane, "token": token})
    handler_class.host_ok = staticmethod(host_ok)
    context = None
    if plane._tls.cert and plane._tls.key:  # the plane's certificate serves HTTPS too
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(plane._tls.cert, plane._tls.key)

    class Server(ThreadingHTTPServer):
        """At most DASHBOARD_CONNECTIONS connections at once (more are closed
        at once); the TLS handshake happens in the connection's own thread,
        under its timeout, never in the thread that accepts."""

        daemon_threads = True
        slots = threading.BoundedSemaphore(DASHBOARD_CONNECTIONS)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                if context is not None:
                    request.settimeout(DASHBOARD_TIMEOUT)
                    try:
                        request = context.wrap_socket(request, server_side=True)
                    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                        logger.debug("dashboard: TLS handshake with %s failed: %s", client_address, e)
                        self.shutdown_request(request)
                        return
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    return Server((host, int(port)), handler_class)


###############################################################################
# Control plane: the shell ####################################################
###############################################################################


class _PlaneShell(_Role):
    """The control plane's I/O shell: its threads receive requests (and
    closed connections, heartbeats, finished runs, the time), turn each into
    an event for the core, and carry out the core's actions; with a journal,
    they hand the actions over and commit.  ``Plane`` (below) configures it
    (its ``__init__`` makes every attribute used here) and starts and stops
    it."""

    # -- calling the core and carrying out its actions ---------------------
    #
    # Two verbs: _call gives the core an event (under the lock) and carries
    # out what it answers; _carry_out does the actions, with no lock held.
    # With a journal, actions that depend on what is not yet on disk are
    # handed over to it instead, and carried out by whichever thread commits
    # (_commit): one writer at a time, grouping what accumulated meanwhile.

    def _now(self) -> At:
        return At(self._clock(), self._monotonic())

    def _call(self, event: Any) -> None:
        """Give the core an event, and carry out what it answers."""
        acts, later = self._give(event)
        if later:
            self._commit()
        else:
            self._carry_out(acts)

    def _give(self, event: Any) -> tuple[list, bool]:
        """The core call of _call, under the lock: its actions, and whether
        the journal took them (to carry out once committed)."""
        with self._lock:
            acts = self.core.handle(event, self._now())
            if acts and type(acts[-1]) is Wake:
                self._tick.notify()  # the housekeeper: the core's next deadline came sooner
            if self._stopping:
                self._drained.notify_all()
            return acts, self._hand_over(acts)

    def _hand_over(self, acts: list, always: bool = False) -> bool:
        """With a journal, give it a core call's records together with the
        actions that must wait for them (the lock is held, the same hold as
        the core call, so the journal gets everything in the core's order).
        Actions with no records of their own wait too while anything handed
        over earlier is not carried out yet: a result another thread's call
        produced a moment ago does not get out before it is on disk.
        Returns whether the journal took the actions."""
        journal = self._journal
        if journal is None or not acts:
            return False
        if type(acts[0]) is Journal:
            journal.add(acts[0].records, acts[0].counters, acts)
            return True
        if always or not journal.idle():
            journal.add([], None, acts)
            return True
        return False

    def _commit(self, wait: bool = False) -> None:
        """Commit what the journal holds and carry out what waited for it,
        unless another thread is committing: then that one does (it looks
        again after each commit); with ``wait``, until everything handed
        over before is carried out.  Before each commit, the runs the
        plane's executor finished meanwhile go to the core, so their results
        ride in the same commit."""
        journal = self._journal
        target = journal.added
        while True:
            self._report_finished(committing=True)
            batch = journal.take()
            if batch is None:
                break
            records, counters, queued, upto = batch
            try:
                journal.commit(records, counters)
                for acts in queued:
                    self._carry_out(acts)
            finally:
                journal.done(upto)
        if wait:
            journal.wait_for(target)

    def _carry_out(self, acts: list) -> None:
        """Carry out the core's actions, in order, with no lock held."""
        for act in acts:
            kind = type(act)
            if kind is Reply:
                chan = self._chans.pop(act.req, None)
                if chan is not None:
                    self._send(chan, self._encode_reply(act))
            elif kind is Run:
                put = self._executor.put
                for job in act.jobs:
                    put(job)
            elif kind is Publish:
                events = act.events
                if not self._event_details:  # ids, names, states and timings only
                    events = [{k: v for k, v in e.items() if k != "error"} for e in events]
                data = encode("events", self._secret, events=events, b=self.boot, n=next(self._event_numbers))
                try:
                    self._pub.send(data)
                except pynng.NNGException:
                    pass  # events are best effort
            elif kind is Cut:
                _close_pipe(act.conn)
            elif kind is Log:
                logger.log(act.level, act.msg, *act.args)

    def _encode_reply(self, r: Reply) -> bytes:
        secret = self._secret
        if secret is not None:  # bound to its request, and fresh
            bound = self._bound.pop(r.req, None)
            extra = {"b": self.boot} if bound is None else {"re": list(bound), "b": self.boot}
            fields = {**extra, **r.fields}  # a "stale" error's b is a ticket
            if r.items is None:
                return encode(r.op, secret, plane=self.id, **fields)
            return encode_batch(r.op, r.op, r.items, secret, plane=self.id, boot=self.boot, **fields)
        if r.items is None:
            return encode(r.op, None, plane=self.id, **r.fields)
        if not r.items and not r.fields:
            return self._no_results if r.op == "results" else self._no_tasks
        if r.op == "results":
            return encode_batch(r.op, r.op, r.items, None, plane=self.id, boot=self.boot, **r.fields)
        return encode_batch(r.op, r.op, r.items, None, plane=self.id, **r.fields)

    def _send(self, chan: _Chan, data: bytes) -> None:
        """Answer a request (from any thread) and recycle its context."""
        try:
            chan.send(data, 1.0 if self._stopping else 5.0)
        except pynng.NNGException:
            self._count_error("send")
            chan.close()
            return
        self._recycle(chan)

    def _recycle(self, chan: _Chan) -> None:
        """Keep an idle context for the next request; once the plane closes,
        close it instead (never leave one to be collected after its socket)."""
        if len(self._free) >= 64 or self._closed:
            return chan.close()
        self._free.append(chan)
        if self._closed:  # stop() may have emptied the pool just before
            self._drain_free()

    def _drain_free(self) -> None:
        while True:
            try:
                self._free.pop().close()
            except IndexError:
                return

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    # -- receiving requests -------------------------------------------------

    def _serve(self) -> None:
        """Receive requests on contexts; each is answered by whoever the core
        tells to (at once, or later if it parks it)."""
        free, chans = self._free, self._chans
        chan = None
        try:
            while not self._closed:
                try:
                    chan = free.pop()
                except IndexError:
                    chan = _Chan(self._sock)
                try:
                    data, pipe = chan.recv(1.0)
                except pynng.Timeout:
                    self._recycle(chan)
                    chan = None
                    continue
                except pynng.Closed:
                    raise
                except pynng.NNGException as e:  # whatever arrived, the receiver goes on
                    if self._closed:
                        raise pynng.Closed("closed", 0) from None
                    self._count_error("protocol")
                    logger.debug("plane receiver: %s", e)
                    chan.close()
                    chan = None
                    continue
                h = next(self._handles)
                chans[h] = chan
                chan = None
                self._handle(h, data, pipe)
        except pynng.Closed:
            pass
        finally:
            if chan is not None:
                chan.close()

    def _handle(self, h: int, data: bytes, pipe: int) -> None:
        """One request: decode it, give it to the core, perform the outcome;
        a bad one gets an error reply and is counted."""
        try:
            if len(data) > self.max_message_size:
                raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {self.max_message_size}")
            msg = decode(data, self._secret)
            if self._secret is not None and not self._fresh(h, msg):
                return
            self._request(request_event(msg, h, pipe))
        except AuthenticationError as e:  # answered without a tag: whoever sent it can read why
            self._count_error("auth")
            chan = self._chans.pop(h, None)
            if chan is not None:
                self._send(chan, encode("error", None, error=_error("auth", "AuthenticationError", str(e))))
            return
        except ProtocolError as e:
            kind, err = "protocol", _error("protocol", "ProtocolError", str(e))
            if e.stamp is not None:
                self._bound[h] = e.stamp
        except Exception as e:
            logger.exception("internal error while serving a request")
            kind, err = "internal", _error("internal", type(e).__name__, str(e))
        else:
            return
        self._count_error(kind)
        self._carry_out([Reply(h, "error", {"error": err}, None)])

    def _fresh(self, h: int, msg: dict) -> bool:
        """With a secret: is this request fresh?  Its reply is bound to it
        whatever the answer; a stale or replayed one is answered with an
        error here."""
        s, n = msg.get("s"), msg.get("n")
        if s is None or n is None:
            raise ProtocolError("a signed request must carry its session and number ('s', 'n')")
        self._bound[h] = (s, n)
        verdict = self._freshness.take(s, n, msg.get("b"))
        if verdict == "ok":
            return True
        if verdict == "stale":  # it has no ticket of this boot yet (or an old message is sent again): here is one
            err = _error("stale", "StaleBoot", "send again with this ticket of the plane's boot")
            fields = {"error": err, "b": self._freshness.ticket()}
        else:
            self._count_error("replay")
            fields = {"error": _error("protocol", "ProtocolError", "a message already taken, or too old: dropped")}
        self._carry_out([Reply(h, "error", fields, None)])
        return False

    def _request(self, ev: Any) -> None:
        """A request for the core.  A long status, fetch or cancel, and a
        purge, go to the core a piece at a time (others get the lock in
        between); stats and hello get what only the shell knows."""
        kind = type(ev)
        if kind is Status and len(ev.ids) > QUERY_CHUNK:
            statuses = self._in_pieces(self.core.statuses, ev.ids)
            return self._call(Answer(ev.req, "statuses", {"statuses": statuses}, None))
        if kind is Fetch and len(ev.ids) > QUERY_CHUNK:  # (answered at once)
            return self._call(Answer(ev.req, "results", _NOTHING, self._in_pieces(self.core.fetch_items, ev.ids)))
        if kind is Cancel and len(ev.ids) > CANCEL_CHUNK:
            cancelled = self._cancel_in_pieces(ev.ids, False)
            return self._call(Answer(ev.req, "cancelled", {"ids": cancelled}, None))
        if kind is Purge:
            with self._lock:
                ids = self.core.queued_ids(ev.priority)
            return self._call(Answer(ev.req, "purged", {"count": len(self._cancel_in_pieces(ids, True))}, None))
        if kind is Stats:
            ev = ev._replace(shell=self._shell_facts())
        elif kind is Hello:
            ev = ev._replace(fields={"version": __version__, "events": self.events_address,
                                     "heartbeats": self.heartbeat_address})  # fmt: skip
        elif kind is Pull and ev.info is not None:  # it registers: where does it connect from?
            ev.info["address"] = self._remote_address(ev.conn)
        self._call(ev)

    def _in_pieces(self, query: Callable[[list, At], list], ids: list) -> list:
        """A read-only query of the core over many ids, QUERY_CHUNK at a time
        under the lock, so that others get it in between."""
        out: list = []
        for i in range(0, len(ids), QUERY_CHUNK):
            with self._lock:
                out += query(ids[i : i + QUERY_CHUNK], self._now())
        return out

    def _cancel_in_pieces(self, ids: list, only_queued: bool) -> list:
        cancelled: list = []
        for i in range(0, len(ids), CANCEL_CHUNK):
            self._call(Cancel(None, ids[i : i + CANCEL_CHUNK], cancelled, only_queued))
        return cancelled

    def _remote_address(self, pipe_id: int) -> str | None:
        """The IP address a connection comes from (shown with its worker)."""
        try:
            for p in self._sock.pipes:
                if p.id == pipe_id:
                    return str(p.remote_address).rpartition(":")[0].strip("[]")
        except (pynng.NNGException, AttributeError, ValueError):
            pass
        return None

    # -- the other threads ---------------------------------------------------

    def _local_done(self, job: _Job, state: str, item: bytes, error: dict | None) -> None:
        """The plane's own executor finished a run (on a runner thread).
        Runners do not queue up for the lock one by one: whoever finds the
        reporter's token free takes everything finished so far to the core
        in one call, and the others leave their outcome for it.  With a
        journal, the writer takes them, once per commit."""
        self._finished.append((job.id, job.run, state, item, error))
        if self._journal is not None:
            return self._commit()
        while self._finished:
            if not self._reporter.acquire(blocking=False):
                return  # the reporter will find ours: it looks again after it lets go
            try:
                self._report_finished()
            finally:
                self._reporter.release()

    def _report_finished(self, committing: bool = False) -> None:
        """Give the core every run the executor finished since (with a
        journal their actions are the journal's: the thread that commits
        carries them out, and ``committing`` says it is this one)."""
        finished, batch = self._finished, []
        while finished:
            batch.append(finished.popleft())
        if batch:
            acts, later = self._give(LocalDone(batch))
            if not later:
                self._carry_out(acts)
            elif not committing:
                self._commit()

    def _watch_pipes(self) -> None:
        """Drop a worker the moment its connection closes."""
        while (pipe_id := self._gone.get()) is not None:
            self._call(ConnClosed(pipe_id))

    def _heartbeats(self) -> None:
        """Receive workers' heartbeats (PUB/SUB): proof of life for workers
        whose connection stays up while they hang."""
        while not self._closed:
            try:
                data = self._hb.recv()
            except pynng.Timeout:
                continue
            except pynng.Closed:
                return
            except Exception:  # pynng raises RuntimeError on an empty message
                self._count_error("protocol")
                continue
            try:
                msg = decode(data, self._secret)
                if msg["op"] != "heartbeat":
                    raise ProtocolError("not a heartbeat")
            except FastworkerError as e:
                self._count_error("auth" if isinstance(e, AuthenticationError) else "protocol")
                continue
            if self._secret is not None:  # fresh, for this boot: a recorded heartbeat keeps no one alive
                s, n = msg.get("s"), msg.get("n")
                if s is None or n is None or self._freshness.take(s, n, msg.get("b")) != "ok":
                    self._count_error("replay")
                    continue
            self._call(Heartbeat(msg["worker"]["id"]))

    def _housekeep(self) -> None:
        """Tick the core at its next deadline: due timers, expired parked
        requests, silent workers, the cache's sweep.  (It wakes at least
        every MAX_SLEEP seconds, so a step of the wall clock is seen.)"""
        while True:
            with self._lock:
                if self._closed:
                    return
                now = self._now()
                acts = self.core.handle(TICK, now)
                if not acts or acts == [_WAKE]:
                    self._tick.wait(min(self.core.next_deadline(now), MAX_SLEEP))
                    continue
                later = self._hand_over(acts)
            if later:
                self._commit()
            else:
                self._carry_out(acts)

    # -- observing ------------------------------------------------------------

    def _shell_facts(self) -> dict:
        """What the statistics hold that only the shell knows."""
        plane = {"id": self.id, "version": __version__, "address": self.address, "pid": os.getpid(),
                 "rss_mb": _memory()[0]}  # fmt: skip
        if self._journal is not None:
            j = self._journal
            plane["journal"] = {"path": j.path, "sync": j.sync, "commits": j.commits, "error": j.error}
        with self._lock:
            errors = dict(self._errors)
        return {"plane": plane, "errors": errors, "abandoned": self._executor.abandoned}


###############################################################################
# Control plane ###############################################################
###############################################################################


class Plane(_PlaneShell):
    """The control plane: queue, dispatch, result cache, dashboard.

    ``Plane(...).start()`` serves in background threads of this process
    (``stop()`` ends it; it is also a context manager);
    ``python fastworker.py plane`` runs one as a process.  It runs tasks
    itself on ``concurrency`` slots when no connected subworker knows them,
    and dispatches every other task to the least-loaded subworker.

    This class is the I/O shell around ``PlaneCore``: its threads receive
    and decode messages, call the core under one lock, and send what the
    core answers.

    Args:
        listen: address clients and workers connect to (port 0 picks one;
            ``address`` has the real one after ``start()``).
        dashboard: ``"host:port"`` for the web dashboard, or None for none.
        concurrency: slots for the tasks the plane runs itself.
        result_cache_size, result_cache_ttl: how many finished results are
            kept, and for how many seconds.
        heartbeat_timeout: seconds of silence after which a worker is dead.
        max_message_size: largest message accepted, in bytes.
        retry_backoff: seconds before the first retry; doubles each time.
        reap_interval: seconds between sweeps of expired results.
        secret: shared secret for message tags (default FASTWORKER_SECRET).
        insecure: allow a non-loopback address without a secret.
        receivers: threads receiving requests.
        clock: the wall clock, seconds since the epoch (default
            ``time.time``): it decides what belongs to the calendar (ETAs,
            periodic tasks) and the times a status shows.
        monotonic: the clock of every deadline (heartbeats, parked
            requests, delays, retries, debounce, rates, the cache's TTL;
            default ``time.monotonic``), so that a step of the wall clock
            moves nothing but the calendar.
        journal: path of an SQLite file where accepted work, its progress
            and cached results are kept, so that they survive a crash and a
            restart of the plane (None: keep nothing on disk).
        journal_sync: "normal" (survives a crash of the plane process; the
            last commits may be lost if the machine loses power) or "full"
            (survives power loss too; slower).
        event_details: with a secret, completion events carry ids, names,
            states and timings only; True adds the error texts.
        tls_cert, tls_key, tls_ca: PEM files for a ``tls+tcp://`` address
            (and HTTPS for the dashboard): the plane's certificate and key,
            and a CA whose certificate every client and worker must show
            (mutual TLS), if given.
        dashboard_token: what the dashboard asks for (bearer token or basic
            auth password).  Default: none without a secret; with one, a
            token derived from it by a one-way function
            (``derived_dashboard_token``),
            never the secret itself.
        log_args: log tasks' arguments (in DEBUG lines and failures) and show
            them on the dashboard's task pages.  Off by default: arguments
            often carry what should not be in a log.
        max_queued: refuse a submission that would make more than this many
            tasks wait (queued or scheduled): its future fails at once with
            ``QueueFull`` (None: no limit).
        events_listen, heartbeat_listen: where the completion events and the
            workers' heartbeats are received.  Default: the host of
            ``listen``, its port + 1 and + 2 (any port if ``listen`` asks
            for port 0).  Clients and workers learn them from the plane.
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
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] | None = None,
        journal: str | None = None,
        journal_sync: str = "normal",
        event_details: bool = False,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        dashboard_token: str | None = None,
        log_args: bool = False,
        max_queued: int | None = None,
        events_listen: str | None = None,
        heartbeat_listen: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        for extra in (events_listen, heartbeat_listen):
            if extra is not None:
                _check_address(extra)
        if max_queued is not None and not 0 <= max_queued <= 10**9:
            raise ValueError(f"max_queued must be a number of tasks >= 0, not {max_queued!r}")
        _check_size(max_message_size)
        if not (0 < heartbeat_timeout <= MAX_TIMEOUT and 0 <= retry_backoff <= MAX_BACKOFF and reap_interval > 0):
            raise ValueError("heartbeat_timeout and reap_interval must be > 0, retry_backoff >= 0")
        _check_address(listen)
        self._tls = TLSFiles(tls_cert, tls_key, tls_ca)
        self._secret = _secret_bytes(secret)
        if dashboard_token is None and self._secret is not None:
            dashboard_token = derived_dashboard_token(self._secret)
        self.dashboard_token = dashboard_token or None
        if listen.startswith("tls+tcp://"):
            self._tls.config(True)  # refuse missing files now
        self._journal = _Journal(journal, journal_sync) if journal else None
        self.listen = listen
        self.dashboard = dashboard
        self.concurrency = concurrency
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size
        self.insecure = insecure
        self.id = os.urandom(8).hex()  # kept across restarts with a journal
        self.boot = os.urandom(4).hex()  # new for every start: clients learn that they may have missed results
        self.address: str | None = None  # the real addresses, set by start()
        self.dashboard_url: str | None = None
        self.events_address: str | None = None
        self.heartbeat_address: str | None = None
        self.events_listen, self.heartbeat_listen = events_listen, heartbeat_listen
        self._clock = clock or time.time
        self._monotonic = monotonic or time.monotonic
        self._receivers = receivers
        self.core = PlaneCore(
            self.id,
            _registry,
            self._now(),
            concurrency=concurrency,
            result_cache_size=result_cache_size,
            result_cache_ttl=result_cache_ttl,
            heartbeat_timeout=heartbeat_timeout,
            retry_backoff=retry_backoff,
            reap_interval=reap_interval,
            journaling=journal is not None,
            log_args=log_args,
            max_queued=max_queued,
        )
        self._lock = threading.Lock()  # guards the core: every call into it, and nothing else
        self._tick = threading.Condition(self._lock)  # the housekeeper waits for the core's next deadline
        self._drained = threading.Condition(self._lock)  # stop() waits for running tasks, then for clients
        self._no_results = self._no_tasks = b""  # the empty unsigned replies, encoded once by start()
        self._errors = {"protocol": 0, "auth": 0, "replay": 0, "send": 0}  # requests the shell refused (the lock)
        # Request handles the core knows -> their contexts, until answered.
        # Single dict operations are atomic, so no lock: a handle is added
        # before the core can hear of it and popped by the one who answers.
        self._chans: dict[int, _Chan] = {}
        self._bound: dict[int, tuple] = {}  # with a secret: request handle -> (s, n), for its reply (same rule)
        self._freshness = _Freshness(self.boot)
        self._event_details = event_details or self._secret is None
        self._event_numbers = itertools.count(1)
        self._handles = itertools.count(1)
        self._free: collections.deque = collections.deque()  # idle _Chans (deque ops are atomic)
        self._gone: queue.SimpleQueue = queue.SimpleQueue()  # ids of pipes that closed
        self._executor = _Executor(concurrency, self._local_done, max_message_size, prioritized=journal is not None)
        self._finished: collections.deque = collections.deque()  # runs the executor finished, not yet reported
        self._reporter = threading.Lock()  # held by the one runner taking _finished to the core (never across I/O)
        self._stopping = False  # no new work; running tasks may finish
        self._closed = False  # threads exit
        self._threads: list[threading.Thread] = []
        self._sock: Any = None
        self._pub: Any = None
        self._hb: Any = None
        self._http: Any = None  # the dashboard's ThreadingHTTPServer

    # -- lifetime ---------------------------------------------------------

    def start(self) -> Plane:
        """Bind the sockets and start serving; returns self."""
        if self._sock is not None:
            raise RuntimeError("the plane is already started")
        _require_pynng()
        _check_exposure(self.listen, self._secret or bool(self._tls.ca), self.insecure, "plane")
        if self._journal is not None:
            saved = self._journal.open()  # JournalError: one clear line, nothing touched
            try:
                with self._lock:  # handed over before anything can be served: the journal keeps this first
                    self._hand_over(self.core.handle(Restore(saved), self._now()), always=True)
                self._journal.accept()
            except JournalError as e:
                self._journal.close()
                raise JournalError(f"journal {self._journal.path} {e}") from None
            except BaseException:
                self._journal.close()
                raise
            self.id = self.core.id  # a plane keeps its identity across restarts
        # the empty replies never change: encode them once
        self._no_results = encode_batch("results", "results", [], None, plane=self.id, boot=self.boot)
        self._no_tasks = encode_batch("tasks", "tasks", [], None, plane=self.id)
        tls = _tls_for(self.listen, self._tls, True)  # the same for every socket of the plane
        sock = pynng.Rep0(recv_max_size=2 * self.max_message_size, tls_config=tls)
        # NNG calls this on its own thread with a socket lock held: hand the
        # pipe id over and return at once.
        sock.add_post_pipe_remove_cb(lambda pipe: self._gone.put(pipe.id))
        opened = [sock]
        try:
            _listen(sock, self.listen, "--listen")
            self.address = _real_address(sock, self.listen)
            self._pub = pub = pynng.Pub0(tls_config=tls)
            opened.append(pub)
            pub.add_post_pipe_connect_cb(lambda pipe: self._call(Subscribed(1)))
            pub.add_post_pipe_remove_cb(lambda pipe: self._call(Subscribed(-1)))
            where = self.events_listen or _sibling_address(self.listen, self.address, 1, "events")
            _listen(pub, where, "--events-listen")
            self.events_address = _real_address(pub, where)
            self._hb = hb = pynng.Sub0(recv_timeout=1000, recv_max_size=HEARTBEAT_MAX_SIZE, tls_config=tls)
            opened.append(hb)
            hb.subscribe(b"")
            where = self.heartbeat_listen or _sibling_address(self.listen, self.address, 2, "heartbeat")
            _listen(hb, where, "--heartbeat-listen")
            self.heartbeat_address = _real_address(hb, where)
            if self.dashboard:
                try:
                    self._http = _start_dashboard(self, self.dashboard, self.insecure)
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise
                    raise AddressInUse(f"dashboard address {self.dashboard} is in use: is another plane running? "
                                       "Stop it, or pick another with --dashboard HOST:PORT (or off)") from None  # fmt: skip
                host, port = self._http.server_address[:2]
                scheme = "https" if self._tls.cert and self._tls.key else "http"
                self.dashboard_url = f"{scheme}://{host}:{port}/"
        except BaseException:
            for s in opened:
                s.close()
            if self._journal is not None:
                self._journal.close()
            raise
        self._call(Listening(self.heartbeat_address, self.max_message_size))
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
        if self._journal is not None:
            self._commit(wait=True)  # what the restore changed, then its runs
        logger.info(
            "plane %s listening on %s (events %s, heartbeats %s); tasks it runs itself: %s",
            self.id,
            self.address,
            self.events_address,
            self.heartbeat_address,
            ", ".join(sorted(_registry)),
        )
        if self.dashboard_url:
            derived = self._secret is not None and self.dashboard_token == derived_dashboard_token(self._secret)
            logger.info(
                "dashboard on %s%s",
                self.dashboard_url,
                f" (token derived from the secret: {self.dashboard_token})" if derived else "",
            )
        return self

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop taking work, give running tasks ``grace`` seconds to finish
        and deliver their results, then close everything."""
        with self._lock:
            if self._stopping or self._sock is None:
                return
            self._stopping = True
        self._call(Stop())
        deadline = time.monotonic() + grace
        with self._lock:
            while self.core.running() and time.monotonic() < deadline:
                self._drained.wait(deadline - time.monotonic())
        self._call(Close())
        if self._journal is not None:
            self._commit(wait=True)  # the last results are out before the plane lingers
        linger = time.monotonic() + LINGER  # clients between polls come back for their last word
        with self._lock:
            while self.core.undelivered() and time.monotonic() < linger:
                self._drained.wait(linger - time.monotonic())
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        with self._lock:
            self._closed = True
            self._tick.notify_all()
        self._gone.put(None)
        self._executor.stop(time.monotonic() + 1.0)  # (its last replies still go out)
        users = [t for t in self._threads if not t.name.endswith("heartbeats")]  # (who may answer a request)
        _close_socket(self._sock, users, time.monotonic() + grace)  # with the requests too late to answer
        for s in (self._pub, self._hb):
            s.close()  # wakes the heartbeat receiver
        _join(self._threads, time.monotonic() + grace)
        self._drain_free()
        self._chans.clear()
        self._bound.clear()
        if self._journal is not None:
            self._journal.close()
        logger.info("plane %s stopped", self.id)

    def stats(self) -> dict:
        """Counts per state and priority, workers and the result cache."""
        shell = self._shell_facts()
        with self._lock:
            return self.core.stats(self._now(), shell)

    def tasks(self, limit: int = 50, state: str | None = None, search: str | None = None) -> list[dict]:
        """Recent tasks, newest first: unfinished ones, then finished;
        ``search`` is an id, or part of a name or an id."""
        with self._lock:
            return self.core.recent_tasks(limit, state, self._now(), search)

    def task(self, task_id: str) -> dict | None:
        """One task's status with each of its runs (worker, times, error,
        traceback), or None if the plane does not know it."""
        with self._lock:
            return self.core.task_detail(task_id, self._now())

    def worker(self, worker_id: str) -> dict | None:
        """One worker ("plane": the plane's own slots) and the tasks it runs."""
        with self._lock:
            return self.core.workers.detail(worker_id, self._now())

    def names(self) -> list[dict]:
        """Figures per task name (count, failure rate, p50/p95, last failure)."""
        with self._lock:
            return self.core.figures.summaries()

    def throughput(self) -> list[list]:
        """Tasks finished per 10 s over the last 10 minutes."""
        with self._lock:
            return self.core.figures.chart(self._now())


###############################################################################
# Subworker ###################################################################
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
        address: the plane's address (``plane=``, its old name, works too).
        concurrency: tasks run at once: threads for plain functions, an event
            loop for ``async def`` tasks.
        name: shown in stats and the dashboard (default host-pid).
        secret: shared secret for message tags (default FASTWORKER_SECRET).
        overrun_margin: a task still running this many seconds after its time
            limit (already reported as TaskTimeout) sets ``replace``: its
            thread cannot be killed, so the process should be replaced
            (``python fastworker.py worker`` re-executes itself).
        tls_cert, tls_key, tls_ca: PEM files for a ``tls+tcp://`` plane (see
            ``Client``).
        log_args: put tasks' arguments in its log lines (off by default).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        name: str | None = None,
        secret: str | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        overrun_margin: float = 1.0,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        log_args: bool = False,
        plane: str | None = None,
    ) -> None:
        if plane is not None:  # (its name before 0.2: every role now calls the plane's address "address")
            address = plane
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        _check_address(address)
        _check_size(max_message_size)
        self._tls = TLSFiles(tls_cert, tls_key, tls_ca)
        self.address = address
        self.concurrency = concurrency
        self.host = socket.gethostname()
        self.name = name or f"{self.host}-{os.getpid()}"
        self.id = os.urandom(8).hex()
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.registered = threading.Event()  # set once a plane has accepted this worker
        self.log_args = log_args
        self._log_tasks = False  # a DEBUG line per start and finish (decided by start())
        self.replace = threading.Event()  # set when a task overran its limit by the margin
        self._secret = _secret_bytes(secret)
        self._session = _Session(self._secret)
        self._lock = threading.Lock()  # guards the job lists, counters, flags and the dialer below
        self._wake = threading.Condition(self._lock)  # lanes wait for something to send
        self._idle = threading.Condition(self._lock)  # stop() waits for running jobs
        self._beat = threading.Condition(self._lock)  # the heartbeat thread waits for its next beat
        self._running: dict[str, _Job] = {}
        self._held: set[str] = set()  # ids of the tasks taken from the plane and not reported or handed back
        self._done: list[bytes] = []  # RESULT items not yet sent
        self._returned: list[str] = []  # ids of tasks handed back, not yet sent
        self._pulls = 0  # requests for work in flight (at most two)
        self._announce = False  # the credit changed: tell the plane
        self._plane_id: str | None = None
        self._registered = False
        self._draining = False  # take no more work
        self._stopped = False
        self._refused = False  # the plane refused our messages (told once, at ERROR)
        self._backoff = RETRY_PAUSE  # pause before retrying a plane that failed us; doubles
        self._hb_address: str | None = None
        self._hb_interval = HEARTBEAT_INTERVAL
        self._limit = max_message_size  # the largest request it sends (the plane's limit, once it says)
        self._sock: Any = None
        self._dialer: Any = None
        self._threads: list[threading.Thread] = []
        self._executor = _Executor(
            concurrency, self._report, max_message_size, self._begin, on_overrun=self._overrun, margin=overrun_margin
        )
        self._inbox = self._executor.inbox  # received, not started

    def start(self) -> Worker:
        """Connect to the plane (in the background) and start working."""
        if self._sock is not None:
            raise RuntimeError("the worker is already started")
        sock = _dial(self.address, self.max_message_size, self._tls)
        self._dialer = sock.dialers[-1]
        self._sock = sock
        self._log_tasks = logger.isEnabledFor(logging.DEBUG)
        logger.info(
            "worker %s (%d slots) connecting to %s; tasks: %s",
            self.name,
            self.concurrency,
            self.address,
            ", ".join(sorted(_registry)),
        )
        for target, name in ((self._lane, "lane"), (self._lane, "lane"), (self._heartbeat, "heartbeat")):
            t = threading.Thread(target=target, name=f"fastworker-worker-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._executor.start("fastworker-worker")
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
        # The jobs not started go back first, then every runner gets its stop
        # token: an idle one exits at once; one still busy past the grace
        # finds its token when its task ends (its task is handed back below,
        # its result will be dropped).
        with self._lock:
            waiting = self._drain_inbox()
        self._executor.stop(time.monotonic() + 0.2)
        with self._lock:
            returned = self._returned + [job.id for job in waiting + self._drain_inbox()] + list(self._running)
            results, registered = self._done, self._registered
            self._running.clear()
            self._done, self._returned = [], []
        if registered:  # hand back what is left and say goodbye, briefly
            wait = self.timeout if results or returned else min(self.timeout, 1.0)
            try:
                chan = _Chan(self._sock)
                try:
                    fields = {"worker": self.id, "credit": 0, "returned": returned, "leaving": True}
                    _exchange(chan, self._session, "pull", wait, key="results", items=results, **fields)
                finally:
                    chan.close()
            except (pynng.NNGException, FastworkerError):
                if results or returned:
                    logger.warning("could not hand %d task(s) back to the plane", len(returned))
        lanes = [t for t in self._threads if t.name.endswith("lane")]
        _close_socket(self._sock, lanes, time.monotonic() + 2.0)
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
            "max_message_size": self.max_message_size,
            "tasks": {name: spec.options for name, spec in _registry.items()},
            "holding": sorted(self._held),
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
                    results, returned = self._take_done(), self._returned
                    self._returned = []
                    self._announce = False
                    self._pulls += 1
                    # slots still busy with runs for a plane that is gone (it restarted) are not offered
                    orphans = sum(1 for job in self._running.values() if job.plane != self._plane_id)
                    credit = 0 if self._draining else max(0, self.concurrency - orphans)
                    fields: dict[str, Any] = {"worker": self.id, "credit": credit}
                    if not self._registered:
                        fields["info"] = self._info()
                    if returned:
                        fields["returned"] = returned
                reply = None
                hung = False
                try:
                    reply = _exchange(
                        chan, self._session, "pull", self.timeout, PULL_WAIT, key="results", items=results, **fields
                    )
                except pynng.Timeout:  # not connected, or the plane holds our request and says nothing
                    hung = True
                except pynng.Closed:
                    return
                except AuthenticationError as e:
                    self._refuse(f"the plane at {self.address} refused this worker ({e})")
                except ProtocolError as e:  # damaged on its way: register again, so the plane learns what we hold
                    logger.warning("dropped an answer from the plane at %s: %s", self.address, e)
                except (pynng.NNGException, FastworkerError) as e:
                    logger.debug("request for work failed: %s", e)
                if reply is not None and reply["op"] == "error":
                    self._refuse(f"the plane at {self.address} refused this worker: {reply['error'].get('message')}")
                if hung:  # the plane holds our request and says nothing: start afresh
                    self._redial()
                first = False
                with self._lock:
                    self._pulls -= 1
                    if reply is not None and reply["op"] == "tasks":
                        self._backoff = RETRY_PAUSE
                        first = self._accept(reply)
                        if self._draining:
                            self._idle.notify_all()
                    else:  # not delivered, or delivered to a plane that is gone: keep it for the next one
                        self._done[:0] = results
                        self._returned[:0] = returned
                        self._registered = False
                        if not self._stopped:  # pause, longer each time: do not hammer a plane that is away
                            self._wake.wait(self._backoff)
                            self._backoff = min(2 * self._backoff, MAX_RETRY_PAUSE)
                    self._wake.notify()
                if first:  # (logged with no lock held)
                    logger.info("worker %s registered with plane %s at %s", self.name, reply["plane"], self.address)
        finally:
            chan.close()

    def _take_done(self) -> list[bytes]:
        """As many finished results as one request may carry: within this
        worker's message limit and the plane's (lock held)."""
        done, limit, size = self._done, self._limit - _BATCH_MARGIN, 0
        for n, item in enumerate(done):
            size += len(item) + 1
            if size > limit and n:
                self._done = done[n:]
                return done[:n]
        self._done = []
        return done

    def _refuse(self, why: str) -> None:
        """The plane cannot read us or we cannot read it: a configuration
        error (most likely the secret).  Say so at ERROR, once."""
        if not self._refused:
            self._refused = True
            logger.error("%s; check that --secret (or FASTWORKER_SECRET) matches the plane's", why)

    def _redial(self) -> None:
        """Close the connection and dial again, so the plane sees this worker
        go (and requeues what it had sent it) and then register anew.  When
        both lanes find the plane hung, one of them redials."""
        with self._lock:
            old, self._dialer = self._dialer, None
        if old is None:
            return
        logger.warning("the plane at %s stopped answering; reconnecting", self.address)
        new = None
        try:
            old.close()
            new = self._sock.dial(self.address, block=False)
        except pynng.NNGException as e:
            logger.warning("could not redial %s: %s", self.address, e)
        with self._lock:
            self._dialer = new or old

    def _accept(self, reply: dict) -> bool:
        """Take a plane's reply (lock held); True if it registered this
        worker for the first time."""
        plane = reply["plane"]
        if plane != self._plane_id:
            if self._plane_id is not None:
                dropped = self._drain_inbox()
                self._held.clear()
                logger.warning(
                    "the plane changed (%s -> %s): dropped %d queued job(s)", self._plane_id, plane, len(dropped)
                )
            self._plane_id = plane
        if reply.get("register"):
            self._registered = False
            return False
        first = False
        if "heartbeat" in reply:
            self._registered = True
            self._hb_address = reply["heartbeat"]
            size = reply.get("max_message_size")
            if type(size) is int and size > 0:  # what the plane takes: a request stays within it too
                self._limit = min(self.max_message_size, size)
            interval = reply.get("heartbeat_interval")
            if _typed(interval, _NUM) and interval > 0:
                self._hb_interval = min(HEARTBEAT_INTERVAL, interval)
            self._beat.notify_all()  # announce ourselves on the new address now
            first = not self.registered.is_set()
            self.registered.set()
        for t in reply["tasks"]:
            job = _Job(t["id"], t["name"], t["args"], t["kwargs"], t.get("timeout"), t.get("run"), plane)
            if self._draining:
                self._returned.append(job.id)  # hand it straight back
            else:
                self._held.add(job.id)
                self._inbox.put(job)
        return first

    def _heartbeat(self) -> None:
        """Publish this worker's state every interval (PUB/SUB, may be lost)."""
        pub, address = None, None
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    want, interval = self._hb_address, self._hb_interval
                    info = {"id": self.id, "name": self.name, "in_flight": len(self._running) + self._inbox.qsize()}
                if want != address:
                    if pub is not None:
                        pub.close()
                    pub, address = None, want
                    try:
                        pub = pynng.Pub0(tls_config=_tls_for(want, self._tls, False))
                        pub.dial(address, block=False)
                    except (pynng.NNGException, ValueError) as e:  # (a damaged address: the plane drops us, and
                        logger.warning("cannot send heartbeats to %r: %s", want, e)  # we register afresh)
                        if pub is not None:
                            pub.close()
                        pub = None
                if pub is not None:
                    try:
                        pub.send(encode("heartbeat", self._secret, worker=info, **self._session.stamp()))
                    except pynng.NNGException:
                        pass
                with self._lock:
                    if not self._stopped:
                        self._beat.wait(interval)
        finally:
            if pub is not None:
                pub.close()

    # -- running tasks ------------------------------------------------------------

    def _begin(self, job: _Job) -> bool:
        """A runner is about to start a job: too late if we are draining."""
        with self._lock:
            if self._draining:
                self._returned.append(job.id)  # hand it back
                self._held.discard(job.id)
                self._wake.notify()
                return False
            self._running[job.id] = job
        job.started = time.monotonic()
        if self._log_tasks:
            args = f" args={job.args!r} kwargs={job.kwargs!r}" if self.log_args else ""
            logger.debug("task %s %s started on %s (run %s)%s", job.id, job.name, self.name, job.run, args)
        return True

    def _drain_inbox(self) -> list[_Job]:
        """Take every job not yet started (lock held); a runner's stop token
        stays for it."""
        jobs, tokens = [], 0
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is None:
                tokens += 1
            else:
                jobs.append(job)
        for _ in range(tokens):
            self._inbox.put(None)
        return jobs

    def _report(self, job: _Job, state: str, item: bytes, error: dict | None) -> None:
        took = time.monotonic() - job.started
        if error is not None:
            args = f" args={job.args!r} kwargs={job.kwargs!r}" if self.log_args else ""
            logger.warning("task %s %s failed on %s after %.3f s (run %s): %s: %s%s", job.id, job.name, self.name,
                           took, job.run, error.get("type"), error.get("message"), args)  # fmt: skip
        elif self._log_tasks:
            logger.debug("task %s %s %s on %s in %.6f s", job.id, job.name, state, self.name, took)
        with self._lock:
            if self._running.pop(job.id, None) is None:
                return  # handed back: nobody wants it
            if job.plane != self._plane_id:  # its plane is gone: nobody wants it, but its slot is free again
                self._announce = True
                self._wake.notify()
                return
            self._held.discard(job.id)
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
# Built-in tasks ##############################################################
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
# Benchmark ###################################################################
###############################################################################


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


def _make_certs(folder: str, leaves: Iterable[tuple[str, str, str]], cas: Iterable[str] = ("ca",)) -> dict[str, str]:
    """Certificates for loopback, made with the ``openssl`` command line in
    ``folder``, that a strict verifier (Python 3.13's default) accepts: each
    CA in ``cas`` (basicConstraints CA:TRUE critical, keyUsage keyCertSign),
    and each leaf ``(name, its CA, "server" | "client")`` with keyUsage,
    extendedKeyUsage, subjectAltName (127.0.0.1 and localhost) and its
    issuer's key id.  Returns file name -> path (NAME.pem, NAME.key)."""
    import subprocess

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in cas:
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash")  # fmt: skip
    for name, ca, use in leaves:
        with open(os.path.join(folder, f"{name}.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyAgreement\n"
                    f"extendedKeyUsage={'serverAuth' if use == 'server' else 'clientAuth'}\n"
                    f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{name}\n"
                    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")  # fmt: skip
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return {name: os.path.join(folder, name) for name in os.listdir(folder)}


def _bench_topology(
    workers: int,
    n: int,
    m: int,
    map_n: int,
    concurrency: int,
    journal: str = "",
    security: str = "",
    flow: bool = False,
) -> dict:
    """Throughput, latency and memory with ``workers`` subworkers (and a
    journal with sync mode ``journal``, in a temporary folder; and with
    ``security`` "secret", "tls" or "tls+secret": mutual TLS, certificates
    made for the run; ``flow``: the throughput run's tasks spread over
    10,000 tenants, the first 1,000 with a key each)."""
    import shutil
    import tempfile

    label = "plane only" if workers == 0 else f"{workers} worker" + ("s" if workers > 1 else "")
    address = "tcp://127.0.0.1:0"
    plane_args: list[str] = []
    peer_args: list[str] = []  # what a worker needs to reach this plane
    client_kw: dict[str, Any] = {}
    folder = tempfile.mkdtemp(prefix="fastworker-bench-") if journal or security else None
    if flow:
        label += ", 10k tenants + 1k keys"
    if journal and folder:
        label += f", journal {journal}"
        plane_args += ["--journal", os.path.join(folder, "journal.db"), "--journal-sync", journal]
    if security and folder:
        label += f", {security}"
        if "secret" in security:
            plane_args += ["--secret", "bench-secret"]
            peer_args += ["--secret", "bench-secret"]
            client_kw["secret"] = "bench-secret"
        if "tls" in security:
            files = _make_certs(folder, [("plane", "ca", "server"), ("peer", "ca", "client")])
            address = "tls+tcp://127.0.0.1:0"
            plane_args += [
                "--tls-cert",
                files["plane.pem"],
                "--tls-key",
                files["plane.key"],
                "--tls-ca",
                files["ca.pem"],
            ]
            peer_args += ["--tls-cert", files["peer.pem"], "--tls-key", files["peer.key"], "--tls-ca", files["ca.pem"]]
            client_kw.update(tls_cert=files["peer.pem"], tls_key=files["peer.key"], tls_ca=files["ca.pem"])
    _progress(f"{label}: starting")
    plane, ready = _spawn_role(["plane", "--listen", address, "--dashboard", "off", *plane_args])
    procs = []
    try:
        plane_idle = _memory(plane.pid)[0]
        for _ in range(workers):
            argv = ["worker", "--plane", ready["listen"], "--concurrency", str(concurrency), *peer_args]
            procs.append(_spawn_role(argv)[0])
        worker_idle = max((_memory(p.pid)[0] for p in procs), default=None)
        pids = [os.getpid(), plane.pid] + [p.pid for p in procs]
        with Client(ready["listen"], **client_kw) as client:
            noop = "fastworker.noop"
            for f in [client.submit(noop) for _ in range(50)]:  # warm-up, as the peer harness does
                f.result(30)
            for _ in range(10):
                client.submit(noop).result(30)
            _progress(f"{label}: throughput, {n} tasks")
            busy0, ours0 = _cpu_seconds(pids)
            t0 = time.perf_counter()
            if flow:
                futs = [client.submit_with(noop, tenant=f"t{i % 10_000}", key=f"k{i}" if i < 1000 else None)
                        for i in range(n)]  # fmt: skip
            else:
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
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
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
    journal: Iterable[str] = ("normal", "full"),
    journal_workers: Iterable[int] = (0, 2),
    secure: Iterable[str] = ("secret", "tls", "tls+secret"),
    secure_workers: Iterable[int] = (0, 2),
    flow_workers: Iterable[int] = (0,),
) -> dict:
    """Measure like the peer harness: one client process, one ``submit()``
    per task; every role a process of its own on loopback.  Rows with a
    journal follow the in-memory ones, for each sync mode in ``journal``;
    then rows with a secret and with TLS (skipped without ``openssl``)."""
    import shutil

    rows = [_bench_topology(w, tasks, latency, map_items, concurrency) for w in workers]
    rows += [_bench_topology(w, tasks, latency, map_items, concurrency, j) for w in journal_workers for j in journal]
    for s in secure:
        if "tls" in s and shutil.which("openssl") is None:
            print(f"bench: no {s} rows: the openssl command line is not installed", file=sys.stderr)
            continue
        rows += [_bench_topology(w, tasks, latency, map_items, concurrency, "", s) for w in secure_workers]
    rows += [_bench_topology(w, tasks, latency, 0, concurrency, flow=True) for w in flow_workers]
    result: dict[str, Any] = {"bench": rows}
    if queued:
        result["queued"] = _bench_queued(queued)
    if balance:
        result["balance"] = _bench_balance(balance, balance_tasks, concurrency)
    return result


###############################################################################
# Command line: the roles #####################################################
###############################################################################

_GRACE_HELP = "on SIGTERM/Ctrl-C, seconds running tasks get to finish"
_LOG_ARGS_HELP = "put tasks' arguments in the log and on the dashboard's task pages (off: they may be secret)"


class _JsonLogFormatter(logging.Formatter):
    """--log-format json: one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _setup_logging(level: str, form: str) -> None:
    handler = logging.StreamHandler()
    if form == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("pynng").setLevel(max(logging.INFO, logging.root.level))  # its DEBUG is per connection


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
        journal=args.journal,
        journal_sync=args.journal_sync,
        event_details=args.event_details,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        dashboard_token=args.dashboard_token,
        log_args=args.log_args,
        max_queued=args.max_queued,
        events_listen=overrides.get("events_listen", args.events_listen),
        heartbeat_listen=overrides.get("heartbeat_listen", args.heartbeat_listen),
    )


def _cmd_plane(args: argparse.Namespace) -> int:
    _import_tasks(args.tasks)
    plane = _plane_from_args(args)
    stop = _stop_event()
    plane.start()
    _trim_heap()
    _ready(
        "plane",
        listen=plane.address,
        dashboard=plane.dashboard_url,
        events=plane.events_address,
        heartbeats=plane.heartbeat_address,
        pid=os.getpid(),
    )
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
        max_message_size=args.max_message_size,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        log_args=args.log_args,
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


###############################################################################
# Command line: the operator's commands #######################################
###############################################################################


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _client_from_args(args: argparse.Namespace) -> Client:
    return Client(
        args.plane,
        secret=args.secret,
        timeout=args.timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def _iso_time(text: str) -> Any:
    """An aware datetime from ISO 8601 text with an offset ("Z" too)."""
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time (2026-11-26T09:30:00+01:00)") from None
    if when.utcoffset() is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: add one (+01:00, Z)")
    return when


def _cmd_submit(args: argparse.Namespace) -> int:
    kwargs = _parse_arg(args.kwargs) if args.kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError("--kwargs must be a JSON object")
    client = _client_from_args(args)
    try:
        fut = client.submit_with(
            args.task,
            [_parse_arg(a) for a in args.args],
            kwargs,
            priority=args.priority,
            retries=args.retries,
            delay=args.delay,
            eta=args.eta,
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


def _cmd_result(args: argparse.Namespace) -> int:
    with _client_from_args(args) as client:
        try:
            value = client.result(args.task_id, timeout=args.wait)
        except TaskError as e:
            print(f"fastworker result: task {args.task_id} failed: {e}", file=sys.stderr)
            if e.traceback:
                print(e.traceback.rstrip(), file=sys.stderr)
            return 1
        except concurrent.futures.CancelledError:
            print(f"fastworker result: task {args.task_id} was cancelled", file=sys.stderr)
            return 1
        except TimeoutError as e:
            print(f"fastworker result: {e}; --wait SECONDS waits for it", file=sys.stderr)
            return 1
    print(json.dumps(value), flush=True)
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client_from_args(args) as client:
        cancelled = set(client._call("cancel", "cancelled", ids=args.task_ids)["ids"])
        left = [tid for tid in args.task_ids if tid not in cancelled]
        states = {s["id"]: s["state"] for s in client._call("status", "statuses", ids=left)["statuses"]} if left else {}
    for tid in args.task_ids:
        print(f"{tid}: cancelled" if tid in cancelled else f"{tid}: not cancelled (it is {states.get(tid)})")
    return 0 if not left else 1


def _cmd_purge(args: argparse.Namespace) -> int:
    with _client_from_args(args) as client:
        n = client.purge(args.priority)
    print(f"cancelled {n} queued task(s){'' if args.priority is None else ' of priority ' + args.priority}")
    return 0


def _ago(now: float, t: float | None) -> str:
    if not t:
        return "-"
    d = max(0.0, now - t)
    return f"{d:.1f} s ago" if d < 60 else f"{d / 60:.0f} min ago" if d < 3600 else f"{d / 3600:.1f} h ago"


def _table(head: list[str], rows: list[list]) -> str:
    """Plain text columns."""
    cells = [head] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _summary(s: dict) -> str:
    """``status`` without an id: the plane in a few lines."""
    p, t, d, c, loc = s["plane"], s["tasks"], s["dispatch"], s["cache"], s["local"]
    up = p["uptime"]
    lines = [
        f"plane {p['id']} at {p['address']} (pid {p['pid']}, version {p['version']}), "
        f"up {up / 60:.0f} min, {p['rss_mb']} MB",
        f"queued {t['queued']} ("
        + ", ".join(f"{k} {v}" for k, v in s["queues"].items())
        + f"), scheduled {t['scheduled']}, running {t['running']}",
        f"finished: {t['succeeded']} succeeded, {t['failed']} failed, {t['cancelled']} cancelled "
        f"({t['submitted']} submitted, {t['retried']} retried)",
    ]
    ws = s["workers"]
    busy, slots = sum(w["in_flight"] for w in ws), sum(w["concurrency"] for w in ws)
    lines.append(
        f"workers: {len(ws)} ({busy} of {slots} slots busy); the plane's own: {loc['running']} of "
        f"{loc['concurrency']} busy; {d['workers_lost']} lost, {d.get('workers_left', 0)} left"
    )
    reads = c["hits"] + c["misses"]
    rate = f"{100 * c['hits'] / reads:.1f} %" if reads else "-"
    lines.append(f"result cache: {c['size']} of {c['max_size']} (ttl {c['ttl']:g} s), hit rate {rate}")
    if s.get("schedules"):
        lines.append("periodic: " + ", ".join(x["name"] for x in s["schedules"]))
    errors = {k: v for k, v in s["errors"].items() if v}
    if errors:
        lines.append("refused requests: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    if "journal" in p:
        j = p["journal"]
        lines.append(f"journal: {j['path']} (sync {j['sync']}){' ERROR ' + j['error'] if j['error'] else ''}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    with _client_from_args(args) as client:
        out = client.status(args.task_id) if args.task_id else client.stats()
    if args.json:
        print(json.dumps(out, indent=2), flush=True)
    elif args.task_id:
        now = time.time()
        line = f"task {out['id']}: {out['state']}"
        if out["state"] != "unknown":
            line += f" ({out['name']}, priority {out['priority']}, {out['attempts']} attempt(s)"
            line += f", worker {out['worker']})" if out["worker"] else ")"
            line += f"; submitted {_ago(now, out['submitted_at'])}"
            if out["duration"] is not None:
                line += f", ran {out['duration']:.3f} s"
            if out["error"]:
                line += f"; error: {out['error']}"
        print(line, flush=True)
    else:
        print(_summary(out), flush=True)
    return 0


def _cmd_workers(args: argparse.Namespace) -> int:
    with _client_from_args(args) as client:
        workers = client.stats()["workers"]
    if args.json:
        print(json.dumps(workers, indent=2), flush=True)
        return 0
    now = time.time()
    rows = [[w["name"], w["host"], w.get("address") or "-", w["pid"], w["concurrency"], w["in_flight"], w["completed"],
             _ago(now, w["last_heartbeat"]), w["state"]] for w in workers]  # fmt: skip
    head = ["name", "host", "address", "pid", "slots", "running", "completed", "heartbeat", "state"]
    print(_table(head, rows) if rows else "no workers connected (the plane runs the tasks itself)", flush=True)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    with _client_from_args(args) as client:
        tasks = client.tasks(args.limit, args.state, args.search)
    if args.json:
        print(json.dumps(tasks, indent=2), flush=True)
        return 0
    now = time.time()
    rows = [[t["id"], t["name"], t["state"], t["priority"], t["attempts"], t["worker"] or "",
             _ago(now, t["submitted_at"]), "" if t["duration"] is None else f"{t['duration']:.3f}",
             (t["error"] or "")[:80]] for t in tasks]  # fmt: skip
    head = ["id", "name", "state", "priority", "attempts", "worker", "submitted", "seconds", "error"]
    print(_table(head, rows) if rows else "no tasks", flush=True)
    return 0


def _cmd_events(args: argparse.Namespace) -> int:
    # Stop on Ctrl-C and SIGTERM alike, even if we were started with SIGINT
    # ignored (as a non-interactive shell starts background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with _client_from_args(args) as client:
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
        plane = _plane_from_args(args, listen=_any_port(args.listen), events_listen=None, heartbeat_listen=None)
        if args.dashboard != "off":
            plane.dashboard = args.dashboard.rpartition(":")[0] + ":0"
        plane.start()
    _ready("demo", listen=plane.address, dashboard=plane.dashboard_url, pid=os.getpid())
    print(f"plane listening on {plane.address}")
    with Client(
        plane.address, secret=args.secret, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
    ) as client:
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
        [j for j in args.journal.split(",") if j.strip()],
        [int(w) for w in args.journal_workers.split(",") if w.strip()],
        [s for s in args.secure.split(",") if s.strip()],
        [int(w) for w in args.secure_workers.split(",") if w.strip()],
        [int(w) for w in args.flow.split(",") if w.strip()],
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


###############################################################################
# Command line: the parser and the script #####################################
###############################################################################


def _build_parser() -> _Parser:
    parser = _Parser(prog="fastworker", description="A brokerless distributed task queue in one file.")
    parser.add_argument("--version", action="version", version=f"fastworker {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, level: str = "warning") -> None:
        p.add_argument("--secret", help="shared secret for message tags (default: $FASTWORKER_SECRET)")
        p.add_argument(
            "--log-level",
            default=level,
            choices=["debug", "info", "warning", "error"],
            help=f"info: starts, stops, workers; debug: every task's start and finish (default {level})",
        )
        p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
        p.add_argument("--tls-cert", metavar="PEM", help="this side's certificate, for tls+tcp:// addresses")
        p.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
        p.add_argument(
            "--tls-ca",
            metavar="PEM",
            help="the CA that signed the plane's certificate (on a plane: the CA every client and worker must show)",
        )

    def client_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plane", default=DEFAULT_ADDRESS, help=f"the plane's address (default {DEFAULT_ADDRESS})")
        p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to reach the plane")
        common(p)

    def plane_opts(p: argparse.ArgumentParser, listen: str, dashboard: str) -> None:
        p.add_argument("--listen", default=listen, help=f"address to listen on (default {listen})")
        p.add_argument(
            "--events-listen",
            metavar="ADDR",
            help="where completion events are published (default: the --listen port + 1)",
        )
        p.add_argument(
            "--heartbeat-listen",
            metavar="ADDR",
            help="where workers' heartbeats arrive (default: the --listen port + 2)",
        )
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
        p.add_argument(
            "--journal", metavar="PATH", help="keep accepted work and results in this SQLite file (survives a crash)"
        )
        p.add_argument(
            "--journal-sync",
            choices=["normal", "full"],
            default="normal",
            help="normal: survives a crash of the plane; full: survives power loss too (default normal)",
        )
        p.add_argument(
            "--dashboard-token",
            metavar="TOKEN",
            help="what the dashboard asks for (default with a secret: one derived from it, logged at start)",
        )
        p.add_argument("--log-args", action="store_true", help=_LOG_ARGS_HELP)
        p.add_argument(
            "--max-queued",
            type=int,
            metavar="N",
            help="refuse submissions (QueueFull) that would make more than N tasks wait (default: no limit)",
        )
        p.add_argument(
            "--event-details",
            action="store_true",
            help="with a secret, completion events carry error texts too (default: ids, names, states, timings)",
        )
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
    p.add_argument("--log-args", action="store_true", help="put tasks' arguments in the log (off: they may be secret)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to reach the plane per attempt")
    p.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE, metavar="SECONDS", help=_GRACE_HELP)
    p.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE, metavar="BYTES")
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
    p.add_argument("--eta", type=_iso_time, metavar="TIME", help="when to run it: ISO 8601 with an offset")
    p.add_argument("--no-wait", action="store_true", help="print the task id instead of waiting")
    client_opts(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser(
        "status",
        help="summarize the plane, or one task's status",
        description="Summarize the plane (or one task) in a few lines; --json prints the raw statistics.",
    )
    p.add_argument("task_id", nargs="?", metavar="TASK_ID")
    p.add_argument("--json", action="store_true", help="the raw statistics (or status) as JSON")
    client_opts(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "result",
        help="print a task's result (after submit --no-wait)",
        description="Print a task's result as JSON; exit 1 if it failed, was cancelled or is not done.",
    )
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for it (default 0)")
    client_opts(p)
    p.set_defaults(func=_cmd_result)

    p = sub.add_parser(
        "cancel", help="cancel tasks that have not started", description="Cancel queued or scheduled tasks."
    )
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    client_opts(p)
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser(
        "purge",
        help="cancel every queued task",
        description="Cancel every queued task (scheduled and running ones stay); they count as cancelled.",
    )
    p.add_argument("--priority", choices=PRIORITIES, help="only the queued tasks of this priority")
    client_opts(p)
    p.set_defaults(func=_cmd_purge)

    p = sub.add_parser("workers", help="list the connected workers", description="List the connected workers.")
    p.add_argument("--json", action="store_true", help="as JSON")
    client_opts(p)
    p.set_defaults(func=_cmd_workers)

    p = sub.add_parser(
        "tasks",
        help="list recent tasks",
        description="List recent tasks, newest first: unfinished ones, then finished.",
    )
    p.add_argument("--state", choices=STATES, help="only tasks in this state")
    p.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    p.add_argument("--search", metavar="TEXT", help="a task id, or part of a name or an id")
    p.add_argument("--json", action="store_true", help="as JSON")
    client_opts(p)
    p.set_defaults(func=_cmd_tasks)

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
    p.add_argument(
        "--journal",
        default="normal,full",
        metavar="MODES",
        help="journal sync modes to measure (normal,full; '': skip)",
    )
    p.add_argument("--journal-workers", default="0,2", metavar="W", help="subworker counts for the journal rows (0,2)")
    p.add_argument(
        "--secure",
        default="secret,tls,tls+secret",
        metavar="MODES",
        help="rows with a secret, TLS (mutual, certificates made with openssl) or both (secret,tls,tls+secret; '': none)",
    )
    p.add_argument("--secure-workers", default="0,2", metavar="W", help="subworker counts for the secure rows (0,2)")
    p.add_argument(
        "--flow",
        default="0",
        metavar="W",
        help="subworker counts for rows whose tasks have 10,000 tenants and 1,000 keys (0; '': none)",
    )
    common(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python fastworker.py COMMAND ...``.  Returns the
    exit status: 0, 1 after an error (one line on stderr), 2 for bad usage."""
    # A task module's "import fastworker" must find this very module, even
    # when it runs as __main__, so that both share one task registry.
    sys.modules.setdefault("fastworker", sys.modules[__name__])
    args = _build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    expected: tuple = (FastworkerError, _StartupError, ValueError, OSError, RuntimeError)
    if pynng is not None:
        expected += (pynng.NNGException,)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        logger.debug("fastworker %s failed", args.command, exc_info=True)
        text = str(e) if isinstance(e, expected) else f"{type(e).__name__}: {e} (--log-level debug shows where)"
        print(f"fastworker {args.command}: error: {text}", file=sys.stderr)
        return 1


# How ``python fastworker.py plane|worker|demo`` runs.  Python keeps a
# script's syntax tree (about 15 MB for this file) until the script's top
# level returns, and a role runs for days; so the script re-executes itself
# (same pid, same interpreter options) as ``python -c _LAUNCH PATH ARGS``,
# which imports this file as the module ``fastworker`` (its tree freed once
# compiled; the bytecode cached where Python caches it) and runs the role
# on the main thread, which stays the main thread: every Python from 3.12
# on refuses new threads once the main thread has returned.
_ROLES = ("plane", "worker", "demo")
_LAUNCH = (
    "import importlib.util as u, os, sys; p = sys.argv[1]; sys.argv[:2] = [p]\n"
    "if not (sys.flags.isolated or getattr(sys.flags, 'safe_path', False)): sys.path[0] = os.path.dirname(p)\n"
    "s = u.spec_from_file_location('fastworker', p); m = u.module_from_spec(s); sys.modules['fastworker'] = m\n"
    "s.loader.exec_module(m); m._run_role(sys.argv[1:])"
)


def _run_role(argv: list[str]) -> None:
    """Run a command on the main thread and exit with its status once every
    other exit handler (the task modules' ``atexit`` handlers, logging's,
    the clients' close) has run, without the interpreter's teardown, which
    NNG's threads must not see."""
    status: list = [1]

    def finish() -> None:  # registered first, so it runs last
        code = status[0]
        if isinstance(code, str):
            print(code, file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit, not a normal exit: NNG's threads must not see the
        # interpreter tear down under them.
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)

    atexit.register(finish)
    try:
        status[0] = main(argv)
    except SystemExit as e:  # --help and usage errors
        status[0] = e.code
    sys.exit()  # (an exception main() lets through ends the role with status 1, its traceback printed)


def _script() -> None:
    """``python fastworker.py ...``: a long-running role re-executes itself
    without its syntax tree (see above); every other command runs here."""
    interpreter = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv)]  # python and its options, if run as a script
    as_script = sys.orig_argv[len(interpreter) :][:1] == sys.argv[:1] and not {"-m", "-c"} & set(interpreter)
    if len(sys.argv) > 1 and sys.argv[1] in _ROLES and as_script:  # (not under -m, a profiler, a debugger)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, [*interpreter, "-c", _LAUNCH, os.path.abspath(__file__), *sys.argv[1:]])
        except OSError as e:  # cannot re-execute: run here, syntax tree and all
            logger.debug("could not re-execute %s: %s", sys.executable, e)
    sys.modules.setdefault("fastworker", sys.modules["__main__"])
    _run_role(sys.argv[1:])


if __name__ == "__main__":
    _script()
