"""Start the web server: `python run_web_server.py` serves the app with gunicorn's gevent worker on HOST:PORT.

Why gevent: a request waiting for its result holds a greenlet (a few KiB), not an OS thread, so thousands can
wait in one process, and a new connection is accepted, and its clock started, at once instead of sitting in
a backlog until one of a fixed number of threads comes free. The patching below comes before anything
imports socket, threading or redis, so that the Redis client, the notification listener (a "thread" that
becomes a greenlet) and its threading.Event all wait cooperatively.

What the server adds around the app (`_GeventWorker`, `_serve`):
- each request's clock starts when its connection is accepted (or, on a kept-alive connection, when its
  first byte arrives): submission.py counts REQUEST_TIMEOUT from there, and a safety net answers 504 half a second
  after it in any case;
- the request line and headers must arrive within CLIENT_READ_TIMEOUT: else the connection is closed,
  after a 408 if part of a request had come (nothing is sent to a connection that never said anything);
- the body must arrive within CLIENT_READ_TIMEOUT of the request's start (and before its deadline): else 408;
- a request whose body is not read to its end (over MAX_UPLOAD_BYTES: 413; or that 408) is answered with
  `Connection: close`, and the connection is closed lingering, so that the rest of its body is never read as the
  next request and the client gets to read its answer; one that announces more than MAX_UPLOAD_BYTES and asks
  `Expect: 100-continue` gets its 413 without being invited to send the body; a request gunicorn cannot read
  (bad framing) is answered in JSON and closed lingering too;
- the app can watch for the client hanging up while its request waits (submission.WATCH_DISCONNECT).

`run_web_server:app` is the bare app for any other WSGI host (without these guarantees). Configuration comes
from the environment (see settings.py), read once here.
"""

from gevent import monkey

monkey.patch_all()

import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager, suppress  # noqa: E402
from http import HTTPStatus  # noqa: E402

import gevent  # noqa: E402
import gevent.local  # noqa: E402
from gunicorn import util as gunicorn_util  # noqa: E402
from gunicorn.app.base import BaseApplication  # noqa: E402
from gunicorn.workers.ggevent import GeventWorker  # noqa: E402

import logger  # noqa: E402
import redis_client  # noqa: E402
from logger import log  # noqa: E402
from settings import Settings  # noqa: E402

config = Settings.for_program("run_web_server")
logger.configure(config)
# prometheus_client picks per-process value files at import; web imports it, so this comes first.
# A directory of our own is removed when the server stops (one was left behind at every start); one named by the
# environment is the operator's.
_OWN_METRICS_DIR = None
if config.web_processes > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _OWN_METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="image-classifier-metrics-")

import forms  # noqa: E402
import metrics  # noqa: E402
import submission  # noqa: E402
import web  # noqa: E402

app = web.create_app(config)

# Past its deadline a request is answered by this at the latest, whatever the app is doing.
SAFETY_MARGIN = 0.5
# A lingering close reads what a client still sends for at most this long (Apache's is 2 s): the connection then
# holds its slot, and a stopping worker, little longer than the read that timed out.
LINGER_SECONDS = 2.0


