#!/usr/bin/env python3
"""Turns the raw outputs of loadtest/run.sh into RESULTS.md, chart.svg and scenarios.svg.

    python3 loadtest/report.py loadtest/out loadtest

Standard library only: wrk's text output is parsed with regular expressions, oha's JSON
summary with json, oha's per-request records (--db-url) with sqlite3, and the charts are
hand-written SVG.
"""

import json
import math
import re
import sqlite3
import statistics
import sys
from html import escape
from pathlib import Path

TARGETS = ["direct", "switchyard", "nginx", "haproxy"]
COLORS = {"direct": "#8c8c8c", "switchyard": "#d9622b", "nginx": "#2f8f46", "haproxy": "#3461a8"}
BIN = 0.25  # seconds per bin in the scenario charts (and cpu_sampler.py's interval)
CLK_TCK = 100  # set from meta.txt in main()


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

def read_kv(path):
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return values


UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def wrk_time_us(text):
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unknown wrk time {text!r}")
    return float(match.group(1)) * UNITS_US[match.group(2)]


def parse_wrk(path):
    text = path.read_text()
    out = {}
    match = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not match:
        raise ValueError(f"{path}: no Requests/sec line:\n{text}")
    out["rps"] = float(match.group(1))
    match = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", text, re.M)
    out["requests"] = int(match.group(1))
    out["seconds"] = wrk_time_us(match.group(2)) / 1e6
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+([\d.]+\w+)", text, re.M)
        out[f"p{pct}"] = wrk_time_us(match.group(1))
    errors = 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if match:
        errors += int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        errors += sum(int(g) for g in match.groups())
    out["errors"] = errors
    return out


def parse_metrics(path):
    """Prometheus text -> {(name, ((label, value), ...)): value}."""
    values = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not match:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or "")))
        values[(match.group(1), labels)] = float(match.group(3))
    return values


def metric_delta(before, after, name, **want):
    total = 0.0
    for (metric, labels), value in after.items():
        if metric != name or any(dict(labels).get(k) != v for k, v in want.items()):
            continue
        total += value - before.get((metric, labels), 0.0)
    return total


def codes_delta(before, after):
    codes = {}
    for (metric, labels), value in after.items():
        labels = dict(labels)
        if metric == "switchyard_requests_total" and labels.get("service") == "bench":
            delta = value - before.get((metric, tuple(sorted(labels.items()))), 0.0)
            if delta:
                codes[labels["code"]] = int(delta)
    return codes


def percentile(sorted_values, pct):
    if not sorted_values:
        return float("nan")
    index = max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)
    return sorted_values[index]


def load_scenario(directory):
    summary = json.loads((directory / "oha.json").read_text())
    conn = sqlite3.connect(directory / "oha.db")
    rows = conn.execute("SELECT start, end, duration, status FROM oha ORDER BY end").fetchall()
    conn.close()
    meta = read_kv(directory / "scenario.txt")
    before = parse_metrics(directory / "metrics-before.txt")
    after = parse_metrics(directory / "metrics-after.txt")
    transport = {k: v for k, v in summary.get("errorDistribution", {}).items()
                 if k != "aborted due to deadline"}
    statuses = {}
    for _, _, _, status in rows:
        statuses[status] = statuses.get(status, 0) + 1
    durations = sorted(r[2] for r in rows)
    other = []  # (midpoint seconds, cores used outside the load test)
    sampler = directory / "cpu.tsv"
    if sampler.exists():
        samples = [tuple(float(v) for v in line.split("\t"))
                   for line in sampler.read_text().splitlines() if line.strip()]
        for (t0, busy0, ours0), (t1, busy1, ours1) in zip(samples, samples[1:]):
            if t1 > t0:
                other.append(((t0 + t1) / 2, max(0.0, (busy1 - busy0) - (ours1 - ours0)) / CLK_TCK / (t1 - t0)))
    return {
        "other": other,
        "summary": summary,
        "rows": rows,
        "meta": meta,
        "before": before,
        "after": after,
        "transport_errors": transport,
        "statuses": statuses,
        "non2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "p50_us": percentile(durations, 50) * 1e6,
        "p99_us": percentile(durations, 99) * 1e6,
        "max_us": (durations[-1] * 1e6) if durations else float("nan"),
        "rps": summary["summary"]["requestsPerSec"],
    }


def other_row(scenario, meta):
    values = [cores for _, cores in scenario["other"]]
    if not values:
        return "| CPU used by other processes | not sampled |"
    return (f"| CPU used by processes outside the load test, mean / max per {BIN} s | "
            f"{statistics.mean(values):.2f} / {max(values):.2f} of {meta.get('nproc')} cores |")


def window_p99_us(rows, start, end):
    durations = sorted(r[2] for r in rows if start <= r[1] < end)
    return percentile(durations, 99) * 1e6, len(durations)


def bins(rows, width=BIN):
    if not rows:
        return []
    last = max(r[1] for r in rows)
    count = int(last / width) + 1
    ok = [0] * count
    bad = [0] * count
    lat = [[] for _ in range(count)]
    for _, end, duration, status in rows:
        i = int(end / width)
        if 200 <= status < 300:
            ok[i] += 1
        else:
            bad[i] += 1
        lat[i].append(duration)
    out = []
    for i in range(count):
        values = sorted(lat[i])
        out.append({
            "t": i * width,
            "ok_rate": ok[i] / width,
            "bad": bad[i],
            "p99_us": percentile(values, 99) * 1e6 if values else None,
        })
    # The last bin is partial (the run ends inside it): drop it when nearly empty.
    if len(out) > 1 and (ok[-1] + bad[-1]) < 0.2 * max(1, ok[-2] + bad[-2]):
        out.pop()
    return out


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def fmt_us(us):
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "n/a"
    if us < 10:
        return f"{us:.1f} µs"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1e6:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_cpu(us):
    return "n/a" if math.isnan(us) else f"{us:.1f} µs"


