"""Frames handed between workers: each worker's inbox and the other workers' inboxes.

A frame of a flow can arrive on a queue pair other than the one whose worker
owns the flow (Linux picks the TX queue by the sending CPU, and a sender can
move).  The worker that receives it hands the frame, unchanged, to the owner
through the owner's inbox; the owner processes it exactly like a frame from
its own TX ring, and its answer goes to the guest on the owner's RX ring
(the guest accepts any frame on any RX queue).  So a flow's socket, timers and
state stay in one process, with no window in which two processes act for it.

The inboxes are ``AF_UNIX``/``SOCK_DGRAM`` socketpairs the coordinator creates
once per queue pair and keeps for the instance's lifetime: datagrams keep
frame boundaries, are never lost or reordered, and frames queued for a worker
that dies wait in its inbox for its replacement, which inherits the same
descriptors.  Sending never blocks: a full inbox drops the frame, counted.

A handed-over frame has left its virtio-net header behind, so what the owner
needs of it travels in one prefix byte of the datagram (:class:`HandOverFlag`):
whether the guest left the frame's L4 checksum partial (NEEDS_CSUM), which
the owner must not verify.  The byte and the frame go out in one
``sendmsg`` (no joined copy); the owner gets the frame as a view after it.
"""

from __future__ import annotations

import socket
from enum import IntFlag

#: Largest frame handed over (a 64 KiB TSO segment plus headers).
MAX_FRAME = 65536 + 128
#: Bytes in front of each handed-over frame.
PREFIX_LEN = 1


class HandOverFlag(IntFlag):
    """The prefix byte of a handed-over frame."""

    NONE = 0
    #: The frame's TCP/UDP checksum holds only the pseudo-header sum (NEEDS_CSUM): do not verify it.
    CSUM_PARTIAL = 1


_PREFIXES = (bytes([HandOverFlag.NONE]), bytes([HandOverFlag.CSUM_PARTIAL]))
_CSUM_PARTIAL = int(HandOverFlag.CSUM_PARTIAL)     # a plain int for the per-frame test
#: Frames taken from the inbox per wake-up before the loop looks at other events.
INBOX_BATCH = 256


class Peers:
    """One worker's inbox and its handles on every worker's inbox."""

    def __init__(self, pair: int, inbox_fd: int, peer_fds: tuple[int, ...]) -> None:
        """Wrap inherited descriptors (no descriptor is duplicated)."""
        self.pair = pair
        self.inbox = socket.socket(fileno=inbox_fd)
        self.inbox.setblocking(False)
        self.peers = [socket.socket(fileno=fd) for fd in peer_fds]
        for peer in self.peers:
            peer.setblocking(False)
        self.handed_out = 0
        self.handed_in = 0
        self.refused = 0

    def fileno(self) -> int:
        """The inbox descriptor, for epoll."""
        return self.inbox.fileno()

    def hand_over(self, owner: int, frame: bytes | memoryview, csum_partial: bool) -> bool:
        """Queue ``frame`` in the inbox of worker ``owner``; False (counted) when it is full.

        ``csum_partial``: the guest left the frame's L4 checksum partial (NEEDS_CSUM).
        """
        try:
            self.peers[owner].sendmsg((_PREFIXES[csum_partial], frame))
        except (BlockingIOError, OSError, IndexError):
            self.refused += 1
            return False
        self.handed_out += 1
        return True

    def receive(self) -> list[tuple[bool, memoryview]]:
        """Frames waiting in this worker's inbox (at most :data:`INBOX_BATCH`), each with its csum_partial flag."""
        frames: list[tuple[bool, memoryview]] = []
        recv = self.inbox.recv
        try:
            for _ in range(INBOX_BATCH):
                data = recv(PREFIX_LEN + MAX_FRAME)
                if len(data) > PREFIX_LEN:
                    frames.append((bool(data[0] & _CSUM_PARTIAL), memoryview(data)[PREFIX_LEN:]))
        except BlockingIOError:
            pass
        self.handed_in += len(frames)
        return frames

    def close(self) -> None:
        """Close every descriptor."""
        self.inbox.close()
        for peer in self.peers:
            peer.close()


def inbox_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """``count`` (read end, write end) datagram socketpairs, one inbox per queue pair."""
    pairs = []
    for _ in range(count):
        read_end, write_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        read_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        write_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        pairs.append((read_end, write_end))
    return pairs
