"""The LLM side of Self-Pruner: evolutionary operators performed by a chat model.

Contract: :class:`LLMOperators` asks any OpenAI-compatible endpoint
(``POST {base_url}/chat/completions``; this project's ``sparse-serve``, a
vLLM server or a hosted API) for new candidates: an initial population,
or offspring by crossover or mutation of the current population, whose
members and fitness values are in the prompt. The answer must contain JSON
``{"candidates": [{"parents": [id, ...], "rates": [r_0, ..., r_{L-1}]}, ...]}``;
:func:`parse_candidates` accepts it also inside a code fence or as a bare
list, drops members of the wrong length or with non-numbers, and repairs the
rest into the search space (bounds and exact mean). Every failure - endpoint
down, timeout, HTTP error, no JSON, no valid candidate - is an
:class:`OperatorError` whose message says what happened; the search then uses
its classical operator. After ``max_failures`` consecutive endpoint failures
the operator turns itself off for the rest of the run. The API key is read
from the environment, never from a recipe.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Sequence

Repair = Callable[[Sequence[float]], list[float]]


class OperatorError(RuntimeError):
    """The LLM operator produced nothing usable; the message says why."""


@dataclass
class Offspring:
    """A proposed candidate: its rates (already repaired) and the ids of the parents it came from."""

    rates: list[float]
    parents: list[int]


@dataclass
class ChatClient:
    """A minimal OpenAI-compatible chat-completions client (standard library only)."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 120.0
    temperature: float = 0.7
    max_tokens: int = 4096

    def _request(self, path: str, payload: dict | None = None) -> dict:
        url = self.base_url.rstrip("/") + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace")
            raise OperatorError(f"{url} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise OperatorError(f"cannot reach {url}: {reason}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise OperatorError(f"{url} answered something that is not JSON: {body[:120]!r}") from None

    def resolve_model(self) -> str:
        """The configured model, else the first one the endpoint lists."""
        if self.model is None:
            listed = self._request("/models").get("data") or []
            if not listed or "id" not in listed[0]:
                raise OperatorError(f"{self.base_url}/models lists no model; pass --llm-model")
            self.model = str(listed[0]["id"])
        return self.model

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant's text for ``messages``."""
        payload = {"model": self.resolve_model(), "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens}
        answer = self._request("/chat/completions", payload)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise OperatorError(f"the chat answer has no choices[0].message.content: {str(answer)[:160]}") from None
        if not isinstance(content, str) or not content.strip():
            raise OperatorError("the chat answer is empty")
        return content


# -- prompts -----------------------------------------------------------------------------------
SYSTEM = ("You are the evolutionary operator of a search over layer-wise structured pruning rates of a "
          "{layers}-layer language model. A candidate is a list of {layers} pruning rates, one per decoder "
          "layer in order (the fraction of that layer's parameters removed). Every rate must lie in "
          "[{low:.3f}, {high:.3f}] and the mean of the rates must be exactly {target:.4f}. Fitness is the "
          "perplexity of the pruned model on held-out text: LOWER IS BETTER. Answer with JSON only, no prose: "
          '{{"candidates": [{{"parents": [<ids>], "rates": [<{layers} numbers>]}}, ...]}}')

TASKS = {
    "init": ("Propose {n} diverse initial candidates. Layers differ in how much they tolerate pruning "
             "(first and last layers are often sensitive); vary the shapes of the rate profiles."),
    "crossover": ("Select pairs of parents from the population (prefer low perplexity, keep some diversity) "
                  "and create {n} children, each combining its two parents' rates layer by layer "
                  "(e.g. taking segments from each). Give each child's parent ids."),
    "mutation": ("Select {n} members of the population (prefer low perplexity) and mutate each: change the "
                 "rates of a few layers, moving rate from layers that look sensitive to layers that look "
                 "robust, keeping the mean. Give each child's parent id."),
}


def build_messages(phase: str, n: int, population: Sequence[tuple[int, float, Sequence[float]]], layers: int,
                   low: float, high: float, target: float) -> list[dict[str, str]]:
    """The chat messages for one operator call; ``population``: (id, fitness, rates), any order."""
    lines = [f"id={cid} perplexity={fit:.4f} rates=[{', '.join(f'{r:.3f}' for r in rates)}]"
             for cid, fit, rates in sorted(population, key=lambda m: m[1])]
    pop = ("Current population, best first:\n" + "\n".join(lines)) if lines else "There is no population yet."
    user = f"{pop}\n\n{TASKS[phase].format(n=n)}\nReturn exactly {n} candidates as JSON."
    return [{"role": "system", "content": SYSTEM.format(layers=layers, low=low, high=high, target=target)},
            {"role": "user", "content": user}]


# -- answers -----------------------------------------------------------------------------------
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _json_payload(text: str) -> Any:
    """The JSON value in ``text``: the whole text, a fenced block, or the outermost {...} / [...]."""
    attempts = [text.strip(), *(m.strip() for m in _FENCE.findall(text))]
    for open_, close in (("{", "}"), ("[", "]")):
        start, end = text.find(open_), text.rfind(close)
        if 0 <= start < end:
            attempts.append(text[start:end + 1])
    for attempt in attempts:
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            continue
    raise OperatorError(f"the answer contains no JSON: {text[:120]!r}")


def parse_candidates(text: str, layers: int, repair: Repair, known_ids: set[int] | None = None
                     ) -> tuple[list[Offspring], list[str]]:
    """Valid, repaired candidates from an LLM answer, and what was wrong with the rest."""
    payload = _json_payload(text)
    items = payload.get("candidates") if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        raise OperatorError("the JSON has no 'candidates' list")
    valid, problems = [], []
    for k, item in enumerate(items):
        rates = item.get("rates") if isinstance(item, dict) else item
        parents = item.get("parents", []) if isinstance(item, dict) else []
        if not isinstance(rates, list) or len(rates) != layers:
            problems.append(f"candidate {k}: needs a list of {layers} rates")
            continue
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rates):
            problems.append(f"candidate {k}: rates must be finite numbers")
            continue
        parents = [int(p) for p in parents if isinstance(p, int) and (known_ids is None or p in known_ids)] \
            if isinstance(parents, list) else []
        valid.append(Offspring(repair([float(r) for r in rates]), parents))
    if not valid:
        raise OperatorError("no valid candidate in the answer (" + "; ".join(problems[:3]) + ")")
    return valid, problems


class LLMOperators:
    """Initial population, crossover and mutation by a chat model (see the module docstring)."""

    def __init__(self, client: ChatClient, layers: int, low: float, high: float, target: float,
                 repair: Repair, max_failures: int = 3):
        self.client, self.layers, self.repair = client, layers, repair
        self.low, self.high, self.target = low, high, target
        self.max_failures = max_failures
        self.failures = 0
        self.active = True

    def propose(self, phase: str, n: int, population: Sequence[tuple[int, float, Sequence[float]]]
                ) -> tuple[list[Offspring], list[str]]:
        """Up to ``n`` candidates for ``phase`` ("init", "crossover", "mutation") and any problems."""
        if not self.active:
            raise OperatorError("the LLM operator is off after repeated endpoint failures")
        messages = build_messages(phase, n, population, self.layers, self.low, self.high, self.target)
        try:
            text = self.client.complete(messages)
        except OperatorError as err:
            self.failures += 1
            if self.failures >= self.max_failures:
                self.active = False
                raise OperatorError(f"{err}; turning the LLM operator off after {self.failures} failures in a "
                                    "row (classical operators from now on)") from None
            raise
        self.failures = 0
        found, problems = parse_candidates(text, self.layers, self.repair, {m[0] for m in population})
        return found[:n], problems


def llm_from_settings(base_url: str | None, model: str | None, api_key_env: str, timeout_s: float,
                      temperature: float, max_tokens: int) -> ChatClient | None:
    """A chat client when an endpoint is configured, else None (classical operators only)."""
    if not base_url:
        return None
    return ChatClient(base_url=base_url, model=model, api_key=os.environ.get(api_key_env) or None,
                      timeout_s=timeout_s, temperature=temperature, max_tokens=max_tokens)
