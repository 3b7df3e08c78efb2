"""Helpers of the tests that try the control socket as another local user would: a child process that gives up
root, and what it got back."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable

#: IDs no account uses: the attacker's, and the group the operator names.
STRANGER = 65533
OPERATORS = 65532


def as_user(uid: int, gid: int, action: Callable[[], str]) -> str:
    """Run ``action`` in a child process that became ``uid``/``gid`` (no supplementary group); what it
    returned, or why it failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                         # the child: never returns into pytest
        text = ""
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            text = action()
        except BaseException as err:                     # noqa: B036 - reported to the parent
            text = f"child failed: {err!r}"
        finally:
            data = text.encode()
            while data:
                data = data[os.write(write_end, data):]
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        out = stream.read().decode()
    os.waitpid(pid, 0)
    return out


def ask(path: str, request: bytes, fds: list[int] | None = None) -> Callable[[], str]:
    """An action for :func:`as_user`: connect to ``path``, send ``request`` (with ``fds``), return all that
    came back (or why the connection failed)."""
    def action() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(20)
            try:
                sock.connect(path)
            except OSError as err:
                return f"connect: {err.strerror}"
            try:
                socket.send_fds(sock, [request], fds or [])
            except OSError:
                pass                                     # refused at once: the answer may still be there
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except OSError as err:
                data += f" ({err.strerror})".encode()
            return data.decode()
    return action


def answer_of(text: str) -> dict[str, object]:
    """The JSON line an action got."""
    return dict(json.loads(text.split("\n", 1)[0]))
