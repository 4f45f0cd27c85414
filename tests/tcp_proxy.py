"""A loopback TCP proxy for fault tests: it forwards bytes to a real server and can cut, stall or slow the link.

Each accepted connection gets a pair of threads, one per direction, forwarding bytes as they come. The controls
act on every connection, open and future: ``cut`` closes them all at once (a dropped link: both ends see a reset),
``stall`` stops forwarding while keeping the sockets open (a black hole: nothing errors, nothing arrives), ``slow``
caps each direction's rate, and ``resume`` forwards at full speed again. TLS passes through untouched: the nodes
pin the coordinator's certificate name in their channel options, so dialling the proxy's port works.
"""

from __future__ import annotations

import socket
import threading
import time

BUFFER_BYTES = 16 * 1024


class TcpProxy:
    """Listens on a free loopback port and forwards each connection to ``target`` ("host:port")."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        self.stalls = 0
        self.forwarded = {"up": 0, "down": 0}  # bytes towards the server and back
        self._flowing = threading.Event()
        self._flowing.set()
        self._rate: float | None = None  # bytes per second per direction, None: as fast as possible
        self._rate_since = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    # -- controls -------------------------------------------------------------------------------------------------
    def cut(self) -> int:
        """Closes every open connection (new ones are still accepted); returns how many were cut."""
        with self._lock:
            open_now, self._sockets = self._sockets, set()
            self.cuts += 1
        for sock in open_now:
            _close(sock)
        return len(open_now) // 2

    def stall(self) -> None:
        """Stops forwarding on every connection, keeping them open."""
        self.stalls += 1
        self._flowing.clear()

    def slow(self, bytes_per_second: float) -> None:
        self._rate_since = time.monotonic()
        self._rate = bytes_per_second

    def resume(self) -> None:
        self._rate = None
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        _close(self.listener)
        self.cut()
        self._flowing.set()

    # -- forwarding -----------------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        """Copies bytes one way until either side closes; a stall holds the bytes read so far."""
        started, moved = 0.0, 0
        try:
            while data := source.recv(BUFFER_BYTES):
                self._flowing.wait()
                if rate := self._rate:  # keep this direction's average under the rate since it was set
                    if started < self._rate_since:
                        started, moved = time.monotonic(), 0
                    for start in range(0, len(data), 1024):
                        moved += len(data[start:start + 1024])
                        ahead = moved / rate - (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(ahead)
                        sink.sendall(data[start:start + 1024])
                        self.forwarded[direction] += len(data[start:start + 1024])
                else:
                    sink.sendall(data)
                    self.forwarded[direction] += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
