"""The project's floors, checked on every import statement (function-local ones included).

    1. base      privlm.base, and the generated stubs privlm.v1 / privlm.internal
    2. services  gateway, services.inference, services.he, enclave: side by side, never importing
                 one another; they talk protobuf
    3. app       the rest of privlm (CLI, `up`, demos, scenarios, load generator, model preparation):
                 the only composition root

An import may point to its own floor's own package or down, never up and never sideways between
services; no two modules may import each other through any chain (no circle). bench/ may import
the project but not tests/. docs/architecture.md states the same rule.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("privlm", "gateway", "services", "enclave")
SERVICES = ("gateway", "services.inference", "services.he", "enclave")
GENERATED = ("privlm.v1", "privlm.internal")


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def unit(module: str) -> tuple[int, str]:
    """(floor, package) of a project module: floor 1 base, 2 a service, 3 the application."""
    if _under(module, "privlm.base") or any(_under(module, g) for g in GENERATED):
        return 1, "base"
    for s in SERVICES:
        if _under(module, s):
            return 2, s
    if _under(module, "services"):
        return 2, "services"                       # the namespace package itself
    return 3, "app"


def allowed(src: str, dst: str) -> bool:
    (fs, ps), (fd, pd) = unit(src), unit(dst)
    if fs == 3:
        return True
    if fs == 1:
        return fd == 1
    return fd == 1 or pd == ps


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[list[str]]:
    """What `path` imports (absolute or relative, at any depth of the file): per imported name,
    the candidates from the most specific (`pkg.mod` of `from pkg import mod`) to the least."""
    is_pkg = path.name == "__init__.py"
    out: list[list[str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            groups = [[a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            groups = [[f"{stem}.{a.name}", stem] for a in node.names]
        else:
            continue
        out.extend(g for g in groups if g[-1].split(".")[0] in PROJECT)
    return out


def project_graph(root: Path) -> dict[str, set[str]]:
    files = [p for top in PROJECT for p in (root / top).rglob("*.py")
             if "_pb2" not in p.name and ".venv" not in p.parts]
    modules = {module_name(p, root): p for p in files}
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        targets = set()
        for candidates in imports_of(path, mod):
            stub = next((g for g in GENERATED if any(_under(c, g) for c in candidates)), None)
            if stub is not None:                          # generated stubs are built, not in the tree
                targets.add(stub)
                continue
            name = next((c for c in candidates if c in modules), candidates[-1])
            while name and name not in modules:           # `pkg.Name` -> pkg
                name = name.rpartition(".")[0]
            if name and name != mod:
                targets.add(name)
        graph[mod] = targets
    return graph


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{s} -> {d}" for s, ds in graph.items() for d in ds if not allowed(s, d))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
                continue
            if w not in graph:
                continue
            if w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


@pytest.fixture(scope="module")
def graph():
    return project_graph(ROOT)


def test_every_import_points_down(graph):
    assert upward_arrows(graph) == []


def test_no_import_circle(graph):
    assert circles(graph) == []


def test_bench_does_not_import_tests():
    bad = [str(p.relative_to(ROOT)) for p in (ROOT / "bench").rglob("*.py")
           if any(n.split(".")[0] == "tests" for n in _all_imports(p))]
    assert bad == []


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_checker_fails_on_an_upward_import_and_a_circle(tmp_path):
    """The rule itself can fail: a base module importing a service, a service importing another
    service, and two modules importing each other are all reported."""
    files = {
        "privlm/__init__.py": "", "privlm/base/__init__.py": "",
        "privlm/base/config.py": "from gateway.server import x\n",
        "privlm/cli.py": "import gateway.server\nimport enclave.service\n",
        "gateway/__init__.py": "", "gateway/server.py": "from enclave import service\n",
        "enclave/__init__.py": "", "enclave/service.py": "from enclave.runtime import r\n",
        "enclave/runtime.py": "from . import service\n",
        "services/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = project_graph(tmp_path)
    assert upward_arrows(g) == ["gateway.server -> enclave.service", "privlm.base.config -> gateway.server"]
    assert circles(g) == [["enclave.runtime", "enclave.service"]]
