"""A Hugging Face Qwen2 model built from a config with seeded random weights.

No downloads: the config object is built here and the weights come from the
model's own initialiser under a fixed seed, so two processes that call
``build_model(spec)`` get bit-identical weights (checked by ``weights_digest``).
The numbers the model produces are meaningless; what matters for kvdirect is
that it is a real transformer whose KV cache has the shape and numerics of one.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import asdict, dataclass

from kvdirect.errors import ConfigError

# The demo's default shape: a 3.5k-token prefill takes about a second in fp32
# on a 2-core AMD EPYC (see the README's demo section for the measured figure).
DEFAULT_SPEC = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                    num_key_value_heads=2, intermediate_size=4096, vocab_size=8192)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the model's weights and numerics."""

    hidden_size: int = DEFAULT_SPEC["hidden_size"]
    num_hidden_layers: int = DEFAULT_SPEC["num_hidden_layers"]
    num_attention_heads: int = DEFAULT_SPEC["num_attention_heads"]
    num_key_value_heads: int = DEFAULT_SPEC["num_key_value_heads"]
    intermediate_size: int = DEFAULT_SPEC["intermediate_size"]
    vocab_size: int = DEFAULT_SPEC["vocab_size"]
    max_position_embeddings: int = 32768
    dtype: str = "float32"
    # one attention implementation in every mode, so baseline, ideal and
    # kvdirect differ only in where the prefix KV came from
    attn_implementation: str = "sdpa"
    seed: int = 0
    #: attention head size when it is not hidden_size / num_attention_heads (a model whose KV
    #: is wide relative to its hidden size: the demo's transfer-bound shape)
    explicit_head_dim: int | None = None
    #: "qwen2" (Qwen2ForCausalLM) or "llama" (LlamaForCausalLM: no q/k/v bias). SGLang 0.5.23's
    #: Qwen2 on CPU sizes its heads as hidden_size / num_attention_heads whatever the config's
    #: head_dim says (it marks every CPU config with original_num_attention_heads), while its KV
    #: pool uses head_dim; its Llama reads head_dim, so the SGLang demo's wide-head shape is a Llama.
    arch: str = "qwen2"

    def __post_init__(self):
        if self.arch not in ("qwen2", "llama"):
            raise ConfigError(f"arch must be 'qwen2' or 'llama', got {self.arch!r}")
        if self.explicit_head_dim is not None and (isinstance(self.explicit_head_dim, bool) or
                                                   not isinstance(self.explicit_head_dim, int) or
                                                   self.explicit_head_dim < 1):
            raise ConfigError(f"explicit_head_dim must be a positive integer, got {self.explicit_head_dim!r}")
        if self.explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    def kv_bytes_per_token(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    def to_dict(self) -> dict:
        return asdict(self)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def build_model(spec: ModelSpec, device: str = "cpu"):
    """A Qwen2ForCausalLM (or, ``arch="llama"``, a LlamaForCausalLM) in eval mode with seeded
    random weights, on ``device``."""
    import torch
    import transformers

    Config, Model = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if spec.arch == "qwen2" else
                     (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        **({"use_sliding_window": False} if spec.arch == "qwen2" else {}),
        **({"head_dim": spec.explicit_head_dim} if spec.explicit_head_dim else {}),
    )
    cfg._attn_implementation = spec.attn_implementation
    # The initialiser draws from torch's global generator: seed it, build on
    # CPU (same numbers on every machine), then move.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = Model(cfg)
    finally:
        torch.random.set_rng_state(state)
    model = model.to(dtype=torch_dtype(spec.dtype), device=device).eval()
    model.requires_grad_(False)
    return model


def weights_digest(model) -> str:
    """SHA-256 over every parameter's bytes: equal digests = identical models."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ForwardAdapter:
    """Calls the model the same way across transformers versions.

    transformers 5.x names the KV argument ``cache`` (``past_key_values`` is
    deprecated); 4.x uses ``past_key_values``. ``logits_to_keep`` (older:
    ``num_logits_to_keep``) keeps the LM head to the last position.
    """

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def __call__(self, input_ids, position_ids, cache):
        kw = {self.cache_kw: cache, "position_ids": position_ids, "use_cache": True}
        if self.keep_kw:
            kw[self.keep_kw] = 1
        out = self.model(input_ids=input_ids, **kw)
        return out.logits[:, -1, :]
