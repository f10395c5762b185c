"""OpenAI's Files and Batch APIs: files on disk per key, batches in Redis, run by a lease-holding runner."""

from gateway.batches.service import Batches, BatchesLifecycle

__all__ = ["Batches", "BatchesLifecycle"]
