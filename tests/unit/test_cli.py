"""The sparse-compress command line on the tiny model: eval stores results, info shows them,
export writes a plain checkpoint, bad input gives one clear error line."""

from __future__ import annotations

import json
import shutil

import pytest

from compress.checkpoint import MANIFEST_NAME, load_manifest
from compress.cli import main


@pytest.fixture()
def tiny_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_eval_stores_results_that_accumulate(tiny_copy, capsys):
    assert main(["eval", str(tiny_copy), "--seq-len", "32", "--max-windows", "2", "--tasks", "piqa",
                 "--limit", "3", "--dtype", "float32"]) == 0
    assert main(["eval", str(tiny_copy), "--seq-len", "64", "--max-windows", "1", "--dtype", "float32"]) == 0
    evaluation = load_manifest(tiny_copy).evaluation
    assert {"perplexity/eval@32", "perplexity/eval@64", "zeroshot/piqa"} <= set(evaluation)
    assert evaluation["perplexity/eval@32"]["windows"] == 2
    assert evaluation["zeroshot/piqa"]["items"] == 3
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line)["perplexity"]["seq_len"] == 64

    assert main(["info", str(tiny_copy)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 3 and info["linear_sparsity"] == 0.0
    assert "perplexity/eval@64" in info["evaluation"]


def test_eval_on_a_user_text_file(tiny_copy, tmp_path, capsys):
    text = tmp_path / "mine.txt"
    text.write_text("A first small document about pruning.\n\nA second one about serving models fast.\n")
    assert main(["eval", str(tiny_copy), "--split", str(text), "--seq-len", "16", "--no-store",
                 "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["perplexity"]["split"] == str(text) and report["perplexity"]["windows"] == 4
    assert not (tiny_copy / MANIFEST_NAME).exists()


@pytest.mark.parametrize("argv, message", [
    (["eval", "/no/such/dir"], "neither a local checkpoint directory nor a bundled model"),
    (["eval", "TINY", "--tasks", "nope"], "unknown task 'nope'"),
    (["eval", "TINY", "--split", "/no/such.txt"], "no/such.txt"),
])
def test_bad_input_is_one_clear_error(tiny_copy, capsys, argv, message):
    argv = [str(tiny_copy) if a == "TINY" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_export_dense_writes_plain_checkpoint(tiny_copy, tmp_path, capsys):
    assert main(["export", str(tiny_copy), "-o", str(tmp_path / "plain"), "--dense"]) == 0
    assert (tmp_path / "plain" / "config.json").is_file()
    assert not (tmp_path / "plain" / MANIFEST_NAME).exists()


SMALL_CAL = ["--set", "calibration.samples=4", "--set", "calibration.seq_len=32"]


def test_prune_writes_checkpoint_report_and_plot(tiny_copy, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_copy), "-o", str(out), "--method", "wanda", "--sparsity", "0.6",
                 "--allocation", "owl", *SMALL_CAL]) == 0
    manifest = load_manifest(out)
    assert manifest.recipe["method"] == "wanda" and manifest.recipe["calibration"]["samples"] == 4
    assert all(info.storage == "sparse-bitmask" for info in manifest.linears.values())
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["layers"]) == 3 and report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert (out / "prune_report.png").stat().st_size > 1000
    assert not (tmp_path / "pruned.partial").exists()  # state removed after success
    assert main(["eval", str(out), "--seq-len", "32", "--max-windows", "1", "--dtype", "float32"]) == 0
    assert "perplexity/eval@32" in load_manifest(out).evaluation


def test_prune_recipe_file_and_flag_override(tiny_copy, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: magnitude\nsparsity: 0.7\nallocation: atp\natp:\n  beta: 0.1\n")
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_copy), "-o", str(out), "--recipe", str(recipe), "--sparsity", "0.5",
                 *SMALL_CAL]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["layer_rates"] == pytest.approx([0.4, 0.5, 0.6])


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--set", "atp.bogus=1"], "atp.bogus"),
    (["--allocation", "atp", "--set", "atp.beta=0.9"], "legal range"),
    (["--recipe", "/no/recipe.yaml"], "does not exist"),
])
def test_prune_bad_input(tiny_copy, tmp_path, capsys, extra, message):
    assert main(["prune", str(tiny_copy), "-o", str(tmp_path / "o"), *SMALL_CAL, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_prune_refuses_to_ignore_an_interrupted_run(tiny_copy, tmp_path, capsys):
    (tmp_path / "o.partial").mkdir()
    assert main(["prune", str(tiny_copy), "-o", str(tmp_path / "o"), *SMALL_CAL]) == 2
    assert "--resume" in capsys.readouterr().err
