#!/usr/bin/env python3
"""How long a provider outage one EmailEngine credential lookup rides out (issue #15).

A model of the sidecar's rules, for the arithmetic in the README ("Provider outages"):
back-off 1 s doubling to --backoff-max with equal jitter (each delay 50-100 % of its
step, never under the provider's Retry-After); a request without a token is held up to
--request-wait for the key's next attempt (src/cache/schedule.rs hold_until), else
answered 429 with Retry-After = 1 s before the next attempt, 3..30 s (retry_hint). And
EmailEngine's: six requests per lookup, each min(Retry-After, 30 s) after the last 429.
tests/outage.rs checks the real thing for a 120 s outage; this explores the rest.

    benches/outage_model.py [--request-wait 20] [--backoff-max 60] [--retry-after N]
"""
import argparse
import math
import random

LEAD, MIN_HINT, MAX_HINT, REQUESTS = 1.0, 3.0, 30.0, 6


def attempts(jitter, backoff_max, retry_after, horizon=4000.0):
    t, n, out = 0.0, 1, [0.0]
    while t < horizon:
        step = min(2.0 ** min(n - 1, 30), backoff_max)
        d = step * (0.5 + 0.5 * jitter(n))
        if retry_after:
            d = max(d, min(retry_after, 120.0))
        t += d
        out.append(t)
        n += 1
    return out


def survives(outage, sched, request_wait):
    now = 0.0
    for _ in range(REQUESTS):
        deadline, cur = now + request_wait, now
        while True:
            a = next(x for x in sched if x >= cur - 1e-9)
            if a <= deadline:  # held through this attempt
                if a >= outage:
                    return True
                cur = a + 1e-6
                continue
            answer_at = min(max(a - LEAD - MAX_HINT, cur), deadline)
            ra = min(max(math.ceil(a - answer_at - LEAD), MIN_HINT), MAX_HINT)
            now = answer_at + ra
            break
    return False


def longest(sched, request_wait):
    o = 0
    while survives(o, sched, request_wait):
        o += 1
    return o


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--request-wait", type=float, default=20.0)
    p.add_argument("--backoff-max", type=float, default=60.0)
    p.add_argument("--retry-after", type=float, default=None)
    p.add_argument("--runs", type=int, default=300)
    a = p.parse_args()
    for name, j in [("shortest delays", lambda n: 0.0), ("longest delays", lambda n: 1.0)]:
        print(f"{name}: {longest(attempts(j, a.backoff_max, a.retry_after), a.request_wait)} s")
    rng = random.Random(1)
    res = []
    for _ in range(a.runs):
        js = [rng.random() for _ in range(200)]
        res.append(longest(attempts(lambda n: js[n], a.backoff_max, a.retry_after), a.request_wait))
    res.sort()
    print(f"random jitter, {a.runs} runs: min {res[0]} s, median {res[len(res) // 2]} s, max {res[-1]} s")


if __name__ == "__main__":
    main()
