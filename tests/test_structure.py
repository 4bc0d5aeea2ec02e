"""The library's arrows point one way, and no module reaches into another's private names.

Read from the source with ``ast``: the module-level imports between ``lora_optim`` modules form a
graph with no cycle (imports under ``if TYPE_CHECKING:`` and inside functions are not edges:
they run after every module has loaded), the optimizer does not import the gradient modes at
module level, and a private name (``_x``) is only used on ``self``, ``cls`` or the module's own
classes, with a short list of names of other libraries.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(importlib.import_module("lora_optim").__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module, module: str, known: set[str]) -> set[str]:
    """Modules of the package imported when ``module`` loads."""
    edges: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in known)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else _resolve(module, node.module, node.level)
                for alias in node.names:
                    # ``from package import submodule`` imports the submodule.
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in known else base)

    visit(tree.body)
    return {edge for edge in edges if edge in known and edge != module}


def _resolve(module: str, name: str, level: int) -> str:
    parts = module.split(".")
    return ".".join(parts[: len(parts) - level + 1] + [name])


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _module_level_imports(tree, name, known) for name, tree in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_module_imports_have_no_cycle():
    graph = _graph()
    assert len(graph) > 20
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_optimizer_and_the_math_do_not_import_the_modes():
    graph = _graph()
    modes = {"lora_optim.per_layer", "lora_optim.activation"}
    for module in ("lora_optim.optimizer", "lora_optim.engine", "lora_optim.accumulation"):
        if module in graph:
            assert not graph[module] & modes, module
    for mode in modes:
        assert "lora_optim.optimizer" not in graph[mode], mode
    # The math knows nothing of the class.
    assert "lora_optim.optimizer" not in graph["lora_optim.engine"]
    assert not any(module.startswith("lora_optim.projections") and "lora_optim.optimizer" in edges
                   for module, edges in graph.items())


def test_importing_the_package_in_a_fresh_interpreter_works():
    result = subprocess.run([sys.executable, "-c", "import lora_optim.engine, lora_optim.projections.lora, lora_optim"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_script_the_tests_run_imports_this_checkouts_library(tmp_path):
    """Workers run as scripts (``tests/resume_worker.py``, ``tests/trainer_worker.py``, the
    benchmarks) import the ``lora_optim`` under test, not an installed one of another checkout
    (``tests/conftest.py`` puts the checkout first on ``PYTHONPATH``)."""
    script = tmp_path / "where.py"
    script.write_text("import lora_optim; print(lora_optim.__file__)\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    assert pathlib.Path(result.stdout.strip()).resolve().parent == PACKAGE.resolve()


# Private names of other libraries that the code may use, each with why.
ALLOWED_PRIVATE = {
    "_version": "torch.Tensor's version counter: detects an input changed in place",
    "_getframe": "sys._getframe: attributes a warning to the user's line",
}


def _private_uses(tree: ast.Module) -> list[tuple[int, str]]:
    own_classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_optim"):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names if alias.name.startswith("_")]
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in {"self", "cls", "torch", *own_classes}:
            continue
        if node.attr in ALLOWED_PRIVATE:
            continue
        found.append((node.lineno, f"{ast.unparse(owner)}.{node.attr}"))
    return found


def test_no_module_reaches_into_private_names():
    offences = {name: uses for name, tree in _modules().items() if (uses := _private_uses(tree))}
    assert offences == {}


def test_the_private_name_check_can_fail():
    tree = ast.parse("def f(optimizer):\n    return optimizer._state(p, group), self._optimizer._hyper\n")
    assert [use for _, use in _private_uses(tree)] == ["optimizer._state", "self._optimizer._hyper"] or sorted(
        use for _, use in _private_uses(tree)) == sorted(["optimizer._state", "self._optimizer._hyper"])


@pytest.mark.parametrize("module", ["lora_optim.per_layer", "lora_optim.activation"])
def test_the_modes_use_only_public_members_of_the_optimizer(module):
    tree = _modules()[module]
    calls = {ast.unparse(node) for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and ast.unparse(node.value) in {"optimizer", "self._optimizer"}}
    assert calls, "the check would pass vacuously"
    assert all(not call.split(".")[-1].startswith("_") for call in calls), calls


@pytest.mark.parametrize("module", ["lora_optim.interop.peft_adapter", "lora_optim.interop.unmerge"])
def test_interop_uses_only_public_members_of_the_optimizer(module):
    """Export, load and unmerge ask the optimizer (the change it made, pending pieces) like every
    other caller: no private member, and no import of the modules that hold its state's parts."""
    tree = _modules()[module]
    calls = {ast.unparse(node) for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "optimizer"}
    assert calls, "the check would pass vacuously"
    assert all(not call.split(".")[-1].startswith("_") for call in calls), calls
    state_modules = {"lora_optim.accumulation", "lora_optim.initial_factors", "lora_optim.sparsity"}
    assert not _graph()[module] & state_modules, _graph()[module] & state_modules
