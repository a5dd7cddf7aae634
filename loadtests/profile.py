"""Load profiles: how long the prompts and answers are, which endpoints, the SLOs - read from YAML.

Contract: :func:`load_profile` reads ``loadtests/profiles/<name>.yaml`` (or any YAML path) into a
:class:`Profile` (pydantic, unknown keys rejected). :meth:`Profile.plan` turns it into a fixed list of
:class:`PlannedRequest` - the same list for the same profile on every machine, because prompts are
drawn with ``random.Random(seed)`` from the fixed :data:`WORDS` list (no download, no tokenizer).
Prompt lengths are in words (SmolLM2's tokenizer makes 1-1.5 tokens of one); the servers' usage reports
the exact token counts. Output lengths are exact with ``ignore_eos`` (the default), so a dense and a
compressed server generate the same number of tokens for the same request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
Endpoint = Literal["chat", "completions"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# A fixed vocabulary of common English words: prompts are seeded draws from it.
WORDS = tuple(dict.fromkeys("""
the of and to in is was for on with as by at from that this which be are it an or have has had not but
they their there were been more most other some such when what where who will would can could should may
time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother area money story fact month lot right
study book eye job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent face
others level office door health person art war history party result change morning reason research girl
guy moment air teacher force education foot boy age policy process music market sense nation plan college
interest death experience effect use class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm difference
value building action model season society tax director position player record paper space ground form
event official matter center couple site project activity star table need court oil situation cost industry
figure street image phone data picture practice piece land product doctor wall patient worker news test
movie north love support technology step baby computer type attention film tree source organization hair
window evidence population site river island mountain garden kitchen bridge library museum station market
summer winter spring autumn morning evening quickly slowly carefully always never often sometimes usually
small large old new young good great little long high different important early public bad same able
explain describe compare summarize consider imagine remember notice answer discuss improve build measure
""".split()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    """An inclusive integer range; each request draws uniformly from it."""

    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class SLO(_Strict):
    """Per-request targets: a request counts towards goodput when it meets both."""

    ttft_ms: float = Field(gt=0, description="time to first token target (ms)")
    tpot_ms: float = Field(gt=0, description="time per output token target (ms)")


class Profile(_Strict):
    """A load profile: the request mix, the lengths, the sampling settings and the SLOs."""

    name: str
    description: str = ""
    seed: int = 0
    num_prompts: int = Field(64, ge=1, description="distinct requests; the run cycles through them in order")
    endpoints: dict[Endpoint, float] = Field(default_factory=lambda: {"chat": 1.0},
                                             description="relative weight of each endpoint")
    system_prompt: str | None = None
    prompt_words: Range
    output_tokens: Range
    temperature: float = Field(0.0, ge=0)
    ignore_eos: bool = True
    slo: SLO

    @model_validator(mode="after")
    def _weights(self) -> "Profile":
        if not self.endpoints or any(w < 0 for w in self.endpoints.values()) or sum(self.endpoints.values()) <= 0:
            raise ValueError("endpoints needs at least one positive weight, none negative")
        return self

    def plan(self) -> list["PlannedRequest"]:
        """The profile's fixed request list (``num_prompts`` entries, same for the same seed)."""
        rng = random.Random(self.seed)
        names, weights = zip(*sorted(self.endpoints.items()))
        out = []
        for i in range(self.num_prompts):
            endpoint = rng.choices(names, weights)[0]
            words = rng.randint(self.prompt_words.min, self.prompt_words.max)
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            max_tokens = rng.randint(self.output_tokens.min, self.output_tokens.max)
            out.append(PlannedRequest(i, endpoint, text, max_tokens))
        return out


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a profile: which endpoint, the prompt text, how many tokens to generate."""

    index: int
    endpoint: Endpoint
    text: str
    max_tokens: int

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS[self.endpoint]

    def body(self, model: str, profile: Profile) -> dict:
        """The JSON body: streaming with usage, the profile's sampling settings, a fixed length."""
        body: dict = {"model": model, "max_tokens": self.max_tokens, "temperature": profile.temperature,
                      "ignore_eos": profile.ignore_eos, "stream": True, "stream_options": {"include_usage": True},
                      "seed": profile.seed + self.index}
        if self.endpoint == "chat":
            system = [{"role": "system", "content": profile.system_prompt}] if profile.system_prompt else []
            body["messages"] = [*system, {"role": "user", "content": self.text}]
        else:
            body["prompt"] = self.text
        return body


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (``loadtests/profiles/<name>.yaml``) or from a YAML file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no load profile {str(name_or_path)!r} (known: {known}, or a YAML path)")
    return Profile(**(yaml.safe_load(path.read_text()) or {}))
