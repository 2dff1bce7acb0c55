#!/usr/bin/env python3
"""Turn the wrk outputs collected by bench/run.sh into a markdown report.

Input (--runs): a TSV written by run.sh, one line per measured run:
    target  conns  round  cpu_ticks  wrk_output_file
where cpu_ticks is utime+stime (clock ticks) consumed by the process under
test during the run: stepgate for `gateway`, the nginx worker for `direct`.
The report goes to stdout; --raw-out collects every wrk output verbatim.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


@dataclass
class Run:
    target: str
    conns: int
    round: int
    requests: int
    rps: float
    p50_us: float
    p99_us: float
    errors: int
    cpu_us_per_req: float | None


def parse_duration_us(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unrecognised wrk latency {text!r}")
    return float(m.group(1)) * UNIT_US[m.group(2)]


def parse_wrk(text: str, source: str) -> dict:
    def need(pattern: str) -> re.Match:
        m = re.search(pattern, text, re.MULTILINE)
        if not m:
            sys.exit(f"report.py: {source}: cannot find /{pattern}/ in wrk output:\n{text}")
        return m

    requests = int(need(r"^\s*(\d+) requests in ").group(1))
    rps = float(need(r"^Requests/sec:\s*([0-9.]+)").group(1))
    p50 = parse_duration_us(need(r"^\s*50(?:\.000)?%\s+(\S+)").group(1))
    p99 = parse_duration_us(need(r"^\s*99(?:\.000)?%\s+(\S+)").group(1))
    errors = 0
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    return {"requests": requests, "rps": rps, "p50_us": p50, "p99_us": p99, "errors": errors}


def load_runs(path: Path, clk_tck: int, raw_out: Path | None) -> list[Run]:
    runs = []
    raw_parts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        target, conns, rnd, ticks, wrk_file = line.split("\t")
        text = Path(wrk_file).read_text()
        raw_parts.append(f"===== {target} conns={conns} round={rnd} cpu_ticks={ticks}\n{text}")
        w = parse_wrk(text, wrk_file)
        cpu = None
        if w["requests"] > 0:
            cpu = int(ticks) * 1e6 / clk_tck / w["requests"]
        runs.append(Run(target, int(conns), int(rnd), w["requests"], w["rps"],
                        w["p50_us"], w["p99_us"], w["errors"], cpu))
    if raw_out:
        raw_out.write_text("\n".join(raw_parts))
    if not runs:
        sys.exit("report.py: no runs recorded")
    return runs


def ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def cpu(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--clk-tck", type=int, required=True)
    ap.add_argument("--gateway-hwm-kib", type=int)
    ap.add_argument("--meta", action="append", default=[], help="key=value for the header")
    ap.add_argument("--raw-out", type=Path)
    args = ap.parse_args()

    runs = load_runs(args.runs, args.clk_tck, args.raw_out)
    meta = dict(m.split("=", 1) for m in args.meta)

    out = []
    out.append(f"# stepgate proxy benchmark, {meta.get('date', '')}".rstrip(", "))
    out.append("")
    for key in ("commit", "nproc", "kernel", "wrk", "nginx", "rustc"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    out.append("- direct = wrk → nginx; gateway = wrk → stepgate → nginx (same nginx, same wrk settings)")
    out.append("- CPU µs/req: process under test only (direct: the nginx worker; gateway: stepgate)")
    out.append("")
    out.append("| target | conns | round | req/s | p50 (ms) | p99 (ms) | errors | CPU µs/req |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")

    conns_order = list(dict.fromkeys(r.conns for r in runs))
    medians: dict[tuple[str, int], dict] = {}
    for conns in conns_order:
        for r in sorted((r for r in runs if r.conns == conns), key=lambda r: (r.round, r.target != "direct")):
            out.append(f"| {r.target} | {r.conns} | {r.round} | {r.rps:.0f} | {ms(r.p50_us)} | "
                       f"{ms(r.p99_us)} | {r.errors} | {cpu(r.cpu_us_per_req)} |")
        for target in ("direct", "gateway"):
            sel = [r for r in runs if r.conns == conns and r.target == target]
            if not sel:
                continue
            m = {
                "rps": median(r.rps for r in sel),
                "p50": median(r.p50_us for r in sel),
                "p99": median(r.p99_us for r in sel),
                "errors": sum(r.errors for r in sel),
                "cpu": median(r.cpu_us_per_req for r in sel),
            }
            medians[(target, conns)] = m
            out.append(f"| **{target}** | {conns} | **median** | **{m['rps']:.0f}** | **{ms(m['p50'])}** | "
                       f"**{ms(m['p99'])}** | **{m['errors']}** (sum) | **{cpu(m['cpu'])}** |")

    out.append("")
    out.append("## Summary (gateway / direct, medians)")
    out.append("")
    out.append("| conns | throughput ratio | p99 ratio | p50 ratio | per-round throughput ratio | "
               "CPU µs/req direct → gateway |")
    out.append("|---:|---:|---:|---:|---|---|")
    for conns in conns_order:
        d, g = medians.get(("direct", conns)), medians.get(("gateway", conns))
        if not d or not g:
            continue
        per_round = []
        for rnd in sorted({r.round for r in runs if r.conns == conns}):
            dr = [r for r in runs if r.conns == conns and r.round == rnd and r.target == "direct"]
            gr = [r for r in runs if r.conns == conns and r.round == rnd and r.target == "gateway"]
            if dr and gr and dr[0].rps:
                per_round.append(f"{gr[0].rps / dr[0].rps:.2f}")
        out.append(f"| {conns} | {ratio(g['rps'], d['rps'])} | {ratio(g['p99'], d['p99'])} | "
                   f"{ratio(g['p50'], d['p50'])} | {', '.join(per_round)} | "
                   f"{cpu(d['cpu'])} → {cpu(g['cpu'])} |")
    out.append("")
    if args.gateway_hwm_kib is not None:
        out.append(f"Peak RSS of stepgate (VmHWM at the end): {args.gateway_hwm_kib / 1024:.1f} MiB")
        out.append("")
    out.append("Throughput ratio < 1 means the gateway serves fewer requests/s than nginx alone; "
               "p99 ratio > 1 means a slower tail. wrk, nginx and stepgate share the same cores, "
               "so compare ratios within this run, not absolute numbers across runs or machines.")
    print("\n".join(out))


if __name__ == "__main__":
    main()
