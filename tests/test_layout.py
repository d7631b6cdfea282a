"""The architecture as a test: which packages may import which (statically, at any depth)."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "r2ray"

# CPython 3.11's ast module keeps its recursion counter in interpreter-wide state, so ast.parse
# in this process can fail with "AST constructor recursion depth mismatch" when another thread
# (a helper an earlier test left running) builds AST objects at the same time (threaded reports
# under python/cpython#106905; 1 failure in 5 full runs here, never alone). The files are parsed in
# a fresh one-thread interpreter instead.
_IMPORTS = """
import ast, json, sys
from pathlib import Path
root = Path(sys.argv[1])

def absolute(node, path):   # the module a from-import names, a relative one resolved
    if not node.level:
        return node.module
    package = path.relative_to(root.parent).with_suffix("").parts[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])

found = {}
for path in sorted(root.rglob("*.py")):
    names, top = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, path)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add(absolute(node, path))
    found[str(path.relative_to(root.parent))] = [sorted(names), sorted(top)]
print(json.dumps(found))
"""


@functools.cache
def _package_imports() -> dict[str, tuple[set[str], set[str]]]:
    """{file: (every module it imports at any depth, the modules it imports at module level)}."""
    out = subprocess.run([sys.executable, "-c", _IMPORTS, str(PACKAGE)], capture_output=True,
                         text=True, check=True).stdout
    return {f: (set(every), set(top)) for f, (every, top) in json.loads(out).items()}


def imported_modules(folder: str) -> dict[str, set[str]]:
    """{file: every module it imports, at module level or inside functions}."""
    found = {f: every for f, (every, _) in _package_imports().items()
             if f.startswith(f"r2ray/{folder}/")}
    assert found, f"no Python files under r2ray/{folder}"
    return found


@pytest.mark.parametrize("folder", ["serving", "solver", "predictor"])
def test_only_the_batch_job_imports_batch(folder):
    offenders = {f: sorted(n for n in names if n == "r2ray.batch" or n.startswith("r2ray.batch."))
                 for f, names in imported_modules(folder).items()}
    assert not {f: n for f, n in offenders.items() if n}


@pytest.mark.parametrize("folder", ["solver", "predictor"])
def test_solver_and_predictor_run_without_ray(folder):
    """They are libraries over numpy/torch; Ray composes them (``solver.distributed`` takes Ray
    objects it is handed, and imports Ray only inside the functions that need it)."""
    offenders = {f: sorted(n for n in names if n == "ray" or n.startswith("ray."))
                 for f, names in imported_modules(folder).items()
                 if not f.endswith("solver/distributed.py")}
    assert not {f: n for f, n in offenders.items() if n}
    top_level = _package_imports()["r2ray/solver/distributed.py"][1]
    assert not {n for n in top_level if n and (n == "ray" or n.startswith("ray."))}


def test_routing_with_a_local_model_imports_neither_mlflow_nor_scikit_learn(small_routing_model):
    """MLflow and scikit-learn cost seconds to import each, and only training, registration, the
    report and the residual network use them: the job's driver and each scoring worker import
    neither. The driver does not import torch either (~2 s): it ships a saved folder's files and
    plans the budget; the workers build the predictor from those files."""
    import subprocess
    import sys

    folder = small_routing_model["path"]
    driver = ("from r2ray.batch.job import load_model\nfrom r2ray.batch.score import ScoreWorker\n"
              "from r2ray.batch.dedupe import first_seen_duplicates\n"
              "from r2ray.batch.assign import assign_stage\n"
              "from r2ray.predictor.spend_guarantee import plan_budget\n"
              f"model = load_model({folder!r}, None, None)\n"
              "assert model.spend_simulation is not None and model.embedding_dim > 0\n")
    worker = driver + "ScoreWorker(model.files, threads=1)\n"
    for code, heavy in ((driver, {"mlflow", "sklearn", "torch"}), (worker, {"mlflow", "sklearn"})):
        out = subprocess.run([sys.executable, "-c", "import sys\n" + code + (
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))")],
            capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == "[]"