def fmt_axis_us(us):
    if us == 0:
        return "0"
    if us < 1000:
        return f"{us:g} µs"
    if us < 1e6:
        return f"{us / 1000:g} ms"
    return f"{us / 1e6:g} s"


def fmt_axis_count(v):
    return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"


def fmt_int(n):
    return f"{n:,.0f}"


def median(values):
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------------------------

class Svg:
    def __init__(self, width, height):
        self.width, self.height = width, height
        self.parts = []

    def add(self, text):
        self.parts.append(text)

    def text(self, x, y, s, size=12, anchor="start", weight="normal", fill="#222", rotate=None):
        transform = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                 f'font-weight="{weight}" fill="{fill}"{transform}>{escape(str(s))}</text>')

    def rect(self, x, y, w, h, fill, opacity=1.0, title=None):
        inner = f"<title>{escape(title)}</title>" if title else ""
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
                 f'fill="{fill}" fill-opacity="{opacity}">{inner}</rect>')

    def line(self, x1, y1, x2, y2, stroke="#999", width=1, dash=None):
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                 f'stroke="{stroke}" stroke-width="{width}"{dashes}/>')

    def polyline(self, points, stroke, width=2):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.add(f'<polyline points="{pts}" fill="none" stroke="{stroke}" stroke-width="{width}"/>')

    def circle(self, x, y, r, fill, title=None):
        inner = f"<title>{escape(title)}</title>" if title else ""
        self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{fill}">{inner}</circle>')

    def render(self):
        head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}" font-family="DejaVu Sans, Arial, sans-serif">'
                f'<rect width="100%" height="100%" fill="white"/>')
        return head + "\n" + "\n".join(self.parts) + "\n</svg>\n"


