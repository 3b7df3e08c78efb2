"""The worker processes: forking, talking to them, and replacing the dead.

One worker per queue pair, forked with :mod:`multiprocess` (fork start
method) so it inherits the resolved configuration without pickling it
through a pipe.  Each worker gets the worker end of a SEQPACKET socketpair;
the coordinator keeps the other end in a :class:`WorkerHandle`.

Death is noticed at once: the coordinator's selector watches a pidfd per
worker (``os.pidfd_open``), which becomes readable the moment the process
exits.  :meth:`WorkerPool.reap` then logs how it died and forks a
replacement for the same queue pair; the caller hands it the device state
(memory regions, running rings) again.

Most requests are calls: sent, then the answer awaited (:meth:`WorkerPool.call`,
a few milliseconds).  A request that may take a worker long, such as
restoring a migrated document's flows, is *posted* instead
(:meth:`WorkerPool.post`): the worker's channel joins the coordinator's
selector until the answer comes, which goes to the request's ``done``
callback, so the loop serves on meanwhile.  A call to a worker with a posted
request first waits for that answer (the order of requests holds), unless the
caller would rather not wait (``status``); a posted request whose worker dies
or overruns its deadline is answered None.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
import multiprocess

from shardswitch.ipc import (Channel, ForwardDone, FromWorker, IpcError, MigrateDone, PortFd, RingStarted,
                             RingStopped, Shutdown, WorkerSetup, WorkerStatus, channel_pair)
from shardswitch.worker.worker import worker_main
from shardswitch.worker.peers import inbox_pairs

log = logging.getLogger("shardswitch.workers")

#: How long a worker may take to answer a request.
CALL_TIMEOUT = 3.0
#: Minimum time between two forks for the same queue pair (a crash loop slows down).
RESPAWN_INTERVAL = 0.5


@dataclass
class Posted:
    """A posted request: its number, name and deadline, and who takes the answer (None: none came)."""

    seq: int
    name: str
    deadline: float
    done: Callable[[object | None], None]


@dataclass
class WorkerHandle:
    """The coordinator's view of one worker process."""

    pair: int
    process: Any
    channel: Channel
    pidfd: int
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    last_exit: str = ""

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return int(self.process.pid)


