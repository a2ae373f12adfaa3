"""A TCP proxy on loopback that the chaos driver owns, so it can cut every connection at will."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Proxy:
    """Forward 127.0.0.1:``port`` to ``target``; :meth:`cut` closes every open connection.

    New connections keep being accepted after a cut, as after a network blip.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.closed = False
        self.refusing_until = 0.0
        threading.Thread(target=self._accept, daemon=True, name="chaos-proxy").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refusing_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def connections(self) -> int:
        with self.lock:
            return len(self.open) // 2

    def cut(self) -> int:
        """Close every open connection (both ends); return how many client connections died."""
        with self.lock:
            doomed = list(self.open)
        for sock in doomed:
            self._drop(sock)
        return len(doomed) // 2

    def refuse_for(self, seconds: float) -> None:
        """Cut every connection and turn new ones away for ``seconds`` (a broker outage)."""
        self.refusing_until = time.monotonic() + seconds
        self.cut()
        time.sleep(seconds)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()
