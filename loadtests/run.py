"""The load-test driver: a baseline and compressed variants served side by side on 127.0.0.1, the same
locust profile against each at several concurrency levels, one report.

    python -m loadtests.run                                   # SmolLM2 dense vs Wanda 70%, profile chat, 1 4 8 users
    python -m loadtests.run --variants dense=smollm2-135m-instruct sparse=out/wanda-70 flap=out/flap-50 \\
        --concurrency 1 4 8 16 --max-time-s 60 --profile chat
    make loadtest LOADTEST_ARGS="--concurrency 1 4"

Contract: every variant is ``NAME=CHECKPOINT`` (a checkpoint directory or a bundled model name),
optionally followed by sparse-serve flags for that server only (``"dense-kernel=out/w70 --dense"``);
the first variant (or ``--baseline``) is what speedups are measured against, so adding a variant is
all it takes to add a row. All servers start at once on loopback ports (``--host`` must be a loopback
address: the driver refuses anything else) and are each warmed up; then for each concurrency level,
each variant in turn runs one headless locust process (``-u C`` closed-loop users) bounded by
``max(min_requests, requests_per_user * C)`` requests and ``--max-time-s`` seconds. The servers'
/metrics are scraped before and after every level (once they are idle) for the cross-check. The run
directory (default ``loadtests/results/<profile>-<time>``) receives ``run.json``, ``requests.csv``,
``levels.json``, locust's CSV files and logs, the servers' logs, and the report of
:mod:`loadtests.report`. Servers are stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field

from compress.cliutil import add_config_flags, config_from_args
from loadtests.hosts import TargetRefused, check_target
from loadtests.profile import Profile, load_profile
from loadtests.promtext import Snapshot, scrape, server_deltas
from loadtests.report import DEFAULT_TOLERANCE, check_table, results_table, speedup_table, summary, write_report
from loadtests.sse import LOG_COLUMNS

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DENSE = "smollm2-135m-instruct"
WANDA70 = Path.home() / ".cache" / "sparse-serve" / "bench" / "smollm2-wanda-70"
FLAP50 = Path.home() / ".cache" / "sparse-serve" / "bench" / "smollm2-flap-50"


class DriverConfig(BaseModel):
    """What to compare, how hard and how long (one flag per field)."""

    model_config = ConfigDict(extra="forbid")

    variants: list[str] = Field(default_factory=list, description=(
        "NAME=CHECKPOINT [sparse-serve flags], baseline first; default: dense=smollm2-135m-instruct, "
        f"sparse=the Wanda 70%% SmolLM2 in {WANDA70} and flap=the FLAP 50%% SmolLM2 in {FLAP50} "
        "(each pruned there if missing, about 3 minutes)"))
    baseline: str | None = Field(None, description="variant the speedups are measured against (default: the first)")
    profile: str = Field("chat", description="load profile: a name under loadtests/profiles or a YAML path")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 8], description="closed-loop users per level")
    requests_per_user: int = Field(4, ge=1, description="request cap per level = max(min_requests, this x users)")
    min_requests: int = Field(8, ge=1, description="smallest request cap of a level")
    max_time_s: float = Field(60.0, gt=0, description="time cap of a level (locust --run-time)")
    stop_timeout_s: float = Field(60.0, ge=0, description="at the time cap, how long running requests may finish")
    warmup_requests: int = Field(4, ge=0, description="requests sent to each server before measuring")
    host: str = Field("127.0.0.1", description="address the servers bind and the load goes to (loopback only)")
    server_args: str = Field("--max-num-seqs 16", description="sparse-serve flags for every server (one string)")
    server_cpus: list[int] | None = Field(None, description=(
        "pin the servers to these CPUs, with OMP_NUM_THREADS = their number (default: no pinning)"))
    client_cpus: list[int] | None = Field(None, description="pin the locust processes to these CPUs")
    startup_timeout_s: float = Field(900.0, gt=0, description="how long a server may take to become healthy")
    slo_ttft_ms: float | None = Field(None, gt=0, description="goodput TTFT target (default: the profile's)")
    slo_tpot_ms: float | None = Field(None, gt=0, description="goodput TPOT target (default: the profile's)")
    tolerance_rel: float = Field(DEFAULT_TOLERANCE["rel"], ge=0, description="cross-check relative tolerance")
    out: str | None = Field(None, description="run directory (default: loadtests/results/<profile>-<time>)")


@dataclass
class Variant:
    """One server to measure: its name (also the metrics label and model name), checkpoint and flags."""

    name: str
    checkpoint: str
    server_args: list[str] = field(default_factory=list)


def parse_variant(spec: str) -> Variant:
    """``"NAME=CHECKPOINT [flags...]"`` -> :class:`Variant`."""
    head, *flags = shlex.split(spec)
    name, sep, checkpoint = head.partition("=")
    if not sep or not name or not checkpoint:
        raise ValueError(f"a variant is NAME=CHECKPOINT [sparse-serve flags], got {spec!r}")
    if not all(ch.isalnum() or ch in "-_." for ch in name):
        raise ValueError(f"variant name {name!r}: use letters, digits, '-', '_' or '.'")
    return Variant(name, os.path.expanduser(checkpoint), flags)


def ensure_checkpoint(out: Path, command: list[str], done_file: str) -> None:
    """Run ``sparse-compress COMMAND... -o OUT`` unless OUT has ``done_file``, the job's last output (resumes)."""
    if (out / done_file).exists():
        return
    print(f"building {out} (first run only): sparse-compress {' '.join(command)}", flush=True)
    resume = ["--resume"] if out.with_name(out.name + ".partial").exists() else []
    subprocess.run([sys.executable, "-m", "compress.cli", *command, "-o", str(out), *resume], check=True, cwd=REPO)


