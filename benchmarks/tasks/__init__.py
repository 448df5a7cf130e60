"""Task benchmarks: real-data tasks trained with compressed tables (see run.py)."""
