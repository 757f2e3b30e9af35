"""The retrieval loss: `kernel` (sampled softmax, chunked, with its masks), `logq` (the correction's Q) and `modules`
(what the model calls, and `build_loss`)."""
