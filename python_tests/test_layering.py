"""The package's layering, checked on the source tree (no kernel runs here).

- Imports point one way: nothing under `omoe_kernels/ops/` imports the registry
  (`omoe_kernels.backends`), the package root or the layers above them, and the import
  graph of `omoe_kernels` modules, function-level imports included, has no cycle.
- The expert bounds are written once for Python (`omoe_kernels.ops.limits`) and once for
  C++ (csrc/omoe_token.h `kMaxExperts`, csrc/omoe_cpu_pass.h `kMaxActive`), and agree.
- Modules stay small enough to read: no module over 600 lines, `OMoELinear` under 100.
- No tracked file names a path of the machine it was written on.
- The tools keep their command lines; the tests and benchmarks keep to shared helpers
  and public modules (no `from conftest import`, no private `omoe_kernels._*`).

The import graph: one node per module (`pkg/__init__.py` is `pkg`), one edge per import
statement, resolved to the module it names. `from . import x` in `pkg/sub.py` is an edge
to `pkg.x` when `x` is a submodule, and to `pkg` only when `x` is a name `pkg/__init__.py`
binds; `import pkg.sub` is an edge to `pkg.sub` alone. Importing a submodule runs its
package's `__init__` first, but that is no dependency on the package's names, so it is
no edge: a package whose `__init__` imports its submodules is no cycle by itself.
Imports under `if TYPE_CHECKING:` never run and are left out.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "omoe_kernels"

MAX_MODULE_LINES = 600
MAX_OMOE_LINEAR_LINES = 100


# ---- the import graph -------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    source: str   # the importing module
    target: str   # the module imported
    path: Path    # the importing file
    line: int

    def __str__(self) -> str:
        return f"{self.path.as_posix()}:{self.line}: {self.source} imports {self.target}"


def package_modules(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every Python module of `package` under `root`, by dotted name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _top_level_names(path: Path) -> set[str]:
    """The names a module binds at its top level (what `from pkg import name` can find)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _resolve_from(source: str, path: Path, node: ast.ImportFrom) -> str:
    """The module `from <node.module> import ...` names, with relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    base = source.split(".") if _is_package(path) else source.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of one `package` module by another, anywhere in the file."""
    modules = package_modules(root, package)
    bound = {name: _top_level_names(path) for name, path in modules.items() if _is_package(path)}
    edges = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_nodes(tree):
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    prefixes = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
                    targets += [next((p for p in prefixes if p in modules), alias.name)]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve_from(source, path, node)
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)          # a submodule (a .py file)
                    elif module in bound and alias.name != "*" and alias.name not in bound[module]:
                        targets.append(sub)          # a submodule without a .py file (_C)
                    else:
                        targets.append(module)       # a name the module defines
            edges += [Import(source, t, path.relative_to(root), node.lineno)
                      for t in targets if t in modules and t != source]
    return sorted(set(edges), key=lambda e: (e.source, e.line, e.target))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as [a, b, ..., a], or None (depth-first, sorted order)."""
    state: dict[str, int] = {}   # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _graph(edges: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    return graph


def describe_cycle(cycle: list[str], edges: list[Import]) -> str:
    where = {(e.source, e.target): e for e in edges}
    return "\n".join(str(where[a, b]) for a, b in zip(cycle, cycle[1:]))


# What the backend implementations must not import: the registry, the package root and
# everything built on them. ops/ may import its own modules and the shared argument
# checks (omoe_kernels._validate).
ABOVE_OPS = ("backends", "functional", "layer", "adapters", "tools", "testing")


def ops_layering_violations(edges: list[Import], package: str = PACKAGE) -> list[Import]:
    above = {package} | {f"{package}.{m}" for m in ABOVE_OPS}
    return [e for e in edges
            if e.source.startswith(f"{package}.ops.") or e.source == f"{package}.ops"
            if e.target in above or any(e.target.startswith(a + ".") for a in above - {package})]


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# The layout before ops/limits.py: the compiled backend read its bound from the registry,
# while the registry loaded the compiled backend inside a function.
OLD_LAYOUT = {
    "omoe_kernels/__init__.py": "from .backends import available_backends\n"
                                "from .functional import omoe_lora\n",
    "omoe_kernels/functional.py": "from .backends import backend_function\n",
    "omoe_kernels/backends.py": "REGISTRY = {}\n"
                                "def _load_compiled():\n"
                                "    from .ops.compiled import omoe_lora_compiled\n"
                                "    return omoe_lora_compiled\n",
    "omoe_kernels/ops/__init__.py": "",
    "omoe_kernels/ops/compiled.py": "import torch\n"
                                    "from ..backends import REGISTRY\n"
                                    "from . import _C\n",
}


def test_the_cycle_finder_catches_the_old_backends_ops_cycle(tmp_path):
    edges = import_edges(_write_tree(tmp_path, OLD_LAYOUT))
    cycle = find_cycle(_graph(edges))
    assert cycle == ["omoe_kernels.backends", "omoe_kernels.ops.compiled", "omoe_kernels.backends"]
    text = describe_cycle(cycle, edges)
    assert "omoe_kernels/backends.py:3: omoe_kernels.backends imports omoe_kernels.ops.compiled" in text
    assert "omoe_kernels/ops/compiled.py:2: omoe_kernels.ops.compiled imports omoe_kernels.backends" in text
    assert [str(e) for e in ops_layering_violations(edges)] == [
        "omoe_kernels/ops/compiled.py:2: omoe_kernels.ops.compiled imports omoe_kernels.backends"]


def test_the_cycle_finder_passes_the_layout_with_the_bounds_in_ops_limits(tmp_path):
    files = dict(OLD_LAYOUT)
    files["omoe_kernels/ops/limits.py"] = "MAX_ACTIVE_EXPERTS = {}\n"
    files["omoe_kernels/ops/compiled.py"] = "from .limits import MAX_ACTIVE_EXPERTS\nfrom . import _C\n"
    files["omoe_kernels/backends.py"] = "from .ops.limits import MAX_ACTIVE_EXPERTS\n" + OLD_LAYOUT[
        "omoe_kernels/backends.py"]
    edges = import_edges(_write_tree(tmp_path, files))
    assert find_cycle(_graph(edges)) is None
    assert ops_layering_violations(edges) == []


@pytest.mark.parametrize("path, source, target", [
    ("ops/compiled.py", "import omoe_kernels\n", "omoe_kernels"),
    ("ops/compiled.py", "import omoe_kernels.backends as b\n", "omoe_kernels.backends"),
    ("ops/compiled.py", "from .. import omoe_lora\n", "omoe_kernels"),
    ("ops/compiled.py", "from .. import backends\n", "omoe_kernels.backends"),
    ("ops/compiled.py", "def f():\n    from ..backends import REGISTRY\n", "omoe_kernels.backends"),
    ("ops/triton/launch.py", "from ... import omoe_lora\n", "omoe_kernels"),
    ("ops/triton/launch.py", "from ...functional import omoe_lora\n", "omoe_kernels.functional"),
    ("ops/__init__.py", "from omoe_kernels import omoe_lora\n", "omoe_kernels"),
])
def test_every_form_of_importing_the_root_or_registry_from_ops_is_caught(tmp_path, path, source, target):
    files = {"omoe_kernels/__init__.py": "from .functional import omoe_lora\n",
             "omoe_kernels/functional.py": "", "omoe_kernels/backends.py": "REGISTRY = {}\n",
             "omoe_kernels/ops/__init__.py": "", "omoe_kernels/ops/compiled.py": "",
             "omoe_kernels/ops/triton/__init__.py": "", "omoe_kernels/ops/triton/launch.py": ""}
    files[f"omoe_kernels/{path}"] = source
    bad = ops_layering_violations(import_edges(_write_tree(tmp_path, files)))
    assert [e.target for e in bad] == [target]


@pytest.mark.parametrize("sub_imports, cycle", [
    ("from . import other\n", None),                   # pkg.sub -> pkg.other: a submodule
    ("import pkg.other\n", None),
    ("from .other import thing\n", None),
    ("from . import VERSION\n", ["pkg", "pkg.sub", "pkg"]),   # a name pkg/__init__ binds
    ("def f():\n    from pkg import VERSION\n", ["pkg", "pkg.sub", "pkg"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import VERSION\n", None),
])
def test_package_init_edges(tmp_path, sub_imports, cycle):
    """pkg/__init__ importing its submodules is no cycle; a submodule that needs a name of
    pkg/__init__ (which imports that submodule) is one."""
    _write_tree(tmp_path, {"pkg/__init__.py": "from .sub import f\nfrom . import other\nVERSION = 1\n",
                           "pkg/other.py": "thing = 2\n", "pkg/sub.py": sub_imports + "def f(): pass\n"})
    assert find_cycle(_graph(import_edges(tmp_path, "pkg"))) == cycle


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    edges = import_edges(REPO)
    assert len(edges) > 20, "the import graph came out nearly empty: is the resolver broken?"
    cycle = find_cycle(_graph(edges))
    assert cycle is None, "import cycle:\n" + describe_cycle(cycle, edges)


def test_ops_imports_nothing_above_it():
    edges = import_edges(REPO)
    assert any(e.source.startswith("omoe_kernels.ops.") for e in edges)
    bad = ops_layering_violations(edges)
    assert not bad, ("omoe_kernels/ops/ must not import the registry, the package root or the "
                     "layers above them:\n" + "\n".join(map(str, bad)))


def reachable_from(edges: list[Import], start: str) -> dict[str, Import]:
    """Every module `start` imports directly or through others, with the import that
    first reaches it (breadth-first, so the chain back to `start` is a shortest one)."""
    graph: dict[str, list[Import]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    reached: dict[str, Import] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for e in graph.get(node, ()):
            if e.target != start and e.target not in reached:
                reached[e.target] = e
                queue.append(e.target)
    return reached


def chain(reached: dict[str, Import], start: str, target: str) -> list[Import]:
    links = []
    while target != start:
        links.append(reached[target])
        target = reached[target].source
    return links[::-1]


def test_ops_reaches_nothing_above_it_through_other_modules():
    """ops/ may import omoe_kernels._validate, but not when that (or anything it imports)
    imports the registry: ops would then depend on the registry that loads it."""
    edges = import_edges(REPO)
    above = {PACKAGE} | {f"{PACKAGE}.{m}" for m in ABOVE_OPS}
    bad = []
    for start in sorted({e.source for e in edges if e.source.startswith(f"{PACKAGE}.ops")}):
        reached = reachable_from(edges, start)
        for target in sorted(reached):
            if target in above or any(target.startswith(a + ".") for a in above - {PACKAGE}):
                bad.append(" -> ".join([start] + [e.target for e in chain(reached, start, target)])
                           + "\n  " + "\n  ".join(map(str, chain(reached, start, target))))
                break
    assert not bad, "omoe_kernels/ops/ reaches the layers above it:\n" + "\n".join(bad)


def test_reachable_from_names_the_chain(tmp_path):
    files = {"omoe_kernels/__init__.py": "", "omoe_kernels/backends.py": "",
             "omoe_kernels/options.py": "from .backends import check_backend_name\n",
             "omoe_kernels/_validate.py": "from .options import check_eps\n",
             "omoe_kernels/ops/__init__.py": "",
             "omoe_kernels/ops/compiled.py": "from .._validate import Problem\n"}
    edges = import_edges(_write_tree(tmp_path, files))
    reached = reachable_from(edges, "omoe_kernels.ops.compiled")
    assert [e.target for e in chain(reached, "omoe_kernels.ops.compiled", "omoe_kernels.backends")] == [
        "omoe_kernels._validate", "omoe_kernels.options", "omoe_kernels.backends"]


# ---- the expert bounds ------------------------------------------------------------------

def _cpp_constants(name: str) -> list[tuple[str, int]]:
    """Every `constexpr <int type> name = N;` under csrc/, as (file, N)."""
    pattern = re.compile(rf"constexpr\s+(?:int|int64_t|long|size_t)\s+{name}\s*=\s*(\d+)\s*;")
    found = []
    for path in sorted((REPO / "csrc").rglob("*")):
        if path.suffix in (".h", ".cuh", ".cpp", ".cu", ".hpp"):
            for m in pattern.finditer(path.read_text(encoding="utf-8")):
                found.append((path.relative_to(REPO).as_posix(), int(m.group(1))))
    return found


@pytest.mark.parametrize("name, header, key", [
    ("kMaxExperts", "csrc/omoe_token.h", "cuda"),
    ("kMaxActive", "csrc/omoe_cpu_pass.h", "cpu"),
])
def test_the_cpp_bound_is_defined_once_and_matches_python(name, header, key):
    from omoe_kernels.ops.limits import MAX_ACTIVE_EXPERTS

    found = _cpp_constants(name)
    assert len(found) == 1 and found[0][0] == header, f"{name} defined {found}, want once in {header}"
    assert found[0][1] == MAX_ACTIVE_EXPERTS[key], (
        f"{header} {name} = {found[0][1]} but omoe_kernels.ops.limits.MAX_ACTIVE_EXPERTS"
        f"[{key!r}] = {MAX_ACTIVE_EXPERTS[key]}")


def test_the_registry_and_the_op_families_read_the_python_bounds():
    from omoe_kernels.backends import REGISTRY
    from omoe_kernels.ops import compiled
    from omoe_kernels.ops.limits import MAX_ACTIVE_EXPERTS
    from omoe_kernels.ops.triton import launch

    fused = {n: b.max_active_experts for n, b in REGISTRY.items() if b.max_active_experts is not None}
    assert fused == MAX_ACTIVE_EXPERTS
    assert compiled.FAMILY.max_active_experts("cpu") == MAX_ACTIVE_EXPERTS["cpu"]
    assert compiled.FAMILY.max_active_experts("cuda") == MAX_ACTIVE_EXPERTS["cuda"]
    assert launch.FAMILY.max_active_experts("cuda") == MAX_ACTIVE_EXPERTS["triton"]


def test_no_other_module_defines_an_expert_bound():
    """A second MAX_*EXPERTS constant would be a second place to update (and to forget)."""
    pattern = re.compile(r"MAX_\w*EXPERTS|MAX_ACTIVE\w*", re.IGNORECASE)
    others = []
    for name, path in package_modules(REPO).items():
        if name == "omoe_kernels.ops.limits":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            others += [f"{path.relative_to(REPO)}:{node.lineno}: {t.id}" for t in targets
                       if isinstance(t, ast.Name) and pattern.fullmatch(t.id)]
    assert not others, "expert bounds defined outside omoe_kernels/ops/limits.py:\n" + "\n".join(others)


# ---- sizes ------------------------------------------------------------------------------

def test_no_module_is_over_600_lines():
    long = {path.relative_to(REPO).as_posix(): n for path in package_modules(REPO).values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_omoe_linear_is_under_100_lines():
    from omoe_kernels import OMoELinear

    lines, start = inspect.getsourcelines(OMoELinear)
    assert len(lines) < MAX_OMOE_LINEAR_LINES, (
        f"OMoELinear (omoe_kernels/layer.py:{start}) is {len(lines)} lines; "
        f"keep it under {MAX_OMOE_LINEAR_LINES} (options and helpers live beside it)")


# ---- no paths of the machine a file was written on --------------------------------------

# A path under a home, build or scratch directory: /work, /workspace, /home/<user>,
# /Users/<user>, /root, /scratch, /mnt, and any fixed name under /tmp or /var/tmp (a
# script makes its scratch directory with mktemp; tests use tmp_path). System paths
# (/usr/local/cuda, /usr/bin/env, /dev/null, /opt) are no machine's own. A path counts
# where it starts a token: not inside a relative path, a URL or after ${VAR}.
MACHINE_PATH = re.compile(
    r"(?<![\w.~$}/-])/(?:work|workspace|root|scratch|mnt|tmp|var/tmp|private/tmp"
    r"|home/[\w.-]+|Users/[\w.-]+)/[\w.~-][\w.~+/-]*")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    files = []
    for name in out.stdout.decode().split("\0"):
        path = REPO / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line, path) of every machine path in `text`."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in MACHINE_PATH.finditer(text)]


def test_the_machine_path_pattern():
    root = "/"
    hits = machine_paths(f"a {root}work/x/y\nb {root}home/alice/src\n'{root}tmp/gpu_check.log'\n"
                         f"c {root}Users/bob/x {root}root/.cache\n")
    assert [line for line, _ in hits] == [1, 2, 3, 4, 4]
    clean = (f"#!{root}usr/bin/env bash\nCUDA_HOME={root}usr/local/cuda\n>{root}dev/null\n"
             f"docs{root}work/x https://example.com{root}home/a/b ${{TMPDIR:-{root}tmp}}/x\n"
             f"$OUT{root}tmp/x {root}opt/nvidia/x ~{root}work/x")
    assert machine_paths(clean) == []


def test_no_tracked_file_names_a_machine_path():
    if not (REPO / ".git").exists():
        pytest.fail("not a git checkout: this check reads `git ls-files`")
    hits = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{path.relative_to(REPO).as_posix()}:{line}: {p}" for line, p in machine_paths(text)]
    assert not hits, ("tracked files name paths of the machine they were written on (use paths "
                      "relative to the repository, $OUT or mktemp):\n" + "\n".join(hits))


# ---- the tools' command lines -----------------------------------------------------------

TOOLS_WITH_A_CLI = ("kernel_report", "launch_count", "profile")


def test_every_tool_with_a_main_block_is_checked():
    tools = REPO / "omoe_kernels" / "tools"
    with_main = sorted(p.stem for p in tools.glob("*.py")
                       if 'if __name__ == "__main__"' in p.read_text(encoding="utf-8"))
    assert tuple(with_main) == TOOLS_WITH_A_CLI   # kernel_model is a library, no CLI


@pytest.mark.parametrize("tool", TOOLS_WITH_A_CLI)
def test_tool_help_exits_0(tool):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", f"omoe_kernels.tools.{tool}", "--help"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout


# ---- tests and benchmarks import shared helpers and public modules ----------------------

def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names)


def test_tests_import_helpers_not_conftest():
    bad = sorted({f"{p.relative_to(REPO)}:{line}" for folder in ("python_tests", "bench")
                  for p in (REPO / folder).glob("*.py")
                  for line, name in _imports(p) if name.split(".")[0] == "conftest"})
    assert not bad, "import shared test code from helpers.py, not conftest.py: " + ", ".join(bad)


def test_bench_and_examples_use_no_private_module():
    bad = [f"{p.relative_to(REPO)}:{line}: {name}" for folder in ("bench", "examples")
           for p in sorted((REPO / folder).glob("*.py"))
           for line, name in _imports(p)
           if name.startswith(f"{PACKAGE}.") and any(part.startswith("_") for part in name.split(".")[1:])]
    assert not bad, "use the public API or omoe_kernels.testing:\n" + "\n".join(bad)
