"""Ingest an image dataset into large shard objects plus a byte-offset index (spec §5): the
source layouts' parsers (:mod:`.layouts`) and the writer of shards, index and manifest
(:mod:`.writer`)."""
from rsk_dist.ingest.layouts import LAYOUTS, IngestError
from rsk_dist.ingest.writer import IngestResult, gc_dataset, ingest

__all__ = ["LAYOUTS", "IngestError", "IngestResult", "gc_dataset", "ingest"]
