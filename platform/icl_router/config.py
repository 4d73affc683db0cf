"""Typed job configs: pydantic models, YAML as their serialisation.

Every job has one config class. ``load_config(cls, path, overrides)`` reads the
YAML (and the files it layers on with ``base:``), applies ``key.sub=value``
overrides (values parsed as YAML scalars), and validates. Unknown keys and wrong
types fail with the dotted key path.

Layering: a section given as a mapping is merged onto its default, both for
``base:`` files (the file's own keys win) and for a config section whose default
differs from its class's defaults (``EvaluateConfig.icl_router_text`` is the text
router: ``icl_router_text: {k: 50}`` keeps it the text router with K=50).

A leaf of the package: this module imports only ``kinds`` (the closed sets of names) and
``errors``. A config's ``build()`` imports the object it builds when called, and nothing it
builds imports this module, so no import loop runs through here.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icl_router.errors import UserError
from icl_router.kinds import (
    Accelerator,
    DatasetFormat,
    Device,
    DType,
    PolicyKind,
    ProfileLayout,
    PromptStyle,
    QueryInput,
    Scoring,
)


class ConfigError(UserError):
    """A config that cannot be used; the message names the key and the fix."""


ENV_REF = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_env(item: str, *, where: str, env: Mapping[str, str] | None = None) -> str:
    """``$NAME`` / ``${NAME}`` in an app-args override, from ``env`` (default: this process's environment):
    a RayService names the cluster's settings (the icl-router-settings ConfigMap) the way its RayJobs' shells do."""
    env = os.environ if env is None else env

    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in env:
            raise ConfigError(f"{where} {item!r}: ${name} is not set in the environment; set it (cluster/kuberay: "
                              "the icl-router-settings ConfigMap) or write the value")
        return env[name]

    return ENV_REF.sub(value, item)


class Config(BaseModel):
    """Base of every config: unknown keys are errors, values are checked on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _merge_onto_defaults(cls, data: Any) -> Any:
        """A section given as a mapping starts from the field's default, not from its class's defaults."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            default, given = field.default, out.get(name)
            if isinstance(default, Config) and isinstance(given, dict):
                out[name] = deep_merge(default.model_dump(), given)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


C = TypeVar("C", bound=Config)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. embed.batch_size=64")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key; expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in a nested dict (creating levels as needed)."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                dotted = ".".join(path[: i + 1])
                raise ConfigError(f"override {item!r}: {dotted} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, *, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        dotted = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {dotted}: unknown key; remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {dotted}: required key is missing; add it")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"  {dotted}: {e['msg']}{got_s}")
    return "\n".join(lines)


def build_config(cls: type[C], data: dict[str, Any], *, source: str = "<dict>") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=source)) from None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists, scalars, null) replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


BASE_KEY = "base"


def read_config_file(path: str | Path, *, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a YAML config file with its ``base:`` chain merged under it.

    ``base: other.yaml`` (relative to this file's folder) names a config whose keys
    this file inherits; this file's keys win, mappings merging key by key.
    """
    path = Path(path)
    via = "".join(f" (base of {p})" for p in reversed(_chain))
    if not path.is_file():
        if _chain:
            raise ConfigError(f"{_chain[-1]}: base file {path} does not exist; base: is relative to the folder of the file naming it")
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file")
    if path.resolve() in {p.resolve() for p in _chain}:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{_chain[-1]}: base files form a cycle ({cycle}); remove one of the base: keys")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{via}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}{via}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    data = loaded or {}
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of another YAML config (relative to this file), got {base!r}")
    return deep_merge(read_config_file(path.parent / base, _chain=(*_chain, path)), data)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] | None = None) -> C:
    """Read ``path`` (YAML, with its ``base:`` chain; None means all defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_config_file(path)
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return build_config(cls, data, source=source)


# ---------------------------------------------------------------------------
# Shared pieces


class SplitConfig(Config):
    """A named split (see ``icl_router.data.splits``).

    ``standard``: ID tasks split ``train_fraction`` / rest per seed, OOD tasks
    whole (the protocol of docs/design.md §8). ``given``: the dataset's
    own ``split`` column.
    """

    name: Literal["standard", "given"] = "standard"
    seed: int = 0
    train_fraction: float = 0.7
    id_tasks: list[str] | None = None  # None: the preset for the dataset's tasks
    ood_tasks: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError("train_fraction must be strictly between 0 and 1, e.g. 0.7")
        return self


class RayConfig(Config):
    """How a job reaches Ray. ``address: null`` starts a local cluster."""

    address: str | None = None
    num_cpus: int | None = None  # logical CPUs for a local cluster (Ray Data LLM needs >= 8)
    temp_dir: str | None = None


class PolicyConfig(Config):
    """A routing policy (icl_router.routing.policy): the service's default (a request may override it), or the one ``value`` assumes."""

    kind: PolicyKind = "highest"
    threshold: float | None = None
    margin: float | None = None
    budget: float | None = None
    cost_weight: float | None = None  # kind cost: points of p one dollar per query is worth

    def build(self) -> Any:
        """The ``routing.policy.Policy`` this describes."""
        from icl_router.routing.policy import Policy

        return Policy(self.kind, threshold=self.threshold, margin=self.margin, budget=self.budget, cost_weight=self.cost_weight)

    @model_validator(mode="after")
    def _check(self) -> PolicyConfig:
        from icl_router.routing.policy import PolicyError

        try:
            self.build()
        except PolicyError as e:
            raise ValueError(str(e)) from None
        return self


# ---------------------------------------------------------------------------
# Job configs


class EmbedConfig(Config):
    dataset: str
    embedder: str = "all-MiniLM-L6-v2"  # bundled; or a sentence-transformers path / hub id; <model>@<variant>: data/embedder.py
    batch_size: int = 64
    num_actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    normalize: bool = True
    max_seq_length: int | None = None
    ray: RayConfig = RayConfig()


class AnchorsConfig(Config):
    dataset: str
    k: int = 500
    seed: int = 0
    split: SplitConfig = SplitConfig()
    output: str | None = None  # default: <dataset>/anchors.parquet


