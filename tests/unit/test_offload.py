"""Offloaded pruning: decoder layers on the meta device, one in memory, the same result as in memory."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from compress.checkpoint import CheckpointError, load_checkpoint, load_manifest
from compress.checkpoint.layerwise import OffloadedLayers, open_layerwise
from compress.eval.perplexity import perplexity, windows_of
from compress.sparsity import prune as prune_mod
from compress.sparsity.job import run_prune_job
from compress.sparsity.prune import streamed_perplexity
from compress.sparsity.recipe import parse_recipe
from compress.sparsity.runner import SequentialRunner

SMALL = {"calibration": {"samples": 4, "seq_len": 32, "batch_size": 2}}
SEARCH = {"atp": {"step": 0.1, "selection_seq_len": 64, "selection_windows": 2}}


def recipe(**fields):
    return parse_recipe({**SMALL, **fields})


def weights_of(path):
    return load_checkpoint(path, dtype=None).model.state_dict()


def assert_same_checkpoint(a, b):
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert load_manifest(a).linears == load_manifest(b).linears


@pytest.mark.parametrize("method, allocation, extra", [
    ("wanda", "uniform", {}),
    ("sparsegpt", "owl", {}),
    ("wanda", "atp", SEARCH),
    ("magnitude", "rmi", {"rmi": {"samples": 4}}),
])
def test_offloaded_prune_equals_in_memory(tiny_model_dir, tmp_path, method, allocation, extra):
    r = recipe(method=method, sparsity=0.6, allocation=allocation, **extra)
    in_memory = run_prune_job(tiny_model_dir, r, tmp_path / "memory", progress=False)
    offloaded = run_prune_job(tiny_model_dir, r, tmp_path / "offload", progress=False, offload=True)
    assert offloaded.layer_rates == in_memory.layer_rates
    assert offloaded.achieved_sparsity == pytest.approx(in_memory.achieved_sparsity, abs=1e-12)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "offload")
    assert not (tmp_path / "offload.partial").exists()


def test_offload_holds_one_layer_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    materialised: list[int] = []
    real_open = OffloadedLayers.open

    def counting_open(self, index, layer):
        real_open(self, index, layer)
        materialised.append(sum(any(p.device.type != "meta" for p in lay.parameters())
                                for lay in self.adapter.layers()))

    monkeypatch.setattr(OffloadedLayers, "open", counting_open)
    report = run_prune_job(tiny_model_dir, recipe(method="wanda", sparsity=0.5, allocation="atp", **SEARCH),
                           tmp_path / "out", progress=False, offload=True)
    betas = len(report.allocation["search"])
    assert betas >= 3
    # dense statistics, one selection perplexity per beta, the prune: 3 layers each
    assert len(materialised) == 3 * (1 + betas + 1)
    assert max(materialised) == 1


def test_offloaded_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path, monkeypatch):
    r = recipe(method="sparsegpt", sparsity=0.6)
    run_prune_job(tiny_model_dir, r, tmp_path / "reference", progress=False)
    real_prune_layer = prune_mod.prune_layer
    calls = {"n": 0}

    def crash_on_third_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_prune_layer(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "prune_layer", crash_on_third_layer)
    with pytest.raises(KeyboardInterrupt):
        run_prune_job(tiny_model_dir, r, tmp_path / "out", progress=False, offload=True, persist_every_s=0)
    monkeypatch.setattr(prune_mod, "prune_layer", real_prune_layer)
    report = run_prune_job(tiny_model_dir, r, tmp_path / "out", resume=True, progress=False, offload=True)
    assert [layer["index"] for layer in report.layers] == [0, 1, 2]
    assert_same_checkpoint(tmp_path / "reference", tmp_path / "out")


def test_streamed_perplexity_equals_the_whole_model(tiny_model):
    stream = torch.randint(3, 250, (1, 203))
    direct = perplexity(tiny_model, stream, seq_len=40, progress=False).ppl
    runner = SequentialRunner(tiny_model, windows_of(stream, 40), batch_size=2, progress=False)
    assert streamed_perplexity(runner) == pytest.approx(direct, rel=1e-5)


def test_open_layerwise_leaves_layers_on_meta(tiny_model_dir):
    loaded, store = open_layerwise(tiny_model_dir)
    layers = store.adapter.layers()
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert loaded.model.get_input_embeddings().weight.device.type == "cpu"
    store.open(1, layers[1])
    full = load_checkpoint(tiny_model_dir).model.state_dict()
    for name, tensor in layers[1].state_dict().items():
        assert torch.equal(tensor, full[f"{store.adapter.layer_prefix(1)}.{name}"]), name


def test_open_layerwise_checks_every_layer_before_work(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    victim = next(name for name in weights if ".layers.2." in name)
    del weights[victim]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lack"):
        open_layerwise(broken)


def test_offloaded_prune_needs_a_state_dir(tiny_model_dir, tiny_tokenizer):
    loaded, store = open_layerwise(tiny_model_dir)
    with pytest.raises(ValueError, match="state_dir"):
        prune_mod.prune_model(loaded.model, tiny_tokenizer, recipe(), store=store, progress=False)
