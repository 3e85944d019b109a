"""The pure core imports no I/O, clock, randomness, logging or drivers."""

import ast
import pathlib

import ssmd.core

FORBIDDEN = {"asyncio", "logging", "time", "random", "socket", "psycopg", "nats", "redis", "os", "subprocess", "threading", "datetime", "secrets", "uuid"}
CORE_DIR = pathlib.Path(ssmd.core.__file__).parent


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_imports_no_io():
    offenders = {}
    for path in sorted(CORE_DIR.rglob("*.py")):
        bad = {name for name in imported_modules(path) if name.split(".")[0] in FORBIDDEN}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_core_imports_only_core_from_ssmd():
    for path in sorted(CORE_DIR.rglob("*.py")):
        ssmd_imports = {name for name in imported_modules(path) if name.split(".")[0] == "ssmd"}
        assert all(name.startswith("ssmd.core") for name in ssmd_imports), (path.name, ssmd_imports)
