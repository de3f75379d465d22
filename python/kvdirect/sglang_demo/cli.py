"""``kvdirect demo --engine sglang``: argument handling and output (see demo.py)."""
from __future__ import annotations

import json
import sys

OWN_DEFAULT_MODES = "baseline,ideal,kvdirect"


def run(args, reuse: list[float]) -> int:
    from kvdirect.errors import KVDirectError
    from kvdirect.sglang_demo.demo import MODES, SGLangDemoConfig, plot, render_table, run_demo

    if args.device != "cpu":
        print("kvdirect demo --engine sglang: runs SGLang on the CPU only (--device cpu)", file=sys.stderr)
        return 2
    if args.store:
        print("kvdirect demo --engine sglang: --store is not used (an embedded shm pool is made for the run)",
              file=sys.stderr)
        return 2
    modes = MODES if args.modes == OWN_DEFAULT_MODES else tuple(args.modes.split(","))
    spec = {}
    if args.model_size == "small":
        spec = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=512)
    try:
        cfg = SGLangDemoConfig(prompts=args.prompts, prompt_len=args.prompt_len, reuse=tuple(reuse),
                               output_len=args.output_len, page_size=args.page_size, modes=modes, seed=args.seed,
                               spec=spec, sglang_env=getattr(args, "sglang_env", None))
        result = run_demo(cfg, progress=not args.quiet)
    except (KVDirectError, ValueError) as e:
        print(f"kvdirect demo --engine sglang: {e}", file=sys.stderr)
        return 2
    m = result["machine"]
    print(f"\nmachine: {m.get('cpu')}, {m['cores']} cores; SGLang 0.5.23, --attention-backend torch_native, "
          f"page {cfg.page_size}")
    print(f"workload: {cfg.prompts} prompts x {cfg.prompt_len} tokens per reuse level, output {cfg.output_len}; "
          f"TTFT of the second server's first request (p50)\n")
    print(render_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if not result["outputs_identical"]:
        print("ERROR: outputs differ between modes", file=sys.stderr)
        return 1
    return 0
