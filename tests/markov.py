"""A toy speculative decoder over Markov chains, for the exactness tests.

The target and the drafter are Markov chains over a small vocabulary: the
target's next-token logits depend on the previous token only, and so do the
drafter's, so draft tokens depend on earlier draft tokens. `simulate` runs
rounds of speculative generation for many requests at once through a sampler
with the interface of dspark.ops.rejection_sample, and returns the first
`num_tokens` committed tokens of each request; with an exact sampler they
follow the target chain at each request's temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

MODES = ("onehot", "logits", "probs")


@dataclass
class Chains:
    target_logits: torch.Tensor  # [V, V] float32: row a = logits of the token after a
    draft_logits: torch.Tensor  # [V, V] float32

    @property
    def vocab(self) -> int:
        return self.target_logits.shape[0]

    @staticmethod
    def random(vocab: int, seed: int, spread: float = 1.5) -> "Chains":
        g = torch.Generator().manual_seed(seed)
        target = torch.randn(vocab, vocab, generator=g) * spread
        draft = target + torch.randn(vocab, vocab, generator=g) * spread  # correlated, not equal
        return Chains(target.float(), draft.float())


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Transition probabilities [V, V] (float64) at a temperature (0: argmax)."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return torch.softmax(logits.double() / temperature, dim=-1)


def sequence_probs(transition: torch.Tensor, start: int, num_tokens: int) -> torch.Tensor:
    """P(y_1..y_n | y_0 = start) for all V^n sequences, at index sum y_i V^(n-i)."""
    vocab = transition.shape[0]
    probs = transition[start].clone()  # over y_1
    for _ in range(num_tokens - 1):
        last = torch.arange(probs.numel()) % vocab  # the last token of each prefix
        probs = (probs.unsqueeze(-1) * transition[last]).reshape(-1)
    return probs


def encode(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Rows of tokens [R, n] -> indices sum y_i V^(n-i)."""
    out = torch.zeros(tokens.shape[0], dtype=torch.int64)
    for i in range(tokens.shape[1]):
        out = out * vocab + tokens[:, i].long()
    return out


Sampler = Callable[..., tuple]


