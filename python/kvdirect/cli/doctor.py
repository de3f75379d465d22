"""`kvdirect doctor`: what this installation was built with and what it can see.

Exit status 1 when a store client that is installed cannot be used (a system library
missing, a broken install): the report is printed as usual and one line on stderr
names what is broken. A client that is not installed is no error (exit 0).
"""
from __future__ import annotations

import json
import platform
import sys


def collect() -> dict:
    from kvdirect import __version__, runtime
    from kvdirect._core import build_info

    info = dict(build_info)
    cuda, npu = runtime.cuda_devices(), runtime.npu_devices()
    return {
        "version": __version__,
        "core_version": info.pop("version"),
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "build": info,
        "backends_built": [b for b in ("cpu", "cuda", "ascend") if info.get(b)],
        "devices": {"cuda": vars(cuda), "npu": vars(npu)},
        "stores": {
            "shm": {"available": True, "detail": "embedded (built in)", "state": "ok"},
            "mooncake": _store("mooncake.store"),
            "memcache": _store("memcache_hybrid"),
        },
    }


#: client_import states of a client that is installed but cannot be used
BROKEN = ("missing_library", "broken")


def _store(module: str) -> dict:
    from kvdirect import runtime

    ci = runtime.client_import(module)
    ok = ci.state == "ok"
    return {"available": ok, "detail": ci.message if ok else f"not importable: {ci.message}", "state": ci.state}


def problems(d: dict) -> list[str]:
    """Installed store clients that cannot be used, one phrase each."""
    return [f"{name} ({v['detail'].removeprefix('not importable: ')})" for name, v in d["stores"].items()
            if v.get("state") in BROKEN]


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def render(d: dict) -> str:
    b = d["build"]
    lines = [
        f"kvdirect {d['version']}  (core {d['core_version']}, Python {d['python']}, {d['platform']})",
        "build:",
        f"  compiler      {b['compiler']}  [{b['build_type']}]",
        f"  flags         {b['cxx_flags']}",
    ]
    if b.get("sanitize"):
        lines.append(f"  sanitizers    {b['sanitize']}")
    lines += [
        f"  backends      {', '.join(d['backends_built'])}",
        f"  cuda kernels  {_yn(b['cuda'])}" + (f"  ({b['cuda_compiler']}, sm {b['cuda_archs']})" if b["cuda"] else f"  ({b['cuda_reason']})"),
        f"  ascend        {_yn(b['ascend'])}" + (f"  (CANN {b['cann_version']})" if b["ascend"] else "  (no CANN toolkit at build time)"),
        "devices:",
    ]
    for k, v in d["devices"].items():
        lines.append(f"  {k:<13} {_yn(v['available'])}  {v['detail']}")
    lines.append("stores:")
    for k, v in d["stores"].items():
        lines.append(f"  {k:<13} {_yn(v['available'])}  {v['detail']}")
    return "\n".join(lines)


def run(args) -> int:
    d = collect()
    bad = problems(d)
    d["problems"] = bad
    print(json.dumps(d, indent=2) if args.json else render(d))
    if bad:
        print(f"{args.prog}: error: installed store client cannot be used: {'; '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="show build flags, backends, devices and store clients")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run, prog=p.prog)
