#!/usr/bin/env python3
"""Servers and clients for the `socktrace watch` tests, one role per process.

    watch_roles.py http-server IDLE_S
        HTTP/1.1 keep-alive server on 127.0.0.1 that closes a connection
        after IDLE_S seconds without a request (the server closes first),
        and reports how long each connection it closed had been idle.
    watch_roles.py http-client PORT MODE PERIOD_S REQUESTS [options]
        POSTs to PORT every PERIOD_S seconds, REQUESTS times at most.
        MODE leak: a new connection per request, never closed (each one
        sits in CLOSE_WAIT once the server hangs up). MODE reuse: one
        keep-alive connection; when the server has dropped it, close it and
        connect again; close it at the end. Options: --nofile N lowers the soft RLIMIT_NOFILE,
        and the client stops at EMFILE; --await-close-wait reports once every
        connection it holds has seen the server's FIN.
    watch_roles.py hoard-server [--accept-on-command] [--full-backlog]
        Accepts connections and never closes them (nor reads them). With
        --accept-on-command: only once stdin says "accept" (a server that
        takes its backlog late). With --full-backlog: its accept queue is
        full from the start (backlog 0, taken by a connection of its own),
        so clients' SYNs are dropped and retried until it accepts.
    watch_roles.py connect-close PORT PERIOD_S COUNT
        Connects and closes at once (the client closes first), COUNT times.
    watch_roles.py churn-server
        Accepts, waits for the client's FIN, closes: as fast as it can.
    watch_roles.py churn-client PORT SECONDS
        Connects and closes as fast as it can for SECONDS.
    watch_roles.py fd-reader PID SECONDS
        Reads the links in /proc/PID/fd over and over for SECONDS, as lsof
        and `ss -p` do: each read holds the file for a moment.

Every step is reported as one JSON object per line on stdout, with the pid
and wall-clock times, so the test can compare them with what socktrace says.
Each role then holds its sockets until stdin reaches EOF (the test ends).
"""

import argparse
import errno
import json
import os
import resource
import select
import socket
import sys
import threading
import time

LOOPBACK = "127.0.0.1"
# Longest any role waits for something, so that nothing outlives its test.
MAX_WAIT_S = 60


SAY = threading.Lock()


def say(**fields):
    fields["pid"] = os.getpid()
    # One write per line: the HTTP server's handler threads report too.
    with SAY:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def hold_until_eof():
    """Keeps every socket of the process until the test closes stdin."""
    sys.stdin.read()


def listener(backlog=socket.SOMAXCONN, before_ready=lambda port: None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(backlog)
    before_ready(sock.getsockname()[1])
    say(port=sock.getsockname()[1])
    return sock


def in_background(target):
    threading.Thread(target=target, daemon=True).start()


def http_server(idle_s):
    # The HTTP modules are imported where used: they are slow to load, and
    # the other roles start faster without them.
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Socket timeout of each connection: an idle keep-alive connection
        # times out in handle_one_request, and the server closes it.
        timeout = idle_s

        def setup(self):
            super().setup()
            self.answered = time.monotonic()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b"ok\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.answered = time.monotonic()

        def log_error(self, format, *args):
            # How handle_one_request reports the idle timeout, just before
            # the server closes the connection.
            if format.startswith("Request timed out"):
                say(idle_closed_s=time.monotonic() - self.answered)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    say(port=server.server_address[1])
    in_background(server.serve_forever)
    hold_until_eof()


def dropped(conn):
    """Whether the server hung up on an idle connection: its socket reads
    EOF without blocking (what connection pools check before reuse)."""
    if conn.sock is None:
        return False
    readable, _, _ = select.select([conn.sock], [], [], 0)
    try:
        return bool(readable) and conn.sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def post(conn):
    conn.request("POST", "/", body=b"ping")
    response = conn.getresponse()
    response.read()
    return response


def at_eof(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def await_close_wait(conns):
    deadline = time.monotonic() + MAX_WAIT_S
    while time.monotonic() < deadline:
        if all(at_eof(conn.sock) for conn in conns):
            say(close_wait=len(conns))
            return
        time.sleep(0.05)
    sys.exit("watch_roles.py: the server never closed the connections")


def http_client(args):
    import http.client

    if args.nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))
    held, conn, connections = [], None, 0
    say(started=time.time())
    next_request = time.monotonic()
    for i in range(args.requests):
        time.sleep(max(0.0, next_request - time.monotonic()))
        # leak: a fixed schedule, so that the leak rate does not drift with
        # latency. reuse: the connection sits idle for the whole period, even
        # after a late request.
        base = next_request if args.mode == "leak" else time.monotonic()
        next_request = base + args.period
        if args.mode == "reuse" and conn is not None and dropped(conn):
            conn.close()
            conn = None
        if conn is None or args.mode == "leak":
            conn = http.client.HTTPConnection(LOOPBACK, args.port, timeout=10)
            connections += 1
        try:
            response = post(conn)
        except OSError as error:
            if error.errno != errno.EMFILE:
                raise
            say(emfile=time.time(), requests=i)
            break
        if args.mode == "leak":
            held.append(conn)
        else:
            response.close()
    if args.mode == "reuse" and conn is not None:
        conn.close()
    say(done=True, connections=connections)
    if args.await_close_wait:
        await_close_wait(held)
    hold_until_eof()


