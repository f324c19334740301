"""Inference worker group: gRPC server on rank 0 over a continuously batched engine."""
