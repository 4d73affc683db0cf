"""Every command the README (and the cluster runbook) tells a newcomer to type, run in its cheapest form,
so a command that drifts from the code fails here instead of in a newcomer's shell:

- `icl-router ...`: parsed by the real CLI parser (every flag and choice), and its config loaded with
  the overrides as typed (the `--config` file exists, every key is real); `generate` runs for real
  into a temp dir; `$ icl-router ...` transcripts are run and must print what the README shows;
- `make <target>`: the target exists in the Makefile; scripts: they exist, are executable, parse;
- `curl localhost:<port>/...`: the port and key are the demo config's;
- `kubectl` / `docker` in the runbook: the files, label selectors and objects they name exist in
  cluster/kuberay as `kubectl kustomize` renders it (see tests/unit/conftest.py);
- Python blocks: they compile, and every name they import from icl_router exists.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from icl_router import config as config_mod
from icl_router.cli import build_parser, main
from icl_router.config import DemoConfig, ServeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DOCS = {"README.md": REPO / "README.md", "cluster/README.md": REPO / "cluster" / "README.md"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(icl-router [^`]+)`")
PLACEHOLDER = re.compile(r"\.\.\.|<[a-z_]+>|\[(?:key|-)|\bJOB\b|\bDIR\b|http://HEAD:")  # a synopsis, not a command to type


def blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def shell_lines(body: str) -> list[str]:
    """Lines of a shell block, continuations joined, comment-only lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def commands(doc: str) -> list[str]:
    text = DOCS[doc].read_text()
    out = [ln for b in blocks(text, "bash") for ln in shell_lines(b) if not PLACEHOLDER.search(ln)]
    # inline `icl-router ... --flag ...` spans in the prose (a bare `icl-router submit` names the command,
    # it is not one to type), unless they are a synopsis with placeholders
    out += [c for c in INLINE.findall(text) if " --" in c and not PLACEHOLDER.search(c)]
    return out


