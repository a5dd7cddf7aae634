"""The load-test report: latency percentiles, throughput, goodput, speedups over the baseline, plots, and
the check of the client's numbers against each server's /metrics.

Contract: a run directory holds ``run.json`` (what was run: profile, SLOs, variants, baseline, bounds,
tolerances), ``requests.csv`` (one row per request as the locustfile logs it, plus ``variant`` and
``concurrency``) and ``levels.json`` (per variant and concurrency: the bounds, locust's exit code and
the server's /metrics deltas from :func:`loadtests.promtext.server_deltas`). :func:`write_report`
reads them and writes ``report.md``, ``latency_vs_concurrency.png``, ``throughput_vs_concurrency.png``
and ``summary.json`` next to them; ``python -m loadtests.report RUN_DIR`` does the same and prints the
tables and one JSON line.

Definitions (those of ``vllm bench serve``): percentiles over the successful requests of a level
(numpy's linear interpolation); the level's wall time runs from its first request's start to its last
request's end; throughput = requests / wall and output tokens / wall; goodput = requests that met both
the TTFT and the TPOT SLO / wall (a one-token answer has no TPOT and needs only the TTFT SLO). Speedups
compare each variant with the baseline at the same concurrency: throughput and goodput as
variant / baseline, latencies as baseline / variant, so above 1 always means the variant is better.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCY_PNG, THROUGHPUT_PNG = "latency_vs_concurrency.png", "throughput_vs_concurrency.png"
DEFAULT_TOLERANCE = {"ttft_ms": 50.0, "e2e_ms": 50.0, "itl_ms": 5.0, "rel": 0.25}


@dataclass
class LevelStats:
    """Client-side results of one variant at one concurrency."""

    variant: str
    concurrency: int
    requests: int
    failed: int
    output_tokens: int
    wall_s: float
    ttft_ms: dict[int, float]
    tpot_ms: dict[int, float]
    itl_mean_ms: float
    e2e_mean_ms: float
    ttft_mean_ms: float
    token_weighted_tpot_ms: float  # sum(e2e - ttft) / sum(tokens - 1): comparable to the server's mean ITL
    req_per_s: float
    tok_per_s: float
    goodput_req_per_s: float
    goodput_frac: float


@dataclass
class Check:
    """One client-vs-server comparison."""

    variant: str
    concurrency: int
    quantity: str
    client: float | None
    server: float | None
    tolerance: str
    ok: bool


def read_requests(path: Path) -> list[dict]:
    """The rows of ``requests.csv`` with numbers parsed (empty fields become None)."""
    ints = {"concurrency", "index", "max_tokens", "ok", "prompt_tokens", "output_tokens", "chunks"}
    floats = {"start_unix", "ttft_ms", "e2e_ms", "tpot_ms", "itl_mean_ms"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict = dict(raw)
            for key in ints | floats:
                if key in row:
                    row[key] = None if row[key] in ("", None) else (int(row[key]) if key in ints else float(row[key]))
            row["itl_ms"] = [float(x) for x in (raw.get("itl_ms") or "").split()]
            rows.append(row)
    return rows


def _pct(values: list[float]) -> dict[int, float]:
    if not values:
        return {p: float("nan") for p in PERCENTILES}
    return {p: float(np.percentile(values, p)) for p in PERCENTILES}


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def level_stats(variant: str, concurrency: int, rows: list[dict], slo: dict) -> LevelStats:
    """The client-side statistics of one level's rows (see the module docstring for the definitions)."""
    ok = [r for r in rows if r["ok"]]
    starts = [r["start_unix"] for r in ok]
    ends = [r["start_unix"] + r["e2e_ms"] / 1000 for r in ok]
    wall = (max(ends) - min(starts)) if ok else float("nan")
    tokens = sum(r["output_tokens"] for r in ok)
    tpots = [r["tpot_ms"] for r in ok if r["tpot_ms"] is not None]
    good = [r for r in ok
            if r["ttft_ms"] <= slo["ttft_ms"] and (r["tpot_ms"] is None or r["tpot_ms"] <= slo["tpot_ms"])]
    gaps = [g for r in ok for g in r["itl_ms"]]
    decode_ms = sum(r["e2e_ms"] - r["ttft_ms"] for r in ok if r["output_tokens"] > 1)
    decode_tokens = sum(r["output_tokens"] - 1 for r in ok if r["output_tokens"] > 1)
    per_s = (lambda x: x / wall) if ok and wall > 0 else (lambda x: float("nan"))
    return LevelStats(variant, concurrency, len(ok), len(rows) - len(ok), tokens, wall,
                      _pct([r["ttft_ms"] for r in ok]), _pct(tpots), _mean(gaps),
                      _mean([r["e2e_ms"] for r in ok]), _mean([r["ttft_ms"] for r in ok]),
                      decode_ms / decode_tokens if decode_tokens else float("nan"),
                      per_s(len(ok)), per_s(tokens), per_s(len(good)), len(good) / len(ok) if ok else float("nan"))


