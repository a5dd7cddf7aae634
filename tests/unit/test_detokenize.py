"""Incremental detokenization: deltas concatenate to the non-streamed text, cut at the first stop string."""

from __future__ import annotations

import random

import pytest

from sparse_serve.detokenize import IncrementalDetokenizer, find_stop, partial_stop_len


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(tok, ids: list[int], stop=(), chunks: int | list[int] = 1, prompt=(),
           **kw) -> tuple[list[str], bool]:
    """Feed ``ids`` in pieces (a fixed size, or the given sizes); return the deltas and whether it stopped."""
    detok = IncrementalDetokenizer(tok, list(prompt), list(stop), **kw)
    sizes = chunks if isinstance(chunks, list) else [chunks] * len(ids)
    deltas, pos, hit = [], 0, False
    for size in sizes:
        if pos >= len(ids) or hit:
            break
        piece = ids[pos:pos + size]
        pos += size
        delta, hit = detok.add(piece, final=pos >= len(ids))
        deltas.append(delta)
    if not hit and pos < len(ids):
        delta, hit = detok.add(ids[pos:], final=True)
        deltas.append(delta)
    assert detok.text == "".join(deltas)
    return deltas, hit


def reference(text: str, stop, include: bool = False) -> str:
    """``text`` cut at the stop string completed first (earliest end, then earliest begin)."""
    hits = [(text.index(s) + len(s), text.index(s), s) for s in stop if s and s in text]
    if not hits:
        return text
    end, begin, _ = min(hits)
    return text[:end if include else begin]


def test_multibyte_characters_split_across_tokens_are_held_back(tiny_tokenizer):
    text = "héllo 世界 🎉!"
    ids = encode(tiny_tokenizer, text)
    assert len(ids) > len(text)  # byte-level: the multi-byte characters span several tokens
    deltas, hit = stream(tiny_tokenizer, ids)
    assert "".join(deltas) == text and not hit
    assert all("\ufffd" not in d for d in deltas)
    assert "🎉" in deltas  # emitted whole, once its fourth byte arrived


def test_incomplete_character_is_flushed_when_final(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "ab世")[:-1]  # cut inside the character
    deltas, _ = stream(tiny_tokenizer, ids)
    assert "".join(deltas) == tiny_tokenizer.decode(ids) == "ab\ufffd"
    assert deltas[-1] == "\ufffd"


def test_stop_string_spanning_token_boundaries(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "The answer is 42.\n\nUser: more")
    deltas, hit = stream(tiny_tokenizer, ids, stop=["\n\nUser:"])
    assert hit and "".join(deltas) == "The answer is 42."
    assert not any("\n" in d for d in deltas)  # the partial stop was never emitted


def test_partial_stop_that_does_not_complete_is_released(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "a\n\nUse it")
    detok = IncrementalDetokenizer(tiny_tokenizer, [], ["\n\nUser:"])
    out = [detok.add([i], final=False) for i in ids[:5]]  # "a\n\nUs": a possible stop start
    assert "".join(d for d, _ in out) == "a"
    delta, hit = detok.add(ids[5:], final=True)
    assert not hit and detok.text == "a\n\nUse it"


def test_stop_string_at_the_very_start(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "STOP and more")
    deltas, hit = stream(tiny_tokenizer, ids, stop=["STOP"])
    assert hit and "".join(deltas) == ""
    deltas, hit = stream(tiny_tokenizer, ids, stop=["STOP"], include_stop_str_in_output=True)
    assert hit and "".join(deltas) == "STOP"


def test_include_stop_str_in_output(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "x = 1; y = 2")
    deltas, hit = stream(tiny_tokenizer, ids, stop=[";"], include_stop_str_in_output=True)
    assert hit and "".join(deltas) == "x = 1;"


def test_stop_inside_one_token_chunk_cuts_the_rest(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "hello world, bye")
    deltas, hit = stream(tiny_tokenizer, ids, stop=["world"], chunks=[len(ids)])
    assert hit and deltas == ["hello "]


def test_no_stop(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "nothing stops me")
    deltas, hit = stream(tiny_tokenizer, ids, stop=[])
    assert not hit and "".join(deltas) == "nothing stops me"
    assert len([d for d in deltas if d]) == len(ids)  # ASCII: one character per token, nothing held


def test_special_tokens_skipped_or_kept(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "hi") + [tiny_tokenizer.eos_token_id]
    assert "".join(stream(tiny_tokenizer, ids)[0]) == "hi"
    kept = stream(tiny_tokenizer, ids, skip_special_tokens=False)[0]
    assert "".join(kept) == "hi<|im_end|>"


def test_prompt_context_does_not_change_the_text(tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "héllo"}],
                                                add_generation_prompt=True, tokenize=False)
    prompt_ids = encode(tiny_tokenizer, prompt)
    ids = encode(tiny_tokenizer, " Ça va? 世界")
    assert "".join(stream(tiny_tokenizer, ids, prompt=prompt_ids)[0]) == " Ça va? 世界"
    cut_prompt = encode(tiny_tokenizer, "x世")[:-1]  # prompt ending inside a character
    assert "".join(stream(tiny_tokenizer, ids, prompt=cut_prompt)[0]) == " Ça va? 世界"


def test_after_stop_everything_is_ignored(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer, [], ["b"])
    assert detok.add(encode(tiny_tokenizer, "ab"), final=False) == ("a", True)
    assert detok.add(encode(tiny_tokenizer, "cd"), final=True) == ("", True)
    assert detok.text == "a" and detok.stopped


def test_first_completed_stop_wins():
    assert find_stop("xabcd", ["abcd", "c"]) == (3, 4)
    assert find_stop("xabc", ["bc", "abc"]) == (1, 4)  # same end: the longer one
    assert find_stop("abcabc", ["bc"], start=4) == (4, 6)
    assert find_stop("abc", []) is None
    assert partial_stop_len("hello wor", ["world", "or"]) == 3
    assert partial_stop_len("hello", ["world"]) == 0


def _random_ids(rng: random.Random, tok, vocab: int) -> list[int]:
    pieces = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.5:
            text = "".join(rng.choice("ab \n世界é🎉,.x") for _ in range(rng.randint(1, 6)))
            pieces += encode(tok, text)
        elif kind < 0.9:
            pieces += [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]  # any byte, any special
        else:
            pieces += encode(tok, "世")[: rng.randint(1, 2)]  # a cut character
    return pieces


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_concatenate_to_the_full_decode(tiny_tokenizer, seed):
    rng = random.Random(seed)
    vocab = len(tiny_tokenizer)
    stops_pool = ["a", "b b", "世界", "\n\n", "x.", "é🎉", "ab,"]
    for _ in range(150):
        ids = _random_ids(rng, tiny_tokenizer, vocab)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        stop = rng.sample(stops_pool, rng.randint(0, 3))
        include = rng.random() < 0.3
        skip = rng.random() < 0.8
        sizes = [rng.randint(1, 4) for _ in range(len(ids) + 1)]
        deltas, hit = stream(tiny_tokenizer, ids, stop, sizes, prompt, include_stop_str_in_output=include,
                             skip_special_tokens=skip)
        full = tiny_tokenizer.decode(ids, skip_special_tokens=skip)
        expected = reference(full, stop, include)
        assert "".join(deltas) == expected, (ids, prompt, stop, include, sizes)
        assert hit == any(s in full for s in stop)