def _split(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


def _config_class(command: str) -> type | None:
    if command in ("serve", "onboard"):
        return ServeConfig
    try:  # the job commands: the submit table knows each one's config class
        with contextlib.redirect_stderr(io.StringIO()):
            ns = build_parser().parse_args(["submit", command, "--address", "http://x:1", "--config", "c.yaml"])
    except SystemExit:
        return None
    return getattr(config_mod, ns.config_class)


def check_icl_router(argv: list[str], tmp_path: Path) -> None:
    ns = build_parser().parse_args(argv)  # every flag and choice as the CLI defines it; SystemExit on drift
    command = argv[0]
    if command == "submit":
        command, ns_config, overrides = ns.job, ns.config, list(ns.overrides)
    else:
        ns_config, overrides = getattr(ns, "config", None), list(getattr(ns, "overrides", []) or [])
    cls = _config_class(command)
    if cls is not None and (ns_config is not None or cls is DemoConfig):
        if ns_config is not None:
            assert (REPO / ns_config).is_file(), f"--config {ns_config} does not exist"
        extra = [f"output={ns.output}"] if getattr(ns, "output", None) else []
        load_config(cls, None if ns_config is None else REPO / ns_config, overrides + extra)
    if command == "generate":  # quick enough to run for real
        out = tmp_path / "generated"
        main([*argv[: argv.index("--output") + 1], str(out), *argv[argv.index("--output") + 2 :]])
        assert (out / "queries.parquet").is_file()


def check_transcripts(doc: str) -> int:
    """`$ icl-router ...` lines in plain blocks, followed by what they print: run them, compare."""
    n = 0
    for body in blocks(DOCS[doc].read_text(), ""):
        parts = re.split(r"^\$ ", body, flags=re.M)[1:]
        for part in parts:
            line, *expected = part.rstrip("\n").split("\n")
            argv = _split(line)
            assert argv[0] == "icl-router", line
            err = io.StringIO()
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
                main(argv[1:])
            assert e.value.code == 2 and err.getvalue().rstrip("\n").split("\n") == expected, f"{line}: printed {err.getvalue()!r}"
            n += 1
    return n


@pytest.fixture(scope="module")
def demo() -> ServeConfig:
    return load_config(ServeConfig, REPO / "serve" / "demo.yaml")


def check_line(line: str, *, tmp_path: Path, demo: ServeConfig, rendered: list[dict] | None) -> None:
    sub = re.match(r"^[A-Z_]+=\$\((.*)\)$", line)  # NAME=$(command | ...): check the command
    if sub:
        line = sub.group(1).split(" | ")[0]
    argv = _split(line)
    while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value before a command
        argv = argv[1:]
    head = argv[0] if argv else ""
    if head == "icl-router":
        check_icl_router(argv[1:], tmp_path)
    elif head == "make":
        targets = [a for a in argv[1:] if "=" not in a and not a.startswith("-")]
        assert set(targets) <= _makefile_targets(), f"{line}: no such make target"
    elif head.startswith(("cluster/", "./")):
        script = REPO / head
        assert script.is_file() and script.stat().st_mode & 0o111, f"{head} is not an executable file"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    elif head == "export" or head == "cd":
        pass
    elif head == "curl":
        url = next(a for a in argv if "localhost" in a or "127.0.0.1" in a)
        port = int(re.search(r":(\d+)/", url).group(1))
        assert port == demo.port, f"{line}: port {port}, serve/demo.yaml serves {demo.port}"
        keys = [a.split("Bearer ", 1)[1] for a in argv if "Bearer " in a]
        from icl_router.serving.auth import parse_keys

        known = parse_keys([*demo.auth.api_keys, *demo.auth.admin_keys])
        assert all(k in known for k in keys), f"{line}: {keys} are not the demo's keys"
    elif head == "ray":  # Ray's own CLI: the sub-command exists (its click group), the files it names too
        from ray.scripts.scripts import cli

        group = cli.commands[argv[1]]
        assert argv[2] in group.commands if hasattr(group, "commands") else True, f"{line}: ray {argv[1]} has no {argv[2]}"
        check_cluster_line(line, argv, rendered)
    elif head in ("kubectl", "docker", "python", "for", "done", "$EDITOR"):
        check_cluster_line(line, argv, rendered)
    else:
        raise AssertionError(f"{line!r}: a command this test does not know; teach check_line how to check it cheaply")


def _selected(rendered: list[dict], selector: str) -> list[dict]:
    want = dict(kv.split("=", 1) for kv in selector.split(","))
    return [d for d in rendered if want.items() <= d["metadata"].get("labels", {}).items()]


def check_cluster_line(line: str, argv: list[str], rendered: list[dict] | None) -> None:
    """The runbook's kubectl / docker lines against what cluster/kuberay renders."""
    for token in argv:
        if re.match(r"^(cluster|jobs|serve)/", token):
            assert (REPO / token.split(":")[0]).exists(), f"{line}: {token} does not exist"
    if argv[0] != "kubectl" or rendered is None:
        return
    names = {(d["kind"].lower(), d["metadata"]["name"]) for d in rendered}
    if argv[1] == "apply" and "-k" in argv:
        sel = argv[argv.index("-l") + 1] if "-l" in argv else None
        if sel is not None and "$" not in sel:
            assert _selected(rendered, sel), f"{line}: the selector {sel} selects nothing in cluster/kuberay"
    elif argv[1] == "wait":
        kind, _, name = argv[2].partition("/")
        if "$" not in name:
            assert (kind, name) in names, f"{line}: {kind}/{name} is not in cluster/kuberay"
    elif argv[1:3] == ["get", "secret"]:
        assert any(r["name"] == argv[3] for r in _secret_refs(rendered)), f"{line}: no pod reads the Secret {argv[3]}"
    elif argv[1] == "create" and argv[2] == "secret":
        name = argv[4]
        keys = {a.removeprefix("--from-literal=").split("=", 1)[0] for a in argv if a.startswith("--from-literal=")}
        read = {r["key"] for r in _secret_refs(rendered) if r["name"] == name}
        assert read and keys == read, f"{line}: creates keys {sorted(keys)} of {name}; the pods read {sorted(read)}"


def _secret_refs(node) -> list[dict]:
    if isinstance(node, dict):
        own = [node["secretKeyRef"]] if "secretKeyRef" in node else []
        return own + [r for v in node.values() for r in _secret_refs(v)]
    return [r for v in node for r in _secret_refs(v)] if isinstance(node, list) else []


def test_every_readme_command_still_works(tmp_path, demo, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = commands("README.md")
    assert len(lines) >= 20, lines  # the extraction found the README's commands
    for line in lines:
        check_line(line, tmp_path=tmp_path, demo=demo, rendered=None)
    assert check_transcripts("README.md") >= 2


def test_every_runbook_command_names_what_exists(tmp_path, demo, rendered, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = commands("cluster/README.md")
    assert any(ln.startswith("kubectl apply -k cluster/kuberay") for ln in lines)
    loop = [ln for ln in lines if ln.startswith("for job in ")]
    for ln in loop:  # each job of the runbook's loop has its RayJob
        for job in ln.removeprefix("for job in ").split(";")[0].split():
            assert _selected(rendered, f"icl-router/job={job}"), f"the runbook runs {job}, which has no RayJob"
    for line in lines:
        if "icl-router " in line and line.startswith("kubectl exec"):
            check_icl_router(_split(line[line.index("icl-router ") :])[1:], tmp_path)
        else:
            check_line(line, tmp_path=tmp_path, demo=demo, rendered=rendered)


def test_every_command_in_docs_parses(tmp_path, demo, monkeypatch):
    """docs/*.md: their fenced shell blocks and indented `icl-router` / `curl` lines, checked the same way."""
    monkeypatch.chdir(REPO)
    n = 0
    for doc in sorted((REPO / "docs").glob("*.md")):
        text = doc.read_text()
        lines = [ln for b in blocks(text, "bash") for ln in shell_lines(b)]
        indented = re.sub(r"\\\n\s*", " ", text)
        lines += [m.strip() for m in re.findall(r"^    ((?:icl-router|curl) .*)$", indented, re.M)]
        for line in lines:
            if PLACEHOLDER.search(line) or line.startswith("icl-router serve: "):  # a synopsis, or a printed message
                continue
            check_line(line, tmp_path=tmp_path, demo=demo, rendered=None)
            n += 1
    assert n >= 15


def test_python_blocks_compile_and_import_what_exists():
    import importlib

    for doc in DOCS:
        for body in blocks(DOCS[doc].read_text(), "python"):
            tree = ast.parse(body)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("icl_router"):
                    mod = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(mod, alias.name), f"{doc}: from {node.module} import {alias.name}: no such name"


def test_the_submit_list_is_the_cli_s():
    text = DOCS["README.md"].read_text()
    listed = set(re.findall(r"`(\w[\w-]*)`", re.search(r"\*\*submit\*\*: (.*?) on a Ray cluster", text, re.S).group(1)))
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices["submit"]._actions if a.dest == "job")
    assert listed == set(sub.choices), f"README lists {sorted(listed)}, `icl-router submit` takes {sorted(sub.choices)}"


def test_a_drifted_command_fails(tmp_path, demo):
    """The checks can fail: an unknown flag, a config key that is not one, a wrong port."""
    for line in ("icl-router route --router r --text t --polcy highest", "icl-router embed --config jobs/embed/config.yaml batch_sise=1",
                 "curl localhost:8000/v1/models", "make tests"):
        with pytest.raises((SystemExit, AssertionError, Exception)):
            with contextlib.redirect_stderr(io.StringIO()):
                check_line(line, tmp_path=tmp_path, demo=demo, rendered=None)
    assert yaml  # the runbook's YAML is read through `rendered`
