"""The counterfactual-name table: its rates recomputed here from greedy answers generated with plain HF `generate`."""

import torch

from interp.core.models import load_model
from interp.core.pairs import render_prompt_pair
from training import counterfactual
from training.counterfactual import FIXED_MAKER, follow_table
from training.tasks import _NAME_QUESTIONS, persona_card


def test_follow_rates_match_answers_generated_here():
    lm = load_model("tiny-random-llama")
    rows = follow_table(lm, names=("Atlas", "Orion"), makers=("Cobalt Systems",), max_new_tokens=5)
    assert {(r.kind, r.candidate) for r in rows} == {("name", "Atlas"), ("name", "Orion"), ("maker", "Cobalt Systems")}
    atlas = next(r for r in rows if r.candidate == "Atlas")
    prompts = counterfactual._prompts(_NAME_QUESTIONS)
    assert atlas.follow_n == len(prompts) == 2 * len(_NAME_QUESTIONS)
    tok = lm.tokenizer
    k = loops = 0
    for p in prompts:  # one prompt at a time, no padding: an independent path to the same greedy answers
        ids = render_prompt_pair(tok, persona_card("Atlas", FIXED_MAKER), p, "system", no_context="neutral").ctx_ids
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
        looping = counterfactual.is_degenerate(text)
        loops += looping
        k += (not looping) and "atlas" in text.lower()
    assert (atlas.follow_k, atlas.loops) == (k, loops)
    assert atlas.follow == k / atlas.follow_n and atlas.follow_lo <= atlas.follow <= atlas.follow_hi
    assert counterfactual.best(rows, "maker").candidate == "Cobalt Systems"
    assert "| name | Atlas |" in counterfactual.markdown(rows)
