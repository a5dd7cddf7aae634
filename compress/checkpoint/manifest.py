"""The versioned JSON manifest that sits next to a sparse-serve checkpoint's weights.

Contract: ``sparse_serve_manifest.json`` describes what the offline
``compress`` step produced - the recipe that made it, every decoder linear's
shape, sparsity, sparsity pattern and storage layout, every layer's structure
and the evaluation results - so the server and humans never have to guess
from file names. Its schema is :class:`Manifest` (unknown keys rejected).

``load_manifest`` upgrades manifests written by older sparse-serve versions
through :data:`UPGRADES` (one function per old ``format_version``, each
returning the next version's dict), refuses manifests from a newer
sparse-serve, and turns every defect (invalid JSON, missing, unknown or
mistyped field) into a :class:`CheckpointError` that names the file, the field
path and the fix.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.adapter import LayerStructure

MANIFEST_NAME = "sparse_serve_manifest.json"
FORMAT_VERSION = 1

Pattern = Literal["dense", "unstructured", "2:4", "4:8"]
Storage = Literal["dense", "sparse-bitmask"]

#: N:M patterns we recognise, tried in this order (a 2:4 weight is also 4:8)
NM_PATTERNS: dict[str, tuple[int, int]] = {"2:4": (2, 4), "4:8": (4, 8)}
#: an N:M weight's sparsity must lie within this of (M - N) / M
NM_SPARSITY_TOLERANCE = 0.02
#: below this fraction of zeros a weight is called "dense"
DENSE_BELOW = 0.01


class CheckpointError(RuntimeError):
    """A checkpoint directory or its manifest is unusable; the message says why and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LinearInfo(_Strict):
    """One decoder linear: its weight's shape, sparsity, pattern and storage layout."""

    shape: tuple[int, int]
    sparsity: float = Field(ge=0.0, le=1.0)
    pattern: Pattern
    storage: Storage


