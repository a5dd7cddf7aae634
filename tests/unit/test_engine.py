"""The engine core: block manager, scheduler and LLMEngine against a plain transformers forward.

Greedy output through the engine - one request, eight concurrent requests of different lengths, a KV
budget so small that requests are preempted and recomputed, chunked prefill - must equal a greedy loop
over the reference forward of the same weights token for token (fp32, tiny model), for a dense, a
sparse (kernels) and a structurally pruned checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from compress.checkpoint import load_checkpoint
from sparse_serve.block_manager import BlockManager
from sparse_serve.config import CacheConfig, EngineConfig, SchedulerConfig
from sparse_serve.engine import LLMEngine
from sparse_serve.loader import load_for_serving
from sparse_serve.sampling_params import SamplingParams
from sparse_serve.scheduler import Scheduler
from sparse_serve.sequence import Request, Sequence

GREEDY = dict(temperature=0.0, ignore_eos=True)


def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by re-running the full forward each step (no cache): the ground truth."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def run(engine: LLMEngine) -> tuple[dict[str, list[int]], int]:
    """Step until idle; final token ids per request (first choice) and the number of preemptions."""
    done, preemptions = {}, 0
    while engine.has_work():
        outputs, stats = engine.step()
        preemptions += stats.num_preemptions
        for out in outputs:
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done, preemptions


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 33, 1, 40, 9, 64, 23][:count]
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


def engine_for(model, **cfg) -> LLMEngine:
    cache = CacheConfig(**{k: v for k, v in cfg.items() if k in CacheConfig.model_fields})
    sched = SchedulerConfig(**{k: v for k, v in cfg.items() if k in SchedulerConfig.model_fields})
    return LLMEngine(model, eos_token_ids=[2], max_model_len=256, config=EngineConfig(cache=cache, scheduler=sched),
                     dtype=torch.float32)


# -- block manager and scheduler ------------------------------------------------------------------
def test_block_manager_allocates_returns_none_when_full_and_frees():
    blocks = BlockManager(num_blocks=4, block_size=4)
    a, b = [], []
    assert blocks.allocate(a, 9) == [0, 1, 2] and blocks.num_free == 1
    assert blocks.allocate(b, 8) is None and b == [] and blocks.num_free == 1  # nothing changed
    assert blocks.allocate(a, 12) == [] and blocks.usage == 0.75
    blocks.free(a)
    assert a == [] and blocks.num_free == 4 and blocks.allocate(b, 8) is not None


def _seq(n_prompt: int, rid: str) -> Sequence:
    request = Request(rid, list(range(3, 3 + n_prompt)), SamplingParams(max_tokens=4), arrival=0.0)
    request.sequences = [Sequence(request, 0)]
    return request.sequences[0]


def test_scheduler_chunks_prefill_within_the_token_budget_and_caps_sequences():
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=2), BlockManager(64, 4))
    seqs = [_seq(n, str(i)) for i, n in enumerate([7, 6, 3])]
    for s in seqs:
        scheduler.add(s)
    plan = scheduler.schedule()
    assert [(c.seq, c.start, c.num_tokens) for c in plan.chunks] == [(seqs[0], 0, 7), (seqs[1], 0, 3)]
    assert plan.num_tokens == 10 and not plan.chunks[1].completes and len(scheduler.waiting) == 1
    for c in plan.chunks:
        c.seq.num_computed += c.num_tokens
    seqs[0].output_ids.append(5)
    plan = scheduler.schedule()  # decode of seq 0, rest of seq 1's prompt; seq 2 waits (max_num_seqs)
    assert [(c.seq, c.start, c.num_tokens) for c in plan.chunks] == [(seqs[0], 7, 1), (seqs[1], 3, 3)]


def test_scheduler_preempts_the_newest_running_sequence_when_blocks_run_out():
    blocks = BlockManager(num_blocks=3, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), blocks)
    old, new = _seq(4, "old"), _seq(4, "new")
    for s in (old, new):
        scheduler.add(s)
    for c in scheduler.schedule().chunks:
        c.seq.num_computed += c.num_tokens
        c.seq.output_ids.append(7)
    plan = scheduler.schedule()  # old needs a second block; new needs one too; only one is free
    assert [c.seq for c in plan.chunks] == [old] and plan.preempted == [new]
    assert new.num_computed == 0 and new.block_table == [] and scheduler.waiting[0] is new


# -- engine vs the reference forward --------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    {},
    {"block_size": 4, "num_blocks": 40, "max_num_batched_tokens": 16},  # chunked prefill + preemption
    {"block_size": 16, "num_blocks": 12, "max_num_seqs": 3},
], ids=["roomy", "tight-kv", "few-seqs"])
def test_greedy_equals_reference_for_concurrent_requests(tiny_model, cfg):
    engine = engine_for(tiny_model, **cfg)
    batch = prompts(8)
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, SamplingParams(max_tokens=10 + i, **GREEDY))
    got, preemptions = run(engine)
    for i, p in enumerate(batch):
        assert got[str(i)] == reference_greedy(tiny_model, p, 10 + i), f"request {i}"
    if cfg.get("num_blocks") == 40:
        assert preemptions > 0  # the budget really forced recomputation
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every block came back


def test_single_request_and_requests_joining_mid_generation(tiny_model):
    engine = engine_for(tiny_model)
    first, late = prompts(2, seed=3)
    engine.add_request("first", first, SamplingParams(max_tokens=12, **GREEDY))
    for _ in range(4):
        engine.step()
    engine.add_request("late", late, SamplingParams(max_tokens=6, **GREEDY))
    got, _ = run(engine)
    assert got["first"] == reference_greedy(tiny_model, first, 12)
    assert got["late"] == reference_greedy(tiny_model, late, 6)


@pytest.mark.parametrize("kind", ["sparse", "pruned"])
def test_compressed_checkpoints_match_their_reference_forward(pruned_dirs, kind):
    serving = load_for_serving(pruned_dirs / kind, dtype=torch.float32)
    reference = load_checkpoint(pruned_dirs / kind, dtype=torch.float32).model.eval()
    if kind == "sparse":
        assert len(serving.sparse_linears) == 12 and serving.variant == "sparse"  # q/k/v, gate/up fused
    else:
        assert serving.facts["structured"] and serving.facts["heads_per_layer"][0] == 2
    engine = engine_for(serving.model, block_size=4, num_blocks=30, max_num_batched_tokens=16)
    batch = prompts(6, seed=5)
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, SamplingParams(max_tokens=8, **GREEDY))
    got, _ = run(engine)
    for i, p in enumerate(batch):
        assert got[str(i)] == reference_greedy(reference, p, 8), f"{kind} request {i}"


def test_an_activation_without_a_fused_op_runs_through_the_module(tiny_model_dir):
    """A fused gate/up linear with another activation (GELU): the engine calls act_fn itself."""
    serving = load_for_serving(tiny_model_dir, dtype=torch.float32)
    for layer in serving.model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    engine = engine_for(serving.model)
    p = prompts(2, seed=7)[1]
    engine.add_request("r", p, SamplingParams(max_tokens=8, **GREEDY))
    got, _ = run(engine)
    assert got["r"] == reference_greedy(serving.model, p, 8)
    silu = load_for_serving(tiny_model_dir, dtype=torch.float32).model
    assert reference_greedy(silu, p, 8) != got["r"]  # the activation did change the model


# -- requests: stopping, sampling, abort, failures ------------------------------------------------
def test_stop_rules_eos_stop_tokens_min_tokens_and_context(tiny_model):
    p = prompts(1, seed=7)[0]
    free_run = reference_greedy(tiny_model, p, 12)
    stop_at = free_run[5]
    engine = engine_for(tiny_model)
    engine.add_request("stop", p, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_at]))
    engine.add_request("min", p, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_at],
                                                min_tokens=free_run.index(stop_at) + 1))
    engine.add_request("len", p, SamplingParams(max_tokens=3, **GREEDY))
    finals = {}
    while engine.has_work():
        for out in engine.step()[0]:
            if out.finished:
                finals[out.request_id] = out.outputs[0]
    first = free_run.index(stop_at)
    assert finals["stop"].token_ids == free_run[:first + 1] and finals["stop"].finish_reason == "stop"
    assert finals["stop"].stop_reason == stop_at
    assert len(finals["min"].token_ids) > first + 1  # the stop token was banned until min_tokens
    assert finals["len"].finish_reason == "length" and len(finals["len"].token_ids) == 3
    with pytest.raises(ValueError, match="256 tokens.*40 tokens"):
        engine.add_request("long", list(range(3, 43)), SamplingParams(max_tokens=250))


def test_seeded_sampling_is_reproducible_and_choices_differ(tiny_model):
    p = prompts(1, seed=9)[0]
    params = dict(temperature=1.0, top_p=0.9, seed=1234, n=3, max_tokens=8, ignore_eos=True)
    results = []
    for other in (False, True):
        engine = engine_for(tiny_model)
        engine.add_request("r", p, SamplingParams(**params))
        if other:  # batch composition must not change a seeded request's tokens
            engine.add_request("noise", prompts(1, seed=11)[0], SamplingParams(max_tokens=8, temperature=1.0))
        outs = {}
        while engine.has_work():
            for out in engine.step()[0]:
                if out.finished and out.request_id == "r":
                    outs = [c.token_ids for c in out.outputs]
        results.append(outs)
    assert results[0] == results[1] and len(results[0]) == 3
    assert len({tuple(t) for t in results[0]}) > 1


def test_abort_frees_blocks_at_once(tiny_model):
    engine = engine_for(tiny_model)
    engine.add_request("a", prompts(1)[0], SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_work()
    _, stats = engine.step()
    assert [s.finish_reason for s in stats.finished] == ["abort"]


def test_a_failing_forward_fails_only_its_requests(tiny_model, monkeypatch):
    engine = engine_for(tiny_model)
    engine.add_request("doomed", prompts(1)[0], SamplingParams(max_tokens=5, **GREEDY))
    real = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda chunks, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    outputs, _ = engine.step()
    assert outputs[0].error and "boom" in outputs[0].error and outputs[0].finished
    assert engine.blocks.num_free == engine.blocks.num_blocks
    monkeypatch.setattr(engine.runner, "execute", real)
    p = prompts(2)[1]
    engine.add_request("fine", p, SamplingParams(max_tokens=4, **GREEDY))
    got, _ = run(engine)
    assert got["fine"] == reference_greedy(tiny_model, p, 4)


def test_logprobs_are_the_reference_log_softmax(tiny_model):
    p = prompts(1, seed=13)[0]
    engine = engine_for(tiny_model)
    engine.add_request("lp", p, SamplingParams(max_tokens=1, logprobs=3, **GREEDY))
    out = run_outputs(engine)["lp"].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(tiny_model(input_ids=torch.tensor([p])).logits[0, -1], -1)
    entry = out.new_logprobs[0]
    assert entry.token_id == int(ref.argmax())
    assert entry.logprob == pytest.approx(float(ref.max()), abs=1e-4)
    assert [t for t, _ in entry.top] == ref.topk(3).indices.tolist()


def run_outputs(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_work():
        for out in engine.step()[0]:
            if out.finished:
                finals[out.request_id] = out
    return finals
