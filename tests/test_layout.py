"""The package's layout keeps its dependency direction: tools -> cli -> engine -> output -> storage/config, with the
models below the engine. Every import statement counts, the ones inside functions too (a lazy import is still a
dependency), and torch is imported under models/ only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ray_render"
README = PACKAGE.parent / "README.md"

# What each part of the package may import (besides itself). Anything else is a dependency against the direction.
ALLOWED = {
    "__main__": {"cli", "tools"},
    "tools": {"cli", "engine", "synthesis", "output", "models", "storage", "config"},
    "cli": {"engine", "synthesis", "output", "storage", "config"},
    "engine": {"output", "models", "storage", "config"},
    "synthesis": {"storage", "config"},
    "models": {"storage", "config"},
    "output": {"storage", "config"},
    "storage": set(),
    "config": set(),
    # The Python API: `ray_render.render` and the Ray Data adapter import the engine inside their functions.
    "__init__": {"engine", "config"},
    "data": {"engine", "output", "storage", "config"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module a file imports, at any depth of its code: `from pkg import module` names the module, `from
    module import name` the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}: relative import"  # the package uses absolute imports only
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
    return found


def part(name: str) -> str:
    """The top-level part of ray_render a module belongs to: engine, output, models, cli, ..."""
    pieces = name.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports. The package root (`ray_render/__init__.py`) is left out as a
    target: every import of a submodule runs it, so it must import nothing of the package at module level (its
    `render` imports the engine when called; test_the_package_root_imports_nothing_when_imported checks that)."""
    known = modules()
    return {name: {target for target in imports_of(path, name, set(known))
                   if target in known and target not in (name, "ray_render")}
            for name, path in known.items()}


def test_every_import_follows_the_dependency_direction():
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            if part(target) != part(source) and part(target) not in ALLOWED[part(source)]:
                wrong.append(f"{source} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles_lazy_imports_included():
    edges = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, cycles


def test_torch_and_transformers_are_imported_under_models_only():
    known = modules()
    outside = [f"{name} imports {target}" for name, path in known.items() if part(name) != "models"
               for target in imports_of(path, name, set(known))
               if target.split(".")[0] in ("torch", "transformers", "diffusers")]
    assert not outside, outside


def test_driver_status_export_and_report_load_no_model_library():
    code = ("import sys; import ray_render.engine.driver, ray_render.engine.refresh, ray_render.output.status, "
            "ray_render.output.export, ray_render.output.report, ray_render.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_top_level_holds_few_modules():
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_the_readme_layout_table_lists_every_module():
    text = README.read_text()
    section = text[text.index("## How the code is laid out"):]
    section = section[: section.index("\n## ", 1)]
    listed = set(re.findall(r"`(ray_render/[A-Za-z0-9_/]+\.py)`", section))
    actual = {str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
              if path.name != "__init__.py"}
    assert sorted(actual - listed) == [], "modules missing from the README's layout table"
    assert sorted(listed - actual) == [], "the README's layout table names modules that do not exist"


def test_the_package_root_imports_nothing_when_imported():
    code = "import sys, ray_render; print(sorted(m for m in sys.modules if m.startswith('ray_render.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
