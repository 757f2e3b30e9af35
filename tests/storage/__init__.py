"""Storage: URIs, the commit protocol, a real S3-compatible server and its faults."""
