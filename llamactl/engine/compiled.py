"""One decode step compiled by torch.compile (inductor): the static-shape step, on the CPU.

The compiled call is the model's static form, as the CUDA graph captures it: the position is
a [1] tensor and attention reads the whole preallocated cache through a mask, so every call
has the same shapes and compiles once per cache. Inductor fuses the norms, rotary and
softmax into a few C++ loops and (for bf16/fp16) emits its own vectorised GEMV, where eager
CPU kernels convert 16-bit weights one operator at a time.

Compiling takes seconds to minutes; inductor's artefacts are cached on disk under the
llamactl home (`cache/inductor`), so a second start reuses them. A compile that fails (no C++
compiler, an unsupported operator) logs one warning and the step runs eagerly from then on.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch

from llamactl.engine.eager import EagerStep
from llamactl.home import cache_dir
from llamactl.model import KVCache, Transformer

logger = logging.getLogger(__name__)
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _user_chose_cache() -> bool:
    """Whether the user chose inductor's cache. torch fills the variable in itself with its own
    default (importing some of torch does, so a snapshot at import can be wrong), and llamactl
    with its home's cache: neither value is the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(CACHE_ENV)
    return chosen is not None and os.path.abspath(chosen) not in (os.path.abspath(default_cache_dir()), *_ours)


_ours: list[str] = []  # the value use_compile_cache last set (a later llamactl home replaces it)


def compilable(model: Transformer) -> str | None:
    """Why `model` is not decoded through the compiled step, or None when it is."""
    if model.tok_embeddings.weight.device.type != "cpu":
        return "compiles on the CPU only (a GPU has CUDA graphs)"
    return None


def use_compile_cache() -> None:
    """Point inductor's on-disk cache under the llamactl home (unless the user chose a place)."""
    if not _user_chose_cache():
        path = cache_dir("inductor")
        path.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_ENV] = str(path)
        _ours[:] = [os.path.abspath(path)]


class CompiledStep:
    """`model(tokens, pos, kv_len=cache_len)` through torch.compile; eager after a failed compile.

    `compile_seconds` is the time the first call of each cache took (compiling included).
    """

    kind = "compiled"

    def __init__(self, model: Transformer) -> None:
        use_compile_cache()  # before torch.compile, which fills in its own default
        self.model = model
        self._eager = EagerStep(model)
        self._compiled = torch.compile(self._static, dynamic=False)
        self._pos = torch.zeros(1, dtype=torch.long, device=model.tok_embeddings.weight.device)
        self._tokens: torch.Tensor | None = None  # [B,1]: fixed inputs, so no call differs in a guard
        self._cache: KVCache | None = None
        self.compile_seconds: float | None = None
        self.failed = False

    def _static(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, pos, kv_len=self.model.cache_len)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if self.failed or self.model.cache_len == 0:
            return self._eager(tokens, pos)
        if self._tokens is None or self._tokens.shape != tokens.shape:
            with torch.inference_mode(False):  # a plain tensor, writable in and out of inference mode
                self._tokens = torch.zeros_like(tokens)
        self._tokens.copy_(tokens)
        self._pos.fill_(pos)
        cache = self.model.layers[0].attention.cache
        first = cache is not self._cache
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # rotary's complex multiply runs as an eager kernel inside the graph; said once per
                # compile on stderr, it is no news to a user
                warnings.filterwarnings("ignore", message="Torchinductor does not support code generation")
                logits = self._compiled(self._tokens, self._pos)
        except Exception as exc:  # inductor raises many kinds; any of them means: run eagerly
            self.failed = True
            why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            logger.warning("torch.compile failed (%s: %s); decoding eagerly", type(exc).__name__, why)
            return self._eager(tokens, pos)  # rewrites this position's keys and values
        if first:
            self._cache = cache
            self.compile_seconds = time.perf_counter() - start
        return logits

    def __repr__(self) -> str:
        return f"CompiledStep(failed={self.failed})"
