"""Aligned pairs: identical shared tails, context spans, measured positions, and clear errors."""

import copy

import pytest

from interp import UserError, make_pairs
from interp.core.pairs import render_prompt_pair


def _check(tok, pair):
    # Both sequences end in the same shared_len tokens, and the context span decodes to the context itself.
    assert pair.ctx_ids[-pair.shared_len:] == pair.noctx_ids[-pair.shared_len:]
    assert pair.ctx_ids[: len(pair.ctx_ids) - pair.shared_len] != pair.noctx_ids[: len(pair.noctx_ids) - pair.shared_len]
    start, end = pair.ctx_span
    assert tok.decode(pair.ctx_ids[start:end]) == pair.context
    assert pair.shared_len > pair.response_len > 0


def test_system_placement_with_default_system_turn(tokenizer, records):
    for pair in make_pairs(tokenizer, records, placement="system"):
        _check(tokenizer, pair)
        noctx = tokenizer.decode(pair.noctx_ids)
        # SmolLM2's template inserts its default system turn when none is given: that is "no context".
        assert "You are a helpful AI assistant named SmolLM" in noctx
        assert pair.context not in noctx
        shared = tokenizer.decode(pair.ctx_ids[-pair.shared_len:])
        assert pair.prompt in shared and shared.endswith(pair.response)


def test_user_placement_puts_context_before_prompt(tokenizer, records):
    for pair in make_pairs(tokenizer, records, placement="user"):
        _check(tokenizer, pair)
        text = tokenizer.decode(pair.ctx_ids)
        assert text.index(pair.context) < text.index(pair.prompt)
        # The context sits in the user turn, after the default system turn.
        assert "named SmolLM" in text.split(pair.context)[0]


def test_without_chat_template(tokenizer, records):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    for pair in make_pairs(plain, records):
        _check(plain, pair)
        assert "<|im_start|>" not in plain.decode(pair.ctx_ids)
        assert plain.decode(pair.noctx_ids).startswith(pair.prompt)


def test_measured_positions_predict_the_response(tokenizer, records):
    pair = make_pairs(tokenizer, records[:1])[0]
    response = list(pair.response_ids)
    for which, ids in (("ctx", pair.ctx_ids), ("noctx", pair.noctx_ids)):
        positions = list(pair.measured("response", which))
        assert [ids[t + 1] for t in positions] == response
        shared = list(pair.measured("shared", which))
        assert len(shared) == pair.shared_len - 1 and shared[-1] == len(ids) - 2
    assert tokenizer.decode(response) == pair.response


def test_generates_missing_responses(tiny, records):
    recs = [{"context": r["context"], "prompt": r["prompt"]} for r in records[:2]]
    noctx = make_pairs(tiny.tokenizer, recs, model=tiny, max_new_tokens=5)
    ctx = make_pairs(tiny.tokenizer, recs, model=tiny, max_new_tokens=5, respond="ctx")
    for pair in noctx + ctx:
        _check(tiny.tokenizer, pair)
        assert 1 <= pair.response_len <= 5


def test_errors_name_the_problem(tokenizer, records):
    with pytest.raises(UserError, match="context is missing or empty"):
        make_pairs(tokenizer, [{"context": " ", "prompt": "hi"}])
    with pytest.raises(UserError, match="record 2: the prompt"):
        make_pairs(tokenizer, [records[0], {"context": "c"}])
    with pytest.raises(UserError, match="no response and no model"):
        make_pairs(tokenizer, [{"context": "c", "prompt": "p"}])
    with pytest.raises(UserError, match="placement"):
        make_pairs(tokenizer, records, placement="middle")
    with pytest.raises(UserError, match="exceed the model's window of 20"):
        make_pairs(tokenizer, records[:1], max_length=20)


def test_template_refusing_system_turn_suggests_user_placement(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}<turn>assistant\n"
    )
    with pytest.raises(UserError, match="placement 'user'"):
        render_prompt_pair(strict, "ctx", "prompt", "system")
    pp = render_prompt_pair(strict, "Be brief.", "What is two plus two?", "user")
    assert pp.ctx_ids[-pp.shared_len:] == pp.noctx_ids[-pp.shared_len:]
    assert strict.decode(pp.ctx_ids[pp.ctx_span[0]:pp.ctx_span[1]]) == "Be brief."
