"""Generation with a LoRA adapter merged for the call: the same tokens as the unmerged adapter (greedy), the same
distribution (sampled), the weights restored bit for bit, and answers at a shorter budget are prefixes of longer ones;
no argument the installed transformers deprecates."""

from __future__ import annotations

import warnings

import pytest
import torch

from interp import make_pairs
from interp.core.generate import generate, merged_lora
from interp.core.models import LoadedModel


def _student(tiny, seed: int = 1, scale: float = 0.5, device: str = "cpu", dtype: str = "auto"):
    """The tiny model with a LoRA adapter on every linear layer whose B is far from zero (a trained-looking adapter);
    tests/test_cuda.py builds it on the GPU."""
    from peft import LoraConfig, get_peft_model

    from interp.core.models import load_model

    base = load_model("tiny-random-llama", device=device, dtype=dtype)
    peft_model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, scale)
    return LoadedModel(model=peft_model, tokenizer=base.tokenizer, spec="tiny-random-llama"), peft_model


PROMPTS = [[1, 5, 9, 33, 7], [1, 8, 2], [1, 4, 4, 4, 4, 4, 19], [1, 300, 301, 302]]


def test_merged_greedy_equals_unmerged_and_restores_the_weights(tiny):
    lm, peft_model = _student(tiny)
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in peft_model.named_parameters()}
    merged = generate(lm, PROMPTS, max_new_tokens=24, merge=True)
    plain = generate(lm, PROMPTS, max_new_tokens=24, merge=False)
    assert merged == plain
    with peft_model.disable_adapter():
        assert generate(lm, PROMPTS, max_new_tokens=24) != merged  # the adapter matters: the test can fail
    for n, p in peft_model.named_parameters():  # the very same tensors, bit for bit: training sees what it had
        assert torch.equal(p, before[n][0]) and p.data_ptr() == before[n][1], n
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())


def test_merged_logits_equal_unmerged_to_float_tolerance(tiny):
    lm, peft_model = _student(tiny)
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        with merged_lora(peft_model) as did:
            assert did
            a = torch.log_softmax(peft_model(input_ids=x).logits, -1)
        b = torch.log_softmax(peft_model(input_ids=x).logits, -1)
    assert (a - b).abs().max() < 1e-4
    with peft_model.disable_adapter(), merged_lora(peft_model) as did:
        assert not did  # nothing to merge when the adapter is switched off


def test_sampled_rollouts_have_the_unmerged_distribution(tiny):
    """Sampled with the same seed, merged and unmerged: the sampled tokens' log-probabilities under the unmerged
    model equal those under the merged one (same distribution at every step), and the samples themselves agree."""
    lm, peft_model = _student(tiny)
    a = generate(lm, PROMPTS * 4, max_new_tokens=12, temperature=1.0, seed=7, merge=True)
    b = generate(lm, PROMPTS * 4, max_new_tokens=12, temperature=1.0, seed=7, merge=False)
    same = sum(x == y for x, y in zip(a, b))
    assert same >= len(a) - 1  # a float difference may flip a near-tie draw; the distributions are what must agree
    for prompt, sample in zip(PROMPTS * 4, a):
        if not sample:
            continue
        ids = torch.tensor([list(prompt) + sample])
        pos = slice(len(prompt) - 1, len(prompt) + len(sample) - 1)
        with torch.no_grad():
            plain = torch.log_softmax(peft_model(input_ids=ids).logits[0, pos], -1)
            with merged_lora(peft_model):
                merged = torch.log_softmax(peft_model(input_ids=ids).logits[0, pos], -1)
        target = torch.tensor(sample)
        lp_plain = plain.gather(1, target[:, None]).squeeze(1)
        lp_merged = merged.gather(1, target[:, None]).squeeze(1)
        assert torch.allclose(lp_plain, lp_merged, atol=1e-4)
        # and the whole next-token distributions: KL(plain ‖ merged) at every step is float noise
        kl = (plain.exp() * (plain - merged)).sum(-1)
        assert kl.abs().max() < 1e-5


