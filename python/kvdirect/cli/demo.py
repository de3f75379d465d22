"""`kvdirect demo`: two serving instances share one KV pool; TTFT with and without kvdirect.

The command line only: the experiments live in ``kvdirect.demo`` (``own``: the
reference engine, ``sglang``: real SGLang servers; ``report``: their outputs).
"""
from __future__ import annotations

import argparse
import sys

from kvdirect.cli import _args as A
from kvdirect.demo import OWN_MODES as MODES
from kvdirect.demo import SGLANG_MODES, SGLANG_TRANSFER_MODEL, SMALL_MODEL, TRANSFER_MODEL, TRANSFER_PROMPT_LEN

#: ``--model-size``: ModelSpec fields over the default shape
MODEL_SIZES = {"default": {}, "small": SMALL_MODEL, "transfer": TRANSFER_MODEL}

# modes of `--engine sglang` only
SGLANG_ONLY_MODES = tuple(m for m in SGLANG_MODES if m not in MODES)


def reuse_levels(text: str) -> tuple:
    """'0,0.5,1' or '0,50%,100%' -> (0.0, 0.5, 1.0); each level in [0, 1]."""
    vals = []
    for part in text.replace(",", " ").split():
        try:
            v = float(part.rstrip("%"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number: use fractions or percents, "
                                             "e.g. 0,0.5,1 or 0,50%,100%") from None
        v = v / 100 if part.endswith("%") or v > 1 else v
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"reuse level {part!r} is outside 0..100%")
        vals.append(v)
    if not vals:
        raise argparse.ArgumentTypeError("give at least one reuse level")
    return tuple(vals)


def modes(text: str) -> tuple:
    ms = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in ms if m not in MODES + SGLANG_ONLY_MODES]
    if bad or "baseline" not in ms:
        raise argparse.ArgumentTypeError(f"modes are a comma list of {', '.join(MODES)} (--engine sglang also "
                                         f"{', '.join(SGLANG_ONLY_MODES)}) that includes baseline, got {text!r}")
    return ms


def prompt_len(args) -> int:
    """--prompt-len, or the model size's own default (3584; 1024 for the transfer-bound shape)."""
    if args.prompt_len is not None:
        return args.prompt_len
    return TRANSFER_PROMPT_LEN if args.model_size == "transfer" else 3584


def run(args) -> int:
    import importlib.util

    from kvdirect.errors import ConfigError

    if args.engine == "sglang":
        return run_sglang(args)
    args.modes = args.modes or MODES
    own_only = [m for m in args.modes if m not in MODES]
    if own_only:
        raise ConfigError(f"--modes {','.join(own_only)} exist only with --engine sglang; "
                          f"the own engine runs {', '.join(MODES)}")
    store = args.store
    if store and "kvdirect" in args.modes:
        A.open_user_store(store).close()  # a bad or unreachable store fails here, before the model is built
        store = A.existing_pool_url(store)
    try:
        from kvdirect.demo.own import DemoConfig, plot, render_table, run_demo
        from kvdirect.engine.model import ModelSpec
    except ImportError as e:
        raise ConfigError(f"kvdirect demo needs torch and transformers ({e}); install them with "
                          "`pip install 'kvdirect[demo]'`") from None
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("--plot needs matplotlib: pip install 'kvdirect[demo]'")
    spec_kw = MODEL_SIZES[args.model_size]
    cfg = DemoConfig(prompts=args.prompts, prompt_len=prompt_len(args), reuse=args.reuse,
                     output_len=args.output_len, page_size=args.page_size, store_url=store,
                     device=args.device, modes=args.modes, seed=args.seed, spec=ModelSpec(**spec_kw))
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu")
    result = run_demo(cfg, progress=not args.quiet)
    m = result["machine"]
    print(f"\nmachine: {m.get('gpu') or m['cpu']}, {m['cores']} cores, device {m['device']}, "
          f"torch {m.get('torch')}, transformers {m.get('transformers')}")
    print(f"workload: {cfg.prompts} prompts x {cfg.prompt_len} tokens per reuse level, output {cfg.output_len}, "
          f"page {cfg.page_size}, store {result['config']['store_url'] or '-'}\n")
    print(render_table(result))
    print("\nTTFT change = mean TTFT / baseline mean TTFT - 1 (negative: faster); kvdirect vs ideal = "
          "kvdirect / ideal - 1 (ideal: the prefix already on the device, no transfer)")
    ref = result["reference"]["ttft_change"]
    print(f"reference (SGLang PR #14056, Qwen3-32B): TTFT change {100 * ref['1.0']:+.1f}% at 100% reuse, "
          f"{100 * ref['0.5']:+.1f}% at 50%")
    return write_result(args, result, plot, "cached outputs differ from the uncached ones")


