"""Structured pruning (FLAP, Wanda-sp) on the tiny model: statistics, bias compensation, parameter
targets, GQA-consistent surgery, checkpoint round trip, resume and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from compress.adapter import get_adapter
from compress.checkpoint import load_checkpoint, load_manifest, save_checkpoint
from compress.cli import main
from compress.structured import flap as flap_mod
from compress.structured.flap import (
    apply_plans, calibration_ids, linear_params, plan_context, statistics, structured_prune,
)
from compress.structured.planning import InfeasibleTarget, keep_counts, plan_layers
from compress.structured.recipe import FlapRecipe, parse_structured
from compress.structured.scoring import METRICS, UnitSet, layer_scores
from compress.structured.stats import ChannelStats
from compress.structured.surgery import compensation_bias, complement, group_channels, layer_geometry

SMALL = {"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4}, "mlp_multiple": 8, "min_mlp_width": 8,
         "dtype": "float32"}
IDS = torch.tensor([[5, 17, 101, 33, 250, 7, 64, 12, 90, 41, 3, 200]])


def recipe(**fields) -> FlapRecipe:
    return parse_structured(FlapRecipe, {**SMALL, **fields})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# -- pure functions ---------------------------------------------------------------------------------
def test_channel_stats_stream_equals_torch_on_all_tokens():
    torch.manual_seed(0)
    x = torch.randn(5, 37, 11, dtype=torch.float64) * 3 + torch.arange(11)  # [B, T, C]
    stats = ChannelStats.empty(11)
    for chunk in (x[:1], x[1:3, :10], x[1:3, 10:], x[3:]):  # uneven batches
        stats.update(chunk)
    flat = x.reshape(-1, 11)
    assert stats.count == flat.shape[0]
    assert torch.allclose(stats.mean, flat.mean(0), atol=1e-12)
    assert torch.allclose(stats.variance, flat.var(0), atol=1e-10)
    assert torch.allclose(stats.mean_square, flat.pow(2).mean(0), atol=1e-10)
    weight = torch.randn(4, 11, dtype=torch.float64)
    assert torch.allclose(METRICS["wifv"](weight, stats), flat.var(0) * weight.pow(2).sum(0))
    assert torch.allclose(METRICS["wifn"](weight, stats), weight.abs().mean(0) * flat.pow(2).mean(0).sqrt())
    assert torch.allclose(METRICS["ifv"](weight, stats), flat.var(0))


def test_bias_compensation_is_exact_when_removed_channels_sit_at_their_mean():
    torch.manual_seed(1)
    weight = torch.randn(6, 10, dtype=torch.float64)  # [out, C]
    x = torch.randn(50, 10, dtype=torch.float64)  # [tokens, C]
    removed = torch.tensor([1, 4, 7, 8])
    x[:, removed] = torch.tensor([0.5, -2.0, 3.0, 1.25], dtype=torch.float64)  # constant channels
    stats = ChannelStats.empty(10)
    stats.update(x)
    kept = complement(removed, 10)
    bias = compensation_bias(weight, removed, stats.mean)
    assert torch.allclose(x[:, kept] @ weight[:, kept].T + bias, x @ weight.T, atol=1e-12)
    # in general the compensated output keeps the dense output's mean over the tokens exactly
    y = torch.randn(50, 10, dtype=torch.float64)
    stats = ChannelStats.empty(10)
    stats.update(y)
    bias = compensation_bias(weight, removed, stats.mean)
    assert torch.allclose((y[:, kept] @ weight[:, kept].T + bias).mean(0), (y @ weight.T).mean(0), atol=1e-12)


def test_keep_counts_takes_the_best_prefix_nearest_the_budget():
    a = UnitSet(torch.tensor([3.0, 1.0, -1.0]), torch.tensor([2, 0, 1]), cost=10)
    b = UnitSet(torch.tensor([2.0, 0.0, -2.0]), torch.tensor([0, 1, 2]), cost=4)
    assert keep_counts([a, b], [0, 0], budget=14) == [1, 1]  # 3.0 (10) + 2.0 (4)
    assert keep_counts([a, b], [0, 0], budget=18) == [1, 1]  # adding a's 1.0 would reach 24, farther from 18
    assert keep_counts([a, b], [0, 0], budget=21) == [2, 1]
    assert keep_counts([a, b], [1, 1], budget=0) == [1, 1]  # the forced units stay
    assert keep_counts([a, b], [0, 0], budget=1000) == [3, 3]


def test_group_channels_follow_hf_repeat_kv():
    # 2 KV groups of 2 query heads of size 3: group 1 owns query heads 2 and 3 -> channels 6..11
    assert group_channels([1], 2, 3).tolist() == list(range(6, 12))
    assert group_channels([0, 1], 1, 3).tolist() == list(range(6))


def test_layer_scores_standardize_and_block():
    attn = torch.tensor([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])  # 2 groups of 3 channels
    mlp = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    s = layer_scores(attn, mlp, num_groups=2, multiple=2, group_cost=7, channel_cost=1)
    assert s.groups.order.tolist() == [1, 0] and s.groups.scores[0] > 0 > s.groups.scores[1]
    assert s.channel_order.tolist() == [0, 2, 4, 3, 1, 5] and s.blocks.cost == 2
    assert torch.all(s.blocks.scores[:-1] >= s.blocks.scores[1:])


# -- whole model ----------------------------------------------------------------------------------------
def _input_means(model, ids):
    """Plain torch means of every layer's o_proj / down_proj inputs on the dense model."""
    adapter = get_adapter(model)
    sums: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(adapter.layers()):
        for rel in ("self_attn.o_proj", "mlp.down_proj"):
            handles.append(layer.get_submodule(rel).register_forward_pre_hook(
                lambda _m, args, key=(i, rel): sums.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return {key: torch.cat(v).double().mean(0) for key, v in sums.items()}


def test_flap_bias_equals_the_removed_channels_mean_contribution(tiny_model, tiny_tokenizer):
    r = recipe(ratio=0.4)
    dense = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    means = _input_means(tiny_model, calibration_ids(tiny_tokenizer, r))
    stats = statistics(tiny_model, tiny_tokenizer, r, None, "", False)
    adapter = get_adapter(tiny_model)
    plans = plan_layers(plan_context(adapter, stats, r), "al-am", r.ratio)
    apply_plans(tiny_model, plans, stats, bias_compensation=True)
    removed_any = False
    for i, plan in enumerate(plans):
        geo_heads = 2  # query heads per KV group of the tiny model
        q_kept = group_channels(plan.kv_groups, geo_heads, 24)
        for rel, kept, width in (("self_attn.o_proj", q_kept, 96), ("mlp.down_proj",
                                                                    torch.tensor(plan.mlp_channels), 200)):
            prefix = f"model.layers.{i}.{rel}"
            assert torch.allclose(stats[i].attn.mean if "o_proj" in rel else stats[i].mlp.mean, means[(i, rel)],
                                  atol=1e-6)
            removed = complement(kept, width)
            removed_any |= len(removed) > 0
            expected = dense[f"{prefix}.weight"].double()[:, removed] @ means[(i, rel)][removed]
            assert torch.allclose(tiny_model.get_parameter(f"{prefix}.bias").double(), expected, atol=1e-5)
            assert torch.equal(tiny_model.get_parameter(f"{prefix}.weight"), dense[f"{prefix}.weight"][:, kept])
    assert removed_any


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
@pytest.mark.parametrize("bias", [True, False])
def test_al_am_parameter_count_within_one_unit_of_the_target(tiny_model, tiny_tokenizer, ratio, bias):
    adapter = get_adapter(tiny_model)
    geo = layer_geometry(adapter, 0)
    unit = max(geo.group_cost, 8 * geo.channel_cost)  # a KV group or a block of 8 MLP channels
    before = sum(linear_params(adapter, i) for i in range(adapter.num_layers))
    report = structured_prune(tiny_model, tiny_tokenizer, recipe(ratio=ratio, bias_compensation=bias), progress=False)
    after = sum(linear_params(adapter, i) for i in range(adapter.num_layers))
    assert report.params_before == before and report.params_after == after
    assert abs(after - (1 - ratio) * before) <= unit
    for layer in report.layers:
        assert layer["intermediate_size"] % 8 == 0 and layer["intermediate_size"] >= 8
        assert layer["num_kv_heads"] >= 1 and layer["o_proj_bias"] == bias


def test_gqa_groups_stay_consistent(tiny_model, tiny_tokenizer):
    dense_model = type(tiny_model)(tiny_model.config).eval()
    dense_model.load_state_dict(tiny_model.state_dict())
    dense = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    report = structured_prune(tiny_model, tiny_tokenizer, recipe(method="flap", structure="ul-um", ratio=0.5,
                                                                 bias_compensation=False), progress=False)
    adapter = get_adapter(tiny_model)
    handles = []
    for i, layer in enumerate(report.layers):
        s = adapter.layer_structure(i)
        assert s.num_kv_heads == 1 and s.num_heads == 2  # one whole KV group of two query heads removed
        kept = layer["kv_groups_kept"]
        q_rows, kv_rows = group_channels(kept, 2, 24), group_channels(kept, 1, 24)
        p = f"model.layers.{i}.self_attn"
        assert torch.equal(tiny_model.get_parameter(f"{p}.q_proj.weight"), dense[f"{p}.q_proj.weight"][q_rows])
        assert torch.equal(tiny_model.get_parameter(f"{p}.k_proj.weight"), dense[f"{p}.k_proj.weight"][kv_rows])
        assert torch.equal(tiny_model.get_parameter(f"{p}.v_proj.weight"), dense[f"{p}.v_proj.weight"][kv_rows])
        # the dense model with the removed heads' and channels' outputs zeroed computes the same function
        q_keep = torch.zeros(96, dtype=torch.bool)
        q_keep[q_rows] = True
        mlp_keep = torch.zeros(200, dtype=torch.bool)
        gate = tiny_model.get_parameter(f"model.layers.{i}.mlp.gate_proj.weight")
        dense_gate = dense[f"model.layers.{i}.mlp.gate_proj.weight"]
        for row in gate:
            mlp_keep[int((dense_gate == row).all(dim=1).nonzero()[0])] = True
        dense_layer = get_adapter(dense_model).layers()[i]
        handles.append(dense_layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args, keep=q_keep: (args[0] * keep,)))
        handles.append(dense_layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, keep=mlp_keep: (args[0] * keep,)))
    assert torch.allclose(logits(tiny_model), logits(dense_model), atol=1e-5)
    for h in handles:
        h.remove()


