"""Load tests: profiles, the client-side timing arithmetic, the loopback rule, the driver's pieces, and the
locustfile itself - a short bounded headless locust run against a live tiny-model server, whose CSV rows,
custom SSE events and per-request timings are checked, and cross-checked against the server's /metrics."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import hosts
from loadtests.profile import PROFILE_DIR, WORDS, Profile, load_profile
from loadtests.promtext import scrape, server_deltas
from loadtests.report import DEFAULT_TOLERANCE, cross_check, level_stats, read_requests
from loadtests.run import DriverConfig, append_requests, parse_variant, request_cap, run
from loadtests.sse import LOG_COLUMNS, StreamTimer

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
EVENTS = ("time_to_first_token", "inter_token_latency", "time_per_output_token", "e2e_latency")


# -- profiles -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
def test_every_bundled_profile_loads_and_plans_deterministically(name):
    profile = load_profile(name)
    plan = profile.plan()
    assert plan == load_profile(name).plan()  # same seed, same requests
    assert len(plan) == profile.num_prompts
    for req in plan:
        words = req.text.split()
        assert profile.prompt_words.min <= len(words) <= profile.prompt_words.max
        assert set(words) <= set(WORDS)
        assert profile.output_tokens.min <= req.max_tokens <= profile.output_tokens.max
        assert req.endpoint in profile.endpoints


def test_profile_body_streams_with_usage_and_fixed_length():
    profile = load_profile("short")
    chat = next(r for r in profile.plan() if r.endpoint == "chat")
    body = chat.body("m", profile)
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] and body["temperature"] == 0 and body["max_tokens"] == 32
    assert body["messages"][-1] == {"role": "user", "content": chat.text}
    completion = next(r for r in profile.plan() if r.endpoint == "completions")
    assert completion.body("m", profile)["prompt"] == completion.text and completion.path == "/v1/completions"


def test_profile_rejects_unknown_keys_and_bad_ranges(tmp_path):
    base = {"name": "x", "prompt_words": {"min": 1, "max": 2}, "output_tokens": {"min": 1, "max": 1},
            "slo": {"ttft_ms": 1, "tpot_ms": 1}}
    Profile(**base)
    with pytest.raises(ValueError):
        Profile(**base, prompts=3)
    with pytest.raises(ValueError):
        Profile(**{**base, "output_tokens": {"min": 5, "max": 2}})
    with pytest.raises(FileNotFoundError, match="known: "):
        load_profile("no-such-profile")


# -- timing arithmetic ----------------------------------------------------------------------------
class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def chat_chunk(content=None, role=None, usage=None):
    import json

    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    chunk = {"choices": [] if usage else [{"index": 0, "delta": delta}]}
    if usage:
        chunk["usage"] = usage
    return "data: " + json.dumps(chunk)


def test_stream_timer_measures_like_vllm_bench():
    # clock: start 0; role chunk at 0.1 (not content); content at 0.3, 0.35, 0.45; usage; DONE; end 0.5
    timer = StreamTimer(clock=FakeClock([0.0, 0.1, 0.3, 0.35, 0.45, 0.46, 0.47, 0.5]))
    for line in (chat_chunk(role="assistant", content=""), chat_chunk("He"), chat_chunk("llo"), chat_chunk("!"),
                 chat_chunk(usage={"prompt_tokens": 7, "completion_tokens": 4}), "data: [DONE]"):
        timer.feed(line)
    t = timer.finish()
    assert t.ok and t.chunks == 3 and t.output_tokens == 4 and t.prompt_tokens == 7
    assert t.ttft_s == pytest.approx(0.3) and t.e2e_s == pytest.approx(0.5)
    assert t.itl_s == pytest.approx([0.05, 0.1])
    assert t.tpot_s == pytest.approx((0.5 - 0.3) / 3)  # (latency - TTFT) / (output tokens - 1)
    row = t.row()
    assert set(row) | {"index", "endpoint", "max_tokens", "start_unix"} == set(LOG_COLUMNS)
    assert row["ttft_ms"] == pytest.approx(300) and row["itl_ms"] == "50.000 100.000"


def test_stream_timer_completions_one_token_and_errors():
    timer = StreamTimer(clock=FakeClock([0.0, 0.2, 0.21, 0.22, 0.3]))
    for line in ('data: {"choices": [{"index": 0, "text": "x"}]}', "", "data: [DONE]"):
        timer.feed(line)
    t = timer.finish()
    assert t.ok and t.output_tokens == 1 and t.tpot_s is None and t.ttft_s == pytest.approx(0.2)
    broken = StreamTimer(clock=FakeClock([0.0, 0.1, 0.2, 0.3]))
    broken.feed('data: {"error": {"message": "engine died"}}')
    broken.feed("data: [DONE]")
    assert broken.finish().error == "engine died"
    cut = StreamTimer(clock=FakeClock([0.0, 0.1, 0.2]))
    cut.feed('data: {"choices": [{"index": 0, "text": "x"}]}')
    assert "without [DONE]" in cut.finish().error


# -- loopback only --------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000",
                                 "http://127.1.2.3"])
def test_loopback_targets_are_accepted(url):
    assert hosts.check_target(url) == url


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://0.0.0.0:8000", "http://8.8.8.8",
                                 "http://example.invalid:80", "ftp://127.0.0.1", "127.0.0.1:8000"])
def test_other_targets_are_refused(url):
    with pytest.raises(hosts.TargetRefused):
        hosts.check_target(url)


def test_allow_list_names_exact_hosts():
    assert hosts.check_target("http://sparse:8000", hosts.parse_allow("sparse, dense"))
    with pytest.raises(hosts.TargetRefused):
        hosts.check_target("http://sparse2:8000", hosts.parse_allow("sparse,dense"))


def test_driver_refuses_a_non_loopback_host_before_starting_anything(tmp_path):
    with pytest.raises(hosts.TargetRefused):
        run(DriverConfig(host="0.0.0.0", variants=["a=x"], out=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


# -- driver pieces --------------------------------------------------------------------------------
def test_parse_variant_and_request_cap():
    v = parse_variant("flap=~/ckpt/flap-50 --dense --max-num-seqs 8")
    assert v.name == "flap" and v.checkpoint == os.path.expanduser("~/ckpt/flap-50")
    assert v.server_args == ["--dense", "--max-num-seqs", "8"]
    for bad in ("noequals", "=x", "a b=c", "x="):
        with pytest.raises(ValueError):
            parse_variant(bad)
    cfg = DriverConfig(min_requests=12, requests_per_user=6)  # (defaults: 8 and 4)
    assert [request_cap(cfg, u) for u in (1, 2, 8)] == [12, 12, 48]


def test_append_requests_tags_rows(tmp_path):
    log = tmp_path / "log.csv"
    with open(log, "w", newline="") as f:
        w = csv.DictWriter(f, LOG_COLUMNS)
        w.writeheader()
        w.writerow({"index": 0, "ok": 1, "ttft_ms": 1.0})
    dest = tmp_path / "requests.csv"
    assert append_requests(dest, "sparse", 4, log) == 1
    assert append_requests(dest, "dense", 1, tmp_path / "missing.csv") == 0
    rows = list(csv.DictReader(open(dest)))
    assert rows == [{**{k: "" for k in LOG_COLUMNS}, "variant": "sparse", "concurrency": "4", "index": "0",
                     "ok": "1", "ttft_ms": "1.0"}]


# -- the locustfile against a live server ---------------------------------------------------------
def locust(tmp_path: Path, host: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "--only-summary", "--loglevel", "WARNING", *extra]
    env = {k: v for k, v in os.environ.items() if k != hosts.ALLOW_ENV}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)


def test_locust_run_records_sse_events_and_request_log(tiny_server_url, tmp_path):
    before = scrape(tiny_server_url)
    proc = locust(tmp_path, tiny_server_url, "-u", "3", "-r", "100", "--run-time", "30s", "--stop-timeout", "20",
                  "--load-profile", "short", "--max-requests", "8", "--request-log", str(tmp_path / "req.csv"),
                  "--csv", str(tmp_path / "loc"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = scrape(tiny_server_url)

    # locust's own CSV: one row per endpoint (full stream time) and one per custom SSE event
    stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(open(tmp_path / "loc_stats.csv"))}
    for name in EVENTS:
        assert int(stats[("SSE", name)]["Request Count"]) > 0, name
    assert int(stats[("SSE", "e2e_latency")]["Request Count"]) == 8
    assert int(stats[("SSE", "time_to_first_token")]["Request Count"]) == 8
    posts = {name: int(r["Request Count"]) for (kind, name), r in stats.items() if kind == "POST"}
    assert sum(posts.values()) == 8 and set(posts) <= {"chat", "completions"}
    assert all(int(r["Failure Count"]) == 0 for r in stats.values())

    # the per-request log: the cap is exact, TTFT <= e2e, the fixed lengths are generated
    rows = read_requests(tmp_path / "req.csv")
    assert len(rows) == 8 and sorted(r["index"] for r in rows) == list(range(8))
    plan = load_profile("short").plan()
    for r in rows:
        assert r["ok"] == 1 and r["error"] == ""
        assert 0 < r["ttft_ms"] <= r["e2e_ms"]
        assert r["output_tokens"] == r["max_tokens"] == plan[r["index"]].max_tokens
        assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / (r["output_tokens"] - 1), rel=1e-3)
        assert len(r["itl_ms"]) == r["chunks"] - 1 and r["prompt_tokens"] > 0

    # the same requests as the server counted them
    stats_level = level_stats("tiny", 3, [{**r, "variant": "tiny", "concurrency": 3} for r in rows],
                              {"ttft_ms": 1e9, "tpot_ms": 1e9})
    deltas = server_deltas(before, after, {"variant": "tiny"})
    checks = {c.quantity: c for c in cross_check(stats_level, deltas, {**DEFAULT_TOLERANCE, "ttft_ms": 150})}
    assert checks["finished requests"].ok and checks["generated tokens"].ok, checks
    assert checks["mean e2e latency (ms)"].ok, checks["mean e2e latency (ms)"]
    assert deltas["ttft_mean_s"] * 1000 <= stats_level.ttft_mean_ms  # the client sees the first token later


def test_locustfile_refuses_a_non_loopback_host(tmp_path):
    proc = locust(tmp_path, "http://10.255.255.1:8000", "-u", "1", "--run-time", "2s", "--max-requests", "1",
                  timeout=30)
    assert proc.returncode == 2
    assert "only target loopback" in proc.stderr


def test_ensure_checkpoint_builds_once_then_reuses(tiny_model_dir, tmp_path):
    from loadtests.run import ensure_checkpoint

    out = tmp_path / "flap"
    command = ["flap", str(tiny_model_dir), "--ratio", "0.4", "--mlp-multiple", "8", "--min-mlp-width", "8",
               "--dtype", "float32", "--set", "calibration.samples=8", "--set", "calibration.seq_len=32"]
    ensure_checkpoint(out, command, "structured_report.json")
    assert (out / "structured_report.json").is_file() and (out / "config.json").is_file()
    stamp = (out / "structured_report.json").stat().st_mtime_ns
    ensure_checkpoint(out, command, "structured_report.json")  # finished: not built again
    assert (out / "structured_report.json").stat().st_mtime_ns == stamp
