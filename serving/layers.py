"""The blocks of the sequence towers' causal stacks, in plain PyTorch (training and serving run the same
modules): the pre-norm softmax-attention block of the transformer tower and HSTU's gated pointwise-attention
unit. `make_block(kind, ...)` builds either from `SequenceShape.block`. Every block takes `(x, gaps)`: `gaps` are
the time-gap buckets of `time_gap_buckets`, which only HSTU's unit reads, and optionally `mask`: (B, n, n) True where
step i may read step j, for rows packed several to a lane (serving.sequence.Grid); without it, plain causal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout whose mask is drawn 16 bits at a time: one 64-bit random integer gives four elements'
    draws, each dropped with probability p' = round(p * 2^16) / 2^16 (within 2^-17 of p) and the kept ones
    scaled by 1 / (1 - p') in the input's precision (under bfloat16 autocast, within 0.4%). On the CPU the
    draws cost a quarter of a float per element (torch.rand_like) and an eighth of torch's bernoulli_, the
    slowest op of the transformer step before it; the mask is made in the input's dtype, so bfloat16
    activations stay bfloat16."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= self.threshold - 32768
        return x * keep.to(x.dtype).mul_(65536 / (65536 - self.threshold))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: Dropout,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, with dropout on the attention weights; `mask` (B, n, n) True where a
    step may read another (it must allow each step itself), causal if None. torch's scaled_dot_product_attention
    does this, except where it would draw the dropout with bernoulli_ on the CPU (about 40 ms per call on ML-1M
    batches): there the weights are formed here and `dropout` applied."""
    if not (dropout.training and dropout.p > 0 and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is None,
                                              attn_mask=None if mask is None else mask[:, None],
                                              dropout_p=dropout.p if dropout.training else 0.0)
    n = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    hidden = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1) if mask is None else ~mask[:, None]
    return dropout(scores.masked_fill(hidden, float("-inf")).softmax(dim=-1)) @ v


class CausalBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + feed-forward(norm(x)); causal attention
    (a position sees itself and the positions before it)."""

    def __init__(self, dim: int, heads: int, dropout: float, device: torch.device | None = None):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention_norm = nn.LayerNorm(dim, device=device)
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.ff_norm = nn.LayerNorm(dim, device=device)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim, device=device), nn.GELU(), Dropout(dropout),
                                nn.Linear(4 * dim, dim, device=device))
        self.drop = Dropout(dropout)
        self.attention_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, gaps: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = causal_attention(q, k, v, self.attention_dropout, mask)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.ff_norm(x)))


# HSTU's log-scaled time-gap buckets: bucket floor(ln(max(|gap|, 1)) / TIME_BUCKET_WIDTH) of a gap in seconds, so a
# bucket spans a factor of e^0.301 = 1.35 (the constant of generative-recommenders), capped at TIME_BUCKETS: 128
# buckets reach e^38.5 s, far beyond any real gap.
TIME_BUCKETS = 128
TIME_BUCKET_WIDTH = 0.301


def time_gap_buckets(times: torch.Tensor, buckets: int = TIME_BUCKETS) -> torch.Tensor:
    """(B, n, n) bucket of the gap between the event that step i predicts (times[:, i + 1]) and step j's event
    (times[:, j]), from `times` (B, n + 1) in seconds. Step i's query is made at the time of the event it
    predicts, as serving makes it at the request's time."""
    return gap_buckets(times[:, 1:], times[:, :-1], buckets)


def gap_buckets(predicted: torch.Tensor, events: torch.Tensor, buckets: int = TIME_BUCKETS) -> torch.Tensor:
    """(B, n, n) bucket of |predicted[:, i] - events[:, j]|: the time of the event step i predicts against step
    j's event (both (B, n) seconds)."""
    gaps = (predicted[:, :, None] - events[:, None, :]).abs().clamp(min=1).double()
    return (gaps.log() / TIME_BUCKET_WIDTH).long().clamp(max=buckets)


class HSTUBlock(nn.Module):
    """HSTU's sequential transduction unit (Zhai et al. 2024): from LayerNorm(x), one projection gives U, V, Q, K
    through SiLU; the attention weights are SiLU(Q K^T + relative position bias) / max_length, causal and not
    normalised (no softmax: a position's weights need not sum to one, so how much it reads can grow with its
    history); the output is x + W_o(dropout(U * LayerNorm(A V))).

    Dividing by the configured `max_length` rather than the batch's width keeps a row's output independent of the
    rows it is batched with. The bias is one learnt scalar per distance i - j in [0, max_length), plus, with
    `time_buckets`, one per time-gap bucket (`time_gap_buckets`), shared by the heads."""

    def __init__(self, dim: int, heads: int, dropout: float, max_length: int, time_buckets: int = 0,
                 device: torch.device | None = None):
        super().__init__()
        self.heads, self.dropout, self.max_length = heads, dropout, max_length
        self.input_norm = nn.LayerNorm(dim, device=device)
        self.uvqk = nn.Linear(dim, 4 * dim, device=device)
        self.attention_norm = nn.LayerNorm(dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.position_bias = nn.Parameter(torch.empty(max_length, device=device))
        nn.init.normal_(self.position_bias, std=0.02)
        self.time_bias = nn.Parameter(torch.empty(time_buckets + 1, device=device)) if time_buckets else None
        if self.time_bias is not None:
            nn.init.normal_(self.time_bias, std=0.02)
        self.drop = Dropout(dropout)

    def weights(self, q: torch.Tensor, k: torch.Tensor, gaps: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, heads, n, n) attention weights of query step i on key step j, zero where j > i (or, given `mask`,
        where it is False)."""
        n = q.shape[-2]
        steps = torch.arange(n, device=q.device)
        distance = steps[:, None] - steps[None, :]
        bias = self.position_bias[distance.clamp(min=0, max=self.max_length - 1)]
        if self.time_bias is not None:
            if gaps is None:
                raise ValueError("this HSTU unit was built with a time-gap bias: it needs the events' times")
            bias = bias + self.time_bias[gaps][:, None]
        weights = F.silu(q @ k.transpose(-2, -1) + bias) * (1.0 / self.max_length)
        return weights.masked_fill(distance < 0 if mask is None else ~mask[:, None], 0.0)

    def forward(self, x: torch.Tensor, gaps: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        u, v, q, k = F.silu(self.uvqk(self.input_norm(x))).split(d, dim=-1)
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = (self.weights(q, k, gaps, mask) @ v).transpose(1, 2).reshape(b, n, d)
        return x + self.out(self.drop(u * self.attention_norm(attended)))


# SequenceShape.block -> the block: "softmax" is the transformer's, "silu" HSTU's pointwise attention.
BLOCK_KINDS = ("softmax", "silu")


def make_block(kind: str, dim: int, heads: int, dropout: float, max_length: int, time_buckets: int = 0,
               device: torch.device | None = None) -> nn.Module:
    """A block of the stack; `time_buckets` > 0 gives HSTU's unit its time-gap bias (the softmax block has none)."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown sequence block '{kind}' (known: {', '.join(BLOCK_KINDS)})")
    if kind == "silu":
        return HSTUBlock(dim, heads, dropout, max_length, time_buckets, device)
    if time_buckets:
        raise ValueError(f"the '{kind}' block has no time-gap bias (time_buckets must be 0, got {time_buckets})")
    return CausalBlock(dim, heads, dropout, device)
