"""Make the plugin discoverable as if pip-installed, and keep llamactl's store in a temp dir."""

from __future__ import annotations

import importlib.metadata as md
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FIXTURES = Path(__file__).resolve().parents[4] / "shared" / "fixtures" / "stories260K"


@pytest.fixture(autouse=True)
def llama2c_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Load only this plugin; when it is not pip-installed, fake its dist-info on sys.path."""
    from llamactl import plugins

    try:
        md.distribution("llamactl-llama2c")
    except md.PackageNotFoundError:
        site = tmp_path / "site"
        info = site / "llamactl_llama2c-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llamactl-llama2c\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text("[llamactl.plugins]\nllama2c = llamactl_llama2c\n")
        monkeypatch.syspath_prepend(str(site))
        if str(SRC) not in sys.path:
            monkeypatch.syspath_prepend(str(SRC))
    monkeypatch.setenv("LLAMACTL_LOAD_PLUGINS", "llama2c")
    monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / "home"))
    # The CLI loads plugin formats when it builds the app; library callers ask for them.
    plugins.get_registry(fresh=True).formats()
    yield
    plugins.reset()


@pytest.fixture
def stories() -> Path:
    if not (FIXTURES / "llama2c" / "stories260K.bin").is_file():
        # The wording of tests/_chat_util.need, which this package's tests cannot import.
        pytest.skip("needs ../shared/fixtures/stories260K/llama2c/stories260K.bin (not present; README: Test fixtures)")
    return FIXTURES