def _close(client_ms: float, server_ms: float | None, abs_ms: float, rel: float) -> bool:
    return server_ms is not None and abs(client_ms - server_ms) <= abs_ms + rel * max(client_ms, server_ms)


def cross_check(stats: LevelStats, server: dict, tol: dict) -> list[Check]:
    """The level's client numbers against the server's /metrics deltas: counts exactly, means within tolerance."""
    v, c = stats.variant, stats.concurrency
    out = [Check(v, c, "finished requests", stats.requests, server.get("requests"), "equal",
                 server.get("requests") == stats.requests),
           Check(v, c, "generated tokens", stats.output_tokens, server.get("generation_tokens"), "equal",
                 server.get("generation_tokens") == stats.output_tokens)]
    ms = lambda s: None if s is None else 1000 * s  # noqa: E731
    for quantity, client, server_ms, abs_key in (
            ("mean TTFT (ms)", stats.ttft_mean_ms, ms(server.get("ttft_mean_s")), "ttft_ms"),
            ("mean e2e latency (ms)", stats.e2e_mean_ms, ms(server.get("e2e_mean_s")), "e2e_ms"),
            ("mean inter-token latency (ms)", stats.token_weighted_tpot_ms, ms(server.get("itl_mean_s")), "itl_ms")):
        text = f"+-({tol[abs_key]:g} ms + {tol['rel']:.0%})"
        out.append(Check(v, c, quantity, client, server_ms, text, _close(client, server_ms, tol[abs_key], tol["rel"])))
    return out


def speedups(stats: list[LevelStats], baseline: str) -> list[dict]:
    """Each non-baseline variant against the baseline at the same concurrency (above 1: the variant is better)."""
    base = {s.concurrency: s for s in stats if s.variant == baseline}
    ratio = lambda a, b: a / b if b and b == b and a == a else float("nan")  # noqa: E731 (nan-safe)
    out = []
    for s in stats:
        b = base.get(s.concurrency)
        if s.variant == baseline or b is None:
            continue
        out.append({"variant": s.variant, "concurrency": s.concurrency,
                    "throughput": ratio(s.tok_per_s, b.tok_per_s),
                    "goodput": ratio(s.goodput_req_per_s, b.goodput_req_per_s),
                    "ttft_p50": ratio(b.ttft_ms[50], s.ttft_ms[50]), "tpot_p50": ratio(b.tpot_ms[50], s.tpot_ms[50]),
                    "tpot_p90": ratio(b.tpot_ms[90], s.tpot_ms[90])})
    return out