# ---------------------------------------------------------------------------
# Router training


class TinyRouterConfig(Config):
    """A Qwen2-shaped router built from a config (CPU tests, the demo).

    vLLM on CPU needs a head size of 32 or more: hidden_size / num_attention_heads >= 32.
    """

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 3000  # of the byte-level BPE tokenizer trained on the dataset's texts

    def build(self, texts: list[str], *, seed: int = 0) -> tuple[Any, Any]:
        """(a fresh tiny Qwen2 of this shape, its tokenizer trained on ``texts``) (model/tiny.py)."""
        from icl_router.model.tiny import build_tiny_router_lm

        return build_tiny_router_lm(
            texts, vocab_size=self.vocab_size, seed=seed, hidden=self.hidden_size, heads=self.num_attention_heads,
            kv_heads=self.num_key_value_heads, layers=self.num_hidden_layers, intermediate=self.intermediate_size,
        )


class RouterConfig(Config):
    """Which causal LM routes. ``name_or_path: null`` builds the tiny router."""

    name_or_path: str | None = None  # e.g. Qwen/Qwen2.5-7B-Instruct or a local path
    # the device rule (model/device.py): auto is cuda where the process sees a GPU, bfloat16 there, else cpu and float32
    device: Device = "auto"
    dtype: DType = "auto"
    tiny: TinyRouterConfig = TinyRouterConfig()
    query_input: QueryInput = "vector"
    profile_layout: ProfileLayout = "pairs"
    # add a learned logit from the model's outcomes on the query's nearest anchors (model/evidence.py)
    anchor_evidence: bool = False

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if self.anchor_evidence and self.query_input != "vector":
            raise ValueError("anchor_evidence reads the query's vector: set query_input: vector or anchor_evidence: false")
        return self

    def layout(self, tokenizer: Any) -> Any:
        """The ``model.prompt.PromptLayout`` of this router for ``tokenizer``."""
        from icl_router.model.prompt import PromptLayout

        return PromptLayout(tokenizer, query_input=self.query_input, profile_layout=self.profile_layout)

    def build(self, lm: Any, tokenizer: Any, *, anchor_emb: Any) -> Any:
        """The ``model.router.ICLRouter`` this describes around a loaded ``lm`` and its ``tokenizer``; anchor_emb [K, E] (a tensor)."""
        from icl_router.model.router import ICLRouter

        return ICLRouter(lm, self.layout(tokenizer), anchor_emb=anchor_emb, anchor_evidence=self.anchor_evidence)


class PhaseConfig(Config):
    """A run of epochs with fixed learning rates. 0 freezes that part for the phase: its
    parameters compute no gradients (``lr_projector`` covers the anchor-evidence head too)."""

    epochs: int = 1
    lr_projector: float = Field(default=1e-5, ge=0)
    lr_router: float = Field(default=2e-6, ge=0)


class DeepSpeedConfig(Config):
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool | None = None  # null: follow router.dtype (the device rule); set, it must agree with it
    gradient_clipping: float = 1.0
    weight_decay: float = 0.0


class ScalingConfig(Config):
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


class DecisionFitConfig(Config):
    """How a trained router's decision layer is fitted (routing/decision_fit.py, docs/design.md §3)."""

    clusters: int = Field(default=8, ge=2)  # k-means clusters whose own anchors are hidden in the second view
    tasks: bool = True  # fit the layer for queries whose task has anchors (routing.decision ``task``), where the data names tasks
    # when a trained step is kept, the held-out queries it trained on are scored by this many fold routers, each
    # trained as the kept one without its fold (train/held_out.py); 0: leave those queries out of the fit
    folds: int = Field(default=2, ge=0)
    # the guard's default model: the best on the held-out queries the layer is fitted on (stored as the layer's default_model;
    # a pool without it falls back to the best prior), or the best prior (anchors: its accuracy on the anchors, chosen when
    # routing; the behaviour before, docs/results.md "The guard's default fitted on the held-out queries")
    default: Literal["anchors", "held_out"] = "held_out"


class TrainStepsConfig(Config):
    """How a router trains, step by step: all the training loop reads (train/loop.py). Evaluation trains
    with it alone, in process; the train job's ``TrainConfig`` adds the data, the output and the cluster."""

    stage: Literal[1, 2]
    init_from: str | None = None  # a router directory from the previous stage
    router: RouterConfig = RouterConfig()
    phases: list[PhaseConfig] = [PhaseConfig()]
    batch_size: int = 32  # pairs per optimiser step per worker (stage 2: one model's pairs share a prefix)
    max_steps: int | None = None  # stop early (tests, smoke runs)
    max_text_tokens: int = 128  # query text is cut to this many tokens
    seed: int = 0
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainStepsConfig:
        if not self.phases:
            raise ValueError("phases must list at least one phase, e.g. [{epochs: 1, lr_projector: 1e-5, lr_router: 2e-6}]")
        for i, ph in enumerate(self.phases):
            if ph.lr_projector <= 0 and ph.lr_router <= 0:
                raise ValueError(f"phases[{i}] trains nothing (lr_projector and lr_router are 0): give one of them a rate > 0 or drop the phase")
        gpu, dev = self.scaling.use_gpu, self.router.device
        if dev == "cuda" and not gpu:
            raise ValueError("router.device is cuda but scaling.use_gpu is false: a Ray Train worker sees a GPU only when it asks for one")
        if dev == "cpu" and gpu:
            raise ValueError("router.device is cpu with scaling.use_gpu: true, which leaves the workers' GPUs idle: set router.device: auto")
        if self.router.dtype == "float16":
            raise ValueError("router.dtype float16 is for serving; train in bfloat16 (GPUs) or float32")
        if self.train_dtype == "bfloat16" and not gpu:
            raise ValueError("bfloat16 training (router.dtype or deepspeed.bf16) needs scaling.use_gpu=true; CPUs train in fp32")
        if self.deepspeed.bf16 is not None and self.deepspeed.bf16 != (self.train_dtype == "bfloat16"):
            raise ValueError(f"deepspeed.bf16={self.deepspeed.bf16} disagrees with router.dtype={self.router.dtype!r} "
                             f"(scaling.use_gpu={gpu}): drop deepspeed.bf16 and set router.dtype")
        return self

    @property
    def train_dtype(self) -> str:
        """The router's training dtype under the device rule: router.dtype, else deepspeed.bf16, else bfloat16 on GPUs."""
        if self.router.dtype != "auto":
            return self.router.dtype
        if self.deepspeed.bf16 is not None:
            return "bfloat16" if self.deepspeed.bf16 else "float32"
        return "bfloat16" if self.scaling.use_gpu else "float32"


