"""A tiny DeepSeek-V2-shaped model (MLA attention), written locally with seeded weights.

Shape: MLA with a 64-wide compressed KV latent and a 16-wide decoupled rope part (SGLang
keeps one ``[tokens, 1, 64 + 16]`` buffer per layer: ``MLATokenToKVPool``), 4 attention
heads (2 per rank at ``--tp-size 2``), no query compression (as DeepSeek-V2-Lite), YaRN
rope scaling with DeepSeek's ``mscale`` settings (SGLang's CPU rotary embedding accepts
DeepSeek's YaRN, not plain rope), and dense MLPs in every layer through
``first_k_dense_replace`` (transformers needs a routed-expert count even then).
``eos_token_id`` is None, so requests run to ``max_new_tokens``. The tokenizer is a
word-level one over ``w0 .. w2047`` (requests send token ids).
"""
from __future__ import annotations

import json
from pathlib import Path

LAYERS = 2
MLA_CONFIG = dict(
    vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    first_k_dense_replace=LAYERS, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
    moe_intermediate_size=64, moe_layer_freq=1, max_position_embeddings=8192,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 0.707, "mscale_all_dim": 0.707},
)


def write_mla_model(path, seed: int = 0) -> str:
    """Write the model and its tokenizer to ``path`` (idempotent); returns the path."""
    path = Path(path)
    marker = path / "kvdirect-mla-model.json"
    recipe = {"config": MLA_CONFIG, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        return str(path)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    cfg = DeepseekV2Config(**MLA_CONFIG, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                           tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(path, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(MLA_CONFIG["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0",
                            model_max_length=MLA_CONFIG["max_position_embeddings"]).save_pretrained(path)
    marker.write_text(json.dumps(recipe))
    return str(path)


def hf_greedy(path, prompts, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations by Hugging Face transformers (fp32, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.as_tensor([list(map(int, ids))])
            y = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
            out.append(y[0, x.shape[1]:].tolist())
    return out
