"""Sampled softmax over in-batch positives plus mixed negatives, with logQ correction.

For query row i the candidates are the G in-batch positives (of the global batch) followed by S
negatives sampled from the corpus. The logit of candidate j is <q_i, v_j> / T - log Q(j), where
Q(j) is the expected number of times item j is among the candidates (`CandidateLogQ`). Columns
holding the row's own item other than its own column (accidental hits) and padding columns are
masked with a large finite negative.

Both towers share one kernel, `softmax_cross_entropy`: logits are computed in row chunks of at most
`max_logits` entries, and each chunk's gradient (softmax minus one-hot, two matrix products) is
computed right away, so only one chunk's logits are ever alive and nothing is recomputed. The
accidental hits are found by sorting (`matching_columns`), never by a rows x columns comparison. With
`loss.mask_seen` the transformer's positions also mask the items they have already read (`seen_hits`).

Candidates repeat (popular items among the positives and the negatives). With `merge_duplicates` (the
default) every item is one column whose bias is raised by log(its copies): m equal columns add m exp(l) =
exp(l + log m) to a row's denominator, so the loss is the same and the gradient reaching each item is the
sum its copies received, with as many fewer logits as there were copies (`merge_duplicates`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from data.keys import SEQUENCE_KEY
from serving.plain import first_copies
from trainer.collectives import all_gather_ids, all_gather_with_grad

MASKED_LOGIT = -1e9
DEFAULT_MAX_LOGITS = 1 << 20


def matching_columns(items: torch.Tensor, column_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) for every column j holding items[i], in order of i (then j): found by sorting the columns and
    searching them, never by an items x columns comparison."""
    order = torch.argsort(column_ids, stable=True)
    ordered = column_ids[order]
    lo = torch.searchsorted(ordered, items, side="left")
    counts = torch.searchsorted(ordered, items, side="right") - lo
    index = torch.repeat_interleave(torch.arange(len(items), device=items.device), counts)
    starts = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
    return index, order[starts + torch.arange(len(index), device=items.device)]


def accidental_hits(row_items: torch.Tensor, column_ids: torch.Tensor,
                    own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns), sorted by row, of every column that holds row i's own item but is not its own column.
    Padding columns (id 0) are left out: they are masked for every row."""
    rows, columns = matching_columns(row_items, column_ids)
    keep = (columns != own[rows]) & (column_ids[columns] > 0)
    return rows[keep], columns[keep]


def seen_hits(history: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor, column_ids: torch.Tensor,
              own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns), sorted by row, of every column holding an item that position i has already read (its
    row's items up to and including its step), other than its own column. `history` holds the rows' items
    back to back (`lengths`); `positions` are row * width + step, width = the longest row (data/batch.py).
    Memory grows with positions x mean steps read, never with positions x columns."""
    device = history.device
    lengths = lengths.long()
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    row, reads = positions // width, positions % width + 1
    pair_rows = torch.repeat_interleave(torch.arange(len(positions), device=device), reads)
    step = torch.arange(len(pair_rows), device=device) - torch.repeat_interleave(torch.cumsum(reads, 0) - reads,
                                                                                 reads)
    items = history[(torch.cumsum(lengths, 0) - lengths)[row][pair_rows] + step]
    pairs, columns = matching_columns(items, column_ids)
    rows = pair_rows[pairs]
    keep = columns != own[rows]
    return rows[keep], columns[keep]