def default_variants() -> list[Variant]:
    """SmolLM2 dense, Wanda 70% and FLAP 50% (both pruned into the cache the first time)."""
    ensure_checkpoint(WANDA70, ["prune", DEFAULT_DENSE, "--method", "wanda", "--sparsity", "0.7"],
                      "prune_report.json")
    ensure_checkpoint(FLAP50, ["flap", DEFAULT_DENSE, "--recipe", str(REPO / "recipes" / "flap_50.yaml")],
                      "structured_report.json")
    return [Variant("dense", DEFAULT_DENSE), Variant("sparse", str(WANDA70)), Variant("flap", str(FLAP50))]


def pin(cpus: list[int] | None):
    """A ``preexec_fn`` that pins the child process to ``cpus`` (None: no pinning)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """One ``sparse-serve`` subprocess on a loopback port; :meth:`stop` drains it (SIGTERM, then SIGKILL)."""

    def __init__(self, variant: Variant, host: str, common_args: list[str], log_dir: Path,
                 cpus: list[int] | None = None):
        self.variant, self.port = variant, free_port(host)
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"
        self.log = open(log_dir / f"server-{variant.name}.log", "w")
        cmd = [sys.executable, "-m", "sparse_serve.cli", variant.checkpoint, "--host", host, "--port", str(self.port),
               "--variant", variant.name, "--served-model-name", variant.name, "--log-level", "warning",
               *common_args, *variant.server_args]
        self.log.write(f"$ {shlex.join(cmd)}\n")
        self.log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus))} if cpus else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=pin(cpus))

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.variant.name} exited with {self.proc.returncode}: "
                                   f"see {self.log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise TimeoutError(f"server {self.variant.name} was not healthy after {timeout:.0f} s: see {self.log.name}")

    def wait_idle(self, timeout: float = 120.0) -> Snapshot:
        """A /metrics snapshot taken once no request runs or waits (so every counter is final)."""
        labels = {"variant": self.variant.name}
        deadline = time.monotonic() + timeout
        while True:
            snap = scrape(self.url)
            busy = snap.total("vllm:num_requests_running", labels) + snap.total("vllm:num_requests_waiting", labels)
            if busy == 0 or time.monotonic() > deadline:
                return snap
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@contextlib.contextmanager
def running_servers(variants: list[Variant], cfg: DriverConfig, log_dir: Path) -> Iterator[dict[str, Server]]:
    """All variants' servers, started together and healthy; stopped on exit whatever happened."""
    servers: dict[str, Server] = {}
    try:
        for v in variants:
            servers[v.name] = Server(v, cfg.host, shlex.split(cfg.server_args), log_dir, cfg.server_cpus)
        for s in servers.values():
            s.wait_healthy(cfg.startup_timeout_s)
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def warm_up(server: Server, profile: Profile, n: int) -> None:
    """``n`` requests of the profile (two at a time), read to the end; raises if any fails."""
    if n <= 0:
        return
    plan = profile.plan()

    def one(i: int) -> None:
        body = plan[i % len(plan)].body(server.variant.name, profile)
        with httpx.stream("POST", server.url + plan[i % len(plan)].path, json=body, timeout=600) as r:
            r.raise_for_status()
            for _ in r.iter_lines():
                pass

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(n)))


def request_cap(cfg: DriverConfig, users: int) -> int:
    return max(cfg.min_requests, cfg.requests_per_user * users)


