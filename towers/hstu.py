"""The HSTU tower (Zhai et al. 2024, "Actions speak louder than words"): the transformer tower with HSTU's gated
pointwise-attention units (serving.layers.HSTUBlock) in place of softmax-attention blocks. Their attention bias
adds HSTU's time-gap buckets where the prepared data has event times (`time_gaps`); the batches then carry
`times` (data.batch.no_times) and a served query its events' times.

Everything else is the transformer tower's, unchanged: the EmbeddingCollection item table shared by history and
candidates (sharded by the planner), the history bags and features fused after the stack, the sequence batches,
negatives, logQ, evaluation, export (`serving.sequence.PlainSequenceTower` reads the block kind from the
manifest) and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from config import JobConfig
from data.schema import Metadata
from serving.layers import TIME_BUCKETS
from towers.transformer import Transformer, TransformerConfig


@dataclass
class HSTUConfig(TransformerConfig):
    """The transformer's fields, read the same way: `blocks` HSTU units, `heads` (model.item_dim divides by
    it), `dropout` on the input embeddings and before each unit's output projection, `input_norm`,
    `candidate`; and HSTU's own:"""

    # The units' bias adds log-scaled buckets of the time between the predicted event and each earlier one,
    # where the prepared data has event times (metadata event_times); positions only where it has none.
    time_gaps: bool = True


class HSTU(Transformer):
    name = "hstu"
    summary = "hstu"
    Config = HSTUConfig
    block = "silu"

    def time_buckets(self, meta: Metadata, cfg: JobConfig) -> int:
        return TIME_BUCKETS if self.section(cfg).time_gaps and meta.event_times else 0


TOWER = HSTU()
