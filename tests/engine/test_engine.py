"""choose_step: the decode step is picked once, at load; the env var is never read while decoding."""

from __future__ import annotations

import os

import pytest
import torch

from llamactl.engine import GRAPHS_ENV, CudaGraphStep, EagerStep, choose_step
from llamactl.errors import LlamactlError
from llamactl.generate import Generation
from llamactl.sampling import SamplingParams
from tests._chat_util import random_model, tiny_args


class RecordingEnviron(dict):
    """os.environ stand-in that records every key read."""

    def __init__(self, data: dict[str, str]) -> None:
        super().__init__(data)
        self.reads: list[str] = []

    def get(self, key, default=None):  # type: ignore[override]
        self.reads.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.reads.append(key)
        return super().__contains__(key)


def test_the_env_var_is_read_when_the_step_is_chosen_and_never_while_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(tiny_args(), seed=1)
    environ = RecordingEnviron(dict(os.environ, **{GRAPHS_ENV: "1"}))
    monkeypatch.setattr(os, "environ", environ)
    step = choose_step(model)
    assert environ.reads.count(GRAPHS_ENV) == 1
    assert isinstance(step, EagerStep)  # asked for, but a CPU model cannot be graphed
    environ.reads.clear()
    model.setup_cache(1, 64)
    calls = []
    counted = lambda tokens, pos: calls.append(pos) or step(tokens, pos)  # noqa: E731
    counted.model = model  # type: ignore[attr-defined]
    run = Generation(model, [1, 5, 7], sampling=SamplingParams(temperature=0), max_new_tokens=20, step=counted)
    assert len(list(run)) == 20
    assert calls == list(range(3, 22))  # every token after the first went through the step
    assert GRAPHS_ENV not in environ.reads


def test_kinds() -> None:
    model = random_model(tiny_args(), seed=1)
    assert isinstance(choose_step(model, "eager"), EagerStep) and choose_step(model).model is model
    with pytest.raises(LlamactlError, match="decode step 'cuda-graph': needs a model on a CUDA device"):
        choose_step(model, "cuda-graph")
    with pytest.raises(LlamactlError, match="unknown; choose one of: auto, eager, cuda-graph, compiled"):
        choose_step(model, "graphed")


def test_the_eager_step_equals_the_model() -> None:
    model = random_model(tiny_args(), seed=2)
    tokens = torch.tensor([[3, 9, 4, 11]])
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 32)
        model(tokens[:, :3], 0)
        step = EagerStep(model)(tokens[:, 3:], 3)
    assert step.shape == (1, 1, model.args.vocab_size)
    assert (step[0, -1] - full[0, -1]).abs().max().item() <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_graphs_on_cuda_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(tiny_args(), seed=1).cuda().fuse_projections()
    monkeypatch.setenv(GRAPHS_ENV, "1")
    assert isinstance(choose_step(model), CudaGraphStep)
    monkeypatch.delenv(GRAPHS_ENV)
    assert isinstance(choose_step(model), EagerStep)
