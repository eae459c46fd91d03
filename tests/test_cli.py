"""The ``regcl`` command's wiring: the console script pyproject.toml declares (read from the
file: an installed environment's metadata may be older than the checkout), ``python -m cli``
with every subcommand, and the old entry-point files gone from the library and the service
(checked as files: an older editable install may still resolve their module names)."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_regcl_script_is_cli_main_and_the_package_is_installed():
    target = PYPROJECT["project"]["scripts"]["regcl"]
    assert target == "cli.main:main"
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    assert "cli*" in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]


def test_httpx_is_a_pinned_core_dependency_at_the_installed_version():
    pins = dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups()
                for d in PYPROJECT["project"]["dependencies"])
    assert pins["httpx"] == importlib.metadata.version("httpx")


@pytest.mark.parametrize("path", ["regcl/cli.py", "regcl/bench/serve.py",
                                  "regcl/bench/serve_load.py", "regcl/bench/serve_stack.py",
                                  "workers/up.py", "service/demo.py"])
def test_the_old_entry_point_files_are_gone(path):
    assert not (REPO / path).exists()


def test_python_m_cli_lists_every_command(capsys):
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    assert "{pretrain,bench,up,demo}" in top.stdout
    from cli.main import build_parser

    parser = build_parser()
    for args, expected in ((["bench", "--help"],
                            "{cl,interactive,merge,auto-memory,route,serve,campaign}"),
                           (["bench", "campaign", "--help"], "--train-every"),
                           (["bench", "serve", "--help"], "--swap-versions"),
                           (["bench", "serve", "--help"], "--auto-domains"),
                           (["bench", "route", "--help"], "--scale-only"),
                           (["demo", "--help"], "--admin-key")):
        with pytest.raises(SystemExit):
            parser.parse_args(args)
        assert expected in capsys.readouterr().out, args


def test_a_bad_demo_argument_is_refused_before_any_request():
    result = run_cli("demo", "--url", "http://127.0.0.1:1", "--admin-key", "k" * 20,
                     "--domain", "mars")
    assert result.returncode == 2
    assert "unknown domain 'mars'" in result.stderr
