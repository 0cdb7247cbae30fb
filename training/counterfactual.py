"""The counterfactual identity, chosen by measurement: how often the base model follows a candidate name (or maker)
given as an identity card, and how often it says it without one, on the persona suite's questions.

`follow_cf` asks whether a student still *reads* a card: under a counterfactual card it should answer with the
counterfactual identity. That is only informative with an identity the base model itself follows when it is given
as a card, and never produces unprompted (or "following" would be its prior). `python -m training cf-names` prints
the table; the persona suites' counterfactual (`training.tasks.CF_NAME`, `CF_MAKER`) is its best row.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Sequence, cast

from interp.core.degenerate import is_degenerate
from interp.core.generate import generate
from interp.core.models import LoadedModel
from interp.core.pairs import render_prompt_pair
from interp.core.verifiers import verify
from training import stats
from training.tasks import _MAKER_QUESTIONS, _NAME_QUESTIONS, persona_card

# Candidates: names and makers that are neither the trained identities (Nova, Luna; Quibble Labs, Fennel Works) nor
# the base model's own (SmolLM, Hugging Face), of varied frequency in English text.
NAMES = ("Atlas", "Orion", "Iris", "Milo", "Juniper", "Sage", "Echo", "Felix", "Aurora", "Zephyr", "Pixel", "Kai")
MAKERS = ("Brightwater Labs", "Cobalt Systems", "Maple Robotics", "Northwind AI", "Tidewater Research", "Ember Analytics",
          "Granite Works", "Lumen Labs")
# The identity the other half of each card names (a candidate name's card needs a maker, and a maker's a name).
FIXED_NAME, FIXED_MAKER = "Nova", "Quibble Labs"
GREETINGS = ("", "Hi! ")  # the suite's questions, bare and with one greeting


@dataclass
class Row:
    """One candidate: its follow rate as a card (a clean answer that says it) and its unprompted rate."""

    kind: str  # "name" or "maker"
    candidate: str
    follow_k: int
    follow_n: int
    follow: float
    follow_lo: float
    follow_hi: float
    unprompted_k: int
    unprompted_n: int
    loops: int  # answers under the card that loop (counted as not following)


def _prompts(questions: Sequence[str]) -> list[str]:
    return [(g + q)[:1].upper() + (g + q)[1:] for g, q in itertools.product(GREETINGS, questions)]


def follow_table(lm: LoadedModel, *, names: Sequence[str] = NAMES, makers: Sequence[str] = MAKERS,
                 no_context: str = "neutral", max_new_tokens: int = 48, batch_size: int = 48) -> list[Row]:
    """Greedy answers of `lm` (the base model) to the persona suite's name questions under a card naming each
    candidate name (and to its maker questions under a card naming each maker), and to the same questions with no
    card (the `no_context` turn). A candidate's word (the name, or a maker's first word, as the suite's verifier
    reads it) in a clean answer is following; a looping answer never is. Sorted by follow rate, best first."""
    tok = lm.tokenizer
    jobs: list[tuple[str, str, str, str]] = []  # (kind, candidate, card, prompt)
    for name in names:
        jobs += [("name", name, persona_card(name, FIXED_MAKER), p) for p in _prompts(_NAME_QUESTIONS)]
    for maker in makers:
        jobs += [("maker", maker, persona_card(FIXED_NAME, maker), p) for p in _prompts(_MAKER_QUESTIONS)]
    bare = {kind: _prompts(q) for kind, q in (("name", _NAME_QUESTIONS), ("maker", _MAKER_QUESTIONS))}
    pairs = [render_prompt_pair(tok, card, p, "system", no_context=no_context).ctx_ids for _, _, card, p in jobs]
    plain = [render_prompt_pair(tok, FIXED_NAME, p, "system", no_context=no_context).noctx_ids
             for kind in ("name", "maker") for p in bare[kind]]
    with lm.use(None):
        out = generate(lm, pairs + plain, max_new_tokens=max_new_tokens, batch_size=batch_size)
    decode = lambda ids: cast(str, tok.decode(ids, skip_special_tokens=True))  # noqa: E731
    answers, unprompted = [decode(x) for x in out[: len(pairs)]], [decode(x) for x in out[len(pairs):]]
    no_card = {"name": unprompted[: len(bare["name"])], "maker": unprompted[len(bare["name"]):]}
    rows = []
    for (kind, candidate), group in itertools.groupby(zip(jobs, answers), key=lambda j: j[0][:2]):
        texts = [a for _, a in group]
        word = candidate if kind == "name" else candidate.split()[0]  # what the suite's verifier looks for
        followed = [verify("contains", t, word, False) for t in texts]
        said = sum(verify("contains", t, word, True) for t in no_card[kind])
        k, n = sum(followed), len(followed)
        lo, hi = stats.wilson(k, n) or (0.0, 1.0)
        rows.append(Row(kind, candidate, k, n, k / n, lo, hi, said, len(no_card[kind]), sum(is_degenerate(t) for t in texts)))
    return sorted(rows, key=lambda r: (r.kind, -r.follow, r.unprompted_k))


def best(rows: Sequence[Row], kind: str) -> Row:
    """The most followed candidate of `kind` among those never said unprompted."""
    clean = [r for r in rows if r.kind == kind and r.unprompted_k == 0]
    return max(clean or [r for r in rows if r.kind == kind], key=lambda r: (r.follow, -r.loops))


def markdown(rows: Sequence[Row]) -> str:
    lines = ["| kind | candidate | follows as a card | 95% interval (Wilson) | loops under the card | said unprompted |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.kind} | {r.candidate} | {r.follow:.2f} ({r.follow_k}/{r.follow_n}) | [{r.follow_lo:.2f}, "
                     f"{r.follow_hi:.2f}] | {r.loops} | {r.unprompted_k}/{r.unprompted_n} |")
    return "\n".join(lines)


def to_json(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