def _json_response(status, message, **fields):
    body = json.dumps({"success": False, "error": message, **fields}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    return status, headers, body


def _closing(status, headers, body):
    """The bytes of an answer written to the socket by hand, outside the WSGI app; the connection closes after it."""
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + body


def _write_error(sock, status_int, reason, mesg):
    """gunicorn's answer to a request it cannot read (a bad chunk size, two Content-Lengths, an unknown
    transfer coding), as JSON like every other error of ours; gunicorn's own is an HTML page. gunicorn closes the
    connection next, with the rest of the request unread: lingering first, or the client is reset."""
    try:
        phrase = HTTPStatus(status_int).phrase  # gunicorn says "501 Bad Request" for an unknown transfer coding
    except ValueError:
        phrase = reason
    gunicorn_util.write_nonblock(sock, _closing(*_json_response(f"{status_int} {phrase}", mesg or phrase)))
    _linger(sock)


# gunicorn's workers call util.write_error for these, at module level: there is no setting for it.
gunicorn_util.write_error = _write_error

_408 = _json_response("408 Request Timeout", f"the request did not arrive within {config.client_read_timeout:g} s")


class _NoRoom(Exception):
    """The request's body would take this process past MAX_BUFFERED_BYTES of bodies held at once."""


class _HeldBodies:
    """The bytes of request bodies this process holds, at most MAX_BUFFERED_BYTES. Found by review: 10 uploads of
    MAX_UPLOAD_BYTES, each stopped one byte short, held 130 MB until their 408s, and nothing bounded it short of
    WEB_CONNECTIONS x MAX_UPLOAD_BYTES (20 GB): a pod's memory limit would have killed the process and every request
    in it. Greenlets of one thread: no lock."""

    def __init__(self, limit):
        self.limit, self.held = limit, 0

    def fits(self, size):
        return self.held + size <= self.limit

    def holder(self):
        """A request's share: take(size) as its body is read (raises _NoRoom), release() when it is let go."""
        taken = 0

        def take(size):
            nonlocal taken
            if not self.fits(size):
                raise _NoRoom()
            self.held += size
            taken += size

        def release():
            nonlocal taken
            self.held -= taken
            taken = 0

        return take, release


_held = _HeldBodies(config.max_buffered_bytes)
_UPLOADS_FULL = _json_response(
    "503 Service Unavailable",
    f"this server holds {config.max_buffered_bytes} bytes of uploads already (MAX_BUFFERED_BYTES)",
    reason="uploads_full",
)


class _Connection:
    """An accepted client socket that notes when the current request on it began and how much of it came."""

    def __init__(self, sock):
        self._sock = sock
        self.began = time.monotonic()  # accepted: the first request's clock starts now
        self.received = 0  # bytes of the current request read so far
        self.served = 0  # requests answered on this connection
        self.request = None  # gunicorn's Request being served on it
        self.unread_body = False  # the client may still be sending a body nobody will read
        self.no_room = False  # the current request is to be refused 503 uploads_full before its body is read
        self._between_requests = False

    def recv(self, size, *flags):
        data = self._sock.recv(size, *flags)
        if data and not flags:
            if self._between_requests:  # a kept-alive connection: the next request starts with its first byte
                self.began, self._between_requests = time.monotonic(), False
            self.received += len(data)
        return data

    def next_request(self):
        self.received, self._between_requests = 0, True
        self.served += 1

    def close_after_response(self, unread_body=False):
        """Have gunicorn answer with `Connection: close` and close the connection after the response; with
        `unread_body`, lingering (`_linger`). Else gunicorn would read the next request from whatever bytes the
        client sends next: the rest of a body the app did not read, which it drained, and a client slow to send
        it got a second, unasked-for answer (408) to its one request, which a kept-alive client would take for the
        answer to its next one."""
        self.request.must_close = True
        self.unread_body = self.unread_body or unread_body  # the safety net's 504 keeps an unread body's linger

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _GeventWorker(GeventWorker):
    """gunicorn's gevent worker, with the request clock, read deadlines and hang-up detection described above.

    Stopping, the stock worker closes its listening sockets at once and lets the waiting requests finish
    (within graceful_timeout), which is the behaviour we want.
    """

    def init_process(self):
        self._current = gevent.local.local()
        super().init_process()

    def handle(self, listener, client, addr):
        self._current.connection = _Connection(client)
        super().handle(listener, self._current.connection, addr)

    def timeout_ctx(self):
        # Wraps the reading of every request line and headers on the connection (gunicorn's keep-alive loop).
        return _read_deadline(self._current.connection, config.client_read_timeout)

    def handle_request(self, listener_name, req, sock, addr):
        sock.request = req
        declared = _declared_length(req)
        if declared > config.max_upload_bytes:  # the app answers 413 without reading the body
            sock.close_after_response(unread_body=True)
            # gunicorn's own flag (private): its "100 Continue" would invite that upload. curl asks for it before
            # sending more than 1 MB.
            req._expected_100_continue = False
        # A client that asks before it sends (Expect: 100-continue) is told no at once, unread, when its whole body
        # would not fit now, rather than invited and refused on the way (found by review).
        sock.no_room = req._expected_100_continue and not _held.fits(declared)
        if sock.no_room:
            req._expected_100_continue = False
        try:
            super().handle_request(listener_name, req, sock, addr)
        except StopIteration:  # gunicorn closes the connection after this response
            if sock.unread_body:
                _linger(sock)
            raise
        sock.next_request()


def _declared_length(req):
    """The request's Content-Length as a number, 0 without one (gunicorn has refused a malformed one already)."""
    length = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), "")
    return int(length) if length.isdigit() else 0