def run_sglang(args) -> int:
    """``--engine sglang``: real SGLang servers (``kvdirect.demo.sglang``)."""
    from kvdirect.demo.sglang import SGLangDemoConfig, plot, render_table, run_demo
    from kvdirect.errors import ConfigError

    if args.device != "cpu":
        raise ConfigError("--engine sglang runs SGLang on the CPU only (--device cpu)")
    if args.store:
        raise ConfigError("--engine sglang makes its own pools (shm, and one Mooncake master for every "
                          "Mooncake mode); drop --store")
    spec = dict(SGLANG_TRANSFER_MODEL if args.model_size == "transfer" else MODEL_SIZES[args.model_size])
    try:
        cfg = SGLangDemoConfig(prompts=args.prompts, prompt_len=prompt_len(args), reuse=tuple(args.reuse),
                               output_len=args.output_len, page_size=args.page_size,
                               modes=tuple(args.modes or SGLANG_MODES), seed=args.seed,
                               spec=spec, sglang_env=getattr(args, "sglang_env", None),
                               attention=args.sglang_attention)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    result = run_demo(cfg, progress=not args.quiet)
    m = result["machine"]
    print(f"\nmachine: {m.get('cpu')}, {m['cores']} cores; SGLang 0.5.23, attention {result['attention']}, "
          f"page {cfg.page_size}")
    print(f"workload: {cfg.prompts} prompts x {cfg.prompt_len} tokens per reuse level, output {cfg.output_len}; "
          f"TTFT of the second server's first request (p50)\n")
    print(render_table(result))
    return write_result(args, result, plot, "outputs differ between modes")


def write_result(args, result: dict, plot, differ: str) -> int:
    """``--json`` / ``--plot`` outputs of either engine's demo; exit 1 when outputs differ."""
    from kvdirect.demo.report import write_outputs

    for path in write_outputs(result, json_path=args.json, plot_path=args.plot, plot=plot):
        print(f"wrote {path}")
    if not result["outputs_identical"]:
        print(f"{args.prog}: error: {differ}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="two instances share one KV pool: TTFT with and without kvdirect",
                       description=__doc__)
    p.add_argument("--engine", default="own", choices=["own", "sglang"],
                   help="own: kvdirect's small reference engine (default); sglang: real SGLang 0.5.23 servers "
                        "on CPU: kvdirect's radix backend and linker vs SGLang's cache, its Mooncake linker and "
                        "HiCache, in one phase (run from a clone; builds the ~6 GB SGLang environment with "
                        "scripts/sglang-env.sh on first use)")
    p.add_argument("--prompts", type=A.positive_int, default=12, help="prompts per reuse level (default 12)")
    p.add_argument("--prompt-len", type=A.positive_int, default=None,
                   help="tokens per prompt, at least two pages (default 3584; 1024 with --model-size transfer)")
    p.add_argument("--reuse", type=reuse_levels, default=(0.0, 0.5, 1.0),
                   help="prefix reuse levels, fractions or percents (default 0,0.5,1)")
    p.add_argument("--output-len", type=A.positive_int, default=4, help="greedy tokens per request (default 4)")
    p.add_argument("--page-size", type=A.positive_int, default=64, help="tokens per KV page (default 64)")
    p.add_argument("--store", type=A.store_url, default=None, metavar="URL",
                   help="KV pool URL; an shm:// pool must exist unless the URL says create=... "
                        "(default: an embedded shm pool made for this run and removed after it)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--modes", type=modes, default=None,
                   help="comma list of baseline, ideal, kvdirect (default: all three); --engine sglang "
                        f"also {', '.join(SGLANG_ONLY_MODES)} (default: all)")
    p.add_argument("--model-size", default="default", choices=sorted(MODEL_SIZES),
                   help="'small': a tiny model for quick checks; 'transfer': KV large relative to compute "
                        "(32 layers, 32 KV heads of 128, hidden 256: 0.5 GiB of KV per 1024-token prompt)")
    p.add_argument("--sglang-attention", default="prefix", choices=["prefix", "torch_native"],
                   help="--engine sglang: 'prefix' (default): every server loads the benchmark-only patch "
                        "bench/sglang_demo_patches/prefix_attention.py, attention for the new tokens only (SGLang's "
                        "torch_native also computes the cached prefix's rows, a floor that hides every load); "
                        "'torch_native': SGLang as shipped")
    p.add_argument("--seed", type=A.non_negative_int, default=0)
    p.add_argument("--json", type=A.output_file, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", type=A.output_file, metavar="PATH", help="write a PNG chart")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run, prog=p.prog)
