"""A minimal QMP client for tests: the handshake, commands, and waiting for a migration to end."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error, or went away."""


class Qmp:
    """One QMP connection (``-qmp unix:PATH,server=on,wait=off``)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        """Connect (retrying until QEMU listens, up to ``timeout``) and leave capabilities negotiation."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            line = self.file.readline()
            if not line:
                raise QmpError("QEMU closed the QMP connection")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its return value (QmpError on an error answer)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        answer = self._read()
        if "error" in answer:
            raise QmpError(f"{command}: {answer['error']}")
        return answer.get("return")

    def wait_migration(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll query-migrate until the migration completed; its last answer (QmpError if it failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.execute("query-migrate")
            if info.get("status") == "completed":
                return info
            if info.get("status") in ("failed", "cancelled"):
                raise QmpError(f"migration {info.get('status')}: {info}")
            time.sleep(0.2)
        raise QmpError(f"migration did not complete within {timeout} s")

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()