def union_hits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                        torch.Tensor]:
    """Two hit lists as one, still sorted by row (a pair in both is masked twice, which is harmless)."""
    rows, columns = torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    by_row = torch.argsort(rows, stable=True)
    return rows[by_row], columns[by_row]


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """sum_i w_i (logsumexp_j l_ij - l_i,own_i); the gradients are computed chunk by chunk in the forward.

    Each row's exponentials are taken against a bound of its logits, |q_i| max|c| / T + max(bias)
    (Cauchy-Schwarz), so exp cannot overflow and one pass gives both the log-sum-exp and the softmax. A
    chunk where some row's sum underflows (far from unit vectors only) is recomputed against the row maxima."""

    @staticmethod
    def forward(ctx, query, candidates, bias, own, own_bias, hit_rows, hit_columns, weights, scale, max_logits,
                needs_grad):
        rows = max(1, max_logits // max(candidates.shape[0], 1))
        total = query.new_zeros(())
        grad_query = torch.zeros_like(query) if needs_grad else None
        grad_candidates = torch.zeros_like(candidates) if needs_grad else None
        bounds = torch.searchsorted(hit_rows, torch.arange(0, query.shape[0] + rows, rows, device=query.device))
        candidate_norm = candidates.norm(dim=1).max() * scale
        top_bias = bias.max()

        def logits_of(q, lo, column, a, b, bound):
            logits = torch.addmm(bias, q, candidates.T, alpha=scale)
            logits[hit_rows[a:b] - lo, hit_columns[a:b]] = MASKED_LOGIT
            own_logit = (q * candidates[column]).sum(1) * scale + own_bias[lo:lo + len(q)]
            logits[torch.arange(len(q), device=q.device), column] = own_logit
            if bound is None:
                bound = logits.amax(dim=1)
            return logits.sub_(bound[:, None]), own_logit - bound

        for chunk, lo in enumerate(range(0, query.shape[0], rows)):
            q, column = query[lo:lo + rows], own[lo:lo + rows]
            a, b = int(bounds[chunk]), int(bounds[chunk + 1])
            bound = q.norm(dim=1) * candidate_norm + torch.maximum(own_bias[lo:lo + rows], top_bias)
            logits, own_logit = logits_of(q, lo, column, a, b, bound)
            exp = logits.exp_()
            sums = exp.sum(dim=1)
            if bool((sums < 1e-30).any()):
                logits, own_logit = logits_of(q, lo, column, a, b, None)
                exp = logits.exp_()
                sums = exp.sum(dim=1)
            w = weights[lo:lo + rows]
            total = total + ((torch.log(sums) - own_logit) * w).sum()
            if needs_grad:
                grad = exp.mul_((w * scale / sums)[:, None])  # softmax x w / T, in place
                grad[torch.arange(len(q), device=q.device), column] -= w * scale
                grad_query[lo:lo + rows] = grad @ candidates
                grad_candidates.addmm_(grad.T, q)
        ctx.save_for_backward(grad_query, grad_candidates)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_query, grad_candidates = ctx.saved_tensors
        return (grad_query * grad_total, grad_candidates * grad_total) + (None,) * 9


def softmax_cross_entropy(query: torch.Tensor, candidates: torch.Tensor, bias: torch.Tensor, own: torch.Tensor,
                          own_bias: torch.Tensor, hits: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                          temperature: float, max_logits: int = DEFAULT_MAX_LOGITS) -> torch.Tensor:
    """Weighted sum over query rows of the cross-entropy of row i's own column `own[i]` among the logits
    l_ij = <q_i, c_j> / T + bias_j, except l_i,own = <q_i, c_own> / T + own_bias_i and the `hits` (rows,
    columns), which are masked. query (P, d), candidates (C, d), bias (C,), own, own_bias, weights (P,)."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or candidates.requires_grad)
    return _SoftmaxCrossEntropy.apply(query, candidates, bias.to(query.dtype), own, own_bias.to(query.dtype),
                                      hits[0], hits[1], weights.to(query.dtype), 1.0 / temperature, max_logits,
                                      needs_grad)


def merge_duplicates(candidates: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor,
                     own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(candidates, bias, own, ids) with each item's columns merged into its first: the bias of the merged column is
    the items' -log Q plus log(live copies), or masked when every copy was. A row's own column becomes its
    item's merged column, which the kernel gives the row's own logit: that drops the item's other copies from
    the row, as the accidental-hit mask does. -log Q is a function of the item, so live copies share it."""
    bias = bias.to(candidates.dtype)
    live = bias > MASKED_LOGIT / 2
    distinct, first, inverse = first_copies(ids)
    copies = torch.zeros(distinct.shape, dtype=bias.dtype, device=ids.device)
    copies.index_add_(0, inverse, live.to(bias.dtype))
    value = torch.full(distinct.shape, MASKED_LOGIT, dtype=bias.dtype, device=ids.device)
    value.scatter_reduce_(0, inverse, bias, reduce="amax")
    merged = torch.where(copies > 0, value + log_copies(copies), MASKED_LOGIT)
    return candidates.index_select(0, first), merged, inverse[own], distinct


def log_copies(copies: torch.Tensor) -> torch.Tensor:
    """m equal columns weigh exp(l) m = exp(l + log m) in a softmax."""
    return torch.log(copies.clamp(min=1))


def no_hits(own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return own[:0], own[:0]


def column_bias(candidate_ids: torch.Tensor, log_q: torch.Tensor | None, num_in_batch: int,
                in_batch: bool) -> torch.Tensor:
    """-log Q per column; padding columns, and the in-batch ones without `in_batch`, masked for every row
    (a row's own column gets its own value, `own_bias`)."""
    bias = -log_q if log_q is not None else torch.zeros(candidate_ids.shape, device=candidate_ids.device)
    masked = candidate_ids == 0
    if not in_batch:
        masked = masked | (torch.arange(len(candidate_ids), device=candidate_ids.device) < num_in_batch)
    return torch.where(masked, MASKED_LOGIT, bias.float() if log_q is None else bias)


def sampled_softmax_loss(query: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
                         positive_index: torch.Tensor, row_mask: torch.Tensor, log_q: torch.Tensor | None,
                         num_in_batch: int, temperature: float, in_batch: bool = True,
                         logq_on_positive: bool = True, normalizer: torch.Tensor | None = None,
                         max_logits: int = DEFAULT_MAX_LOGITS, merge: bool = True) -> torch.Tensor:
    """Loss summed over the rows of `row_mask`, divided by `normalizer` (default: their number, the mean);
    `merge`: one column per item (`merge_duplicates`), else one per candidate with the accidental hits masked.

    query (B, d); candidates (C, d) with C = num_in_batch + S; candidate_ids (C,); positive_index (B,):
    the column of each row's positive; log_q (C,): log Q of each column's item, or None for no logQ.
    """
    bias = column_bias(candidate_ids, log_q, num_in_batch, in_batch)
    if log_q is not None and logq_on_positive:
        own_bias = -log_q[positive_index]
    else:
        own_bias = torch.zeros(positive_index.shape, dtype=query.dtype, device=query.device)
    if merge:
        candidates, bias, own, _ = merge_duplicates(candidates, candidate_ids, bias, positive_index)
        hits = no_hits(own)
    else:
        own, hits = positive_index, accidental_hits(candidate_ids[positive_index], candidate_ids, positive_index)
    weights = row_mask.to(query.dtype)
    total = softmax_cross_entropy(query, candidates, bias, own, own_bias, hits, weights, temperature, max_logits)
    if normalizer is None:
        normalizer = weights.sum()
    return total / normalizer.to(total.dtype).clamp(min=1e-6)  # 0 rows: 0 / tiny = 0


class StreamingFrequency:
    """Yi et al. 2019: per hashed item, the last step it was seen (A) and an EMA of the gap (B).

    1 / B estimates how many times the item appears per step. Every rank feeds it the same global
    ids, so the state stays identical across ranks without communication.
    """

    def __init__(self, buckets: int, alpha: float, device: torch.device):
        self.buckets, self.alpha = buckets, alpha
        self.last_step = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.gap = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.step = 0

    def _hash(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids * 2654435761) % self.buckets

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        self.step += 1
        slots, counts = torch.unique(self._hash(ids[ids > 0]), return_counts=True)
        seen = self.last_step[slots] > 0
        elapsed = self.step - self.last_step[slots]
        gap = torch.where(seen, (1 - self.alpha) * self.gap[slots] + self.alpha * elapsed, elapsed)
        # Further occurrences within the same step have elapsed time 0: the EMA shrinks once per extra copy.
        self.gap[slots] = gap * (1 - self.alpha) ** (counts - 1).to(gap.dtype)
        self.last_step[slots] = float(self.step)

    def per_step_count(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated occurrences of each id per step (0 for ids never seen)."""
        gap = self.gap[self._hash(ids)]
        return torch.where(gap > 0, 1.0 / gap.clamp(min=1e-12), torch.zeros_like(gap))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so torch.distributed.checkpoint saves and loads it like the model."""
        return {"last_step": self.last_step, "gap": self.gap, "step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step.copy_(state["last_step"])
        self.gap.copy_(state["gap"])
        self.step = int(state["step"])


class CandidateLogQ:
    """log Q(j) = log(G p(j) + S q(j)) for candidate ids, from exact counts or the streaming estimate."""

    def __init__(self, freq: torch.Tensor, proposal: torch.Tensor, num_negatives: int, in_batch: bool,
                 frequency: str, buckets: int, alpha: float):
        self.unigram = freq.double() / freq.sum().clamp(min=1)
        self.proposal = proposal.double()
        self.num_negatives = num_negatives
        self.in_batch = in_batch
        self.streaming = StreamingFrequency(buckets, alpha, freq.device) if frequency == "streaming" else None

    def __call__(self, candidate_ids: torch.Tensor, global_positives: torch.Tensor) -> torch.Tensor:
        """`global_positives` are the ids of the global batch's positives; 0 marks a padding row, which
        draws no in-batch candidate: G counts the real positives only."""
        if self.streaming is not None:
            self.streaming.update(global_positives)
            in_batch = self.streaming.per_step_count(candidate_ids)
        else:
            in_batch = (global_positives > 0).sum() * self.unigram[candidate_ids]
        expected = self.num_negatives * self.proposal[candidate_ids]
        if self.in_batch:
            expected = expected + in_batch
        return torch.log(expected.clamp(min=1e-12)).float()


    def distinct(self, candidate_ids: torch.Tensor, positives: torch.Tensor, set_sizes: torch.Tensor) -> torch.Tensor:
        """log Q for the transformer's candidates: the *distinct* targets of the global batch's P positions hold
        item j with probability 1 - (1 - p(j))^P (streaming: 1 - exp(-estimated count per step)), plus S q(j)
        for the mixed negatives. `positives` are the global batch's position targets (0: padding), `set_sizes`
        the sizes of the sets that were made distinct (one: P), each contributing its term."""
        sizes = set_sizes.double()[:, None]
        if self.streaming is not None:
            self.streaming.update(positives)
            rate = self.streaming.per_step_count(candidate_ids)[None, :] * sizes / sizes.sum().clamp(min=1)
            in_batch = -torch.expm1(-rate).sum(0)
        else:
            in_batch = -torch.expm1(sizes * torch.log1p(-self.unigram[candidate_ids].clamp(max=1.0))[None, :]).sum(0)
        expected = self.num_negatives * self.proposal[candidate_ids]
        if self.in_batch:
            expected = expected + in_batch
        return torch.log(expected.clamp(min=1e-12)).float()


class RetrievalLoss(torch.nn.Module):
    """Glue between a TrainBatch and `sampled_softmax_loss`. Being a module without sharded
    children, it is a leaf for the pipeline's FX tracer, so its data-dependent code is not traced."""

    def __init__(self, temperature: float, in_batch: bool, logq_on_positive: bool, log_q: CandidateLogQ | None,
                 max_logits: int = DEFAULT_MAX_LOGITS, world_size: int = 1, merge: bool = True):
        super().__init__()
        self.temperature, self.in_batch, self.logq_on_positive = temperature, in_batch, logq_on_positive
        self.log_q, self.max_logits, self.world_size, self.merge = log_q, max_logits, world_size, merge

    def forward(self, query: torch.Tensor, candidates: torch.Tensor, batch) -> torch.Tensor:
        """In-batch positives are gathered from every rank, so the negatives are the global batch.

        Gradients are averaged over ranks (DDP for the MLPs, TorchRec's gradient division for the
        tables), so each rank divides its summed loss by the global number of real rows over the world
        size: the average is then the mean over the global batch's real rows, even when an epoch's
        padded last batch leaves the ranks with different numbers of real rows."""
        b = query.shape[0]
        positives, positive_ids = candidates[:b], batch.candidate_ids[:b]
        offset = 0
        if self.world_size > 1:
            positives, positive_ids = all_gather_with_grad(positives), all_gather_ids(positive_ids)
            offset = torch.distributed.get_rank() * b
        candidates = torch.cat([positives, candidates[b:]])
        ids = torch.cat([positive_ids, batch.candidate_ids[b:]])
        log_q = self.log_q(ids, positive_ids) if self.log_q is not None else None
        positive_index = offset + torch.arange(b, device=query.device)
        normalizer = (positive_ids > 0).sum() / self.world_size
        return sampled_softmax_loss(query, candidates, ids, positive_index, batch.row_mask, log_q,
                                    num_in_batch=len(positive_ids), temperature=self.temperature,
                                    in_batch=self.in_batch, logq_on_positive=self.logq_on_positive,
                                    normalizer=normalizer, max_logits=self.max_logits, merge=self.merge)


def padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class SequenceRetrievalLoss(torch.nn.Module):
    """The transformer's loss: every real position against the global batch's distinct targets plus the rank's
    mixed negatives. Across ranks the distinct targets are one set: every rank's set is gathered (padded to
    the largest with id 0) and each item kept once, at its first copy, so a world of W ranks builds the same
    candidates as one process on the concatenated batch. A position's own column is its target's; any other
    column holding that item (a mixed negative) is an accidental hit and is masked; with `mask_seen`, so is
    every column holding an item the position has already read. The loss is the sum over positions divided by
    the global number of positions over the world size, as in `RetrievalLoss`."""

    def __init__(self, temperature: float, in_batch: bool, logq_on_positive: bool, log_q: CandidateLogQ | None,
                 max_logits: int = DEFAULT_MAX_LOGITS, world_size: int = 1, merge: bool = True,
                 mask_seen: bool = False):
        super().__init__()
        self.temperature, self.in_batch, self.logq_on_positive = temperature, in_batch, logq_on_positive
        self.log_q, self.max_logits, self.world_size, self.merge = log_q, max_logits, world_size, merge
        self.mask_seen = mask_seen

    def forward(self, query: torch.Tensor, candidates: torch.Tensor, batch) -> torch.Tensor:
        u = int(batch.num_positives[0])
        positives, positive_ids = candidates[:u], batch.candidate_ids[:u]
        own = batch.own_column
        targets = positive_ids[own]
        all_targets, positions = targets, torch.tensor([own.numel()], device=query.device)
        if self.world_size > 1:
            width = torch.tensor([u, own.numel()], device=query.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            dist.all_reduce(positions)
            all_targets = all_gather_ids(padded_rows(targets, int(width[1])))
            positives, positive_ids = global_distinct(all_gather_with_grad(padded_rows(positives, int(width[0]))),
                                                      all_gather_ids(padded_rows(positive_ids, int(width[0]))))
            own = torch.searchsorted(positive_ids, targets)
        ids = torch.cat([positive_ids, batch.candidate_ids[u:]])
        log_q = self.log_q.distinct(ids, all_targets, positions) if self.log_q is not None else None
        bias = column_bias(ids, log_q, len(positive_ids), self.in_batch)
        own_bias = -log_q[own] if log_q is not None and self.logq_on_positive else torch.zeros_like(query[:, 0])
        columns = torch.cat([positives, candidates[u:]])
        if self.merge:
            columns, bias, own, column_ids = merge_duplicates(columns, ids, bias, own)
            hits = no_hits(own)
        else:
            hits, column_ids = accidental_hits(targets, ids, own), ids
        if self.mask_seen:
            history = batch.sequence[SEQUENCE_KEY]
            seen = seen_hits(history.values(), history.lengths()[:batch.row_mask.shape[0]], batch.positions,
                             column_ids, own)
            hits = union_hits(hits, seen)
        total = softmax_cross_entropy(query, columns, bias, own, own_bias, hits, torch.ones_like(query[:, 0]),
                                      self.temperature, self.max_logits)
        return total / (positions.sum() / self.world_size).clamp(min=1e-6)


def global_distinct(embeddings: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the gathered per-rank distinct targets, each real item once (its first copy, so its gradient
    flows back to one rank) in ascending id order, as `np.unique` orders a single process's set."""
    distinct, first, _ = first_copies(ids)
    real = distinct > 0
    return embeddings[first[real]], distinct[real]
