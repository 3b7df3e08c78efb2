"""The coordinator process: sockets, the front-end connection, and worker supervision.

One single-threaded selector loop watches:

* the vhost-user listening socket (server mode) or, in client mode
  (``--connect``), a retry timer until the front-end's socket accepts us;
* the one front-end connection: each readable event is one vhost-user
  message, handled by :class:`~shardswitch.coordinator.handler.RequestHandler`;
  a second concurrent front-end is refused and logged;
* the control socket (``shardswitch status``, ``forward``...): its clients
  too, each without blocking the loop (:mod:`.control`, :mod:`.streams`),
  only those its access policy allows (:mod:`.access`); forwarding rules
  changed there are applied to every worker or none (:mod:`.forwarding`);
* one pidfd per worker, readable the instant that worker dies: it is replaced
  and handed the device state again;
* a signal wake-up socket: SIGTERM/SIGINT end the loop cleanly.

When the front-end goes away the device is reset (workers stop their rings
and unmap guest memory) and the switch waits for the next one; a QEMU
started with ``reconnect=1`` that comes back gets a working network with no
action in the guest.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import stat
import time
from typing import Any, Callable

import msgspec

from shardswitch import __version__
from shardswitch.coordinator import confine
from shardswitch.coordinator.access import AccessPolicy, restrict_socket_file
from shardswitch.coordinator.capture import CaptureControl, CaptureError
from shardswitch.coordinator.conn import FrontendConnection, PeerGone
from shardswitch.coordinator.control import MAX_CLIENTS, ControlServer, FdCommand, uptime_since
from shardswitch.coordinator.device import Device
from shardswitch.coordinator.forwarding import ForwardError, PortForwarding, target_policy
from shardswitch.coordinator.handler import Disconnect, RequestHandler
from shardswitch.coordinator.hosting import Hosting, adopt, write_pid_file
from shardswitch.coordinator.metrics import MetricsServer, exposition
from shardswitch.coordinator.migration import Migration
from shardswitch.coordinator.stats import StatsLog
from shardswitch.coordinator.workers import WorkerHandle, WorkerPool
from shardswitch.ipc import SandboxProbe, StatusQuery, WorkerSetup, WorkerStatus
from shardswitch.net.endpoint import Service
from shardswitch.sandbox import SandboxSetup, seccomp
from shardswitch.sandbox.privileges import Confinement, SandboxError, drop_privileges
from shardswitch.shm.layout import DEFAULT_CAPACITY, Flow, FlowSide, FlowTableError, Pif, ip_of
from shardswitch.shm.table import FlowTable
from shardswitch.takeover.old import OldSide, TakeoverRefused, check_channel
from shardswitch.vhost.wire import VhostProtocolError, VirtioFeature


log = logging.getLogger("shardswitch")

#: How long recovery may wait for live workers to step out of the flow table's lock.
RECOVERY_TIMEOUT = 2.0
#: Seconds between connection attempts in client mode.
CONNECT_RETRY = 0.5
#: How long a new front-end may take to send SET_OWNER (QEMU sends it at once) before it is dropped, so that
#: a connection that says nothing cannot hold the one front-end slot.
HANDSHAKE_TIMEOUT = 5.0

Callback = Callable[[], None]


def flow_entry(flow: Flow, now: float) -> dict[str, Any]:
    """One flow as the control socket shows it."""
    def side(s: FlowSide) -> dict[str, Any]:
        return {"pif": Pif(s.pif).name.lower(), "ep_addr": str(ip_of(s.ep_addr)), "ep_port": s.ep_port,
                "our_addr": str(ip_of(s.our_addr)), "our_port": s.our_port}
    return {"index": flow.entry, "generation": flow.generation, "type": flow.type.name.lower(),
            "state": flow.state.name.lower(), "owner": flow.owner, "age": max(0.0, now - flow.last_activity),
            "timeout": flow.timeout or None, "sides": [side(flow.initiator), side(flow.target)]}


class StartError(Exception):
    """shardswitch cannot start (socket in use, bad path...)."""


def prepare_socket_path(path: str) -> None:
    """Make ``path`` usable for a new listening socket.

    A socket file left by a dead instance is removed; one that a live process
    still accepts on is refused with a clear message; anything that is not a
    socket is never touched.  The folder is the caller's (``cli.prepare_socket_dir``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as err:
        raise StartError(f"cannot check existing socket {path}: {err}") from err
    finally:
        probe.close()
    raise StartError(f"{path} is in use by a running process; stop it first or choose another --socket")


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """A non-blocking listening unix socket at ``path`` (stale files replaced), ``backlog`` connections
    waiting at most."""
    prepare_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as err:
        sock.close()
        raise StartError(f"cannot listen on {path}: {err.strerror}") from err
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def qemu_fragment(path: str, workers: int) -> str:
    """The QEMU command-line options that connect a guest to this socket."""
    vectors = 2 * workers + 2
    return (f"-object memory-backend-memfd,id=mem0,size=<guest RAM, e.g. 1G>,share=on -M memory-backend=mem0 "
            f"-chardev socket,id=ss0,path={path},reconnect=1 "
            f"-netdev vhost-user,id=net0,chardev=ss0,queues={workers} "
            f"-device virtio-net-pci,netdev=net0,mq={'on' if workers > 1 else 'off'},vectors={vectors}")