def run_locust(server: Server, profile_arg: str, users: int, cap: int, cfg: DriverConfig,
               out: Path) -> tuple[int, Path]:
    """One bounded headless locust run against ``server``; (exit code, its request log)."""
    stem = out / "locust" / f"{server.variant.name}_c{users}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    log = stem.with_name(stem.name + "_requests.csv")
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", str(max(users, 100)),
           "--run-time", f"{int(round(cfg.max_time_s))}s", "--stop-timeout", f"{int(round(cfg.stop_timeout_s))}",
           "--host", server.url, "--load-profile", profile_arg, "--max-requests", str(cap),
           "--model", server.variant.name,
           "--request-log", str(log), "--csv", str(stem), "--only-summary", "--loglevel", "WARNING"]
    with open(stem.with_name(stem.name + "_locust.log"), "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, preexec_fn=pin(cfg.client_cpus),
                              timeout=cfg.max_time_s + cfg.stop_timeout_s + 120)
    return proc.returncode, log


def append_requests(dest: Path, variant: str, users: int, log: Path) -> int:
    """Copy a locust request log into the run's requests.csv with ``variant`` and ``concurrency``; rows copied."""
    new = not dest.exists()
    rows = list(csv.DictReader(open(log, newline=""))) if log.exists() else []
    with open(dest, "a", newline="") as f:
        writer = csv.DictWriter(f, ["variant", "concurrency", *LOG_COLUMNS])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"variant": variant, "concurrency": users, **row})
    return len(rows)


def git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    return "unknown"


def run_facts() -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "cpus": os.cpu_count(), "usable cpus": len(os.sched_getaffinity(0)),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "python": platform.python_version(),
            "locust": metadata.version("locust")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, DriverConfig)
    return p


def run(cfg: DriverConfig, command: str = "") -> Path:
    """Run the whole comparison (module docstring); returns the run directory with its report."""
    check_target(f"http://{'[' + cfg.host + ']' if ':' in cfg.host else cfg.host}:1")  # loopback only, no override
    profile = load_profile(cfg.profile)
    variants = [parse_variant(v) for v in cfg.variants] if cfg.variants else default_variants()
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ: {names}")
    baseline = cfg.baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {names}")
    out = Path(cfg.out) if cfg.out else RESULTS / f"{profile.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.csv").unlink(missing_ok=True)
    slo = {"ttft_ms": cfg.slo_ttft_ms or profile.slo.ttft_ms, "tpot_ms": cfg.slo_tpot_ms or profile.slo.tpot_ms}
    run_info = {"command": command, "profile": profile.model_dump(), "slo": slo, "baseline": baseline,
                "variant_order": names, "concurrency": cfg.concurrency,
                "variants": [{"name": v.name, "checkpoint": v.checkpoint,
                              "server_args": shlex.split(cfg.server_args) + v.server_args} for v in variants],
                "bounds": {"requests": f"max({cfg.min_requests}, {cfg.requests_per_user} x users)",
                           "seconds": cfg.max_time_s, "warmup_requests": cfg.warmup_requests},
                "tolerance": {**DEFAULT_TOLERANCE, "rel": cfg.tolerance_rel},
                "facts": {**run_facts(), "server cpus": cfg.server_cpus or "all",
                          "client cpus": cfg.client_cpus or "all"}}
    (out / "run.json").write_text(json.dumps(run_info, indent=1))
    levels = []
    with running_servers(variants, cfg, out) as servers:
        for server in servers.values():
            print(f"warming up {server.variant.name} ({server.url})", flush=True)
            warm_up(server, profile, cfg.warmup_requests)
        for users in cfg.concurrency:
            for name in names:  # A, B, A, B: every variant meets the machine in the same state
                server, cap = servers[name], request_cap(cfg, users)
                labels = {"variant": name}
                before = server.wait_idle()
                t0 = time.monotonic()
                rc, log = run_locust(server, cfg.profile, users, cap, cfg, out)
                wall = time.monotonic() - t0
                after = server.wait_idle()
                n = append_requests(out / "requests.csv", name, users, log)
                log.unlink(missing_ok=True)  # now in requests.csv
                print(f"{name:>12} c={users:<3} {n} requests in {wall:.1f} s (locust exit {rc})", flush=True)
                levels.append({"variant": name, "concurrency": users, "max_requests": cap, "max_time_s": cfg.max_time_s,
                               "locust_exit_code": rc, "locust_wall_s": wall,
                               "server": server_deltas(before, after, labels)})
                (out / "levels.json").write_text(json.dumps(levels, indent=1))
    run_info["facts"]["loadavg at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    (out / "run.json").write_text(json.dumps(run_info, indent=1))
    report = write_report(out)
    print(results_table(report.stats), speedup_table(report.speedups, baseline), check_table(report.checks),
          sep="\n\n")
    print(f"report: {out / 'report.md'}")
    print(json.dumps({**summary(report), "run_dir": str(out)}))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(DriverConfig, args)
        run(cfg, command="python -m loadtests.run " + shlex.join(sys.argv[1:] if argv is None else argv))
    except (TargetRefused, ValueError, FileNotFoundError) as err:
        print(f"loadtests.run: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
