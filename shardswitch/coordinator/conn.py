"""One vhost-user front-end connection: message framing with descriptors.

The socket stays non-blocking for the main loop's selector; once the selector
says a message has started, :meth:`FrontendConnection.read_message` reads the
rest of it under a short deadline, so a front-end that stalls mid-message is
disconnected instead of freezing the coordinator.  Descriptors may arrive
with any part of the message (the kernel attaches them to the first byte
they were sent with); they are collected across partial reads.
"""

from __future__ import annotations

import array
import select
import socket
import time
from dataclasses import dataclass, field

from shardswitch.ipc import close_fds
from shardswitch.vhost.wire import (HEADER, MAX_FDS, Header, VhostProtocolError, decode_header,
                                    encode_reply)

#: How long the rest of a started message may take to arrive.
MESSAGE_DEADLINE = 2.0


class PeerGone(Exception):
    """The front-end closed its end (or the socket failed)."""


@dataclass
class Message:
    """A received vhost-user message; the caller owns ``fds``."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def take_fds(self) -> list[int]:
        """Hand the descriptors over to the caller (they are no longer closed by :meth:`close`)."""
        fds, self.fds = self.fds, []
        return fds

    def close(self) -> None:
        """Close descriptors nobody took."""
        close_fds(self.fds)
        self.fds = []


class FrontendConnection:
    """A connected front-end socket."""

    def __init__(self, sock: socket.socket) -> None:
        """Take ownership of ``sock``."""
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        """The socket's descriptor, for selectors."""
        return self.sock.fileno()

    def _recv_exact(self, size: int, fds: list[int], deadline: float) -> bytes:
        """Read exactly ``size`` bytes, collecting descriptors into ``fds``."""
        chunks: list[bytes] = []
        got = 0
        fd_size = array.array("i").itemsize
        while got < size:
            try:
                data, ancdata, flags, _addr = self.sock.recvmsg(size - got,
                                                                socket.CMSG_SPACE(MAX_FDS * fd_size))
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise VhostProtocolError(f"message stalled after {got} of {size} bytes", fatal=True)
                select.select([self.sock], [], [], remaining)
                continue
            except OSError as err:
                raise PeerGone(str(err)) from err
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(cdata[: len(cdata) - (len(cdata) % fd_size)])
                    fds.extend(received)
            if flags & socket.MSG_CTRUNC:
                # More descriptors than fit were sent with these bytes: the kernel
                # discarded the rest, so the message is not what the front-end sent.
                raise VhostProtocolError(f"more than {MAX_FDS} descriptors sent with one message "
                                         "(the excess was discarded)", fatal=True)
            if not data:
                raise PeerGone("front-end closed the connection")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def read_message(self) -> Message:
        """Read one whole message.

        Raises :class:`PeerGone` on EOF and a fatal :class:`VhostProtocolError`
        when the framing cannot be trusted (bad header, stall, too many fds,
        descriptors the kernel had to discard).
        """
        fds: list[int] = []
        deadline = time.monotonic() + MESSAGE_DEADLINE
        try:
            header = decode_header(self._recv_exact(HEADER.size, fds, deadline))
            payload = self._recv_exact(header.size, fds, deadline) if header.size else b""
        except BaseException:
            close_fds(fds)
            raise
        if len(fds) > MAX_FDS:
            close_fds(fds)
            raise VhostProtocolError(f"{len(fds)} descriptors with one message", fatal=True)
        return Message(header, payload, fds)

    def hung_up(self) -> bool:
        """True when the front-end has closed its end, even if messages it sent are still unread."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _fd, events in poller.poll(0))

    def send_reply(self, request: int, payload: bytes) -> None:
        """Send a reply (flags exactly VERSION|REPLY)."""
        data = encode_reply(request, payload)
        self.sock.setblocking(True)
        self.sock.settimeout(MESSAGE_DEADLINE)
        try:
            self.sock.sendall(data)
        except OSError as err:
            raise PeerGone(f"reply failed: {err}") from err
        finally:
            self.sock.setblocking(False)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()
