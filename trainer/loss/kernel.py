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
sum its copies received, with as many fewer logits as there were copies (`merge_duplicates`)."""

from __future__ import annotations

import torch

from serving.plain import first_copies

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
    reads = positions % width + 1
    first_read = (torch.cumsum(lengths, 0) - lengths)[positions // width]
    pair_rows = torch.repeat_interleave(torch.arange(len(positions), device=device), reads)
    # pair k of position i reads history[first_read[i] + k - (pairs before i)]: one repeat, then a running index
    items = history[torch.repeat_interleave(first_read - (torch.cumsum(reads, 0) - reads), reads)
                    + torch.arange(len(pair_rows), device=device)]
    if len(column_ids) < 2 or bool((column_ids[1:] > column_ids[:-1]).all()):
        column = column_of(items, column_ids)
        pairs = ((column >= 0) & (column != own[pair_rows])).nonzero().squeeze(1)
        return pair_rows[pairs], column[pairs]
    pairs, columns = matching_columns(items, column_ids)
    rows = pair_rows[pairs]
    keep = columns != own[rows]
    return rows[keep], columns[keep]


def column_of(items: torch.Tensor, column_ids: torch.Tensor) -> torch.Tensor:
    """The column holding each item, -1 for none, where the columns hold distinct ids in ascending order (the
    merged loss's). Where the largest id is within a few times the number of items, a dense id -> column table
    answers each item with one gather (torch's CPU searchsorted costs about 60 ns an item); else one binary
    search per item."""
    if len(column_ids) == 0:
        return torch.full_like(items, -1)
    top = int(column_ids[-1])
    if top <= 4 * len(items) + 1024:
        table = torch.full((top + 2,), -1, dtype=torch.int32, device=items.device)
        table[column_ids] = torch.arange(len(column_ids), dtype=torch.int32, device=items.device)
        return table[items.clamp(max=top + 1)].long()
    column = torch.searchsorted(column_ids, items).clamp(max=len(column_ids) - 1)
    return torch.where(column_ids[column] == items, column, -1)


def union_hits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                        torch.Tensor]:
    """Two hit lists as one, still sorted by row (a pair in both is masked twice, which is harmless)."""
    if len(a[0]) == 0 or len(b[0]) == 0:
        return b if len(a[0]) == 0 else a
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
                needs_grad, matmul_dtype):
        rows = max(1, max_logits // max(candidates.shape[0], 1))
        low = matmul_dtype is not None and matmul_dtype != query.dtype
        # The three products per chunk in `matmul_dtype` (bfloat16 halves their cost where the CPU or GPU has
        # it); everything between them (exponentials, sums, the own logit, the accumulated gradients) stays in
        # the query's precision.
        query_mm = query.to(matmul_dtype) if low else query
        candidates_mm = candidates.to(matmul_dtype) if low else candidates
        total = query.new_zeros(())
        grad_query = torch.zeros_like(query) if needs_grad else None
        grad_candidates = torch.zeros_like(candidates) if needs_grad else None
        bounds = torch.searchsorted(hit_rows, torch.arange(0, query.shape[0] + rows, rows, device=query.device))
        candidate_norm = candidates.norm(dim=1).max() * scale
        top_bias = bias.max()

        def logits_of(q, lo, column, a, b, bound):
            if low:
                logits = (query_mm[lo:lo + len(q)] @ candidates_mm.T).to(q.dtype).mul_(scale).add_(bias)
            else:
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
                if low:
                    grad_mm = grad.to(matmul_dtype)
                    grad_query[lo:lo + rows] = grad_mm @ candidates_mm
                    grad_candidates.add_(grad_mm.T @ query_mm[lo:lo + rows])
                else:
                    grad_query[lo:lo + rows] = grad @ candidates
                    grad_candidates.addmm_(grad.T, q)
        ctx.save_for_backward(grad_query, grad_candidates)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_query, grad_candidates = ctx.saved_tensors
        return (grad_query * grad_total, grad_candidates * grad_total) + (None,) * 10


def softmax_cross_entropy(query: torch.Tensor, candidates: torch.Tensor, bias: torch.Tensor, own: torch.Tensor,
                          own_bias: torch.Tensor, hits: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                          temperature: float, max_logits: int = DEFAULT_MAX_LOGITS,
                          matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted sum over query rows of the cross-entropy of row i's own column `own[i]` among the logits
    l_ij = <q_i, c_j> / T + bias_j, except l_i,own = <q_i, c_own> / T + own_bias_i and the `hits` (rows,
    columns), which are masked. query (P, d), candidates (C, d), bias (C,), own, own_bias, weights (P,).
    `matmul_dtype` (None: the query's) is the precision of the logits' and the gradients' matrix products."""
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or candidates.requires_grad)
    return _SoftmaxCrossEntropy.apply(query, candidates, bias.to(query.dtype), own, own_bias.to(query.dtype),
                                      hits[0], hits[1], weights.to(query.dtype), 1.0 / temperature, max_logits,
                                      needs_grad, matmul_dtype)


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
                         max_logits: int = DEFAULT_MAX_LOGITS, merge: bool = True,
                         matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Loss summed over the rows of `row_mask`, divided by `normalizer` (default: their number, the mean);
    `merge`: one column per item (`merge_duplicates`), else one per candidate with the accidental hits masked;
    `matmul_dtype`: see `softmax_cross_entropy`.

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
    total = softmax_cross_entropy(query, candidates, bias, own, own_bias, hits, weights, temperature, max_logits,
                                  matmul_dtype)
    if normalizer is None:
        normalizer = weights.sum()
    return total / normalizer.to(total.dtype).clamp(min=1e-6)  # 0 rows: 0 / tiny = 0
