#!/usr/bin/env python3
"""TCP roles for the integration tests, one role per process.

    tcp_roles.py server 4|6 close-first|hold
        Listen on loopback. close-first: close each accepted connection at
        once (the peer is left in CLOSE_WAIT). hold: keep it until stdin says
        "close".
    tcp_roles.py storm 4|6 COUNT [wait]
        Open and close COUNT connections to itself, as fast as it can. With
        "wait": only once stdin says "go", and then exit when it says "exit".
    tcp_roles.py client 4|6 PORT [fork]
        Connect to PORT. With "fork": hand the socket to a child and exit, so
        only the child holds it. Waits for the peer's FIN (CLOSE_WAIT), then
        closes when stdin says "close".

Every step is reported as one JSON object per line on stdout, so the test
knows pids and ports and when each step has happened.
"""

import json
import os
import socket
import sys


def say(**fields):
    fields["pid"] = os.getpid()
    print(json.dumps(fields), flush=True)


def address(version, port=0):
    if version == "6":
        return socket.AF_INET6, ("::1", port)
    return socket.AF_INET, ("127.0.0.1", port)


def wait_for(command):
    for line in sys.stdin:
        if line.strip() == command:
            return True
    return False


def server(version, mode):
    family, addr = address(version)
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(addr)
    listener.listen()
    say(role="server", port=listener.getsockname()[1])
    conn, peer = listener.accept()
    say(accepted=peer[1])
    if mode == "hold":
        wait_for("close")
    conn.close()
    say(closed=True)
    sys.stdin.read()


def client(version, port, fork):
    family, addr = address(version, port)
    conn = socket.socket(family, socket.SOCK_STREAM)
    conn.connect(addr)
    say(role="client", local_port=conn.getsockname()[1])
    if fork:
        child = os.fork()
        if child:
            # The parent leaves; only the child holds the socket now.
            say(forked=child)
            os._exit(0)
    conn.settimeout(30)
    if conn.recv(1) != b"":
        sys.exit("tcp_roles.py: unexpected data")
    say(close_wait=True)
    wait_for("close")
    conn.close()
    say(closed=True)


def storm(version, count, wait):
    if wait:
        say(waiting=True)
        wait_for("go")
    family, addr = address(version)
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(addr)
    listener.listen(128)
    target = (addr[0], listener.getsockname()[1])
    for _ in range(count):
        conn = socket.create_connection(target)
        accepted, _ = listener.accept()
        conn.close()
        accepted.close()
    say(done=count)
    if wait:
        wait_for("exit")
    else:
        sys.stdin.read()


def main():
    role, version = sys.argv[1], sys.argv[2]
    if role == "server":
        server(version, sys.argv[3])
    elif role == "storm":
        storm(version, int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "wait")
    elif role == "client":
        client(version, int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "fork")
    else:
        sys.exit(f"tcp_roles.py: unknown role {role}")


if __name__ == "__main__":
    main()
