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
import traceback
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
    """The model process ended while a batch was in it (it is started again for the next batch)."""


class InProcess:
    """``serve_batch`` on the calling thread, for a service object the caller built."""

    def __init__(self, service):
        self.service = service
        self.pid = os.getpid()

    @property
    def alive(self) -> bool:
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


def model_main(conn) -> None:
    """The model process: read the settings, load the service, say so, then answer batches until the
    connection closes.

    Ctrl-C reaches the whole process group; the server closes this process itself, so it ignores SIGINT.
    SIGTERM ends it at once when idle, or after the batch it is running. It leaves with ``os._exit``: it
    holds nothing to flush, and the interpreter's teardown (torch's included) took most of a second of the
    server's grace period."""
    from relist.serve.service import Service  # torch and the models only here

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
            bodies = conn.recv()
        except (EOFError, OSError):  # the server is gone
            break
        state["busy"] = True
        answers = serve_batch(service, bodies)
        try:
            conn.send(answers)
        except OSError:
            break
        state["busy"] = False
    os._exit(0)


class ModelProcess:
    """The models in a child process (``python -m relist.serve.worker``: nothing of the server's state is
    inherited, and no main module is imported again, as multiprocessing's spawn would); ``call`` sends a
    batch of bodies over a socket pair and blocks until its answers come back. If the process dies, the
    batch in it fails (``ModelProcessExited``) and a new process is started for the next one."""

    def __init__(self, settings, start_timeout: float = 600.0):
        self.settings, self.start_timeout = settings, start_timeout
        self.lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.conn = None
        self.closing = False
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "relist.serve.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send(self.settings)
            if not conn.poll(self.start_timeout):
                process.kill()
                raise RuntimeError(f"the model process did not load the models within {self.start_timeout:g} s")
            kind, value = conn.recv()
        except (EOFError, OSError):
            code = process.wait()
            conn.close()
            raise RuntimeError(f"the model process exited while loading the models (status {code})") from None
        if kind == "failed":
            process.wait()
            conn.close()
            raise value
        self.process, self.conn = process, conn

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def call(self, bodies: list[bytes]) -> list[Answer]:
        with self.lock:
            try:
                self.conn.send(bodies)
                return self.conn.recv()
            except (EOFError, OSError):
                try:
                    code = self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    code = self.process.wait()
                if not self.closing:
                    log.error("serve: the model process exited (status %s); starting a new one", code)
                    self.conn.close()
                    self.restarts += 1
                    self._start()
                raise ModelProcessExited(f"the model process exited (status {code}) while serving this batch") from None

    def close(self, timeout: float = 5.0) -> None:
        """End the model process: SIGTERM (it finishes a batch it is running), then SIGKILL after ``timeout``."""
        self.closing = True
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.conn.close()


if __name__ == "__main__":  # the module's own copy, so that what it pickles names relist.serve.worker
    from relist.serve.worker import model_main as main

    main(Connection(int(sys.argv[1])))
