"""The trained router directory (docs/design.md §5), saved and loaded without training code.

    config.json, model.safetensors, ...   the router LM (save_pretrained)
    tokenizer.json, tokenizer_config.json  its tokenizer (with the chat template)
    projector.safetensors                  projector weights + ``anchor_emb`` [K, E], the anchors' embeddings
                                           (+ the anchor-evidence head's ``evidence.*`` when ``anchor_evidence``)
    icl_router.json                        format version, embedder, layout, label token ids, anchor ids,
                                           the decision layer's fitted parameters (``decision``)
    profiles.parquet                       model_id, query_id, correct: the registered pool
    anchors.parquet                        the anchor queries in order: query_id, position, text, task, gold,
                                           grader (optional: directories written before it lack it)

The anchor embeddings sit beside the projector because they are its inputs for
every profile: a router directory scores queries with no dataset at hand. The anchor
queries with their gold answers and graders sit here for the same reason: a service
profiles a new model on them (serving/onboarding.py) with no dataset at hand.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from icl_router import schemas
from icl_router.data.dataset import Dataset, DatasetError, conform, swap_into_place
from icl_router.errors import UserError
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter

FORMAT_VERSION = 1
META_FILE = "icl_router.json"
PROJECTOR_FILE = "projector.safetensors"
PROFILES_FILE = "profiles.parquet"
ANCHORS_FILE = "anchors.parquet"
LM_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class RouterDirError(UserError):
    """A router directory with a missing or mismatched part."""


@dataclass
class RouterMeta:
    embedder: str  # the embedding model (a name given as ``<model>@<variant>`` is split into this and ``embedder_variant``)
    embedding_dim: int
    query_input: str
    profile_layout: str
    placeholder_id: int
    yes_id: int
    no_id: int
    anchor_query_ids: list[str]
    anchor_evidence: bool = False  # the router adds AnchorEvidence's logit (model/evidence.py)
    decision: dict | None = None  # routing.decision.DecisionParams as JSON, fitted on held-out queries; None: no decision layer
    stage: int = 2
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # provenance: dataset, steps, final loss, ...
    # Which form of the embedder produced ``anchor_emb`` (data/embedder.py VARIANTS; absent from the
    # JSON: the reference). Queries must be embedded by a variant giving the same vectors
    # (load_query_embedder). The anchors are never re-embedded at load: the directory holds their
    # vectors, not their texts, and the projector and LM were trained on those vectors.
    embedder_variant: str = "sentence-transformers"

    def __post_init__(self) -> None:
        from icl_router.data.embedder import REFERENCE, VARIANTS, parse_embedder

        spec = parse_embedder(self.embedder)
        if spec.variant != REFERENCE:
            if self.embedder_variant not in (REFERENCE, spec.variant):
                raise RouterDirError(f"embedder {self.embedder!r} names variant {spec.variant!r} but embedder_variant is {self.embedder_variant!r}")
            self.embedder, self.embedder_variant = spec.model, spec.variant
        if self.embedder_variant not in VARIANTS:
            raise RouterDirError(f"embedder_variant {self.embedder_variant!r} is unknown; one of {list(VARIANTS)}")

    @property
    def embedder_name(self) -> str:
        """The embedder as a name ``load_embedder`` takes: ``<model>[@<variant>]``."""
        from icl_router.data.embedder import EmbedderName

        return str(EmbedderName(self.embedder, self.embedder_variant))


@dataclass
class LoadedRouter:
    router: ICLRouter
    meta: RouterMeta
    pool: dict[str, np.ndarray]  # model_id -> bool [K], in registration order


def write_profiles(path: Path, pool: dict[str, np.ndarray], anchor_ids: list[str]) -> None:
    rows = [(m, q, bool(c)) for m, prof in pool.items() for q, c in zip(anchor_ids, prof, strict=True)]
    table = pa.table(
        {schemas.MODEL_ID: [r[0] for r in rows], schemas.QUERY_ID: [r[1] for r in rows], schemas.CORRECT: [r[2] for r in rows]},
        schema=schemas.PROFILES_SCHEMA,
    )
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_profiles(path: Path, anchor_ids: list[str]) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    if set(table.column_names) != set(schemas.PROFILES_SCHEMA.names):
        raise RouterDirError(f"{path}: columns {table.column_names}, expected {schemas.PROFILES_SCHEMA.names}")
    pos = {q: i for i, q in enumerate(anchor_ids)}
    pool: dict[str, np.ndarray] = {}
    for m, q, c in zip(*(table.column(n).to_pylist() for n in (schemas.MODEL_ID, schemas.QUERY_ID, schemas.CORRECT))):
        if q not in pos:
            raise RouterDirError(f"{path}: model {m!r} has an outcome on {q!r}, which is not one of the router's anchors")
        prof = pool.setdefault(m, np.full(len(anchor_ids), -1, dtype=np.int8))
        prof[pos[q]] = c
    for m, prof in pool.items():
        if (prof < 0).any():
            missing = [anchor_ids[i] for i in np.flatnonzero(prof < 0)]
            raise RouterDirError(f"{path}: model {m!r} lacks {len(missing)} anchors, e.g. {missing[:5]}")
    return {m: prof.astype(bool) for m, prof in pool.items()}


def anchor_queries(dataset: str | Path, anchor_ids: list[str]) -> pa.Table:
    """The router's anchors as rows of ``anchors.parquet``, read from the dataset's queries (in anchor order)."""
    queries = Dataset(dataset).read_queries()
    index = {q: i for i, q in enumerate(queries.column(schemas.QUERY_ID).to_pylist())}
    missing = [q for q in anchor_ids if q not in index]
    if missing:
        raise RouterDirError(f"{len(missing)} of the router's anchors are not queries of {dataset} (e.g. {missing[:3]}); "
                             "give the dataset the router was trained on")
    rows = queries.take(pa.array([index[q] for q in anchor_ids], pa.int64()))
    rows = rows.append_column(schemas.POSITION, pa.array(range(len(anchor_ids)), pa.int32()))
    return conform(rows, schemas.ROUTER_ANCHORS_SCHEMA, what="anchors")


def write_anchor_queries(path: str | Path, table: pa.Table) -> Path:
    """Write ``anchors.parquet`` into a router directory (atomic), checked against its anchor ids."""
    path = Path(path)
    table = conform(table, schemas.ROUTER_ANCHORS_SCHEMA, what="anchors")
    _check_anchor_queries(table, read_meta(path).anchor_query_ids, where=path / ANCHORS_FILE)
    tmp = path / f".tmp-{uuid.uuid4().hex[:8]}-{ANCHORS_FILE}"
    pq.write_table(table, tmp)
    os.replace(tmp, path / ANCHORS_FILE)
    return path / ANCHORS_FILE


def _check_anchor_queries(table: pa.Table, anchor_ids: list[str], *, where: Path) -> None:
    got = table.column(schemas.QUERY_ID).to_pylist()
    if got != list(anchor_ids) or table.column(schemas.POSITION).to_pylist() != list(range(len(anchor_ids))):
        first = next((i for i, (a, b) in enumerate(zip(got, anchor_ids)) if a != b), min(len(got), len(anchor_ids)))
        raise RouterDirError(f"{where}: {len(got)} anchor queries that differ from {META_FILE}'s {len(anchor_ids)} anchor ids "
                             f"(first difference at position {first}); write it again with `icl-router router-anchors`")


def read_anchor_queries(path: str | Path) -> pa.Table | None:
    """The router directory's anchor queries (``anchors.parquet``) in anchor order, or None if it has none."""
    path = Path(path)
    if not (path / ANCHORS_FILE).is_file():
        return None
    try:
        table = conform(pq.read_table(path / ANCHORS_FILE), schemas.ROUTER_ANCHORS_SCHEMA, what=str(path / ANCHORS_FILE)).sort_by(schemas.POSITION)
    except DatasetError as e:
        raise RouterDirError(str(e)) from None
    _check_anchor_queries(table, read_meta(path).anchor_query_ids, where=path / ANCHORS_FILE)
    return table