def test_saved_checkpoint_reloads_to_identical_outputs(tiny_model, tiny_tokenizer, tmp_path):
    report = structured_prune(tiny_model, tiny_tokenizer, recipe(ratio=0.5), progress=False)
    expected = logits(tiny_model)
    save_checkpoint(tiny_model, tiny_tokenizer, tmp_path / "ckpt", recipe=report.recipe)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    layers = config["sparse_serve_layers"]
    assert [layer["intermediate_size"] for layer in layers] == [r["intermediate_size"] for r in report.layers]
    assert all(layer["o_proj_bias"] and layer["down_proj_bias"] for layer in layers)
    manifest = load_manifest(tmp_path / "ckpt")
    assert [info.num_heads for info in manifest.layers] == [r["num_heads"] for r in report.layers]
    loaded = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32).model
    assert torch.equal(logits(loaded), expected)


def test_wanda_sp_is_sequential_uniform_and_resumes_identically(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                monkeypatch):
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    r = recipe(method="wanda-sp", ratio=0.3)
    assert (r.metric, r.structure, r.bias_compensation, r.sequential) == ("wanda", "ul-um", False, True)
    whole = fresh()
    report = structured_prune(whole, tiny_tokenizer, r, progress=False)
    widths = {layer["intermediate_size"] for layer in report.layers}
    assert len(widths) == 1 and all(not layer["o_proj_bias"] for layer in report.layers)
    assert all("reconstruction_error" in layer for layer in report.layers)

    real = flap_mod.install_pruned
    calls = []

    def crash_on_layer_2(adapter, index, plan, means):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt
        return real(adapter, index, plan, means)

    monkeypatch.setattr(flap_mod, "install_pruned", crash_on_layer_2)
    with pytest.raises(KeyboardInterrupt):
        structured_prune(fresh(), tiny_tokenizer, r, state_dir=tmp_path / "state", progress=False,
                         persist_every_s=0)
    assert calls == [0, 1, 2]
    calls.clear()
    monkeypatch.setattr(flap_mod, "install_pruned", lambda *a: calls.append(a[1]) or real(*a))
    resumed = fresh()
    structured_prune(resumed, tiny_tokenizer, r, state_dir=tmp_path / "state", progress=False, persist_every_s=0)
    assert calls == [2]  # layers 0 and 1 came back from the state directory
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_flap_statistics_are_cached_and_reused(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    r = recipe(ratio=0.3)
    first = statistics(tiny_model, tiny_tokenizer, r, tmp_path, "job", False)
    monkeypatch.setattr(flap_mod, "observe", lambda *a: pytest.fail("statistics recomputed"))
    again = statistics(tiny_model, tiny_tokenizer, r, tmp_path, "job", False)
    assert all(torch.equal(a.mlp.m2, b.mlp.m2) for a, b in zip(first, again))


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, error, message", [
    ({"ratio": 0.9, "structure": "ul-um"}, InfeasibleTarget, "would keep 0 of the 2 KV groups"),
    ({"ratio": 0.97}, InfeasibleTarget, "cannot be reached"),
    ({"mlp_multiple": 32}, ValueError, "mlp_multiple 32 does not divide the MLP width 200"),
    ({"min_kv_groups": 3}, ValueError, "min_kv_groups 3 exceeds"),
    ({"structure": "layer-rates", "rates": [0.2, 0.2]}, ValueError, "one rate per layer (3)"),
])
def test_bad_input_fails_clearly(tiny_model, tiny_tokenizer, fields, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        structured_prune(tiny_model, tiny_tokenizer, recipe(**fields), progress=False)


@pytest.mark.parametrize("fields, message", [
    ({"nope": 1}, "nope: Extra inputs are not permitted"),
    ({"ratio": 1.0}, "ratio"),
    ({"structure": "al-am", "sequential": True}, "al-am ranks all layers at once"),
    ({"calibration": {"source": "eval"}}, "the eval split is for evaluation only"),
    ({"rates": [0.1, 0.2, 0.3]}, "rates are only used with structure: layer-rates"),
])
def test_recipe_rejects_bad_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        parse_structured(FlapRecipe, fields)


# -- command line -------------------------------------------------------------------------------------------
def test_cli_flap_then_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "flap"
    argv = ["flap", str(tiny_model_dir), "-o", str(out), "--ratio", "0.4", "--mlp-multiple", "8",
            "--min-mlp-width", "8", "--dtype", "float32", "--set", "calibration.samples=8",
            "--set", "calibration.seq_len=32"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(summary["achieved_ratio"] - 0.4) < 0.06
    for name in ("structured_report.json", "structured_report.png", "config.json"):
        assert (out / name).is_file()
    assert not (tmp_path / "flap.partial").exists()
    assert load_manifest(out).extra["structured_report"]["target_ratio"] == 0.4
    assert main(["eval", str(out), "--seq-len", "32", "--max-windows", "2", "--dtype", "float32"]) == 0
    assert "perplexity/eval@32" in load_manifest(out).evaluation

    assert main(argv[:3] + [str(tmp_path / "nb"), *argv[4:], "--method", "wanda-sp", "--no-sequential"]) == 0
    assert not any(layer["o_proj_bias"] for layer in load_manifest(tmp_path / "nb").extra
                   ["structured_report"]["layers"])


def test_cli_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    assert main(["flap", str(tmp_path / "model"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mlp_multiple 32 does not divide" in err and "Traceback" not in err
