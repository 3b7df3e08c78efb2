"""vhost-user request handling: decode each request and dispatch it to the device.

Second of the three vhost-user layers.  :class:`RequestHandler` maps request
codes to methods through one table; each method decodes its payload with the
wire codecs, checks the descriptors that came with it (their number, and
their kind with :mod:`~shardswitch.coordinator.fdcheck`), and calls
:class:`~shardswitch.coordinator.device.Device`.  :meth:`RequestHandler.serve`
is the single boundary where errors turn into answers:

* a refused request (bad payload, bad index, a request we do not implement,
  a request completing a ring's set-up when that ring then cannot start) is
  logged and answered with a REPLY_ACK failure when the front-end asked for
  an acknowledgement; the connection goes on;
* a request that must carry a reply but cannot be answered, and anything that
  breaks the framing, disconnects that front-end (logged); the switch keeps
  listening for the next one;
* CHECK_DEVICE_STATE asked while the device state is still on its way is
  answered later (:class:`AnswerLater`, :meth:`RequestHandler.answer_check`);
  the server reads no further request until then.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

from shardswitch.coordinator import fdcheck
from shardswitch.coordinator.conn import FrontendConnection, Message
from shardswitch.coordinator.device import (NO_FD, OFFERED_FEATURES, OFFERED_PROTOCOL_FEATURES, Device,
                                            DeviceError)
from shardswitch.coordinator.migration import REPLY_FAILED, REPLY_USE_YOUR_FD, Migration
from shardswitch.vhost.wire import (MAX_MEM_SLOTS, U64, VRING_IDX_MASK, VRING_NOFD_MASK, VRING_STATE,
                                    ProtocolFeature, Request, VhostProtocolError, decode_log, decode_mem_table,
                                    decode_single_region, decode_transfer_state, decode_u64, decode_vring_addr,
                                    decode_vring_state, request_name)

log = logging.getLogger("shardswitch.vhost")

#: Requests whose protocol always carries a reply (SET_LOG_BASE: under LOG_SHMFD, the only way it is accepted).
REPLY_REQUESTS = frozenset({
    Request.SET_LOG_BASE, Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
    Request.GET_VRING_BASE,
    Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.GET_CONFIG, Request.GET_INFLIGHT_FD,
    Request.POSTCOPY_ADVISE, Request.SET_DEVICE_STATE_FD, Request.CHECK_DEVICE_STATE,
    Request.GET_SHARED_OBJECT, Request.CREATE_CRYPTO_SESSION,
})

Handler = Callable[[Message], "bytes | None"]


class Disconnect(Exception):
    """This front-end must be dropped (the reason is the message)."""


class AnswerLater(Exception):
    """Raised by a request's handler whose answer comes later (:meth:`RequestHandler.answer_check`)."""


def _no_fds(msg: Message, name: str) -> None:
    """Refuse descriptors on a request that takes none."""
    if msg.fds:
        raise DeviceError(f"{name}: {len(msg.fds)} unexpected descriptors")


