"""Local stream clients served inside the coordinator's selector loop: the control socket and the metrics
endpoint.

Theory of operation
-------------------
The coordinator is one thread running one selector loop (its seccomp filter forbids threads): the
front-end's messages, worker deaths, the systemd watchdog and every local client share it.  So no client
is ever waited for.  Each accepted socket is non-blocking and registered in the loop, and
:class:`StreamService` keeps per client (:class:`StreamClient`) the request read so far, the descriptors
it carried (SCM_RIGHTS), then the answer still to be written.  A client that sends a byte now and then
costs the loop one short read each time, nothing more.

Bounds, so that no client holds the loop or grows the coordinator (:class:`Limits`):

* at most ``max_clients`` at once; one more is refused at once, with the handler's answer for
  :attr:`Drop.BUSY` (as much as the socket takes without waiting), then closed;
* a request of at most ``max_request`` bytes and ``max_fds`` descriptors (more are closed on arrival);
* one deadline per client, ``deadline`` seconds after it was accepted, for all of it: the request, the
  answer, and the wait for the client's end of stream after it.  :meth:`StreamService.expire`, called
  each loop turn, closes clients past it, with the handler's answer for :attr:`Drop.DEADLINE` when none
  was started.

What the bytes mean is the :class:`Handler`'s: whether a connecting peer is admitted, whether the bytes so
far make a complete request and what to answer.  Once the answer is written the service shuts its side
down and reads (and drops) whatever the client still sends until it closes: closing with unread bytes
would reset a TCP connection and lose the answer.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

#: How much is read at once while draining after the answer.
_DRAIN_CHUNK = 65536


class Drop(IntEnum):
    """Why a client is let go without the answer to its request."""

    #: Every slot was taken when it connected.
    BUSY = 1
    #: Its deadline passed before it sent a complete request.
    DEADLINE = 2


@dataclass(frozen=True, slots=True)
class Limits:
    """What one service allows each client and all of them."""

    max_clients: int
    max_request: int
    #: Seconds from accept to the end of the exchange.
    deadline: float
    #: Descriptors one request may carry (0: none are read).
    max_fds: int = 0


class StreamClient:
    """One accepted client: its request so far, its descriptors, then its answer."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        """Accepted on ``sock`` (non-blocking), to be done by ``deadline`` (a time.monotonic() value)."""
        self.sock = sock
        self.deadline = deadline
        self.request = bytearray()
        #: Descriptors received with the request and not yet taken by a command (closed with the client).
        self.fds: list[int] = []
        #: More descriptors arrived than the limit allows (the extra ones were closed).
        self.too_many_fds = False
        #: The answer not written yet (None: not answered).
        self.answer: memoryview | None = None
        #: Who the client is, for log lines (the handler's words).
        self.label = ""
        #: The handler's record of who the client is (its credentials), set when it is admitted.
        self.peer: object = None


class Handler(Protocol):
    """What a service's requests mean."""

    def admit(self, client: StreamClient) -> bytes | None:
        """None to serve a new client; else it is refused with this answer (b"": closed without one)."""

    def respond(self, client: StreamClient) -> bytes | None:
        """The answer once ``client.request`` holds a complete request; None to wait for more."""

    def overflow(self, client: StreamClient) -> bytes:
        """The answer to a request that reached the size limit incomplete."""

    def dropped(self, client: StreamClient, reason: Drop) -> bytes:
        """A client is let go for ``reason``: count it; the answer to try to give it (b"": none)."""


def _last_word(sock: socket.socket, data: bytes) -> None:
    """Give a client that is about to be closed ``data``, as far as its socket takes it without waiting."""
    if data:
        try:
            sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass


class StreamService:
    """The clients of one listening socket, served from the coordinator's selector loop."""

    def __init__(self, sel: selectors.BaseSelector, sock: socket.socket, limits: Limits,
                 handler: Handler) -> None:
        """Serve the listening socket ``sock`` in ``sel`` (it is registered here, and closed by
        :meth:`close`)."""
        sock.setblocking(False)
        self.sel = sel
        self.sock = sock
        self.limits = limits
        self.handler = handler
        self.clients: dict[int, StreamClient] = {}
        sel.register(sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self) -> None:
        """Clients connect: take those waiting (a bounded number per loop turn, so that a flood of
        connections cannot hold the loop)."""
        for _ in range(self.limits.max_clients + 1):
            try:
                sock, _addr = self.sock.accept()
            except OSError:
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        """Admit a new client into a free slot, or refuse it."""
        sock.setblocking(False)
        client = StreamClient(sock, time.monotonic() + self.limits.deadline)
        refusal = self.handler.admit(client)
        if refusal is None and len(self.clients) >= self.limits.max_clients:
            refusal = self.handler.dropped(client, Drop.BUSY)
        if refusal is not None:
            _last_word(sock, refusal)
            sock.close()
            return
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, lambda: self._on_read(client))

    def _receive(self, client: StreamClient) -> bytes:
        """Read what the client sent, at most up to the request's size limit, keeping its descriptors."""
        room = self.limits.max_request - len(client.request)
        if not self.limits.max_fds:
            return client.sock.recv(room)
        data, fds, flags, _addr = socket.recv_fds(client.sock, room, self.limits.max_fds,
                                                  socket.MSG_CMSG_CLOEXEC)
        client.fds += fds
        if flags & socket.MSG_CTRUNC:                       # the kernel closed those that did not fit
            client.too_many_fds = True
        while len(client.fds) > self.limits.max_fds:
            os.close(client.fds.pop())
            client.too_many_fds = True
        return data

    def _on_read(self, client: StreamClient) -> None:
        """More of a request: answer it once complete (or too long); close at the client's end of stream."""
        try:
            data = self._receive(client)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(client)
            return
        client.request += data
        answer = self.handler.respond(client)
        if answer is None and len(client.request) >= self.limits.max_request:
            answer = self.handler.overflow(client)
        if answer is not None:
            self._answer(client, answer)

    def _answer(self, client: StreamClient, answer: bytes) -> None:
        """Start writing ``answer``; the descriptors no command took are closed now."""
        self._close_fds(client)
        client.answer = memoryview(answer)
        self.sel.modify(client.sock, selectors.EVENT_WRITE, lambda: self._on_write(client))
        self._on_write(client)

    def _on_write(self, client: StreamClient) -> None:
        """More of the answer, as much as the socket takes; then wait for the client's end of stream."""
        assert client.answer is not None
        try:
            sent = client.sock.send(client.answer)
        except BlockingIOError:
            return
        except OSError:
            self._close(client)
            return
        client.answer = client.answer[sent:]
        if client.answer:
            return
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(client)
            return
        self.sel.modify(client.sock, selectors.EVENT_READ, lambda: self._on_drain(client))

    def _on_drain(self, client: StreamClient) -> None:
        """Drop what the client still sends after its answer; close at its end of stream."""
        try:
            if client.sock.recv(_DRAIN_CHUNK):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(client)

    @staticmethod
    def _close_fds(client: StreamClient) -> None:
        """Close the descriptors the client sent that no command took."""
        for fd in client.fds:
            os.close(fd)
        client.fds = []

    def _close(self, client: StreamClient) -> None:
        """Forget a client."""
        if self.clients.pop(client.sock.fileno(), None) is not None:
            self.sel.unregister(client.sock)
        self._close_fds(client)
        client.sock.close()

    def expire(self, now: float) -> float | None:
        """Close the clients past their deadline; the seconds until the next deadline (None: no client)."""
        for client in list(self.clients.values()):
            if client.deadline <= now:
                if client.answer is None:
                    _last_word(client.sock, self.handler.dropped(client, Drop.DEADLINE))
                self._close(client)
        return min((c.deadline - now for c in self.clients.values()), default=None)

    def close(self) -> None:
        """Close every client and the listening socket."""
        for client in list(self.clients.values()):
            self._close(client)
        self.sel.unregister(self.sock)
        self.sock.close()
