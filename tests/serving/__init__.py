"""Export and serving: the exported towers score as the training model does."""
