"""The package layout: data flows one way (config → data/model → training → evaluation → reporting), so no module
imports a package that sits above its own, and there are no import cycles between modules."""

import ast
from pathlib import Path

import diffsteps

ROOT = Path(diffsteps.__file__).parent
# lowest first; a module may import its own package and any package before it
LAYERS = ["core", "reference", "sampling", "nets", "data", "training", "evaluation", "restoration", "steps", "reporting", "runner"]
# same rank: neither may import the other
PEERS = {"nets": 3, "data": 3}


def rank(package: str) -> int:
    return PEERS.get(package, LAYERS.index(package))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every diffsteps module that ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("diffsteps"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` names a module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("diffsteps"))
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {m for m in found if m in modules}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    loose = [module_name(p) for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert loose == [], f"modules outside the packages: {loose}"
    assert packages == set(LAYERS), f"packages not in LAYERS: {packages ^ set(LAYERS)}"


def test_no_module_imports_a_package_above_its_own():
    bad = []
    for path in ROOT.rglob("*.py"):
        own = package_of(module_name(path))
        if own is None:
            continue  # diffsteps/__init__.py: the public API re-exports from everywhere
        for target in imports(path):
            other = package_of(target)
            if other is not None and other != own and rank(other) >= rank(own):
                bad.append(f"{module_name(path)} imports {target} ({other} is not below {own})")
    assert bad == [], "\n".join(bad)


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in ROOT.rglob("*.py")}
    # a package's __init__ is imported by each of its modules implicitly; it may re-export them, which is no cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if n == m or (n in graph and m.startswith(n + ".")):
                continue
            if state.get(n) == 1:
                cycles.append(" → ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert cycles == [], "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    # the layer check itself: a core module importing the runner must be reported
    fake = tmp_path / "diffsteps" / "core"
    fake.mkdir(parents=True)
    (tmp_path / "diffsteps" / "runner").mkdir()
    (tmp_path / "diffsteps" / "runner" / "run.py").write_text("")
    (fake / "bad.py").write_text("from ..runner.run import run\nimport diffsteps.runner.run\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "diffsteps")
    assert imports(fake / "bad.py") == {"diffsteps.runner.run"}
    assert package_of("diffsteps.runner.run") == "runner" and rank("runner") > rank("core")
