"""Small local models with seeded random weights (Llama; one DeepSeek-V2-shaped MLA model), for vLLM
tests and benchmarks.

Nothing comes from a model hub: the config, a word-level tokenizer over the
vocabulary ``t0 .. tN`` and the weights (the model's own initialiser under a
fixed seed) are built here and saved with ``save_pretrained`` into
``$KVDIRECT_VLLM_MODELS`` (default ``~/.cache/kvdirect/vllm-models``)/<name>-<recipe digest>.
A model is built once per recipe; a folder without its ``.complete`` marker is
rebuilt. Run inside the vLLM environment (needs torch, transformers, tokenizers):

    python tests/vllm/make_model.py --all        # build every recipe, print their paths
    python tests/vllm/make_model.py tiny         # print the path of one (building it if needed)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

# name -> LlamaConfig fields. "tiny": the engine tests (fast prefill, 2 layers).
# "bench": the benchmark's compute-bound shape, >= 2000-token prompts in about a second of cold prefill.
# "transfer": the benchmark's transfer-bound shape: KV large relative to compute (32 layers x 16 KV heads x
# head 128 over a 256-wide hidden state): 512 KiB of fp32 KV per token, 0.5 GiB per 1024-token prompt.
RECIPES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=2048, max_position_embeddings=8192),
    "bench": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=2048, vocab_size=8192, max_position_embeddings=8192),
    "transfer": dict(hidden_size=256, num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=16,
                     head_dim=128, intermediate_size=512, vocab_size=2048, max_position_embeddings=4096),
    # "mla": DeepSeek-V2-shaped (MLA attention), for the MLA engine tests (test_mla.py). vLLM's CPU MLA
    # backend (CPU_MLA) only runs a 576-wide latent (kv_lora_rank 512 + rope 64, as DeepSeek-V2/V3) in
    # blocks of 16; the rest is tiny: 4 heads (2 per rank at TP=2), no query compression (as
    # DeepSeek-V2-Lite), dense MLPs in both layers (first_k_dense_replace; transformers still wants a
    # routed-expert count), DeepSeek's YaRN rope scaling with its mscale settings.
    "mla": dict(arch="deepseek_v2", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=256, vocab_size=2048, max_position_embeddings=8192,
                kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
                moe_intermediate_size=64,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                 "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 0.707, "mscale_all_dim": 0.707}),
}
SEED = 0
FORMAT = 1  # bump when the way a model is written changes


def models_dir() -> Path:
    return Path(os.environ.get("KVDIRECT_VLLM_MODELS") or Path.home() / ".cache/kvdirect/vllm-models")


def model_path(name: str) -> Path:
    recipe = RECIPES[name]
    digest = hashlib.sha256(json.dumps([FORMAT, SEED, recipe], sort_keys=True).encode()).hexdigest()[:10]
    return models_dir() / f"{name}-{digest}"


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def build(name: str) -> Path:
    path = model_path(name)
    if (path / ".complete").exists():
        return path
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, LlamaConfig, LlamaForCausalLM

    shutil.rmtree(path, ignore_errors=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    recipe = RECIPES[name]
    fields = {k: v for k, v in recipe.items() if k != "arch"}
    if recipe.get("arch") == "deepseek_v2":
        cfg = DeepseekV2Config(**fields, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                               rms_norm_eps=1e-5, torch_dtype="float32")
        model_cls = DeepseekV2ForCausalLM
    else:
        cfg = LlamaConfig(**fields, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                          rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float32")
        model_cls = LlamaForCausalLM
    torch.manual_seed(SEED)
    model = model_cls(cfg).eval()
    model.save_pretrained(tmp, safe_serialization=True)
    _tokenizer(recipe["vocab_size"]).save_pretrained(tmp)
    (tmp / "kvdirect-recipe.json").write_text(json.dumps({"name": name, "seed": SEED, **recipe}, indent=1))
    (tmp / ".complete").touch()
    tmp.rename(path)
    return path


def main(argv: list[str]) -> int:
    names = list(RECIPES) if argv == ["--all"] else argv
    unknown = [n for n in names if n not in RECIPES]
    if not names or unknown:
        print(f"usage: make_model.py --all | NAME... (known: {', '.join(RECIPES)})", file=sys.stderr)
        return 2
    for n in names:
        print(build(n))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
