"""Export: `artifact` (a checkpoint -> the serving artifact), `queries` (a split's query embeddings, for the
index's recall) and the command line (`python -m trainer.export`)."""
