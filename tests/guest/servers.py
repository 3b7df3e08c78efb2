"""Servers the guest tests run on the test namespace's loopback, host-side clients, and reading iperf3 results.

The guest reaches them through its gateway address, which the switch maps to
that loopback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.guest.netns import TestNetns

HTTP_PORT = 8000

#: GET /<name> serves files of the given directory, POST answers the sha256 of the body; on the next
#: port a sink reads until end of stream and answers "sha256:length" (guest: nc, which half-closes).
HTTP_SERVER = """
import hashlib, http.server, sys
root = sys.argv[2]
class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=root, **kw)
    def log_message(self, *a):
        pass
    def do_POST(self):
        left = int(self.headers["Content-Length"])
        h = hashlib.sha256()
        got = 0
        while left:
            d = self.rfile.read(min(left, 1 << 20))
            if not d:
                break
            h.update(d)
            left -= len(d)
            got += len(d)
        body = f"{h.hexdigest()}:{got}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
def sink(port):
    import socket, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(8)
    while True:
        c, _ = s.accept()
        h = hashlib.sha256(); got = 0
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            h.update(d); got += len(d)
        c.sendall(f"{h.hexdigest()}:{got}".encode()); c.close()
import threading
threading.Thread(target=sink, args=(int(sys.argv[1]) + 1,), daemon=True).start()
http.server.ThreadingHTTPServer.daemon_threads = True
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
"""


NC_CLIENT = r"""
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
c.sendall(b"from-host\n")
c.shutdown(socket.SHUT_WR)
data = b""
while chunk := c.recv(4096):
    data += chunk
print(data.decode().strip())
"""


def start_http(netns: TestNetns, root: Path) -> None:
    """The HTTP server on 127.0.0.1 in the namespace, serving ``root``."""
    proc = netns.popen([sys.executable, "-c", HTTP_SERVER, str(HTTP_PORT), str(root)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"


def serve_blob(netns: TestNetns, tmp_path: Path, megabytes: int) -> bytes:
    """``megabytes`` of random data served as /blob by the namespace's HTTP server (started here); the data."""
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(megabytes << 20)
    (root / "blob").write_bytes(blob)
    start_http(netns, root)
    return blob


def iperf_rate(output: str, tag: str) -> float:
    """Mbit/s of the receiver line of the iperf3 run the guest printed after ``==tag==``."""
    section = output.split(f"=={tag}==", 1)[1]
    match = re.search(r"([\d.]+) ([KMG])bits/sec\s+(?:\d+\s+)?receiver", section)
    assert match, output
    return float(match[1]) * {"K": 1e-3, "M": 1.0, "G": 1e3}[match[2]]
