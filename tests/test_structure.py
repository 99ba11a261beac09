"""The package's shape: no import cycles, one owner of the family names and of the run layout."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "saebench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of saebench/ except the app's pages (scripts that streamlit runs)."""
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts[:1]}


def type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The saebench modules a file imports, anywhere in it (function-local imports included,
    `if TYPE_CHECKING:` ones not); `from pkg import mod` counts as importing pkg.mod."""
    tree = ast.parse(path.read_text())
    skip = type_checking_lines(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_back_into_one_that_imports_it():
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    graph = {name: deps - {"saebench"} if name != "saebench" else deps for name, deps in graph.items()}
    assert "saebench.interop" not in graph["saebench.sae.sae"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    assert not any("saebench" in deps for name, deps in graph.items() if name != "saebench")


def test_only_the_family_table_names_the_families():
    family_names = ("abstopk", "batchtopk", "mutual_choice", "feature_choice", "gradient_topk", "hierarchical_topk")
    allowed = {"saebench/sae/families.py", "saebench/sae/sparsify.py", "saebench/interop.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE.parent))
        code = re.sub(r'""".*?"""', "", path.read_text(), flags=re.S)  # docstrings may name them
        code = "\n".join(line.split("#")[0] for line in code.splitlines())
        if rel not in allowed and any(f'"{name}"' in code for name in family_names):
            offenders.append(rel)
    assert offenders == []


def test_only_the_run_knows_the_run_layout():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel in ("saebench/runs.py", "saebench/train.py"):  # train.py writes the folders it is given
            continue
        code = path.read_text()
        if re.search(r'/ "(config\.yaml|eval\.json|features\.sqlite|sae)"', code):
            offenders.append(rel)
    assert offenders == []