class Coordinator:
    """All state of the coordinator process."""

    def __init__(self, *, workers: int, setup: WorkerSetup, socket_path: str, control_path: str,
                 connect: bool = False, max_flows: int = DEFAULT_CAPACITY,
                 ports: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
                 sandbox: SandboxSetup | None = None, repair_path: str = "",
                 hosting: Hosting | None = None) -> None:
        """Set up (nothing is bound, created or forked until :meth:`open`); ``setup``: the workers' template,
        ``ports``: the -t and -u SPECs, ``sandbox``: how to sandbox (None: --no-sandbox), ``repair_path``:
        where the TCP_REPAIR helper connects ("": nowhere), ``hosting``: what the starter handed over."""
        params = setup.params
        self.params = params
        self.max_flows = max_flows
        self.table: FlowTable | None = None
        self.socket_path = socket_path
        self.control_path = control_path
        self.client_mode = connect
        self.started = time.monotonic()
        self.sel = selectors.DefaultSelector()
        self.sandbox = sandbox
        #: What the sandbox could build (None: not built, or --no-sandbox).
        self.confinement: Confinement | None = None
        self.port_specs = ports
        self.pool = WorkerPool(workers, msgspec.structs.replace(
            setup, sandbox=sandbox is not None,
            test_hooks=sandbox is not None and sandbox.test_hooks), self.sel)
        self.device = Device(workers, self.pool)
        #: The forwarding rules and their listening sockets, every worker's (kept for replacements).
        self.forwarding = PortForwarding(self.pool, self.device.next_seq, target_policy(setup))
        self.migration = Migration(self.pool, self.sel, lambda: self.table, self.device.next_seq, repair_path,
                                   capacity=max_flows)
        self.handler = RequestHandler(self.device, self.migration)
        self.conn: FrontendConnection | None = None
        #: The front-end's socket is in the selector (not while the migration holds its requests back).
        self.conn_watched = False
        self.listener: socket.socket | None = None
        self.control: ControlServer | None = None
        self.stopping = False
        self.next_connect = 0.0
        #: When the connected front-end must have sent SET_OWNER by (0: it has, or none is connected).
        self.handshake_deadline = 0.0
        self._owned_paths: list[str] = []
        #: Of those, the files this process cannot remove after the privilege drop.
        self._left_paths: list[str] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self.hosting = hosting if hosting is not None else Hosting()
        self.forwarding.freebind = self.hosting.freebind
        #: Exit when the front-end leaves: -1/--one-off, or serving a front-end handed over connected (--fd).
        self.one_off = self.hosting.one_off
        #: A take-over in progress (docs/takeover.md), None when there is none.
        self.takeover: OldSide | None = None
        #: --stats: the counters' log line and its schedule (None: off).
        self.stats = StatsLog(self.hosting.stats, time.monotonic()) if self.hosting.stats else None
        self.metrics: MetricsServer | None = None
        self.capture = CaptureControl(self.pool,
                                      lambda pair: self.pool.call(pair, StatusQuery(seq=self.device.next_seq())))

    # -- set-up and tear-down -------------------------------------------

    def open(self) -> None:
        """Create the flow table, bind sockets, fork workers, install signal handling."""
        # Sockets first: "socket in use" is the clearest message for a second instance.
        hosting = self.hosting
        if hosting.control_fd is not None:
            control = adopt(hosting.control_fd)
        else:
            control = listen_unix(self.control_path, MAX_CLIENTS)
            self._owned_paths.append(self.control_path)
            why_not = restrict_socket_file(self.control_path, hosting.control_group)
            if why_not:
                log.warning("control socket: %s", why_not)
        self.control = ControlServer(self.sel, control, AccessPolicy(hosting.control_group), *self._commands(),
                                     owner_commands=frozenset({"takeover"}))
        if hosting.listener_fd is not None:
            self.listener = adopt(hosting.listener_fd)
        elif not self.client_mode and hosting.frontend_fd is None:
            self.listener = listen_unix(self.socket_path)
            self._owned_paths.append(self.socket_path)
        if self.listener is not None:
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_listener)
        if hosting.pid_file:
            try:
                write_pid_file(hosting.pid_file)
            except OSError as err:
                raise StartError(f"PID file {hosting.pid_file}: {err.strerror or err}") from err
            self._owned_paths.append(hosting.pid_file)
        self._bind_ports()
        if hosting.metrics:
            try:
                self.metrics = MetricsServer(self.sel, hosting.metrics, lambda: (self.status(), self.flows()))
            except (OSError, ValueError) as err:
                raise StartError(f"--metrics {hosting.metrics}: {err}") from err
            log.info("metrics on http://%s:%d/metrics", *self.metrics.address[:2])
        try:
            self.migration.listen()
        except OSError as err:
            raise StartError(f"repair socket {self.migration.repair_path}: {err.strerror or err}") from err
        if self.migration.repair_path:
            self._owned_paths.append(self.migration.repair_path)
        if self.sandbox is not None:
            kept = confine.kept_dirs(self._owned_paths, self.sandbox, self.socket_path if self.client_mode else "")
            self._left_paths = kept.left
            try:
                self.confinement = drop_privileges(self.sandbox.runas, keep=kept.dirs,
                                                   on_fork=confine.keeper_duties(hosting),
                                                   chroot_fallback=self.sandbox.chroot_fallback)
            except SandboxError as err:
                raise StartError(f"cannot drop privileges ({err}); --no-sandbox runs without") from err
            self.forwarding.unprivileged = True
        self.control.access.settle()
        log.info("control socket %s: serves %s", self.control_path, self.control.access.describe())
        try:
            self.table = FlowTable.create(capacity=self.max_flows)
        except FlowTableError as err:
            raise StartError(f"flow table: {err}") from err
        # Workers inherit the table with the fork (nothing of it can be opened by name).
        self.pool.template = msgspec.structs.replace(self.pool.template, flow_table=self.table.instance)
        log.info("flow table %s: %d flows", self.table.instance, self.max_flows)
        self.pool.start()
        for handle in self.pool.handles:
            assert handle is not None
            self.sel.register(handle.pidfd, selectors.EVENT_READ, self._death_callback(handle.pidfd))
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wakeup)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if hosting.pcap is not None:
            try:
                self.capture.start(list(hosting.pcap), hosting.pcap_size, hosting.pcap_name)
            except CaptureError as err:
                raise StartError(f"--pcap {hosting.pcap_name}: {err}") from err
        if hosting.frontend_fd is not None:
            log.info("serving the front-end connected on descriptor %d; exiting when it leaves", hosting.frontend_fd)
            self.one_off = True
            self._attach(adopt(hosting.frontend_fd))
        if self.sandbox is not None:
            try:
                seccomp.install(seccomp.Role.COORDINATOR)
            except seccomp.SeccompError as err:
                raise StartError(str(err)) from err
            assert self.confinement is not None
            log.info("%s", confine.describe(self.sandbox, self.confinement))
            confine.warn_if_log_only()

    def _bind_ports(self) -> None:
        """Bind every worker's listening sockets of the -t and -u ports (before privileges go)."""
        try:
            self.forwarding.open_start(*self.port_specs)
        except ForwardError as err:
            raise StartError(str(err)) from None

    def close(self) -> None:
        """Stop workers, close sockets, remove the socket files we created."""
        if self.conn is not None:
            self._drop_frontend("shutting down")
        if self.takeover is not None:
            self.takeover.end("this switch is stopping")
        self.migration.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.control is not None:
            self.control.close()
        self.capture.stop()
        self.pool.stop()
        if self.table is not None:
            self.table.close()
            self.table = None
        self.forwarding.close()
        if self.listener is not None:
            self.listener.close()
        for path in self._owned_paths:
            if path in self._left_paths:
                log.info("cannot remove %s (no write access to its directory after dropping root)", path)
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except PermissionError:
                # Running as --runas in a directory only root may change: the next start replaces it.
                log.info("cannot remove %s (no write access to its directory after dropping root)", path)
        signal.set_wakeup_fd(-1)
        self.sel.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        """SIGTERM/SIGINT: leave the loop."""
        self.stopping = True

    def _on_wakeup(self) -> None:
        """Drain the signal wake-up socket."""
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    # -- loop ---------------------------------------------------------------

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT (or, serving a handed-over front-end, until it leaves)."""
        while not self.stopping:
            timeout = self._periodic(time.monotonic())
            if self.client_mode and self.conn is None:
                wait = max(0.0, self.next_connect - time.monotonic())
                if wait == 0.0:
                    self._try_connect()
                    continue
                timeout = wait if timeout is None else min(timeout, wait)
            left = self._handshake_left()
            if left == 0.0:
                continue
            if left is not None:
                timeout = left if timeout is None else min(timeout, left)
            for key, _events in self.sel.select(timeout):
                key.data()
                if self.stopping:
                    break
        log.info("stopping")

    def _periodic(self, now: float) -> float | None:
        """The watchdog ping and the log file's size check when due; seconds until the next one is."""
        waits = [self.hosting.notifier.watchdog_timeout(now), self.capture.tick(now)]
        if self.metrics is not None:
            waits.append(self.metrics.expire(now))
        if self.control is not None:
            waits.append(self.control.expire(now))
        if self.hosting.log_file is not None:
            waits.append(self.hosting.log_file.trim(now))
        if self.takeover is not None:
            waits.append(self.takeover.expire(now))
        if self.stats is not None:
            if self.stats.wait(now) == 0.0:
                line = self.stats.line(self.status(), now)
                if line is not None:
                    log.info("%s", line)
            waits.append(self.stats.wait(now))
        waits.append(self.migration.tick(now))
        self._follow_migration()
        if self.migration.take_source_done():
            self._source_migrated()
        due = [wait for wait in waits if wait is not None]
        return min(due) if due else None

    def _follow_migration(self) -> None:
        """Send the answer to a CHECK_DEVICE_STATE that waited, once there is one, and read the front-end's
        requests only while the migration does not hold them back (:meth:`Migration.holds_frontend`)."""
        answer = self.migration.answer()
        if answer is not None and self.conn is not None:
            try:
                self.handler.answer_check(self.conn, answer)
            except PeerGone as err:
                self._drop_frontend(f"front-end disconnected ({err})")
        watch = self.conn is not None and not self.migration.holds_frontend()
        if self.conn is not None and watch != self.conn_watched:
            if watch:
                self.sel.register(self.conn.sock, selectors.EVENT_READ, self._on_frontend)
            else:
                self.sel.unregister(self.conn.sock)
            self.conn_watched = watch

    def _source_migrated(self) -> None:
        """The guest's state went out and QEMU was told it succeeded: the guest runs on the target now.  As
        passt: exit with --migrate-exit; else serve on (a failed migration's guest may come back, or a new
        front-end connect), and --one-off no longer applies, since exiting would close the guards of the
        connections that moved."""
        if self.hosting.migrate_exit:
            log.info("migration complete: exiting (--migrate-exit)")
            self.stopping = True
            return
        log.info("migration complete")
        self.one_off = False

    def _handshake_left(self) -> float | None:
        """Seconds the connected front-end has left to send SET_OWNER (None: no deadline runs); a front-end
        whose time is up is dropped (counted, logged) and 0.0 returned."""
        if not self.handshake_deadline:
            return None
        if self.device.owner:
            self.handshake_deadline = 0.0
            return None
        left = max(0.0, self.handshake_deadline - time.monotonic())
        if left == 0.0:
            self.handler.refused["HANDSHAKE_TIMEOUT"] += 1
            self._drop_frontend(f"handshake stalled: no SET_OWNER within {HANDSHAKE_TIMEOUT:.0f} s", error=True)
        return left

    def _try_connect(self) -> None:
        """Client mode: connect to the front-end's socket if it is there."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError as err:
            sock.close()
            if self.next_connect == 0.0:
                log.info("waiting for the front-end at %s (%s)", self.socket_path, err.strerror)
            self.next_connect = time.monotonic() + CONNECT_RETRY
            return
        log.info("connected to the front-end at %s", self.socket_path)
        self._attach(sock)

    def _on_listener(self) -> None:
        """Accept a front-end; refuse a second concurrent one."""
        assert self.listener is not None
        try:
            sock, _addr = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None and self.conn.hung_up():
            # The previous front-end closed but its hang-up is not processed yet (it
            # reconnected at once): it is gone, not a concurrent one; drop it first.
            self._drop_frontend("front-end disconnected (hung up)")
        if self.conn is not None:
            log.warning("refused a second front-end: one is already connected")
            sock.close()
            return
        log.info("front-end connected")
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        """Start serving a connected front-end."""
        self.conn = FrontendConnection(sock)
        self.handshake_deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        self.sel.register(self.conn.sock, selectors.EVENT_READ, self._on_frontend)
        self.conn_watched = True

    def _on_frontend(self) -> None:
        """One message from the front-end."""
        conn = self.conn
        assert conn is not None
        try:
            msg = conn.read_message()
        except PeerGone as err:
            self._drop_frontend(f"front-end disconnected ({err})")
            return
        except VhostProtocolError as err:
            self.handler.refused["MALFORMED"] += 1
            self._drop_frontend(f"protocol error: {err}", error=True)
            return
        try:
            self.handler.serve(conn, msg)
        except Disconnect as err:
            self._drop_frontend(f"protocol error: {err}", error=True)
            return
        except PeerGone as err:
            self._drop_frontend(f"front-end disconnected ({err})")
            return
        if self.migration.saved is not None and any(ring.started for ring in self.device.vrings):
            # The rings run again on this side after a save: the migration failed, the guest resumed here.
            self.migration.rollback()
        self._follow_migration()

    def _drop_frontend(self, reason: str, *, error: bool = False) -> None:
        """Forget the front-end: rings stop, memory is unmapped, we wait for the next one."""
        (log.error if error else log.info)("%s; resetting the device", reason)
        assert self.conn is not None
        if self.conn_watched:
            self.sel.unregister(self.conn.sock)
        self.conn_watched = False
        self.conn.close()
        self.conn = None
        self.handshake_deadline = 0.0
        self.migration.reset()
        self.device.reset()
        self.next_connect = time.monotonic() + CONNECT_RETRY
        if self.one_off:
            self.stopping = True

    def _commands(self) -> tuple[dict[str, Callable[[], dict[str, Any]]], dict[str, FdCommand]]:
        """The control socket's commands: those without descriptors, and those that take them."""
        commands = {"status": self.status, "flows": self.flows,
                    "metrics": lambda: {"text": exposition(self.status(), self.flows()).decode()}}
        if self.sandbox is not None and self.sandbox.test_hooks:
            for pair in range(self.pool.count):
                commands[f"test-forbidden-syscall-{pair}"] = self._probe_callback(pair)
        commands["forward-list"] = self.forwarding.listing
        return commands, {"capture-start": self._capture_start, "capture-stop": self._capture_stop,
                          "forward-add": self.forwarding.command("add"),
                          "forward-remove": self.forwarding.command("remove"), "takeover": self._takeover}

    def _takeover(self, _request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """``{"cmd": "takeover"}`` with one end of a SEQPACKET socketpair: the channel of a take-over by a new
        process (root or this switch's own user: the control server checked), one at a time."""
        if self.takeover is not None:
            for fd in fds:
                os.close(fd)
            return {"error": f"busy: a take-over is in flight ({self.takeover.peer})"}
        try:
            sock = check_channel(fds)
        except TakeoverRefused as err:
            return {"error": str(err)}
        assert self.control is not None                  # the request came through it
        self.takeover = OldSide(self.sel, sock, __version__, self.hosting.settings, self.pool.count,
                                self._takeover_ended, self.control.limiter)
        return {"takeover": "accepted"}

    def _takeover_ended(self) -> None:
        """The take-over session is over (this switch serves on)."""
        self.takeover = None

    def _capture_start(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """``shardswitch capture start``: the client opened the files and sent them."""
        size = request.get("size", 0)
        name = request.get("file", "capture")
        try:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(name, str):
                for fd in fds:
                    os.close(fd)
                raise CaptureError(f"bad capture request {request!r}")
            self.capture.start(fds, size, name[:4096])
        except CaptureError as err:
            log.error("capture not started: %s", err)
            return {"error": f"capture not started: {err}"}
        return {"capture": self.capture.status()}

    def _capture_stop(self, _request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """``shardswitch capture stop``."""
        for fd in fds:
            os.close(fd)
        return {"stopped": self.capture.stop()}

    def _probe_callback(self, pair: int) -> Callable[[], dict[str, Any]]:
        """Test only: a control command that makes worker ``pair`` call outside its seccomp list."""
        return lambda: {"sent": self.pool.send(pair, SandboxProbe())}

    def _death_callback(self, pidfd: int) -> Callback:
        """The selector callback for a worker's pidfd."""
        return lambda: self._on_worker_death(pidfd)

    def _on_worker_death(self, pidfd: int) -> None:
        """A worker exited: replace it and restore its queue pair."""
        handle = self.pool.by_pidfd(pidfd)
        self.sel.unregister(pidfd)
        if handle is None or self.stopping:
            return
        new = self.pool.reap(handle, self._release_worker)
        self.sel.register(new.pidfd, selectors.EVENT_READ, self._death_callback(new.pidfd))
        self.device.restore_pair(new.pair)
        self.capture.restore(new.pair)

    def _release_worker(self, handle: WorkerHandle) -> None:
        """Repair what a dead worker held in the flow table and free its flows (their sockets died with it)."""
        if self.table is None:
            return
        try:
            repaired = self.table.recover(handle.pid, timeout=RECOVERY_TIMEOUT)
            freed = self.table.remove_owned_by(handle.pair)
        except FlowTableError as err:
            log.error("flow table recovery after worker %d: %s", handle.pair, err)
            return
        log.info("worker %d: %s; %d flow(s) freed", handle.pair, repaired, freed)

    # -- status --------------------------------------------------------------

    def flows(self) -> dict[str, Any]:
        """Every live flow, read under the read lock (``shardswitch flows``)."""
        if self.table is None:
            return {"flows": [], "capacity": 0}
        now = time.monotonic()
        return {"capacity": self.max_flows, "instance": self.table.instance,
                "flows": [flow_entry(flow, now) for flow in self.table.list_flows()]}

    def status(self) -> dict[str, Any]:
        """Everything ``shardswitch status`` shows."""
        features = self.device.acked_features
        workers = []
        for pair, handle in enumerate(self.pool.handles):
            entry: dict[str, Any] = {"pair": pair, "pid": handle.pid if handle else None,
                                     "restarts": handle.restarts if handle else 0,
                                     "last_exit": handle.last_exit if handle else ""}
            answer = self.pool.call(pair, StatusQuery(seq=self.device.next_seq()), wait_posted=False)
            entry["busy"] = self.pool.busy(pair)          # restoring migrated flows: not asked, not waited for
            if isinstance(answer, WorkerStatus):
                details = msgspec.to_builtins(answer)
                del details["seq"], details["type"]
                entry.update(details, answered=True)
            else:
                entry["answered"] = False
            workers.append(entry)
        return {
            "version": __version__, "pid": os.getpid(), "uptime": uptime_since(self.started),
            "socket": self.socket_path, "mode": "client" if self.client_mode else "server",
            "frontend": {"connected": self.conn is not None, "features": features,
                         "feature_names": [f.name for f in VirtioFeature if f & features and f.name],
                         "protocol_features": self.device.acked_protocol_features,
                         "refused": dict(self.handler.refused)},
            "guest": {"address": self.params.address, "prefix_len": self.params.prefix_len,
                      "gateway": self.params.gateway, "mtu": self.params.mtu, "dns": list(self.params.dns)},
            "workers": workers,
            "sandbox": confine.status(self.sandbox, self.confinement),
            "capture": self.capture.status(),
            "takeover": self.takeover.status() if self.takeover is not None else None,
            "forwarding": self.forwarding.status(),
            "control": self.control.status() if self.control is not None else {},
            "migration": {"repair_path": self.migration.repair_path,
                          "repair_helper": self.migration.helper is not None, "last": self.migration.last,
                          "transfer": self.migration.progress()},
            "flow_table": {"instance": self.table.instance if self.table is not None else "",
                           "capacity": self.max_flows,
                           **(self.table.counters() if self.table is not None else {})},
        }


def run_coordinator(*, workers: int, setup: WorkerSetup, socket_path: str, control_path: str,
                    connect: bool = False, print_fragment: bool = True, max_flows: int = DEFAULT_CAPACITY,
                    ports: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
                    sandbox: SandboxSetup | None = None, repair_path: str = "",
                    hosting: Hosting | None = None) -> int:
    """Run shardswitch until SIGTERM/SIGINT; the exit status."""
    params = setup.params
    coordinator = Coordinator(workers=workers, setup=setup, socket_path=socket_path, control_path=control_path,
                              connect=connect, max_flows=max_flows, ports=ports, sandbox=sandbox,
                              repair_path=repair_path, hosting=hosting)
    notifier = coordinator.hosting.notifier
    try:
        coordinator.open()
    except StartError as err:
        log.error("%s", err)
        coordinator.close()
        notifier.close(f"failed to start: {err}")
        return 1
    families = [f"{params.address}/{params.prefix_len} gateway {params.gateway}"
                if setup.services & Service.IPV4 else "",
                (f"{params.address6}/{params.prefix6_len}" if params.address6 else "link-local IPv6")
                if setup.services & Service.IPV6 else ""]
    log.info("shardswitch %s: %d worker(s), %s %s; guest %s, mtu %d", __version__, workers,
             "connecting to" if connect else "listening on", socket_path,
             ", ".join(f for f in families if f), params.mtu)
    if print_fragment:
        print("QEMU options for this back-end:\n  " + qemu_fragment(socket_path, workers), flush=True)
    notifier.ready(f"{workers} worker(s), {'connecting to' if connect else 'serving'} {socket_path}")
    try:
        coordinator.serve()
    finally:
        notifier.close()
        coordinator.close()
    return 0
