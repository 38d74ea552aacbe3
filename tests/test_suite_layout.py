"""The test suite's own floor plan: helpers shared by several test modules live in tests/factory.py (or in
the infrastructure modules tests/netns.py, tests/product.py, ...), never in a test module that others import.
Importing a test module also collects its tests and fixtures a second time, under another module's name."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every `tests...test_*` module that `source` imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tests" and any(part.startswith("test_") for part in parts[1:]):
                found.append((node.lineno, name))
                break
    return found


def test_no_test_module_imports_another_test_module() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{line} imports {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, module in imported_test_modules(path.read_text())
    ]
    assert offenders == [], "\n".join(offenders)


def test_the_check_sees_every_import_form() -> None:
    # The guard above is only worth something if it would see an offender.
    source = (
        "from tests.unit.test_decision import policy\n"
        "import tests.e2e.test_egress\n"
        "from tests.unit import test_peek\n"
        "from tests import factory, netns\n"
        "from tests.factory import policy\n"
    )
    assert imported_test_modules(source) == [
        (1, "tests.unit.test_decision"),
        (2, "tests.e2e.test_egress"),
        (3, "tests.unit.test_peek"),
    ]
