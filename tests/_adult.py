"""Facts about the Adult schema insitu carries, shared by tests that build models for it."""

from __future__ import annotations

from insitu.data import DataSchema, FeatureEncoder
from insitu.datasets import builtin_schema

# Encoded model inputs of the carried schema: numeric, bin indicators, one-hot categories.
# Derived, not written down: the schema's features change and the tests follow.
N_INPUTS = len(FeatureEncoder.for_schema(DataSchema.load(builtin_schema("adult"))).names)