class TrainConfig(TrainStepsConfig):
    """The train job: the steps (``TrainStepsConfig``) on a dataset's split, written to ``output``, on Ray Train."""

    dataset: str
    output: str  # the trained router directory
    embedder: str = "all-MiniLM-L6-v2"
    models: list[str] | None = None  # train on these pool models only (null: every model with outcomes)
    split: SplitConfig = SplitConfig()
    checkpoint_every: int = 50  # steps
    max_failures: int = 2  # worker failures survived by resuming from the latest checkpoint
    storage_path: str | None = None  # Ray Train run storage; default <output>.runs
    # stage 2: train queries held out of training, on which the trained router is checked against the
    # untrained one (the better is kept) and the decision layer is fitted
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    decision: DecisionFitConfig | None = DecisionFitConfig()  # stage 2; null: no decision layer
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------------------
# Pool profiling


class SamplingConfig(Config):
    """vLLM sampling parameters of one candidate model (passed to ``vllm.SamplingParams`` as is)."""

    temperature: float = 0.0  # greedy: profiles must be reproducible
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0


class CandidateModelConfig(Config):
    """One pool model: where it is, how it samples, what a token costs, how vLLM runs it."""

    name: str  # the model_id written to outcomes/
    path: str  # a local directory or a hub id, e.g. Qwen/Qwen2.5-7B-Instruct
    chat_template: str | None = None  # a Jinja template overriding the tokenizer's own
    sampling: SamplingConfig = SamplingConfig()
    cost_per_input_token: float = 0.0  # dollars
    cost_per_output_token: float = 0.0
    engine_kwargs: dict[str, Any] = {}  # vLLM engine args: max_model_len, dtype, tensor_parallel_size, ...
    accelerator: Accelerator = "cpu"
    accelerator_type: str | None = None  # GPU only, e.g. A10G or H100
    concurrency: int = 1  # vLLM engine replicas
    env_vars: dict[str, str] = {}  # for the engine actors; on top of the CPU defaults when accelerator=cpu

    @model_validator(mode="after")
    def _check(self) -> CandidateModelConfig:
        if self.accelerator == "cpu" and (self.accelerator_type or self.engine_kwargs.get("tensor_parallel_size", 1) != 1):
            raise ValueError(f"model {self.name!r}: accelerator_type and tensor_parallel_size > 1 need accelerator=gpu")
        if min(self.cost_per_input_token, self.cost_per_output_token) < 0:
            raise ValueError(f"model {self.name!r}: token costs must be >= 0")
        return self


class ProfileConfig(Config):
    """``icl-router profile``: run every (query, model) pair that has no outcome yet and grade it."""

    dataset: str
    models: list[CandidateModelConfig]
    queries: Literal["anchors", "split", "all"] = "anchors"
    split: SplitConfig = SplitConfig()  # queries=split: which split ...
    part: Literal["train", "test", "ood"] = "train"  # ... and which part of it
    tasks: list[str] | None = None  # keep only these tasks (None: all)
    prompt_style: PromptStyle = "json"  # json: reasoning + a JSON answer (ZeroEval); short: the answer alone (small models)
    max_tokens: dict[str, int] = {}  # per task, over each model's sampling.max_tokens (e.g. {trivia_qa: 32, mbpp: 384})
    shard_size: int = 256  # outcome rows per file: a killed job loses at most the shards not yet written
    batch_size: int = 32  # rows per vLLM engine call
    ray: RayConfig = RayConfig(num_cpus=8)  # Ray Data LLM's four stages need >= 8 logical CPUs on a local cluster

    @model_validator(mode="after")
    def _check(self) -> ProfileConfig:
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("models must list at least one candidate model, e.g. [{name: m1, path: /models/m1}]")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: names {dup} appear more than once; model names are the outcome model_id")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("shard_size and batch_size must be >= 1")
        return self


# ---------------------------------------------------------------------------
# Valuing candidate models (icl-router value)


class ValueCandidateConfig(Config):
    """One candidate model. Its profile (outcomes on the router's K anchors) comes from, in order:
    ``profile`` given here; the router directory's registered profiles; ``ValueConfig.dataset``'s
    outcomes; else it is profiled first with ``serving`` (vLLM on Ray Data, missing pairs only)."""

    name: str
    profile: list[bool] | None = None  # outcomes on the router's K anchors, in anchor order
    serving: CandidateModelConfig | None = None  # how to run it (the profile job's model config; name defaults to ``name``)

    @model_validator(mode="before")
    @classmethod
    def _serving_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("serving"), dict) and "name" in data:
            serving = dict(data["serving"])
            if serving.setdefault("name", data["name"]) != data["name"]:
                raise ValueError(f"candidate {data['name']!r}: serving.name {serving['name']!r} differs; leave it out (it defaults to the candidate's name)")
            data = {**data, "serving": serving}
        return data


class ValueEvalConfig(Config):
    """The evaluation queries: a dataset's queries with embeddings from the router's embedder
    (the router's anchors are always left out: their outcomes are in the profiles)."""

    dataset: str | None = None  # default: ValueConfig.dataset
    split: SplitConfig | None = None  # null: every query; else only ``part`` of this split
    part: Literal["train", "test", "ood"] = "test"
    max_queries: int | None = Field(default=2000, ge=1)  # a seeded sample bounds the time (null: all)
    seed: int = 0


