#!/usr/bin/env python3
"""Leave one client socket in CLOSE_WAIT, report it, and wait.

Usage: close_wait.py [4|6] [--comm-hex HEX]

Listens on the loopback address (127.0.0.1 or ::1) on an ephemeral port,
connects to itself, accepts, then closes the accepted socket while the client
keeps its end open, so the client socket sits in CLOSE_WAIT and the server
side is an orphan in FIN_WAIT1/FIN_WAIT2.

--comm-hex names the process with those bytes (prctl PR_SET_NAME), e.g. a
name with control characters and bytes that are not UTF-8.

Once the client has seen the FIN, prints one line
"<pid> <server port> <client port>" and then holds every socket until stdin
reaches EOF (the test closes it or dies) or the process is killed.
"""

import ctypes
import os
import socket
import sys

PR_SET_NAME = 15


def main() -> None:
    version = sys.argv[1] if len(sys.argv) > 1 else "4"
    if "--comm-hex" in sys.argv:
        name = bytes.fromhex(sys.argv[sys.argv.index("--comm-hex") + 1])
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0) != 0:
            sys.exit(f"close_wait.py: prctl: {os.strerror(ctypes.get_errno())}")
    if version == "6":
        family, host = socket.AF_INET6, "::1"
    else:
        family, host = socket.AF_INET, "127.0.0.1"

    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    server_port = listener.getsockname()[1]

    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect((host, server_port))
    accepted, _ = listener.accept()
    accepted.close()

    # An empty read means the FIN arrived: the client socket is in CLOSE_WAIT.
    client.settimeout(5)
    if client.recv(1) != b"":
        sys.exit("close_wait.py: unexpected data from the server side")

    print(os.getpid(), server_port, client.getsockname()[1], flush=True)
    sys.stdin.read()
    client.close()
    listener.close()


if __name__ == "__main__":
    main()
