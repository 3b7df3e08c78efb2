"""Timers of TCP flows, run by a worker's deferred handler once a second.

Theory of operation.  Each flow carries its own times (``last`` activity,
``timer`` = start of the current retransmission period, ``keepalive``,
``created``); one pass over the worker's flows a second compares them with
``now``:

* inactivity: no segment from the guest for :data:`IDLE_TIMEOUT`: RST both ways;
* connect: a ``connect()`` still pending after :data:`SYN_TIMEOUT`: RST to the guest;
* retransmission: data (or our SYN / SYN-ACK) unacknowledged for ``rto``:
  the sequence is rewound to the guest's last ACK and sent again, ``rto``
  doubling from :data:`RTO_INIT`, RST after :data:`MAX_RETRIES`;
* keepalive: an established connection quiet for :data:`KEEPALIVE_INTERVAL`
  gets an ACK to the guest, once per interval;
* host data left in the socket because the window was closed is sent again;
* a zero window we offered the guest is read again from the host socket, and
  announced once it opened (passt's ACK_TO_TAP_DUE, at our one-second grain).
"""

from __future__ import annotations

from shardswitch.net.tcp import CONNECTING, ESTABLISHED, GUEST_FIN_RCVD
from shardswitch.worker.tcp.internal import RTO_INIT, Frames, TcpCore, TcpFlow

__all__ = ["RTO_INIT", "MAX_RETRIES", "SYN_TIMEOUT", "IDLE_TIMEOUT", "KEEPALIVE_INTERVAL", "run"]

#: Retransmissions before giving up with a RST (the first timeout is RTO_INIT, from the contract).
MAX_RETRIES = 7
#: A connect() still in progress after this long is refused to the guest.
SYN_TIMEOUT = 10.0
#: Idle connections are reset after this long (as passt).
IDLE_TIMEOUT = 7200.0
#: An established connection quiet for this long gets a keepalive ACK to the guest, again every interval
#: (as passt); the host side has SO_KEEPALIVE.
KEEPALIVE_INTERVAL = 30.0


def run(flows: TcpCore, flow: TcpFlow, now: float, out: Frames) -> None:
    """The timers of one flow at ``now``; frames for the guest go to ``out``."""
    conn = flow.conn
    if now - flow.last > IDLE_TIMEOUT:
        flows.reset_guest(flow, out)
        return
    if conn.flags & CONNECTING:
        if now - flow.created > SYN_TIMEOUT:
            flows.reset_guest(flow, out, syn=True)
        return
    if not conn.wnd_to_guest and conn.flags & ESTABLISHED and not conn.flags & GUEST_FIN_RCVD:
        flows.window_update(flow, out)
    waiting = conn.seq_to_guest != conn.seq_ack_from_guest
    if not waiting:
        if flow.readable:
            flows.to_guest(flow, now, out)
        elif (conn.flags & ESTABLISHED and now - flow.last >= KEEPALIVE_INTERVAL
              and now - flow.keepalive >= KEEPALIVE_INTERVAL):
            flow.keepalive = now
            out.append(flows.ack(flow))
        return
    if now - flow.timer < flow.rto:
        return
    flow.retries += 1
    if flow.retries > MAX_RETRIES:
        flows.reset_guest(flow, out)
        return
    flow.timer = now
    flow.rto *= 2
    if not conn.flags & ESTABLISHED:
        out.append(flows.syn(flow) if flow.inbound else flows.syn_ack(flow))
        return
    conn.rewind()
    flows.rewind_socket(flow)
    flows.to_guest(flow, now, out)