class ValueConfig(Config):
    """``icl-router value``: the marginal routed gain of each candidate model, and the loss from removing each pool model."""

    router: str  # the router directory (icl_router.json, profiles.parquet, ...)
    dataset: str | None = None  # outcomes of candidates on the router's anchors; profiling appends here; the default evaluation set
    pool: list[str] | None = None  # the current pool: these registered models (null: every registered model)
    candidates: list[ValueCandidateConfig] = []
    evaluation: ValueEvalConfig = ValueEvalConfig()
    policy: PolicyConfig = PolicyConfig()  # the policy the service routes with; the router directory's decision layer applies
    costs: dict[str, float] = {}  # dollars per query by model; default: the mean ``cost`` of its outcomes in ``dataset``
    estimator: Literal["eb", "naive", "eb-pair", "eb-mix", "crossfit"] = "eb"  # routing/marginal.py; bench value measures each
    noise_scale: float = Field(default=1.0, gt=0)  # eb / eb-pair: noise variance = noise_scale * p (1 - p) / n_eff (1: a kernel average's own)
    folds: int = Field(default=2, ge=2)  # crossfit: anchor folds ...
    repeats: int = Field(default=4, ge=1)  # ... and random fold draws averaged
    greedy_max: int | None = Field(default=None, ge=1)  # the greedy best pool for sizes 1..N (null: every model)
    output: str = "runs/value"  # value.json, value.md, value.png
    threads: int | None = Field(default=None, ge=1)  # torch threads for scoring (null: torch's default)
    batch_size: int = 32  # profiling: rows per vLLM engine call
    shard_size: int = 256  # profiling: outcome rows per file
    ray: RayConfig = RayConfig(num_cpus=8)  # profiling only (Ray Data LLM needs >= 8 logical CPUs locally)

    @model_validator(mode="after")
    def _check(self) -> ValueConfig:
        names = [c.name for c in self.candidates]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"candidates: {dup} appear more than once")
        if self.pool is not None:
            if not self.pool:
                raise ValueError("pool must list at least one model (or be null: every registered model)")
            both = sorted(set(self.pool) & set(names))
            if both:
                raise ValueError(f"{both} are in the pool and among the candidates; a pool model's value is in `removals`")
        bad = {m: c for m, c in self.costs.items() if not c >= 0}
        if bad:
            raise ValueError(f"costs must be >= 0 dollars per query, got {bad}")
        return self


# ---------------------------------------------------------------------------
# Evaluation


class GenerateConfig(Config):
    """The synthetic pool (data/generate.py): readable queries in task families, made-up models."""

    seed: int = 0
    n_queries: int = 2000
    n_models: int = 6  # the first n of the synthetic models
    families: list[str] | None = None  # None: every family
    ood_families: list[str] = ["units", "spelling"]
    train_fraction: float = 0.7
    query_noise: float = 0.6  # std of the per-query hardness shared by all models (logits)

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        # the families and models that exist are the generator's tables: data/generate.check_pool
        if self.n_models < 1:
            raise ValueError("n_models must be at least 1")
        if self.n_queries < 1:
            raise ValueError("n_queries must be at least 1")
        if self.families is not None:
            if not set(self.ood_families) <= set(self.families):
                raise ValueError("ood_families must be a subset of families")
            if not set(self.families) - set(self.ood_families):
                raise ValueError("at least one family must be in-distribution (not in ood_families)")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError("train_fraction must be strictly between 0 and 1, e.g. 0.7")
        return self


class EvalRouterConfig(Config):
    """One ICL-Router variant of an evaluation, trained in-process per seed (the Ray Train job's steps).

    The defaults are the best configuration measured on the standard protocol (docs/results.md, "The standard protocol"):
    the tiny router reading the query as a vector, the authors' pairs layout, anchor evidence, K=500.
    """

    router: RouterConfig = RouterConfig(anchor_evidence=True)
    k: int = 500  # anchors, picked per seed on the train part; the evidence reads them
    phases: list[PhaseConfig] = [PhaseConfig(epochs=5, lr_projector=3e-4, lr_router=3e-4)]  # a higher rate keeps the tiny router at the prior (docs/results.md)
    batch_size: int = 32
    max_steps: int | None = 300  # with the evidence, validation peaks early
    max_text_tokens: int = 64
    val_fraction: float = 0.1  # of train, held out to pick the step (early stopping); 0 keeps the last step
    eval_every: int = 100  # steps between validation checks
    decision: DecisionFitConfig | None = DecisionFitConfig()  # null: route by the raw p's argmax
    checkpoints: list[str] | None = None  # one trained router directory per seed instead of training
    # with checkpoints: fit the decision layer here, as this code fits it, instead of using the one stored in each
    # directory (a checkpoint that kept a trained step cannot be refitted here: its trained-on queries are unknown)
    refit_decision: bool = False


# The same router reading the query's text (no evidence: it reads the query's vector); a text step costs several vector
# steps (docs/results.md).
TEXT_ROUTER = EvalRouterConfig(router=RouterConfig(query_input="text", anchor_evidence=False), k=100, max_steps=600, eval_every=500)


class EvalDatasetConfig(Config):
    """One dataset of an evaluation: where it is, its ID/OOD split, how many anchors.

    ``dataset`` is an imported dataset directory, or (with ``format``) JSONL files / a folder
    of an importable format, imported into ``cache_dir``; relative paths are under
    ``data_root``. ``generate`` makes the synthetic pool instead (in ``cache_dir``).
    """

    name: str  # the report's key for this dataset
    dataset: str | None = None
    format: DatasetFormat | None = None
    generate: GenerateConfig | None = None
    split: SplitConfig = SplitConfig()  # id_tasks / ood_tasks / train_fraction; the seed comes from seeds
    view: Literal["text", "last-block"] = "text"  # what is embedded: the text, or its last blank-line block (few-shot prompts)
    k: int | None = None  # anchors per seed (null: icl_router.k)

    @model_validator(mode="after")
    def _check(self) -> EvalDatasetConfig:
        if (self.dataset is None) == (self.generate is None):
            raise ValueError(f"datasets[{self.name}]: give exactly one of dataset (a path) or generate (the synthetic pool)")
        return self