def describe_exit(exitcode: int | None) -> str:
    """'exited with status N' or 'killed by SIGNAME'."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        if -exitcode == signal.SIGSYS:
            return "killed by SIGSYS (a system call outside its seccomp allow-list)"
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class WorkerPool:
    """All worker processes of one shardswitch instance."""

    def __init__(self, count: int, template: WorkerSetup, sel: selectors.BaseSelector | None = None) -> None:
        """A pool for ``count`` queue pairs whose workers start from ``template`` (nothing forked yet);
        ``sel``: the loop that watches the channels of workers with posted requests."""
        self.count = count
        self.sel = sel
        #: Each queue pair's posted requests, oldest first, and the channels in ``sel`` for them.
        self.posted: list[deque[Posted]] = [deque() for _ in range(count)]
        self._watched: dict[int, socket.socket] = {}
        self.template = template
        self.handles: list[WorkerHandle | None] = [None] * count
        #: One inbox per queue pair, kept for the pool's lifetime (see shardswitch.worker.peers).
        self.inboxes = inbox_pairs(count)
        #: Each queue pair's listening sockets of forwarded ports (-t, -u), bound by the coordinator.
        self.ports: list[tuple[tuple[PortFd, ...], tuple[PortFd, ...]]] = [((), ())] * count
        self._ctx = multiprocess.get_context("fork")

    def setup(self, pair: int) -> WorkerSetup:
        """What the worker of ``pair`` is forked with."""
        tcp, udp = self.ports[pair]
        return msgspec.structs.replace(self.template, pair=pair, inbox_fd=self.inboxes[pair][0].fileno(),
                                       peer_fds=tuple(write_end.fileno() for _read, write_end in self.inboxes),
                                       tcp_listeners=tcp, udp_listeners=udp)

    def start(self) -> None:
        """Fork every worker."""
        for pair in range(self.count):
            self.handles[pair] = self._spawn(pair, restarts=0)

    def _spawn(self, pair: int, restarts: int) -> WorkerHandle:
        """Fork the worker of ``pair``."""
        ours, theirs = channel_pair()
        process = self._ctx.Process(target=worker_main, args=(self.setup(pair), theirs),
                                    name=f"shardswitch-worker-{pair}", daemon=False)
        process.start()
        theirs.close()
        pidfd = os.pidfd_open(process.pid)
        ours.setblocking(True)
        handle = WorkerHandle(pair, process, Channel(ours, FromWorker), pidfd, restarts=restarts)
        log.info("worker %d started, pid %d", pair, process.pid)
        return handle

    def handle(self, pair: int) -> WorkerHandle | None:
        """The live handle of ``pair``."""
        return self.handles[pair] if 0 <= pair < self.count else None

    def alive(self, pair: int) -> bool:
        """Whether the worker of ``pair`` runs (False once it died, even before it is reaped)."""
        handle = self.handle(pair)
        return handle is not None and bool(handle.process.is_alive())

    def by_pidfd(self, fd: int) -> WorkerHandle | None:
        """The handle whose pidfd is ``fd``."""
        return next((h for h in self.handles if h is not None and h.pidfd == fd), None)

    def reap(self, handle: WorkerHandle, release: Callable[[WorkerHandle], None] | None = None) -> WorkerHandle:
        """A worker died: log it, let ``release`` free what it held, fork its replacement, return it."""
        handle.process.join(timeout=1.0)
        how = describe_exit(handle.process.exitcode)
        log.error("worker %d (pid %d) %s; starting a replacement", handle.pair, handle.pid, how)
        self.handles[handle.pair] = None                 # nothing more goes to the dead worker
        self._fail_posted(handle.pair, how)
        self._close(handle)
        if release is not None:
            release(handle)
        wait = RESPAWN_INTERVAL - (time.monotonic() - handle.started)
        if wait > 0:
            time.sleep(wait)
        new = self._spawn(handle.pair, restarts=handle.restarts + 1)
        new.last_exit = how
        self.handles[handle.pair] = new
        return new

    @staticmethod
    def _close(handle: WorkerHandle) -> None:
        """Release the coordinator's resources of a worker."""
        handle.channel.close()
        os.close(handle.pidfd)

    def send(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = ()) -> bool:
        """Send without waiting; False when the worker is not reachable."""
        handle = self.handle(pair)
        if handle is None:
            return False
        try:
            handle.channel.send(message, fds)  # type: ignore[arg-type]
            return True
        except IpcError as err:
            log.warning("worker %d unreachable: %s", pair, err)
            return False

    def call(self, pair: int, message: object, fds: list[int] | tuple[int, ...] = (),
             timeout: float = CALL_TIMEOUT, *, wait_posted: bool = True) -> object | None:
        """Send a request and wait up to ``timeout`` for the answer with the same ``seq``; None on death or
        timeout.  A worker with posted requests answers them first: the call waits for those answers, or
        returns None at once (nothing sent) when ``wait_posted`` is False."""
        if 0 <= pair < self.count and self.posted[pair]:
            if not wait_posted:
                log.debug("worker %d is busy with %s: %s not sent", pair, self.posted[pair][0].name,
                          type(message).__name__)
                return None
            self._settle(pair)
        handle = self.handle(pair)
        if handle is None or not self.send(pair, message, fds):
            return None
        seq = getattr(message, "seq")
        deadline = time.monotonic() + timeout
        sock = handle.channel.sock
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                answer, extra = handle.channel.recv()
                for fd in extra:
                    os.close(fd)
                if (isinstance(answer, (RingStarted, RingStopped, WorkerStatus, MigrateDone, ForwardDone))
                        and answer.seq == seq):
                    return answer
                log.debug("worker %d: dropping stale answer %r", pair, answer)
        except (IpcError, TimeoutError) as err:
            log.warning("worker %d did not answer %s: %s", pair, type(message).__name__, err)
        finally:
            sock.settimeout(None)
        return None

    # -- posted requests -------------------------------------------------------

    def post(self, pair: int, message: object, fds: list[int] | tuple[int, ...], done: Callable[[object | None], None],
             timeout: float) -> bool:
        """Send a request whose answer goes to ``done`` once the loop reads it (None: the worker died or
        took more than ``timeout``); False when it could not be sent (``done`` is not called then)."""
        handle = self.handle(pair)
        if self.sel is None or handle is None or not self.send(pair, message, fds):
            return False
        if pair not in self._watched:
            self.sel.register(handle.channel.sock, selectors.EVENT_READ, lambda: self.receive(pair))
            self._watched[pair] = handle.channel.sock
        self.posted[pair].append(Posted(getattr(message, "seq"), type(message).__name__,
                                        time.monotonic() + timeout, done))
        return True

    def busy(self, pair: int) -> bool:
        """Whether ``pair``'s worker has posted requests to answer."""
        return bool(self.posted[pair])

    def receive(self, pair: int) -> None:
        """The channel of ``pair`` is readable: hand the answers waiting there to their posted requests."""
        handle = self.handle(pair)
        while handle is not None and self.posted[pair]:
            try:
                answer, extra = handle.channel.recv(socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except IpcError as err:
                self._fail_posted(pair, str(err))
                return
            for fd in extra:
                os.close(fd)
            self._deliver(pair, answer)

    def _deliver(self, pair: int, answer: object) -> None:
        """An answer read from ``pair``'s channel: to the oldest posted request when it is that one's."""
        queue = self.posted[pair]
        if getattr(answer, "seq", None) != queue[0].seq:
            log.debug("worker %d: dropping stale answer %r", pair, answer)
            return
        posted = queue.popleft()
        self._unwatch(pair)
        posted.done(answer)

    def _settle(self, pair: int) -> None:
        """Wait for the answers of ``pair``'s posted requests, each until its deadline (a call must follow
        them)."""
        handle = self.handle(pair)
        while handle is not None and self.posted[pair]:
            left = self.posted[pair][0].deadline - time.monotonic()
            if left <= 0:
                self._fail_first(pair, "no answer in time")
                continue
            handle.channel.sock.settimeout(left)
            try:
                answer, extra = handle.channel.recv()
            except IpcError as err:
                if not isinstance(err.__cause__, TimeoutError):        # a timeout: the deadline check fails it
                    self._fail_posted(pair, str(err))
                continue
            finally:
                handle.channel.sock.settimeout(None)
            for fd in extra:
                os.close(fd)
            self._deliver(pair, answer)

    def expire(self, now: float) -> float | None:
        """Answer None to posted requests past their deadline; seconds until the next deadline (None: none)."""
        waits = []
        for pair in range(self.count):
            while self.posted[pair] and self.posted[pair][0].deadline <= now:
                self._fail_first(pair, "no answer in time")
            if self.posted[pair]:
                waits.append(self.posted[pair][0].deadline - now)
        return min(waits) if waits else None

    def _fail_first(self, pair: int, why: str) -> None:
        """The oldest posted request of ``pair`` gets no answer."""
        posted = self.posted[pair].popleft()
        log.warning("worker %d did not answer %s: %s", pair, posted.name, why)
        self._unwatch(pair)
        posted.done(None)

    def _fail_posted(self, pair: int, why: str) -> None:
        """Every posted request of ``pair`` gets no answer (its worker died)."""
        while self.posted[pair]:
            self._fail_first(pair, why)

    def _unwatch(self, pair: int) -> None:
        """Stop watching ``pair``'s channel once it has no posted request left."""
        if not self.posted[pair] and pair in self._watched and self.sel is not None:
            self.sel.unregister(self._watched.pop(pair))

    def stop(self, timeout: float = 3.0) -> None:
        """Ask every worker to exit, then make sure they did."""
        for pair in range(self.count):
            self._fail_posted(pair, "shutting down")
        live = [h for h in self.handles if h is not None]
        for handle in live:
            self.send(handle.pair, Shutdown())
        deadline = time.monotonic() + timeout
        for handle in live:
            handle.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if handle.process.is_alive():
                log.warning("worker %d (pid %d) ignored shutdown; killing it", handle.pair, handle.pid)
                handle.process.kill()
                handle.process.join(timeout=1.0)
            self._close(handle)
        self.handles = [None] * self.count
        for read_end, write_end in self.inboxes:
            read_end.close()
            write_end.close()
        self.inboxes = []
