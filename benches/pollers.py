#!/usr/bin/env python3
"""Admin pollers for benches/admin.sh: one client fetching the whole account list in a loop
and four scraping /metrics in a loop, without pause, each on one keep-alive connection
(like a dashboard or Prometheus, unlike a new curl process per request, whose fork and exec
on the load generator's CPU would show up as token latency).

    pollers.py HOST PORT AUTH_HEADER SECONDS [list|scrapes|all]

Prints "<lists completed> <scrapes completed>" when SECONDS have passed.
"""
import http.client
import sys
import threading
import time

host, port, auth, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
kinds = sys.argv[5] if len(sys.argv) > 5 else "all"
end = time.monotonic() + seconds
done = {"/v1/accounts": 0, "/metrics": 0}
lock = threading.Lock()


def poll(path):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    while time.monotonic() < end:
        conn.request("GET", path, headers={"Authorization": auth})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"{path}: HTTP {resp.status}")
        with lock:
            done[path] += 1


paths = []
if kinds != "scrapes":
    paths.append("/v1/accounts")
if kinds != "list":
    paths += ["/metrics"] * 4
threads = [threading.Thread(target=poll, args=(p,), daemon=True) for p in paths]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(done["/v1/accounts"], done["/metrics"])