def _let_others_run():
    """Yield to the other connections, with their I/O polled first. Not gevent.sleep(0): its greenlet may be resumed
    before the event loop polls again (gevent's docs), and a loop of reads yielding that way let a ping through
    about every 0.4 s (17 answered while a chunked upload was read, against 699 with this)."""
    gevent.sleep(0.001)


def _linger(connection):
    """Half-close, then read and drop what the client still sends until it closes its side too, for at most
    LINGER_SECONDS (or CLIENT_READ_TIMEOUT, when shorter). Closing at once with its bytes unread sends a reset, and
    the client's TCP then drops the answer it had not read yet: a 413 to an upload it is still sending."""
    seconds = min(config.client_read_timeout, LINGER_SECONDS)
    until = time.monotonic() + seconds
    with suppress(OSError), gevent.Timeout(seconds, False):
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(65536) and time.monotonic() < until:
            _let_others_run()  # a recv that finds data waiting does not yield: a fast sender would hold the process


@contextmanager
def _read_deadline(connection, seconds):
    timeout = gevent.Timeout(seconds)
    timeout.start()
    try:
        yield
    except gevent.Timeout as exc:
        if exc is not timeout:
            raise
        # Swallowed: gunicorn sees no request and closes the connection.
        if connection.received:
            metrics.READ_TIMEOUTS.labels("408").inc()
            try:
                connection.sendall(_closing(*_408))
            except OSError:
                pass
        elif not connection.served:  # (an idle kept-alive connection closing is no news)
            metrics.READ_TIMEOUTS.labels("closed").inc()
    finally:
        timeout.close()


# A body's first read; the next ones grow by READ_GROWTH. A chunked body's are halved after a read that took longer than
# CHUNKED_SLICE_SECONDS (tiny chunks) and doubled after one that did not (large chunks, which copy less in bigger
# reads), within these bounds.
FIRST_READ, READ_GROWTH = 16384, 8
CHUNKED_MIN_READ, CHUNKED_MAX_READ = 1024, 1 << 20
CHUNKED_SLICE_SECONDS = 0.005


