"""The sampler: one engine step's logits in, one token (and optionally its logprobs) per sequence out.

Contract: :func:`sample` takes ``logits: [B, V]`` (any float dtype; computed in float32, float64 for the
sampling CDF) and one :class:`SamplingRow` per row, and never modifies ``logits``. It follows vLLM's
semantics, in this order:

1. Logit processing, per row, on the raw logits: repetition penalty (HF/vLLM style, over prompt *and*
   output tokens: a positive logit is divided by the penalty, a non-positive one multiplied), then
   ``frequency_penalty * count`` and ``presence_penalty * seen`` over *output* tokens subtracted, then
   EOS ids and ``stop_token_ids`` set to ``-inf`` while ``len(output_ids) < min_tokens`` (regardless of
   ``ignore_eos``, as vLLM does).
2. Greedy rows (``temperature < 1e-5``; vLLM's ``_SAMPLING_EPS``, so 0 and denormal-small temperatures
   alike) take ``argmax`` of the processed logits, lowest index on ties. Without any processing the
   result is exactly ``torch.argmax`` of the raw logits, and an all-greedy, unprocessed batch costs one
   ``argmax`` over ``[B, V]``.
3. Random rows: divide by temperature, keep ``top_k`` (0 or -1: off; ties at the k-th value are kept),
   then ``top_p`` (the smallest highest-probability set whose mass reaches ``top_p``, at least one
   token), then ``min_p`` (drop tokens with prob < ``min_p * max prob``), then sample from the softmax
   by inverse CDF: one ``u ~ U[0, 1)`` per row picks the token whose cumulative-probability interval
   holds ``u`` (two levels: blocks of 256 tokens, then float64 within the block). ``u`` comes from the
   row's own generator (one draw per step), so a seeded row draws the same tokens whatever else is in
   the batch; rows without a generator use the global RNG. (The exponential race ``argmax(probs / q)``
   is equivalent but draws V random numbers per row: ~60 ms a step for B = 64, V = 50k on one core.)
4. Logprobs (rows with ``params.logprobs`` set) are vLLM's default "raw logprobs": ``log_softmax`` of the
   raw logits, before penalties, bans, temperature and truncation - the model's own distribution,
   reported for the token actually sampled plus the ``params.logprobs`` best tokens, best first.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from sparse_serve.outputs import TokenLogprob
from sparse_serve.sampling_params import SamplingParams

#: temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``); dividing by them would overflow
GREEDY_EPS = 1e-5
#: how many of the most probable tokens top-p looks at first (it grows the set when they hold too little)
TOP_P_CANDIDATES = 256
#: tokens per block of the two-level inverse-CDF draw
CDF_BLOCK = 256
_GOLDEN64 = 0x9E3779B97F4A7C15  # splitmix64 increment: spreads choice indices over the seed space
_U64 = 1 << 64


@dataclass
class SamplingRow:
    """What the sampler needs about one running sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]  # tokens generated so far by this sequence (before this step)
    generator: torch.Generator | None  # per-sequence, from :func:`make_generator`; None -> global RNG


@dataclass
class SampleOutput:
    """The step's tokens, one per row, and their logprobs (None where a row asked for none)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def make_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A CPU generator for choice ``index`` of a request seeded with ``seed``; None when unseeded.

    Choice 0 is seeded with ``seed`` itself; choice i with ``seed + i * golden64`` (mod 2**64), so the
    choices of one request draw different streams and every stream is reproducible.
    """
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed + index * _GOLDEN64) % _U64)


def is_greedy(params: SamplingParams) -> bool:
    """Whether the row takes the argmax (temperature 0, or too small to divide by)."""
    return params.temperature < GREEDY_EPS


# ---------------------------------------------------------------------------------------------------
# Logit processing (one row at a time, in place on a float32 row)
# ---------------------------------------------------------------------------------------------------