# -- rendering ------------------------------------------------------------------------------------
def _f(x: float, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def results_table(stats: list[LevelStats]) -> str:
    head = ("| variant | conc | reqs | TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | req/s | out tok/s "
            "| goodput req/s (share) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for s in stats:
        failed = f" ({s.failed} failed)" if s.failed else ""
        lines.append(f"| {s.variant} | {s.concurrency} | {s.requests}{failed} | "
                     f"{' / '.join(_f(s.ttft_ms[p], 0) for p in PERCENTILES)} | "
                     f"{' / '.join(_f(s.tpot_ms[p]) for p in PERCENTILES)} | {_f(s.req_per_s, 2)} | "
                     f"{_f(s.tok_per_s)} | {_f(s.goodput_req_per_s, 2)} ({_f(100 * s.goodput_frac, 0)}%) |")
    return "\n".join(lines)


def speedup_table(rows: list[dict], baseline: str) -> str:
    if not rows:
        return f"(no variant besides the baseline {baseline})"
    lines = [f"| variant vs {baseline} | conc | throughput | goodput | TTFT p50 | TPOT p50 | TPOT p90 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        x = lambda v: "-" if v != v else f"{v:.2f}x"  # noqa: E731 (nan: a ratio to zero)
        lines.append(f"| {r['variant']} | {r['concurrency']} | **{x(r['throughput'])}** | {x(r['goodput'])} "
                     f"| {x(r['ttft_p50'])} | {x(r['tpot_p50'])} | {x(r['tpot_p90'])} |")
    if any(r["goodput"] != r["goodput"] for r in rows):
        lines.append(f"\n'-': no ratio, the {baseline} goodput was 0 (no request met both SLOs).")
    return "\n".join(lines)


def check_table(checks: list[Check]) -> str:
    lines = ["| variant | conc | quantity | client | server /metrics | tolerance | |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        digits = 0 if c.tolerance == "equal" else 1
        lines.append(f"| {c.variant} | {c.concurrency} | {c.quantity} | {_f(c.client, digits)} | "
                     f"{_f(c.server, digits)} | {c.tolerance} | {'ok' if c.ok else '**MISMATCH**'} |")
    return "\n".join(lines)


def plot(stats: list[LevelStats], out_dir: Path) -> list[Path]:
    """The two PNGs: latency vs concurrency (TTFT, TPOT) and throughput vs concurrency (tokens, goodput)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    levels = sorted({s.concurrency for s in stats})
    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def concurrency_axis(ax) -> None:
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(levels, labels=[str(c) for c in levels])

    variants = list(dict.fromkeys(s.variant for s in stats))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    def series(v: str, f) -> tuple[list[int], list[float]]:
        mine = [s for s in stats if s.variant == v]
        return [s.concurrency for s in mine], [f(s) for s in mine]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "tpot_ms", "time per output token")):
        for v in variants:
            for p, style in ((50, "-o"), (90, "--^"), (99, ":s")):
                xs, ys = series(v, lambda s: getattr(s, key)[p])
                ax.plot(xs, ys, style, color=colors[v], label=f"{v} p{p}", markersize=4)
        ax.set(xlabel="concurrency (users)", ylabel="ms", title=title, yscale="log")
        concurrency_axis(ax)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=len(variants))
    fig.tight_layout()
    latency = out_dir / LATENCY_PNG
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title, unit in ((axes[0], "tok_per_s", "output throughput", "output tokens/s"),
                                 (axes[1], "goodput_req_per_s", "goodput (requests meeting both SLOs)", "requests/s")):
        for v in variants:
            xs, ys = series(v, lambda s: getattr(s, key))
            ax.plot(xs, ys, "-o", color=colors[v], label=v)
        ax.set(xlabel="concurrency (users)", ylabel=unit, title=title)
        concurrency_axis(ax)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    throughput = out_dir / THROUGHPUT_PNG
    fig.savefig(throughput, dpi=110)
    plt.close(fig)
    return [latency, throughput]


# -- the whole report -----------------------------------------------------------------------------
@dataclass
class Report:
    """Everything the report states, computed from a run directory."""

    run: dict
    stats: list[LevelStats]
    speedups: list[dict]
    checks: list[Check]

    @property
    def checks_ok(self) -> bool:
        return all(c.ok for c in self.checks)


def build_report(run_dir: Path) -> Report:
    """Read a run directory (see the module docstring) and compute the report."""
    run = json.loads((run_dir / "run.json").read_text())
    levels = json.loads((run_dir / "levels.json").read_text())
    rows = read_requests(run_dir / "requests.csv")
    slo = run["slo"]
    tol = {**DEFAULT_TOLERANCE, **run.get("tolerance", {})}
    stats, checks = [], []
    for level in levels:
        v, c = level["variant"], int(level["concurrency"])
        s = level_stats(v, c, [r for r in rows if r["variant"] == v and r["concurrency"] == c], slo)
        stats.append(s)
        if level.get("server"):
            checks.extend(cross_check(s, level["server"], tol))
    order = {v: i for i, v in enumerate(run.get("variant_order") or dict.fromkeys(s.variant for s in stats))}
    stats.sort(key=lambda s: (order.get(s.variant, len(order)), s.concurrency))
    checks.sort(key=lambda ch: (order.get(ch.variant, len(order)), ch.concurrency))
    return Report(run, stats, speedups(stats, run["baseline"]), checks)


def _bounds(b: dict) -> str:
    return (f"{b.get('requests', '?')} requests, {b.get('seconds', '?')} s, "
            f"after {b.get('warmup_requests', '?')} warm-up requests per server")


def render_markdown(report: Report) -> str:
    run, slo = report.run, report.run["slo"]
    lines = [f"# Load test: {', '.join(run.get('variant_order', []))} (profile `{run['profile']['name']}`)", ""]
    if run.get("command"):
        lines += [f"Command: `{run['command']}`", ""]
    facts = run.get("facts", {})
    if facts:
        lines += ["Run: " + ", ".join(f"{k} {v}" for k, v in facts.items()), ""]
    lines += [f"Profile: {run['profile'].get('description', '')} (seed {run['profile'].get('seed')}). "
              f"SLOs for goodput: TTFT <= {slo['ttft_ms']:g} ms and TPOT <= {slo['tpot_ms']:g} ms. "
              f"Bounds per level: {_bounds(run.get('bounds', {}))}.", ""]
    for v in run.get("variants", []):
        lines.append(f"- `{v['name']}`: `{v['checkpoint']}` {' '.join(v.get('server_args', []))}".rstrip())
    lines += ["", "## Results (client side)", "", results_table(report.stats), "",
              f"## Speedup over `{run['baseline']}` (same concurrency, same run)", "",
              speedup_table(report.speedups, run["baseline"]), "",
              f"![latency vs concurrency]({LATENCY_PNG})", "", f"![throughput vs concurrency]({THROUGHPUT_PNG})", "",
              "## Cross-check against each server's /metrics", "",
              "Counters and histogram sums scraped before and after each level; the client's mean inter-token "
              "latency is token-weighted, sum(e2e - TTFT) / sum(tokens - 1), as the server's histogram is. "
              f"Verdict: **{'all within tolerance' if report.checks_ok else 'MISMATCH (see rows)'}**.", "",
              check_table(report.checks), ""]
    return "\n".join(lines)


def _clean(x):
    """``x`` with NaN turned into None, so the JSON is standard."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def summary(report: Report) -> dict:
    """The report as one JSON-able dict (NaN as null)."""
    return _clean({"report": "loadtest", "baseline": report.run["baseline"], "profile": report.run["profile"]["name"],
            "checks_ok": report.checks_ok, "speedups": report.speedups,
            "levels": [asdict(s) for s in report.stats],
            "checks": [asdict(c) for c in report.checks]})


def write_report(run_dir: Path) -> Report:
    """Compute the report of ``run_dir`` and write report.md, the two PNGs and summary.json into it."""
    report = build_report(run_dir)
    (run_dir / "report.md").write_text(render_markdown(report))
    plot(report.stats, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary(report), indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the report of a load-test run directory.")
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    report = write_report(args.run_dir)
    print(results_table(report.stats))
    print()
    print(speedup_table(report.speedups, report.run["baseline"]))
    print()
    print(check_table(report.checks))
    print(json.dumps(summary(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
