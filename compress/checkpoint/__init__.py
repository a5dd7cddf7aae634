"""Sparse-serve checkpoints: a Hugging Face directory plus a versioned manifest.

Contract: :func:`save_checkpoint` is the only writer and :func:`load_checkpoint`
the only reader of the format the offline ``compress`` step hands to the
``sparse_serve`` server; see :mod:`compress.checkpoint.io` for the layout and
:mod:`compress.checkpoint.manifest` for the manifest schema.
"""

from compress.checkpoint.io import (
    LoadedCheckpoint, checkpoint_nbytes, compress_model_linears, export_dense, load_checkpoint,
    save_checkpoint, weight_files,
)
from compress.checkpoint.manifest import (
    FORMAT_VERSION, MANIFEST_NAME, UPGRADES, CheckpointError, LayerInfo, LinearInfo, Manifest,
    detect_pattern, load_manifest, save_manifest,
)
from compress.checkpoint.summary import describe_checkpoint, store_evaluation

__all__ = [
    "FORMAT_VERSION", "MANIFEST_NAME", "UPGRADES", "CheckpointError", "LayerInfo", "LinearInfo",
    "LoadedCheckpoint", "Manifest", "checkpoint_nbytes", "compress_model_linears", "describe_checkpoint",
    "detect_pattern",
    "export_dense", "load_checkpoint", "load_manifest", "save_checkpoint", "save_manifest",
    "store_evaluation", "weight_files",
]
