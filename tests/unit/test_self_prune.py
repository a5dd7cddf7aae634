"""Self-Pruner: the rate space, LLM operators against a stub OpenAI-compatible server on 127.0.0.1
(valid answers, garbage, endpoint down), the resumable search log, and the whole job on the tiny model."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from compress.cli import main
from compress.checkpoint import load_checkpoint, load_manifest
from compress.structured.llm import ChatClient, LLMOperators, OperatorError, build_messages, parse_candidates
from compress.structured.planning import InfeasibleTarget
from compress.structured.recipe import SelfPruneRecipe, parse_structured
from compress.structured.search import EvolutionarySearch, RateSpace, SearchSettings

L = 6
PROFILE = [0.1, 0.3, 0.5, 0.6, 0.4, 0.3]  # the synthetic optimum (mean 0.3667)


def space(target: float = 0.35) -> RateSpace:
    return RateSpace.build([0.0] * L, [0.8] * L, target)


class CountingFitness:
    """A cheap stand-in for perplexity: squared distance to PROFILE (lower is better)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, rates):
        self.calls += 1
        return 1.0 + sum((r - p) ** 2 for r, p in zip(rates, PROFILE))


def essence(best: dict) -> tuple:
    return best["id"], best["rates"], best["fitness"], best["operator"]


SMALL = SearchSettings(population=6, crossovers=3, mutations=3, generations=3, seed=7)


# -- the rate space -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [[0.9, -1.0, 0.2, 0.2, 0.7, 3.0], [0.35] * L, [0.0] * L, [0.8] * L,
                                 [0.123456789, 0.4, 0.51, 0.3, 0.29, 0.001]])
def test_repair_hits_the_mean_exactly_within_bounds(raw):
    s = space()
    out = s.repair(raw)
    assert abs(s.mean(out) - 0.35) < 1e-12
    assert all(0.0 <= r <= 0.8 for r in out)


def test_repair_weights_layers_by_size_and_refuses_impossible_targets():
    s = RateSpace.build([0.0, 0.0], [0.9, 0.9], 0.5, sizes=[3, 1])
    out = s.repair([0.2, 0.2])
    assert abs(0.75 * out[0] + 0.25 * out[1] - 0.5) < 1e-12
    with pytest.raises(InfeasibleTarget, match="outside what the per-layer bounds allow"):
        RateSpace.build([0.0] * 3, [0.2] * 3, 0.5)


# -- LLM answers --------------------------------------------------------------------------------------------
def test_parse_candidates_accepts_fenced_or_bare_json_and_drops_bad_members():
    s = space()
    text = ("Sure! Here you go:\n```json\n" + json.dumps({"candidates": [
        {"parents": [1, 2, 99], "rates": [0.3] * L},
        {"rates": [0.1, 0.2]},  # wrong length
        {"rates": ["a"] * L},  # not numbers
        {"rates": [0.9, 0.0, 0.2, 0.5, 0.5, 0.5]},  # out of bounds: repaired
    ]}) + "\n```")
    found, problems = parse_candidates(text, L, s.repair, known_ids={1, 2})
    assert len(found) == 2 and len(problems) == 2
    assert found[0].parents == [1, 2]
    assert all(abs(s.mean(c.rates) - 0.35) < 1e-12 and max(c.rates) <= 0.8 for c in found)
    bare, _ = parse_candidates(json.dumps([[0.35] * L]), L, s.repair)
    assert len(bare) == 1
    for garbage in ("I think layer 3 should be pruned more.", '{"candidates": "none"}',
                    json.dumps({"candidates": [{"rates": [1] * (L + 1)}]})):
        with pytest.raises(OperatorError):
            parse_candidates(garbage, L, s.repair)


def test_prompt_gives_population_fitness_and_constraints():
    messages = build_messages("crossover", 3, [(4, 12.5, [0.3] * L), (2, 10.25, [0.4] * L)], L, 0.0, 0.8, 0.35)
    system, user = messages[0]["content"], messages[1]["content"]
    assert "0.3500" in system and "LOWER IS BETTER" in system and '"candidates"' in system
    assert user.index("id=2 perplexity=10.2500") < user.index("id=4 perplexity=12.5000")  # best first
    assert "create 3 children" in user


