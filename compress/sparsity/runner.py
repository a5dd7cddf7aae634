"""The sequential calibration loop shared by every layer-wise compression method.

Contract: calibration hidden states flow through the decoder one layer at a
time. For layer i a *visitor* may attach hooks and call
:meth:`SequentialRunner.forward` to see the layer's inputs (the outputs of the
already-compressed layers 0..i-1) and it then changes the layer in place; the
runner re-runs the calibration batch through the changed layer, and those
outputs become layer i+1's inputs. Memory stays near one layer's activations
plus the hidden states ``[N, T, D]``. Architecture facts come from the model
adapter; the runner never assumes a layer count or size.

A visitor that leaves its layer unchanged may hand back the outputs it already
computed (``Visit.outputs``) and the runner skips the re-run.

With a ``state_dir`` the runner writes every visited layer's weights, and
every ``persist_every_s`` seconds (0: after every layer) a checkpoint of the
hidden states and the outcomes, so an interrupted run resumes at the layer
after the last checkpoint and produces the same weights as an uninterrupted
one. The hidden states are the large part (``[N, T, D]`` float32, 151 MB for
128 x 512 tokens of a 576-wide model), which is why they are not written after
every layer. The state is keyed by a fingerprint of the job (recipe, model,
calibration); a state written for another job is refused, never silently
reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from compress.adapter import ModelAdapter, get_adapter


class _Captured(Exception):
    """Raised by the layer-0 hook to stop the forward pass once inputs are captured."""


@dataclass
class Visit:
    """What a visitor returns: facts for the report and, optionally, the layer's outputs
    before it changed the layer (the runner then measures the reconstruction error)."""

    facts: dict[str, Any] = field(default_factory=dict)
    reference: Tensor | None = None  # [N, T, D]
    outputs: Tensor | None = None  # [N, T, D] outputs of the *unchanged* layer: the runner skips the re-run


@dataclass
class LayerOutcome:
    """What happened to one layer (facts + ``reconstruction_error`` when measured)."""

    index: int
    facts: dict[str, Any] = field(default_factory=dict)


Visitor = Callable[[int, nn.Module, "SequentialRunner"], Visit]


class LayerStore:
    """Where decoder layers live between visits; this default keeps them all in memory.

    ``open`` makes layer ``index`` usable before its visit; ``close`` is called
    after the runner is done with it (``saved``: the file holding its current
    weights, or None when the runner keeps no state); ``restore`` puts back a
    layer finished by an interrupted run.
    """

    offloads: ClassVar[bool] = False

    def open(self, index: int, layer: nn.Module) -> None:
        """Make ``layer`` usable (in memory it already is)."""

    def close(self, index: int, layer: nn.Module, saved: Path | None) -> None:
        """Done with ``layer`` for now (in memory: keep it)."""

    def restore(self, index: int, layer: nn.Module, saved: Path) -> None:
        """Load the weights a previous run finished for ``layer``."""
        layer.load_state_dict(load_file(str(saved)))


def relative_error(reference: Tensor, output: Tensor) -> float:
    """||reference - output||^2 / ||reference||^2 over all tokens and channels."""
    ref = reference.float()
    return float((ref - output.float()).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts and tensors."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class SequentialRunner:
    """Runs calibration token ids through a model's decoder layers one at a time."""

    def __init__(self, model: nn.Module, token_ids: Tensor, batch_size: int = 8,
                 hidden_dtype: torch.dtype = torch.float32, state_dir: str | Path | None = None,
                 job_id: str = "", progress: bool = True, persist_every_s: float = 60.0,
                 store: LayerStore | None = None):
        self.model = model
        self.adapter: ModelAdapter = get_adapter(model)
        self.token_ids = token_ids  # [N, T]
        self.batch_size = batch_size
        self.hidden_dtype = hidden_dtype
        self.state_dir = Path(state_dir) if state_dir else None
        self.job_id = job_id or fingerprint(token_ids)
        self.progress = progress
        self.persist_every_s = persist_every_s
        self.store = store or LayerStore()
        self._last_persist = time.monotonic()
        self.hidden: Tensor | None = None  # [N, T, D] inputs of the current layer
        self.layer_kwargs: dict[str, Any] = {}
        self.outcomes: list[LayerOutcome] = []

    # -- inputs ---------------------------------------------------------------
    @torch.no_grad()
    def capture_inputs(self) -> None:
        """Embed the calibration batch: self.hidden = inputs of layer 0, plus its kwargs."""
        layer0 = self.adapter.layers()[0]
        chunks: list[Tensor] = []

        def hook(_module, args, kwargs):
            chunks.append(args[0].to(self.hidden_dtype) if args else kwargs["hidden_states"].to(self.hidden_dtype))
            if not self.layer_kwargs:
                self.layer_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Captured

        handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in self.token_ids.split(1):  # batch 1: kwargs then broadcast over any batch
                try:
                    self.model(input_ids=batch.to(self._device()), use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()
        self.layer_kwargs["use_cache"] = False
        self.layer_kwargs.pop("past_key_values", None)
        self.hidden = torch.cat(chunks)  # [N, T, D]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- forward ----------------------------------------------------------------
    @torch.no_grad()
    def forward(self, layer: nn.Module, inputs: Tensor | None = None) -> Tensor:
        """Run ``inputs`` (default: the current hidden states) [N, T, D] through ``layer``."""
        inputs = self.hidden if inputs is None else inputs
        dtype = next(layer.parameters()).dtype
        outs = [layer(chunk.to(self._device(), dtype), **self.layer_kwargs).to(self.hidden_dtype)
                for chunk in inputs.split(self.batch_size)]
        return torch.cat(outs)

    # -- the loop ----------------------------------------------------------------
    def run(self, visit: Visitor, desc: str = "layers") -> list[LayerOutcome]:
        """Visit every layer in order, propagating the visited layers' outputs."""
        layers = self.adapter.layers()
        start = self._resume(layers)
        if self.hidden is None:
            self.capture_inputs()
        for i in tqdm(range(start, len(layers)), desc=desc, disable=not self.progress,
                      initial=start, total=len(layers), unit="layer"):
            self.store.open(i, layers[i])
            visit_result = visit(i, layers[i], self)
            outputs = visit_result.outputs
            self.hidden = self.forward(layers[i]) if outputs is None else outputs
            facts = dict(visit_result.facts)
            if visit_result.reference is not None:
                facts["reconstruction_error"] = relative_error(visit_result.reference, self.hidden)
            self.outcomes.append(LayerOutcome(i, facts))
            saved = self._persist(i, layers[i], last=i == len(layers) - 1)
            self.store.close(i, layers[i], saved)
        return self.outcomes

    def layer_file(self, index: int) -> Path:
        """Where the state directory keeps layer ``index``'s visited weights."""
        assert self.state_dir is not None
        return self.state_dir / f"layer_{index:04d}.safetensors"

    # -- persistence ---------------------------------------------------------------
    def _progress_file(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "progress.json"

    def _persist(self, index: int, layer: nn.Module, last: bool) -> Path | None:
        """Write the layer's weights; checkpoint hidden states + outcomes when due (or at the end)."""
        if self.state_dir is None:
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}
        path = self.layer_file(index)
        save_file(tensors, str(path))
        if not last and time.monotonic() - self._last_persist < self.persist_every_s:
            return path
        self._last_persist = time.monotonic()
        tmp = self.state_dir / "hidden.pt.part"
        torch.save(self.hidden, tmp)
        tmp.replace(self.state_dir / "hidden.pt")
        record = {"job_id": self.job_id, "next_layer": index + 1,
                  "outcomes": [{"index": o.index, "facts": o.facts} for o in self.outcomes]}
        part = self._progress_file().with_suffix(".part")
        part.write_text(json.dumps(record, default=float))
        part.replace(self._progress_file())
        return path

    def _resume(self, layers: nn.ModuleList) -> int:
        """Restore finished layers and hidden states; return the first layer to visit."""
        if self.state_dir is None or not self._progress_file().is_file():
            return 0
        record = json.loads(self._progress_file().read_text())
        if record.get("job_id") != self.job_id:
            raise ValueError(f"{self.state_dir} holds the state of another job (recipe, model or "
                             "calibration differ); delete it or choose another --state-dir to start over")
        done = int(record["next_layer"])
        for i in range(done):
            self.store.restore(i, layers[i], self.layer_file(i))
        self.hidden = torch.load(self.state_dir / "hidden.pt")
        self.outcomes = [LayerOutcome(o["index"], o["facts"]) for o in record["outcomes"]]
        if done < len(layers) or not self.layer_kwargs:
            self._capture_kwargs_only()
        return done

    @torch.no_grad()
    def _capture_kwargs_only(self) -> None:
        hidden = self.hidden
        saved_ids, self.token_ids = self.token_ids, self.token_ids[:1]
        self.capture_inputs()
        self.token_ids, self.hidden = saved_ids, hidden

    def clear_state(self) -> None:
        """Delete the persisted state (after the result was written)."""
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
