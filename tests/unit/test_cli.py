"""The CLI's parser: every bench is offered, a bench that cannot import is an error, building stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

from icl_router import cli


def test_every_bench_is_a_subcommand():
    parser = cli.build_parser()
    for name in cli.BENCHES:
        assert parser.parse_args(["bench", name]).bench == name


def test_a_bench_that_fails_to_import_is_an_error(monkeypatch):
    monkeypatch.setitem(cli.BENCHES, "ghost", "no_such_bench_module")
    with pytest.raises(ImportError, match=r"bench 'ghost': icl_router\.bench\.no_such_bench_module does not import"):
        cli.build_parser()


def test_building_the_parser_imports_no_heavy_framework():
    code = "import sys; from icl_router.cli import build_parser; build_parser(); print(','.join(m for m in ('torch', 'ray', 'deepspeed', 'vllm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
