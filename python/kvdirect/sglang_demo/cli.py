"""``kvdirect demo --engine sglang``: argument handling and output (see demo.py)."""
from __future__ import annotations


def run(args) -> int:
    """Parsed ``kvdirect demo`` arguments (already validated by cli/demo.py) -> exit code."""
    from kvdirect.cli.demo import SMALL_MODEL, write_result
    from kvdirect.errors import ConfigError
    from kvdirect.sglang_demo.demo import MODES, SGLangDemoConfig, plot, render_table, run_demo

    if args.device != "cpu":
        raise ConfigError("--engine sglang runs SGLang on the CPU only (--device cpu)")
    if args.store:
        raise ConfigError("--engine sglang makes its own pools (shm, and a Mooncake master for HiCache); "
                          "drop --store")
    spec = dict(SMALL_MODEL) if args.model_size == "small" else {}
    try:
        cfg = SGLangDemoConfig(prompts=args.prompts, prompt_len=args.prompt_len, reuse=tuple(args.reuse),
                               output_len=args.output_len, page_size=args.page_size,
                               modes=tuple(args.modes or MODES), seed=args.seed,
                               spec=spec, sglang_env=getattr(args, "sglang_env", None))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    result = run_demo(cfg, progress=not args.quiet)
    m = result["machine"]
    print(f"\nmachine: {m.get('cpu')}, {m['cores']} cores; SGLang 0.5.23, --attention-backend torch_native, "
          f"page {cfg.page_size}")
    print(f"workload: {cfg.prompts} prompts x {cfg.prompt_len} tokens per reuse level, output {cfg.output_len}; "
          f"TTFT of the second server's first request (p50)\n")
    print(render_table(result))
    return write_result(args, result, plot, "outputs differ between modes")
