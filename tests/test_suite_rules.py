"""Rules the suite keeps about itself: every test asserts something (directly, through pytest.raises or a
named assert helper, or through a helper of its own file that asserts or raises)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHECKING_CALLS = {"raises", "warns", "fail", "assert_close", "assert_array_equal", "assert_allclose"}


def _checks(node: ast.AST, helpers: set[str]) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Assert):
            return True
        if isinstance(n, ast.Call):
            name = n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            if name in CHECKING_CALLS or name.startswith(("assert", "_assert")) or name in helpers:
                return True
    return False


def test_every_test_asserts_something():
    silent = []
    for path in sorted(TESTS.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        helpers = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")
                   and any(isinstance(m, (ast.Assert, ast.Raise)) for m in ast.walk(n))}
        silent += [f"{path.name}:{n.lineno} {n.name}" for n in tree.body
                   if isinstance(n, ast.FunctionDef) and n.name.startswith("test_") and not _checks(n, helpers)]
    assert not silent, "tests without an assertion: " + ", ".join(silent)
