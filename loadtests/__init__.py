"""Load tests for sparse-serve: a locustfile for OpenAI-compatible servers, a driver that measures a dense
baseline against compressed variants on 127.0.0.1, and the report generator.

Modules: :mod:`loadtests.profile` (request profiles from YAML, seeded), :mod:`loadtests.sse` (client-side
timing of one streamed response, as ``vllm bench serve`` measures it), :mod:`loadtests.hosts` (the
loopback-only rule), :mod:`loadtests.promtext` (reading the servers' /metrics), :mod:`loadtests.report`
(tables, goodput, speedups, plots, the /metrics cross-check) and :mod:`loadtests.run` (the driver).
``loadtests/locustfile.py`` is what locust loads. Nothing here imports locust except the locustfile, so
the driver and the report never monkey-patch the standard library with gevent.
"""
