#!/usr/bin/env python3
"""Turn the runs collected by bench/auth.sh into a markdown report (stdout).

Input (--runs): one line per measured run, tab-separated key=value fields:
    scen conns round ticks hwm_kib hwm_reset wrk m0 m1 [wrk2 conns2]
scen is a, b, c, d, e, f-unloaded, f-flood or f-control; ticks is the CPU time
(utime+stime, clock ticks) of the process under test during the run (the upstream nginx for
a, the proxy nginx for b and f-control, stepgate otherwise); hwm_kib its VmHWM after the run
(reset before it when hwm_reset=1); m0/m1 stepgate's /metrics before and after ("-" for
nginx runs). f-flood and f-control runs have the legitimate wrk output in wrk and the
flood's in wrk2; f-control's flood went to nginx (b), which refuses all of it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing report.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import parse_wrk  # noqa: E402  (bench/report.py, the proxy benchmark's parser)

LABELS = {
    "a": "(a) direct: wrk → nginx",
    "b": "(b) nginx key map → nginx",
    "c": "(c) stepgate, API key",
    "d": "(d) stepgate, key + step-up token",
    "e": "(e) stepgate, key + fresh TOTP code",
    "f-unloaded": "(f) legit (d), paced, alone",
    "f-legit": "(f) legit (d), paced, under flood",
    "f-flood": "(f) flood of wrong codes",
    "f-control-legit": "(f) legit (d), paced, the flood at nginx (b) instead",
    "f-control": "(f) control: the same flood refused by nginx (b)",
}
ORDER = ["a", "b", "c", "d", "e", "f-unloaded", "f-legit", "f-flood", "f-control-legit", "f-control"]


# ---------------------------------------------------------------- parsing

def parse_metrics(path: str) -> dict[tuple[str, tuple], float]:
    out = {}
    if path in ("", "-"):
        return out
    for line in Path(path).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            pass
    return out


def delta(m0: dict, m1: dict) -> dict:
    return {k: v - m0.get(k, 0.0) for k, v in m1.items() if v - m0.get(k, 0.0) != 0}


def statuses(d: dict, route: str) -> Counter:
    c = Counter()
    for (name, labels), v in d.items():
        lab = dict(labels)
        if name == "stepgate_requests_total" and lab.get("route") == route:
            c[int(lab["status"])] += int(round(v))
    return c


def metric(d: dict, name: str, **want) -> float:
    total = 0.0
    for (n, labels), v in d.items():
        lab = dict(labels)
        if n == name and all(lab.get(k) == val for k, val in want.items()):
            total += v
    return total


def wrk_seconds(text: str) -> float | None:
    m = re.search(r"^\s*\d+ requests in ([0-9.]+)(ms|s|m)\b", text, re.MULTILINE)
    if not m:
        return None
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def socket_errors(text: str) -> int:
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return sum(int(g) for g in m.groups()) if m else 0


def fmt_status(c: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "–"


# ---------------------------------------------------------------- runs

def load(args):
    rows = []        # one dict per table row (f-flood runs give two: f-legit and f-flood)
    raw = []
    for line in Path(args.runs).read_text().splitlines():
        if not line.strip():
            continue
        f = dict(kv.split("=", 1) for kv in line.split("\t"))
        scen, conns, rnd = f["scen"], int(f["conns"]), int(f["round"])
        ticks = int(f["ticks"])
        cpu_us = ticks * 1e6 / args.clk_tck
        hwm_mib = int(f["hwm_kib"]) / 1024 if f.get("hwm_kib") else None
        text = Path(f["wrk"]).read_text()
        raw.append(f"===== {scen} conns={conns} round={rnd} cpu_ticks={ticks}\n{text}")
        w = parse_wrk(text, f["wrk"])
        d = delta(parse_metrics(f.get("m0", "-")), parse_metrics(f.get("m1", "-")))
        base = {"scen": scen, "conns": conns, "round": rnd, "rps": w["rps"], "p50": w["p50_us"],
                "p99": w["p99_us"], "requests": w["requests"], "hwm": hwm_mib,
                "hwm_reset": f.get("hwm_reset") == "1", "cpu_total_us": cpu_us, "delta": d,
                "log": None if scen in ("a", "b") else int(f.get("log", 0))}
        if scen in ("a", "b", "c", "d", "f-unloaded"):
            base["errors"] = w["errors"]
            base["cpu"] = cpu_us / w["requests"] if w["requests"] else None
            route = {"c": "direct-key", "d": "stepup", "f-unloaded": "stepup"}.get(scen)
            base["gw_status"] = statuses(d, route) if route else None
            rows.append(base)
        elif scen == "e":
            used, firsts, stops, stray, all_stopped = 0, [], [], 0, True
            for m in re.finditer(r"BENCH_CODES id=\d+ used=(\d+) first=(\S+) stop=(\S+) stray=(\d+)", text):
                used += int(m.group(1))
                stray += int(m.group(4))
                if m.group(2) != "-":
                    firsts.append(float(m.group(2)))
                if m.group(3) == "-":
                    all_stopped = False
                else:
                    stops.append(float(m.group(3)))
            if firsts and stops and all_stopped:
                active = max(stops) - min(firsts)
            else:
                active = wrk_seconds(text) or 0.0
            st = statuses(d, "stepup")
            ok = st.get(200, 0)
            base.update({
                "used": used, "stray": stray, "active": active, "exhausted": all_stopped and bool(stops),
                "rps": used / active if active > 0 else 0.0,
                "ok": ok, "gw_status": st,
                "accepted": int(metric(d, "stepgate_second_factor_total", factor="totp", outcome="accepted")),
                "replayed": int(metric(d, "stepgate_second_factor_total", outcome="replayed")),
                "rejected": int(metric(d, "stepgate_second_factor_total", outcome="rejected")),
                "errors": socket_errors(text) + (used - ok),
                "cpu": cpu_us / used if used else None,
            })
            rows.append(base)
        elif scen == "f-flood":
            ftext = Path(f["wrk2"]).read_text()
            raw.append(f"===== f-flood (the flood) conns={f['conns2']} round={rnd}\n{ftext}")
            fw = parse_wrk(ftext, f["wrk2"])
            fst = statuses(d, "flood")
            lst = statuses(d, "stepup")
            unexpected = sum(v for k, v in fst.items() if k not in (401, 429))
            legit = dict(base, scen="f-legit", errors=w["errors"], cpu=None, gw_status=lst, log=None)
            flood = {
                "scen": "f-flood", "conns": int(f["conns2"]), "round": rnd, "rps": fw["rps"],
                "p50": fw["p50_us"], "p99": fw["p99_us"], "requests": fw["requests"],
                "hwm": hwm_mib, "hwm_reset": base["hwm_reset"], "cpu_total_us": cpu_us,
                "errors": socket_errors(ftext) + unexpected, "gw_status": fst,
                "cpu": cpu_us / fw["requests"] if fw["requests"] else None,
                "bans": int(metric(d, "stepgate_bans_started_total")), "log": base["log"],
                "legit": legit,
            }
            rows.append(legit)
            rows.append(flood)
        elif scen == "f-control":
            ftext = Path(f["wrk2"]).read_text()
            raw.append(f"===== f-control (the flood, at nginx b) conns={f['conns2']} round={rnd}\n{ftext}")
            fw = parse_wrk(ftext, f["wrk2"])
            legit = dict(base, scen="f-control-legit", errors=w["errors"], cpu=None,
                         gw_status=statuses(d, "stepup"), hwm=None, log=None)
            rows.append(legit)
            # nginx answers the flood 401 (not 2xx, so wrk counts every answer): socket errors only.
            rows.append({
                "scen": "f-control", "conns": int(f["conns2"]), "round": rnd, "rps": fw["rps"],
                "p50": fw["p50_us"], "p99": fw["p99_us"], "requests": fw["requests"],
                "hwm": hwm_mib, "hwm_reset": base["hwm_reset"], "cpu_total_us": cpu_us,
                "errors": socket_errors(ftext), "gw_status": None,
                "cpu": cpu_us / fw["requests"] if fw["requests"] else None, "log": None,
                "legit": legit,
            })
    if not rows:
        sys.exit("auth_report.py: no runs recorded")
    return rows, raw


# ---------------------------------------------------------------- formatting

def ms(us):
    return "n/a" if us is None else f"{us / 1000:.2f}"


def num(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--clk-tck", type=int, required=True)
    ap.add_argument("--gateway-log")
    ap.add_argument("--metrics-seed")
    ap.add_argument("--metrics-final")
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--raw-out")
    args = ap.parse_args()
    meta = dict(m.split("=", 1) for m in args.meta)
    rows, raw = load(args)
    if args.raw_out:
        Path(args.raw_out).write_text("\n".join(raw))

    out = [f"# stepgate auth-path benchmark, {meta.get('date', '')}".rstrip(", "), ""]
    for key in ("commit", "nproc", "kernel", "wrk", "consumers", "seed", "flood", "nginx", "rustc"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    workers = meta.get("workers", "1")
    out += [
        f"- (a) nginx `return 200` (1 process); (b) a second nginx ({workers} worker processes, "
        f"as many as stepgate's worker threads) with a `map` over the same keys, `return 401` on "
        "a miss, keepalive upstream; (c)–(f) stepgate → the same (a) nginx",
        "- CPU µs/req: utime+stime of the process under test (a: the upstream nginx; b: the proxy "
        "nginx; c–f: stepgate) during the run ÷ requests. (e): ÷ codes sent; flood: stepgate's CPU "
        "during the flood run (legit + flood) ÷ flood requests; control flood: nginx (b)'s CPU ÷ "
        "flood requests",
        "- peak RSS: VmHWM of that process, reset before each run (`clear_refs`), read after it",
        "",
    ]

    # -------------------------------------------------- every run
    out += ["## Runs", "",
            "| scenario | conns | round | req/s | p50 (ms) | p99 (ms) | errors / non-2xx | CPU µs/req | "
            "peak RSS (MiB) | stepgate log lines |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    key = lambda r: (ORDER.index(r["scen"]), r["conns"], r["round"])
    for r in sorted(rows, key=key):
        out.append(f"| {LABELS[r['scen']]} | {r['conns']} | {r['round']} | {r['rps']:.0f} | {ms(r['p50'])} | "
                   f"{ms(r['p99'])} | {r['errors']} | {num(r['cpu'])} | {num(r['hwm'])} | "
                   f"{'–' if r['log'] is None else r['log']} |")
    out += ["", "stepgate log lines: lines stepgate wrote during the run at RUST_LOG=warn (warnings and "
            "errors; see Notes). The flood's count covers the legitimate traffic running with it.", ""]

    # -------------------------------------------------- medians and ratios
    groups = defaultdict(list)
    for r in rows:
        groups[(r["scen"], r["conns"])].append(r)
    meds = {}
    for k, rs in groups.items():
        meds[k] = {
            "rps": med(r["rps"] for r in rs), "p50": med(r["p50"] for r in rs),
            "p99": med(r["p99"] for r in rs), "cpu": med(r["cpu"] for r in rs),
            "errors": sum(r["errors"] for r in rs), "hwm": max((r["hwm"] or 0) for r in rs) or None,
            "rounds": {r["round"]: r for r in rs},
        }
    out += ["## Summary: medians over rounds, ratios to (a) and (b) at the same connection count", "",
            "req/s × > 1: more requests/s than the reference; p99 × and CPU × < 1: faster tail, "
            "less CPU per request than the reference. Errors: sum over rounds.", "",
            "| scenario | conns | req/s | × (a) | × (b) | p50 (ms) | p99 (ms) | p99 × (a) | p99 × (b) | "
            "CPU µs/req | CPU × (a) | CPU × (b) | errors | peak RSS (MiB) | req/s × (b) per round |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k in sorted(meds, key=lambda k: (ORDER.index(k[0]), k[1])):
        m = meds[k]
        a, b = meds.get(("a", k[1])), meds.get(("b", k[1]))
        per_round = []
        if b:
            for rnd, r in sorted(m["rounds"].items()):
                br = b["rounds"].get(rnd)
                per_round.append(ratio(r["rps"], br["rps"]) if br else "n/a")
        g = lambda ref, f: ratio(m[f], ref[f]) if ref else "–"
        out.append(
            f"| {LABELS[k[0]]} | {k[1]} | {m['rps']:.0f} | {g(a, 'rps')} | {g(b, 'rps')} | {ms(m['p50'])} | "
            f"{ms(m['p99'])} | {g(a, 'p99')} | {g(b, 'p99')} | {num(m['cpu'])} | {g(a, 'cpu')} | "
            f"{g(b, 'cpu')} | {m['errors']} | {num(m['hwm'])} | {', '.join(per_round) or '–'} |")
    out += ["", "(e) req/s is codes sent ÷ the time until the pairs ran out (wrk's own figure divides by "
            "the whole `-d`). (f) rows run at other connection counts, so their ratios are in the (f) table.", ""]

    # -------------------------------------------------- (e)
    es = sorted((r for r in rows if r["scen"] == "e"), key=key)
    if es:
        out += ["## (e) the code path: one fresh TOTP code per consumer", "",
                "| conns | round | pairs sent | 200 | other statuses | TOTP accepted | replayed / rejected | "
                "ran out | active (s) | codes/s | p50 (ms) | p99 (ms) | CPU µs/code |",
                "|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in es:
            other = Counter({k: v for k, v in r["gw_status"].items() if k != 200})
            out.append(f"| {r['conns']} | {r['round']} | {r['used']} | {r['ok']} | {fmt_status(other)} | "
                       f"{r['accepted']} | {r['replayed']} / {r['rejected']} | {'yes' if r['exhausted'] else 'no'} | "
                       f"{r['active']:.2f} | {r['rps']:.0f} | {ms(r['p50'])} | {ms(r['p99'])} | {num(r['cpu'])} |")
        out += ["", "200 and statuses are stepgate's own counts (its /metrics, route `stepup`), so requests "
                "still in flight when wrk stopped are included; wrk's latency percentiles cover the "
                "responses it read.", ""]

    # -------------------------------------------------- (f)
    floods = sorted((r for r in rows if r["scen"] == "f-flood"), key=key)
    if floods:
        # CPU per forwarded request: (d) at the connection count nearest the flood's.
        d_conns = sorted({c for (s, c) in meds if s == "d"}, key=lambda c: abs(c - floods[0]["conns"]))
        fwd = meds[("d", d_conns[0])]["cpu"] if d_conns else None
        out += ["## (f) brute-force flood while paced legitimate (d) traffic runs", "",
                f"CPU per forwarded request: median of (d) at c={d_conns[0] if d_conns else 'n/a'} = "
                f"{num(fwd)} µs. \"raw\" is stepgate's CPU during the run ÷ flood requests (it includes the "
                "legitimate requests' share); \"net\" first subtracts legit requests × the CPU/req of the "
                "unloaded legit run of the same round.", "",
                "| round | legit alone: req/s, p99 (ms) | legit under flood: req/s | success | p99 (ms) | "
                "p99 × alone | flood req/s | flood ÷ legit | flood 401 | flood 429 | other | bans started | "
                "CPU µs/refused raw | net | ÷ forwarded (raw / net) | control: legit p99 (ms), × alone | "
                "p99 under flood ÷ control |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|---:|"]
        for fl in floods:
            lg = fl["legit"]
            alone = next((r for r in rows if r["scen"] == "f-unloaded" and r["round"] == fl["round"]), None)
            control = next((r["legit"] for r in rows if r["scen"] == "f-control" and r["round"] == fl["round"]), None)
            control_txt = (f"{ms(control['p99'])}, {ratio(control['p99'], alone['p99']) if alone else 'n/a'}"
                           if control else "n/a")
            ok = lg["requests"] - lg["errors"]
            success = 100.0 * ok / lg["requests"] if lg["requests"] else 0.0
            net = None
            if alone and alone["cpu"] is not None and fl["requests"]:
                net = (fl["cpu_total_us"] - lg["requests"] * alone["cpu"]) / fl["requests"]
            other = Counter({k: v for k, v in fl["gw_status"].items() if k not in (401, 429)})
            alone_txt = f"{alone['rps']:.0f}, {ms(alone['p99'])}" if alone else "n/a"
            out.append(
                f"| {fl['round']} | {alone_txt} | "
                f"{lg['rps']:.0f} | {success:.2f} % | {ms(lg['p99'])} | "
                f"{ratio(lg['p99'], alone['p99']) if alone else 'n/a'} | {fl['rps']:.0f} | "
                f"{ratio(fl['rps'], lg['rps'])} | {fl['gw_status'].get(401, 0)} | {fl['gw_status'].get(429, 0)} | "
                f"{fmt_status(other)} | {fl['bans']} | {num(fl['cpu'])} | {num(net)} | "
                f"{ratio(fl['cpu'], fwd)} / {ratio(net, fwd)} | {control_txt} | "
                f"{ratio(lg['p99'], control['p99']) if control else 'n/a'} |")
        out += ["", "Legit statuses are wrk's (errors = socket errors + non-2xx); flood statuses are "
                "stepgate's counts on the flood's route (same policy as (d)). The flood sends a random "
                "X-Forwarded-For on every request, so no failure counts against 127.0.0.1. Control: "
                "the same flood (same wrk, rate and nice level) aimed at nginx (b), which refuses all "
                "of it with 401 without the upstream, while the same legitimate traffic runs through "
                "stepgate: the legitimate p99 this machine gives under that load when the gateway "
                "handles none of it.", ""]
        controls = [r for r in rows if r["scen"] == "f-control"]
        b_cpu = meds.get(("b", controls[0]["conns"]), {}).get("cpu") if controls else None
        if controls and b_cpu:
            c_cpu = med(r["cpu"] for r in controls)
            out += [f"nginx (b) refusing the flood: {num(c_cpu)} µs CPU per refused request, "
                    f"{ratio(c_cpu, b_cpu)}× its own forwarded request at c={controls[0]['conns']} "
                    f"({num(b_cpu)} µs; the flood paced, (b) closed-loop: the comparison of stepgate's raw figure).", ""]

    # -------------------------------------------------- the performance targets
    out += ["## Targets, from the medians above", ""]
    checks = []
    for scen in ("c", "d"):
        for conns in sorted({c for (s, c) in meds if s == scen}):
            m, b = meds[(scen, conns)], meds.get(("b", conns))
            if not b:
                continue
            checks.append((f"({scen}) c={conns}: req/s ≥ 1.0× (b)", m["rps"] / b["rps"], 1.0, ">="))
            if m["cpu"] and b["cpu"]:
                checks.append((f"({scen}) c={conns}: CPU/req ≤ (b)", m["cpu"] / b["cpu"], 1.0, "<="))
            checks.append((f"({scen}) c={conns}: p99 ≤ (b)", m["p99"] / b["p99"], 1.0, "<="))
    for fl in floods:
        lg = fl["legit"]
        alone = next((r for r in rows if r["scen"] == "f-unloaded" and r["round"] == fl["round"]), None)
        rnd = fl["round"]
        checks.append((f"(f) r{rnd}: flood ≥ 10× legit rate (harness condition)", fl["rps"] / lg["rps"] if lg["rps"] else 0, 10.0, ">="))
        if lg["requests"]:
            checks.append((f"(f) r{rnd}: legit success 100 %", 100.0 * (lg["requests"] - lg["errors"]) / lg["requests"], 100.0, ">="))
        if alone:
            checks.append((f"(f) r{rnd}: legit p99 ≤ 2× alone", lg["p99"] / alone["p99"], 2.0, "<="))
        if fwd and fl["cpu"]:
            checks.append((f"(f) r{rnd}: refused CPU ≤ 25 % of forwarded (raw)", fl["cpu"] / fwd, 0.25, "<="))
    out += ["| check | measured | target | |", "|---|---:|---:|---|"]
    for name, value, target, op in checks:
        ok = value >= target if op == ">=" else value <= target
        out.append(f"| {name} | {value:.2f} | {op} {target:g} | {'met' if ok else '**missed**'} |")
    out.append("")

    # -------------------------------------------------- gateway state and log
    notes = []
    if args.metrics_final:
        mf = parse_metrics(args.metrics_final)
        get = lambda n: int(metric(mf, n))
        notes.append(f"stepgate at the end: {get('stepgate_step_up_tokens_live')} live step-up tokens, "
                     f"{get('stepgate_bans_active')} bans active, "
                     f"{get('stepgate_step_up_tokens_issued_total')} tokens issued in all")
        errs = sum(int(v) for (n, lab), v in mf.items()
                   if n == "stepgate_upstream_errors_total")
        notes.append(f"upstream errors counted by stepgate: {errs}")
        local = [(dict(lab), int(v)) for (n, lab), v in mf.items()
                 if n == "stepgate_requests_total" and dict(lab).get("route") in ("stepup", "direct-key")
                 and dict(lab).get("status") not in ("200",)]
        if local:
            notes.append("non-200 answers on the legitimate routes over the whole run (includes the start-up "
                         "sanity checks, one 401 each): "
                         + ", ".join(f"{l['route']} {l['status']}: {v}" for l, v in sorted(local, key=str)))
    if args.gateway_log and Path(args.gateway_log).exists():
        levels, messages = Counter(), Counter()
        for line in Path(args.gateway_log).read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
                level = str(ev.get("level", "?")).upper()
                msg = ev.get("fields", {}).get("message") or ev.get("message") or line
            except ValueError:
                level, msg = "TEXT", line
            levels[level] += 1
            messages[(level, str(msg)[:200])] += 1
        notes.append("stepgate log over the whole run, seeding included (RUST_LOG=warn): "
                     + (", ".join(f"{k} {v}" for k, v in sorted(levels.items())) or "empty"))
        notes += [f"  - {n} × {level} `{msg}`" for (level, msg), n in messages.most_common(5)]
    if not all(r["hwm_reset"] for r in rows):
        notes.append("the kernel refused to reset VmHWM for some runs: their peak RSS is the peak since start")
    if notes:
        out += ["## Notes", ""] + [n if n.startswith("  ") else f"- {n}" for n in notes] + [""]
    out.append("wrk, both nginx processes and stepgate share the same cores: compare ratios within this "
               "run, not absolute numbers across runs or machines.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