LLMROUTER = EvalDatasetConfig(name="llmrouter", dataset="routing/llmrouter", format="llmrouter")


class RouterBenchEvalConfig(Config):
    """The cost/quality section: the RouterBench subset with its per-query costs, on its own train/test split."""

    dataset: str = "routing/routerbench"  # under data_root
    format: DatasetFormat | None = "routerbench"
    k: int | None = None  # anchors on this dataset's train split (null: icl_router.k)
    reference_model: str = "gpt-4-1106-preview"  # the model whose cost and accuracy the report measures against
    cost_weights: list[float] = [0.0, *(round(10 ** (e / 4), 4) for e in range(-2, 19))]  # the cost policy's sweep (points of p per dollar)


class EvaluateConfig(Config):
    """``icl-router evaluate``: the standard protocol on one or several datasets, beside every baseline.

    Every dataset runs every method on the same rows for every seed. The add-model, K and
    pool-size sections run on the first dataset and seed; ``routerbench`` is the cost
    section. Queries without an ``embedder`` embedding are embedded in-process.
    """

    data_root: str = "../shared/data"
    cache_dir: str = "runs/cache/evaluate"  # imported, generated and embedded copies (runs/ is not versioned)
    embedder: str = "all-MiniLM-L6-v2"
    datasets: list[EvalDatasetConfig] = [LLMROUTER]
    seeds: list[int] = [0, 1, 2]
    knn_k: int = 20
    icl_router: EvalRouterConfig = EvalRouterConfig()
    icl_router_text: EvalRouterConfig | None = None  # e.g. TEXT_ROUTER's settings; null switches it off
    add_model: bool = True  # leave each model out of training, add it by profile only (first dataset and seed)
    k_sweep: list[int] = [50, 100, 250, 500]  # accuracy vs anchors (first dataset and seed)
    pool_sizes: list[int] = [3, 5, 7]  # accuracy vs pool size (first dataset and seed; the first n models by train accuracy)
    sweep_max_steps: int | None = None  # caps each training of the add-model, K and pool-size sweeps
    threads: int | None = None  # torch threads (null: torch's default); 1 on an oversubscribed machine
    # a seeded sample of at most this many ID-test and as many OOD queries per seed, the same rows for every
    # method: for routers too slow to score every query on the machine at hand (a pretrained router LM on CPU)
    test_sample: int | None = Field(default=None, ge=1)
    routerbench: RouterBenchEvalConfig | None = RouterBenchEvalConfig()
    output: str | None = None  # the report directory (or --output)

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.seeds:
            raise ValueError("seeds must list at least one seed, e.g. [0, 1, 2]")
        if not self.datasets:
            raise ValueError("datasets must list at least one dataset, e.g. [{name: llmrouter, dataset: routing/llmrouter, format: llmrouter}]")
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"datasets: names {dup} appear more than once; each is a key of the report")
        for name, r in (("icl_router", self.icl_router), ("icl_router_text", self.icl_router_text)):
            if r is not None and r.checkpoints is not None and (len(r.checkpoints) != len(self.seeds) or len(self.datasets) > 1):
                raise ValueError(f"{name}.checkpoints: one router directory per seed ({len(self.seeds)}) of a single dataset, got {len(r.checkpoints)}")
        return self


# ---------------------------------------------------------------------------
# The routing service (icl-router serve)


class AutoscalingConfig(Config):
    """Ray Serve ``autoscaling_config``; ``target_ongoing_requests`` is always explicit (ray.serve.llm defaults it to 1e9)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be > 0, e.g. 2")
        return self


# vLLM on CPU: one OMP thread, no pinning, a 1 GiB KV cache (vLLM's default asks for most of the machine's RAM).
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


class EndpointConfig(Config):
    """An OpenAI-compatible endpoint the service does not own (serving/endpoint.py): a provider's API,
    another team's vLLM server. Its key is read from ``api_key_env`` in the replica, never written here."""

    base_url: str  # up to the OpenAI paths, e.g. https://api.example.com/v1 (requests go to <base_url>/chat/completions)
    model: str  # the endpoint's own name for the model
    api_key_env: str | None = None  # the environment variable holding its key; null: the endpoint takes none
    timeout_s: float = Field(default=600.0, gt=0)  # one request, streaming included (the service's own first-output timeout still applies)
    connect_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> EndpointConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        return self


class PoolModelConfig(Config):
    """One pool model: served by ``ray.serve.llm`` (real vLLM) from ``path``, or an OpenAI-compatible
    ``endpoint`` the service does not own; ``name`` is its model id in requests and profiles."""

    name: str
    path: str | None = None  # a local directory or a hub id (LLMConfig model_source)
    endpoint: EndpointConfig | None = None  # instead of path: a hosted OpenAI-compatible model
    cost: float = 0.0  # expected dollars per query, for the cost-aware policies
    accelerator: Accelerator = "cpu"
    accelerator_type: str | None = None  # GPU only, e.g. A10G, L4, H100
    engine_kwargs: dict[str, Any] = {}  # vLLM engine args: max_model_len, dtype, tensor_parallel_size, ...
    env_vars: dict[str, str] = {}  # on top of the CPU defaults when accelerator=cpu
    max_ongoing_requests: int = 16
    autoscaling: AutoscalingConfig = AutoscalingConfig()

    def build(self) -> Any:
        """The ray.serve.llm ``LLMConfig`` of this model (its deployment: ``LLMServer:<name>``)."""
        from ray.serve.llm import LLMConfig

        cpu = self.accelerator == "cpu"
        hw: dict[str, Any] = {"accelerator_config": {"kind": "cpu"}} if cpu else {}
        if self.accelerator_type:
            hw["accelerator_type"] = self.accelerator_type
        return LLMConfig(
            model_loading_config={"model_id": self.name, "model_source": self.path},
            engine_kwargs=dict(self.engine_kwargs),
            deployment_config={"autoscaling_config": self.autoscaling.model_dump(), "max_ongoing_requests": self.max_ongoing_requests},
            runtime_env={"env_vars": {**VLLM_CPU_ENV, **self.env_vars} if cpu else dict(self.env_vars)},
            callback_config={"callback_class": "icl_router.serving.local_model.LocalModelCallback"},  # a directory: no download task
            **hw,
        )

    @model_validator(mode="after")
    def _check(self) -> PoolModelConfig:
        if (self.path is None) == (self.endpoint is None):
            raise ValueError(f"pool model {self.name!r}: give exactly one of path (a model vLLM serves) or endpoint ({{base_url, model, api_key_env}})")
        if self.endpoint is not None:
            vllm_only = [k for k in ("accelerator_type", "engine_kwargs", "env_vars") if getattr(self, k)] + (["accelerator"] if self.accelerator != "cpu" else [])
            if vllm_only:
                raise ValueError(f"pool model {self.name!r}: {vllm_only} configure a vLLM replica; an endpoint model takes none of them")
        if self.accelerator == "cpu" and (self.accelerator_type or self.engine_kwargs.get("tensor_parallel_size", 1) != 1):
            raise ValueError(f"pool model {self.name!r}: accelerator_type and tensor_parallel_size > 1 need accelerator=gpu")
        if self.cost < 0:
            raise ValueError(f"pool model {self.name!r}: cost must be >= 0")
        if self.name in ("icl-router", "auto"):
            raise ValueError(f"pool model name {self.name!r} is reserved for routed requests; rename the model")
        return self


