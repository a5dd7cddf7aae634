"""Perplexity and zero-shot scoring on the tiny model, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from compress.data.tasks import MultipleChoiceItem
from compress.eval import EvalConfig, run_evaluation
from compress.eval.perplexity import perplexity, windows_of
from compress.eval.zeroshot import Scored, encode_pair, multiple_choice_accuracy, score_requests


def test_perplexity_equals_mean_transformers_loss(tiny_model):
    torch.manual_seed(1)
    stream = torch.randint(3, 250, (1, 5 * 40 + 17))  # tail of 17 tokens is dropped
    result = perplexity(tiny_model, stream, seq_len=40, progress=False, batch_size=2)
    with torch.no_grad():
        losses = [float(tiny_model(input_ids=w[None], labels=w[None]).loss) for w in windows_of(stream, 40)]
    assert result.windows == 5 and result.tokens == 5 * 39
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_perplexity_max_windows_and_short_text(tiny_model):
    stream = torch.arange(3, 103)[None]
    assert perplexity(tiny_model, stream, seq_len=10, max_windows=3, progress=False).windows == 3
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_model, stream, seq_len=500, progress=False)


@torch.no_grad()
def _direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_batched_scores_equal_unbatched_direct_computation(tiny_model, tiny_tokenizer):
    requests = [("The cat sat on", " the mat"), ("A", " b c d e f g"), ("Question: why?\nAnswer:", " no"),
                ("Short", " and a much longer continuation here")]
    batched = score_requests(tiny_model, tiny_tokenizer, requests, batch_size=3, progress=False)
    for (ctx, cont), got in zip(requests, batched):
        assert got.logprob == pytest.approx(_direct_logprob(tiny_model, tiny_tokenizer, ctx, cont), abs=1e-4)
        assert got.tokens == len(cont.encode())  # byte-level tokenizer: one token per byte


def test_trailing_space_moves_to_continuation(tiny_tokenizer):
    ids_a, n_a = encode_pair(tiny_tokenizer, "Answer: ", "yes", 100)
    ids_b, n_b = encode_pair(tiny_tokenizer, "Answer:", " yes", 100)
    assert ids_a == ids_b and n_a == n_b == 4


def test_greedy_flag_matches_argmax(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer("hello", add_special_tokens=False).input_ids
    logits = tiny_model(input_ids=torch.tensor([ids])).logits[0]
    best = int(logits[-1].argmax())
    cont = tiny_tokenizer.decode([best])
    [scored] = score_requests(tiny_model, tiny_tokenizer, [("hello", cont)], progress=False)
    assert scored.greedy


def test_accuracy_and_length_normalisation():
    items = [MultipleChoiceItem(("q",) * 2, (" a", " bbbbbbbbb"), label=1),
             MultipleChoiceItem(("q",) * 2, (" x", " y"), label=0)]
    scores = [Scored(-1.0, False, 1), Scored(-2.0, False, 5),  # raw picks 0; per char picks 1
              Scored(-0.5, True, 1), Scored(-3.0, False, 1)]
    acc, acc_norm = multiple_choice_accuracy(items, scores)
    assert acc == 0.5 and acc_norm == 1.0


def test_eval_config_rejects_unknown_task_and_keys():
    assert "hellaswag" in EvalConfig(tasks=["seven"]).task_names()
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(tasks=["nope"]).task_names()
    with pytest.raises(ValueError, match="extra"):
        EvalConfig(windows=3)


def test_run_evaluation_on_bundled_text(tiny_model, tiny_tokenizer):
    report = run_evaluation(tiny_model, tiny_tokenizer,
                            EvalConfig(seq_len=64, max_windows=2, tasks=["piqa"], limit=4, dtype="float32"),
                            progress=False)
    assert report.perplexity["windows"] == 2 and report.perplexity["ppl"] > 1
    assert report.tasks["piqa"]["items"] == 4
    assert "perplexity (eval, len 64)" in report.table()
