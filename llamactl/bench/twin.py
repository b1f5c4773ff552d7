"""transformers' LlamaForCausalLM on the same weights and device: what `vs transformers` races.

Built lazily by the runner, once per model, and timed interleaved with our own repeats so both
see the same machine state (clocks, caches, noisy neighbours).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from llamactl import dtypes
from llamactl.config import ModelArgs
from llamactl.model import Transformer


class HFTwin:
    """LlamaForCausalLM sharing our weights (q/k permuted copies, everything else shared)."""

    def __init__(self, model: Transformer, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> None:
        try:
            import transformers
            from transformers import LlamaConfig, LlamaForCausalLM
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        except ImportError:
            from llamactl.errors import MissingDependencyError

            raise MissingDependencyError(
                "comparing with transformers: transformers is not installed (pip install transformers)"
            ) from None
        from llamactl.config import hf_config_from_args
        from llamactl.layout import meta_to_hf, rotary_heads
        from llamactl.rotary import permute_for_hf

        transformers.logging.set_verbosity_error()
        config = LlamaConfig(**hf_config_from_args(args, dtypes.lookup(dtype).hf))
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            hf = LlamaForCausalLM(config)
        state = {}
        for name, tensor in model.state_dict().items():
            # Meta's RoPE rotates adjacent pairs of wq/wk rows, transformers' the two halves.
            heads = rotary_heads(name, args)
            hf_name = meta_to_hf(name)
            if hf_name is not None:
                state[hf_name] = permute_for_hf(tensor, heads).contiguous() if heads else tensor
        hf.load_state_dict(state, strict=True, assign=True)
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(device)  # meta construction left it empty
        hf.generation_config = transformers.GenerationConfig(
            do_sample=False, eos_token_id=None, pad_token_id=0, bos_token_id=None
        )
        self.model = hf.eval()
        self.config = config
        self.device = device

    def prefill(self, tokens: torch.Tensor) -> None:
        """One forward pass over tokens [batch, n_prompt], filling a fresh cache (last logits only, as ours)."""
        self.model(input_ids=tokens, use_cache=True, logits_to_keep=1)

    def filled_cache(self, batch: int, depth: int, dtype: torch.dtype, generator: torch.Generator) -> Any:
        """A DynamicCache already holding `depth` random positions in every layer."""
        from transformers import DynamicCache

        cfg = self.config
        cache = DynamicCache(config=cfg)
        shape = (batch, cfg.num_key_value_heads, depth, cfg.head_dim)
        kv = torch.randn(shape, dtype=dtype, device=self.device, generator=generator)
        for i in range(cfg.num_hidden_layers):
            cache.update(kv, kv, i)  # update copies, so one random tensor serves every layer
        return cache

    def generate(self, ids: torch.Tensor, cache: Any, n_gen: int) -> None:
        """Greedy decode of n_gen tokens after ids [batch, depth + 1], of which `cache` holds depth."""
        with warnings.catch_warnings():  # 5.x renames past_key_values -> cache; both work
            warnings.simplefilter("ignore", FutureWarning)
            self._generate(ids, cache, n_gen)

    def _generate(self, ids: torch.Tensor, cache: Any, n_gen: int) -> None:
        self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=n_gen,
            min_new_tokens=n_gen,
            do_sample=False,
        )
