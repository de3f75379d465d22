#!/usr/bin/env python3
"""Write docs/reliability.md from a run of the reliability suite.

    python scripts/reliability_report.py                  # run tests/reliability, write the doc
    python scripts/reliability_report.py --sanitize       # also run scripts/sanitize.sh (minutes)
    python scripts/reliability_report.py --render    # re-render from the stored figures, no run

Every figure comes from the run (each scenario's ``report(...)`` line, see
``tests/reliability/_rel.py``) and is kept in docs/reliability-figures.jsonl
(the first line describes the run: summary, machine, versions, sanitizer
result); the bad-input section is generated from the tables in
``tests/reliability/test_bad_input.py``; the prose around them is the
template below. ``tests/reliability/test_reliability_doc.py`` checks that the
doc is exactly what this script renders from the stored figures and the
current tables, so edit this script, not the doc.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
FIGURES = ROOT / "docs" / "reliability-figures.jsonl"
REL = ROOT / "tests" / "reliability"

# ---- figures -> table rows ------------------------------------------------------------------


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _kv(d: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in d.items())


FAULTS = OrderedDict([
    ("mooncake_master_sigkill", lambda f: (
        "`mooncake_master` SIGKILLed mid-run (write-backs in flight), restarted on the same ports",
        f"{_n(f['requests_served'])} ({_n(f['outage_requests'])} during the {f['outage_seconds']} s outage)",
        f["wrong_kv_bytes"], f"{f['data_lost']} of {_n(f['pages_checked'])} pages",
        f"outage: {_n(f['outage_recomputed_tokens'])} tokens recomputed, {_n(f['outage_loaded_tokens'])} loaded; "
        f"{_n(f['load_failed_pages'])} pages failed to load in all (the index believed them in the pool; "
        f"NOT_FOUND after the restart, UNAVAILABLE/TIMEOUT during it) and were recomputed; write-backs resumed "
        f"{f['seconds_to_resume']} s after the restart ({_n(f['stored_pages_after_restart'])} pages stored, "
        f"{_n(f['loaded_pages_after_restart'])} loaded); {_n(f['pages_gone_with_master'])} pages stored before "
        f"the kill went with the old master (a fresh master starts empty; not counted as lost); "
        f"{_n(f['allocation_stalls'])} allocation stalls (pages "
        f"pinned by timed-out puts until the client went quiet); store failures: {_kv(f['store_failures'])}")),
    ("shm_sigkill", lambda f: (
        "shm pool: processes SIGKILLed at random points, and at each critical point (holding the lock, "
        "mid-allocation, mid-put copy, mid-get copy)",
        f"{_n(f['survivor_ops'])} ops by the surviving processes", f"{f['wrong_objects_read']} wrong objects read",
        f"{f['data_lost']} of {_n(f['objects_checked'])} objects",
        f"{f['kills']} kills ({_kv(f['kills_by_point'])}); {f['recoveries']} lock recoveries, "
        f"{f['reaped_writes']} dead reservations and {f['reaped_pins']} dead pins reclaimed; "
        f"**{f['leaked_blocks_after_recovery']} blocks leaked** after recovery (whole pool refilled, then "
        f"emptied); {f['deadlocks']} deadlocks")),
    ("shm_full_with_pins", lambda f: (
        "shm pool full while 2 reader processes hold pins (layer-wise reads in progress)",
        f"{_n(f['puts_ok'])} puts OK, {_n(f['puts_no_space'])} NO_SPACE", f"{f['wrong_objects_read']} wrong "
        "objects read", f"{f['data_lost']} of {_n(f['objects_checked'])} objects",
        f"{_n(f['evictions'])} evictions; all {f['pinned_objects']} pinned objects survived and verified; "
        f"{f['pins_left']} pins left")),
    ("flaky_store_error", lambda f: (
        "store failing 25% of keys (FlakyStore, errors; failed gets scribble garbage into the destination) "
        "through KVDirectCache", _n(f["requests_served"]), f["wrong_kv_bytes"],
        f"{f['data_lost']} of {_n(f['pages_checked'])} pages", _flaky(f))),
    ("flaky_store_timeout", lambda f: (
        "same, timeouts (failed puts still land)", _n(f["requests_served"]), f["wrong_kv_bytes"],
        f"{f['data_lost']} of {_n(f['pages_checked'])} pages", _flaky(f))),
    ("memcache_init_failure", lambda f: (
        "MemCache client init fails (real MetaService, no Ascend driver/CANN)", _n(f["requests_served"]),
        f["wrong_kv_bytes"], f"{f['data_lost']} of {_n(f['pages_checked'])} pages (no pool: nothing stored)",
        f"`allow_no_store=False`: the error is `{f['error']}`")),
])


def _flaky(f) -> str:
    return (f"injected: {_kv(f['injected_failures'])} failures; {_n(f['loaded_pages'])} pages loaded, "
            f"{_n(f['load_failed_pages'])} failed loads recomputed; {_n(f['stored_pages'])} pages stored, "
            f"{_n(f['store_failed_pages'])} failed puts")


CONCURRENCY = OrderedDict([
    ("shm_n_procs_m_ops", lambda f: (
        f"{f['processes']} processes x {_n(f['ops_per_process'])} random ops (put of random sizes, batched "
        "scattered gets, get_bytes, exists, remove) on one 4 MiB shm pool (working set larger than the pool)",
        f"**{_n(f['ops_per_s'])} ops/s** total; {_n(f['gets_verified'])} gets verified against the embedded "
        f"key/version/size and content, {f['wrong_reads']} wrong; {_n(f['evictions'])} evictions; "
        f"{_n(f['objects_left_verified'])} objects left afterwards, every one verified")),
    ("cache_completion_path", lambda f: (
        f"KVDirectCache completion path: {f['writer_threads']} writer threads completing puts (2 ms each) while "
        "the scheduler thread matches, loads, writes back, evicts, polls, plus a thread scraping `stats()`",
        f"{_n(f['requests'])} requests, {_n(f['requests_per_s'])} req/s, {_n(f['stored_pages'])} pages stored, "
        f"{_n(f['loaded_pages'])} loaded, {f['wrong_kv_bytes']} wrong KV bytes; index invariants checked "
        "every 50 requests; afterwards nothing in flight, nothing protected")),
    ("engines_share_pool", lambda f: (
        f"{f['engines']} engine processes (each its own KVDirectCache + device pool) sharing one shm pool, "
        "same documents",
        f"{_n(f['requests_served'])} requests, {_n(f['loaded_pages'])} pages loaded (written by whichever engine "
        f"was first), {_n(f['stored_pages'])} stored, {f['wrong_kv_bytes']} wrong KV bytes")),
])

SECURITY_FIGURES = OrderedDict([
    ("tenant_isolation", lambda f: (
        f"Tenants: {f['tenants']} namespaces (`cache_salt`) including case, trailing-space and non-ASCII "
        f"variants and no namespace, serving the same {f['identical_documents']} documents: their pool keys "
        f"are pairwise disjoint, {f['cross_tenant_keys_asked']} store queries for another tenant's key (every "
        f"`exists`/`get` key recorded), {f['wrong_kv_bytes']} wrong KV bytes, no device or pool hit across "
        "tenants, and each tenant reused its own pages.")),
])

SCENARIOS = [*FAULTS, *CONCURRENCY, *SECURITY_FIGURES]

# ---- bad input: generated from the tables ------------------------------------------------------


def _bad_input_tables():
    for p in (str(ROOT / "tests"), str(REL)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import test_bad_input as t

    return t.CASES, t.FILE_CASES, t.CLI_CASES, t.cli_commands()


def bad_input_section() -> str:
    cases, files, cli, commands = _bad_input_tables()
    prefixes = sorted({c[:n] for c in commands for n in range(1, len(c) + 1)}, key=len, reverse=True)
    by_cmd: OrderedDict = OrderedDict()
    for name, args, _ in cli:
        cmd = next((c for c in prefixes if tuple(args[:len(c)]) == c), ())
        by_cmd.setdefault(" ".join(("`kvdirect",) + cmd) + "`", []).append(name)
    lines = [
        f"`tests/reliability/test_bad_input.py` holds a table of {len(cases) + len(files) + len(cli)} bad "
        f"inputs: {len(cases)} API calls, {len(files)} damaged pool files and {len(cli)} command lines. Each "
        "API case asserts the exception type and a message pattern; each command line runs as a real "
        "`python -m kvdirect` process and must exit with status 2 (1 where the named pool or service is not "
        "there) with exactly one line on stderr matching its "
        "pattern, nothing on stdout, no traceback, no pool created and no file written. After **every** "
        "case the suite checks that nothing was corrupted: the pool's sentinel objects read back byte for "
        "byte, no pin or reservation is left, the index passes its invariant check, and a request whose "
        "pages are evicted to the pool loads them back with 0 wrong bytes. A test also checks that every "
        "command `kvdirect --help` offers has cases in the table.",
        "",
        "| part | cases |",
        "|---|---|",
        f"| API ({len(cases)}) | {', '.join(c[0] for c in cases)} |",
        f"| damaged pool files ({len(files)}) | {', '.join(c[0] for c in files)} |",
    ]
    for cmd, names in by_cmd.items():
        short = [n.removeprefix("cli-") for n in names]
        lines.append(f"| {cmd} ({len(names)}) | {', '.join(short)} |")
    return "\n".join(lines)


# ---- the document ------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def render(figures: dict) -> str:
    """The doc from the figures of one run (``figures["_run"]`` describes the run)."""
    run = figures.get("_run", {})
    summary, machine, sanitize = run.get("summary", "?"), run.get("machine", "?"), run.get("sanitize")
    versions = run.get("versions", {})
    def table(spec, head):
        cols = head.count("|") - 1
        out = [head, "|" + "---|" * cols]
        for name, fmt in spec.items():
            cells = [str(c) for c in fmt(figures[name])] if name in figures else \
                [f"{name}: not run (skipped in this run)"] + [""] * (cols - 1)
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out)

    sec = [fmt(figures[n]) for n, fmt in SECURITY_FIGURES.items() if n in figures]
    took = f" in {run['duration_s']:.0f} s" if run.get("duration_s") is not None else ""
    return f"""# Reliability and security