class StubChat:
    """An OpenAI-compatible stub on 127.0.0.1: /v1/models and /v1/chat/completions with a fixed answer."""

    def __init__(self, answer):
        self.answer = answer  # str, or a callable(request_json) -> str
        self.requests: list[tuple[dict, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload):
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((dict(self.headers), request))
                content = stub.answer(request) if callable(stub.answer) else stub.answer
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def llm_for(url: str, s: RateSpace, **client) -> LLMOperators:
    return LLMOperators(ChatClient(base_url=url, timeout_s=5, **client), L, 0.0, 0.8, s.target, s.repair)


def test_llm_answering_invalid_json_falls_back_cleanly(tmp_path):
    s = space()
    with StubChat("Here are some great candidates: [0.3, 0.4, oops") as stub:
        fitness = CountingFitness()
        search = EvolutionarySearch(s, fitness, SMALL, log_path=tmp_path / "log.jsonl", job_id="j",
                                    llm=llm_for(stub.url, s), progress=False)
        result = search.run()
    total = SMALL.population + SMALL.generations * (SMALL.crossovers + SMALL.mutations)
    assert result.candidates == total and result.operators == {"seed": 1, "classical": total - 1}
    assert len(stub.requests) == 1 + 2 * SMALL.generations  # one call per operator, every time answered
    assert stub.requests[0][1]["model"] == "stub-model"  # the first model the endpoint lists
    assert all("contains no JSON" in note for note in result.notes) and len(result.notes) == 7
    notes = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "note"]
    assert len(notes) == 7
    # the classical fallback is the same search as without any endpoint
    plain = EvolutionarySearch(s, CountingFitness(), SMALL, progress=False).run()
    assert essence(plain.best) == essence(result.best)


def test_llm_operator_candidates_are_used_with_the_api_key(tmp_path, monkeypatch):
    s = space()
    monkeypatch.setenv("MY_KEY", "sekret")

    def answer(request):
        wanted = int(request["messages"][1]["content"].split("Return exactly ")[1].split()[0])
        return json.dumps({"candidates": [{"parents": [0], "rates": PROFILE}] * wanted})

    from compress.structured.llm import llm_from_settings

    with StubChat(answer) as stub:
        client = llm_from_settings(stub.url, "any-model", "MY_KEY", 5.0, 0.2, 512)
        llm = LLMOperators(client, L, 0.0, 0.8, s.target, s.repair)
        result = EvolutionarySearch(s, CountingFitness(), SMALL, llm=llm, progress=False).run()
    headers, request = stub.requests[0]
    assert headers["Authorization"] == "Bearer sekret" and request["model"] == "any-model"
    assert request["temperature"] == 0.2
    assert result.operators == {"seed": 1, "llm": result.candidates - 1}  # the uniform seed opens the search
    assert result.best["operator"] == "llm"
    assert abs(space().mean(result.best["rates"]) - 0.35) < 1e-12


def test_endpoint_down_falls_back_and_turns_the_llm_off(free_port):
    s = space()
    llm = llm_for(f"http://127.0.0.1:{free_port}/v1", s, model="m")
    result = EvolutionarySearch(s, CountingFitness(), SMALL, llm=llm, progress=False).run()
    assert result.operators == {"seed": 1, "classical": result.candidates - 1}
    assert "cannot reach" in result.notes[0] and "turning the LLM operator off" in result.notes[2]
    assert len(result.notes) == 3 and not llm.active


# -- the log -------------------------------------------------------------------------------------------------
def test_search_resumes_from_its_log(tmp_path):
    s = space()
    log = tmp_path / "log.jsonl"
    settings = SearchSettings(**{**SMALL.__dict__, "generations": 1})
    first = CountingFitness()
    EvolutionarySearch(s, first, settings, log_path=log, job_id="job", progress=False).run()
    with log.open("a") as fh:  # an interruption in the middle of writing a candidate
        fh.write('{"kind": "candidate", "id": 12, "gen')
    second = CountingFitness()
    resumed = EvolutionarySearch(s, second, SMALL, log_path=log, job_id="job", progress=False).run()
    assert first.calls <= settings.population + settings.crossovers + settings.mutations
    assert second.calls <= 2 * (SMALL.crossovers + SMALL.mutations)  # only generations 2 and 3 are new
    whole = EvolutionarySearch(s, CountingFitness(), SMALL, log_path=tmp_path / "whole.jsonl", job_id="job",
                               progress=False).run()
    assert essence(resumed.best) == essence(whole.best) and resumed.history == whole.history
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["generation"] for r in records if r["kind"] == "generation"] == [0, 1, 2, 3]
    again = CountingFitness()
    EvolutionarySearch(s, again, SMALL, log_path=log, job_id="job", progress=False).run()
    assert again.calls == 0  # everything is in the log
    with pytest.raises(ValueError, match="log of another search"):
        EvolutionarySearch(s, CountingFitness(), SMALL, log_path=log, job_id="other", progress=False).run()


def test_search_improves_on_the_uniform_start():
    result = EvolutionarySearch(space(), CountingFitness(), SearchSettings(population=8, crossovers=4,
                                                                            mutations=4, generations=8),
                                progress=False).run()
    uniform = CountingFitness()(space().uniform())
    assert result.best["fitness"] < uniform
    assert [h["best_fitness"] for h in result.history] == sorted((h["best_fitness"] for h in result.history),
                                                                 reverse=True)


