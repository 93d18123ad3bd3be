"""Persistent WeDetect-Uni object index: extract proposals once, search them by text later."""

from wedetect.index.build import AddReport, ExtractionSettings, build_index, checkpoint_identity
from wedetect.index.search import CachedTextEncoder, ObjectIndex, QueryResult, save_visuals, wedetect_text_encoder
from wedetect.index.store import ImageRecord, IndexMeta, ObjectHit, ObjectIndexError, VectorStore, open_store

__all__ = [
    "AddReport",
    "CachedTextEncoder",
    "ExtractionSettings",
    "ImageRecord",
    "IndexMeta",
    "ObjectHit",
    "ObjectIndex",
    "ObjectIndexError",
    "QueryResult",
    "VectorStore",
    "build_index",
    "checkpoint_identity",
    "open_store",
    "save_visuals",
    "wedetect_text_encoder",
]
