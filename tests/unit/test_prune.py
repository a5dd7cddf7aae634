"""Whole-model pruning on the tiny model: the runner, every allocation end to end, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from compress.adapter import get_adapter
from compress.sparsity import prune as prune_mod
from compress.sparsity.prune import prune_model
from compress.sparsity.recipe import parse_recipe
from compress.sparsity.runner import SequentialRunner, Visit

SMALL = {"calibration": {"samples": 4, "seq_len": 32, "batch_size": 2}}


def recipe(**fields):
    return parse_recipe({**SMALL, **fields})


def linear_weights(model):
    return {n: model.get_parameter(n).detach().clone() for n in get_adapter(model).linear_weight_names()}


def test_runner_without_changes_reproduces_the_model(tiny_model):
    ids = torch.randint(3, 250, (3, 20))
    runner = SequentialRunner(tiny_model, ids, batch_size=2, progress=False)
    runner.run(lambda i, layer, r: Visit())
    captured = []
    last = get_adapter(tiny_model).layers()[-1]
    handle = last.register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        tiny_model(input_ids=ids)
    handle.remove()
    assert torch.allclose(runner.hidden, captured[0], atol=1e-5)  # [N, T, D] output of the last layer


@pytest.mark.parametrize("allocation, extra", [
    ("uniform", {}),
    ("owl", {}),
    ("atp", {"atp": {"beta": 0.1}}),
    ("atp", {"atp": {"step": 0.1, "selection_seq_len": 64, "selection_windows": 2}}),
    ("rmi", {"rmi": {"samples": 4}}),
    ("explicit", {"rates": [0.5, 0.6, 0.7]}),
])
def test_every_allocation_hits_the_target(tiny_model, tiny_tokenizer, allocation, extra):
    report = prune_model(tiny_model, tiny_tokenizer, recipe(method="wanda", sparsity=0.6, allocation=allocation,
                                                            **extra), progress=False)
    assert sum(report.layer_rates) / 3 == pytest.approx(0.6, abs=1e-9)
    assert report.achieved_sparsity == pytest.approx(0.6, abs=0.01)
    for layer in report.layers:
        assert layer["reconstruction_error"] > 0
        for sparsity in layer["linears"].values():
            assert sparsity == pytest.approx(layer["rate"], abs=0.01)
    if allocation == "atp":
        assert report.layer_rates == sorted(report.layer_rates)
    if "step" in extra.get("atp", {}):
        # the grid stops before beta = 0.4, which would prune the whole last layer (0.6 + 0.4)
        assert [row["beta"] for row in report.allocation["search"]] == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_prunes_every_group(tiny_model, tiny_tokenizer, method):
    report = prune_model(tiny_model, tiny_tokenizer, recipe(method=method, pattern="2:4"), progress=False)
    assert report.target_sparsity == 0.5
    for weight in linear_weights(tiny_model).values():
        groups = (weight != 0).view(weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())


def test_targets_and_ignore(tiny_model, tiny_tokenizer):
    prune_model(tiny_model, tiny_tokenizer, recipe(sparsity=0.5, ignore=["re:mlp\\.down_proj"]), progress=False)
    for name, weight in linear_weights(tiny_model).items():
        zeros = float((weight == 0).float().mean())
        assert zeros == (0.0 if "down_proj" in name else pytest.approx(0.5, abs=0.01))


def test_resume_after_interruption_gives_the_same_weights(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    r = recipe(method="sparsegpt", sparsity=0.6, allocation="owl")
    reference = fresh()
    prune_model(reference, tiny_tokenizer, r, progress=False)

    real_prune_layer = prune_mod.prune_layer
    calls = {"n": 0}

    def crash_on_second_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real_prune_layer(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "prune_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        prune_model(fresh(), tiny_tokenizer, r, state_dir=tmp_path / "state", progress=False, persist_every_s=0)
    monkeypatch.setattr(prune_mod, "prune_layer", real_prune_layer)
    resumed = fresh()
    progress = json.loads((tmp_path / "state" / "layers" / "progress.json").read_text())
    assert progress["next_layer"] == 1  # layer 0 was checkpointed before the interruption
    report = prune_model(resumed, tiny_tokenizer, r, state_dir=tmp_path / "state", progress=False, persist_every_s=0)
    assert [layer["index"] for layer in report.layers] == [0, 1, 2]
    for name, weight in linear_weights(reference).items():
        assert torch.equal(weight, resumed.get_parameter(name)), name


def test_state_of_another_job_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    monkeypatch.setattr(prune_mod, "prune_layer", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prune_model(model, tiny_tokenizer, recipe(sparsity=0.5), state_dir=tmp_path / "s", progress=False)
    monkeypatch.undo()
    # the interrupted job had persisted nothing past allocation; make it look like layer 0 finished
    (tmp_path / "s" / "layers").mkdir(parents=True, exist_ok=True)
    (tmp_path / "s" / "layers" / "progress.json").write_text('{"job_id": "other", "next_layer": 1, "outcomes": []}')
    with pytest.raises(ValueError, match="another job"):
        prune_model(model, tiny_tokenizer, recipe(sparsity=0.5), state_dir=tmp_path / "s", progress=False)


@pytest.mark.parametrize("fields, message", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"method": "obs"}, "method"),
    ({"allocation": "atp", "sparsity": 0.7, "atp": {"beta": 0.5}}, "beta"),
    ({"bogus": 1}, "bogus"),
    ({"atp": {"nope": 1}}, "atp.nope"),
    ({"pattern": "2:4", "allocation": "owl"}, "allocation: uniform"),
    ({"allocation": "explicit", "rates": [0.5, 0.5]}, "3 layers"),
    ({"calibration": {"source": "eval"}}, "eval split"),
    ({"calibration": {"samples": 1, "seq_len": 10_000_000}}, "tokens"),
])
def test_bad_input_fails_before_any_work(tiny_model, tiny_tokenizer, fields, message, monkeypatch):
    monkeypatch.setattr(prune_mod, "SequentialRunner", None)  # any work would crash differently
    before = linear_weights(tiny_model)
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_model, tiny_tokenizer, parse_recipe({**SMALL, **fields}), progress=False)
    after = linear_weights(tiny_model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_unsupported_model_is_refused(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(ValueError, match="not supported"):
        prune_model(gpt2, tiny_tokenizer, recipe(), progress=False)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_better_than_wanda(tiny_model_dir, tiny_tokenizer, sparsity):
    from transformers import AutoModelForCausalLM

    errors = {}
    for method in ("wanda", "sparsegpt"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        r = recipe(method=method, sparsity=sparsity, dtype="float32",
                   calibration={"samples": 16, "seq_len": 64, "batch_size": 4})
        errors[method] = [layer["reconstruction_error"] for layer in prune_model(model, tiny_tokenizer, r,
                                                                                progress=False).layers]
    # layer 0 sees the same (dense) input under both methods: the like-for-like comparison
    assert errors["sparsegpt"][0] < errors["wanda"][0]
    assert all(s < w for s, w in zip(errors["sparsegpt"], errors["wanda"]))
