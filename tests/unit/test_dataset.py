import numpy as np
import pyarrow as pa
import pytest

from icl_router import schemas as S
from icl_router.data.dataset import Dataset, DatasetError, write_dataset_atomically


def queries(n=4):
    return pa.table(
        {
            S.QUERY_ID: [f"q{i}" for i in range(n)],
            S.TEXT: [f"text {i}" for i in range(n)],
            S.TASK: ["t"] * n,
            S.SPLIT: ["train"] * n,
        }
    )


def outcomes(model, correct, *, start=0):
    return pa.table(
        {
            S.QUERY_ID: [f"q{i + start}" for i in range(len(correct))],
            S.MODEL_ID: [model] * len(correct),
            S.SAMPLE: [0] * len(correct),
            S.SCORE: [float(c) for c in correct],
            S.CORRECT: correct,
        }
    )


def test_append_only_outcomes_partitioned_by_model(tmp_path):
    ds = Dataset(tmp_path)
    ds.write_queries(queries())
    ds.append_outcomes(pa.concat_tables([outcomes("org/m-a", [True, False]), outcomes("m b", [False, False])]))
    first = sorted(p.name for p in ds.outcomes_dir.rglob("*.parquet"))
    ds.append_outcomes(outcomes("org/m-a", [True, True], start=2))
    files = sorted(ds.outcomes_dir.rglob("*.parquet"))
    assert len(files) == 3 and all(name in [f.name for f in files] for name in first)
    # a model id with "/" or " " stays one directory and reads back unchanged
    assert {p.parent.name for p in files} == {"model_id=org%2Fm-a", "model_id=m%20b"}
    assert ds.model_ids() == ["m b", "org/m-a"]
    m = ds.correctness(["q0", "q1", "q2", "q3"], ["org/m-a", "m b"])
    np.testing.assert_allclose(m[:, 0], [1, 0, 1, 1], atol=1e-12)  # float means of one sample each
    assert np.isnan(m[2:, 1]).all() and (m[:2, 1] == 0).all()
    assert len(ds.read_outcomes(["m b"])) == 2


def test_outcome_contract_violations_write_nothing(tmp_path):
    ds = Dataset(tmp_path)
    bad = outcomes("m", [True]).set_column(3, S.SCORE, pa.array([1.5]))
    with pytest.raises(DatasetError, match="score must lie in"):
        ds.append_outcomes(bad)
    missing = outcomes("m", [True]).drop_columns([S.CORRECT])
    with pytest.raises(DatasetError, match="required column 'correct'"):
        ds.append_outcomes(missing)
    assert not ds.outcomes_dir.exists()


def test_duplicate_query_ids_rejected(tmp_path):
    q = pa.concat_tables([queries(2), queries(1)])
    with pytest.raises(DatasetError, match="unique"):
        Dataset(tmp_path).write_queries(q)


def test_embeddings_first_wins_and_matrix(tmp_path):
    ds = Dataset(tmp_path)
    emb = lambda vals, who: pa.table(  # noqa: E731
        {S.QUERY_ID: ["q0", "q1"], S.EMBEDDING: pa.array(vals, pa.list_(pa.float32(), 2)), S.EMBEDDER: [who, who]}
    )
    ds.append_embeddings(emb([[1, 0], [0, 1]], "a"))
    ds.append_embeddings(emb([[5, 5], [6, 6]], "b"))
    ds.append_embeddings(emb([[9, 9], [9, 9]], "a"))  # a duplicate never replaces the first
    np.testing.assert_allclose(ds.embedding_matrix(["q1", "q0"], embedder="a"), [[0, 1], [1, 0]], atol=1e-7)  # float32 stored
    with pytest.raises(DatasetError, match="run `icl-router embed`"):
        ds.embedding_matrix(["q0", "q9"], embedder="b")


def test_atomic_dataset_write_keeps_old_on_failure(tmp_path):
    root = tmp_path / "ds"
    write_dataset_atomically(root, queries(), outcomes("m", [True, False]))
    with pytest.raises(DatasetError, match="already exists"):
        write_dataset_atomically(root, queries(), outcomes("m", [True]))
    with pytest.raises(DatasetError):
        write_dataset_atomically(root, queries(), outcomes("m", [True]).drop_columns([S.SCORE]), overwrite=True)
    assert len(Dataset(root).read_outcomes()) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no staging left behind


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="icl-router import"):
        Dataset(tmp_path).read_queries()
