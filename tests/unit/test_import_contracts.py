"""The import contracts (pyproject.toml, `lint-imports`) catch a framework module naming a domain.

`lint-imports` runs on a copy of the packages with this project's configuration: the copy as it
is keeps every contract, and the same copy with a domain imported from framework modules
breaks "the framework imports no domain by name", naming each import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACT = "the framework imports no domain by name"

# Framework modules of each kind (layered or not, imported by others or by none), and a
# domain each could be tempted to name.
INTRUSIONS = {
    "command_service/service_layer/handlers.py": "command_service.domains.ledger",
    "command_service/metrics.py": "command_service.domains.ledger.account",
    "command_service/testing.py": "command_service.domains.ledger",
    "query_service/__main__.py": "query_service.domains.ledger",
    "query_service/projections/base.py": "query_service.domains.ledger",
    "cqrs_runtime/supervision.py": "shared.ledger",
    "shared/messages.py": "shared.ledger",
}


def root_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = config["tool"]["importlinter"]["root_packages"]
    return packages


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for package in root_packages():
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports reads pyproject.toml in, and analyses the packages under, its working
    # directory (it puts it first on sys.path, before the project's editable install).
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1"},
    )


def test_a_framework_module_importing_a_domain_breaks_the_contract(copy: Path) -> None:
    kept = lint_imports(copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert f"{CONTRACT} KEPT" in kept.stdout

    for path, domain in INTRUSIONS.items():
        with (copy / path).open("a") as module:
            module.write(f"\nimport {domain}  # noqa: E402\n")
    broken = lint_imports(copy)

    output = broken.stdout + broken.stderr
    assert broken.returncode == 1, output
    assert f"{CONTRACT} BROKEN" in output
    for path, domain in INTRUSIONS.items():
        importer = path.removesuffix(".py").replace("/", ".")
        assert f"{importer} -> {domain}" in output