What kvdirect guarantees when things go wrong, the suite that checks it
(`tests/reliability/`), and the figures it produced. This file is written by
`python scripts/reliability_report.py` from a run of the suite; edit the
script, not this file.

Run: {summary}{took}, at commit {run.get("commit", "(not recorded)")}.
Machine: {machine}.
Store clients: mooncake-transfer-engine-non-cuda {versions.get("mooncake", "?")},
memcache-hybrid {versions.get("memcache", "?")} (no Ascend runtime).
Figures are from one run each; counts are exact, rates depend on the machine
and its load.

## Reproduce

```bash
python scripts/reliability_report.py             # the suite at default sizes; rewrites this file
python scripts/reliability_report.py --sanitize  # plus the core under ASan + UBSan
CI=1 python -m pytest -q tests/reliability       # the CI sizes (smaller loops, derandomized hypothesis)
KVDIRECT_RELIABILITY_REPORT=figures.jsonl python -m pytest -q tests/reliability   # figures as JSON lines
KVDIRECT_SANITIZE=thread scripts/sanitize.sh tests/reliability/test_concurrency.py   # TSan
```

Every request in the fault and concurrency scenarios is served by an engine-like
driver (`tests/reliability/_rel.py`): match, lock, load pool pages straight into
device slots, "prefill" the rest, then **compare every KV byte of the whole
prompt on the device with the deterministic KV of those tokens** (KV depends only
on the token prefix), write back, unlock. `wrong KV bytes` counts any byte of a
device-cached or pool-loaded page that differs.

