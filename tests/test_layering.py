"""The package's shape: imports only go down the layers, no circles, a core free of TRL/datasets/web code, and a
cheap `import pairrm_rlhf`."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "pairrm_rlhf"
# Lower number = lower layer. A module may import its own room and lower layers only.
LAYERS = {
    "core": 0,
    "backends": 1, "data": 1,
    "best_of_n": 2, "pairrm": 2, "args": 2,
    "trl": 3,
    "labeling": 4,
    "serve": 5, "evaluation": 5,
    "bench": 6,
    "cli": 7,
}
CORE_FORBIDDEN = {"trl", "datasets", "pyarrow", "starlette", "uvicorn", "httpx2", "accelerate", "peft", "matplotlib"}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    """Every module of the package -> the absolute names it imports (at any depth of the file)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rsplit(".", 1)[0]
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    names.add(target)
                    names |= {f"{target}.{a.name}" for a in node.names}
                else:
                    names.add(node.module)
        graph[module] = names
    return graph


def test_imports_only_go_down():
    upward = []
    for module, names in imports().items():
        if module == "pairrm_rlhf":
            continue  # the package root only holds lazy exports
        for name in names:
            if not name.startswith("pairrm_rlhf.") or name.split(".")[1] not in LAYERS:
                continue
            src, dst = room(module), room(name)
            if src != dst and LAYERS[dst] > LAYERS[src]:
                upward.append(f"{module} -> {name}")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    graph = imports()
    modules = set(graph)
    edges = {m: {n for n in names if n in modules and n != m} for m, names in graph.items() if m != "pairrm_rlhf"}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if nxt.count(".") == 1 and nxt in ("pairrm_rlhf.core", "pairrm_rlhf.trl", "pairrm_rlhf.backends"):
                continue  # a package's __init__ imported for a submodule is not an edge back
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(edges):
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_core_imports_no_trl_datasets_or_web_stack():
    bad = [f"{m} imports {n}" for m, names in imports().items() if room(m) == "core"
           for n in names if n.split(".")[0] in CORE_FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_import_is_cheap_and_the_scorer_needs_no_trl():
    code = (
        "import sys, pairrm_rlhf\n"
        "assert 'torch' not in sys.modules, 'import pairrm_rlhf loaded torch'\n"
        "from pairrm_rlhf import PairRM\n"
        "heavy = sorted(m for m in ('trl', 'datasets', 'pyarrow', 'starlette', 'uvicorn') if m in sys.modules)\n"
        "assert not heavy, f'PairRM pulled in {heavy}'\n"
        "import logging\n"  # the library only adds a NullHandler; where logs go is the application's choice
        "handlers = logging.getLogger('pairrm_rlhf').handlers\n"
        "assert [type(h) for h in handlers] == [logging.NullHandler], handlers\n"
        "assert not logging.getLogger().handlers, logging.getLogger().handlers\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_imports_its_subcommands_lazily():
    """`cli.py` names the subcommand modules but imports none of them at module level (only `demo`'s own code)."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            top.add(node.module or "")
        elif isinstance(node, ast.Import):
            top |= {a.name for a in node.names}
    lazy = ("bench", "evaluation", "labeling", "serve", "trl", "datasets")
    assert not {m for m in top if m.split(".")[0] in lazy}, top

