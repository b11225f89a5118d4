"""The import rules of ARCHITECTURE.md ("Layout") and STYLE.md, enforced on the source.

Every ``.py`` file of every package is parsed with :mod:`ast`; imports anywhere in a
file count (inside functions too, and ``importlib.import_module("...")`` with a literal
name). The rules, all read from one table, the layout table of ARCHITECTURE.md
(:data:`LAYOUT`):

* data flows one way: a package imports only the packages above it in the layout table
  (``device_sim`` only the device library, and the device protocol, the MQTT client and
  the error tree of ``wire``);
* what a package's import really loads, in a fresh interpreter, stays inside the same
  arrows, and only the packages marked for it load numba, scikit-learn or scipy;
* no package imports a ``_private`` name (or module) of another package;
* ``__init__.py`` holds a docstring, imports and ``__all__``, nothing else;
* no ``suppress(CancelledError)``: it swallows the caller's own cancellation too
  (``wire.tasks.cancel_and_wait`` stops a task without that).

Each checker is also run on a small synthetic source that breaks its rule, so a checker
that stopped finding anything would fail here instead of passing silently.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Layer:
    """One row of the layout table.

    ``may_import``: the other packages (or modules of them) it may import; ``None``:
    anything (the composition root). ``numeric``: whether importing it may load the
    numeric stack (numba, scikit-learn, scipy: about a second and 100 MB).
    """

    may_import: frozenset[str] | None
    numeric: bool = False


ARCHITECTURE = ROOT / "ARCHITECTURE.md"


def read_layout(text: str) -> dict[str, Layer]:
    """The layout table of ARCHITECTURE.md: package -> what it may import and load.

    Rows look like ``| `pkg` | job | `a`, `b.c` | no |``; ``—`` imports nothing,
    ``everything`` anything.
    """
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    layout: dict[str, Layer] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        package, _job, imports, numeric = cells
        may_import = (
            None if imports == "everything" else frozenset(re.findall(r"`([\w.]+)`", imports))
        )
        layout[package.strip("`")] = Layer(may_import, numeric=numeric == "yes")
    return layout


#: The layout table, top (imports nothing) to bottom (imports everything).
LAYOUT: dict[str, Layer] = read_layout(ARCHITECTURE.read_text(encoding="utf-8"))
PACKAGES = frozenset(LAYOUT)
_LIGHT = sorted(p for p, layer in LAYOUT.items() if not layer.numeric)
#: Top-level modules of the numeric stack (and numpy's compiled helpers do not count).
NUMERIC = frozenset({"numba", "sklearn", "scipy"})


def allowed(package: str, module: str) -> bool:
    """Whether ``package`` may import (or load) first-party ``module`` by the table."""
    top = module.split(".", 1)[0]
    rule = LAYOUT[package].may_import
    if top == package or rule is None:
        return True
    return any(module == ok or module.startswith(ok + ".") for ok in rule)


@dataclass(frozen=True, slots=True)
class Source:
    """One module to check: its dotted name, whether it is a package, its text."""

    module: str
    is_package: bool
    text: str
    path: str

    @property
    def package(self) -> str:
        return self.module.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Import:
    """One imported module (resolved, absolute) and the names taken from it."""

    target: str
    names: tuple[str, ...]
    line: int


# -- collecting sources ------------------------------------------------------------------


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def repo_sources() -> list[Source]:
    """Every module of every package in the layout table."""
    sources = []
    for package in sorted(PACKAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            module, is_package = _module_name(path)
            text = path.read_text(encoding="utf-8")
            sources.append(Source(module, is_package, text, str(path.relative_to(ROOT))))
    return sources


@functools.cache
def _module_exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


@functools.cache
def _reexports(package: str) -> dict[str, str]:
    """Name -> the absolute module a package's ``__init__.py`` imports it from."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    if not init.is_file():
        return {}
    found: dict[str, str] = {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            base = _absolute(package, True, node.level, node.module)
            for alias in node.names:
                found[alias.asname or alias.name] = base
    return found


# -- resolving imports -------------------------------------------------------------------


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Resolve ``from <level dots><name> import ...`` inside ``module`` to an absolute name."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*parts, name] if name else parts)


def _resolve_from(base: str, name: str, seen: frozenset[str] = frozenset()) -> str:
    """The module ``from base import name`` really reaches.

    A submodule (``from wire import errors``) is that module; a name a package's
    ``__init__.py`` re-exports is followed to where it comes from; anything else is
    ``base`` itself.
    """
    if base.split(".", 1)[0] not in PACKAGES or base in seen:
        return base
    if _module_exists(f"{base}.{name}"):
        return f"{base}.{name}"
    origin = _reexports(base).get(name)
    if origin is not None and origin != base:
        return _resolve_from(origin, name, seen | {base})
    return base


@functools.cache
def _tree(source: Source) -> ast.Module:
    return ast.parse(source.text, filename=source.path)


def imports_of(source: Source) -> Iterator[Import]:
    """Every import of a module, at any depth of its syntax tree."""
    for node in ast.walk(_tree(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(source.module, source.is_package, node.level, node.module)
            for alias in node.names:
                if alias.name == "*":
                    yield Import(base, ("*",), node.lineno)
                else:
                    yield Import(_resolve_from(base, alias.name), (alias.name,), node.lineno)
        elif (
            isinstance(node, ast.Call)
            and _dotted(node.func) in {"importlib.import_module", "import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield Import(node.args[0].value, (), node.lineno)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# -- the checkers ------------------------------------------------------------------------


def layer_violations(source: Source) -> list[str]:
    """Imports of packages (or modules) the layout table does not allow."""
    found = []
    for imp in imports_of(source):
        if imp.target.split(".", 1)[0] not in PACKAGES:
            continue
        if not allowed(source.package, imp.target):
            found.append(f"{source.path}:{imp.line}: {source.package} imports {imp.target}")
    return found


def private_violations(source: Source) -> list[str]:
    """Imports of another package's ``_private`` names or modules, and attribute use."""
    found = []
    bound: set[str] = set()  # local names of modules of another package
    for imp in imports_of(source):
        top = imp.target.split(".", 1)[0]
        if top not in PACKAGES or top == source.package:
            continue
        hidden = [p for p in imp.target.split(".") if _is_private(p)]
        hidden += [n for n in imp.names if _is_private(n)]
        if hidden:
            found.append(f"{source.path}:{imp.line}: uses {imp.target} {', '.join(hidden)}")
    tree = _tree(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".", 1)[0] in PACKAGES - {source.package}:
                    bound.add(alias.asname or alias.name.split(".", 1)[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                target = _resolve_from(node.module, alias.name)
                if target.split(".", 1)[0] in PACKAGES - {source.package} and target.endswith(
                    "." + alias.name
                ):
                    bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = _dotted(node.value).split(".", 1)[0]
            if root in bound:
                found.append(f"{source.path}:{node.lineno}: uses {_dotted(node)}")
    return found


def init_violations(source: Source) -> list[str]:
    """Statements in an ``__init__.py`` other than a docstring, imports and ``__all__``."""
    if not source.is_package:
        return []
    found = []
    body = ast.parse(source.text, filename=source.path).body
    for index, node in enumerate(body):
        if index == 0 and isinstance(node, ast.Expr) and _is_text(node.value):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if _is_all_assignment(node):
            continue
        found.append(f"{source.path}:{node.lineno}: {type(node).__name__} in __init__.py")
    return found


def cancellation_violations(source: Source) -> list[str]:
    """``suppress(...)`` calls that swallow ``CancelledError`` (STYLE.md: never swallow it)."""
    found = []
    for node in ast.walk(_tree(source)):
        if (
            isinstance(node, ast.Call)
            and _dotted(node.func).endswith("suppress")
            and any(_dotted(arg).endswith("CancelledError") for arg in node.args)
        ):
            found.append(f"{source.path}:{node.lineno}: suppresses CancelledError")
    return found


def _is_text(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _is_all_assignment(node: ast.stmt) -> bool:
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets, value = [node.target], node.value
    else:
        return False
    if len(targets) != 1 or not isinstance(targets[0], ast.Name) or targets[0].id != "__all__":
        return False
    return isinstance(value, ast.List | ast.Tuple) and all(_is_text(item) for item in value.elts)


SOURCES = repo_sources()


def _ids(sources: list[Source]) -> list[str]:
    return [s.path for s in sources]


# -- the rules on the real code -----------------------------------------------------------


def test_every_package_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == PACKAGES, "a new top-level package needs a row in LAYOUT"


def test_the_layout_table_reads_as_written() -> None:
    assert LAYOUT["wire"] == Layer(frozenset())
    assert LAYOUT["device_sim"].may_import == {
        "device",
        "wire.protocol",
        "wire.errors",
        "wire.mqtt",
        "wire.mqtt_packets",
    }
    assert LAYOUT["dashboard"] == Layer(frozenset({"notifier", "diagnostics", "wire"}))
    assert LAYOUT["fixloop"] == Layer(None, numeric=True)
    assert [p for p, layer in LAYOUT.items() if layer.numeric] == ["diagnostics", "fixloop"]
    # top to bottom: a package only imports packages in rows above it
    order = list(LAYOUT)
    for index, (package, layer) in enumerate(LAYOUT.items()):
        for target in layer.may_import or ():
            assert order.index(target.split(".", 1)[0]) < index, (package, target)


def test_every_module_architecture_md_names_exists() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    found = set(re.findall(r"`((?:[a-z_]+/)+[a-z_*]*(?:\.py)?)`", text))
    # paths in the repository's own folders; `fleet/diagnoses` and the like are topics
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    named = {path for path in found if path.split("/", 1)[0] in folders}
    assert "wire/protocol/codec.py" in named
    missing = [path for path in sorted(named) if not list(ROOT.glob(path))]
    assert missing == []


def test_the_checkers_see_the_code() -> None:
    assert {s.package for s in SOURCES} == PACKAGES
    assert any(s.module == "wire.protocol.codec" for s in SOURCES)
    device = next(s for s in SOURCES if s.module == "device_sim.runner")
    assert any(i.target == "wire.mqtt" for i in imports_of(device))


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_imports_follow_the_layout(source: Source) -> None:
    assert layer_violations(source) == []


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_no_private_names_of_other_packages(source: Source) -> None:
    assert private_violations(source) == []


@pytest.mark.parametrize(
    "source", [s for s in SOURCES if s.is_package], ids=_ids([s for s in SOURCES if s.is_package])
)
def test_init_files_hold_no_logic(source: Source) -> None:
    assert init_violations(source) == []


@functools.cache
def _importers() -> dict[str, subprocess.Popen[str]]:
    """One fresh interpreter per package without the numeric stack, all started at once."""
    started = {}
    for package in _LIGHT:
        modules = sorted(s.module for s in SOURCES if s.package == package)
        code = (
            "import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print('\\n'.join(sorted(sys.modules)))"
        )
        started[package] = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return started


def loaded_by(package: str) -> list[str]:
    """Every module a fresh interpreter holds after importing each module of ``package``."""
    process = _importers()[package]
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return out.split()


def load_violations(package: str, loaded: list[str]) -> list[str]:
    """Loaded modules the table does not allow ``package`` to reach."""
    rule = LAYOUT[package].may_import
    roots = {ok.split(".", 1)[0] for ok in rule or ()}
    found = []
    for module in loaded:
        top = module.split(".", 1)[0]
        numeric = top in NUMERIC and not LAYOUT[package].numeric
        # a package root runs before any module of it: allowed when one of them is
        upstream = top in PACKAGES and not allowed(package, module) and module not in roots
        if numeric or upstream:
            found.append(f"{package} loads {module}")
    return found


@pytest.mark.parametrize("package", _LIGHT)
def test_import_loads_only_what_the_table_allows(package: str) -> None:
    """What importing every module of a package really loads (``__init__`` re-exports too).

    ``import wire.protocol`` runs ``wire/__init__.py`` first, so a re-export there would
    reach the simulator even though its own imports follow the rules; and one constant
    imported from ``diagnostics.service`` once made the dashboard load numba, scikit-learn
    and scipy (1.07 s of its 1.43 s import).
    """
    loaded = loaded_by(package)
    assert {s.module for s in SOURCES if s.package == package} <= set(loaded)
    assert load_violations(package, loaded) == []


def test_load_checker_finds_what_breaks_the_table() -> None:
    assert load_violations("dashboard", ["dashboard.app", "numba.core", "sklearn"]) != []
    assert load_violations("device_sim", ["wire", "wire.protocol", "wire.influx"]) != []
    assert load_violations("notifier", ["notifier.api", "gateway.service"]) != []
    assert load_violations("device_sim", ["wire", "wire.protocol.codec", "wire.mqtt"]) == []
    assert load_violations("diagnostics", ["diagnostics.engine", "numba", "scipy"]) == []


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_no_cancellation_is_swallowed(source: Source) -> None:
    assert cancellation_violations(source) == []


# -- the checkers on sources that break the rules -----------------------------------------


def _fake(module: str, text: str, *, is_package: bool = False) -> Source:
    return Source(module, is_package, text, f"<{module}>")


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("gateway.service", "import device_sim\n"),
        ("gateway.service", "from fixloop.settings import Settings\n"),
        ("wire.influx", "def f():\n    from diagnostics import x\n"),
        ("device_sim.runner", "from gateway.service import Gateway\n"),
        ("device.client", "from wire.protocol import codec\n"),
        ("device.contract", "import device_sim\n"),
        ("device_sim.runner", "from gateway import service\n"),
        ("device_sim.runner", "import wire.influx\n"),
        ("device_sim.runner", "import importlib\nimportlib.import_module('gateway.spool')\n"),
        ("device_sim.device", "from ..gateway.metrics import GatewayMetrics\n"),
        ("diagnostics.detectors", "from notifier.cases import Case\n"),
        ("diagnostics.detectors", "from device_sim import Fleet\n"),
        ("notifier.cases", "from dashboard.keys import KEY\n"),
        ("dashboard.app", "from fixloop.cli import main\n"),
        ("notifier.cases", "import gateway.service\n"),
        ("dashboard.influxql", "from gateway.spool import Spool\n"),
        ("wire.influx", "from gateway.settings import GatewaySettings\n"),
    ],
)
def test_layer_checker_finds_upstream_breaks(module: str, text: str) -> None:
    assert layer_violations(_fake(module, text)) != []


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("device_sim.runner", "from wire.mqtt import MqttClient\n"),
        ("device_sim.runner", "from wire.errors import ConfigError\n"),
        ("device_sim.runner", "from wire import errors\n"),
        ("device_sim.runner", "from wire.protocol import Limits\n"),
        ("gateway.service", "from .spool import Spool\n"),
        ("notifier.cases", "from diagnostics import x\nimport wire.influx\n"),
        ("gateway.service", "from wire.influx import InfluxClient\n"),
        ("fixloop.local", "from gateway.service import Gateway\nfrom device_sim import Fleet\n"),
    ],
)
def test_layer_checker_lets_allowed_imports_pass(module: str, text: str) -> None:
    assert layer_violations(_fake(module, text)) == []


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("fixloop.local", "from gateway.service import _Batch\n"),
        ("fixloop.local", "def f():\n    from wire.protocol.codec import _KNOWN_NAMES\n"),
        ("fixloop.local", "import gateway.service\nx = gateway.service._LOG\n"),
        ("fixloop.local", "from wire.protocol import codec\ncodec._METRIC_RE\n"),
        ("fixloop.local", "from gateway._hidden import thing\n"),
    ],
)
def test_private_checker_finds_private_use(module: str, text: str) -> None:
    assert private_violations(_fake(module, text)) != []


@pytest.mark.parametrize(
    ("module", "text"),
    [
        ("wire.mqtt", "from wire.protocol.codec import _KNOWN_NAMES\n"),
        ("fixloop.local", "from gateway.service import Gateway\nGateway.__name__\n"),
        ("fixloop.local", "import os\nos._exit\n"),
    ],
)
def test_private_checker_lets_public_and_own_names_pass(module: str, text: str) -> None:
    assert private_violations(_fake(module, text)) == []


@pytest.mark.parametrize(
    "text",
    [
        '"""Doc."""\nimport logging\nlogging.basicConfig()\n',
        '"""Doc."""\n__all__ = ["x"]\ndef x():\n    pass\n',
        '"""Doc."""\nVERSION = "1"\n__all__ = []\n',
        '"""Doc."""\ntry:\n    import orjson\nexcept ImportError:\n    orjson = None\n',
        '"""Doc."""\n__all__ = [name for name in ("a", "b")]\n',
    ],
)
def test_init_checker_finds_logic(text: str) -> None:
    assert init_violations(_fake("gateway", text, is_package=True)) != []


def test_init_checker_lets_reexports_pass() -> None:
    text = (
        '"""Doc."""\n\nfrom wire.errors import ConfigError\n'
        'from . import protocol\n\n__all__: list[str] = ["ConfigError", "protocol"]\n'
    )
    assert init_violations(_fake("gateway", text, is_package=True)) == []


#: Modules that take no ``_private`` name from a sibling module either: what they share
#: with it is public in a module of its own (``notifier.edge`` for the owner API's routes,
#: and, inside ``notifier.api`` and ``notifier.admin``, their public helper modules).
_NO_SIBLING_PRIVATES = tuple(
    str(path.relative_to(ROOT))
    for package in ("api", "admin")
    for path in sorted((ROOT / "notifier" / package).glob("*.py"))
)


@pytest.mark.parametrize("path", _NO_SIBLING_PRIVATES)
def test_route_modules_share_only_public_helpers(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    taken = [
        f"{path}:{node.lineno}: {node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.split(".")[0] in PACKAGES
        for alias in node.names
        if _is_private(alias.name) or any(_is_private(p) for p in node.module.split("."))
    ]
    assert taken == []


@pytest.mark.parametrize(
    "text",
    [
        "import asyncio, contextlib\nwith contextlib.suppress(asyncio.CancelledError):\n    pass\n",
        "from contextlib import suppress\nfrom asyncio import CancelledError\n"
        "with suppress(KeyError, CancelledError):\n    pass\n",
    ],
)
def test_cancellation_checker_finds_suppress(text: str) -> None:
    assert cancellation_violations(_fake("dashboard.fleet", text)) != []


def test_cancellation_checker_lets_other_suppress_pass() -> None:
    text = "import contextlib\nwith contextlib.suppress(KeyError):\n    pass\n"
    assert cancellation_violations(_fake("dashboard.fleet", text)) == []
