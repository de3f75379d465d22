"""A small local model folder that a real SGLang server can load (no hub).

``write_model(path, spec)`` saves a Qwen2 model with seeded random weights
(:func:`kvdirect.engine.model.build_model`) and a word-level tokenizer whose
vocabulary is ``w0 .. w{vocab-1}``, both with ``save_pretrained``. Requests
send token ids (``input_ids``), so the tokenizer only has to load and decode.
Used by the real-server tests (tests/e2e_sglang/) and ``kvdirect demo --engine
sglang``; it needs torch, transformers and tokenizers.
"""
from __future__ import annotations

import json
from pathlib import Path

from kvdirect.engine.model import ModelSpec, build_model, weights_digest

# The real-server tests' shape: a few MB, prefill of 1k tokens in ~0.1 s on 2 cores.
TEST_SPEC = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=2048, max_position_embeddings=8192)


def write_model(path, spec: ModelSpec) -> str:
    """Write the model and tokenizer to ``path`` (created); returns the weights digest.
    Idempotent: a folder already holding this spec's model is left as it is."""
    path = Path(path)
    marker = path / "kvdirect-model.json"
    if marker.exists():
        meta = json.loads(marker.read_text())
        if meta.get("spec") == spec.to_dict():
            return meta["weights_digest"]
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    model.config.eos_token_id = None  # requests run to max_new_tokens
    model.config.bos_token_id = None
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(path, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(spec.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", model_max_length=spec.max_position_embeddings
                            ).save_pretrained(path)
    digest = weights_digest(model)
    marker.write_text(json.dumps({"spec": spec.to_dict(), "weights_digest": digest}, indent=1))
    return digest


def main(argv=None) -> int:
    """``python -m kvdirect.demo.sglang_cpu.model DIR [--seed N] [--spec JSON]``: write a model folder."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec", default=None, help="JSON of ModelSpec fields (default: the tests' shape)")
    a = p.parse_args(argv)
    fields = dict(TEST_SPEC, **(json.loads(a.spec) if a.spec else {}))
    print(write_model(a.path, ModelSpec(**fields, seed=a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
