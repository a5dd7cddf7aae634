"""``sparse-compress export --vllm`` (no vLLM needed): the config vLLM needs, the weights untouched,
the input untouched, and bad input refused with one clear line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from compress.checkpoint import load_manifest
from compress.cli import main
from sparse_vllm import ARCHITECTURE, QUANT_METHOD
from sparse_vllm.export import sparse_linears
from sparse_vllm.structure import layer_structures


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_flap_export_names_the_architecture_and_keeps_the_layers(flap_dir, flap_vllm_dir):
    src, out = config_of(flap_dir), config_of(flap_vllm_dir)
    assert out["architectures"] == [ARCHITECTURE] and "quantization_config" not in out
    assert out["sparse_serve_layers"] == src["sparse_serve_layers"]
    structures = layer_structures(out)
    assert structures == load_manifest(flap_dir).layer_structures()
    assert len(set(structures)) > 1 and any(s.o_proj_bias or s.down_proj_bias for s in structures)
    assert {k: v for k, v in out.items() if k != "architectures"} == \
        {k: v for k, v in src.items() if k != "architectures"}


def test_sparse_export_points_at_the_plugin_method_and_leaves_the_input_alone(sparse_dir, tmp_path, capsys):
    before = digests(sparse_dir)
    out = tmp_path / "exported"
    assert main(["export", str(sparse_dir), "-o", str(out), "--vllm"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert digests(sparse_dir) == before
    config = config_of(out)
    block = config["quantization_config"]
    assert config["architectures"] == [ARCHITECTURE] and block["quant_method"] == QUANT_METHOD
    assert block["sparsity_config"] == config_of(sparse_dir)["quantization_config"]["sparsity_config"]
    after = digests(out)
    assert {k: v for k, v in after.items() if k != "config.json"} == {k: v for k, v in before.items()
                                                                        if k != "config.json"}
    linears = sparse_linears(out)
    assert linears and not any("k_proj" in n or "down_proj" in n for n in linears)  # --ignore kept them dense
    assert any("q_proj" in n for n in linears) and any("up_proj" in n for n in linears)


def test_export_refuses_bad_input_with_one_line(sparse_dir, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    assert main(["export", str(sparse_dir), "-o", str(tmp_path / "busy"), "--vllm"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "busy" / "x").read_text() == "keep me"

    qwen = shutil.copytree(sparse_dir, tmp_path / "qwen")
    config = config_of(qwen)
    config["model_type"] = "qwen2"
    (qwen / "config.json").write_text(json.dumps(config))
    assert main(["export", str(qwen), "-o", str(tmp_path / "q-out"), "--vllm"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'qwen2' is not supported by the vLLM plugin" in err and "Traceback" not in err
    assert not (tmp_path / "q-out").exists()

    assert main(["export", str(sparse_dir), "-o", str(sparse_dir), "--vllm"]) == 2
    assert "cannot overwrite its input" in capsys.readouterr().err
