"""Why on-policy distillation can teach loops: what the teacher's signal does to the student's own looping tokens.

The student samples a response without the context; the distillation loss (reverse KL to the teacher, the base
with the context, at every response position) then moves the student's distribution at each position towards the
teacher's. If, given a prefix that has begun to loop, the teacher predicts the loop's next token *more* surely than
the student does, the loss raises that token's probability: the loop is taught, not just sampled.

`python -m training loop-credit` measures this on rollouts sampled exactly as the trainer samples them (same
suite, seed, no-context turn, temperature, budget) by the base model (a student at step 0) or by a trained student
(`--run R --student S`). For every response token y_t, with p_S the student without the context and p_T the
teacher with it (docs/measures.md#loop-credit):

  log_ratio_t = log p_T(y_t) − log p_S(y_t)
  raised_t    = 1 when one gradient step of the trainer's own loss (training.losses.reverse_kl, its top-k included,
                or training.losses.forward_kl with `--loss forward_kl`) on the student's logits at t raises
                log p_S(y_t): Δ log p_S(y_t) ∝ −g_{y_t} + Σ_v p_S(v) g_v, g = ∂L/∂z_t (the first-order change of a
                log-softmax under the step −g)

Tokens fall in four groups: the stop token that ends a rollout (`stop`: does the loss teach the student to stop?),
and the other tokens of rollouts that never loop (`clean`), of looping rollouts before the loop begins (`before`,
interp.core.degenerate.loop_start), and from where it begins (`loop`: the tokens `loop_mask` leaves out of the
loss). Each group's means come with a percentile bootstrap over rollouts (tokens of one rollout are not
independent).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from interp.core.degenerate import loop_start
from interp.core.generate import stop_ids
from interp.core.models import LoadedModel
from interp.core.pairs import render_prompt_pair
from training import stats
from training.losses import forward_kl, reverse_kl
from training.rollout import collate, response_logits, rollout

GROUPS = ("clean", "before", "loop", "stop")
STOP_MASS = "stop_mass"  # the stop tokens' total probability where a rollout went on (stop_credit)
LOSSES = ("reverse_kl", "forward_kl")  # the distillation losses whose step is measured


def _step(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, top_k: int | None,
          loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g = ∂L/∂z per position, log p_S, log p_T), all [B, R, V] in float32, L the token sum of the loss."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} (got {loss!r})")
    z = student_logits.detach().float().requires_grad_(True)
    t = teacher_logits.detach().float()
    kl = reverse_kl(z, t, mask, top_k) if loss == "reverse_kl" else forward_kl(z, t, mask)
    (g,) = torch.autograd.grad(kl * mask.sum(), z)  # the token sum: each position's gradient is its own KL's
    with torch.no_grad():
        return g, torch.log_softmax(z, -1), torch.log_softmax(t, -1)


def token_credit(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                 top_k: int | None = None, loss: str = "reverse_kl") -> tuple[torch.Tensor, torch.Tensor]:
    """Per response position [B, R]: (log p_T(y_t) − log p_S(y_t), the first-order change of log p_S(y_t) under one
    unit gradient step of the loss (reverse or forward KL) on the student's logits at t). Padded positions are 0."""
    g, logp_s, logp_t = _step(student_logits, teacher_logits, mask, top_k, loss)
    return _credit(g, logp_s, logp_t, targets.unsqueeze(-1), mask)


def stop_credit(student_logits: torch.Tensor, teacher_logits: torch.Tensor, stops: Sequence[int], mask: torch.Tensor,
                top_k: int | None = None, loss: str = "reverse_kl") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same for the stop tokens' total probability P(S) = Σ_{s∈S} p(s) at every position, whatever was sampled
    there: (P_S(S), P_T(S), log P_T(S) − log P_S(S), the first-order change of log P_S(S) under one step), [B, R].
    Does the loss teach the student to stop less everywhere, not only where a rollout stopped?"""
    return _stop_mass(*_step(student_logits, teacher_logits, mask, top_k, loss), stops, mask)


def _stop_mass(g: torch.Tensor, logp_s: torch.Tensor, logp_t: torch.Tensor, stops: Sequence[int], mask: torch.Tensor):
    idx = torch.tensor(sorted(set(stops)), dtype=torch.long).expand(*logp_s.shape[:-1], -1)
    ratio, change = _credit(g, logp_s, logp_t, idx, mask)
    with torch.no_grad():
        return (logp_s.gather(-1, idx).exp().sum(-1) * mask, logp_t.gather(-1, idx).exp().sum(-1) * mask, ratio, change)


def _credit(g: torch.Tensor, logp_s: torch.Tensor, logp_t: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor):
    """For the token set idx [B, R, k] at each position: log P_T − log P_S of the set, and Δ log P_S(set) =
    −Σ_{v∈set} p_S(v) g_v / P_S(set) + Σ_v p_S(v) g_v (the first-order change under the step −g)."""
    with torch.no_grad():
        set_s = torch.logsumexp(logp_s.gather(-1, idx), -1)
        set_t = torch.logsumexp(logp_t.gather(-1, idx), -1)
        p_in = (logp_s.gather(-1, idx) - set_s.unsqueeze(-1)).exp()  # p_S(v | set)
        change = -(p_in * g.gather(-1, idx)).sum(-1) + (logp_s.exp() * g).sum(-1)
        return (set_t - set_s) * mask, change * mask


@dataclass
class Group:
    """One group of tokens: counts, the mean probabilities of the sampled token, the mean log-ratio and the share
    of tokens the loss raises, each mean with its 95% bootstrap interval over rollouts."""

    group: str
    rollouts: int
    tokens: int
    p_student: float | None
    p_teacher: float | None
    log_ratio: float | None
    log_ratio_ci: list | None
    raised: float | None
    raised_ci: list | None


@dataclass
class Credit:
    """One measurement: whose rollouts (the base at step 0, or a trained student), how they were sampled, how many
    loop (with a Wilson interval), and the four groups."""

    model: str
    student: str
    suite: str
    seed: int
    no_context: str
    temperature: float
    max_new_tokens: int
    top_k: int | None
    rollouts: int
    looping: int
    looping_ci: list | None
    groups: list[Group]
    loss: str = "reverse_kl"  # whose one step `raised` measures


def _group(name: str, per_rollout: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> Group:
    """per_rollout: (p_S, p_T, log_ratio, raised) arrays of the group's tokens in each rollout that has any."""
    rows = [r for r in per_rollout if len(r[0])]
    n_tok = sum(len(r[0]) for r in rows)
    if not rows:
        return Group(name, 0, 0, None, None, None, None, None, None)
    sums = np.array([[r[k].sum() for k in range(4)] for r in rows])  # [rollouts, 4]
    counts = np.array([len(r[0]) for r in rows], dtype=float)

    def pooled(col: int):
        return lambda idx: float(sums[idx, col].sum() / counts[idx].sum())

    def ci(col: int):
        got = stats.bootstrap_ci(pooled(col), len(rows))
        return None if got is None else [got[0], got[1]]

    whole = np.arange(len(rows))
    return Group(name, len(rows), n_tok, pooled(0)(whole), pooled(1)(whole), pooled(2)(whole), ci(2), pooled(3)(whole), ci(3))


@dataclass
class Scored:
    """One rollout: its response ids, where its loop begins (None: it never loops) and, per token, p_S(y_t),
    p_T(y_t), log p_T(y_t) − log p_S(y_t) and whether one step of the loss raises log p_S(y_t)."""

    response_ids: list[int]
    start: int | None
    stopped: bool  # the last token is a stop token (the rollout ended before the budget)
    p_student: np.ndarray
    p_teacher: np.ndarray
    log_ratio: np.ndarray
    raised: np.ndarray
    # The stop tokens' total probability at every position (stop_credit): P_S(S), P_T(S), log-ratio, raised.
    stop_mass: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def measure(lm: LoadedModel, examples, *, adapter: str | None = None, placement: str, no_context: str = "neutral",
            samples: int = 2, temperature: float = 1.0, max_new_tokens: int = 96, top_k: int | None = None,
            loss: str = "reverse_kl", seed: int = 0, batch_size: int = 8, progress=None) -> list[Scored]:
    """Sample `samples` rollouts per example from `lm` with `adapter` (None: the base) without the context, as the
    trainer does, and score each token under the student and under the teacher (the base with the context)."""
    tok = lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    stops = set(stop_ids(lm.model, tok))
    jobs = [e for e in examples for _ in range(samples)]
    pps = [render_prompt_pair(tok, e.context, e.prompt, placement, no_context=no_context) for e in jobs]
    out = []
    for i in range(0, len(jobs), batch_size):
        with lm.use(adapter):
            pairs = rollout(lm, jobs[i : i + batch_size], pps[i : i + batch_size], placement, max_new_tokens=max_new_tokens,
                            temperature=temperature, batch_size=batch_size, seed=seed * 1_000_003 + i)
        batch = collate(pairs, pad_id)
        with torch.no_grad():
            with lm.use(adapter):
                s = response_logits(lm.model, batch.noctx)
            with lm.use(None):
                t = response_logits(lm.model, batch.ctx)
        g, logp_s, logp_t = _step(s, t, batch.mask, top_k, loss)  # one backward serves both readings
        log_ratio, change = _credit(g, logp_s, logp_t, batch.targets.unsqueeze(-1), batch.mask)
        mass_s, mass_t, mass_ratio, mass_change = _stop_mass(g, logp_s, logp_t, sorted(stops), batch.mask)
        del g, logp_s, logp_t
        with torch.no_grad():
            y = batch.targets.unsqueeze(-1)
            p_s = torch.softmax(s.float(), -1).gather(-1, y).squeeze(-1)
            p_t = torch.softmax(t.float(), -1).gather(-1, y).squeeze(-1)
        for row, pair in enumerate(pairs):
            n = pair.response_len
            ids = list(pair.response_ids)
            mass = (mass_s[row, :n].numpy(), mass_t[row, :n].numpy(), mass_ratio[row, :n].numpy(),
                    (mass_change[row, :n] > 0).float().numpy())
            out.append(Scored(ids, loop_start(ids, decode), bool(ids) and ids[-1] in stops, p_s[row, :n].numpy(),
                              p_t[row, :n].numpy(), log_ratio[row, :n].numpy(), (change[row, :n] > 0).float().numpy(), mass))
        if progress is not None:
            progress(len(pairs))
    return out


def summarize(scored: Sequence[Scored]) -> list[Group]:
    """The four groups of tokens: clean rollouts', looping rollouts' before the loop, the loop's, and the stop token
    that ends a rollout (kept out of the other three); then `stop_mass`: the stop tokens' total probability at every
    position where the rollout went on (all but a final stop token), when measured."""
    parts: dict[str, list] = {g: [] for g in GROUPS}
    mass: list = []
    for r in scored:
        if r.stop_mass is not None:
            mass.append([c[:-1] if r.stopped else c for c in r.stop_mass])
        cols = [r.p_student, r.p_teacher, r.log_ratio, r.raised]
        if r.stopped:
            parts["stop"].append([c[-1:] for c in cols])
            cols = [c[:-1] for c in cols]
        if r.start is None:
            parts["clean"].append(cols)
        else:
            parts["before"].append([c[: r.start] for c in cols])
            parts["loop"].append([c[r.start :] for c in cols])
    return [_group(g, parts[g]) for g in GROUPS] + ([_group(STOP_MASS, mass)] if mass else [])


def markdown(c: Credit) -> str:
    f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    g = lambda x, ci: "–" if x is None else f"{x:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")  # noqa: E731
    h = lambda x, ci: "–" if x is None else f"{x:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")  # noqa: E731
    share = c.looping / c.rollouts if c.rollouts else math.nan
    head = (f"{c.student} on {c.suite} (seed {c.seed}, no-context '{c.no_context}', temperature {c.temperature}, "
            f"{c.max_new_tokens} tokens, one step of {c.loss}): {c.looping}/{c.rollouts} rollouts loop ({share:.2f}"
            + (f", Wilson [{c.looping_ci[0]:.2f}, {c.looping_ci[1]:.2f}])" if c.looping_ci else ")"))
    lines = [head, "", "| tokens | rollouts | tokens n | p_S(y) | p_T(y) | log p_T − log p_S [95% CI] | raised by the loss [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for gr in c.groups:
        lines.append(f"| {gr.group} | {gr.rollouts} | {gr.tokens} | {f(gr.p_student)} | {f(gr.p_teacher)} | "
                     f"{g(gr.log_ratio, gr.log_ratio_ci)} | {h(gr.raised, gr.raised_ci)} |")
    if any(gr.group == STOP_MASS for gr in c.groups):
        lines += ["", f"`{STOP_MASS}`: y is the set of stop tokens, P(S) = Σ p(stop) at every position where the rollout "
                  "went on; 'raised' is the share of those positions where one step raises the student's P(S)."]
    return "\n".join(lines)


def to_json(c: Credit) -> dict:
    return asdict(c)
