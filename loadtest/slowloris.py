#!/usr/bin/env python3
"""A slowloris client for soak runs: keeps N sockets open that send a request's headers one byte
a second (and some that send nothing), opening a new one whenever the server closes one. Runs
until killed (SIGTERM) or for --seconds; then prints one JSON line: sockets opened, closed by
the server, and the longest any socket stayed open.

    python3 loadtest/slowloris.py HOST:PORT [--sockets 50] [--silent 10] [--seconds S]
"""
import argparse
import json
import selectors
import signal
import socket
import sys
import time

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nX-Slow: "


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("--sockets", type=int, default=50)
    ap.add_argument("--silent", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=0)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    sel = selectors.DefaultSelector()
    stats = {"opened": 0, "closed_by_server": 0, "longest_open_s": 0.0, "connect_errors": 0}
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))

    def open_one(silent):
        try:
            s = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            stats["connect_errors"] += 1
            return
        s.setblocking(False)
        if not silent:
            try:
                s.send(HEAD)
            except OSError:
                pass
        stats["opened"] += 1
        sel.register(s, selectors.EVENT_READ, {"silent": silent, "since": time.time()})

    for i in range(a.sockets + a.silent):
        open_one(i >= a.sockets)
    end = time.time() + a.seconds if a.seconds else None
    next_byte = time.time() + 1
    while not stop[0] and (end is None or time.time() < end):
        for key, _ in sel.select(timeout=max(0.0, next_byte - time.time())):
            s, meta = key.fileobj, key.data
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:
                stats["closed_by_server"] += 1
                stats["longest_open_s"] = max(stats["longest_open_s"], time.time() - meta["since"])
                sel.unregister(s)
                s.close()
                open_one(meta["silent"])
        if time.time() >= next_byte:
            next_byte += 1
            for key in list(sel.get_map().values()):
                if not key.data["silent"]:
                    try:
                        key.fileobj.send(b"a")
                    except OSError:
                        pass
    print(json.dumps(stats))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
