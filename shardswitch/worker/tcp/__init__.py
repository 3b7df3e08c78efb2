"""TCP of one worker: passt's tcp.c, tcp_buf.c, tcp_vu.c and tcp_internal.h.

* :mod:`~shardswitch.worker.tcp.flows`: the core, :class:`TcpFlows` -
  connections, sequence and window bookkeeping, the socket side;
* :mod:`~shardswitch.worker.tcp.internal`: the written contract between the
  core and the modules below (:class:`~shardswitch.worker.tcp.internal.TcpCore`,
  :class:`TcpFlow`), which import it and never the core;
* :mod:`~shardswitch.worker.tcp.vu` and :mod:`~shardswitch.worker.tcp.buf`:
  the frame writers, host data written in place into the guest's RX buffers
  or into frames of ours;
* :mod:`~shardswitch.worker.tcp.window` and :mod:`~shardswitch.worker.tcp.tcpinfo`:
  the window offered to the guest from the host socket (``TCP_INFO``), the
  system calls and, without I/O, the arithmetic and the guest's MSS for the
  host socket;
* :mod:`~shardswitch.worker.tcp.timers`: retransmission, SYN timeout,
  keepalive, inactivity, zero windows read again;
* :mod:`~shardswitch.worker.tcp.forward`: forwarded ports (``-t``), whose
  accepted clients the core adopts;
* :mod:`~shardswitch.worker.tcp.migrate`: TCP_REPAIR dump and restore of
  connections for live migration.
"""

from shardswitch.worker.tcp.flows import EDGE, TcpFlows
from shardswitch.worker.tcp.internal import TcpFlow

__all__ = ["EDGE", "TcpFlow", "TcpFlows"]
