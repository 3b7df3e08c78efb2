"""A real TCP connection dumped in repair mode and restored on a new socket (worker/tcp_migrate.py).

Needs CAP_NET_ADMIN (the tests run as root, as in CI); the helper's request
handler (migration/repair.py) flips the mode, as the helper process would.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from shardswitch.migration import repair
from shardswitch.migration.format import Side
from shardswitch.net import inany
from shardswitch.shm.layout import Pif
from shardswitch.worker.tcp import migrate as tcp_migrate
from tests.conftest import in_ci


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        if in_ci():
            pytest.fail("TCP_REPAIR needs root (CI=true: must not skip)", pytrace=False)
        pytest.skip("TCP_REPAIR needs root")


def _repair(sock: socket.socket, command: repair.RepairCommand) -> None:
    """What the helper does for one socket."""
    request = bytes([command & 0xFF])
    assert repair.handle_request(request, [os.dup(sock.fileno())]) == request


def _pair(family: int = socket.AF_INET, rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair over the loopback; ``rcvbuf``: the server's receive buffer."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        if rcvbuf:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind((host, 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
    return client, server


def _host_side(sock: socket.socket) -> Side:
    """The host side of a flow whose socket is ``sock``."""
    ours, peer = sock.getsockname(), sock.getpeername()
    return Side(Pif.HOST, inany.from_str(peer[0]), peer[1], inany.from_str(ours[0]), ours[1])


def _recv_exactly(sock: socket.socket, length: int) -> bytes:
    """``length`` bytes from a blocking socket."""
    sock.settimeout(10)
    chunks, got = [], 0
    while got < length:
        data = sock.recv(min(length - got, 1 << 20))
        assert data, f"end of stream after {got} of {length} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_connection_moves_with_both_queues(family: int) -> None:
    """Data queued both ways survives the move, and the connection goes on without a reset."""
    client, server = _pair(family)
    to_client = os.urandom(300_000)
    to_server = os.urandom(120_000)
    writer = threading.Thread(target=server.sendall, args=(to_client,))
    writer.start()
    client.sendall(to_server)
    # Let the bytes reach the client's receive queue (it does not read).
    received_first = _recv_exactly(client, 1000)
    writer.join(timeout=10)
    side = _host_side(client)
    _repair(client, repair.RepairCommand.ON)
    state = tcp_migrate.dump(client)
    assert state.tcpi_state == tcp_migrate.TcpState.ESTABLISHED
    assert len(state.recv_queue) + 1000 <= len(to_client)
    client.close()                                    # in repair mode: the peer sees nothing

    moved = tcp_migrate.new_socket(side)
    _repair(moved, repair.RepairCommand.ON)
    tcp_migrate.restore(moved, side, state)
    _repair(moved, repair.RepairCommand.OFF)
    tcp_migrate.finish(moved, state)
    moved.setblocking(True)

    rest = len(to_client) - 1000
    reader = threading.Thread(target=lambda: got.append(_recv_exactly(server, len(to_server))))
    got: list[bytes] = []
    reader.start()
    assert received_first + _recv_exactly(moved, rest) == to_client
    reader.join(timeout=10)
    assert got == [to_server]
    # And the connection goes on both ways.
    server.sendall(b"after")
    assert _recv_exactly(moved, 5) == b"after"
    moved.sendall(b"again")
    assert _recv_exactly(server, 5) == b"again"
    moved.close()
    server.close()


def _tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state (TCP_INFO's first byte)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


@pytest.mark.parametrize("queued", [0, 2_000_000])
def test_connection_half_closed_by_us_moves(queued: int) -> None:
    """A socket that sent its FIN moves: FIN_WAIT2 (the peer has it), or FIN_WAIT1 with ``queued`` bytes and
    the FIN still in the send queue (the peer's window full).  The peer keeps sending and the moved socket
    reads it all; the peer reads our data and then the end of stream, not a reset."""
    client, server = _pair(rcvbuf=4096 if queued else 0)
    ours = b"request" + os.urandom(queued)
    client.setblocking(False)
    sent = client.send(ours)
    assert queued or sent == len(ours)
    client.setblocking(True)
    client.shutdown(socket.SHUT_WR)
    want = tcp_migrate.TcpState.FIN_WAIT1 if queued else tcp_migrate.TcpState.FIN_WAIT2
    for _ in range(100):
        if _tcp_state(client) == want:
            break
        time.sleep(0.01)
    side = _host_side(client)
    _repair(client, repair.RepairCommand.ON)
    state = tcp_migrate.dump(client)
    assert state.tcpi_state == want
    client.close()

    moved = tcp_migrate.new_socket(side)
    _repair(moved, repair.RepairCommand.ON)
    tcp_migrate.restore(moved, side, state)
    _repair(moved, repair.RepairCommand.OFF)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(_recv_exactly(server, sent) + server.recv(1)))
    reader.start()                                   # the peer reads again (room for what was not sent)
    tcp_migrate.finish(moved, state)
    moved.setblocking(True)
    reader.join(timeout=10)
    assert got == [ours[:sent]]                      # all our data, then the end of stream, not a reset
    for _ in range(100):                             # and the peer acknowledged our FIN, at its place
        if _tcp_state(moved) == tcp_migrate.TcpState.FIN_WAIT2:
            break
        time.sleep(0.02)
    assert _tcp_state(moved) == tcp_migrate.TcpState.FIN_WAIT2
    to_client = os.urandom(200_000)
    writer = threading.Thread(target=server.sendall, args=(to_client,))
    writer.start()
    assert _recv_exactly(moved, len(to_client)) == to_client
    writer.join(timeout=10)
    server.close()
    moved.settimeout(5)
    assert moved.recv(1) == b""
    moved.close()


def test_dump_refuses_a_half_closed_connection() -> None:
    """A socket that got the peer's FIN (CLOSE_WAIT) does not move."""
    client, server = _pair()
    server.shutdown(socket.SHUT_WR)
    assert _recv_exactly(client, 0) == b""
    client.settimeout(5)
    assert client.recv(1) == b""
    _repair(client, repair.RepairCommand.ON)
    with pytest.raises(tcp_migrate.MigrateError, match="not established"):
        tcp_migrate.dump(client)
    _repair(client, repair.RepairCommand.OFF)
    client.close()
    server.close()


def test_helper_refuses_what_is_not_a_tcp_socket() -> None:
    """The helper closes the connection (answers None) for a UDP socket or an unknown command."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert repair.handle_request(b"\x01", [os.dup(udp.fileno())]) is None
    client, server = _pair()
    assert repair.handle_request(b"\x07", [os.dup(client.fileno())]) is None
    assert repair.handle_request(b"\x01\x01", []) is None
    client.close()
    server.close()


def test_link_and_helper_over_a_socketpair() -> None:
    """RepairLink's requests answered by serve(); the helper ending makes the link fail clearly."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    status: list[int] = []

    def helper_main() -> None:
        status.append(repair.serve(theirs))
        theirs.close()                                # the helper process exits

    helper = threading.Thread(target=helper_main)
    helper.start()
    client, server = _pair()
    link = repair.RepairLink(ours)
    link.set(repair.RepairCommand.ON, [client.fileno()])
    assert link.freezes                               # the helper's HELLO, read with the first answer
    tcp_migrate.dump(client)                          # works only in repair mode
    link.set(repair.RepairCommand.OFF, [client.fileno()])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(repair.RepairError, match="closed the connection"):
            link.set(repair.RepairCommand.ON, [udp.fileno()])
    helper.join(timeout=5)
    assert status == [1]
    ours.close()
    client.close()
    server.close()


def test_guard_keeps_the_peer_from_a_reset_in_the_gap() -> None:
    """Source and target in one namespace: what the peer sends between the old socket's close and the new
    socket's connect is dropped by the guard, not answered with a RST, and arrives once the connection moved."""
    client, server = _pair()
    side = _host_side(client)
    _repair(client, repair.RepairCommand.ON)
    state = tcp_migrate.dump(client)
    guarding = tcp_migrate.guard(client)
    _repair(guarding, repair.RepairCommand.FREEZE)
    client.close()
    data = os.urandom(100_000)
    server.sendall(data)                              # into the gap
    time.sleep(0.3)
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    assert _tcp_state(server) == tcp_migrate.TcpState.ESTABLISHED

    moved = tcp_migrate.new_socket(side)              # the guard does not stop the connect
    _repair(moved, repair.RepairCommand.ON)
    tcp_migrate.restore(moved, side, state)
    _repair(moved, repair.RepairCommand.OFF)
    tcp_migrate.finish(moved, state)
    moved.setblocking(True)
    assert _recv_exactly(moved, len(data)) == data   # sent again by the peer
    guarding.close()
    server.sendall(b"more")
    assert _recv_exactly(moved, 4) == b"more"
    moved.close()
    server.close()


def _unacked(sock: socket.socket) -> int:
    """Bytes ``sock`` sent that its peer has not acknowledged (SIOCOUTQ)."""
    return tcp_migrate._ioctl_int(sock, tcp_migrate.SIOCOUTQ)


def test_repair_mode_alone_acknowledges_but_a_frozen_connection_takes_nothing() -> None:
    """Why the source freezes: in repair mode the kernel still acknowledges what arrives (bytes a dump
    taken before would lose); frozen, the connection takes nothing, so the peer keeps it to send again."""
    client, server = _pair()
    _repair(client, repair.RepairCommand.ON)
    server.sendall(b"a" * 1000)
    time.sleep(0.2)
    assert _unacked(server) == 0                      # acknowledged in repair mode
    _repair(client, repair.RepairCommand.FREEZE)
    before = tcp_migrate.dump(client)
    server.sendall(b"b" * 1000)
    time.sleep(0.3)
    assert _unacked(server) == 1000                   # frozen: neither taken nor acknowledged
    after = tcp_migrate.dump(client)
    assert after.recv_queue == before.recv_queue == b"a" * 1000
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    client.close()
    server.close()
