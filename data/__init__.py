"""Data layer: raw sources -> prepared Parquet layout -> pipelined KJT batches."""
