#!/usr/bin/env python3
"""Sockets that the network closes while their owner keeps the fd, one role
per process (for the socket-lifetime tests).

    closed_roles.py reset [--on-command]
        Connects to a listener of its own, which resets the connection
        (SO_LINGER 0), at once or when stdin says "reset"; keeps the
        client's fd until stdin says "close".
    closed_roles.py refused
        Connects to a port nobody listens on; keeps the fd.
    closed_roles.py timed-out
        Connects to a listener of its own whose accept queue is full, so its
        SYNs are dropped; reports once the kernel gave up (ETIMEDOUT) and
        keeps the fd.
    closed_roles.py fork-holder PARENT_EXITS
        A reset socket, dup'ed, then shared with a forked child. On "parent"
        the parent closes both its fds (PARENT_EXITS=1: and exits; the child
        closes its copy 3 s later); on "child" the child closes its copy.
    closed_roles.py pipe-leak PER_S NOFILE
        Opens PER_S pipes a second (soft fd limit NOFILE) until EMFILE, while
        holding one TCP connection that stays healthy.
    closed_roles.py reset-many COUNT
        COUNT reset connections, all kept.
    closed_roles.py unconnected
        Makes a TCP socket and neither connects nor listens (it is in CLOSE,
        like a reset one); listens when stdin says "listen".
    closed_roles.py churn-and-hold TOTAL HOLD
        Once stdin says "go": TOTAL connections to a listener of its own,
        the first HOLD kept (both ends), the others closed (both ends).

Every step is one JSON object per line on stdout, with the pid. Each role
then holds what it has until stdin reaches EOF.
"""

import errno
import json
import os
import resource
import select
import socket
import struct
import sys
import time

LOOPBACK = "127.0.0.1"


def say(**fields):
    fields.setdefault("pid", os.getpid())
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def commands():
    for line in sys.stdin:
        yield line.strip()


def reset_connection(listener):
    """A client socket whose peer reset it, and the client's local port."""
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    accepted.close()
    # The RST is processed at once on loopback. The client does not read:
    # that would take the error (sk_err) the kernel keeps for it.
    time.sleep(0.05)
    return client


def listener():
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    return sock


def reset(on_command):
    server = listener()
    if on_command:
        for command in commands():
            if command == "reset":
                break
    client = reset_connection(server)
    say(reset=True, local_port=client.getsockname()[1], server_port=server.getsockname()[1])
    for command in commands():
        if command == "close":
            client.close()
            say(closed=True)


def unconnected():
    sock = socket.socket()
    say(made=True)
    for command in commands():
        if command == "listen":
            sock.bind((LOOPBACK, 0))
            sock.listen(8)
            say(listening=sock.getsockname()[1])


def reset_many(count):
    server = listener()
    clients = [reset_connection(server) for _ in range(count)]
    say(reset=len(clients), server_port=server.getsockname()[1])
    sys.stdin.read()


def refused():
    probe = socket.socket()
    probe.bind((LOOPBACK, 0))
    port = probe.getsockname()[1]
    probe.close()
    client = socket.socket()
    try:
        client.connect((LOOPBACK, port))
    except ConnectionRefusedError:
        say(refused=True, port=port)
    sys.stdin.read()
    client.close()


def timed_out():
    server = socket.socket()
    server.bind((LOOPBACK, 0))
    server.listen(0)
    # Takes the one place in the accept queue, never accepted.
    waiting = socket.create_connection(server.getsockname())
    client = socket.socket()
    client.setblocking(False)
    try:
        client.connect(server.getsockname())
    except BlockingIOError:
        pass
    say(connecting=True, port=server.getsockname()[1])
    select.select([], [client], [], 120)
    err = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    say(timed_out=err == errno.ETIMEDOUT, error=err)
    sys.stdin.read()
    client.close()


def fork_holder(parent_exits):
    server = listener()
    client = reset_connection(server)
    copy = os.dup(client.fileno())
    to_child, from_parent = os.pipe()[::-1]
    child = os.fork()
    if child == 0:
        # The child keeps `copy` only, until the parent says so, or, once
        # the parent is gone, three seconds later.
        os.close(client.detach())
        os.close(to_child)
        word = os.read(from_parent, 1)
        if not word:
            time.sleep(3)
        os.close(copy)
        say(child_closed=True)
        os._exit(0)
    os.close(from_parent)
    server.close()
    say(forked=child, local_port=client.getsockname()[1])
    for command in commands():
        if command == "parent":
            client.close()
            os.close(copy)
            say(parent_closed=True)
            if parent_exits:
                os._exit(0)
        elif command == "child":
            os.write(to_child, b"c")


def pipe_leak(per_s, nofile):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, max(hard, nofile)))
    server = listener()
    healthy = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    say(started=time.time(), port=server.getsockname()[1])
    pipes = []
    while True:
        try:
            pipes.append(os.pipe())
        except OSError as e:
            if e.errno == errno.EMFILE:
                say(emfile=time.time(), pipes=len(pipes))
                break
            raise
        time.sleep(1.0 / per_s)
    sys.stdin.read()
    healthy.close()
    accepted.close()


def churn_and_hold(total, hold):
    server = listener()
    say(ready=True)
    for command in commands():
        if command == "go":
            break
    kept = []
    for index in range(total):
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        if index < hold:
            kept.extend([client, accepted])
        else:
            client.close()
            accepted.close()
    say(done=total, held=len(kept))
    sys.stdin.read()


def main():
    role = sys.argv[1]
    if role == "reset":
        reset("--on-command" in sys.argv)
    elif role == "reset-many":
        reset_many(int(sys.argv[2]))
    elif role == "unconnected":
        unconnected()
    elif role == "refused":
        refused()
    elif role == "timed-out":
        timed_out()
    elif role == "fork-holder":
        fork_holder(sys.argv[2] == "1")
    elif role == "churn-and-hold":
        churn_and_hold(int(sys.argv[2]), int(sys.argv[3]))
    elif role == "pipe-leak":
        pipe_leak(float(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("unknown role " + role)


if __name__ == "__main__":
    main()
