import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from icl_router import schemas as S
from icl_router.config import SplitConfig
from icl_router.data.splits import make_split

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def table(tasks, split=None):
    n = len(tasks)
    return pa.table(
        {S.QUERY_ID: [f"q{i}" for i in range(n)], S.TEXT: [""] * n, S.TASK: tasks, S.SPLIT: split or ["train"] * n}
    )


def test_standard_split_follows_the_protocol():
    tasks = ["a", "b", "x"] * 10
    s = make_split(table(tasks), SplitConfig(seed=3, id_tasks=["a", "b"], ood_tasks=["x"]))
    idx = np.array([i for i, t in enumerate(tasks) if t != "x"])
    perm = np.random.RandomState(3).permutation(idx)
    assert set(s.train) == {f"q{i}" for i in perm[:14]}
    assert set(s.test) == {f"q{i}" for i in perm[14:]}
    assert s.ood == [f"q{i}" for i, t in enumerate(tasks) if t == "x"]


def test_given_split_and_errors():
    s = make_split(table(["a"] * 3, ["train", "test", "ood"]), SplitConfig(name="given"))
    assert (s.train, s.test, s.ood) == (["q0"], ["q1"], ["q2"])
    with pytest.raises(ValueError, match="match no preset"):
        make_split(table(["zz"]), SplitConfig())
    with pytest.raises(ValueError, match="both ID and OOD"):
        make_split(table(["a"]), SplitConfig(id_tasks=["a"], ood_tasks=["a"]))


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
def test_llmrouter_preset_gives_the_published_sizes():
    rows = [json.loads(line) for f in ("train", "test") for line in open(DATA / "routing/llmrouter" / f"{f}.jsonl")]
    s = make_split(table([r["task"] for r in rows]), SplitConfig(seed=0))
    assert (len(s.test), len(s.ood)) == (1314, 1611)
