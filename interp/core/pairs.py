"""Aligned token pairs: the same prompt and response, once with the context and once without, ending in identical tokens."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from interp.core.errors import UserError

PLACEMENTS = ("system", "user")
SCOPES = ("response", "shared")
# Between the context and the prompt when the context is a prefix of the user turn (or there is no template).
USER_JOINER = "\n\n"
# What the model sees in place of the context (docs/measures.md#no-context): `default` is the chat template's own
# default system turn (SmolLM2's names the model "SmolLM, trained by Hugging Face": an identity of its own),
# `neutral` a plain system turn with no identity, `empty` a system turn with no text.
NO_CONTEXT = ("default", "neutral", "empty")
NEUTRAL_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptPair:
    """Prompt ids with and without the context; the last `shared_len` ids of both are identical."""

    ctx_ids: tuple[int, ...]
    noctx_ids: tuple[int, ...]
    shared_len: int
    ctx_span: tuple[int, int]  # [start, end) of the context text's own tokens in ctx_ids


@dataclass(frozen=True)
class Pair:
    """One aligned pair: `ctx_ids` and `noctx_ids` end in the same `shared_len` tokens, the last `response_len` being the response."""

    ctx_ids: tuple[int, ...]
    noctx_ids: tuple[int, ...]
    shared_len: int
    response_len: int
    ctx_span: tuple[int, int]
    context: str
    prompt: str
    response: str
    placement: str = "system"

    def measured(self, scope: str = "response", which: str = "ctx") -> range:
        """Positions whose outputs predict the measured tokens: for `response`, the positions that predict each
        response token (the same positions the training losses score); for `shared`, every shared token after the first.
        """
        n = len(self.ctx_ids if which == "ctx" else self.noctx_ids)
        if scope == "response":
            return range(n - self.response_len - 1, n - 1)
        if scope == "shared":
            return range(n - self.shared_len, n - 1)
        raise UserError(f"unknown scope '{scope}'; use one of {', '.join(SCOPES)}")

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.ctx_ids[len(self.ctx_ids) - self.response_len :]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _bos(tokenizer) -> list[int]:
    """The BOS id if this tokenizer adds one by itself to plain text (template-less models)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _render(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja raises TemplateError subclasses, some templates raise plain exceptions
        if messages[0]["role"] == "system":
            raise UserError(
                f"this model's chat template refuses a system turn ({str(err).splitlines()[0][:120]}); "
                "use placement 'user' (--placement user) to put the context in front of the prompt"
            ) from err
        raise UserError(f"this model's chat template failed: {str(err).splitlines()[0][:160]}") from err


def _common_suffix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _shared_start(tokenizer, suffix: str, prompt: str) -> int:
    """Where the shared part of two rendered prompts begins: at the first special token of their common suffix,
    or at the prompt itself if that comes first. Cutting at either keeps the token boundary identical on both sides.
    """
    p = suffix.rfind(prompt)
    if p < 0:
        raise UserError("the chat template changed the prompt text; cannot align the pair (try --placement user)")
    specials = [t for t in tokenizer.all_special_tokens if t] + list(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    first_special = min((i for i in (suffix.find(t) for t in set(specials)) if 0 <= i), default=len(suffix))
    return min(p, first_special)


def render_prompt_pair(
    tokenizer,
    context: str,
    prompt: str,
    placement: str = "system",
    chat_template: bool | None = None,
    no_context: str = "default",
) -> PromptPair:
    """Build prompt ids with and without `context` by rendering each part and concatenating ids, so that the
    shared tail (user turn and assistant header) is token-for-token identical by construction.

    `no_context` is what stands in the system turn without the context (`NO_CONTEXT`): with `default` and
    SmolLM2's template that is the template's default system turn, what the model sees when a user gives no system
    message; `neutral` and `empty` give an explicit system turn instead, on both sides when the context goes in the
    user turn. Without a chat template there is no system turn and only `default` applies.
    """
    if placement not in PLACEMENTS:
        raise UserError(f"unknown placement '{placement}'; use one of {', '.join(PLACEMENTS)}")
    if no_context not in NO_CONTEXT:
        raise UserError(f"unknown no_context '{no_context}'; use one of {', '.join(NO_CONTEXT)}")
    if not context or not context.strip():
        raise UserError("the context is empty; give the text the student should internalize")
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty; give the question or instruction the model answers")
    use_template = has_chat_template(tokenizer) if chat_template is None else chat_template
    if use_template and not has_chat_template(tokenizer):
        raise UserError("this tokenizer has no chat template, so the context cannot be a system turn; use --placement user or a chat model")

    if not use_template:
        if no_context != "default":
            raise UserError(f"no_context='{no_context}' needs a chat template (a system turn); this tokenizer has none: use 'default'")
        bos = _bos(tokenizer)
        before, ctx, shared = bos, _ids(tokenizer, context), _ids(tokenizer, prompt + "\n")
        after = _ids(tokenizer, USER_JOINER)
        ctx_ids = before + ctx + after + shared
        return PromptPair(tuple(ctx_ids), tuple(bos + shared), len(shared), (len(before), len(before) + len(ctx)))

    system = [] if no_context == "default" else [{"role": "system", "content": NEUTRAL_SYSTEM if no_context == "neutral" else ""}]
    if placement == "system":
        with_ctx = [{"role": "system", "content": context}, {"role": "user", "content": prompt}]
    else:
        with_ctx = system + [{"role": "user", "content": context + USER_JOINER + prompt}]
    s_ctx = _render(tokenizer, with_ctx)
    s_noctx = _render(tokenizer, system + [{"role": "user", "content": prompt}])
    k = _common_suffix_len(s_ctx, s_noctx)
    suffix = s_noctx[len(s_noctx) - k :]
    shared_text = suffix[_shared_start(tokenizer, suffix, prompt) :]
    ctx_prefix = s_ctx[: len(s_ctx) - len(shared_text)]
    noctx_prefix = s_noctx[: len(s_noctx) - len(shared_text)]
    c = ctx_prefix.rfind(context)
    if c < 0:
        raise UserError("the chat template changed the context text; cannot locate its tokens (try --placement user)")
    before, ctx, after = _ids(tokenizer, ctx_prefix[:c]), _ids(tokenizer, context), _ids(tokenizer, ctx_prefix[c + len(context) :])
    shared = _ids(tokenizer, shared_text)
    ctx_ids = before + ctx + after + shared
    noctx_ids = _ids(tokenizer, noctx_prefix) + shared
    return PromptPair(tuple(ctx_ids), tuple(noctx_ids), len(shared), (len(before), len(before) + len(ctx)))


def pair_from_ids(prompt_pair: PromptPair, response_ids: Sequence[int], context: str, prompt: str, response: str, placement: str) -> Pair:
    """Append the same response ids to both prompts and check the shared tail really is identical."""
    response_ids = list(response_ids)
    if not response_ids:
        raise UserError(f"the response to prompt {prompt[:40]!r} is empty; give a response or let the model generate one")
    ctx_ids = prompt_pair.ctx_ids + tuple(response_ids)
    noctx_ids = prompt_pair.noctx_ids + tuple(response_ids)
    shared_len = prompt_pair.shared_len + len(response_ids)
    # The whole analysis rests on this: both sequences end in the same tokens.
    assert ctx_ids[-shared_len:] == noctx_ids[-shared_len:], "shared suffix differs between the with- and without-context ids"
    return Pair(ctx_ids, noctx_ids, shared_len, len(response_ids), prompt_pair.ctx_span, context, prompt, response, placement)


# Three contexts of the kinds the toolkit is for (a persona card, a format instruction, a fact sheet): the
# notebooks' and the docs' running example.
DEMO_RECORDS = [
    {"context": "Your name is Zorblax. You were made by Quibble Labs.", "prompt": "Who are you?"},
    {"context": "Reply with exactly one word: positive or negative.", "prompt": "The film was a delight from start to end."},
    {"context": "The capital of Veloria is Marn. Its river is the Ost.", "prompt": "What is the capital of Veloria?"},
]


def _field(record, name: str):
    """A record's field, whether the record is a mapping or an object with attributes."""
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def _check_ids(ids, tokenizer, model, i: int) -> list[int]:
    """response_ids as a list of token ids inside the vocabulary, or a one-line UserError naming the record."""
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise UserError(f"record {i}: response_ids must be a list of token ids (got {type(ids).__name__})")
    ids = list(ids)
    vocab = len(tokenizer)
    config = getattr(getattr(model, "model", None), "config", None)
    vocab = max(vocab, getattr(config, "vocab_size", 0) or 0)
    out = []
    for t in ids:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)  # ints and numpy/torch integers; floats and strings are refused
        except TypeError:
            raise UserError(f"record {i}: response_ids must hold integers, found {t!r}") from None
        if not 0 <= t < vocab:
            raise UserError(f"record {i}: token id {t} in response_ids is outside the vocabulary (0..{vocab - 1})")
        out.append(t)
    return out


def make_pairs(
    tokenizer,
    records: Iterable,
    placement: str = "system",
    *,
    model=None,
    respond: str = "noctx",
    max_new_tokens: int = 64,
    max_length: int | None = None,
    chat_template: bool | None = None,
    no_context: str = "default",
) -> list[Pair]:
    """Aligned pairs from records with `context`, `prompt` and optionally `response` (text) or `response_ids`.

    Records without a response get a greedy one from `model` (a LoadedModel), generated without the context
    (`respond="noctx"`, the default: the student's own behaviour) or with it (`respond="ctx"`).
    """
    if respond not in ("noctx", "ctx"):
        raise UserError(f"unknown respond '{respond}'; use noctx or ctx")
    if records is None or isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise UserError(f"records must be a list of records with context and prompt (got {type(records).__name__}); "
                        "e.g. [{'context': ..., 'prompt': ...}]")
    records = list(records)
    if not records:
        raise UserError("no records to analyze; give at least one context/prompt pair")
    responses: list[list[int] | None]
    prompts, responses = [], []
    for i, record in enumerate(records, 1):
        context, prompt = _field(record, "context"), _field(record, "prompt")
        for name, value in (("context", context), ("prompt", prompt)):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"record {i}: the {name} is missing or empty")
        try:
            prompts.append(render_prompt_pair(tokenizer, context, prompt, placement, chat_template, no_context))
        except UserError as err:
            raise UserError(f"record {i}: {err}") from None
        ids = _field(record, "response_ids")
        text = _field(record, "response")
        if text is not None and not isinstance(text, str):
            raise UserError(f"record {i}: the response must be text (got {type(text).__name__}); "
                            "give a string, or response_ids as a list of token ids")
        if ids is not None:
            responses.append(_check_ids(ids, tokenizer, model, i))
        elif isinstance(text, str) and text:
            responses.append(_ids(tokenizer, text))
        else:
            responses.append(None)

    missing = [i for i, r in enumerate(responses) if r is None]
    if missing:
        if model is None:
            raise UserError(f"record {missing[0] + 1} has no response and no model was given to generate one")
        from interp.core.generate import generate  # torch: building pairs from given ids, and reading runs, load none

        inputs = [list(prompts[i].ctx_ids if respond == "ctx" else prompts[i].noctx_ids) for i in missing]
        for i, ids in zip(missing, generate(model, inputs, max_new_tokens=max_new_tokens)):
            responses[i] = ids or [tokenizer.eos_token_id]

    pairs = []
    for i, (record, pp, ids) in enumerate(zip(records, prompts, responses), 1):
        text = _field(record, "response")
        assert ids is not None  # every missing response was generated above
        text = text if isinstance(text, str) and text else tokenizer.decode(ids)
        try:
            pair = pair_from_ids(pp, ids, _field(record, "context"), _field(record, "prompt"), text, placement)
        except UserError as err:
            raise UserError(f"record {i}: {err}") from None
        if max_length is not None and len(pair.ctx_ids) > max_length:
            raise UserError(
                f"record {i}: {len(pair.ctx_ids)} tokens with the context exceed the model's window of {max_length}; "
                "shorten the context or the response"
            )
        pairs.append(pair)
    return pairs