class RequestHandler:
    """Dispatches decoded requests of one front-end connection to the device."""

    def __init__(self, device: Device, migration: Migration | None = None) -> None:
        """Serve ``device``; ``migration``: the device-state transfers (None: refused)."""
        self.device = device
        self.migration = migration
        #: Requests refused, by name, for ``shardswitch status``.
        self.refused: Counter[str] = Counter()
        self.table: dict[int, Handler] = {
            Request.GET_FEATURES: self.get_features,
            Request.SET_FEATURES: self.set_features,
            Request.SET_OWNER: self.set_owner,
            Request.RESET_OWNER: self.reset_device,
            Request.RESET_DEVICE: self.reset_device,
            Request.SET_MEM_TABLE: self.set_mem_table,
            Request.ADD_MEM_REG: self.add_mem_reg,
            Request.REM_MEM_REG: self.rem_mem_reg,
            Request.GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            Request.SET_VRING_NUM: self.set_vring_num,
            Request.SET_VRING_ADDR: self.set_vring_addr,
            Request.SET_VRING_BASE: self.set_vring_base,
            Request.GET_VRING_BASE: self.get_vring_base,
            Request.SET_VRING_KICK: self.set_vring_fd,
            Request.SET_VRING_CALL: self.set_vring_fd,
            Request.SET_VRING_ERR: self.set_vring_fd,
            Request.SET_VRING_ENABLE: self.set_vring_enable,
            Request.GET_PROTOCOL_FEATURES: self.get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self.set_protocol_features,
            Request.GET_QUEUE_NUM: self.get_queue_num,
            Request.SET_STATUS: self.set_status,
            Request.GET_STATUS: self.get_status,
            Request.SET_LOG_BASE: self.set_log_base,
            Request.SET_LOG_FD: self.set_log_fd,
            Request.SET_DEVICE_STATE_FD: self.set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self.check_device_state,
        }

    # -- the boundary ------------------------------------------------------

    def serve(self, conn: FrontendConnection, msg: Message) -> None:
        """Handle one message and send what the protocol requires.

        Raises :class:`Disconnect` when the front-end must be dropped.
        """
        request = msg.header.request
        name = request_name(request)
        handler = self.table.get(request)
        try:
            if handler is None:
                raise DeviceError(f"{name} is not supported by this back-end")
            reply = handler(msg)
            ok = True
        except AnswerLater:
            return
        except VhostProtocolError as err:
            self.refused[name] += 1
            if err.fatal or request in REPLY_REQUESTS:
                raise Disconnect(f"{name}: {err}") from err
            log.error("refused %s: %s", name, err)
            reply, ok = None, False
        finally:
            msg.close()
        if reply is not None:
            conn.send_reply(request, reply)
        elif msg.header.need_reply and self.device.reply_ack:
            conn.send_reply(request, U64.pack(0 if ok else 1))

    # -- features and ownership ---------------------------------------------

    def get_features(self, msg: Message) -> bytes:
        """GET_FEATURES (answered at any time: QEMU uses it as a barrier)."""
        return U64.pack(int(OFFERED_FEATURES))

    def set_features(self, msg: Message) -> None:
        """SET_FEATURES."""
        _no_fds(msg, "SET_FEATURES")
        self.device.set_features(decode_u64("SET_FEATURES", msg.payload))

    def get_protocol_features(self, msg: Message) -> bytes:
        """GET_PROTOCOL_FEATURES."""
        return U64.pack(int(OFFERED_PROTOCOL_FEATURES))

    def set_protocol_features(self, msg: Message) -> None:
        """SET_PROTOCOL_FEATURES."""
        _no_fds(msg, "SET_PROTOCOL_FEATURES")
        self.device.set_protocol_features(decode_u64("SET_PROTOCOL_FEATURES", msg.payload))

    def get_queue_num(self, msg: Message) -> bytes:
        """GET_QUEUE_NUM: the number of queue pairs (= workers)."""
        return U64.pack(self.device.num_pairs)

    def set_owner(self, msg: Message) -> None:
        """SET_OWNER."""
        _no_fds(msg, "SET_OWNER")
        self.device.owner = True

    def reset_device(self, msg: Message) -> None:
        """RESET_DEVICE / RESET_OWNER: back to the state of a new connection."""
        _no_fds(msg, request_name(msg.header.request))
        protocol = self.device.acked_protocol_features
        self.device.reset()
        # The protocol features belong to the connection, not to the device state.
        self.device.acked_protocol_features = protocol

    def set_status(self, msg: Message) -> None:
        """SET_STATUS: record the virtio device status byte."""
        _no_fds(msg, "SET_STATUS")
        status = decode_u64("SET_STATUS", msg.payload)
        if status > 0xFF:
            raise DeviceError(f"SET_STATUS: {status:#x} is not a status byte")
        self.device.status = status

    def get_status(self, msg: Message) -> bytes:
        """GET_STATUS."""
        return U64.pack(self.device.status)

    # -- memory ------------------------------------------------------------

    def set_mem_table(self, msg: Message) -> None:
        """SET_MEM_TABLE."""
        regions = decode_mem_table(msg.payload)
        fds = msg.take_fds()
        fdcheck.check_memory_fds("SET_MEM_TABLE", regions, fds)
        self.device.set_mem_table(regions, fds)

    def add_mem_reg(self, msg: Message) -> None:
        """ADD_MEM_REG."""
        region = decode_single_region("ADD_MEM_REG", msg.payload)
        fds = msg.take_fds()
        fdcheck.check_memory_fds("ADD_MEM_REG", [region], fds)
        self.device.add_mem_region(region, fds)

    def rem_mem_reg(self, msg: Message) -> None:
        """REM_MEM_REG."""
        region = decode_single_region("REM_MEM_REG", msg.payload)
        self.device.remove_mem_region(region, msg.take_fds())

    def get_max_mem_slots(self, msg: Message) -> bytes:
        """GET_MAX_MEM_SLOTS."""
        return U64.pack(MAX_MEM_SLOTS)

    # -- vrings --------------------------------------------------------------

    def set_vring_num(self, msg: Message) -> None:
        """SET_VRING_NUM."""
        _no_fds(msg, "SET_VRING_NUM")
        self.device.set_vring_num(*decode_vring_state("SET_VRING_NUM", msg.payload))

    def set_vring_base(self, msg: Message) -> None:
        """SET_VRING_BASE."""
        _no_fds(msg, "SET_VRING_BASE")
        self.device.set_vring_base(*decode_vring_state("SET_VRING_BASE", msg.payload))

    def set_log_base(self, msg: Message) -> bytes:
        """SET_LOG_BASE: the dirty-page log's memfd; answered (QEMU waits for a reply under LOG_SHMFD)."""
        size, offset = decode_log(msg.payload)
        if len(msg.fds) != 1:
            raise DeviceError(f"SET_LOG_BASE: expected 1 descriptor, got {len(msg.fds)}")
        fdcheck.check_log_fd("SET_LOG_BASE", msg.fds[0], offset, size)
        (fd,) = msg.take_fds()
        self.device.set_log_base(size, offset, fd)
        return b""

    def set_log_fd(self, msg: Message) -> None:
        """SET_LOG_FD: an eventfd for log notifications (kept, unused: the log is written in place)."""
        if len(msg.fds) != 1:
            raise DeviceError(f"SET_LOG_FD: expected 1 descriptor, got {len(msg.fds)}")
        fdcheck.check_eventfd("SET_LOG_FD", msg.fds[0])
        (fd,) = msg.take_fds()
        self.device.set_log_fd(fd)

    def set_device_state_fd(self, msg: Message) -> bytes:
        """SET_DEVICE_STATE_FD: a live migration's state goes out of (SAVE) or into (LOAD) the pipe sent.

        Always answered (a refusal is an error code in the answer, not a disconnection).
        """
        migration = self.migration
        try:
            if migration is None or not self.device.acked_protocol_features & ProtocolFeature.DEVICE_STATE:
                raise DeviceError("SET_DEVICE_STATE_FD: DEVICE_STATE was not negotiated")
            direction, phase = decode_transfer_state(msg.payload)
            if len(msg.fds) != 1:
                raise DeviceError(f"SET_DEVICE_STATE_FD: expected 1 descriptor, got {len(msg.fds)}")
        except VhostProtocolError as err:
            self.refused["SET_DEVICE_STATE_FD"] += 1
            log.error("refused %s", err)
            return U64.pack(REPLY_USE_YOUR_FD | REPLY_FAILED)
        (fd,) = msg.take_fds()
        return U64.pack(migration.begin(direction, phase, fd))

    def check_device_state(self, msg: Message) -> bytes:
        """CHECK_DEVICE_STATE: 0 when the last device-state transfer succeeded; AnswerLater while it is
        still under way."""
        _no_fds(msg, "CHECK_DEVICE_STATE")
        result = self.migration.check() if self.migration is not None else REPLY_FAILED
        if result is None:
            raise AnswerLater("CHECK_DEVICE_STATE")
        return U64.pack(result)

    @staticmethod
    def answer_check(conn: FrontendConnection, result: int) -> None:
        """The answer to a CHECK_DEVICE_STATE that had to wait."""
        conn.send_reply(Request.CHECK_DEVICE_STATE, U64.pack(result))

    def get_vring_base(self, msg: Message) -> bytes:
        """GET_VRING_BASE: stops the ring; answers its next avail index."""
        _no_fds(msg, "GET_VRING_BASE")
        index, _num = decode_vring_state("GET_VRING_BASE", msg.payload)
        return VRING_STATE.pack(index, self.device.get_vring_base(index))

    def set_vring_addr(self, msg: Message) -> None:
        """SET_VRING_ADDR."""
        _no_fds(msg, "SET_VRING_ADDR")
        addr = decode_vring_addr(msg.payload)
        self.device.set_vring_addr(addr)
        self._check_started(addr.index, "SET_VRING_ADDR")

    def set_vring_enable(self, msg: Message) -> None:
        """SET_VRING_ENABLE."""
        _no_fds(msg, "SET_VRING_ENABLE")
        index, enable = decode_vring_state("SET_VRING_ENABLE", msg.payload)
        self.device.set_vring_enable(index, enable)
        self._check_started(index, "SET_VRING_ENABLE")

    def _check_started(self, index: int, name: str) -> None:
        """Refuse a request that completed a ring's set-up when the ring then did not start.

        Without this a ring outside guest memory (or refused by its worker)
        would be acknowledged as a success and only logged; now a front-end
        that asked for REPLY_ACK learns that the ring is not running.
        """
        failure = self.device.start_failure(index)
        if failure:
            raise DeviceError(f"{name}: {failure}")

    def set_vring_fd(self, msg: Message) -> None:
        """SET_VRING_KICK / CALL / ERR: u64 index with the NOFD bit, and one eventfd unless NOFD."""
        request = Request(msg.header.request)
        value = decode_u64(request.name, msg.payload)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise DeviceError(f"{request.name}: unknown bits in {value:#x}")
        index = value & VRING_IDX_MASK
        want = 0 if value & VRING_NOFD_MASK else 1
        if len(msg.fds) != want:
            raise DeviceError(f"{request.name}: expected {want} descriptor(s), got {len(msg.fds)}")
        self.device.vring(index, request.name)
        for fd in msg.fds:
            fdcheck.check_eventfd(request.name, fd)  # a refused one is closed with the message
        setter = {Request.SET_VRING_KICK: self.device.set_vring_kick,
                  Request.SET_VRING_CALL: self.device.set_vring_call,
                  Request.SET_VRING_ERR: self.device.set_vring_err}[request]
        fds = msg.take_fds()
        # The device owns the descriptor from here on, even when the ring then fails to
        # start below (it is stored in the ring): closing it on that error would close it twice.
        setter(index, fds[0] if fds else NO_FD)
        if request == Request.SET_VRING_KICK:
            self._check_started(index, request.name)
