"""The HSTU tower (Zhai et al. 2024, "Actions speak louder than words"): the transformer tower with HSTU's gated
pointwise-attention units (serving.layers.HSTUBlock) in place of softmax-attention blocks.

Everything else is the transformer tower's, unchanged: the EmbeddingCollection item table shared by history and
candidates (sharded by the planner), the history bags and features fused after the stack, the sequence batches,
negatives, logQ, evaluation, export (`serving.sequence.PlainSequenceTower` reads the block kind from the
manifest) and serving.
"""

from __future__ import annotations

from dataclasses import dataclass

from towers.transformer import Transformer, TransformerConfig


@dataclass
class HSTUConfig(TransformerConfig):
    """The transformer's fields, read the same way: `blocks` HSTU units, `heads` (model.item_dim divides by
    it), `dropout` on the input embeddings and before each unit's output projection, `input_norm`,
    `candidate`."""


class HSTU(Transformer):
    name = "hstu"
    summary = "hstu"
    Config = HSTUConfig
    block = "silu"


TOWER = HSTU()
