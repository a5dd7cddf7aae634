"""Weights placed in transparent huge pages keep their values, their identity and their aliases."""

import pytest
import torch
from torch import nn

from kernels import hugepages
from kernels.hugepages import SLOT_ALIGN, place_in_huge_pages, why_no_huge_pages
from kernels.linear import PrepackedLinear, decode_weights


def skip_without_huge_pages() -> None:
    if why_no_huge_pages():
        pytest.skip(why_no_huge_pages())


def test_placed_tensors_keep_values_identity_and_aliases():
    skip_without_huge_pages()
    a, b = torch.randn(300, 7).bfloat16(), torch.arange(1000, dtype=torch.int64)
    tied = a.view(-1)  # views the same memory as a, with another shape
    alias = a.detach()  # the same memory and shape (an LM head tied to the embedding)
    expected = (a.clone(), b.clone())
    arena = place_in_huge_pages([a, b, alias])
    assert not isinstance(arena, str)
    assert arena.tensors == 2  # a and its alias share one slot
    assert torch.equal(a, expected[0]) and torch.equal(b, expected[1]) and torch.equal(alias, expected[0])
    assert alias.data_ptr() == a.data_ptr() != tied.data_ptr()  # the alias moved with a; the untold view did not
    base = min(a.data_ptr(), b.data_ptr())
    assert base % hugepages.HUGE_PAGE == 0 and max(a.data_ptr(), b.data_ptr()) % SLOT_ALIGN == 0
    a.add_(1)  # still an ordinary writable tensor
    assert torch.equal(alias, expected[0] + 1)


def test_bad_input_is_refused_and_platform_limits_are_reasons(monkeypatch):
    skip_without_huge_pages()
    with pytest.raises(ValueError, match="contiguous CPU tensors"):
        place_in_huge_pages([torch.randn(4, 4).t()])
    assert place_in_huge_pages([]) == "no tensors to place"
    monkeypatch.setattr(hugepages, "THP_SETTING", hugepages.Path("/nonexistent/thp"))
    t = torch.randn(3)
    ptr = t.data_ptr()
    assert "missing" in place_in_huge_pages([t]) and t.data_ptr() == ptr  # nothing moved


def test_decode_weights_are_the_gemv_rows_and_their_tied_parameters():
    torch.manual_seed(0)
    embed = nn.Embedding(50, 16).to(torch.bfloat16)
    head = nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    head.weight = embed.weight  # tied
    model = nn.ModuleDict({"embed": embed, "head": PrepackedLinear(head), "mlp": PrepackedLinear(nn.Linear(16, 8).bfloat16())})
    weights = decode_weights(model)
    rows = [model["head"].packed.rows, model["mlp"].packed.rows]
    if rows[0] is None:
        pytest.skip("no AVX-512 GEMV rows on this CPU")
    assert all(any(w is r for w in weights) for r in rows)
    assert any(w is embed.weight for w in weights)  # the embedding views the head's rows
    assert not any(w is model["mlp"].bias for w in weights)
