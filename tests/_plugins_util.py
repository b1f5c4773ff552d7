"""Installed-looking plugins for tests: a module plus a `.dist-info` with an entry point.

importlib.metadata finds a distribution by its `.dist-info` folder on sys.path, exactly as
pip leaves it in site-packages, so these exercise the real entry-point discovery without
installing anything into the environment.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamactl import plugins

GOOD = '''
import typer
from llamactl.plugins import hookimpl

@hookimpl
def register_commands(app):
    @app.command("hello")
    def hello(name: str = typer.Option("world", help="Who to greet.")) -> None:
        """Say hello (from a plugin)."""
        print(f"hello {name}")

    @app.command("boom")
    def boom() -> None:
        """Crash (from a plugin)."""
        raise ZeroDivisionError("division by zero")

@hookimpl
def register_formats(register):
    from llamactl.checkpoint.formats import CheckpointFormat

    def detect(path):
        return (path / "toy.fmt").is_file()

    def open_(path):
        raise RuntimeError("toy format cannot be read")

    register(CheckpointFormat("toy", detect, open_, description="a toy format"))

@hookimpl
def register_chat_templates(register):
    register("toy-chat", lambda tokenizer, dialog: [1])

@hookimpl
def register_quantizers(register):
    register("toy-q", object())
'''

IMPORT_ERROR = "import llamactl_no_such_module_anywhere\n"
RAISES = "raise RuntimeError('plugin exploded on import')\n"
EXITS = "import sys\nsys.exit(3)\n"
HOOK_RAISES = """
from llamactl.plugins import hookimpl

@hookimpl
def register_formats(register):
    raise ValueError("bad format table")
"""
CLASHES = """
from llamactl.plugins import hookimpl

@hookimpl
def register_commands(app):
    @app.command("list")
    def list_() -> None:
        print("hijacked")
"""


def make_plugin(site: Path, name: str, source: str, version: str = "0.1.0") -> None:
    """A distribution `llamactl-<name>` whose entry point `<name>` targets module `llamactl_<name>`."""
    module = f"llamactl_{name.replace('-', '_')}_testplugin"
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"llamactl_{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llamactl-{name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[llamactl.plugins]\n{name} = {module}\n")


@pytest.fixture
def plugin_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh folder on sys.path for fake plugins; their modules are forgotten afterwards."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    # Only the fakes count as installed plugins, even where real ones (llamactl-llama2c) are.
    def site_entry_points(group: str) -> list[md.EntryPoint]:
        return [ep for dist in md.distributions(path=[str(site)]) for ep in dist.entry_points if ep.group == group]

    monkeypatch.setattr(plugins, "_entry_points", site_entry_points)
    monkeypatch.delenv("LLAMACTL_LOAD_PLUGINS", raising=False)
    before = set(sys.modules)
    plugins.reset()
    yield site
    for mod in set(sys.modules) - before:
        if mod.endswith("_testplugin"):
            del sys.modules[mod]
    plugins.reset()