def nice_max(value):
    if value <= 0 or math.isnan(value):
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    # Steps whose quarter is a round number, since axes get 4 intervals.
    for step in (1, 1.2, 1.6, 2, 2.4, 3.2, 4, 6, 8, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def axis_y(svg, x, top, height, vmax, fmt, ticks=4):
    for i in range(ticks + 1):
        value = vmax * i / ticks
        y = top + height - height * i / ticks
        svg.line(x, y, x + 4, y, "#bbb")
        svg.text(x - 4, y + 4, fmt(value), size=10, anchor="end", fill="#555")


def bar_panel(svg, left, top, width, height, title, series, fmt_value, fmt_axis):
    """series: [(target, median, [per-round values])]"""
    svg.text(left + width / 2, top - 12, title, size=14, anchor="middle", weight="bold")
    vmax = nice_max(max([m for _, m, _ in series] + [v for _, _, vs in series for v in vs]))
    axis_y(svg, left, top, height, vmax, fmt_axis)
    for i in range(5):
        y = top + height * i / 4
        svg.line(left, y, left + width, y, "#eee")
    svg.line(left, top + height, left + width, top + height, "#666")
    slot = width / len(series)
    for i, (target, med, rounds) in enumerate(series):
        x = left + slot * i + slot * 0.18
        w = slot * 0.64
        h = height * med / vmax
        svg.rect(x, top + height - h, w, h, COLORS[target], 0.9, f"{target}: {fmt_value(med)} (median)")
        svg.text(x + w / 2, top + height - h - 5, fmt_value(med), size=11, anchor="middle", weight="bold")
        for j, value in enumerate(rounds):
            dx = (j + 1) * w / (len(rounds) + 1)
            svg.circle(x + dx, top + height - height * value / vmax, 2.5, "#222",
                       f"{target} round {j + 1}: {fmt_value(value)}")
        svg.text(x + w / 2, top + height + 16, target, size=12, anchor="middle")


def steady_chart(results, meta, path):
    svg = Svg(1200, 400)
    svg.text(600, 24, "switchyard vs nginx vs HAProxy, 3 nginx backends, 100-byte answers, "
             f"wrk -t1 -c{meta.get('conns', '50')}", size=15, anchor="middle", weight="bold")
    svg.text(600, 42, f"bars: median of {meta.get('rounds')} round(s) of {meta.get('duration')} s; "
             f"dots: each round; load generator, proxy and backends share one {meta.get('nproc')}-core "
             "machine", size=11, anchor="middle", fill="#555")
    rps = [(t, results[t]["rps"], results[t]["rounds_rps"]) for t in TARGETS]
    p99 = [(t, results[t]["p99"], results[t]["rounds_p99"]) for t in TARGETS]
    cpu = [(t, results[t]["cpu"], results[t]["rounds_cpu"]) for t in TARGETS[1:]]
    bar_panel(svg, 80, 90, 320, 250, "requests per second (c=50, higher is better)", rps,
              fmt_int, fmt_axis_count)
    bar_panel(svg, 480, 90, 320, 250, "p99 latency (c=50, lower is better)", p99,
              fmt_us, fmt_axis_us)
    bar_panel(svg, 880, 90, 280, 250, "proxy CPU per request (lower is better)", cpu,
              fmt_cpu, fmt_axis_us)
    path.write_text(svg.render())


def timeline_panel(svg, left, top, width, height, data, tmax, title, events, bad_label, other, ncpu):
    """Two stacked plots: answers/s (ok) with errors; p99 per bin."""
    svg.text(left + width / 2, top - 14, title, size=14, anchor="middle", weight="bold")
    half = (height - 40) / 2
    scale_x = width / tmax

    # Events: shaded window or vertical line, on both plots.
    for kind, a, b, label in events:
        for plot_top in (top, top + half + 40):
            if kind == "window":
                svg.rect(left + a * scale_x, plot_top, (b - a) * scale_x, half, "#f2c14e", 0.18)
            else:
                svg.line(left + a * scale_x, plot_top, left + a * scale_x, plot_top + half, "#c0392b", 2, "5,3")
        svg.text(left + a * scale_x + 4, top + 12, label, size=10, fill="#7a5b00" if kind == "window" else "#c0392b")

    # Plot 1: ok answers per second (bars), error count per bin (red bars on the same bins).
    rmax = nice_max(max([d["ok_rate"] for d in data] + [1]))
    axis_y(svg, left, top, half, rmax, fmt_axis_count)
    svg.line(left, top + half, left + width, top + half, "#666")
    svg.text(left - 58, top + half / 2, "2xx answers/s", size=10, anchor="middle", rotate=-90, fill="#555")
    bmax = max([d["bad"] for d in data] + [0])
    for d in data:
        x = left + d["t"] * scale_x
        w = BIN * scale_x * 0.85
        h = half * d["ok_rate"] / rmax
        svg.rect(x, top + half - h, w, h, "#d9622b", 0.75,
                 f"t={d['t']:.2f}s: {d['ok_rate']:.0f} 2xx/s, {d['bad']} errors")
        if d["bad"]:
            eh = max(3, half * 0.5 * d["bad"] / bmax)
            svg.rect(x, top + half - eh, w, eh, "#c0392b", 1.0, f"t={d['t']:.2f}s: {d['bad']} errors")
    svg.text(left + width, top + half + 14, bad_label, size=10, anchor="end",
             fill="#c0392b" if bmax else "#2f8f46")
    # CPU used outside the load test, on a right-hand axis of 0..ncpu cores.
    if other:
        for i in range(ncpu + 1):
            y = top + half - half * i / ncpu
            svg.line(left + width - 4, y, left + width, y, "#bbb")
            svg.text(left + width + 4, y + 4, f"{i}", size=10, fill="#555")
        svg.text(left + width + 22, top + half / 2, "other processes (cores)", size=10,
                 anchor="middle", rotate=90, fill="#555")
        points = [(left + t * scale_x, top + half - half * min(cores, ncpu) / ncpu)
                  for t, cores in other if t <= tmax]
        svg.polyline(points, "#444", 1.5)

    # Plot 2: p99 of the requests that finished in each bin.
    ptop = top + half + 40
    values = [d["p99_us"] for d in data if d["p99_us"] is not None]
    pmax = nice_max(max(values + [1]))
    axis_y(svg, left, ptop, half, pmax, fmt_axis_us)
    svg.line(left, ptop + half, left + width, ptop + half, "#666")
    svg.text(left - 58, ptop + half / 2, f"p99 per {BIN} s", size=10, anchor="middle", rotate=-90, fill="#555")
    points = [(left + (d["t"] + BIN / 2) * scale_x, ptop + half - half * d["p99_us"] / pmax)
              for d in data if d["p99_us"] is not None]
    if points:
        svg.polyline(points, "#3461a8")
    for second in range(0, int(tmax) + 1):
        x = left + second * scale_x
        svg.line(x, ptop + half, x, ptop + half + 4, "#666")
        svg.text(x, ptop + half + 16, f"{second}s", size=10, anchor="middle", fill="#555")


def scenario_chart(churn, kill, path, ncpu):
    svg = Svg(1020, 500)
    svg.text(510, 24, "switchyard under change: answers/s, errors and p99 over time (oha per-request records)",
             size=15, anchor="middle", weight="bold")
    svg.text(510, 42, "dark line, right axis: CPU used by processes outside the load test "
             "(other tenants of the machine), from /proc/stat", size=11, anchor="middle", fill="#555")
    panels = []
    if churn:
        m = churn["meta"]
        events = [("window", float(m["churn_start"]), float(m["churn_end"]),
                   f"register/deregister every {m.get('every_ms', '100')} ms")]
        panels.append((churn, f"instance churn (oha -c {m['connections']})", events))
    if kill:
        m = kill["meta"]
        events = [("line", float(m["killed_at"]), None, f"backend SIGKILLed at {float(m['killed_at']):.2f} s")]
        panels.append((kill, f"one of 3 backends killed (oha -c {m['connections']})", events))
    for i, (scenario, title, events) in enumerate(panels):
        data = bins(scenario["rows"])
        tmax = max(float(scenario["meta"]["load_seconds"]), (data[-1]["t"] + BIN) if data else 1)
        errors = scenario["non2xx"] + sum(scenario["transport_errors"].values())
        label = f"red: non-2xx per bin ({scenario['non2xx']} in all)"
        if scenario["transport_errors"]:
            label += f"; {sum(scenario['transport_errors'].values())} transport errors (not binned)"
        elif errors == 0:
            label = "no errors"
        timeline_panel(svg, 90 + i * 500, 100, 380, 350, data, tmax, title, events, label,
                       scenario["other"], ncpu)
    path.write_text(svg.render())


# --------------------------------------------------------------------------------------------
# RESULTS.md
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# TLS, HTTP/2 and gRPC rows (edge.sh)
# --------------------------------------------------------------------------------------------

EDGE_KINDS = {
    "tls": ("Keep-alive HTTPS (HTTP/1.1)", "req/s"),
    "h2": ("HTTP/2 over TLS", "req/s"),
    "hs": ("Full TLS handshakes (a new connection per request)", "handshakes/s"),
    "grpc": ("gRPC unary over h2c", "calls/s"),
}
EDGE_TARGETS = ["direct", "switchyard", "nginx", "haproxy"]
# The handshake load again, with tls_probe.py timing one client's requests on new connections.
FRESH = "fresh"


def parse_probe(path):
    """tls_probe.py's lines -> one [connected, handshake done, first byte, last byte] (ms,
    from the connect call) per request."""
    return [[float(x) * 1000 for x in line.split("\t")]
            for line in path.read_text().splitlines() if line.strip()]


def quantile(values, q):
    """Nearest-rank quantile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def fresh_section(runs, d):
    """RESULTS.md lines for the probe's requests on new TLS connections, pooled over rounds."""
    targets = [t for t in EDGE_TARGETS if (FRESH, t) in runs]
    if not targets:
        return []
    lines = ["### A request on a new TLS connection, under the handshake load", ""]
    add = lines.append
    add(f"wrk's latency on the handshake row starts when wrk writes the request, after its own "
        "handshake: the time a new connection waits for the server's handshake is not in it. "
        f"These runs repeat the handshake load ({d} s per run) while `loadtest/tls_probe.py` "
        "(Python's `ssl`, OpenSSL, TLS 1.3, no resumption) opens one connection at a time, "
        "pausing 20 ms after each (at most ~50 a second), sends one `GET` with "
        "`Connection: close` and times it from the connect call; its requests pooled over the "
        "rounds (ms). The servers' CPU is not counted here.")
    add("")
    add("| target | requests | TCP connect p50 | handshake done p50 · p99 | answer after the "
        "handshake p50 · p99 | connect → last byte p50 · p90 · p99 | wrk's latency p50 (same runs) |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals = {}
    for t in targets:
        probes = [row for _, p in runs[(FRESH, t)] for row in p["probe"]]
        if not probes:
            add(f"| {t} | 0 | | | | | |")
            continue
        connect = [r[0] for r in probes]
        handshake = [r[1] for r in probes]
        answer = [r[3] - r[1] for r in probes]
        total = [r[3] for r in probes]
        totals[t] = (quantile(total, 0.5), quantile(total, 0.99))
        wrk_p50 = median([p["p50"] for _, p in runs[(FRESH, t)]]) / 1000
        add(f"| {t} | {len(probes)} | {quantile(connect, 0.5):.2f} | "
            f"{quantile(handshake, 0.5):.2f} · {quantile(handshake, 0.99):.2f} | "
            f"{quantile(answer, 0.5):.2f} · {quantile(answer, 0.99):.2f} | "
            f"{quantile(total, 0.5):.2f} · {quantile(total, 0.9):.2f} · {quantile(total, 0.99):.2f} | "
            f"{wrk_p50:.2f} |")
    add("")
    if "switchyard" in totals and "nginx" in totals:
        (sp50, sp99), (np50, np99) = totals["switchyard"], totals["nginx"]
        add(f"switchyard vs nginx, a request on a new connection from connect to its last byte: "
            f"p50 {100 * sp50 / np50:.0f}%, p99 {100 * sp99 / np99:.0f}%.")
        add("")
    return lines


def parse_h2load(path):
    text = path.read_text()
    match = re.search(r"^finished in ([\d.]+)(\w+), ([\d.]+) req/s", text, re.M)
    if not match:
        raise ValueError(f"{path}: no 'finished in' line:\n{text}")
    out = {"rps": float(match.group(3))}
    match = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", text, re.M)
    total, _, done, succeeded, failed, errored, timeout = (int(g) for g in match.groups())
    match = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    non2xx = sum(int(g) for g in match.groups()[1:])
    out["requests"] = done
    out["errors"] = failed + errored + timeout + non2xx
    match = re.search(r"^Application protocol: (\S+)", text, re.M)
    out["protocol"] = match.group(1) if match else "?"
    durations = []
    log = path.with_suffix(".log")
    if log.exists():
        for line in log.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 3:
                durations.append(float(fields[2]))
    durations.sort()
    out["p50"] = percentile(durations, 50)
    out["p99"] = percentile(durations, 99)
    return out


def negotiated(out_dir):
    """What an OpenSSL client negotiated with each TLS listener (edge/tls.tsv), as a sentence."""
    tsv = out_dir / "edge" / "tls.tsv"
    if not tsv.exists():
        return "TLS 1.3 is what every client here negotiates."
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line]
    each = "; ".join(f"{t} {p}, {c}, {g}" for t, p, c, g in rows)
    return (f"an OpenSSL client (the library of wrk and h2load, `openssl s_client`) negotiated "
            f"{each} (nginx is told `ssl_protocols TLSv1.2 TLSv1.3`: Debian's 1.22 offers "
            f"only up to 1.2 by default).")


def edge_section(out_dir, meta, clk_tck):
    """RESULTS.md lines for the edge rows, and the medians for the summary."""
    tsv = out_dir / "edge" / "cpu.tsv"
    if not tsv.exists():
        return [], {}
    runs = {}
    for line in tsv.read_text().splitlines()[1:]:
        round_, kind, target, ticks, loadavg, other_ticks, seconds, handshakes = line.split("\t")
        path = out_dir / "edge" / f"r{round_}-{kind}-{target}.txt"
        parsed = parse_wrk(path) if kind in ("tls", "hs", FRESH) else parse_h2load(path)
        if kind == FRESH:
            parsed["probe"] = parse_probe(path.with_suffix(".probe.tsv"))
        parsed["cpu"] = int(ticks) * 1e6 / clk_tck / max(1, parsed["requests"])
        parsed["ticks"] = int(ticks)
        parsed["other"] = int(other_ticks) / clk_tck / float(seconds)
        parsed["handshakes"] = None if handshakes == "-" else int(handshakes)
        runs.setdefault((kind, target), []).append((int(round_), parsed))
    results = {}
    for (kind, target), rs in runs.items():
        values = [p for _, p in rs]
        results[(kind, target)] = {
            key: median([v[key] for v in values]) for key in ("rps", "p50", "p99", "cpu")
        }
        results[(kind, target)]["errors"] = sum(v["errors"] for v in values)
        results[(kind, target)]["rounds"] = sorted(rs, key=lambda r: r[0])
    rounds = len({r for rs in runs.values() for r, _ in rs})
    other = [p["other"] for rs in runs.values() for _, p in rs]
    d = meta.get("edge_duration", meta.get("duration"))
    c = meta.get("conns", "50")

    lines = []
    add = lines.append
    add("## TLS, HTTP/2 and gRPC")
    add("")
    add(f"switchyard, nginx and HAProxy terminate TLS with the same ECDSA P-256 certificate "
        "(made by `openssl req` at the start of the run), one worker/thread each, in front of the "
        f"same 3 backends; {negotiated(out_dir)} gRPC: one instance of "
        "`examples/grpc.rs` (tonic, `helloworld.Greeter/SayHello`), called directly or through "
        "each proxy over h2c (switchyard `protocol: h2c`, nginx `grpc_pass`, HAProxy `proto h2`). "
        f"Medians of {rounds} interleaved round(s) of {d} s per run; the load generator, the "
        "proxies and the instances share the machine's cores. CPU per request is the target's "
        "own CPU time (`/proc/<pid>/stat`) over the run divided by the requests answered; for "
        "`direct` it is the gRPC instance's own cost.")
    add("")
    add(f"- **Keep-alive HTTPS**: `wrk -t1 -c{c} -d{d}s --latency https://…/` (HTTP/1.1).")
    add(f"- **HTTP/2**: `h2load -t1 -c{c} -m10 -D {d} https://…/` (ALPN h2, 10 streams per "
        "connection); p50/p99 from h2load's per-request `--log-file`.")
    add(f"- **Full handshakes**: `wrk -t1 -c{c} -d{d}s -H 'Connection: close' https://…/`: every "
        "request opens a new connection and does a full TLS 1.3 handshake (ECDHE X25519 + ECDSA "
        "P-256 signature; wrk keeps no session, so none is resumed: checked below against "
        "switchyard's handshake counter). Handshakes/s = requests/s.")
    add(f"- **gRPC unary**: `h2load -t1 -c{c} -m10 -D {d} -d grpc-body.bin -H 'content-type: "
        "application/grpc' -H 'te: trailers' http://…/helloworld.Greeter/SayHello` (h2c prior "
        "knowledge; the body is one framed `HelloRequest`). h2load checks the HTTP status only; "
        "one call per target with the tonic client before the runs checks the gRPC answer.")
    add("")
    for kind, (title, unit) in EDGE_KINDS.items():
        targets = [t for t in EDGE_TARGETS if (kind, t) in results]
        if not targets:
            continue
        add(f"### {title}")
        add("")
        cpu_title = "CPU per handshake" if kind == "hs" else "CPU per request"
        add(f"| target | {unit} | p50 | p99 | {cpu_title} | errors |")
        add("| --- | ---: | ---: | ---: | ---: | ---: |")
        for t in targets:
            r = results[(kind, t)]
            add(f"| {t} | {fmt_int(r['rps'])} | {fmt_us(r['p50'])} | {fmt_us(r['p99'])} | "
                f"{fmt_cpu(r['cpu'])}{' (instance)' if t == 'direct' else ''} | {r['errors']} |")
        add("")
        sy = results.get((kind, "switchyard"))
        ng = results.get((kind, "nginx"))
        if kind == "hs" and sy:
            counted = [p for _, p in sy["rounds"] if p["handshakes"] is not None]
            if counted:
                add(f"Check: over the switchyard runs wrk completed "
                    f"{fmt_int(sum(p['requests'] for p in counted))} requests and "
                    "`switchyard_tls_handshakes_total{result=\"ok\"}` grew by "
                    f"{fmt_int(sum(p['handshakes'] for p in counted))}: one handshake per request "
                    "(a few more for connections cut at the end of a run).")
                add("")
        if sy and ng:
            verdict = ("meets the target (no worse than nginx)"
                       if sy["rps"] >= ng["rps"] and sy["cpu"] <= ng["cpu"]
                       else "**misses the target** (no worse than nginx)")
            add(f"switchyard vs nginx: {unit} {100 * sy['rps'] / ng['rps']:.0f}%, "
                f"p99 {100 * sy['p99'] / ng['p99']:.0f}%, {cpu_title} "
                f"{100 * sy['cpu'] / ng['cpu']:.0f}% — {verdict}.")
            add("")
    lines += fresh_section(runs, d)
    add("<details><summary>Every round (edge rows)</summary>")
    add("")
    add("| row | target | round | rate | requests | p50 | p99 | CPU ticks | CPU per request | errors | switchyard handshakes | other processes' CPU |")
    add("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind in EDGE_KINDS:
        for t in EDGE_TARGETS:
            for r, p in results.get((kind, t), {}).get("rounds", []):
                hs = "—" if p["handshakes"] is None else fmt_int(p["handshakes"])
                add(f"| {kind} | {t} | {r} | {fmt_int(p['rps'])} | {fmt_int(p['requests'])} | "
                    f"{fmt_us(p['p50'])} | {fmt_us(p['p99'])} | {p['ticks']} | {fmt_cpu(p['cpu'])} | "
                    f"{p['errors']} | {hs} | {p['other']:.2f} cores |")
    add("")
    add("</details>")
    add("")
    if other:
        add(f"During the edge runs, processes outside the load test used "
            f"{statistics.mean(other):.2f} of the {meta.get('nproc')} cores on average "
            f"({min(other):.2f} – {max(other):.2f} per run).")
        add("")
    return lines, results


def main():
    out_dir = Path(sys.argv[1])
    dest = Path(sys.argv[2])
    global CLK_TCK
    meta = read_kv(out_dir / "meta.txt")
    clk_tck = CLK_TCK = int(meta.get("clk_tck", "100"))
    versions = (out_dir / "versions.txt").read_text().strip().splitlines()
    commands = (out_dir / "commands.txt").read_text().strip().splitlines()

    cpu, load, other = {}, {}, {}
    for line in (out_dir / "steady" / "cpu.tsv").read_text().splitlines()[1:]:
        round_, target, kind, ticks, loadavg, other_ticks, seconds = line.split("\t")
        key = (int(round_), target, kind)
        cpu[key] = int(ticks)
        load[key] = loadavg
        other[key] = int(other_ticks) / clk_tck / float(seconds)

    rounds = sorted({r for r, _, _ in cpu})
    per_round = []
    results = {}
    for target in TARGETS:
        rps, p99, p50c1, cpu_us, errors = [], [], [], [], []
        for r in rounds:
            c50 = parse_wrk(out_dir / "steady" / f"r{r}-{target}-c50.txt")
            c1 = parse_wrk(out_dir / "steady" / f"r{r}-{target}-c1.txt")
            per_req = cpu[(r, target, "c50")] * 1e6 / clk_tck / max(1, c50["requests"])
            rps.append(c50["rps"])
            p99.append(c50["p99"])
            p50c1.append(c1["p50"])
            cpu_us.append(per_req)
            errors.append(c50["errors"] + c1["errors"])
            per_round.append((target, r, c50, c1, per_req, cpu[(r, target, "c50")],
                              other[(r, target, "c50")], other[(r, target, "c1")]))
        results[target] = {
            "rps": median(rps), "p99": median(p99), "p50c1": median(p50c1), "cpu": median(cpu_us),
            "rounds_rps": rps, "rounds_p99": p99, "rounds_p50c1": p50c1, "rounds_cpu": cpu_us,
            "errors": sum(errors),
        }

    direct_p50 = results["direct"]["p50c1"]
    lines = []
    add = lines.append
    add("# switchyard load test results")
    add("")
    add(f"Generated by `loadtest/run.sh` on {meta.get('date')}"
        + (" — **QUICK=1 smoke run: too short to quote**" if meta.get("quick") == "1" else "") + ".")
    add("switchyard built with " + ("profile-guided optimization (`scripts/build-pgo.sh`, "
                                    "fat LTO)" if meta.get("pgo") == "1"
                                    else "`cargo build --release` (fat LTO, no PGO)") + ". "
        "See `loadtest/README.md` for what each number means and how it is measured.")
    add("")
    spread = max(max(r["rounds_rps"]) / min(r["rounds_rps"]) for r in results.values())
    cpu_spread = max(max(results[t]["rounds_cpu"]) - min(results[t]["rounds_cpu"]) for t in TARGETS[1:])
    p50_spread = max(max(r["rounds_p50c1"]) - min(r["rounds_p50c1"]) for r in results.values())
    add(f"> **Noisy machine.** {meta.get('nproc')} cores, shared with other work while "
        f"this ran: load average **{meta.get('loadavg_start')}** at start, "
        f"{meta.get('loadavg_end', 'n/a')} at the end. wrk, the proxy under test and the backend "
        "nginx also share these cores. "
        + (f"In this run one target's c=50 RPS varied by up to {spread:.1f}× between rounds, so "
           "treat c=50 RPS and p99 differences smaller than that as noise. The steadiest columns "
           "are the CPU per request, which does not depend on how much CPU a process was given "
           f"(widest spread over rounds: {cpu_spread:.1f} µs)"
           + (f", and the pinned c=1 p50 (widest spread: {p50_spread:.0f} µs)."
              if meta.get("pin") == "1" else ".")
           if len(rounds) > 1 else "With one round there is no measure of the noise.")
        + f" During the steady-state runs, processes outside the load test used "
        f"{statistics.mean(other.values()):.2f} of the {meta.get('nproc')} cores on average "
        f"({min(other.values()):.2f} – {max(other.values()):.2f} per run, measured from "
        "`/proc/stat`). The spread over rounds is below the table.")
    add("")
    add("## Steady state")
    add("")
    add(f"Medians of {len(rounds)} interleaved round(s) (the order of targets rotates each round). "
        f"c=50: `wrk -t1 -c{meta.get('conns')} -d{meta.get('duration')}s --latency`; "
        f"c=1: `wrk -t1 -c1 -d{meta.get('c1_duration')}s --latency`. "
        "Every proxy forwards to the same 3 nginx backends (one nginx, 1 worker, 3 ports) "
        "answering a fixed 100-byte 200; each proxy runs on one thread/worker. "
        + ("The c=1 runs pin wrk, the backends and the proxy to CPU 0 (`taskset`), so no hop "
           "pays a cross-core wake-up; the c=50 runs are not pinned."
           if meta.get("pin") == "1" else
           "No CPU pinning (PIN=0): the scheduler placed every process."))
    add("")
    add("| target | c=50 RPS | c=50 p99 | c=1 p50 (added vs direct) | proxy CPU per request |")
    add("| --- | ---: | ---: | ---: | ---: |")
    for target in TARGETS:
        res = results[target]
        if target == "direct":
            p50 = fmt_us(res["p50c1"])
            cpu_cell = "— (no proxy)"
        else:
            added = res["p50c1"] - direct_p50
            p50 = f"{fmt_us(res['p50c1'])} ({'+' if added >= 0 else '−'}{fmt_us(abs(added))})"
            cpu_cell = fmt_cpu(res["cpu"])
        add(f"| {target} | {fmt_int(res['rps'])} | {fmt_us(res['p99'])} | {p50} | {cpu_cell} |")
    add("")
    if len(rounds) > 1:
        add(f"Spread over the {len(rounds)} rounds (min – max):")
        add("")
        add("| target | c=50 RPS | c=50 p99 | c=1 p50 | proxy CPU per request |")
        add("| --- | ---: | ---: | ---: | ---: |")
        for target in TARGETS:
            res = results[target]
            cpu_cell = "—" if target == "direct" else \
                f"{fmt_cpu(min(res['rounds_cpu']))} – {fmt_cpu(max(res['rounds_cpu']))}"
            add(f"| {target} | {fmt_int(min(res['rounds_rps']))} – {fmt_int(max(res['rounds_rps']))} | "
                f"{fmt_us(min(res['rounds_p99']))} – {fmt_us(max(res['rounds_p99']))} | "
                f"{fmt_us(min(res['rounds_p50c1']))} – {fmt_us(max(res['rounds_p50c1']))} | {cpu_cell} |")
        add("")
    sy = results["switchyard"]
    comparisons = []
    for other in ("nginx", "haproxy"):
        o = results[other]
        comparisons.append(
            f"vs {other}: RPS {100 * sy['rps'] / o['rps']:.0f}%, "
            f"p99 {100 * sy['p99'] / o['p99']:.0f}%, "
            f"added c=1 p50 {fmt_us(sy['p50c1'] - direct_p50)} vs {fmt_us(o['p50c1'] - direct_p50)}, "
            f"CPU/request {100 * sy['cpu'] / o['cpu']:.0f}%")
    add("switchyard relative to the others (computed from the medians above; RPS above 100% and "
        "p99/CPU below 100% favour switchyard): " + "; ".join(comparisons) + ".")
    add("")
    total_errors = sum(results[t]["errors"] for t in TARGETS)
    add(f"Errors over all steady-state runs (non-2xx answers and socket errors reported by wrk): "
        f"**{total_errors}**.")
    add("")
    add("<details><summary>Every round</summary>")
    add("")
    add("| target | round | c=50 RPS | c=50 requests | c=50 p50 | c=50 p99 | c=1 p50 | c=1 p99 | CPU ticks (c=50) | CPU per request | errors | other processes' CPU, c=50 / c=1 |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for target, r, c50, c1, per_req, ticks, other50, other1 in per_round:
        cpu_cell = fmt_cpu(per_req) + (" (backend)" if target == "direct" else "")
        add(f"| {target} | {r} | {fmt_int(c50['rps'])} | {fmt_int(c50['requests'])} | {fmt_us(c50['p50'])} | "
            f"{fmt_us(c50['p99'])} | {fmt_us(c1['p50'])} | {fmt_us(c1['p99'])} | {ticks} | {cpu_cell} | "
            f"{c50['errors'] + c1['errors']} | {other50:.2f} / {other1:.2f} cores |")
    add("")
    add(f"CPU ticks are 1/{clk_tck} s. For `direct` the CPU column is the backend nginx's own "
        "cost, shown for scale only. *Other processes' CPU* is the machine's busy time "
        "(`/proc/stat`) minus that of every process of the load test (wrk, proxies, backends, "
        "Consul), averaged over the run, in cores.")
    add("")
    add("</details>")
    add("")
    add("![RPS, p99 and proxy CPU per request per target](chart.svg)")
    add("")

    edge_lines, _ = edge_section(out_dir, meta, clk_tck)
    lines.extend(edge_lines)

    # Scenarios
    churn = kill = None
    if (out_dir / "churn" / "oha.json").exists():
        churn = load_scenario(out_dir / "churn")
        churn["meta"]["every_ms"] = meta.get("churn_every_ms", "100")
    if (out_dir / "kill" / "oha.json").exists():
        kill = load_scenario(out_dir / "kill")
    add("## Scenarios (through switchyard)")
    add("")
    add("Both run oha against switchyard and keep its per-request records (`--db-url`), so "
        "throughput, errors and p99 can be drawn over time (bins of "
        f"{BIN} s, by completion time). An *error* is a non-2xx answer or a transport error seen "
        "by oha.")
    add("")
    if churn:
        m = churn["meta"]
        start, end = float(m["churn_start"]), float(m["churn_end"])
        in_p99, in_n = window_p99_us(churn["rows"], start, end)
        out_rows = [r for r in churn["rows"] if not start <= r[1] < end]
        out_p99 = percentile(sorted(r[2] for r in out_rows), 99) * 1e6
        updates = metric_delta(churn["before"], churn["after"], "switchyard_table_updates_total", service="bench")
        errs = churn["non2xx"] + sum(churn["transport_errors"].values())
        add("### Instance churn")
        add("")
        add(f"`oha -z {m['load_seconds']}s -c {m['connections']} -w` through switchyard; from "
            f"second {start:.2f} to {end:.2f}, one extra instance (`bench-churn`, a fourth nginx "
            f"port) is registered and deregistered alternately every {churn['meta']['every_ms']} ms "
            "via the Consul agent API.")
        add("")
        add("| measure | value |")
        add("| --- | ---: |")
        add(f"| Consul writes (register + deregister) | {m['actions']} ({m['failed_actions']} failed) |")
        add(f"| switchyard routing-table updates in that time | {updates:.0f} |")
        add(f"| requests served by the churning instance | {fmt_int(int(m['churn_instance_hits']))} |")
        add(f"| requests answered | {fmt_int(len(churn['rows']))} ({fmt_int(churn['rps'])}/s) |")
        add(f"| **errors** | **{errs}**"
            + (f" (non-2xx {churn['non2xx']}, transport {churn['transport_errors']})" if errs else "") + " |")
        add(f"| p50 / **p99** / max, whole run | {fmt_us(churn['p50_us'])} / **{fmt_us(churn['p99_us'])}** / {fmt_us(churn['max_us'])} |")
        add(f"| p99 inside the churn window / outside it | {fmt_us(in_p99)} ({fmt_int(in_n)} req) / {fmt_us(out_p99)} |")
        add(other_row(churn, meta))
        add("")
    if kill:
        m = kill["meta"]
        killed = float(m["killed_at"])
        before_p99, before_n = window_p99_us(kill["rows"], 0, killed)
        after1_p99, after1_n = window_p99_us(kill["rows"], killed, killed + 1)
        rest_p99, _ = window_p99_us(kill["rows"], killed + 1, 1e9)
        retries = metric_delta(kill["before"], kill["after"], "switchyard_retries_total", service="bench")
        codes = codes_delta(kill["before"], kill["after"])
        errs = kill["non2xx"] + sum(kill["transport_errors"].values())
        add("### Backend killed under load")
        add("")
        add(f"3 backends (`bench-1`, `bench-2` and `bench-victim`, the last one its own nginx); "
            f"`oha -z {m['load_seconds']}s -c {m['connections']} -w` through switchyard; the victim "
            f"nginx (master and worker) gets SIGKILL at {killed:.2f} s and stays registered in "
            "Consul, so switchyard keeps picking it and must retry elsewhere.")
        add("")
        add("| measure | value |")
        add("| --- | ---: |")
        add(f"| requests answered | {fmt_int(len(kill['rows']))} ({fmt_int(kill['rps'])}/s) |")
        add(f"| **errors** | **{errs}**"
            + (f" (non-2xx {kill['non2xx']}, transport {kill['transport_errors']})" if errs else "") + " |")
        add(f"| p50 / **p99** / max, whole run | {fmt_us(kill['p50_us'])} / **{fmt_us(kill['p99_us'])}** / {fmt_us(kill['max_us'])} |")
        add(f"| p99 before the kill / first second after / the rest | {fmt_us(before_p99)} / {fmt_us(after1_p99)} ({fmt_int(after1_n)} req) / {fmt_us(rest_p99)} |")
        add(f"| switchyard retries (`switchyard_retries_total`) | {retries:.0f} |")
        add(f"| switchyard answers by status (`switchyard_requests_total`) | "
            + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + " |")
        add(f"| instances switchyard routes to afterwards | {m['routes_after']} |")
        add(other_row(kill, meta))
        add("")
    if churn or kill:
        add("![Scenarios over time](scenarios.svg)")
        add("")

    add("## Versions and machine")
    add("")
    for v in versions:
        name, _, rest = v.partition(": ")
        add(f"- {name}: `{rest}`")
    add(f"- machine: {meta.get('nproc')} cores, {meta.get('cpu_model')}, {meta.get('mem')} RAM, "
        f"{meta.get('os')}, {meta.get('kernel')}")
    add(f"- load average at start / end: {meta.get('loadavg_start')} / {meta.get('loadavg_end', 'n/a')}")
    add("")
    add("## Exact commands")
    add("")
    add("Ports are free loopback ports picked at start; the generated configs are below.")
    add("")
    add("```sh")
    knobs = [k for k, on in (("QUICK=1", meta.get("quick") == "1"), ("PGO=1", meta.get("pgo") == "1")) if on]
    add(" ".join(knobs + ["bash loadtest/run.sh"]))
    add("```")
    add("")
    add("<details><summary>Every load command, in order</summary>")
    add("")
    add("```sh")
    lines.extend(commands)
    add("```")
    add("")
    add("</details>")
    add("")
    for name, title, lang in (("switchyard.yaml", "switchyard config", "yaml"),
                              ("nginx-proxy.conf", "nginx reverse proxy config", "nginx"),
                              ("haproxy.cfg", "HAProxy config", ""),
                              ("backends.conf", "backend nginx config", "nginx"),
                              ("victim.conf", "victim backend config (kill scenario)", "nginx")):
        path = out_dir / name
        if not path.exists():
            continue
        add(f"<details><summary>{title} ({name})</summary>")
        add("")
        add(f"```{lang}")
        lines.extend(path.read_text().rstrip().splitlines())
        add("```")
        add("")
        add("</details>")
        add("")

    (dest / "RESULTS.md").write_text("\n".join(lines).rstrip() + "\n")
    steady_chart(results, meta, dest / "chart.svg")
    scenario_chart(churn, kill, dest / "scenarios.svg", int(meta.get("nproc", "2")))


if __name__ == "__main__":
    main()
