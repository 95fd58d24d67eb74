"""The package's layering rule, checked on the import graph of psvae_jax/.

Every module is parsed with `ast`, imports inside functions included, so a lazy import cannot
hide an edge. Layers: models never import tasks; tasks never import the loop (train), its
setup (train_state), the tools or the command line (main); ports import only models, ports and
the leaf helpers tree_paths and errors (which import nothing of the package); and the graph of the package's modules has no cycle.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "psvae_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

# (importer prefix, forbidden target prefixes)
FORBIDDEN = (
    ("psvae_jax.models", ("psvae_jax.tasks", "psvae_jax.train", "psvae_jax.tools",
                          "psvae_jax.runs", "psvae_jax.ports")),
    ("psvae_jax.tasks", ("psvae_jax.train", "psvae_jax.train_state", "psvae_jax.tools",
                         "psvae_jax.main", "psvae_jax.runs", "psvae_jax.stage_chain")),
)
# Ports import nothing of the package but these.
LEAF_HELPERS = ("psvae_jax.tree_paths", "psvae_jax.errors")
PORTS_MAY_IMPORT = ("psvae_jax.models", "psvae_jax.ports", *LEAF_HELPERS)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (at any depth of its code)."""
  modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        # `from pkg import mod` imports the module pkg.mod when there is one.
        for alias in node.names:
          targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    graph[name] = {t for t in targets if _is_under(t, PACKAGE) and t in modules and t != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules (first = last), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start)
      if found:
        return found
  return None


def test_graph_sees_function_level_imports():
  graph = import_graph()
  assert "psvae_jax.models.mmdit" in graph
  assert graph["psvae_jax.tasks"] == set()  # the registry names its modules as strings


def test_find_cycle_reports_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("importer,forbidden", FORBIDDEN)
def test_forbidden_edges(importer, forbidden):
  bad = sorted(f"{source} -> {target}" for source, targets in import_graph().items()
               if _is_under(source, importer) for target in targets
               if any(_is_under(target, f) for f in forbidden))
  assert not bad, "layering: " + "; ".join(bad)


def test_ports_import_only_models_and_ports():
  bad = sorted(f"{source} -> {target}" for source, targets in import_graph().items()
               if _is_under(source, "psvae_jax.ports") for target in targets
               if not any(_is_under(target, allowed) for allowed in PORTS_MAY_IMPORT))
  assert not bad, "ports import beyond models/ports: " + "; ".join(bad)


@pytest.mark.parametrize("module", LEAF_HELPERS)
def test_leaf_helpers_import_nothing_of_the_package(module):
  """The leaf helpers may be imported from every layer because they import nothing of it."""
  assert not import_graph()[module]