def test_a_shorter_budget_is_a_prefix_of_a_longer_one(tiny):
    lm, _ = _student(tiny)
    short = generate(lm, PROMPTS, max_new_tokens=6)
    long = generate(lm, PROMPTS, max_new_tokens=20)
    for s, l in zip(short, long):
        assert l[: len(s)] == s and (len(s) == 6 or s == l)


def test_training_still_sees_the_unmerged_lora(tiny):
    """A rollout between two backward passes leaves the LoRA graph as it was: the gradient is the same."""
    lm, peft_model = _student(tiny)
    x = torch.tensor([PROMPTS[0]])

    def grads():
        peft_model.zero_grad()
        peft_model.train()
        peft_model(input_ids=x).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    g0 = grads()
    generate(lm, PROMPTS, max_new_tokens=8)
    g1 = grads()
    assert g0.keys() == g1.keys() and g0 and all(torch.equal(g0[k], g1[k]) for k in g0)


@pytest.mark.embedded
def test_embedded_greedy_answers_merged_equal_unmerged(smol):
    """On the embedded model with an adapter of trained size, greedy answers merged and unmerged, token for token
    (docs/measures.md#generation records how often float rounding makes one differ: here, on 16 answers of 48 tokens)."""
    from peft import LoraConfig, get_peft_model

    from interp.core.models import load_model
    from interp.core.pairs import render_prompt_pair
    from training.tasks import load_task

    base = load_model("smollm2-135m-instruct", device="cpu")
    peft_model = get_peft_model(base.model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    lm = LoadedModel(model=peft_model, tokenizer=base.tokenizer, spec="smollm2-135m-instruct")
    task = load_task("persona_luna", seed=0, n_test=8)
    prompts = [render_prompt_pair(lm.tokenizer, e.context, e.prompt, "system", no_context="neutral").noctx_ids for e in task.test[:8]]
    prompts += [render_prompt_pair(lm.tokenizer, e.context, e.prompt, "system").ctx_ids for e in task.test[:8]]
    merged = generate(lm, prompts, max_new_tokens=48, batch_size=16, merge=True)
    plain = generate(lm, prompts, max_new_tokens=48, batch_size=16, merge=False)
    differ = sum(a != b for a, b in zip(merged, plain))
    assert differ <= 1, f"{differ} of {len(prompts)} greedy answers differ"
    hf = generate(lm, prompts, max_new_tokens=48, batch_size=16, merge=True, engine="hf")
    differ = sum(a != b for a, b in zip(merged, hf))
    assert differ <= 1, f"{differ} of {len(prompts)} greedy answers differ between our loop and HF generate"
    assert len({len(a) for a in merged}) >= 3  # answers end at different steps: rows left the batch


CARD = ("Your name is Nova. You are an AI assistant made by Quibble Labs. You answer briefly and kindly, you never "
        "claim another name, and you say who made you when asked.")


def test_generation_passes_no_deprecated_argument(tiny):
    """The installed transformers renamed the KV cache's argument (`past_key_values` -> `cache`) and warns with a
    FutureWarning on the old name: generation must not pass it (here the warning is an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = generate(tiny, [[1, 2, 3, 4], [5, 6]], max_new_tokens=4)
    assert [len(x) <= 4 for x in got] == [True, True]


def test_the_rollouts_shared_prefix_passes_no_deprecated_argument(tiny):
    from training.rollout import MIN_SHARED_PREFIX, collate, response_logits

    records = [{"context": CARD, "prompt": p, "response": "I am Nova."} for p in ("Who are you?", "Who made you?")]
    batch = collate(make_pairs(tiny.tokenizer, records), tiny.tokenizer.pad_token_id)
    assert batch.ctx.prefix >= MIN_SHARED_PREFIX
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        response_logits(tiny.model, batch.ctx, share_prefix=True)


def _with_stops(lm, stops):
    """The model's generation config names `stops` as its stop tokens (so rows end at different steps)."""
    lm.model.generation_config.eos_token_id = list(stops)
    return lm


def _early_stops(lm, prompts, n=20, **sampling):
    """Stop tokens under which HF's greedy answers end at two or more different steps while one row runs to the
    budget: rows then leave the batch one by one."""
    from itertools import combinations

    from interp.core.generate import generate as gen

    answers = gen(lm, prompts, max_new_tokens=n, engine="hf", **sampling)
    tokens = sorted({t for a in answers for t in a})

    def ends(stops):
        return [next((j + 1 for j, t in enumerate(a) if t in stops), None) for a in answers]

    for k in (1, 2):
        for stops in combinations(tokens, k):
            e = ends(stops)
            if None in e and len({x for x in e if x is not None}) >= 2:
                return list(stops)
    raise AssertionError("no stop tokens end these answers at different steps")


@pytest.mark.parametrize("spec", ["tiny-random-llama", "tiny-random-gemma2", "tiny-random-gpt2", "tiny-random-qwen3"])
def test_the_decoding_loop_gives_hf_generates_greedy_answers_as_rows_leave(spec):
    """Our loop (finished rows leave the batch and the KV cache) against HF `generate`, greedy, token for token,
    with stop tokens chosen so that rows end at different steps: the test fails if a row's cache or position is
    mixed up when the batch shrinks."""
    from interp.core.models import load_model

    lm = load_model(spec, device="cpu")
    prompts = PROMPTS + [[1, 2, 3], [9, 9, 9, 9, 9, 9, 9, 9, 9, 9]]
    stops = _early_stops(lm, prompts)
    _with_stops(lm, stops)
    loop = generate(lm, prompts, max_new_tokens=20, keep_stop=True)
    hf = generate(lm, prompts, max_new_tokens=20, keep_stop=True, engine="hf")
    assert loop == hf
    ended = sorted({len(a) for a in loop if a[-1] in stops})
    assert len(ended) >= 2 and any(len(a) == 20 for a in loop), (ended, [len(a) for a in loop])
    # min_new_tokens keeps every row in the batch to the budget, in both
    assert generate(lm, prompts, max_new_tokens=12, min_new_tokens=12, engine="loop") == \
        generate(lm, prompts, max_new_tokens=12, min_new_tokens=12, engine="hf")


def test_the_decoding_loop_samples_as_hf_generate_does():
    """Sampled with the same seed, while every row is still writing, the loop draws HF `generate`'s very tokens (the
    same softmax(logits / T) and the same multinomial draw per step); once rows leave, each remaining row still
    draws from its own next-token distribution, which the log-probability check below confirms."""
    from interp.core.models import load_model

    lm = load_model("tiny-random-llama", device="cpu")
    for t in (1.0, 0.7):
        assert generate(lm, PROMPTS * 2, max_new_tokens=16, temperature=t, seed=5) == \
            generate(lm, PROMPTS * 2, max_new_tokens=16, temperature=t, seed=5, engine="hf")
    prompts = PROMPTS * 3
    _with_stops(lm, _early_stops(lm, prompts, n=16, temperature=1.0, seed=5))
    sampled = generate(lm, prompts, max_new_tokens=16, temperature=1.0, seed=5, keep_stop=True)
    assert len({len(s) for s in sampled}) >= 2  # rows did leave the batch
    for prompt, s in zip(prompts, sampled):
        ids = torch.tensor([list(prompt) + s])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        assert torch.isfinite(logp.gather(1, torch.tensor(s)[:, None])).all()


def test_unknown_engine_is_refused(tiny):
    with pytest.raises(ValueError, match="engine"):
        generate(tiny, PROMPTS, max_new_tokens=4, engine="fast")