def _ids(ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """In-vocabulary ids as a LongTensor (ids outside [0, V) cannot be penalized or banned)."""
    t = torch.as_tensor(list(ids), dtype=torch.long, device=device)
    return t[(t >= 0) & (t < vocab)]


def apply_repetition_penalty_(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """HF/vLLM repetition penalty on the tokens in ``seen``: logit > 0 -> logit / p, else logit * p."""
    # logits: [V] float32; seen: [S] long (duplicates allowed)
    idx = torch.unique(seen)
    vals = logits[idx]
    logits[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)


def apply_frequency_presence_(logits: torch.Tensor, output: torch.Tensor, freq: float, pres: float) -> None:
    """Subtract ``freq * count(t)`` and ``pres * [count(t) > 0]`` for every token t in ``output``."""
    # logits: [V] float32; output: [S] long
    counts = torch.bincount(output, minlength=logits.shape[0]).to(logits.dtype)  # [V]
    logits -= freq * counts + pres * (counts > 0).to(logits.dtype)


def banned_ids(row: SamplingRow, eos_token_ids: Collection[int]) -> list[int]:
    """EOS and stop token ids while the row is below ``min_tokens``; otherwise none."""
    if len(row.output_ids) >= row.params.min_tokens:
        return []
    return [*eos_token_ids, *row.params.stop_token_ids]


def needs_processing(row: SamplingRow, eos_token_ids: Collection[int]) -> bool:
    """Whether :func:`apply_penalties_` would change this row's logits."""
    p = row.params
    penalized = p.repetition_penalty != 1.0 or (
        bool(row.output_ids) and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)
    )
    return penalized or bool(banned_ids(row, eos_token_ids))


def apply_penalties_(logits: torch.Tensor, row: SamplingRow, eos_token_ids: Collection[int]) -> None:
    """Step 1 of the contract on one row, in place: repetition, frequency/presence, min_tokens bans."""
    # logits: [V] float32
    p, vocab, dev = row.params, logits.shape[0], logits.device
    if p.repetition_penalty != 1.0:
        seen = _ids([*row.prompt_ids, *row.output_ids], vocab, dev)
        apply_repetition_penalty_(logits, seen, p.repetition_penalty)
    if row.output_ids and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        output = _ids(row.output_ids, vocab, dev)
        apply_frequency_presence_(logits, output, p.frequency_penalty, p.presence_penalty)
    ban = banned_ids(row, eos_token_ids)
    if ban:
        logits[_ids(ban, vocab, dev)] = float("-inf")


# ---------------------------------------------------------------------------------------------------
# Truncation and sampling (vectorized over the random rows)
# ---------------------------------------------------------------------------------------------------


def apply_top_k_(logits: torch.Tensor, top_k: torch.Tensor) -> None:
    """Keep each row's ``top_k`` largest logits (ties at the k-th value kept); k >= V means off."""
    # logits: [R, V] float32; top_k: [R] long in [1, V]
    vocab = logits.shape[1]
    if bool((top_k >= vocab).all()):
        return
    kmax = int(top_k.max())
    top = logits.topk(kmax, dim=-1).values  # [R, kmax], descending
    kth = top.gather(1, (top_k - 1).clamp(max=kmax - 1)[:, None])  # [R, 1]
    logits.masked_fill_((logits < kth) & (top_k < vocab)[:, None], float("-inf"))


def apply_top_p_(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = TOP_P_CANDIDATES) -> None:
    """Nucleus: keep the smallest highest-probability set with mass >= ``top_p`` (always >= 1 token).

    Exact, without sorting the whole vocabulary in the usual case: the nucleus is searched among the
    ``candidates`` most probable tokens (one ``topk``), a set grown 16x (to all of V past V/4) until
    every active row's candidates hold ``top_p`` of the mass; every token outside them then has at least
    ``top_p`` of mass before it and would be dropped anyway.
    """
    # logits: [R, V] float32; top_p: [R] float32 in (0, 1]
    active = top_p < 1.0  # [R]
    if not bool(active.any()):
        return
    probs = logits.softmax(dim=-1)  # [R, V]
    vocab, k = logits.shape[1], min(candidates, logits.shape[1])
    while True:
        top_probs, top_idx = probs.topk(k, dim=-1)  # [R, k], descending
        cum = top_probs.cumsum(dim=-1)  # [R, k]
        if k == vocab or bool(((cum[:, -1] >= top_p) | ~active).all()):
            break
        k = vocab if 16 * k > vocab // 4 else 16 * k  # past V/4, a full sort costs no more
    keep_sorted = (cum - top_probs) < top_p[:, None]  # mass of the strictly better tokens < top_p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_idx, keep_sorted)  # [R, V]
    logits.masked_fill_(~keep & active[:, None], float("-inf"))


def apply_min_p_(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below ``min_p`` times the row's largest probability."""
    # logits: [R, V] float32; min_p: [R] float32 in [0, 1]
    if not bool((min_p > 0).any()):
        return
    probs = logits.softmax(dim=-1)  # [R, V]
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [R, 1]
    logits.masked_fill_(probs < threshold, float("-inf"))


def uniforms(rows: Sequence[SamplingRow], device: torch.device) -> torch.Tensor:
    """One ``u ~ U[0, 1)`` per row (float64): the row's generator if it has one, else the global RNG."""
    u = torch.empty(len(rows), dtype=torch.float64)  # [R]
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for i, r in enumerate(rows):
        if r.generator is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=r.generator, device=r.generator.device).item()
    return u.to(device)


def _interval_search(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index i with ``cdf[i-1] <= u * total < cdf[i]`` and where ``u * total`` falls in it, as a fraction."""
    # weights: [R, n] >= 0 with a positive sum; u: [R] float64 in [0, 1) -> ([R] long, [R] float64 in [0, 1))
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # [R, n]
    total = cdf[:, -1:]  # [R, 1]
    target = u[:, None] * total  # < total: u <= 1 - 2**-53 and float64 rounding cannot reach total
    idx = torch.searchsorted(cdf, target, right=True)  # [R, 1]; zero-weight entries have empty intervals
    hi = cdf.gather(1, idx)
    lo = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(hi))
    frac = ((target - lo) / (hi - lo)).clamp(0.0, 1.0 - 2.0**-53)  # [R, 1]
    return idx[:, 0], frac[:, 0]


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor, block: int = CDF_BLOCK) -> torch.Tensor:
    """Token i of each row with ``cdf[i-1] <= u * total < cdf[i]``; zero-probability tokens never win.

    Two levels, so no float64 copy of the whole ``[R, V]``: ``u`` picks a block of ``block`` tokens by the
    blocks' masses, then where it fell inside that block's interval picks the token by a float64 cumsum of
    that block alone.
    """
    # probs: [R, V] >= 0 (rows need not be normalized); u: [R] float64 in [0, 1) -> [R] long
    rows, vocab = probs.shape
    if vocab <= block:
        return _interval_search(probs, u)[0]
    padded = torch.nn.functional.pad(probs, (0, -vocab % block))  # [R, NB * block], zero tail
    blocks = padded.view(rows, -1, block)  # [R, NB, block]
    b, frac = _interval_search(blocks.sum(dim=-1), u)  # [R], [R]
    inner = blocks[torch.arange(rows, device=probs.device), b]  # [R, block]
    return b * block + _interval_search(inner, frac)[0]


def random_sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, then one inverse-CDF draw per row; returns token ids ``[R]``."""
    # logits: [R, V] float32, a private copy (modified in place)
    vocab, dev = logits.shape[1], logits.device
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32, device=dev)
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], device=dev)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=dev)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32, device=dev)
    logits.div_(temps[:, None])
    apply_top_k_(logits, top_k.clamp(max=vocab))
    apply_top_p_(logits, top_p)
    apply_min_p_(logits, min_p)
    probs = logits.softmax(dim=-1)  # [R, V]
    return inverse_cdf_sample(probs, uniforms(rows, dev))


