"""LoSA: sparse LoRA recovery whose adapters merge into the sparse weights without densifying them.

See ``../shared/docs/algorithms.md`` section 3. The parts, each usable alone:
:mod:`compress.losa.layer` (the mask-aware LoRA layer over peft),
:mod:`compress.losa.schedule` (pure functions: cubic sparsity schedule, nested
pruning, reconstruction error, rank allocation), :mod:`compress.losa.data`
(training text or JSONL instructions), :mod:`compress.losa.train` (the
fine-tuning loop), :mod:`compress.losa.recipe` (the typed recipe) and
:mod:`compress.losa.job` (the progressive rounds, baselines, resume, output).
"""
