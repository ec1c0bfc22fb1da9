"""Imports flow one way: launch -> trainer -> parallel, data, comms, faulttol -> loomtrain/*.py (shared).

Every import statement of the package is read (those inside functions too); an import of a higher
layer, or between middle folders other than the declared ones, fails the test with its file:line.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYER = {"launch": 3, "trainer": 2, "parallel": 1, "data": 1, "comms": 1, "faulttol": 1, "configs": 0,
         "loomtrain": 0}
SIDEWAYS = {("parallel", "comms"), ("faulttol", "comms"), ("parallel", "data")}  # transport, byte counts; batches


def _folder(module: str):
    parts = module.split(".")
    if parts[0] != "loomtrain":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else "loomtrain"


def _imports(path: pathlib.Path, root: pathlib.Path):
    """(line, module) of every import in ``path``, relative ones resolved."""
    rel = path.relative_to(root)
    package = ["loomtrain"] + ([] if rel.parts[0] == "loomtrain" else [rel.parts[0]]) + list(rel.parts[1:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(package[:len(package) - node.level + 1] + ([module] if module else []))
            yield node.lineno, module


def back_edges(root=ROOT) -> list[str]:
    found = []
    for folder, layer in LAYER.items():
        for path in sorted((root / folder).rglob("*.py")):
            for line, module in _imports(path, root):
                to = _folder(module)
                if to is None or to == folder:
                    continue
                if LAYER[to] > layer or (LAYER[to] == layer == 1 and (folder, to) not in SIDEWAYS):
                    found.append(f"{path.relative_to(root)}:{line} {folder} -> {module}")
    return found


def test_imports_flow_one_way():
    assert back_edges() == []


def test_the_check_sees_a_back_edge(tmp_path):
    """A parallel/ module importing trainer/ (inside a function) is reported."""
    for folder in LAYER:
        (tmp_path / folder).mkdir()
    (tmp_path / "parallel" / "bad.py").write_text("def f():\n    from loomtrain.trainer.loss import token_loss_sum\n")
    (tmp_path / "trainer" / "ok.py").write_text("from loomtrain.parallel import bad\nfrom . import ok\n")
    assert back_edges(tmp_path) == ["parallel/bad.py:2 parallel -> loomtrain.trainer.loss"]
