"""A host client of forwarded ports, driven line by line from a test, inside the test's namespace.

The client runs in the namespace the switch serves (``ip netns exec``), so it reaches the forwarded ports on
that namespace's loopback, and it keeps its connections open between commands: a test can hold one
connection across a change of the switch's rules and use it afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from typing import IO

from tests.guest.netns import TestNetns

#: The client: one command per line on stdin, one answer line on stdout.
#:   connect PORT     -> "ok LOCALPORT" or "error NAME"
#:   echo LOCALPORT T -> "got LINE" (T and a newline sent, one line read back) or "error NAME"
#:   http PORT PATH   -> "body TEXT" (an HTTP/1.0 GET's answer, body only, one line) or "error NAME"
#:   close LOCALPORT  -> "closed"
DRIVER = r"""
import socket, sys
conns = {}
def line(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()
for request in sys.stdin:
    cmd, *rest = request.strip().split(maxsplit=2)
    try:
        if cmd == "connect":
            conn = socket.create_connection(("127.0.0.1", int(rest[0])), timeout=30)
            conns[conn.getsockname()[1]] = conn
            answer = f"ok {conn.getsockname()[1]}"
        elif cmd == "echo":
            conn = conns[int(rest[0])]
            conn.sendall(rest[1].encode() + b"\n")
            answer = f"got {line(conn)}"
        elif cmd == "http":
            with socket.create_connection(("127.0.0.1", int(rest[0])), timeout=30) as conn:
                conn.sendall(f"GET {rest[1]} HTTP/1.0\r\n\r\n".encode())
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
            answer = "body " + data.partition(b"\r\n\r\n")[2].decode(errors="replace").strip().replace("\n", " ")
        else:
            conns.pop(int(rest[0])).close()
            answer = "closed"
    except OSError as err:
        answer = f"error {type(err).__name__}"
    print(answer, flush=True)
"""


class HostClient:
    """The driver process and its pipes (stopped by the namespace's teardown, by PID)."""

    def __init__(self, netns: TestNetns) -> None:
        """Start the client inside ``netns``."""
        self.proc = netns.popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout

    def ask(self, command: str) -> str:
        """Send one command, return its answer line (the client answers every command, within its socket
        timeouts)."""
        self.stdin.write(command + "\n")
        self.stdin.flush()
        return self.stdout.readline().strip()

    def connect(self, port: int) -> int | str:
        """A connection to ``port`` of the namespace's loopback: its local port, or the error's name."""
        answer = self.ask(f"connect {port}")
        return int(answer.split()[1]) if answer.startswith("ok ") else answer.split()[-1]

    def echo(self, local: int, text: str) -> str:
        """Send ``text`` on a connection, return the line that comes back ("error ..." when none does)."""
        answer = self.ask(f"echo {local} {text}")
        return answer[4:] if answer.startswith("got ") else answer

    def http(self, port: int, path: str) -> str:
        """The body of an HTTP/1.0 GET of ``path`` through ``port`` ("error ..." when it failed)."""
        answer = self.ask(f"http {port} {path}")
        return answer[5:] if answer.startswith("body ") else answer

    def close(self, local: int) -> None:
        """Close a connection."""
        assert self.ask(f"close {local}") == "closed"