def simulate(
    sampler: Sampler,
    chains: Chains,
    temperatures: torch.Tensor,
    *,
    mode: str,
    gamma: int,
    num_tokens: int,
    start: int,
    seed: int,
    device: torch.device = torch.device("cpu"),
    drafter: Optional[Callable[..., tuple]] = None,
) -> torch.Tensor:
    """The first `num_tokens` committed tokens of each request, [R, num_tokens].

    Each round every unfinished request drafts n_r ~ U{0..gamma} tokens from the
    draft chain (at its temperature in `logits` mode, as the op assumes; from
    the untempered chain in `probs` and `onehot` mode), builds the target rows
    of its prefixes, and calls `sampler` once for the whole batch.

    `drafter(anchors [Ra], temperatures [Ra], gamma, seed)`, when given, replaces
    the draft chain: it returns the drafts [Ra, gamma] and their distributions
    [Ra, gamma, V] (logits in `logits` mode, probabilities in `probs` mode).
    """
    assert mode in MODES
    g = torch.Generator().manual_seed(seed)
    R = temperatures.shape[0]
    out = torch.full((R, num_tokens), -1, dtype=torch.int64)
    count = torch.zeros(R, dtype=torch.int64)
    anchor = torch.full((R,), start, dtype=torch.int64)
    draft_probs_table = torch.softmax(chains.draft_logits.double(), -1)
    round_index = 0
    while bool((count < num_tokens).any()):
        active = torch.nonzero(count < num_tokens).flatten()
        Ra = active.numel()
        temps = temperatures[active]
        n = torch.randint(0, gamma + 1, (Ra,), generator=g)
        # draft chain: x_k ~ q(. | x_{k-1})
        prev = anchor[active]
        drafts = torch.empty(Ra, gamma, dtype=torch.int64)
        rows = None
        if drafter is not None:
            drafts, rows = drafter(prev, temps, gamma, int(torch.randint(0, 2**62, (1,), generator=g)))
            drafts, rows = drafts.cpu().long(), rows.cpu()
        for k in range(gamma if drafter is None else 0):
            if mode == "logits":
                t = torch.where(temps > 0, temps, torch.ones_like(temps)).double().unsqueeze(-1)
                q = torch.softmax(chains.draft_logits[prev].double() / t, -1)
            else:
                q = draft_probs_table[prev]
            prev = torch.multinomial(q, 1, generator=g).squeeze(-1)
            drafts[:, k] = prev
        history = torch.cat([anchor[active].unsqueeze(-1), drafts], dim=-1)  # [Ra, gamma + 1]
        positions = torch.arange(gamma + 1).unsqueeze(0)
        draft_mask = positions[:, :gamma] < n.unsqueeze(-1)
        target_mask = positions <= n.unsqueeze(-1)
        draft_tokens = drafts[draft_mask]
        target_prev = history[target_mask]
        draft_prev = history[:, :gamma][draft_mask]
        cu = torch.zeros(Ra + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(n, 0).to(torch.int32)
        kwargs = {}
        if rows is not None:
            kwargs["draft_logits" if mode == "logits" else "draft_probs"] = rows[:, :gamma][draft_mask].float().to(device)
        elif mode == "logits":
            kwargs["draft_logits"] = chains.draft_logits[draft_prev].to(device)
        elif mode == "probs":
            kwargs["draft_probs"] = draft_probs_table[draft_prev].float().to(device)
        round_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        tokens, accepted = sampler(
            chains.target_logits[target_prev].to(device),
            draft_tokens.to(device),
            cu.to(device),
            temperature=temps.float().to(device),
            seed=round_seed,
            offset=round_index,
            max_num_draft=gamma,
            **kwargs,
        )[:2]
        tokens, accepted = tokens.cpu().long(), accepted.cpu().long()
        committed = accepted + 1
        for j in range(gamma + 1):
            take = committed > j
            rows = active[take]
            slot = count[rows]
            ok = slot < num_tokens
            out[rows[ok], slot[ok]] = tokens[take, j][ok]
            count[rows] += 1
        anchor[active] = tokens[torch.arange(Ra), accepted]
        round_index += 1
    return out


# --------------------------------------------------------------------------
# A plain-PyTorch sampler with a switch for deliberately wrong residuals, to
# show that the statistical test catches a biased rule.


def naive_sampler(residual: str) -> Sampler:
    """A vectorised sampler with the op's interface. residual='exact' is the
    correct rule; 'from_target' draws the correction from p_t (forgetting the
    residual); 'abs' draws it from |p_t - p_d| (a residual without max(0, .))."""

    def sample(target_logits, draft_tokens, cu_num_draft, *, temperature, seed, offset, max_num_draft,
               draft_logits: Optional[torch.Tensor] = None, draft_probs: Optional[torch.Tensor] = None):
        g = torch.Generator().manual_seed((seed * 1000003 + offset) % (1 << 62))
        R = cu_num_draft.shape[0] - 1
        V = target_logits.shape[1]
        n = (cu_num_draft[1:] - cu_num_draft[:-1]).long()
        greedy = temperature <= 0
        t = torch.where(greedy, torch.ones_like(temperature), temperature).double().unsqueeze(-1)

        def target_probs(logits, rows):
            p = torch.softmax(logits.double() / t[rows], -1)
            hot = torch.nn.functional.one_hot(logits.argmax(-1), V).double()
            return torch.where(greedy[rows].unsqueeze(-1), hot, p)

        out = torch.full((R, max_num_draft + 1), -1, dtype=torch.int32)
        accepted = torch.zeros(R, dtype=torch.int64)
        alive = torch.ones(R, dtype=torch.bool)
        for k in range(max_num_draft + 1):
            rows = torch.nonzero(alive).flatten()
            if rows.numel() == 0:
                break
            trow = cu_num_draft[rows].long() + rows + k
            pt = target_probs(target_logits[trow], rows)
            has_draft = k < n[rows]
            # bonus rows
            bonus = rows[~has_draft]
            if bonus.numel():
                out[bonus, k] = torch.multinomial(pt[~has_draft], 1, generator=g).squeeze(-1).int()
                alive[bonus] = False
            rows, pt = rows[has_draft], pt[has_draft]
            if rows.numel() == 0:
                continue
            drow = cu_num_draft[rows].long() + k
            x = draft_tokens[drow].long()
            if draft_logits is not None:
                pd = torch.softmax(draft_logits[drow].double() / t[rows], -1)
            elif draft_probs is not None:
                pd = draft_probs[drow].double()
                pd = pd / pd.sum(-1, keepdim=True)
            else:
                pd = torch.nn.functional.one_hot(x, V).double()
            # greedy: accept iff x is the target argmax, correct to the argmax
            pd = torch.where(greedy[rows].unsqueeze(-1), torch.nn.functional.one_hot(x, V).double(), pd)
            ratio = pt.gather(-1, x[:, None]).squeeze(-1) / pd.gather(-1, x[:, None]).squeeze(-1)
            u = torch.rand(rows.numel(), generator=g, dtype=torch.float64)
            ok = u < ratio
            out[rows[ok], k] = x[ok].int()
            accepted[rows[ok]] += 1
            rej = rows[~ok]
            if rej.numel():
                if residual == "exact":
                    w = torch.clamp(pt[~ok] - pd[~ok], min=0)
                elif residual == "abs":
                    w = (pt[~ok] - pd[~ok]).abs()
                else:
                    w = pt[~ok]
                w = torch.where(w.sum(-1, keepdim=True) > 0, w, pt[~ok])
                out[rej, k] = torch.multinomial(w, 1, generator=g).squeeze(-1).int()
                alive[rej] = False
        return out, accepted.int()

    return sample