class ScorerServeConfig(Config):
    """The router deployment: a trained router directory, batched and autoscaled."""

    path: str  # the router directory (icl-router train output)
    embedder: str | None = None  # override icl_router.json's embedder: a local path, or a variant giving the same vectors (model@onnx)
    max_batch_size: int = 16  # queries scored in one forward (@serve.batch)
    batch_wait_timeout_s: float = 0.0  # 0: batch what queued during the previous batch, never wait
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # the device rule (model/device.py): auto loads on cuda in bfloat16 in a replica with num_gpus > 0, else cpu / float32
    device: Device = "auto"
    dtype: DType = "auto"
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads per replica; default: num_cpus (at least 1)
    embed_cache: int = Field(default=4096, ge=0)  # query embeddings kept per replica, keyed by exact text (LRU); 0: none
    embed_dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16: faster query embedding on CPUs with bf16, slightly moved vectors
    scoring: Scoring = "auto"  # routing.online: full (router LM + evidence), evidence (the head alone), auto (evidence if the LM is silent)
    # where the router runs: its own autoscaled deployment (a handle hop per query, batched), or inside
    # every ingress replica (no hop; the ingress then autoscales by ``autoscaling`` and takes ``num_cpus``)
    placement: Literal["deployment", "ingress"] = "deployment"
    max_ongoing_requests: int = 32
    autoscaling: AutoscalingConfig = AutoscalingConfig(max_replicas=2)

    @model_validator(mode="after")
    def _check(self) -> ScorerServeConfig:
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("router.device is cuda but router.num_gpus is 0: a replica sees a GPU only when it asks for one; set num_gpus: 1")
        return self


class KeyLimits(Config):
    """A key's limits (serving/limits.py); null: none. The rate is the whole service's (each ingress
    replica admits its share); spend is in the pool's cost units (the answering model's ``cost``)."""

    requests_per_minute: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)  # requests admitted at once after a quiet spell; default: a minute's worth
    budget: float | None = Field(default=None, ge=0)
    budget_window_s: float | None = Field(default=None, gt=0)  # spend starts again from 0 this often; null: one window since the start


API_KEYS_ENV = "ICL_ROUTER_API_KEYS"
ADMIN_KEYS_ENV = "ICL_ROUTER_ADMIN_KEYS"


class AuthConfig(Config):
    """Bearer keys: API keys for /v1, admin keys for /admin. Listed here, or read (comma-separated) from
    the named environment variable by each replica. An entry ``name:key`` names the key for its metrics
    and limits; a bare key is named by a hash of it. A service that resolves no API key or no admin key
    refuses to start and names what it read, unless ``open: true`` serves the missing kind to anyone
    (a warning at start): opening is a choice written in the config, never a default."""

    api_keys: list[str] = []
    api_keys_env: str | None = API_KEYS_ENV
    admin_keys: list[str] = []
    admin_keys_env: str | None = ADMIN_KEYS_ENV
    open: bool = False
    limits: dict[str, KeyLimits] = {}  # key name -> its limits (an API key's name: ``name:key`` entries, or key-<hash>)
    default_limits: KeyLimits = KeyLimits()  # every API key without its own entry


class OnboardingConfig(Config):
    """``POST /admin/models`` with ``serving`` and no profile (serving/onboarding.py): the registry deploys
    the model, runs the router's anchors through its replica, grades the answers and registers the profile."""

    # a dataset directory: queries.parquet (the router's anchors), outcomes/ (append-only, by model_id) and
    # registrations/ (the registry's record of what it deploys); null: <router>/onboarding
    dir: str | None = None
    sampling: SamplingConfig = SamplingConfig()  # as `icl-router profile`: greedy, so a profile is reproducible
    prompt_style: PromptStyle = "json"  # how the anchors are asked and read, as the profile job's prompt_style
    max_tokens: dict[str, int] = {}  # per task, over sampling.max_tokens, as the profile job's max_tokens
    concurrency: int = Field(default=8, ge=1)  # anchor requests in flight to the model's replica (vLLM batches them)
    shard_size: int = Field(default=16, ge=1)  # graded outcomes per appended file: a restart loses at most the unwritten ones
    request_timeout_s: float = Field(default=300.0, gt=0)  # one anchor's answer; slower is an error ...
    retries: int = Field(default=2, ge=0)  # ... retried this many times, then the onboarding fails with the reason


class TracingConfig(Config):
    """OpenTelemetry spans of the ingress (serving/tracing.py), exported over OTLP. No endpoint: no
    span is made and opentelemetry is not imported (nothing costs)."""

    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4318/v1/traces (http/protobuf) or otel-collector:4317 (grpc)
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    service_name: str = "icl-router"
    sample_ratio: float = Field(default=1.0, ge=0, le=1)  # share of requests traced (parent-based: a traced caller's choice wins)
    headers: dict[str, str] = {}  # sent with every export (e.g. a collector's auth); values may be $ENV references
    export_interval_s: float = Field(default=2.0, gt=0)  # batch export delay


