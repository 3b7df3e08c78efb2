"""Live migration of the switch's device state (VHOST_USER_PROTOCOL_F_DEVICE_STATE).

Theory of operation
-------------------
QEMU migrates the guest's memory itself; the switch helps in two ways.

* **Dirty pages.**  While QEMU copies memory it has every worker mark the
  guest pages it writes (:mod:`shardswitch.virtio.dirtylog`).
* **Device state.**  Once the guest is stopped, QEMU hands the source switch
  the write end of a pipe (SET_DEVICE_STATE_FD, direction SAVE) and reads the
  switch's state from it until end of file; on the other side it writes that
  state into a pipe whose read end the target switch got (direction LOAD),
  then asks both how it went (CHECK_DEVICE_STATE).

The state is one document (:mod:`~shardswitch.migration.format`): a fixed
header (magic, version, oldest version that can read it) and a msgpack body
with the guest's MAC and IPv6 address and, per queue pair, its flows: TCP
connections with their sequence numbers and, when TCP_REPAIR was at hand,
their sockets' state and queues; UDP and echo flows by their addresses.

The coordinator (:mod:`shardswitch.coordinator.migration`) does the pipe and
the document; each worker (:mod:`shardswitch.worker.migrate`) dumps and
restores its own flows, the TCP sockets through
:mod:`shardswitch.worker.tcp.migrate`.  Only a process with CAP_NET_ADMIN may
put a socket into repair mode, which the switch gives up at start: a small
privileged helper (:mod:`~shardswitch.migration.repair`, ``shardswitch
repair-helper``, which speaks passt-repair's protocol) connects to the
switch's repair socket and flips the mode of the sockets it is sent.  Without
it, TCP connections cannot move: they are reset on both ends (the host peer
by the source, the guest by the target) and counted.
"""
