"""The package's module-level imports form no cycle: dependencies a reader can follow.

A link that would be a cycle is made openly instead: in ``minilora/__init__``
(``tensor.install_ops``) or by an import at call time (``functional.lora_linear``). The graph is
read from the source with ``ast``: every top-level ``import`` / ``from ... import`` between
minilora modules, where importing ``a.b.c`` also imports the packages ``a.b`` and ``a`` (their
``__init__`` runs first).
"""

import ast
import os

import numpy as np
import pytest

import minilora

PACKAGE = os.path.dirname(minilora.__file__)


def _modules() -> dict:
    """{dotted name: (path, is_package)} for every .py file of the package."""
    found = {}
    root = os.path.dirname(PACKAGE)
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                is_package = dotted.endswith(".__init__")
                found[dotted[: -len(".__init__")] if is_package else dotted] = (path, is_package)
    return found


def _with_parents(name: str) -> set:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _import_graph() -> dict:
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in tree.body:  # module level only: imports inside functions run later
            if isinstance(node, ast.ImportFrom) and node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                targets |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilora"):
                targets |= {t for t in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if t in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        reached = set().union(*(_with_parents(t) for t in targets)) if targets else set()
        graph[name] = reached - _with_parents(name)  # a module's own packages are importing it already
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_graph_reader_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_has_the_expected_edges():
    graph = _import_graph()
    assert "minilora.backend" in graph["minilora.tensor"]
    assert "minilora.tensor" in graph["minilora.function"]
    assert {"minilora.nn", "minilora.lora.function"} <= graph["minilora.lora.layer"]
    assert "minilora.lora" not in graph["minilora.functional"]  # functional cannot import lora: lora -> nn -> functional
    assert "minilora.generate" not in graph["minilora.models.gpt"]


def test_the_methods_package_imports_no_private_name_of_another_module():
    """minilora/methods/ reaches the rest of the package through public names only."""
    folder = os.path.join(PACKAGE, "methods")
    private = []
    for file in sorted(os.listdir(folder)):
        if file.endswith(".py"):
            with open(os.path.join(folder, file), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and not (node.level == 1 and node.module):  # ``from .table``: its own
                    private += [f"{file}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert "minilora.methods.apply" in _import_graph() and not private, private


def test_no_module_level_import_cycle():
    assert _cycles(_import_graph()) == []


def test_lora_function_holds_the_equation_alone_and_answers_for_the_ops_built_on_it():
    """lora/function.py defines no DoRA, mixed-batch or NF4 code; those names import from it all the same."""
    from minilora.lora import dora, function, mixed_op

    with open(function.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not {name for name in defined if "dora" in name.lower() or "mixed" in name.lower()}, defined
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not imported & {"quantized", "dora", "mixed_op"}, imported
    for module, names in ((dora, ("DoRALinearFn", "dora_backward", "dora_forward", "dora_linear", "dora_norms",
                                  "dora_weight")), (mixed_op, ("MixedLoRALinearFn", "mixed_lora_linear"))):
        for name in names:
            assert getattr(function, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="has no attribute 'no_such_op'"):
        function.no_such_op  # noqa: B018


def test_no_module_sets_another_modules_names_at_import_time():
    """No top-level ``module.name = ...``: every name is defined in the file a reader jumps to."""
    import minilora.functional as F
    from minilora import lora

    patched = []
    for name, (path, _) in _modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            patched += [f"{name}: {ast.unparse(t)}" for t in targets if isinstance(t, ast.Attribute)]
    assert not patched, patched
    assert F.lora_linear.__module__ == "minilora.functional"
    rng = np.random.default_rng(0)
    x, W, A, Bm = (minilora.tensor(rng.standard_normal(s), dtype="float64") for s in ((2, 3), (4, 3), (2, 3), (4, 2)))
    np.testing.assert_array_equal(F.lora_linear(x, W, None, A, Bm, 0.5, 0.0, False).data,
                                  lora.lora_linear(x, W, None, A, Bm, 0.5).data)


def test_the_lora_package_does_not_branch_on_dora_outside_its_module():
    """No file of lora/ but dora.py (and config.py, which defines the flag) reads a DoRA flag: each
    adapter's variant supplies what differs (its parts, their shapes, its merge, its initial state)."""
    folder = os.path.join(PACKAGE, "lora")
    reads = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".py") and file not in ("dora.py", "config.py"):
            with open(os.path.join(folder, file), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            found = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
            if found & {"use_dora", "dora_detach_norm"}:
                reads[file] = sorted(found & {"use_dora", "dora_detach_norm"})
    assert "layer.py" in os.listdir(folder) and not reads, reads


def _imports(path: str) -> list:
    """Every ``from X import a, b`` of a file, at any depth: [(X with its leading dots, a)]."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [("." * node.level + (node.module or ""), a.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) for a in node.names]


def test_the_models_know_nothing_of_lora():
    """models/ (the GPT and its files) imports nothing of lora/, not even inside a function."""
    folder = os.path.join(PACKAGE, "models")
    found = [f"{file}: from {module} import {name}" for file in sorted(os.listdir(folder)) if file.endswith(".py")
             for module, name in _imports(os.path.join(folder, file))
             if "lora" in module.split(".") or (module.strip(".") == "" and name == "lora")]
    assert not found, found
    graph = _import_graph()
    assert not {t for name in graph if name.startswith("minilora.models") for t in graph[name]
                if t.startswith("minilora.lora")}


@pytest.mark.parametrize("module", ["quant", "function", "models/gpt", "models/pretrained", "lora/model", "lora/layer",
                                    "lora/mixed", "lora/mixed_op", "lora/quantized", "lora/qlora", "lora/config",
                                    "lora/__init__", "ops/elementwise", "ops/linalg", "ops/reduce", "ops/shape"])
def test_a_module_imports_no_private_name_of_another(module):
    private = [f"from {m} import {name}" for m, name in _imports(os.path.join(PACKAGE, module + ".py"))
               if name.startswith("_") and m != "__future__"]
    assert not private, private


def test_nf4_is_written_once():
    """The NF4 format, its byte count and the weight that computes from it live in minilora/quant.py alone.

    lora's names for them (``lora.quantized.QuantizedWeight``, ...) are the same objects.
    """
    from minilora import lora, quant
    from minilora.lora import qlora, quantized

    for name in ("DequantBuffer", "QuantizedWeight", "check_not_quantized", "quantized_layers"):
        assert getattr(quantized, name) is getattr(quant, name), name
    assert lora.QuantizedWeight is quant.QuantizedWeight
    for module in (quantized, qlora):
        with open(module.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & {"nearest_level", "dequantize_range", "quantize_nf4", "nf4_nbytes", "QuantizedWeight"}


def test_the_peft_import_half_answers_from_hf_peft_too():
    """``minilora.hf.peft`` writes adapters, ``peft_import`` reads them; their names answer from ``hf.peft`` too."""
    from minilora import hf
    from minilora.hf import peft, peft_import

    for name in ("load_peft_adapter", "read_peft_adapter", "split_c_attn", "pissa_as_lora", "matching_pattern",
                 "peft_weights_file"):
        assert getattr(peft, name) is getattr(peft_import, name), name
    assert hf.load_peft_adapter is peft_import.load_peft_adapter and hf.save_peft_adapter is peft.save_peft_adapter
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        peft.no_such_name  # noqa: B018


def test_no_file_of_the_package_is_over_600_lines():
    long = {name: n for name, (path, _) in _modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > 600}
    assert not long, long