def _buffer_body(environ, deadline, take):
    """Read the whole body before the app runs, within the deadline (raises gevent.Timeout), counting each read with
    `take` before it is made (raises _NoRoom). False when some of it is left unread: a chunked body past
    MAX_UPLOAD_BYTES, which the app answers 413 (one announced past it is not read at all, see
    _GeventWorker.handle_request)."""
    length = environ.get("CONTENT_LENGTH") or ""
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and (not length.isdigit() or int(length) == 0):
        return True  # nothing to read
    stream, limit, parts, size = environ["wsgi.input"], config.max_upload_bytes + 1, [], 0
    end = limit if chunked else int(length)
    # The room a read of a body of announced length takes is counted before the read is made, so a client that
    # sends its headers and then nothing holds FIRST_READ, not the length it announced (found by review: 26 such
    # connections, 2.8 KB sent in all, filled MAX_BUFFERED_BYTES for their 10 s). The reads then grow by READ_GROWTH,
    # to stay few: gunicorn copies what it has buffered ahead on every read (a 1 MB upload in one read costs 0.4 ms
    # of CPU, in reads doubling from 16 KiB 1.65-2.1 ms, growing eightfold 1.7-1.9; the castle 60, 100 and 80 us).
    # A chunked body is counted as it comes (a read before its end cannot tell how much more there is), except
    # past MAX_UPLOAD_BYTES, which is answered 413, not held. It is read in slices that each take about
    # CHUNKED_SLICE_SECONDS, letting the others run between them: gunicorn parses its chunks in Python, a few
    # microseconds each, and a read that finds its data waiting does not yield, so one body of a million one-byte
    # chunks held the whole process for seconds.
    step = FIRST_READ
    with gevent.Timeout(max(0.001, deadline - time.monotonic())):
        while size < end:
            want = min(step, end - size)
            if not chunked:
                take(want)
            began = time.perf_counter()
            chunk = stream.read(want)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if chunked:
                take(len(chunk) - max(0, size - config.max_upload_bytes))
                slow = time.perf_counter() - began > CHUNKED_SLICE_SECONDS
                step = max(CHUNKED_MIN_READ, step // 2) if slow else min(2 * step, CHUNKED_MAX_READ)
                _let_others_run()
            else:
                step *= READ_GROWTH
    environ["wsgi.input"] = io.BytesIO(b"".join(parts))
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    return size < limit


def _watch_disconnect(connection, callback):
    """Call `callback` once the client hangs up (its socket reads end-of-file); returns a function to stop."""

    def watch():
        try:
            data = connection.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            callback()

    watcher = gevent.spawn(watch)
    return lambda: watcher.kill(block=True)


class _SafetyNet:
    """A gevent.Timeout at `answer_by` (monotonic) around the app, which a request with a sooner deadline of its
    own moves earlier (submission.limit_time), never later."""

    def __init__(self, answer_by):
        self._answer_by, self._timeout = answer_by, None

    def move(self, answer_by):
        if answer_by >= self._answer_by:
            return
        self._answer_by = answer_by
        if self._timeout is not None:
            self.__exit__()
            self.__enter__()

    def __enter__(self):
        self._timeout = gevent.Timeout(max(0.001, self._answer_by - time.monotonic()))
        self._timeout.start()
        return self

    def __exit__(self, *_exc):
        self._timeout.cancel()


def _serve(environ, start_response):
    connection = environ.get("gunicorn.socket")
    if not isinstance(connection, _Connection):
        return app(environ, start_response)
    began = connection.began
    environ[submission.ARRIVED] = began
    environ[submission.WATCH_DISCONNECT] = lambda callback: _watch_disconnect(connection, callback)
    read_by = began + min(config.client_read_timeout, config.request_timeout)
    take, environ[forms.RELEASE_BODY] = _held.holder()
    try:
        return _answer(connection, environ, start_response, read_by, take)
    finally:
        environ[forms.RELEASE_BODY]()


def _answer(connection, environ, start_response, read_by, take):
    began = connection.began
    try:
        if connection.no_room:
            raise _NoRoom()
        if not connection.unread_body and not _buffer_body(environ, read_by, take):
            connection.close_after_response(unread_body=True)
    except gevent.Timeout:
        connection.close_after_response(unread_body=True)
        metrics.READ_TIMEOUTS.labels("408").inc()
        web.count_server_answer(app, environ, 408)
        log("request_read_timeout", level="WARNING", path=environ.get("PATH_INFO"))
        status, headers, body = _408
        start_response(status, headers)
        return [body]
    except _NoRoom:
        connection.close_after_response(unread_body=True)
        web.count_server_answer(app, environ, 503)
        metrics.REJECTED.labels("uploads_full").inc()
        log("request_refused", level="WARNING", reason="uploads_full", path=environ.get("PATH_INFO"), held=_held.held)
        status, headers, body = _UPLOADS_FULL
        start_response(status, [*headers, ("Retry-After", "1")])
        return [body]
    net = _SafetyNet(began + config.request_timeout + SAFETY_MARGIN)
    environ[submission.MOVE_DEADLINE] = lambda seconds: net.move(began + seconds + SAFETY_MARGIN)
    try:
        with net:
            return app(environ, start_response)
    except gevent.Timeout:
        connection.close_after_response()  # the app was cut off mid-way: start afresh on a new connection
        log("request_deadline_safety_net", level="ERROR", path=environ.get("PATH_INFO"))
        metrics.TIMEOUTS.inc()
        web.count_server_answer(app, environ, 504)
        status, headers, body = _json_response("504 Gateway Timeout", "no answer within the request's deadline")
        start_response(status, headers, sys.exc_info())
        return [body]


class _Server(BaseApplication):
    def load_config(self):
        for key, value in {
            "bind": f"{config.host}:{config.port}",
            "workers": config.web_processes,
            "worker_class": _GeventWorker,
            "worker_connections": config.web_connections,
            # A stopping worker lets its waiting requests finish: they end by REQUEST_TIMEOUT at the latest.
            "graceful_timeout": int(config.request_timeout) + 5,
            "timeout": max(60, int(config.request_timeout) * 2),
            "accesslog": None,
        }.items():
            self.cfg.set(key, value)

    def load(self):
        return _serve


def main():
    if config.web_nice:
        os.nice(config.web_nice)
    log(
        "web_starting",
        bind=f"{config.host}:{config.port}",
        processes=config.web_processes,
        connections=config.web_connections,
        wait_mode=config.wait_mode,
        nice=config.web_nice,
        redis=redis_client.describe(config.redis_url),
        metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR", ""),
    )
    try:
        _Server().run()
    finally:  # gunicorn's master ends with sys.exit: this runs in it alone, after its workers are gone
        if _OWN_METRICS_DIR:
            shutil.rmtree(_OWN_METRICS_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