def save_router_dir(router: ICLRouter, path: str | Path, *, meta: RouterMeta, pool: dict[str, np.ndarray]) -> Path:
    """Write the directory aside and rename it into place (an old one is replaced whole)."""
    from safetensors.torch import save_file

    path = Path(path)
    if router.k != len(meta.anchor_query_ids):
        raise RouterDirError(f"the router holds {router.k} anchor vectors but meta lists {len(meta.anchor_query_ids)} anchor ids")
    if (router.evidence is not None) != meta.anchor_evidence:
        raise RouterDirError(f"meta says anchor_evidence={meta.anchor_evidence} but the router {'has' if router.evidence is not None else 'lacks'} the evidence head")
    staging = path.with_name(f".{path.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        router.lm.save_pretrained(staging, safe_serialization=True)
        router.layout.tokenizer.save_pretrained(staging)
        tensors = {f"projector.{k}": v.detach().float().contiguous().cpu() for k, v in router.projector.state_dict().items()}
        tensors["anchor_emb"] = router.anchor_emb.detach().float().contiguous().cpu()
        if router.evidence is not None:
            tensors |= {f"evidence.{k}": v.detach().float().contiguous().cpu() for k, v in router.evidence.state_dict().items()}
        save_file(tensors, staging / PROJECTOR_FILE)
        (staging / META_FILE).write_text(json.dumps(asdict(meta), indent=1))
        write_profiles(staging / PROFILES_FILE, pool, meta.anchor_query_ids)
        swap_into_place(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path


def read_meta(path: str | Path) -> RouterMeta:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise RouterDirError(f"{path} is not a router directory: {META_FILE} is missing (train one with `icl-router train`)")
    try:
        raw = json.loads(meta_path.read_text())
        meta = RouterMeta(**raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise RouterDirError(f"{meta_path}: not a valid router description ({e})") from None
    except UserError as e:  # a bad embedder / embedder_variant
        raise RouterDirError(f"{meta_path}: {e}") from None
    if meta.format_version != FORMAT_VERSION:
        raise RouterDirError(f"{meta_path}: format_version {meta.format_version}, this icl-router reads {FORMAT_VERSION}")
    if meta.decision is not None and not isinstance(meta.decision, dict):
        raise RouterDirError(f"{meta_path}: decision must be an object (routing.decision.DecisionParams) or null")
    return meta


def write_decision(path: str | Path, decision: dict | None) -> None:
    """Replace the decision block of a router directory's icl_router.json (atomic rewrite)."""
    path = Path(path)
    meta = read_meta(path)
    meta.decision = decision
    tmp = path / f".tmp-{uuid.uuid4().hex[:8]}-{META_FILE}"
    tmp.write_text(json.dumps(asdict(meta), indent=1))
    os.replace(tmp, path / META_FILE)


def load_router_dir(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedRouter:
    """Load and cross-check every part; a missing or mismatched part is a RouterDirError."""
    from safetensors.torch import load_file

    from icl_router.model.tiny import load_router_lm

    path = Path(path)
    meta = read_meta(path)
    for name in (*LM_FILES, *TOKENIZER_FILES, PROJECTOR_FILE, PROFILES_FILE):
        if not (path / name).is_file():
            raise RouterDirError(f"{path}: {name} is missing; the directory is incomplete (re-export it with `icl-router train`)")
    lm, tokenizer = load_router_lm(path, dtype=dtype)
    layout = PromptLayout(tokenizer, query_input=meta.query_input, profile_layout=meta.profile_layout)
    got = (layout.placeholder_id, layout.yes_id, layout.no_id)
    want = (meta.placeholder_id, meta.yes_id, meta.no_id)
    if got != want:
        raise RouterDirError(f"{path}: tokenizer gives placeholder/Yes/No ids {got} but {META_FILE} says {want}")
    tensors = load_file(path / PROJECTOR_FILE)
    anchor_emb = tensors.pop("anchor_emb", None)
    if anchor_emb is None:
        raise RouterDirError(f"{path / PROJECTOR_FILE}: anchor_emb is missing")
    if tuple(anchor_emb.shape) != (len(meta.anchor_query_ids), meta.embedding_dim):
        raise RouterDirError(
            f"{path / PROJECTOR_FILE}: anchor_emb is {tuple(anchor_emb.shape)}, "
            f"{META_FILE} says K={len(meta.anchor_query_ids)} anchors of width {meta.embedding_dim}"
        )
    evidence = {k.removeprefix("evidence."): tensors.pop(k) for k in [k for k in tensors if k.startswith("evidence.")]}
    if bool(evidence) != meta.anchor_evidence:
        raise RouterDirError(
            f"{path / PROJECTOR_FILE}: {META_FILE} says anchor_evidence={meta.anchor_evidence} but the file "
            f"{'holds' if evidence else 'lacks'} the evidence.* weights (re-export it with `icl-router train`)"
        )
    if evidence and "lm_weight" not in evidence:  # saved before the LM weight existed: the LM counted in full
        evidence["lm_weight"] = torch.ones(1)
    router = ICLRouter(lm, layout, anchor_emb=anchor_emb, anchor_evidence=meta.anchor_evidence)
    try:
        router.projector.load_state_dict({k.removeprefix("projector."): v for k, v in tensors.items()})
        if router.evidence is not None:
            router.evidence.load_state_dict(evidence)
    except RuntimeError as e:
        raise RouterDirError(f"{path / PROJECTOR_FILE} does not fit this router LM: {str(e).splitlines()[0]}") from None
    pool = read_profiles(path / PROFILES_FILE, meta.anchor_query_ids)
    read_anchor_queries(path)  # cross-checked when present
    router = router.to(device=device, dtype=dtype).eval()
    if router.evidence is not None:  # a handful of weights over similarities at small temperatures: kept in float32 whatever the LM's dtype
        router.evidence.float()
    return LoadedRouter(router, meta, pool)
