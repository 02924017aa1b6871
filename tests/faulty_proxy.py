"""A TCP proxy in front of redis-server that loses replies the way real networks do.

Every connection through it is cut after a random number of reply packets (from `min_replies` up), at the
moment the next one arrives from Redis: the command has run, its client never hears so. A new connection
spends two replies on redis-py's handshake (CLIENT SETINFO), so `min_replies` above 3 lets the command that
a client retries on it through. `freeze()` makes the
open connections go silent without closing them, like a peer that vanished; `black_hole` does the same to
every new connection; `hold_replies_after(marker)` lets a connection's commands through but none of its replies
once it has sent `marker` (a script's SHA, say): a reply that comes too late for its client.
"""

import random
import socket
import threading


class FaultyProxy:
    def __init__(self, target_port, min_replies=3, max_replies=30, seed=0):
        self._target = ("127.0.0.1", target_port)
        self._random = random.Random(seed)
        self._budget = (min_replies, max_replies)
        self._links = []
        self._lock = threading.Lock()
        self.faults = True
        self.black_hole = False  # new connections are accepted and then carry nothing
        self.hold_marker = None  # see hold_replies_after
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                budget = self._random.randint(*self._budget) if self.faults else None
                link = _Link(client, server, budget, self)
                link.frozen = self.black_hole
                self._links.append(link)
            link.start()

    def freeze(self):
        """The connections open now stop carrying anything, in either direction, and stay open."""
        with self._lock:
            for link in self._links:
                link.frozen = True

    def hold_replies_after(self, marker):
        """A connection that sends `marker` carries no reply from then on; its commands still reach Redis."""
        self.hold_marker = marker

    def close(self):
        self._listener.close()
        with self._lock:
            for link in self._links:
                link.close()


class _Link:
    def __init__(self, client, server, budget, proxy):
        self.client, self.server, self.budget, self.proxy = client, server, budget, proxy
        self.frozen = False
        self.replies_held = False
        self._sent_tail = b""  # the end of what the client sent, for a marker split across two reads
        self._closed = threading.Event()

    def start(self):
        threading.Thread(target=self._pump, args=(self.client, self.server, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.server, self.client, True), daemon=True).start()

    def _pump(self, source, sink, replies):
        try:
            while not self._closed.is_set():
                if self.frozen:
                    self._closed.wait(0.05)
                    continue
                data = source.recv(65536)
                if not data:
                    break
                if self.frozen or (replies and self.replies_held):
                    continue  # swallowed: a vanished peer answers nothing
                marker = self.proxy.hold_marker
                if not replies and marker:
                    self.replies_held |= marker in self._sent_tail + data
                    self._sent_tail = data[-len(marker) :]
                if replies and self.budget is not None:
                    self.budget -= 1
                    if self.budget <= 0:
                        self.proxy.cuts += 1
                        break  # the command ran; its reply is lost with the connection
                sink.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self):
        if self.frozen and not self.proxy._listener.fileno() == -1:
            return  # a frozen connection stays open until the proxy closes
        self._closed.set()
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