class ShadowModelConfig(Config):
    """A model added to the shadow router's pool only: never served, routed to in the log. Its profile (outcomes
    on the router's K anchors, anchor order) is given, or read from a dataset's outcomes (as ``icl-router value``
    measured it: ``dataset`` the value job's)."""

    name: str
    profile: list[bool] | None = None
    dataset: str | None = None
    cost: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ShadowModelConfig:
        if (self.profile is None) == (self.dataset is None):
            raise ValueError(f"shadow.pool model {self.name!r}: give exactly one of profile (a list of booleans) or dataset (a directory)")
        return self


class ShadowConfig(Config):
    """A candidate router run beside the live one on the same requests (serving/shadow.py): its decisions
    are logged, never served. Any of ``router`` (another router directory), ``policy`` and ``pool``
    (models it may route to that the service does not serve) differs from the live router's."""

    name: str = "candidate"  # the candidate's label in the log and the report
    router: str | None = None  # a router directory; null: the live one
    policy: PolicyConfig | None = None  # null: the live policy
    pool: list[ShadowModelConfig] = []  # models beside the live pool, e.g. valued by `icl-router value`
    log_dir: str = "runs/shadow"  # Parquet shards, one per flush
    sample: float = Field(default=1.0, gt=0, le=1)  # share of routed requests the shadow sees
    flush_rows: int = Field(default=256, ge=1)  # rows buffered before a shard is written ...
    flush_s: float = Field(default=10.0, gt=0)  # ... or this many seconds after the first
    max_files: int = Field(default=10_000, ge=1)  # oldest shards removed beyond this (bounded disk)
    num_cpus: float = Field(default=0.5, ge=0)  # the shadow router replica (a second router; one replica)

    @model_validator(mode="after")
    def _check(self) -> ShadowConfig:
        names = [m.name for m in self.pool]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"shadow.pool: names {dup} appear more than once")
        return self


class DecisionLogConfig(Config):
    """The decision log (serving/decision_log.py): one Parquet row per routed request, and the feedback
    (``POST /v1/feedback``) on them, under ``dir``: ``decisions/`` and ``feedback/``, rotated shards."""

    dir: str | None = None  # null: no log, and /v1/feedback answers 404 (nothing to give feedback on)
    log_text: bool = False  # keep the routed text (re-profiling needs it); else only its sha256
    log_embedding: bool = False  # keep the query's embedding (the router's embedder)
    shard_rows: int = Field(default=5000, ge=1)  # a shard is written once this many rows wait ...
    flush_interval_s: float = Field(default=2.0, gt=0)  # ... or this long after the last one
    max_bytes: int = Field(default=1 << 30, ge=1)  # per kind (decisions, feedback): the oldest shards go beyond it
    feedback_ttl_s: float = Field(default=7 * 86400.0, gt=0)  # feedback on an older request is refused (404 expired)
    recent: int = Field(default=100_000, ge=0)  # request ids each ingress replica remembers (older ones: read from the shards)
    graders: dict[str, str] = {}  # task -> grader (graders.GRADERS) for feedback's reference, over the router anchors' own


class ServeConfig(Config):
    """``icl-router serve``: the OpenAI-compatible routing service on Ray Serve."""

    router: ScorerServeConfig
    pool: list[PoolModelConfig]  # may be empty: every model then joins by POST /admin/models (onboarding)
    policy: PolicyConfig = PolicyConfig()
    auth: AuthConfig = AuthConfig()
    app_name: str = "icl-router"
    host: str = "127.0.0.1"
    port: int = 8100  # 0: any free port
    first_output_timeout_s: float = 20.0  # a pool model silent this long is failed over to the next (its circuit opens)
    router_timeout_s: float = 2.0  # a router call slower than this is given up: the request routes by the priors
    probe_interval_s: float = 1.0  # how often open circuits are probed (a 1-token request; the router's health call)
    probe_timeout_s: float = 5.0  # a probe silent this long has failed
    registry_timeout_s: float = 30.0  # an admin call the registry does not answer in this time gets 503
    deploy_timeout_s: float = 900.0  # a registration with `serving` not RUNNING by then fails with the reason (and is torn down)
    max_prompt_chars: int = 32000  # longer prompts get 400 context_length_exceeded
    max_body_bytes: int = 1_048_576  # larger request bodies get 413 request_too_large
    persist_profiles: bool = False  # onboarded profiles written back to <router>/profiles.parquet
    onboarding: OnboardingConfig = OnboardingConfig()
    decision_log: DecisionLogConfig = DecisionLogConfig()
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = 256
    ray: RayConfig = RayConfig(num_cpus=8)  # ray.serve.llm: a model replica takes {CPU: 2}
    tracing: TracingConfig = TracingConfig()  # OpenTelemetry spans over OTLP; off without an endpoint
    shadow: ShadowConfig | None = None  # a candidate router beside the live one, logged and not served

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        names = [m.name for m in self.pool]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pool: names {dup} appear more than once")
        positive = ("first_output_timeout_s", "router_timeout_s", "probe_interval_s", "probe_timeout_s", "registry_timeout_s", "deploy_timeout_s")
        bad = [k for k in positive if not getattr(self, k) > 0]
        if bad or self.max_prompt_chars < 1 or self.max_body_bytes < 1024:
            raise ValueError(f"{', '.join(positive)} must be > 0 (got {bad or 'ok'}), max_prompt_chars >= 1 and max_body_bytes >= 1024")
        if self.shadow is not None:
            clash = sorted({m.name for m in self.shadow.pool} & set(names))
            if clash:
                raise ValueError(f"shadow.pool: {clash} are served in pool; a shadow model is one the service does not serve")
        return self


