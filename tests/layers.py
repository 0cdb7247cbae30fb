"""The import rule of the project's layers, as data, and the reader that checks it (tests/test_layers.py runs it;
`python tests/layers.py` prints the structure figures: long modules, circles, upward and function-local imports).

The floors, lowest first: `interp.core` < the measures (`interp.*` modules outside the named sub-packages) <
`interp.causal` < `interp.views` < `interp.cli`. A module may import its own floor and the floors below. `training`
may import `interp.core` and the measures only (its command line, `training.__main__`, the views too); `apps`, `notebooks` and `bench` may import anything. An import of
the project inside a function says why on its line (a comment), in the packages LOCAL_RULE names.
"""

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("interp", "training", "apps", "bench")  # the folders read; tests may import anything
FLOORS = ("interp.core", "interp.measures", "interp.causal", "interp.views", "interp.cli")
# Who may import what, beyond the interp floors' own order.
OUTSIDE = {
    "training": {"interp.core", "interp.measures", "training"},
    "training.cli": {"interp.core", "interp.measures", "interp.views", "training"},  # the command line writes figures
    "apps": None,   # None: anything
    "bench": None,
}
LONG_MODULE = 450  # lines
# Packages whose function-local project imports must say why on their line.
LOCAL_RULE = ("interp", "training", "apps", "bench")
# Upward imports the rule allows, each with its reason.
EXCEPTIONS = {
    ("interp.tuned_lens", "training.tasks"): "optional: the tuned lens also trains on the task suites' prompts where "
                                             "the training package is installed (ImportError: the generic prompts alone)",
}


@dataclass(frozen=True)
class Import:
    source: str      # importing module, dotted
    target: str      # imported project module, dotted
    line: int
    local: bool      # inside a function
    reason: str      # the comment on that line (why it is local), '' if none


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(source: str, is_package: bool, level: int, module: str | None) -> str:
    if not level:
        return module or ""
    base = source.split(".") if is_package else source.split(".")[:-1]
    base = base[:len(base) - level + 1]
    return ".".join(base + ([module] if module else []))


def _project(name: str, modules: set[str]) -> str | None:
    """The longest project module that `name` names (a from-import of a package names its submodule, or the package)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(source: str, text: str, modules: set[str], is_package: bool = False) -> list[Import]:
    """The project imports of one module's source text."""
    tree = ast.parse(text)
    lines = text.splitlines()
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(source, is_package, child.level, child.module)
                names = [f"{base}.{alias.name}" for alias in child.names]
            else:
                visit(child, inner)
                continue
            line = lines[child.lineno - 1]
            reason = line.split("#", 1)[1].strip() if "#" in line else ""
            for name in names:
                target = _project(name, modules)
                if target and target != source:
                    found.append(Import(source, target, child.lineno, local, reason))

    visit(tree, False)
    return found


def floor(module: str) -> str:
    """`interp.core`, `interp.measures`, `interp.causal`, `interp.views`, `interp.cli`, or the top-level package."""
    parts = module.split(".")
    if module == "training.__main__":
        return "training.cli"  # the training command line, on top: it may write the views' figures
    if parts[0] != "interp":
        return parts[0]
    if len(parts) > 1 and f"interp.{parts[1]}" in FLOORS:
        return f"interp.{parts[1]}"
    if module == "interp" or parts[1] == "__main__":
        return "interp.cli"  # the package's front door reaches every floor, lazily
    return "interp.measures"


def points_up(imp: Import) -> bool:
    if (imp.source, imp.target) in EXCEPTIONS:
        return False
    src, dst = floor(imp.source), floor(imp.target)
    if src in FLOORS:
        return dst not in FLOORS or FLOORS.index(dst) > FLOORS.index(src)
    allowed = OUTSIDE.get(src)
    return allowed is not None and dst not in allowed and not dst == src


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def read_tree(root: Path = ROOT) -> tuple[list[Import], dict[str, int]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    modules = set(files)
    found, sizes = [], {}
    for name, path in files.items():
        text = path.read_text()
        sizes[name] = len(text.splitlines())
        found += imports_of(name, text, modules, path.name == "__init__.py")
    return found, sizes


def import_graph(found: list[Import]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at the top, inside functions or for type checking alike)."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.source, set()).add(imp.target)
    return graph


def figures(root: Path = ROOT) -> dict[str, object]:
    found, sizes = read_tree(root)
    graph = import_graph(found)
    local = sorted({(i.source, i.line): i for i in found if i.local}.values(), key=lambda i: (i.source, i.line))
    return {
        "long modules": sorted(f"{m} ({n})" for m, n in sizes.items() if n > LONG_MODULE),
        "circles": circles(graph),
        "upward imports": sorted({f"{i.source}:{i.line} -> {i.target}" for i in found if points_up(i)}),
        "function-local project imports (statements)": len(local),
        "function-local without a reason": [f"{i.source}:{i.line} -> {i.target}" for i in local if not i.reason],
        "function-local by package": {p: sum(i.source.split(".")[0] == p for i in local) for p in PACKAGES},
    }


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for key, value in figures(root).items():
        if isinstance(value, list):
            print(f"{key}: {len(value)}")
            for item in value:
                print("   ", item)
        else:
            print(f"{key}: {value}")
