"""The benchmarks' pure parts: what a partial rerun keeps."""
