"""Locust load test for OpenAI-compatible servers (sparse-serve, vLLM): streamed chat and completions.

Every simulated user sends the next request of the profile's fixed list as soon as its previous one has
finished (a closed loop: ``-u N`` users = concurrency N). Each request streams with
``stream_options.include_usage`` and is timed by :mod:`loadtests.sse`; besides locust's own row per
endpoint (``POST chat`` / ``POST completions``, response time = the whole stream, length = output
tokens) it fires custom events with ``request_type="SSE"``: ``time_to_first_token``,
``inter_token_latency`` (one per gap between content chunks), ``time_per_output_token`` and
``e2e_latency`` (milliseconds), so locust's CSV and UI show them like requests.

    locust -f loadtests/locustfile.py --headless -u 4 -r 100 --run-time 60s --host http://127.0.0.1:8000 \
        --load-profile chat --max-requests 64 --request-log out/requests.csv --csv out/locust --stop-timeout 60

Extra options: ``--load-profile`` (name under loadtests/profiles or a YAML path), ``--max-requests`` (stop
after that many requests have finished; ``--run-time`` bounds the time), ``--request-log`` (one CSV
row per request, what :mod:`loadtests.report` reads), ``--model`` (default: the server's first model),
``--api-key`` (or ``OPENAI_API_KEY``). The target must be a loopback address unless its host is named
in ``SPARSE_SERVE_LOADTEST_ALLOW_HOSTS`` (see :mod:`loadtests.hosts`); anything else exits with code 2.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import IO

import gevent
import requests
from locust import HttpUser, constant, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for ``loadtests``
from loadtests.hosts import ALLOW_ENV, TargetRefused, check_target, parse_allow  # noqa: E402
from loadtests.profile import PlannedRequest, Profile, load_profile  # noqa: E402
from loadtests.sse import LOG_COLUMNS, RequestTiming, StreamTimer  # noqa: E402

SSE = "SSE"
TTFT, ITL, TPOT, E2E = "time_to_first_token", "inter_token_latency", "time_per_output_token", "e2e_latency"
EVENT_NAMES = (TTFT, ITL, TPOT, E2E)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--load-profile", default="chat", env_var="LOADTEST_PROFILE",
                        help="load profile: a name under loadtests/profiles or a YAML path")
    parser.add_argument("--max-requests", type=int, default=0, env_var="LOADTEST_MAX_REQUESTS",
                        help="stop once this many requests have finished (0: only --run-time bounds the run)")
    parser.add_argument("--request-log", default="", env_var="LOADTEST_REQUEST_LOG",
                        help="write one CSV row per request to this file")
    parser.add_argument("--model", default="", env_var="LOADTEST_MODEL",
                        help="model name to request (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", default="", env_var="OPENAI_API_KEY", help="Bearer token for /v1/*")


class RunState:
    """What all users share: the planned requests, the request cap, in-flight count and the request log."""

    def __init__(self, profile: Profile, cap: int, model: str, api_key: str, log_path: str):
        self.profile, self.plan, self.cap, self.model = profile, profile.plan(), cap, model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.issued = self.in_flight = 0
        self.quitting = False
        self._file: IO[str] | None = None
        self._log = None
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(log_path, "w", newline="")
            self._log = csv.DictWriter(self._file, LOG_COLUMNS)
            self._log.writeheader()

    def take(self) -> PlannedRequest | None:
        """The next planned request (cycling through the plan), or None once the cap is reached."""
        if self.cap and self.issued >= self.cap:
            return None
        planned = self.plan[self.issued % len(self.plan)]
        self.issued += 1
        self.in_flight += 1
        return planned

    def release(self, environment) -> None:
        """A request finished; the last one after the cap stops the run."""
        self.in_flight -= 1
        self.maybe_quit(environment)

    def maybe_quit(self, environment) -> None:
        if self.cap and self.issued >= self.cap and self.in_flight == 0 and not self.quitting:
            self.quitting = True
            gevent.spawn(environment.runner.quit)

    def log(self, planned: PlannedRequest, start_unix: float, timing: RequestTiming) -> None:
        if self._log is not None:
            self._log.writerow({"index": planned.index, "endpoint": planned.endpoint, "max_tokens": planned.max_tokens,
                                "start_unix": f"{start_unix:.6f}", **timing.row()})
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._log = None


RUN: RunState | None = None


@events.init.add_listener
def _check_host(environment, **_) -> None:
    """Refuse a non-loopback target before any request is sent (exit code 2)."""
    if environment.host:
        try:
            check_target(environment.host, parse_allow(os.environ.get(ALLOW_ENV)))
        except TargetRefused as err:
            print(f"locustfile: {err}", file=sys.stderr)
            raise SystemExit(2) from None


@events.test_start.add_listener
def _start(environment, **_) -> None:
    global RUN
    RUN = None  # a refused target below leaves no plan: every user stops at once
    opts = environment.parsed_options
    host = check_target(environment.host or "", parse_allow(os.environ.get(ALLOW_ENV)))
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    if not (model := opts.model):
        listing = requests.get(f"{host.rstrip('/')}/v1/models", headers=headers, timeout=30).json()
        model = listing["data"][0]["id"]
    RUN = RunState(load_profile(opts.load_profile), opts.max_requests, model, opts.api_key, opts.request_log)


@events.quitting.add_listener
def _close(environment, **_) -> None:
    if RUN is not None:
        RUN.close()
    if getattr(environment.parsed_options, "csv_prefix", None):
        # locust rewrites its CSV once a second and closes the files right after this event: let it
        # write the final numbers once more, or a short run's last second is missing from them
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


def fire_timing_events(environment, timing: RequestTiming) -> None:
    """The per-request custom events (request_type "SSE", response times in ms)."""
    fire = environment.events.request.fire
    common = {"request_type": SSE, "exception": None, "context": {}}
    fire(name=TTFT, response_time=1000 * timing.ttft_s, response_length=timing.output_tokens, **common)
    for gap in timing.itl_s:
        fire(name=ITL, response_time=1000 * gap, response_length=1, **common)
    if timing.tpot_s is not None:
        fire(name=TPOT, response_time=1000 * timing.tpot_s, response_length=timing.output_tokens, **common)
    fire(name=E2E, response_time=1000 * timing.e2e_s, response_length=timing.output_tokens, **common)


class OpenAIUser(HttpUser):
    """One closed-loop client: sends the next planned request as soon as the previous one has finished."""

    wait_time = constant(0)

    @task
    def stream_one(self) -> None:
        run = RUN
        planned = run.take() if run is not None else None
        if planned is None:
            if run is not None:
                run.maybe_quit(self.environment)
            raise StopUser()
        try:
            start_unix, timing = self._send(run, planned)
        finally:
            run.release(self.environment)
        if timing.ok:
            fire_timing_events(self.environment, timing)
        run.log(planned, start_unix, timing)

    def _send(self, run: RunState, planned: PlannedRequest) -> tuple[float, RequestTiming]:
        start_unix = time.time()
        timer = StreamTimer()
        with self.client.post(planned.path, json=planned.body(run.model, run.profile), headers=run.headers,
                              stream=True, catch_response=True, name=planned.endpoint) as response:
            if response.status_code == 200:
                for line in response.iter_lines(chunk_size=None):  # None: each chunk as it arrives
                    timer.feed(line)
            else:
                timer.error = f"HTTP {response.status_code}: {(response.text or '')[:200]}"
            timing = timer.finish()
            response.request_meta["response_time"] = 1000 * timing.e2e_s
            response.request_meta["response_length"] = timing.output_tokens
            if timing.ok:
                response.success()
            else:
                response.failure(timing.error)
        return start_unix, timing