# -- the whole job -----------------------------------------------------------------------------------------
ARGS = ["--ratio", "0.3", "--mlp-multiple", "8", "--min-mlp-width", "8", "--dtype", "float32",
        "--set", "calibration.samples=8", "--set", "calibration.seq_len=32", "--population", "4",
        "--crossovers", "2", "--mutations", "2", "--generations", "2", "--selection-seq-len", "64",
        "--selection-windows", "2"]


def test_cli_self_prune_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sp"
    assert main(["self-prune", str(tiny_model_dir), "-o", str(out), *ARGS]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rates = summary["search"]["best_rates"]
    assert len(rates) == 3 and abs(sum(rates) / 3 - 0.3) < 1e-12
    for name in ("self_prune_log.jsonl", "self_prune_search.png", "structured_report.png", "config.json"):
        assert (out / name).is_file()
    log = [json.loads(line) for line in (out / "self_prune_log.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "candidate" for r in log) == 4 + 2 * 4
    manifest = load_manifest(out)
    assert manifest.extra["structured_report"]["search"]["best"]["rates"] == rates
    assert manifest.recipe["method"] == "self-prune"
    loaded = load_checkpoint(out, dtype=torch.float32).model
    with torch.no_grad():
        assert math.isfinite(float(loaded(input_ids=torch.tensor([[5, 6, 7]])).logits.sum()))


def test_cli_search_alias_with_a_dead_endpoint_keeps_going(tiny_model_dir, tmp_path, capsys, free_port):
    out = tmp_path / "sp"
    assert main(["search", str(tiny_model_dir), "-o", str(out), *ARGS,
                 "--llm-base-url", f"http://127.0.0.1:{free_port}/v1", "--llm-model", "m"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["search"]["operators"] == {"seed": 2, "classical": 10}  # uniform and FLAP's al-am seeds
    assert any("cannot reach" in note for note in summary["search"]["notes"])


@pytest.mark.parametrize("fields, message", [
    ({"ratio": 0.95}, "must lie within"),
    ({"selection_source": "eval"}, "the eval split is for evaluation only"),
    ({"populaton": 3}, "populaton: Extra inputs are not permitted"),
])
def test_self_prune_recipe_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        parse_structured(SelfPruneRecipe, fields)


def test_interrupted_self_prune_job_resumes_from_its_log(tiny_model_dir, tmp_path, monkeypatch):
    from compress.structured import fitness as fitness_mod
    from compress.structured.job import run_self_prune_job

    recipe = parse_structured(SelfPruneRecipe, {
        "ratio": 0.3, "mlp_multiple": 8, "min_mlp_width": 8, "dtype": "float32", "population": 4, "crossovers": 2,
        "mutations": 2, "generations": 2, "selection_seq_len": 64, "selection_windows": 2,
        "calibration": {"samples": 8, "seq_len": 32}})
    real = fitness_mod.PlanPerplexity.__call__
    calls = []

    def crash_after_five(self, plans):
        if plans is not None:
            calls.append(1)
            if len(calls) > 5:
                raise KeyboardInterrupt
        return real(self, plans)

    monkeypatch.setattr(fitness_mod.PlanPerplexity, "__call__", crash_after_five)
    out = tmp_path / "sp"
    with pytest.raises(KeyboardInterrupt):
        run_self_prune_job(tiny_model_dir, recipe, out, progress=False)
    log = tmp_path / "sp.partial" / "self_prune_log.jsonl"
    logged = sum('"candidate"' in line for line in log.read_text().splitlines())
    assert logged >= 5  # five evaluated, plus any duplicate answered from the cache
    with pytest.raises(ValueError, match="pass --resume"):
        run_self_prune_job(tiny_model_dir, recipe, out, progress=False)
    calls.clear()
    monkeypatch.setattr(fitness_mod.PlanPerplexity, "__call__", lambda self, plans: calls.append(1) or real(self, plans))
    report = run_self_prune_job(tiny_model_dir, recipe, out, resume=True, progress=False)
    assert report.search["candidates"] == 12 and report.search["evaluations"] == len(calls) <= 12 - logged
    assert not (tmp_path / "sp.partial").exists() and (out / "self_prune_log.jsonl").is_file()


def test_seeds_open_the_initial_population():
    s = space()
    seeds = [[0.35] * L, PROFILE]
    result = EvolutionarySearch(s, CountingFitness(), SMALL, seeds=seeds, progress=False).run()
    assert result.operators["seed"] == 2
    assert result.best["operator"] == "seed" or result.best["fitness"] <= CountingFitness()(s.repair(PROFILE))