`data lost` is measured after each scenario by reading the pool back:

* scenarios through KVDirectCache: a wrapper around the store records every key
  whose put the store answered OK, i.e. every page the cache counts as stored
  (`_rel.StoredPages`). At the end each such page is read from the pool and
  compared with the KV of its tokens; **data lost = pages reported stored that are
  missing or differ** (`_rel.lost_pages`; a page the pool cannot deliver counts as
  missing). The pools are sized so that nothing is evicted (checked), so a missing
  page is a lost one. Pages the cache removes itself leave the record. Mooncake
  keeps objects in its clients and the master holds their metadata: pages stored
  before the master was killed are gone with it by design and are listed apart;
  every page stored after the restart is checked.
* raw-pool scenarios (processes killed mid-operation, a pool full under pins):
  every object left in the pool is read back and compared with what was put under
  its key, and the objects that must survive (pinned) must be there; **data lost
  = objects whose bytes differ or cannot be read whole, plus required objects
  that are missing**. Objects evicted or removed by design are not counted: those
  pools evict on purpose.

`tests/reliability/test_faults.py::test_data_lost_counts_missing_and_wrong_pages`
checks the measure itself (a page removed and a page overwritten behind the
cache's back are both counted).

## Faults

{table(FAULTS, "| scenario | requests served | wrong KV bytes | data lost | other figures |")}

Notes:

* Mooncake keeps objects in the memory of the clients that wrote them and its
  master holds the metadata: a fresh master starts with an empty pool, so every
  page written before the kill is gone. The cache treats that as misses (the index
  marks them not-in-pool on the first failed load), recomputes, and writes again.
  The client reconnects by itself; the first puts after the restart may get
  NO_SPACE until its segment is mounted again, then succeed.
* During the outage the cache backs off (`exists`, `get` and `put` failures all
  count), so most requests do not touch the store at all. A timed-out put keeps
  its pages pinned until the Mooncake client has returned (it may still be reading
  them): an engine with a small device pool waits for those pages (allocation
  stalls).
* A Mooncake client keeps one get session per key: a second session over a key
  shares it, and the first end (local, no round trip) ends it for both, so the
  other load's next ranged read would fail and its request be aborted (503).
  kvdirect's Mooncake adapter counts the open sessions of each key and ends a key's
  only with the last one (`tests/test_stores_mooncake.py::test_two_read_sessions_over_one_key_end_separately`
  fails without the count); the radix backend also ends the session a match held
  but no load took before the next match opens one.

## Concurrency

{table(CONCURRENCY, "| scenario | figures |")}

## Bad input

{bad_input_section()}

Fuzzing (`test_fuzz.py`, hypothesis, bounded): a state machine drives the shm
pool API (random keys incl. unicode, sizes 0..3 blocks, 1-3 segments, wrong-size
gets, invalid keys) against a model of what was stored, checking block
accounting and pins after every step; the index gets hostile inputs (every dtype,
strided and 2-D arrays, out-of-range ids, bogus node handles, odd namespaces) and
must raise only ConfigError/TypeError/ValueError and keep its invariants.

## Security

* Pool files are 0600 through every creation path (store API, cache manager,
  `kvdirect pool create`), even under `umask 0`.
* A pool file owned by another user (tested as root with `chown nobody`), writable
  by group or others, or a symlink at the pool path is refused with a message that
  says what to do, and the file is never written (checked by hashing it before
  and after).
* {sec[0] if sec else "Tenants: not run (skipped or failed in this run)."}
* No code path can execute stored data: an AST scan of `python/kvdirect` finds no
  `pickle`/`marshal`/`shelve`/`dill` import and no `eval`/`exec`/`compile`/
  `torch.load`/`np.load`/`yaml.load` call (the scanner is itself tested on planted code).
* Sizes read back are bounded: objects larger than the pool are TOO_LARGE,
  `get_bytes` of a pool-sized object returns it exactly, and damaged header
  fields (file size, block size, block count, offsets) are refused at open.
* The index and the page keys treat namespace `""` and `None` as one (default)
  namespace, so the two spellings share device and pool pages alike.

## Sanitizers

`scripts/sanitize.sh` builds the core with `KVDIRECT_SANITIZE=address,undefined`
(CMake option) into `build/sanitize`, stages the module next to a copy of the
Python package, and runs the shm, pool audit, keys, layout, copy, index and cache tests plus
the reliability concurrency, fuzz, bad-input, security and shm fault tests with
libasan (and libstdc++) preloaded; reports go to `build/sanitize/reports/`. CI
runs it on every change.

{"Result of this run: " + sanitize if sanitize else "Not run for this file (add `--sanitize`)."}

## Bugs found (all fixed; each keeps a regression test)

1. **UB in `hex_list`** (`csrc/python/bind_keys.cpp`): `memcpy(dst,
   prefix.data(), 0)` with a null `prefix.data()` when keys have no prefix
   (UBSan: "null pointer passed as argument 2"). Found by `scripts/sanitize.sh`
   (tests/test_keys.py). Fix: copy only when the prefix is not empty.
2. **Damaged object record is trusted** (`csrc/shm/shm_pool.cpp`, `get`,
   `read_begin`, `pin_one`): a published record whose `size` disagrees with its
   block count made a read walk past the block chain or `get_bytes` allocate the
   bogus size. Test: `test_security.py::test_corrupted_object_record_is_a_clean_miss`.
   Fix: `Pool::record_ok(id)` checked before pinning; a bad record is CORRUPT (a miss).
3. **Non-ASCII over-long key gave UnicodeDecodeError** instead of ConfigError
   (`csrc/python/bind_shm.cpp` `keys_from`): the message cut the key inside a
   UTF-8 character. Found by the fuzzer. Test:
   `test_bad_input.py::test_long_non_ascii_key_gives_config_error`. Fix: cut at a
   character boundary.
4. **A null address in a scatter list was accepted** (`csrc/python/bind_shm.cpp`
   `check_scatter`). Test: `test_bad_input.py::test_null_address_in_scatter_list_is_refused`.
   Fix: ConfigError for any segment with a null address and a non-zero size.
5. **`MooncakeStore.exists` answered "absent" when the master was unreachable**,
   so the cache never backed off during an outage. Fix: it raises, and the cache
   backs off as for failed gets and puts (the Mooncake fault scenario above).
6. **Namespace `""` and `None` shared device pages but not pool pages** (the
   index treated them as one, the page keys did not). Fix: one normalisation
   (`kvdirect.keys.request_namespace`) used by the keys and the cache. Test:
   `tests/test_keys.py::test_page_keys_equal_what_the_cache_writes`.
"""


# ---- running the suite --------------------------------------------------------------------------

def run_suite(figures_path: Path, extra: list) -> tuple[str, float]:
    env = dict(os.environ, KVDIRECT_RELIABILITY_REPORT=str(figures_path))
    t0 = time.monotonic()
    # the doc check itself (test_reliability_doc.py) compares the doc with the suite: not part of the run
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REL),
                        "--ignore", str(REL / "test_reliability_doc.py"), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    sys.stdout.write(r.stdout[-3000:])
    summary = _summary(r.stdout)
    if r.returncode != 0:
        raise SystemExit(f"the reliability suite failed ({summary}); the doc was not written")
    return summary, took


def _summary(out: str) -> str:
    m = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [0-9.]+s", out, re.M)
    return m[-1].strip() if m else "no pytest summary"


def run_sanitizer() -> str:
    r = subprocess.run(["bash", str(ROOT / "scripts" / "sanitize.sh")], cwd=ROOT, capture_output=True, text=True)
    summary = _summary(r.stdout)
    reports = "0 sanitizer reports" if "== no sanitizer reports" in r.stdout else "sanitizer reports found"
    if r.returncode != 0:
        raise SystemExit(f"scripts/sanitize.sh failed ({summary}, {reports}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return f"**{summary}, {reports}** (`scripts/sanitize.sh`)."


def source_commit() -> str:
    """The commit the suite ran at (12 hex), with "+ uncommitted changes" when the sources differed from it."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "python", "csrc", "tests", "scripts")
    return f"`{head}`" + (" + uncommitted changes" if dirty else "")


def load_figures(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            d = json.loads(line)
            out[d.pop("scenario")] = d
    return out


def save_figures(figures: dict, path: Path) -> None:
    lines = [json.dumps({"scenario": k, **v}, sort_keys=True) for k, v in figures.items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true",
                    help=f"render from the stored figures ({FIGURES.relative_to(ROOT)}) without running the suite")
    ap.add_argument("--sanitize", action="store_true", help="also run scripts/sanitize.sh and quote its result")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = ap.parse_args(argv)
    if args.render:
        figures = load_figures(FIGURES)
    else:
        from kvdirect.runtime import machine_description

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "figures.jsonl"
            summary, took = run_suite(path, args.pytest_args)
            figures = {"_run": {"summary": summary, "duration_s": round(took, 1), "machine": machine_description(),
                                "commit": source_commit(),
                                "versions": {"mooncake": _version("mooncake-transfer-engine-non-cuda"),
                                             "memcache": _version("memcache-hybrid")},
                                "sanitize": run_sanitizer() if args.sanitize else None},
                       **load_figures(path)}
        save_figures(figures, FIGURES)
    DOC.write_text(render(figures))
    print(f"wrote {DOC} ({len(figures) - 1} scenarios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
