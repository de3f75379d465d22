"""`kvdirect demo`: two serving instances share one KV pool; TTFT with and without kvdirect."""
from __future__ import annotations

import json
import sys


def _floats(text: str) -> list[float]:
    vals = []
    for part in text.replace(",", " ").split():
        v = float(part.rstrip("%"))
        vals.append(v / 100 if part.endswith("%") or v > 1 else v)
    return vals


def run(args) -> int:
    from kvdirect.errors import KVDirectError

    if args.engine == "sglang":  # real SGLang servers: kvdirect/sglang_demo
        from kvdirect.sglang_demo.cli import run as run_sglang

        return run_sglang(args, _floats(args.reuse))

    try:
        from kvdirect.demo import DemoConfig, plot, render_table, run_demo
        from kvdirect.engine.model import ModelSpec
    except ImportError as e:
        print(f"kvdirect demo needs torch and transformers ({e}); install them with "
              "`pip install 'kvdirect[demo]'`", file=sys.stderr)
        return 2
    spec_kw = {}
    if args.model_size == "small":
        spec_kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=512)
    try:
        cfg = DemoConfig(prompts=args.prompts, prompt_len=args.prompt_len, reuse=tuple(_floats(args.reuse)),
                         output_len=args.output_len, page_size=args.page_size, store_url=args.store,
                         device=args.device, modes=tuple(args.modes.split(",")), seed=args.seed,
                         spec=ModelSpec(**spec_kw))
        if cfg.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("--device cuda: torch sees no CUDA device here; use --device cpu", file=sys.stderr)
                return 2
        result = run_demo(cfg, progress=not args.quiet)
    except (KVDirectError, ValueError) as e:
        print(f"kvdirect demo: {e}", file=sys.stderr)
        return 2
    m = result["machine"]
    print(f"\nmachine: {m.get('gpu') or m['cpu']}, {m['cores']} cores, device {m['device']}, "
          f"torch {m.get('torch')}, transformers {m.get('transformers')}")
    print(f"workload: {cfg.prompts} prompts x {cfg.prompt_len} tokens per reuse level, output {cfg.output_len}, "
          f"page {cfg.page_size}, store {result['config']['store_url'] or '-'}\n")
    print(render_table(result))
    print("\nreference (SGLang PR #14056, Qwen3-32B): -93.5% TTFT at 100% reuse, -46.6% at 50%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if not result["outputs_identical"]:
        print("ERROR: cached outputs differ from the uncached ones", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="two instances share one KV pool: TTFT with and without kvdirect",
                       description=__doc__)
    p.add_argument("--engine", default="own", choices=["own", "sglang"],
                   help="own: kvdirect's small reference engine (default); sglang: real SGLang 0.5.23 servers "
                        "on CPU vs SGLang's cache and HiCache (run from a clone; builds the ~6 GB SGLang "
                        "environment with scripts/sglang-env.sh on first use)")
    p.add_argument("--prompts", type=int, default=12, help="prompts per reuse level (default 12)")
    p.add_argument("--prompt-len", type=int, default=3584, help="tokens per prompt (default 3584)")
    p.add_argument("--reuse", default="0,0.5,1", help="prefix reuse levels, fractions or percents (default 0,0.5,1)")
    p.add_argument("--output-len", type=int, default=4, help="greedy tokens per request (default 4)")
    p.add_argument("--page-size", type=int, default=64, help="tokens per KV page (default 64)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="KV pool URL (default: an embedded shm pool made for this run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", default="baseline,ideal,kvdirect",
                   help="comma list of baseline, ideal, kvdirect (default: all three)")
    p.add_argument("--model-size", default="default", choices=["default", "small"],
                   help="'small' is a tiny model for quick checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
