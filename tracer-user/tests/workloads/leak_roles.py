#!/usr/bin/env python3
"""A server that hangs up at once and a client that leaks, for the serve tests.

    leak_roles.py server
        Listen on 127.0.0.1 and close every accepted connection at once, so
        each client socket gets the FIN and sits in CLOSE_WAIT until its
        owner closes it.
    leak_roles.py client PORT COUNT INTERVAL_S leak|close
        Open COUNT connections to 127.0.0.1:PORT, one every INTERVAL_S
        seconds. leak: never close them (they pile up in CLOSE_WAIT).
        close: close each 100 ms after the server's FIN.

Each step is one JSON object per line on stdout ({"port": N},
{"opened": n}, {"done": COUNT}); then the role waits until stdin closes.
"""

import json
import os
import socket
import sys
import threading
import time


def say(**fields):
    fields["pid"] = os.getpid()
    print(json.dumps(fields), flush=True)


def server():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    say(port=listener.getsockname()[1])

    def hang_up():
        while True:
            conn, _ = listener.accept()
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    sys.stdin.read()


def client(port, count, interval, mode):
    held = []
    for n in range(1, count + 1):
        conn = socket.create_connection(("127.0.0.1", port))
        if mode == "close":
            conn.settimeout(10)
            if conn.recv(1) != b"":
                sys.exit("leak_roles.py: unexpected data")
            time.sleep(0.1)
            conn.close()
        else:
            held.append(conn)
        say(opened=n)
        time.sleep(interval)
    say(done=count)
    sys.stdin.read()


def main():
    role = sys.argv[1]
    if role == "server":
        server()
    elif role == "client":
        port, count, interval, mode = sys.argv[2:6]
        client(int(port), int(count), float(interval), mode)
    else:
        sys.exit(f"leak_roles.py: unknown role {role}")


if __name__ == "__main__":
    main()
