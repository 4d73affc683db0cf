"""Column names and Parquet schemas: the data contracts of docs/design.md §5.

Every module names columns through these constants, so a column is spelled
the same in Parquet, code, configs and logs.
"""

from __future__ import annotations

import pyarrow as pa

# queries.parquet
QUERY_ID = "query_id"
TEXT = "text"
TASK = "task"
SPLIT = "split"
GOLD = "gold"
GRADER = "grader"
METRIC = "metric"  # the source's own name for its scoring rule (optional)

# outcomes/
MODEL_ID = "model_id"
SAMPLE = "sample"
SCORE = "score"
CORRECT = "correct"
RESPONSE = "response"
COST = "cost"
LATENCY_S = "latency_s"
PROMPT_TOKENS = "prompt_tokens"
COMPLETION_TOKENS = "completion_tokens"

# embeddings/
EMBEDDING = "embedding"
EMBEDDER = "embedder"

# anchors.parquet
POSITION = "position"
N_CORRECT = "n_correct"

# Score at or above which a fractional score (F1 and the like) counts as correct.
CORRECT_THRESHOLD = 0.5

QUERIES_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(TASK, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(GOLD, pa.string()),
        pa.field(GRADER, pa.string()),
        pa.field(METRIC, pa.string()),
    ]
)

# Required outcome columns, then the optional ones (present as nulls when unknown).
OUTCOMES_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(MODEL_ID, pa.string(), nullable=False),
        pa.field(SAMPLE, pa.int32(), nullable=False),
        pa.field(SCORE, pa.float64(), nullable=False),
        pa.field(CORRECT, pa.bool_(), nullable=False),
        pa.field(RESPONSE, pa.string()),
        pa.field(COST, pa.float64()),
        pa.field(LATENCY_S, pa.float64()),
        pa.field(PROMPT_TOKENS, pa.int64()),
        pa.field(COMPLETION_TOKENS, pa.int64()),
    ]
)


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field(QUERY_ID, pa.string(), nullable=False),
            pa.field(EMBEDDING, pa.list_(pa.float32(), dim), nullable=False),
            pa.field(EMBEDDER, pa.string(), nullable=False),
        ]
    )


ANCHORS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(POSITION, pa.int32(), nullable=False),
        pa.field(N_CORRECT, pa.int32(), nullable=False),
    ]
)

# A router directory's anchors.parquet: the anchor queries with what grading an answer needs, so a
# service can profile a new model on them (serving/onboarding.py) without the training dataset.
ROUTER_ANCHORS_SCHEMA = pa.schema(
    [
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(POSITION, pa.int32(), nullable=False),
        pa.field(TEXT, pa.string(), nullable=False),
        pa.field(TASK, pa.string(), nullable=False),
        pa.field(GOLD, pa.string()),
        pa.field(GRADER, pa.string()),
    ]
)

PROFILES_SCHEMA = pa.schema(
    [
        pa.field(MODEL_ID, pa.string(), nullable=False),
        pa.field(QUERY_ID, pa.string(), nullable=False),
        pa.field(CORRECT, pa.bool_(), nullable=False),
    ]
)

# File and folder names inside a dataset directory.
QUERIES_FILE = "queries.parquet"
OUTCOMES_DIR = "outcomes"
EMBEDDINGS_DIR = "embeddings"
ANCHORS_FILE = "anchors.parquet"
