"""The extras a user is told to install (README: ``pip install -e ".[axolotl]"`` or ``".[trl]"``) hold what the
scripts of the commands the user documents name need: ``python examples/prepare_smollm2.py`` after
``pip install -e ".[axolotl]"`` failed on ``gguf``, which only the test extra held (issue 27).

A script's needs are its imports (every ``import`` statement, in functions too) mapped to the distributions that
install them, plus what no import statement shows (:data:`RUNTIME_NEEDS`); an extra holds a distribution when it is
in the extra's requirements or theirs, transitively, as installed here."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
README = (REPO / "README.md").read_text(encoding="utf-8")
# What a user follows after installing an extra: the README, the usage guide, the example configs' comments.
USER_DOCS = [REPO / "README.md", REPO / "docs" / "usage.md", *sorted((REPO / "yaml_examples").glob("*.yaml"))]
USER_EXTRAS = re.findall(r'pip install -e "\.\[(\w[\w-]*)\]"', README)
# transformers reads a GGUF file (`gguf_file=`) through the gguf package, which it imports only then.
RUNTIME_NEEDS = {"gguf_file=": "gguf"}
ROOMS = ("examples", "scripts", "benchmarks")  # where entry points live; one may import another's modules


def _documented_scripts() -> set[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in USER_DOCS)
    return set(re.findall(rf"python ((?:{'|'.join(ROOMS)})/\w+\.py)", text))


def _needs(script: Path) -> set[str]:
    """Distributions (canonical names) that ``script`` needs beyond the standard library and the repository."""
    source = script.read_text(encoding="utf-8")
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    local = {p.stem for room in ROOMS for p in (REPO / room).glob("*.py")} | {*ROOMS, "tests", "__future__"}
    modules -= set(sys.stdlib_module_names) | local
    providers = metadata.packages_distributions()
    needs = {canonicalize_name(providers.get(m, [m])[0]) for m in modules if m != "edpo_plugin"}
    if "edpo_plugin" in modules:
        needs |= {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    return needs | {dist for marker, dist in RUNTIME_NEEDS.items() if marker in source}


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of ``requirements`` and, transitively, of what they require (markers for extras left out)."""
    seen: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = Requirement(pending.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            pending += metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pytest.skip(f"{name} is not installed here, so what it requires cannot be read")
    return seen


def test_the_docs_name_the_extras_and_the_scripts():
    assert set(USER_EXTRAS) == {"axolotl", "trl"}, USER_EXTRAS
    assert {"examples/prepare_smollm2.py", "examples/prepare_hh.py", "examples/make_tiny_default.py"} <= (
        _documented_scripts()
    )
    assert _needs(REPO / "examples" / "prepare_smollm2.py") >= {"torch", "transformers", "gguf"}


@pytest.mark.parametrize("extra", ["axolotl", "trl"])
def test_extra_holds_what_the_documented_scripts_need(extra):
    held = _closure(PROJECT["optional-dependencies"][extra] + PROJECT["dependencies"])
    missing = {script: sorted(_needs(REPO / script) - held) for script in sorted(_documented_scripts())}
    assert not any(missing.values()), f'pip install -e ".[{extra}]" lacks {missing}'