class JudgeConfig(Config):
    """``reprofile.judge``: a judge model grades the answers to sampled logged queries that have neither a
    reference nor a gold (data/judge.py), gated by its agreement with the project's graders on a
    calibration sample of graded answers. Off by default."""

    enabled: bool = False
    model: str | None = None  # a pool model's name: vLLM on Ray Data from its path, its endpoint, or through the service (via: service)
    endpoint: EndpointConfig | None = None  # instead of model: any OpenAI-compatible endpoint ({base_url, model, api_key_env})
    rubric: str | None = None  # the judge's prompt, with {question} and {answer}; null: data/judge.py's DEFAULT_RUBRIC
    max_tokens: int = Field(default=8, ge=1)  # the verdict's length (Yes / No)
    metric: Literal["kappa", "accuracy"] = "kappa"  # the agreement with the graders that the gate reads
    min_agreement: float = 0.6  # the gate: the judge's outcomes join the evidence only at or above it
    calibration: int = Field(default=200, ge=1)  # graded answers the judge also judges (reference unseen) to measure its agreement
    min_calibration: int = Field(default=30, ge=1)  # fewer readable calibration verdicts than this: the gate stays shut

    @model_validator(mode="after")
    def _check(self) -> JudgeConfig:
        if self.enabled and (self.model is None) == (self.endpoint is None):
            raise ValueError("judge: give exactly one of model (a pool model's name) or endpoint ({base_url, model, api_key_env})")
        lo = -1.0 if self.metric == "kappa" else 0.0
        if not lo <= self.min_agreement <= 1.0:
            raise ValueError(f"judge.min_agreement: {self.metric} lies in [{lo:g}, 1], got {self.min_agreement}; e.g. 0.6")
        if self.min_calibration > self.calibration:
            raise ValueError(f"judge.min_calibration ({self.min_calibration}) exceeds judge.calibration ({self.calibration}): "
                             "the gate could never open; raise calibration or lower min_calibration")
        if self.rubric is not None:
            missing = [p for p in ("{question}", "{answer}") if p not in self.rubric]
            if missing:
                raise ValueError(f"judge.rubric: has no {' or '.join(missing)}; the judge must see the question and the answer")
        return self


class ReprofileConfig(Config):
    """``icl-router reprofile`` (data/reprofile.py): sampled logged queries run on every pool model, graded,
    and added to the router directory's evidence store; every router replica loads it on its next pool sync."""

    serve: str | None = None  # a serve config: the router, the decision log and the pool come from it unless given below
    router: str | None = None  # the router directory (the store is <router>/evidence)
    decision_log: str | None = None  # the decision-log directory (decision_log.dir of the serve config)
    dataset: str | None = None  # the working dataset (queries, outcomes; re-runs skip pairs done); default <decision_log>/reprofile
    models: list[CandidateModelConfig] = []  # default: the serve config's pool models with a path (vLLM on Ray Data)
    endpoints: dict[str, EndpointConfig] = {}  # default: the serve config's endpoint models (asked through their endpoint)
    via: Literal["ray-data", "service"] = "ray-data"  # service: ask the running service for each pool model by name instead
    service_url: str | None = None  # via service: the service's base URL (…/v1); default from the serve config's host and port
    service_key_env: str = "ICL_ROUTER_API_KEYS"  # via service: an API key (the first entry; name:key allowed); else the serve config's first
    sample: float = Field(default=0.3, gt=0, le=1)  # share of the gradable logged queries re-profiled
    max_queries: int | None = Field(default=1000, ge=1)  # and at most this many per run
    seed: int = 0
    feedback: bool = True  # feedback outcomes (correct / score) of the answering model join the store too
    max_store_queries: int = Field(default=20_000, ge=1)  # the store's bound (the newest queries are kept)
    prompt_style: PromptStyle = "json"
    max_tokens: dict[str, int] = {}
    sampling: SamplingConfig = SamplingConfig()  # via service / endpoints
    concurrency: int = Field(default=4, ge=1)  # via service / endpoints: requests in flight
    batch_size: int = 32
    shard_size: int = 256
    ray: RayConfig = RayConfig(num_cpus=8)
    judge: JudgeConfig = JudgeConfig()  # grades the sampled queries without a reference or gold (off by default)


# ---------------------------------------------------------------------------
# The end-to-end demo (icl-router demo, make demo)


class DemoConfig(Config):
    """``icl-router demo``: real questions and two real pretrained LMs through every job and the service (demo.py)."""

    output: str = "runs/demo"
    seed: int = 0
    data_root: str = "../shared/data"  # LLMRouter's questions (routing/llmrouter); their outcomes are packaged
    models_dir: str = "runs/models"  # where `icl-router models` converts the pretrained LMs
    id_tasks: list[str] = ["natural_qa", "trivia_qa", "human_eval"]  # where the two models answer differently
    ood_tasks: list[str] = ["mbpp", "gsm8k"]
    embedder: str = "all-MiniLM-L6-v2"  # or a variant, e.g. all-MiniLM-L6-v2@onnx-int8 (data/embedder.py)
    k: int = Field(default=32, ge=2)  # anchors: with two models, the train questions exactly one of them answers
    stage1_epochs: int = 2
    stage2_epochs: int = 4
    stage1_lr: float = 1e-3  # a tiny router trained from scratch needs far larger rates than the paper's
    stage2_lr: float = 1e-3
    anchor_evidence: bool = True  # stage 2 adds kNN on the profile as a logit (RouterConfig.anchor_evidence)
    num_workers: int = 2  # Ray Train workers (DeepSpeed ZeRO-2, fp32 on CPU)
    onboard_timeout_s: float = Field(default=900.0, gt=0)  # one model from POST to ready
    questions: list[str] = [  # routed through the service at the end (the first is the README's)
        "What is the capital of France? Answer in one word.",
        "Who wrote the novel Moby-Dick?",
        "Write a Python function that returns the factorial of n.",
        "What is 12 + 30? Give only the final number.",
        "Which planet is the largest in our solar system?",
    ]
    max_tokens: int = Field(default=64, ge=1)  # per routed answer
    ray: RayConfig = RayConfig(num_cpus=8)  # the service's two vLLM replicas take {CPU: 2} each