def hoard_server(accept_on_command, full_backlog):
    hoard = []
    if full_backlog:
        fill = lambda port: hoard.append(socket.create_connection((LOOPBACK, port)))
        sock = listener(backlog=0, before_ready=fill)
    else:
        sock = listener()
    if accept_on_command:
        for line in sys.stdin:
            if line.strip() == "accept":
                break

    def accept_forever():
        while True:
            conn, _ = sock.accept()
            hoard.append(conn)

    in_background(accept_forever)
    hold_until_eof()


def connect_close(port, period, count):
    clock = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, clock + i * period - time.monotonic()))
        socket.create_connection((LOOPBACK, port), timeout=10).close()
    say(done=count)
    hold_until_eof()


def connect_hold(port, count):
    held = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(count)]
    say(done=len(held))
    hold_until_eof()


def churn_server():
    sock = listener()

    def serve_forever():
        while True:
            conn, _ = sock.accept()
            conn.recv(1)  # the client's FIN
            conn.close()

    in_background(serve_forever)
    hold_until_eof()


def churn_client(port, seconds):
    count, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        # No create_connection: its address lookup would halve the rate.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.connect((LOOPBACK, port))
        sock.close()
        count += 1
    say(done=count, per_s=count / (time.monotonic() - start))
    hold_until_eof()


def fd_reader(pid, seconds):
    fds = f"/proc/{pid}/fd"
    reads, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        for fd in os.listdir(fds):
            try:
                os.readlink(f"{fds}/{fd}")
            except OSError:
                pass  # closed since the listing
            reads += 1
    say(done=reads)
    hold_until_eof()


def main():
    parser = argparse.ArgumentParser()
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("http-server").add_argument("idle_s", type=float)
    client = roles.add_parser("http-client")
    client.add_argument("port", type=int)
    client.add_argument("mode", choices=["leak", "reuse"])
    client.add_argument("period", type=float)
    client.add_argument("requests", type=int)
    client.add_argument("--nofile", type=int)
    client.add_argument("--await-close-wait", action="store_true")
    hoarder = roles.add_parser("hoard-server")
    hoarder.add_argument("--accept-on-command", action="store_true")
    hoarder.add_argument("--full-backlog", action="store_true")
    closer = roles.add_parser("connect-close")
    closer.add_argument("port", type=int)
    closer.add_argument("period", type=float)
    closer.add_argument("count", type=int)
    holder = roles.add_parser("connect-hold")
    holder.add_argument("port", type=int)
    holder.add_argument("count", type=int)
    roles.add_parser("churn-server")
    churn = roles.add_parser("churn-client")
    churn.add_argument("port", type=int)
    churn.add_argument("seconds", type=float)
    reader = roles.add_parser("fd-reader")
    reader.add_argument("pid", type=int)
    reader.add_argument("seconds", type=float)
    args = parser.parse_args()

    if args.role == "http-server":
        http_server(args.idle_s)
    elif args.role == "http-client":
        http_client(args)
    elif args.role == "hoard-server":
        hoard_server(args.accept_on_command, args.full_backlog)
    elif args.role == "connect-close":
        connect_close(args.port, args.period, args.count)
    elif args.role == "connect-hold":
        connect_hold(args.port, args.count)
    elif args.role == "churn-server":
        churn_server()
    elif args.role == "churn-client":
        churn_client(args.port, args.seconds)
    elif args.role == "fd-reader":
        fd_reader(args.pid, args.seconds)


if __name__ == "__main__":
    main()
