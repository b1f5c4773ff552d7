"""The shape of the package: no import cycles, the library never imports the CLI, cheap commands stay cheap.

grimp (import-linter's graph builder) sees every import, function-level ones included, so a
cycle hidden inside a function fails here as surely as one at the top of a module.
"""

from __future__ import annotations

import subprocess
import sys

import grimp


def _graph():  # type: ignore[no-untyped-def]
    # No cache: grimp would write .grimp_cache into the cwd, which a hostile test running in the other
    # xdist worker counts as a file written outside its temp root.
    return grimp.build_graph("llamactl", include_external_packages=False, cache_dir=None)


def test_no_import_cycles() -> None:
    graph = _graph()
    modules = sorted(graph.modules)
    # Tarjan's strongly connected components over direct imports.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.find_modules_directly_imported_by(node)):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for module in modules:
        if module not in index:
            visit(module)
    assert cycles == []


def test_the_library_never_imports_the_cli() -> None:
    graph = _graph()
    library = [m for m in graph.modules if not (m == "llamactl.cli" or m.startswith("llamactl.cli."))]
    offenders = {
        m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i.startswith("llamactl.cli"))
        for m in library
        if m != "llamactl.__main__"
    }
    assert {m: i for m, i in offenders.items() if i} == {}


def test_import_contracts_hold() -> None:
    """The layers contract in pyproject.toml (cli -> features -> core -> tables)."""
    out = subprocess.run(["lint-imports", "--no-cache"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout[-3000:]


_PROBE = """
import sys
sys.argv = ["llamactl", *sys.argv[1:]]
from llamactl.cli import build_app
try:
    build_app()(prog_name="llamactl")
except SystemExit as exc:
    code = exc.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code, file=sys.stderr)
"""


def _probe(*args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    import os

    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    return out.stdout, out.stderr.strip().splitlines()[-1]


def test_help_does_not_import_torch() -> None:
    stdout, verdict = _probe("--help")
    assert "convert" in stdout and verdict == "NO_TORCH 0"
    stdout, verdict = _probe("chat", "--help")
    assert "--temperature" in stdout and verdict == "NO_TORCH 0"


def test_list_does_not_import_torch(tmp_path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from tests._ckpt import random_meta_state, tiny_args, write_hf_checkpoint, write_meta_checkpoint

    models = tmp_path / "home" / "models"
    args = tiny_args()
    write_meta_checkpoint(models / "meta", args, random_meta_state(args), tokenizer=tiny_tokenizer)
    write_hf_checkpoint(models / "hf", args, random_meta_state(args))
    stdout, verdict = _probe("list", env={"LLAMACTL_HOME": str(tmp_path / "home")})
    assert "meta" in stdout and "hf" in stdout and verdict == "NO_TORCH 0"