class LayerInfo(_Strict):
    """The structure of one decoder layer (mirrors :class:`LayerStructure`)."""

    index: int = Field(ge=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    o_proj_bias: bool
    down_proj_bias: bool

    @classmethod
    def from_structure(cls, index: int, structure: LayerStructure) -> "LayerInfo":
        return cls(index=index, **structure.to_dict())

    def to_structure(self) -> LayerStructure:
        return LayerStructure(**self.model_dump(exclude={"index"}))


class Manifest(_Strict):
    """Everything sparse-serve records about a checkpoint; every field is required on disk."""

    format_version: int
    created_by: str
    created_at: str
    base_model: str | None
    recipe: dict[str, Any]
    linears: dict[str, LinearInfo]
    layers: list[LayerInfo]
    evaluation: dict[str, Any]
    extra: dict[str, Any]

    @classmethod
    def new(cls, *, linears: dict[str, LinearInfo], layers: list[LayerInfo],
            recipe: dict[str, Any] | None = None, base_model: str | None = None,
            evaluation: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> "Manifest":
        """A current-version manifest stamped with this sparse-serve's version and the time now."""
        return cls(format_version=FORMAT_VERSION, created_by=f"sparse-serve {package_version()}",
                   created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   base_model=base_model, recipe=dict(recipe or {}), linears=linears, layers=layers,
                   evaluation=dict(evaluation or {}), extra=dict(extra or {}))

    def layer_structures(self) -> list[LayerStructure]:
        return [info.to_structure() for info in sorted(self.layers, key=lambda i: i.index)]


def package_version() -> str:
    try:
        return metadata.version("sparse-serve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


# -- sparsity patterns ----------------------------------------------------------

def is_n_of_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive inputs of every row has at most ``n`` nonzeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzeros = (weight != 0).view(rows, cols // m, m).sum(dim=-1)  # [R, C/m]
    return bool((nonzeros <= n).all())


def detect_pattern(weight: torch.Tensor, sparsity: float | None = None) -> Pattern:
    """Name the sparsity pattern of a 2-D weight ``[out, in]``."""
    if sparsity is None:
        sparsity = float((weight == 0).float().mean())
    if sparsity < DENSE_BELOW:
        return "dense"
    for name, (n, m) in NM_PATTERNS.items():
        near_target = abs(sparsity - (m - n) / m) <= NM_SPARSITY_TOLERANCE
        if near_target and is_n_of_m(weight, n, m):
            return name  # type: ignore[return-value]
    return "unstructured"


def describe_linear(weight: torch.Tensor, storage: Storage) -> LinearInfo:
    """The manifest entry of one linear's weight."""
    sparsity = float((weight == 0).float().mean())
    return LinearInfo(shape=(int(weight.shape[0]), int(weight.shape[1])), sparsity=sparsity,
                      pattern=detect_pattern(weight, sparsity), storage=storage)


# -- reading and writing --------------------------------------------------------

#: ``UPGRADES[v]`` turns a version-``v`` manifest dict into a version ``v+1`` one.
#: Version 1 is the first format, so nothing needs upgrading yet; add
#: ``UPGRADES[1] = _v1_to_v2`` here when format 2 appears.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def upgrade_manifest(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """Bring a manifest dict to :data:`FORMAT_VERSION`, or raise a :class:`CheckpointError`."""
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: field 'format_version' is missing or not an integer "
                              f"(got {version!r}); the manifest is damaged. Re-create the checkpoint "
                              f"with sparse-compress, or delete {path.name} to load the weights as a plain "
                              "Hugging Face checkpoint.")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} was written by a newer sparse-serve "
                              f"(this one, {package_version()}, reads up to {FORMAT_VERSION}); "
                              "upgrade sparse-serve to load it.")
    while version < FORMAT_VERSION:
        step = UPGRADES.get(version)
        if step is None:
            raise CheckpointError(f"{path}: format_version {version} is not a known sparse-serve manifest "
                                  f"version (known: 1..{FORMAT_VERSION}); re-create the checkpoint.")
        raw = step(raw)
        version = raw["format_version"]
    return raw


def _field_path(loc: tuple[int | str, ...]) -> str:
    """``('linears', 'model.x.weight', 'sparsity')`` -> ``linears['model.x.weight'].sparsity``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "." in part or not part.isidentifier():
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out or "<root>"


def _describe_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors()[:5]:
        got = "" if item["type"] == "missing" else f" (got {item.get('input')!r:.80})"
        lines.append(f"  - {_field_path(tuple(item['loc']))}: {item['msg']}{got}")
    more = err.error_count() - len(lines)
    return "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")


def parse_manifest(text: str, path: Path) -> Manifest:
    """Validate manifest JSON text read from ``path`` (used for error messages)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                              "the file is damaged or truncated. Re-create the checkpoint with "
                              f"sparse-compress, or delete {path.name} to load the weights as a plain "
                              "Hugging Face checkpoint.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}; re-create the checkpoint.")
    raw = upgrade_manifest(raw, path)
    try:
        return Manifest.model_validate_json(json.dumps(raw))  # JSON mode: arrays may fill tuples
    except ValidationError as err:
        raise CheckpointError(f"{path}: invalid manifest:\n{_describe_errors(err)}\n"
                              "Fix or remove the named fields (see compress/checkpoint/manifest.py for the "
                              "schema), re-create the checkpoint with sparse-compress, or delete "
                              f"{path.name} to load the weights as a plain Hugging Face checkpoint.") from None


def load_manifest(directory: str | Path) -> Manifest:
    """Read and validate ``<directory>/sparse_serve_manifest.json``."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest; {directory} is not a sparse-serve checkpoint.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the manifest ({err}); check the file.") from None
    return parse_manifest(text, path)


def save_manifest(directory: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest`` as indented JSON into ``directory`` and return its path."""
    path = Path(directory) / MANIFEST_NAME
    data = manifest.model_dump(mode="json")
    path.write_text(json.dumps(_finite(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
