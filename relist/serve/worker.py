"""Where `relist serve` parses, checks and answers requests: in a model process of its own, or in this one.

A batch of raw request bodies goes in and one ``Answer`` per body comes out: each body is parsed and
checked (a bad one gets its 4xx and message), the good ones run through the model as one batch (when the
batch fails, each runs again alone, so a failure stays with the request that caused it) and every result
is encoded as JSON (a score JSON cannot carry is that request's 500).

The server runs this in a child process (``ModelProcess``) so that its event loop only moves bytes: a
model thread in the loop's process waited for the interpreter lock after each of its many short torch
calls whenever the loop was busy (refusing a retry storm, parsing large bodies), up to the 5 ms switch
interval each time, and one LAST batch then took seconds. ``InProcess`` runs the same code on the
calling thread, for a service object built by the caller (tests, the demo).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import NamedTuple

from relist.serve.requests import BadRequest, parse_json

log = logging.getLogger("relist")


class Answer(NamedTuple):
    """The outcome of one request: ``status`` 200 with ``body`` (JSON bytes), a 4xx with the client's
    ``message``, or a 500 whose ``message`` is the failure's details (logged under the request id, never sent)."""

    status: int
    body: bytes = b""
    message: str = ""


def _details(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()


def _encode(result: object) -> Answer:
    try:
        return Answer(200, json.dumps(result, allow_nan=False).encode("utf-8"))
    except (ValueError, TypeError) as err:  # NaN or infinite scores: this request's 500
        return Answer(500, message=_details(err))


def _run(service, examples: list) -> list[Answer]:
    try:
        results = service.run(examples)
    except Exception as err:  # noqa: BLE001 - one request may have failed it: run each alone
        if len(examples) == 1:
            return [Answer(500, message=_details(err))]
        log.warning("serve: a batch of %d requests failed; serving them one by one", len(examples))
        return [answer for example in examples for answer in _run(service, [example])]
    return [_encode(result) for result in results]


def serve_batch(service, bodies: list[bytes]) -> list[Answer]:
    """One ``Answer`` per body, in order; nothing raised here is another request's failure."""
    answers: list[Answer | None] = [None] * len(bodies)
    examples, where = [], []
    for k, body in enumerate(bodies):
        try:
            examples.append(service.parser.parse(parse_json(body)))
            where.append(k)
        except BadRequest as err:
            answers[k] = Answer(err.status, message=str(err))
        except Exception as err:  # noqa: BLE001 - a parser bug is this request's 500
            answers[k] = Answer(500, message=_details(err))
    if examples:
        for k, answer in zip(where, _run(service, examples)):
            answers[k] = answer
    return answers


class ModelProcessExited(RuntimeError):
    """The model process ended (or was killed as hung) while a batch was in it."""


class ModelUnavailable(RuntimeError):
    """The model process is being started again: no batch can run now."""


class InProcess:
    """``serve_batch`` on the calling thread, for a service object the caller built."""

    def __init__(self, service):
        self.service = service
        self.pid = os.getpid()
        self.start_seconds = 0.0

    @property
    def ready(self) -> bool:
        return True

    def call(self, bodies: list[bytes]) -> list[Answer]:
        return serve_batch(self.service, bodies)

    def close(self, timeout: float = 0.0) -> None:
        pass


def _sendable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a ValueError with its message (the parent re-raises it)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - exceptions with their own constructor arguments may not unpickle
        return ValueError(str(err))


PING, PONG = "ping", "pong"  # asks an idle model process whether it still answers, and its reply
TAKEN = "taken"  # a model process's first reply to a batch: it has it (the answers follow)


def model_main(conn) -> None:
    """The model process: read the settings, load the service, say so, then answer batches (and pings)
    until the connection closes.

    Ctrl-C reaches the whole process group; the server closes this process itself, so it ignores SIGINT.
    SIGTERM ends it at once when idle, or after the batch it is running. It leaves with ``os._exit``: it
    holds nothing to flush, and the interpreter's teardown (torch's included) took most of a second of the
    server's grace period."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # before torch's import, which a Ctrl-C interrupted
    from relist.serve.service import Service  # torch and the models only here

    state = {"busy": False, "stopping": False}

    def on_term(signum, frame):
        state["stopping"] = True
        if not state["busy"]:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        service = Service(conn.recv())
    except BaseException as err:  # noqa: BLE001 - the server raises it with its message
        conn.send(("failed", _sendable(err)))
        return
    conn.send(("ready", os.getpid()))
    while not state["stopping"]:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        state["busy"] = True
        try:
            if message == PING:
                conn.send(PONG)
            else:
                conn.send(TAKEN)  # the server then knows this batch's requests reached a process
                conn.send(serve_batch(service, message))
        except OSError:
            break
        state["busy"] = False
    os._exit(0)


WATCH_EVERY = 0.1  # seconds between the watchdog's looks at the model process
PING_AFTER = 1.0  # seconds without an exchange after which an idle model process is pinged
REAP_SECONDS = 5.0  # how long a killed process is waited for (one in uninterruptible I/O may take longer)
RESTART_BACKOFF = (1.0, 30.0)  # seconds between failed starts: the first, doubled up to the last


class ModelStartFailed(RuntimeError):
    """A model process exited, or did not load the models in time, while starting."""


class ModelProcess:
    """The models in a child process (``python -m relist.serve.worker``: nothing of the server's state is
    inherited, and no main module is imported again, as multiprocessing's spawn would); ``call`` sends a
    batch of bodies over a socket pair and blocks until its answers come back.

    A watchdog thread keeps the process serving without waiting for a request to find it broken:
    - a process that exited (killed, crashed, out of memory), busy or idle, is started again at once;
    - a batch not answered within ``hang_timeout`` seconds, or a ping (sent after ``PING_AFTER`` s idle)
      not answered within it, means the process hung (stopped, deadlocked): it is killed and started again;
    - a new process that has not loaded within ``max(hang_timeout, 4 x the first start's time)`` is killed
      and another started; failed starts are retried after 1 s, doubling up to 30 s.
    The batch in a process that exits or is killed fails at once (``ModelProcessExited``); a batch that
    the process never took (it replies ``TAKEN`` first), or that finds a new one loading, gets
    ``ModelUnavailable`` (the server answers 503 with Retry-After). ``on_lost(reason)`` is told of every
    process lost (``exited``, ``hung``) and every failed start (``start_failed``). ``close`` also ends a
    process that is still loading."""

    def __init__(
        self,
        settings,
        start_timeout: float = 600.0,
        hang_timeout: float = 10.0,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.settings, self.hang_timeout = settings, hang_timeout
        self.on_lost = on_lost or (lambda reason: None)
        self.lock = threading.Lock()  # one exchange on the connection at a time
        self.closing = False
        self.stopped = threading.Event()
        self.busy_since: float | None = None  # monotonic time the batch in the process was sent
        self.killed_as_hung = False
        self.loading: subprocess.Popen | None = None  # a process being started, until it is loaded
        self.start_seconds = 0.0  # how long the last start took (the Retry-After while restarting)
        self.process, self.conn = self._spawn(start_timeout)
        self.restart_timeout = max(hang_timeout, 4 * self.start_seconds)
        self.last_exchange = time.monotonic()
        self.watchdog = threading.Thread(target=self._watch, name="relist-model-watchdog", daemon=True)
        self.watchdog.start()

    def _spawn(self, timeout: float) -> tuple[subprocess.Popen, Connection]:
        """A new model process with the service loaded within ``timeout`` seconds (raises what loading
        raised, or ``ModelStartFailed``); given up at once when ``close`` is called meanwhile."""
        started = time.monotonic()
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "relist.serve.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.loading = process
        conn = Connection(ours.detach())
        try:
            conn.send(self.settings)
            while not conn.poll(WATCH_EVERY):  # in short looks, so that close() is heard
                if self.closing or time.monotonic() - started > timeout:
                    why = "the server is closing" if self.closing else f"not loaded within {timeout:g} s"
                    raise ModelStartFailed(f"the model process was stopped while loading the models ({why})")
            kind, value = conn.recv()
        except (EOFError, OSError):
            _reap(process)
            conn.close()
            raise ModelStartFailed(
                f"the model process exited while loading the models (status {process.returncode})"
            ) from None
        except ModelStartFailed:
            _reap(process, kill=True)
            conn.close()
            raise
        finally:
            self.loading = None
        if kind == "failed":
            _reap(process)
            conn.close()
            raise value
        self.start_seconds = time.monotonic() - started
        return process, conn

    @property
    def pid(self) -> int | None:
        """The serving model process's pid (None while a new one loads)."""
        return self.process.pid if self.conn is not None else None

    @property
    def ready(self) -> bool:
        """A model process is loaded and has not exited (a hung one counts until the watchdog finds it)."""
        return not self.closing and self.conn is not None and self.process.poll() is None

    def call(self, bodies: list[bytes]) -> list[Answer]:
        with self.lock:
            conn = self.conn
            if conn is not None and self.process.poll() is not None:  # gone before this batch reached it
                self._lost()
                conn = None
            if conn is None or self.closing:
                raise ModelUnavailable("the model process is starting again (the last one exited or hung)")
            self.busy_since = time.monotonic()
            taken = False
            try:
                conn.send(bodies)
                taken = conn.recv() == TAKEN
                return conn.recv()
            except (EOFError, OSError):
                reason = self._lost()
                if not taken:  # it went before it read the batch: nothing of these requests ran
                    raise ModelUnavailable("the model process exited before this batch reached it") from None
                raise ModelProcessExited(
                    f"the model process {'hung and was killed' if reason == 'hung' else 'exited'} "
                    "while serving this batch"
                ) from None
            finally:
                self.busy_since = None
                self.last_exchange = time.monotonic()

    def _lost(self) -> str:
        """The process is gone or its connection broke (lock held): forget it; the watchdog starts another."""
        reason = "hung" if self.killed_as_hung else "exited"
        self.killed_as_hung = False
        self.conn.close()
        self.conn = None
        if not self.closing:
            log.error("serve: the model process %d %s; starting a new one", self.process.pid, reason)
            self.on_lost(reason)
        return reason

    # ---- the watchdog ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        failures = 0
        while not self.stopped.wait(WATCH_EVERY) and not self.closing:
            busy = self.busy_since
            if busy is not None:
                if time.monotonic() - busy > self.hang_timeout:
                    self._kill_hung(f"a batch was not answered within {self.hang_timeout:g} s")
            elif self.conn is None or self.process.poll() is not None:
                if self._restart():
                    failures = 0
                else:
                    failures += 1
                    first, most = RESTART_BACKOFF
                    self.stopped.wait(min(first * 2 ** (failures - 1), most))
            elif time.monotonic() - self.last_exchange > PING_AFTER:
                self._ping()

    def _kill_hung(self, why: str) -> None:
        if self.process.poll() is None and not self.killed_as_hung:
            log.error("serve: the model process %d hung (%s): killing it", self.process.pid, why)
            self.killed_as_hung = True
            self.process.kill()  # the call waiting on it sees its connection close

    def _ping(self) -> None:
        if not self.lock.acquire(blocking=False):
            return  # a batch is being sent: that exchange shows whether the process answers
        try:
            if self.conn is None or self.closing:
                return
            try:
                self.conn.send(PING)
                answered = self.conn.poll(self.hang_timeout)
                if answered:
                    self.conn.recv()
            except (EOFError, OSError):
                self._lost()
                return
            if not answered:
                self._kill_hung(f"a ping was not answered within {self.hang_timeout:g} s")
                _reap(self.process)
                self._lost()
            self.last_exchange = time.monotonic()
        finally:
            self.lock.release()

    def _restart(self) -> bool:
        """Reap the process that is gone and start a new one; False if the start failed (told to on_lost)."""
        with self.lock:
            if self.conn is not None:  # it exited while idle: nobody noticed the connection break
                self._lost()
        _reap(self.process)
        try:
            process, conn = self._spawn(self.restart_timeout)
        except Exception as err:  # noqa: BLE001 - logged and counted; the watchdog tries again
            if not self.closing:
                log.error("serve: a new model process failed to start: %s", err)
                self.on_lost("start_failed")
            return False
        with self.lock:
            if self.closing:
                _reap(process, kill=True)
                conn.close()
                return True
            self.process, self.conn = process, conn
            self.killed_as_hung = False
            self.last_exchange = time.monotonic()
        log.warning("serve: model process %d serving (started in %.1f s)", process.pid, self.start_seconds)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """End the model process: SIGTERM (it finishes a batch it is running), then SIGKILL after ``timeout``;
        a process still loading is killed."""
        self.closing = True
        self.stopped.set()
        loading = self.loading
        if loading is not None:
            _reap(loading, kill=True)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _reap(self.process, kill=True)
        if self.lock.acquire(timeout=0.2):  # whoever holds it is told of the exit at once
            try:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
            finally:
                self.lock.release()
        self.watchdog.join(timeout=0.2)  # it gives up a start as soon as it looks again


def _reap(process: subprocess.Popen, kill: bool = False) -> None:
    """Wait for ``process`` to exit (killing it first if ``kill`` or if it has not exited within
    ``REAP_SECONDS``), at most ``REAP_SECONDS`` after the kill: no zombie is left unless the kernel keeps it."""
    if kill and process.poll() is None:
        process.kill()
    try:
        process.wait(REAP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(REAP_SECONDS)
        except subprocess.TimeoutExpired:
            log.error("serve: model process %d did not exit after SIGKILL", process.pid)


if __name__ == "__main__":  # the module's own copy, so that what it pickles names relist.serve.worker
    from relist.serve.worker import model_main as main

    main(Connection(int(sys.argv[1])))
