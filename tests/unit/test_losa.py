"""LoSA on the tiny model: the masked LoRA layer, the schedule's pure functions, whole runs, resume,
instruction data, the baselines and the command line.

Tolerances (float32 unless stated): a merged linear's outputs match the unmerged masked forward within
atol 1e-5 + rtol 1e-5 (one rounding of W + delta per weight); unmerge restores the base weights
within atol 1e-6 (weights ~0.08, so a few ulps) and their zeros exactly; whole-model logits within 1e-4;
the training forward's gradients match autograd through the float64 formula within 1e-4 (5e-2
under bf16 autocast).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")

from compress.adapter import get_adapter  # noqa: E402
from compress.losa import layer as L  # noqa: E402
from compress.losa.data import IGNORE, InstructionData, open_training_data, parse_instruction, render  # noqa: E402
from compress.losa.job import recover_model  # noqa: E402
from compress.losa.recipe import parse_losa_recipe  # noqa: E402
from compress.losa.schedule import (  # noqa: E402
    allocate_ranks, cubic_schedule, mean_ranks, nested_prune, nested_rates, reconstruction_error,
)
from compress.sparsity import allocation as alloc  # noqa: E402
from compress.sparsity.pruners import InputStats, get_pruner  # noqa: E402

# a LoSA run small enough for the tiny model: 2 rounds of 6 steps, 32-token sequences
SMALL = {"sparsity": 0.6, "rounds": 2, "steps_per_round": 6, "lr": 3e-3, "r_max": 12, "rank_start": 4,
         "rank_step": 4, "error_samples": 2, "dropout": 0.0,
         "calibration": {"samples": 4, "seq_len": 32, "batch_size": 4}, "rmi": {"samples": 4},
         "train": {"seq_len": 32, "batch_size": 4, "gradient_checkpointing": True}, "eval": None}


def recipe(**fields):
    return parse_losa_recipe({**SMALL, **fields})


def pruned_linear(out_f=24, in_f=40, sparsity=0.6, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=True)
    keep = torch.rand(out_f, in_f) >= sparsity
    linear.weight.data *= keep
    return linear


def masked_lora(linear: nn.Linear, r_max=16, rank=None, seed=1) -> L.MaskedLoraLinear:
    from peft import LoraConfig

    lora = L.MaskedLoraLinear(linear, L.ADAPTER, config=LoraConfig(r=r_max, lora_alpha=2 * r_max),
                              r=r_max, lora_alpha=2 * r_max, rank=rank)
    torch.manual_seed(seed)
    nn.init.normal_(lora.lora_B[L.ADAPTER].weight, std=0.05)  # a trained-looking, nonzero B
    return lora


def reference_forward(lora: L.MaskedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """y = W x + ((B A) * M) x * scaling + b, in float64 from the raw tensors."""
    base = lora.get_base_layer()
    k = lora.active_rank
    a = lora.lora_A[L.ADAPTER].weight[:k].double()
    b = lora.lora_B[L.ADAPTER].weight[:, :k].double()
    delta = (b @ a) * lora.lora_mask.double() * lora.scaling[L.ADAPTER]
    return x.double() @ (base.weight.double() + delta).T + base.bias.double()


# -- the layer ------------------------------------------------------------------------------------


def test_merge_keeps_the_zero_pattern_and_the_outputs_and_unmerge_restores():
    linear = pruned_linear()
    original = linear.weight.detach().clone()
    lora = masked_lora(linear)
    mask = lora.lora_mask.clone()
    assert torch.equal(mask, original != 0)
    x = torch.randn(5, 7, 40)  # [B, T, in]
    unmerged = lora(x)
    torch.testing.assert_close(unmerged.double(), reference_forward(lora, x), atol=1e-5, rtol=1e-5)
    lora.merge(safe_merge=True)
    assert lora.merged
    assert torch.equal(linear.weight != 0, mask)  # zeros exactly where the mask drops, nowhere else
    torch.testing.assert_close(lora(x), unmerged, atol=1e-5, rtol=1e-5)  # the merged forward = unmerged
    lora.unmerge()
    torch.testing.assert_close(linear.weight, original, atol=1e-6, rtol=0)
    assert torch.equal(linear.weight[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize("autocast", [False, True])
def test_training_forward_has_the_reference_gradients(autocast):
    lora = masked_lora(pruned_linear(out_f=17, in_f=33), r_max=8, rank=5)
    lora.train()
    x = torch.randn(3, 4, 33, requires_grad=True)
    a, b = lora.lora_A[L.ADAPTER].weight, lora.lora_B[L.ADAPTER].weight
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        lora(x).square().sum().backward()
    got = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
    x.grad = a.grad = b.grad = None
    reference_forward(lora, x).float().square().sum().backward()  # plain autograd through the formula
    tol = {"atol": 0.05, "rtol": 0.05} if autocast else {"atol": 1e-4, "rtol": 1e-4}  # bf16: 8-bit mantissa
    for mine, want in zip(got, [x.grad, a.grad, b.grad]):
        torch.testing.assert_close(mine, want, **tol)
    assert bool((a.grad[5:] == 0).all()) and bool((b.grad[:, 5:] == 0).all())  # sliced-off components


def test_plain_lora_merge_densifies_a_sparse_linear():
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PlainLora

    linear = pruned_linear()
    lora = PlainLora(linear, "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    nn.init.normal_(lora.lora_B["default"].weight, std=0.05)
    lora.merge(safe_merge=True)
    assert float((linear.weight == 0).float().mean()) < 0.01  # was 60% zeros


def test_a_kept_weight_that_merges_to_zero_stays_nonzero():
    linear = pruned_linear()
    lora = masked_lora(linear, rank=1)
    r, c = (lora.lora_mask).nonzero()[0].tolist()
    delta = lora.get_delta_weight(L.ADAPTER)
    linear.weight.data[r, c] = -delta[r, c]  # W + delta == 0 exactly at a kept position
    lora.merge(safe_merge=True)
    assert linear.weight[r, c] != 0 and abs(float(linear.weight[r, c].detach())) <= torch.finfo(torch.float32).tiny
    assert torch.equal(linear.weight != 0, lora.lora_mask)


def test_safe_merge_refuses_non_finite_updates():
    linear = pruned_linear()
    before = linear.weight.detach().clone()
    lora = masked_lora(linear)
    lora.lora_B[L.ADAPTER].weight.data[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        lora.merge(safe_merge=True)
    assert torch.equal(linear.weight, before) and not lora.merged


def test_ranks_above_8_are_sliced_from_r_max_and_never_capped():
    lora = masked_lora(pruned_linear(), r_max=16, rank=12)
    x = torch.randn(3, 40)
    torch.testing.assert_close(lora(x).double(), reference_forward(lora, x), atol=1e-5, rtol=1e-5)
    b = lora.lora_B[L.ADAPTER].weight
    lora.set_rank(5)
    assert bool((b[:, 5:12] == 0).all()) and bool((b[:, :5] != 0).any())  # dropped components zeroed
    with pytest.raises(ValueError, match="r_max"):
        lora.set_rank(17)


def test_whole_model_merge_matches_the_unmerged_forward(tiny_model):
    adapter = get_adapter(tiny_model)
    for layer in adapter.layers():  # a sparse model: 50% of every linear zeroed
        for linear in adapter.linears(layer).values():
            linear.weight.data *= torch.rand_like(linear.weight) >= 0.5
    wrapped = L.wrap_linears(tiny_model, "masked", 16, 2.0, 0.0, [3, 10, 16])
    for lora in wrapped.values():
        nn.init.normal_(lora.lora_B[L.ADAPTER].weight, std=0.02)
    ids = torch.randint(3, 250, (2, 24))
    with torch.no_grad():
        unmerged = tiny_model(input_ids=ids).logits
        L.merge_all(wrapped)
        masks = {name: lora.lora_mask.clone() for name, lora in wrapped.items()}
        L.unwrap_linears(tiny_model)
        merged = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    for name, keep in masks.items():
        assert isinstance(tiny_model.get_submodule(name), nn.Linear)
        assert torch.equal(tiny_model.get_submodule(name).weight != 0, keep)


# -- pure functions -----------------------------------------------------------------------------


def test_cubic_schedule_reaches_the_target_in_the_last_round():
    s = cubic_schedule(0.7, 5)
    assert s == pytest.approx([0.3416, 0.5488, 0.6552, 0.6944, 0.7])
    assert s[-1] == 0.7 and s == sorted(s)
    assert cubic_schedule(0.5, 1) == [0.5]
    assert mean_ranks(6, 1, 5) == [6, 7, 8, 9, 10]


@pytest.mark.parametrize("errors, mean_rank, r_max", [
    ([1.0, 1.0, 1.0], 6, 32),
    ([0.01, 0.02, 5.0, 9.0], 10, 32),  # skewed: the big layers get ranks far above 8
    ([0.0, 0.0, 0.0, 0.0, 0.0], 7, 8),  # no error: equal shares
    ([1e-9, 1.0, 1.0, 1.0], 9, 12),  # clipping at both ends, then repaired
    ([3.0, 1.0, 2.0, 0.5, 0.25, 8.0, 0.1], 8, 16),
])
def test_rank_allocation_sums_exactly_to_the_budget(errors, mean_rank, r_max):
    ranks = allocate_ranks(errors, mean_rank, r_max)
    assert sum(ranks) == mean_rank * len(errors)
    assert all(1 <= r <= r_max for r in ranks)
    order = sorted(range(len(errors)), key=lambda i: errors[i])
    assert [ranks[i] for i in order] == sorted(ranks)  # more error, no smaller rank


def test_rank_allocation_exceeds_8_and_refuses_an_impossible_budget():
    assert max(allocate_ranks([0.1, 0.1, 10.0], 10, 32)) > 8
    with pytest.raises(ValueError, match="raise r_max"):
        allocate_ranks([1.0, 2.0], 10, 8)


def test_nested_rates_keep_the_mean_and_the_floors():
    importance, params = [1.0, 0.5, 2.0, 1.5], [10.0, 10.0, 20.0, 10.0]
    free = nested_rates(importance, 0.6, 0.03, None, params)
    assert free == alloc.solve_allocation_lp(importance, 0.6, 0.03, params)
    floors = [0.62, 0.50, 0.66, 0.55]  # weighted mean 0.598 < 0.6, two floors above the box
    rates = nested_rates(importance, 0.6, 0.03, floors, params)
    assert alloc.weighted_mean(rates, params) == pytest.approx(0.6, abs=1e-12)
    assert all(r >= f - 1e-12 for r, f in zip(rates, floors))


def test_nested_prune_never_revives_a_weight():
    torch.manual_seed(0)
    w = torch.randn(16, 48)
    stats = InputStats.empty(48, with_hessian=True)
    stats.update(torch.randn(64, 48))
    for name in ("wanda", "magnitude", "sparsegpt"):
        pruner = get_pruner(name)
        w1, keep1 = nested_prune(w, torch.ones_like(w, dtype=torch.bool), stats, 0.3, pruner)
        w2, keep2 = nested_prune(w1 + 0.5, keep1, stats, 0.6, pruner)  # old zeros would score high now
        assert not bool((keep2 & ~keep1).any()), name
        assert torch.equal(w2 != 0, keep2) or name == "sparsegpt"
        if name != "sparsegpt":
            assert bool(((~keep2).sum(dim=1) == int(48 * 0.6)).all())  # exactly the row count


def test_reconstruction_error_is_per_channel_normalised():
    y = torch.randn(2, 5, 8)
    assert reconstruction_error(y, y) == 0.0
    scale = torch.tensor([1.0, 1000.0] * 4)
    noise = 0.1 * torch.randn(2, 5, 8)
    assert reconstruction_error(y * scale, (y + noise) * scale) == pytest.approx(reconstruction_error(y, y + noise))


# -- instruction data ------------------------------------------------------------------------------


def test_instruction_records_are_parsed_and_rendered(tiny_tokenizer, tmp_path):
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert parse_instruction(alpaca)[0]["content"] == "Add\n\n2 and 3"
    assert parse_instruction({"instruction": "Hi", "input": "", "output": "Hello"})[0]["content"] == "Hi"
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    assert parse_instruction(chat)[-1] == {"role": "assistant", "content": "Hello"}
    ids, labels = render(tiny_tokenizer, parse_instruction(alpaca), 512)
    learned = tiny_tokenizer.decode(ids[labels != IGNORE])
    assert learned.startswith("5") and "Add" not in learned  # only the answer (and its end marker)
    assert labels[0] == IGNORE and render(tiny_tokenizer, parse_instruction(alpaca), 512, True)[1][0] != IGNORE
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(alpaca) + "\n\n" + json.dumps(chat) + "\n")
    data = open_training_data(str(path), tiny_tokenizer, 64)
    assert isinstance(data, InstructionData) and len(data.records) == 2
    batch = data.batches(0, 1, 3)[0]  # cycles past the two records
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 3
    assert torch.equal(data.batches(1, 2, 2)[1]["input_ids"], data.batches(1, 2, 2)[1]["input_ids"])


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x"}', "'output'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "assistant"),
    ('{"prompt": "x"}', "expected 'messages'"),
    ("{not json", "not valid JSON"),
])
def test_bad_instruction_records_name_the_line(tiny_tokenizer, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        InstructionData(tiny_tokenizer, str(path), 64)
    assert "line 2" in str(err.value)


# -- whole runs -------------------------------------------------------------------------------------


def linear_weights(model):
    return {n: model.get_parameter(n).detach().clone() for n in get_adapter(model).linear_weight_names()}


def test_losa_run_lowers_the_training_loss_and_keeps_the_sparsity(tiny_model, tiny_tokenizer):
    report = recover_model(tiny_model, tiny_tokenizer, recipe(), progress=False)
    assert [r["target"] for r in report.rounds] == pytest.approx(cubic_schedule(0.6, 2))
    for r in report.rounds:
        assert r["loss_after"] < r["loss_before"]  # fine-tuning recovers on the training text
        assert len(r["losses"]) == 6
        assert sum(r["ranks"]) == r["mean_rank"] * 3
        assert r["achieved_sparsity"] == pytest.approx(r["target"], abs=0.01)
    assert report.rounds[1]["mean_rank"] == 8
    final = report.final
    assert final["pattern_preserved"] and final["sparsity_after_merge"] == final["sparsity_before_merge"]
    assert final["sparsity_after_merge"] == pytest.approx(0.6, abs=0.01)
    assert next(tiny_model.parameters()).dtype == torch.bfloat16  # the output dtype
    for name, w in linear_weights(tiny_model).items():
        assert isinstance(tiny_model.get_submodule(name.removesuffix(".weight")), nn.Linear)


def test_plain_lora_baseline_destroys_the_sparsity_and_none_keeps_it(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    plain = recover_model(fresh(), tiny_tokenizer, recipe(mode="lora", rounds=1), progress=False)
    assert plain.final["sparsity_before_merge"] == pytest.approx(0.6, abs=0.01)
    assert plain.final["sparsity_after_merge"] < 0.01 and not plain.final["pattern_preserved"]
    assert plain.rounds[0]["loss_after"] < plain.rounds[0]["loss_before"]
    none = recover_model(fresh(), tiny_tokenizer, recipe(mode="none"), progress=False)
    assert none.final["sparsity_after_merge"] == pytest.approx(0.6, abs=0.01) and none.final["pattern_preserved"]


def test_interrupted_run_resumes_to_the_same_weights(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from compress.losa import job as job_mod

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    r = recipe(steps_per_round=3)
    whole = fresh()
    recover_model(whole, tiny_tokenizer, r, progress=False)
    real, calls = job_mod.train_round, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # dies in round 2's fine-tuning, after round 1 was saved
        return real(*args, **kwargs)

    monkeypatch.setattr(job_mod, "train_round", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover_model(fresh(), tiny_tokenizer, r, state_dir=tmp_path / "state", progress=False)
    monkeypatch.setattr(job_mod, "train_round", real)
    resumed = fresh()
    report = recover_model(resumed, tiny_tokenizer, r, state_dir=tmp_path / "state", progress=False)
    assert len(report.rounds) == 2 and report.rounds[0]["round"] == 1
    for name, w in linear_weights(whole).items():
        assert torch.equal(w, linear_weights(resumed)[name]), name
    with pytest.raises(ValueError, match="another job"):
        recover_model(fresh(), tiny_tokenizer, recipe(steps_per_round=2), state_dir=tmp_path / "state",
                      progress=False)


# -- recipe and command line --------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"bogus": 1}, "bogus"),
    ({"train": {"lr": 1}}, "train.lr"),
    ({"data": "eval"}, "eval split"),
    ({"rank_start": 30, "r_max": 32}, "raise r_max"),
    ({"error_samples": 9}, "error_samples"),
])
def test_bad_recipes_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        parse_losa_recipe({**SMALL, **fields})


def test_cli_writes_a_sparse_checkpoint_with_the_report(tiny_model_dir, tmp_path, capsys):
    from compress.checkpoint import load_checkpoint, load_manifest
    from compress.cli import main

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps({k: v for k, v in SMALL.items() if k != "eval"}))  # JSON is YAML
    out = tmp_path / "losa"
    assert main(["losa", str(tiny_model_dir), "--recipe", str(recipe_file), "-o", str(out), "--no-progress",
                 "--steps-per-round", "2", "--set", "eval.seq_len=32", "--set", "eval.max_windows=1",
                 "--set", "eval.dtype=float32"]) == 0
    manifest = load_manifest(out)
    report = manifest.extra["losa_report"]
    assert [len(r["ranks"]) for r in report["rounds"]] == [3, 3] and report["rounds"][1]["steps"] == 2
    assert manifest.recipe["steps_per_round"] == 2 and manifest.recipe["mode"] == "losa"
    assert all(info.storage == "sparse-bitmask" for info in manifest.linears.values())
    assert "perplexity/eval@32" in manifest.evaluation
    assert (out / "losa_loss.png").stat().st_size > 1000 and (out / "losa_report.json").is_file()
    assert not (tmp_path / "losa.partial").exists()
    loaded = load_checkpoint(out)
    sparsity = report["final"]["sparsity_after_merge"]
    zeros = [float((loaded.model.get_parameter(n) == 0).float().mean()) for n in manifest.linears]
    assert sum(zeros) / len(zeros) == pytest.approx(sparsity, abs=0.01)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "losa"
    assert main(["losa", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--set", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err


def test_benchmark_reports_from_its_rows_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_losa.py"
    rows = tmp_path / "rows.jsonl"
    common = {"windows": 4, "limit": 10, "smoke": False}
    rows.write_text("\n".join(json.dumps({**common, **r}) for r in [
        {"row": "dense", "ppl": 20.0, "seven_task_average": 0.39},
        {"row": "none", "ppl": 500.0, "seven_task_average": 0.33, "sparsity_before_merge": 0.7,
         "sparsity_after_merge": 0.7, "pattern_preserved": True},
        {"row": "losa", "ppl": 100.0, "seven_task_average": 0.35, "sparsity_before_merge": 0.7,
         "sparsity_after_merge": 0.7, "pattern_preserved": True, "recover_seconds": 900.0, "steps": 100,
         "fine_tune_seconds": 500.0},
    ]) + "\n")
    out = subprocess.run([sys.executable, str(script), "--report", "--rows", str(rows), "--windows", "4",
                          "--limit", "10"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    losa = next(line for line in out.stdout.splitlines() if line.startswith("losa"))
    assert "0.20x" in losa and "0.7000" in losa
    assert json.loads(out.stdout.splitlines()[-1])["targets"]["losa_ppl_vs_none"] == pytest.approx(0.2)
    assert rows.with_suffix(".png").is_file()


def test_a_loaded_state_dict_restores_the_mask_everywhere():
    source, target = masked_lora(pruned_linear(seed=0)), masked_lora(pruned_linear(seed=5))
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.lora_mask, source.lora_mask)
    assert torch.equal(target.lora_dropped, ~source.lora_mask)
    x = torch.randn(2, 40)
    torch.testing.assert_close(target(x), source(x))