# ---------------------------------------------------------------------------------------------------
# Logprobs and the entry point
# ---------------------------------------------------------------------------------------------------


def raw_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprob]:
    """``log_softmax`` of the raw logits at the sampled tokens, plus each row's ``k`` best, best first."""
    # logits: [R, V] (raw); token_ids: [R] long
    lp = logits.float().log_softmax(dim=-1)  # [R, V]
    chosen = lp.gather(1, token_ids[:, None])[:, 0].tolist()  # [R]
    kmax = min(max(ks), lp.shape[1])
    top_lp, top_ids = lp.topk(kmax, dim=-1)  # [R, kmax], descending
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token_id=t, logprob=c, top=list(zip(top_ids[i][:k], top_lp[i][:k])))
        for i, (t, c, k) in enumerate(zip(token_ids.tolist(), chosen, ks))
    ]


def _processed(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Collection[int]
) -> torch.Tensor:
    """A float32 copy of ``logits`` with step 1 applied to the rows that need it."""
    # logits: [B, V] -> [B, V] float32
    out = logits.to(torch.float32, copy=True)
    for b, row in enumerate(rows):
        if needs_processing(row, eos_token_ids):
            apply_penalties_(out[b], row, eos_token_ids)
    return out


def plain_greedy(rows: Sequence[SamplingRow], eos_token_ids: Collection[int]) -> bool:
    """Whether every row takes the argmax of its raw logits and nothing else from them (greedy, no penalty
    or ban, no logprobs): then the model may pick the tokens itself (``ModelRunner.execute(argmax=True)``)."""
    return bool(rows) and all(is_greedy(r.params) and r.params.logprobs is None
                              and not needs_processing(r, eos_token_ids) for r in rows)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` (the first maximum of each row; a NaN counts as the maximum), through numpy on
    CPU: its SIMD argmax took 4 us on SmolLM2's 49152 float32 logits where torch's reduction took 45 us."""
    # x: [B, V] float32 -> [B] long
    if x.device.type != "cpu":
        return x.argmax(dim=-1)
    return torch.from_numpy(x.contiguous().numpy().argmax(axis=-1))


def select_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Collection[int]
) -> torch.Tensor:
    """Steps 1-3 of the contract: one token id per row, ``[B]`` long."""
    # logits: [B, V]
    greedy = [is_greedy(r.params) for r in rows]
    if all(greedy) and not any(needs_processing(r, eos_token_ids) for r in rows):
        return argmax_rows(logits.float())  # fast path; the f32 cast is exact and beats a bf16 argmax
    work = _processed(logits, rows, eos_token_ids)  # [B, V] float32
    if all(greedy):
        return argmax_rows(work)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)  # [B]
    g_idx = [b for b, g in enumerate(greedy) if g]
    r_idx = [b for b, g in enumerate(greedy) if not g]
    if g_idx:
        tokens[g_idx] = argmax_rows(work[g_idx])
    tokens[r_idx] = random_sample(work[r_idx], [rows[b] for b in r_idx])
    return tokens


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Collection[int]) -> SampleOutput:
    """Pick one token per row of ``logits`` (see the module contract); ``logits`` is left unchanged."""
    # logits: [B, V], B == len(rows)
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        want = f"[B, V] with B == len(rows) == {len(rows)}"
        raise ValueError(f"logits must be {want}, got {tuple(logits.shape)}")
    if not rows:
        return SampleOutput(token_ids=[], logprobs=[])
    tokens = select_tokens(logits, rows, eos_token_ids)  # [B]
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    lp_idx = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    if lp_idx:
        ks = [rows[b].params.logprobs for b in lp_idx]
        for b, lp in zip(lp_idx, raw_logprobs(logits[lp_idx], tokens[lp_idx], ks)):
            logprobs[b] = lp
    return SampleOutput(token_ids=tokens.tolist(), logprobs=logprobs)
