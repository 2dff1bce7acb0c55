#!/usr/bin/env python3
"""Seeding and code preparation for bench/auth.sh (Python 3 standard library only).

    seed.py seed  --admin-port P --admin-token-file F --gateway-port G --out DIR
                  [--tokens 10000] [--codes 0] [--flood 1000] [--workers 12]
    seed.py codes --state DIR/code-pool.tsv --out DIR/codes.txt

`seed` creates three disjoint sets of consumers through the admin API, each with a
confirmed TOTP factor (RFC 6238, SHA-1, 6 digits, 30 s, computed here with hmac):

  c00001...  --tokens of them also hold a step-up token, earned by calling the gateway's
             /stepup route once with X-Api-Key + X-OTP.   -> keys.txt, tokens.txt
  e00001...  --codes of them (default 0), a separate pool for the code path (e). With 0,
             (e) uses the c consumers, a later time step than their step-up code.
             Either way: key, secret and the last step accepted. -> code-pool.tsv
  f00001...  --flood of them, whose keys the brute-force flood (f) sends with wrong
             codes (so they, not the consumers above, get banned). -> flood-keys.txt

`codes` writes one fresh `key code` pair per code-pool consumer for a time step later
than the last one the gateway accepted from it (a step is accepted only once) and within
the gateway's ±1 step of skew, then records that step as used.

The files hold secrets and live in the bench's temp dir only.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import struct
import sys
import threading
import time
from pathlib import Path

PERIOD = 30
DIGITS = 6


# ---------------------------------------------------------------- TOTP (RFC 6238 / 4226)

def b32decode(secret: str) -> bytes:
    s = secret.strip().replace(" ", "").upper()
    return base64.b32decode(s + "=" * (-len(s) % 8))


def hotp(key: bytes, counter: int) -> str:
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**DIGITS).zfill(DIGITS)


def current_step() -> int:
    return int(time.time()) // PERIOD


def log(msg: str) -> None:
    print(f"[seed] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- HTTP (keep-alive per thread)

class Client:
    """One keep-alive connection per worker thread and port."""

    def __init__(self, port: int, headers: dict[str, str] | None = None):
        self.port = port
        self.headers = headers or {}
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.local.conn = conn
        return conn

    def request(self, method: str, path: str, body=None, headers=None):
        """Returns (status, response headers, parsed JSON body or raw bytes)."""
        hdrs = dict(self.headers)
        hdrs.update(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        for attempt in (1, 2):  # one retry on a connection the server closed meanwhile
            conn = self._conn()
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, ConnectionError, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        parsed = raw
        if resp.getheader("Content-Type", "").startswith(("application/json", "application/problem+json")):
            parsed = json.loads(raw or b"null")
        return resp.status, resp, parsed


def expect(status: int, want: int, what: str, body) -> None:
    if status != want:
        raise RuntimeError(f"{what}: HTTP {status} (wanted {want}): {body!r}"[:500])


# ---------------------------------------------------------------- seeding

def enrol(admin: Client, name: str) -> dict:
    """Creates `name` with a confirmed TOTP factor; returns key, secret, confirm step."""
    status, _, body = admin.request("POST", "/consumers", {"name": name})
    expect(status, 201, f"POST /consumers {name}", body)
    key = body["api_key"]
    status, _, body = admin.request("POST", f"/consumers/{name}/totp", {})
    expect(status, 201, f"POST /consumers/{name}/totp", body)
    secret = body["secret"]
    raw = b32decode(secret)
    step = current_step()
    status, _, body = admin.request("POST", f"/consumers/{name}/totp/confirm", {"code": hotp(raw, step)})
    expect(status, 200, f"POST /consumers/{name}/totp/confirm", body)
    return {"name": name, "key": key, "secret": secret, "step": step}


def step_up(gateway: Client, c: dict) -> str:
    """Earns a step-up token on /stepup with a code for a step after the confirmed one."""
    # The confirm step can never be used again; step+1 is accepted from now on (±1 skew),
    # and a later current step is accepted as well.
    step = max(current_step(), c["step"] + 1)
    code = hotp(b32decode(c["secret"]), step)
    status, resp, body = gateway.request(
        "GET", "/stepup", headers={"X-Api-Key": c["key"], "X-OTP": code})
    expect(status, 200, f"GET /stepup for {c['name']} (step {step})", body)
    token = resp.getheader("X-Step-Up-Token")
    if not token:
        raise RuntimeError(f"GET /stepup for {c['name']}: 200 without X-Step-Up-Token")
    c["step"] = step
    return token


def run_pool(label: str, items, fn, workers: int):
    """fn over items on a thread pool, in order, with progress; fails on the first error."""
    total = len(items)
    results = [None] * total
    done = 0
    started = time.monotonic()
    next_report = 0.0
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = fut.result()
                done += 1
                elapsed = time.monotonic() - started
                if elapsed >= next_report or done == total:
                    log(f"{label}: {done}/{total} ({done / max(elapsed, 1e-9):.0f}/s)")
                    next_report = elapsed + 2.0
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return results


def cmd_seed(args) -> None:
    token = Path(args.admin_token_file).read_text().strip()
    admin = Client(args.admin_port, {"Authorization": f"Bearer {token}"})
    gateway = Client(args.gateway_port)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    names = ([f"c{i:05d}" for i in range(1, args.tokens + 1)]
             + [f"e{i:05d}" for i in range(1, args.codes + 1)]
             + [f"f{i:05d}" for i in range(1, args.flood + 1)])
    consumers = run_pool("consumers created and enrolled", names,
                         lambda n: enrol(admin, n), args.workers)
    token_set = consumers[:args.tokens]
    code_set = consumers[args.tokens:args.tokens + args.codes]
    flood_set = consumers[args.tokens + args.codes:]

    tokens = run_pool("step-up tokens", token_set, lambda c: step_up(gateway, c), args.workers)

    (out / "keys.txt").write_text("".join(f"{c['key']}\n" for c in token_set))
    (out / "tokens.txt").write_text(
        "".join(f"{c['key']} {t}\n" for c, t in zip(token_set, tokens)))
    # c["step"] is the last step the gateway accepted from each (confirm, or step-up).
    (out / "code-pool.tsv").write_text(
        "".join(f"{c['key']}\t{c['secret']}\t{c['step']}\n" for c in (code_set or token_set)))
    (out / "flood-keys.txt").write_text("".join(f"{c['key']}\n" for c in flood_set))
    codes_desc = f"{len(code_set)} for codes" if code_set else "the same ones for codes"
    log(f"seeded {len(consumers)} consumers ({len(token_set)} with step-up tokens, "
        f"{codes_desc}, {len(flood_set)} for the flood) "
        f"in {time.monotonic() - t0:.1f} s")


# ---------------------------------------------------------------- codes for (e)

def cmd_codes(args) -> None:
    """Fresh `key code` pairs for every consumer of the code pool.

    A consumer whose last accepted step is L can use step S > L; the gateway accepts S while
    the current step N satisfies |S - N| <= 1. We use S = max(N, L + 1), which needs
    L + 1 <= N + 1; when some consumer was already used at N + 1 we wait for the next step
    (at most 30 s). The codes stay valid until the end of step S + 1, at least 30 s from
    now, so a run of (e) must be shorter than that (auth.sh caps it at 25 s)."""
    state = Path(args.state)
    rows = [line.split("\t") for line in state.read_text().splitlines() if line.strip()]
    if not rows:
        sys.exit("seed.py codes: empty code pool")
    last = max(int(r[2]) for r in rows)
    for _ in range(3):  # bounded: one step boundary is always enough
        now = current_step()
        if last + 1 <= now + 1:
            break
        wait = (now + 1) * PERIOD - time.time() + 0.05
        log(f"code pool used up to step {last}; waiting {wait:.1f} s for the next step")
        time.sleep(max(wait, 0.05))
    else:
        sys.exit("seed.py codes: the clock did not advance")
    now = current_step()
    lines, new_rows, steps = [], [], set()
    for key, secret, used in rows:
        step = max(now, int(used) + 1)
        steps.add(step)
        lines.append(f"{key} {hotp(b32decode(secret), step)}\n")
        new_rows.append(f"{key}\t{secret}\t{step}\n")
    Path(args.out).write_text("".join(lines))
    # Assume every pair gets used: at worst a consumer skips a step next time.
    state.write_text("".join(new_rows))
    valid_until = (min(steps) + 2) * PERIOD  # the end of step S + 1 for the earliest S
    log(f"{len(lines)} codes for step(s) {sorted(steps)} (current {now}); "
        f"valid for {valid_until - time.time():.0f} s more")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--admin-port", type=int, required=True)
    s.add_argument("--admin-token-file", required=True)
    s.add_argument("--gateway-port", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--tokens", type=int, default=10000)
    s.add_argument("--codes", type=int, default=0)
    s.add_argument("--flood", type=int, default=1000)
    s.add_argument("--workers", type=int, default=12)
    c = sub.add_parser("codes")
    c.add_argument("--state", required=True)
    c.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "seed":
        if not (1 <= args.tokens <= 99999 and 0 <= args.codes <= 99999 and 1 <= args.flood <= 99999):
            sys.exit("seed.py: --tokens and --flood must be 1..99999, --codes 0..99999")
        if not 1 <= args.workers <= 64:
            sys.exit("seed.py: --workers must be 1..64")
        cmd_seed(args)
    else:
        cmd_codes(args)


if __name__ == "__main__":
    main()
