"""Who may use the control socket: the peer's credentials against root, the switch's own user and the
operator's ``--control-group``.

Theory of operation
-------------------
The control socket can start a packet capture of the guest's traffic, so the
socket file's mode is not trusted alone (a unit's ``UMask=``, a socket handed
over by systemd or a parent may give it to a wider group).  At accept the
kernel tells who connected (SO_PEERCRED: the peer's PID and its effective user
and group IDs when it connected), and :class:`AccessPolicy` allows:

* uid 0 (root);
* the switch's own effective uid, after the privilege drop (``--runas``, or
  the user that started it);
* with ``--control-group GROUP``, a peer whose *effective (primary) gid* is
  that group.  SO_PEERCRED carries no supplementary groups, and reading them
  from ``/proc/PID/status`` is racy and often impossible in the sandbox; so a
  member must run with the group as its primary one (``sg GROUP -c
  'shardswitch status'``, or ``Group=`` of a unit).

The group is resolved at start (:func:`resolve_group`), before the sandbox
hides ``/etc``.  With it the socket file we bind is made the group's, mode
0660; without it, mode 0600 (:func:`restrict_socket_file`).

A switch started by a user other than root runs in a user namespace of its
own that maps only that user (where the host allows one): the kernel then
shows every other peer, root included, as the overflow uid and gid (65534).
Those are nobody's in particular, so :meth:`AccessPolicy.settle` notes them
once the sandbox is in place and they never match: such a switch serves its
own user only.
"""

from __future__ import annotations

import grp
import os
import socket
import struct
from dataclasses import dataclass

#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("iII")
#: The kernel's default overflow uid and gid (/proc/sys/kernel/overflowuid, overflowgid).
DEFAULT_OVERFLOW_ID = 65534
#: /proc/self/uid_map of the initial user namespace: every id maps to itself.
_IDENTITY_MAP = ["0", "0", "4294967295"]
#: Highest group ID (4294967295 is (gid_t) -1, "no change").
_MAX_GID = 4294967294
#: The socket file's mode without and with a control group.
OWNER_MODE = 0o600
GROUP_MODE = 0o660


class AccessError(Exception):
    """A group named in the settings does not exist."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a unix socket."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        """``pid 123 uid 1000 gid 1000``."""
        return f"pid {self.pid} uid {self.uid} gid {self.gid}"


def peer_of(sock: socket.socket) -> Peer:
    """The credentials the kernel recorded for the peer of ``sock`` (OSError when it has none)."""
    return Peer(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def resolve_group(spec: str | None, option: str = "--control-group") -> int | None:
    """The group ID of ``spec`` (a name, or a number that need not be in the group database); None for
    None.  AccessError names ``option`` and the group when there is no such group."""
    if spec is None:
        return None
    if spec.isdigit():
        if int(spec) > _MAX_GID:
            raise AccessError(f"{option}: {spec} is not a group ID (0..{_MAX_GID})")
        return int(spec)
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise AccessError(f"{option}: no group named {spec!r}") from None


def _read_id(path: str) -> int:
    """A number in a /proc file, or the kernel's default overflow id when unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return DEFAULT_OVERFLOW_ID


def unmapped_ids() -> tuple[int, int] | None:
    """The uid and gid the kernel shows for peers this process's user namespace does not map (the overflow
    ids), or None in the initial namespace, where every id is itself.  When the map cannot be read the
    overflow ids are assumed, which only ever refuses more."""
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() == _IDENTITY_MAP:
                return None
    except OSError:
        pass
    return _read_id("/proc/sys/kernel/overflowuid"), _read_id("/proc/sys/kernel/overflowgid")


@dataclass
class AccessPolicy:
    """Which peers the control socket serves (see the module's theory of operation)."""

    #: --control-group's ID (None: no group).
    group: int | None = None
    #: The ids that stand for an unmapped peer (None: every peer's ids are its own); see :meth:`settle`.
    unmapped: tuple[int, int] | None = None

    def settle(self) -> None:
        """Note the ids of unmapped peers; call once the sandbox is in place (it may have made a user
        namespace)."""
        self.unmapped = unmapped_ids()

    def allows(self, peer: Peer) -> bool:
        """Whether ``peer`` may use the control socket."""
        overflow_uid, overflow_gid = self.unmapped if self.unmapped is not None else (-1, -1)
        if peer.uid != overflow_uid and peer.uid in (0, os.geteuid()):
            return True
        return self.group is not None and peer.gid != overflow_gid and peer.gid == self.group

    def owns(self, peer: Peer) -> bool:
        """Whether ``peer`` is root or the switch's own user (not merely ``--control-group``): who may take the
        switch over."""
        overflow_uid = self.unmapped[0] if self.unmapped is not None else -1
        return peer.uid != overflow_uid and peer.uid in (0, os.geteuid())

    def describe(self) -> str:
        """Who is allowed, in words for a log line."""
        group = f", gid {self.group}" if self.group is not None else ""
        return f"root, uid {os.geteuid()}{group}"


def restrict_socket_file(path: str, group: int | None) -> str:
    """Give the socket file at ``path`` mode 0600, or with ``group`` that group and mode 0660.  "" when
    done, else why not (the file keeps mode 0600 then: the peer check refuses others anyway)."""
    why = ""
    mode = OWNER_MODE
    if group is not None:
        try:
            os.chown(path, -1, group)
            mode = GROUP_MODE
        except OSError as err:
            why = f"cannot give {path} to group {group} ({err.strerror}); its members cannot connect"
    try:
        os.chmod(path, mode)
    except OSError as err:
        why = f"cannot set the mode of {path} ({err.strerror})"
    return why
