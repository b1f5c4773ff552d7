"""The compiled (torch.compile) decode step: the eager fp32 tokens on stories260K; cached on disk
under the llamactl home; a compile that fails falls back to eager with one warning."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from llamactl.engine import COMPILE_ENV, COMPILE_PAYS, CompiledStep, EagerStep, choose_step
from llamactl.generate import Generation
from llamactl.loading import load_model
from llamactl.sampling import SamplingParams
from tests._chat_util import random_model, tiny_args

PROMPT = [1, 403, 407, 261, 378]  # BOS + a few stories260K pieces


def _greedy(model: torch.nn.Module, step: object, n: int = 24, prompt: list[int] = PROMPT) -> list[int]:
    model.setup_cache(1, 64)  # type: ignore[operator]
    with torch.inference_mode():
        run = Generation(model, prompt, sampling=SamplingParams(temperature=0), max_new_tokens=n, step=step)  # type: ignore[arg-type]
        return list(run)


@pytest.mark.slow
def test_compiled_greedy_tokens_equal_eager_fp32_on_stories260k(stories_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(stories_dir, device="cpu", dtype="fp32", step="compiled")
    step = loaded.step
    assert isinstance(step, CompiledStep)
    compiled = _greedy(loaded.model, step)
    assert not step.failed and step.compile_seconds is not None and step.compile_seconds > 0
    eager = _greedy(loaded.model, EagerStep(loaded.model))
    assert compiled == eager and len(eager) == 24
    # inductor's artefacts went under the llamactl home (the test's own, see conftest)
    assert any((tmp_path / "llamactl-home" / "cache" / "inductor").iterdir())


@pytest.mark.slow
def test_a_failed_compile_warns_once_and_decodes_eagerly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))  # a real compile failure
    model = random_model(tiny_args(), seed=3).fuse_projections()
    step = choose_step(model, "compiled")
    with caplog.at_level(logging.WARNING, logger="llamactl.engine.compiled"):
        tokens = _greedy(model, step, 8, [1, 5, 7])
    assert step.failed  # type: ignore[attr-defined]
    assert tokens == _greedy(model, EagerStep(model), 8, [1, 5, 7])
    warnings = [r for r in caplog.records if r.name == "llamactl.engine.compiled"]
    assert len(warnings) == 1 and "decoding eagerly" in warnings[0].getMessage()


def test_auto_compiles_only_the_dtypes_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamactl import engine

    monkeypatch.delenv(COMPILE_ENV)
    model = random_model(tiny_args(), seed=1).fuse_projections()
    assert isinstance(choose_step(model), EagerStep)  # fp32: compiling does not pay
    model = model.to(torch.bfloat16)
    assert isinstance(choose_step(model), EagerStep if torch.bfloat16 not in COMPILE_PAYS else CompiledStep)
    monkeypatch.setattr(engine, "COMPILE_PAYS", (torch.bfloat16,))  # where it would pay
    assert isinstance(choose_step(model), CompiledStep)
    assert isinstance(choose_step(model, "eager"), EagerStep)  # --no-compile
    assert isinstance(choose_step(model, "compiled"), CompiledStep)  # --compile
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert isinstance(choose_step(model), EagerStep)
    model.unfuse_projections()  # as a quantizer leaves it: not measured, not compiled
    monkeypatch.delenv(COMPILE_ENV)
    assert isinstance(choose_step(model), EagerStep)


def test_inductor_cache_goes_under_the_home_unless_the_user_chose_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """torch's own default and an earlier llamactl home are replaced; a user's own place is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from llamactl.engine.compiled import CACHE_ENV, use_compile_cache

    monkeypatch.setenv(CACHE_ENV, default_cache_dir())  # what torch fills in by itself
    for home in ("one", "two"):
        monkeypatch.setenv("LLAMACTL_HOME", str(tmp_path / home))
        use_compile_cache()
        assert Path(os.environ[CACHE_ENV]) == tmp_path / home / "cache" / "inductor"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    use_compile_cache()
    assert os.environ[CACHE_ENV] == str(tmp_path / "mine")
