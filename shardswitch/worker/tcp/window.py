"""The window offered to the guest, read from the host socket: the system calls of passt's window updates.

Theory of operation.  :mod:`~shardswitch.worker.tcp.tcpinfo` does the
arithmetic; here are the calls that feed it, made as often as passt makes
them and no more:

* a control segment (SYN, SYN-ACK, ACK, FIN) reads ``TCP_INFO`` each time
  (passt's ``tcp_prepare_flags``); a host-local connection needs nothing
  else, another one also ``SIOCOUTQ`` and ``SO_MEMINFO`` (or ``SO_SNDBUF``
  when the kernel lacks ``SO_MEMINFO``, after which it is not asked again);
* before data frames (:meth:`HostWindow.for_data`) only while the window
  offered is at most :data:`~shardswitch.worker.tcp.WINDOW_DEFAULT`
  (passt's ``tcp_update_seqack_wnd`` without a ``tcp_info`` at hand): the
  core checks that before calling, so a bulk transfer pays nothing per frame;
* a kernel without ``tcpi_snd_wnd`` (probed once, when the worker starts)
  gets ``SO_SNDBUF`` alone, under the same rule.

For connections that are not host-local, each ``TCP_INFO`` read on a
control segment also feeds the worker's table of low-RTT destinations
(:class:`~shardswitch.worker.tcp.LowRttTable`), whose members are
then treated as local.  What the kernel returns is checked for length
before use; a socket the calls fail on is offered no window.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import termios

from shardswitch.net.tcp import ESTABLISHED
from shardswitch.worker.tcp.internal import TcpFlow
from shardswitch.worker.tcp.tcpinfo import (ENDS, MEMINFO_LEN, SO_MEMINFO, TCP_INFO, WINDOW_DEFAULT, LowRttTable,
                                            TcpInfoOffset, fallback_window, low_rtt, meminfo, offered, u32,
                                            window_from_sndbuf)

_INT = struct.Struct("i")
_INT_ZERO = bytes(_INT.size)
#: TCP_INFO's bytes we ask for, and the fewest with which tcpi_snd_wnd (or min_rtt) can be read.
INFO_LEN = TCP_INFO.size
SND_WND_END = ENDS["snd_wnd"]
MIN_RTT_END = ENDS["min_rtt"]


def probe_info_len() -> int:
    """Bytes this kernel's TCP_INFO returns (at most INFO_LEN; 0 when it cannot be asked): passt's
    tcp_probe_tcp_info(), on a socket of its own."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            return len(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, INFO_LEN))
    except OSError:
        return 0


class HostWindow:
    """One worker's window calculations: what its kernel reports, and its table of low-RTT destinations."""

    def __init__(self, info_len: int | None = None) -> None:
        """Probe the kernel's TCP_INFO (or take ``info_len``, its length, as the tests do)."""
        self.info_len = probe_info_len() if info_len is None else info_len
        #: The kernel reports the peer's window (Linux 4.19 on) and the minimum RTT (4.10 on).
        self.snd_wnd_cap = self.info_len >= SND_WND_END
        self.min_rtt_cap = self.info_len >= MIN_RTT_END
        #: SO_MEMINFO works (cleared at the first ENOPROTOOPT).
        self.meminfo_cap = True
        self.low_rtt = LowRttTable()

    def for_segment(self, flow: TcpFlow) -> int:
        """The window (bytes, unscaled) for a control segment to the guest: TCP_INFO read now."""
        sock = flow.sock
        established = bool(flow.conn.flags & ESTABLISHED)
        if not self.snd_wnd_cap:
            return fallback_window(self._sndbuf(sock))
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, INFO_LEN)
        except OSError:
            return offered(0, established)
        if len(info) < SND_WND_END:
            return offered(0, established)
        local = flow.local
        if not local and self.min_rtt_cap and low_rtt(info):
            self.low_rtt.add(flow.addr.src)
        return offered(self._window(flow, info, local), established)

    def for_data(self, flow: TcpFlow) -> int | None:
        """The window for data frames when the one offered is small (the caller checked); None: keep it."""
        sock = flow.sock
        if not self.snd_wnd_cap:
            return fallback_window(self._sndbuf(sock))
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, INFO_LEN)
        except OSError:
            return None
        if len(info) < SND_WND_END:
            return None
        return offered(self._window(flow, info, flow.local), bool(flow.conn.flags & ESTABLISHED))

    def _window(self, flow: TcpFlow, info: bytes, local: bool) -> int:
        """The peer's window alone for a local (or low-RTT) destination, else with the send buffer's room."""
        if local or flow.addr.src in self.low_rtt:
            return u32(info, TcpInfoOffset.SND_WND)
        sock = flow.sock
        try:
            sendq: int = _INT.unpack(fcntl.ioctl(flow.fd, termios.TIOCOUTQ, _INT_ZERO))[0]
        except OSError:
            sendq = 0
        mem = self._meminfo(sock)
        if mem is None:
            return window_from_sndbuf(info, flow.conn.mss, sendq, self._sndbuf(sock), None)
        sndbuf, wmem_queued = mem
        return window_from_sndbuf(info, flow.conn.mss, sendq, sndbuf, wmem_queued)

    def _meminfo(self, sock: socket.socket) -> tuple[int, int] | None:
        """SO_MEMINFO's send buffer and queued memory; None when the kernel does not tell."""
        if not self.meminfo_cap:
            return None
        try:
            return meminfo(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, MEMINFO_LEN))
        except OSError as err:
            if err.errno == errno.ENOPROTOOPT:
                self.meminfo_cap = False
            return None

    @staticmethod
    def _sndbuf(sock: socket.socket) -> int:
        """SO_SNDBUF; passt's WINDOW_DEFAULT when it cannot be read."""
        try:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            return WINDOW_DEFAULT
