"""Serving: the export format, the exported model, its ANN index and the recommend CLI.

A separate deployable: it imports torch, numpy, pyarrow, faiss and mlflow (to fetch a run's
export), plus the torch-free `data.keys` and `data.schema`, and never TorchRec or FBGEMM. A test
runs every entry point in a fresh interpreter and checks this.
"""
