"""rsk_dist: distributed Recall@k surrogate training for image-retrieval embeddings.

The core (losses, engine, distributed gradient exchange, sampler, metrics, models) needs torch
alone; the service (Ray Train, storage, config, CLI) is imported only where it is used.
"""
__version__ = "0.1.0"
