"""Make or check tests/data/sglang_hash_vectors.json with SGLang itself.

The vectors pin kvdirect's page hashes to SGLang's storage hashes
(``sglang.srt.mem_cache.utils.get_storage_hash_str``): for each case, the token
ids, page size, prior hash and request namespace (``extra_key``,
``cache_salt``) are the inputs; ``namespace_seed`` (SGLang's
``storage_namespace_seed``) and ``expected`` (one hex hash per page, a trailing
partial page included, as SGLang hashes it) are SGLang's answers.

Run it with a Python that has ``sglang`` installed (it needs no GPU):

    python tests/data/make_sglang_hash_vectors.py --check   # recompute every answer, compare
    python tests/data/make_sglang_hash_vectors.py --write   # recompute the answers and rewrite the file
    python tests/data/make_sglang_hash_vectors.py --write --new 40 --seed 7   # fresh random inputs

The inputs of the stored file are random: token ids of mixed widths (small
ids, ids near 2**31), page sizes 1, 4, 16, 64 and 128, lengths with and
without a trailing partial page, with and without a prior hash, and
``extra_key``/``cache_salt`` absent, empty, ASCII or not.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILE = HERE / "sglang_hash_vectors.json"
FUNCTION = "sglang.srt.mem_cache.utils.get_storage_hash_str"


def sglang_answers(case: dict) -> tuple:
    """(namespace_seed, expected) computed by SGLang for one case's inputs."""
    from array import array

    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.mem_cache.utils import get_storage_hash_str, storage_namespace_seed

    key = RadixKey(array("q", case["tokens"]), extra_key=case["extra_key"], cache_salt=case["cache_salt"])
    # the seed starts a chain only when no prior hash is given: recorded as null otherwise
    seed = storage_namespace_seed(key.extra_key, key.cache_salt) if case["prior_hash"] is None else None
    expected = get_storage_hash_str(key, case["prior_hash"], page_size=case["page_size"])
    return seed, list(expected)


def random_inputs(n: int, seed: int) -> list:
    rng = random.Random(seed)
    names = [None, "", "lora-a", "tenant-42", "naïve-ключ", "a b"]
    out = []
    for _ in range(n):
        ps = rng.choice([1, 4, 16, 64, 128])
        pages = rng.randint(1, 8 if ps < 64 else 3)
        length = pages * ps + (rng.randint(1, ps - 1) if ps > 1 and rng.random() < 0.3 else 0)
        toks = [rng.choice([rng.randint(0, 255), rng.randint(0, 2**17), rng.randint(2**30, 2**31 - 1)])
                for _ in range(length)]
        prior = "".join(rng.choice("0123456789abcdef") for _ in range(64)) if rng.random() < 0.25 else None
        out.append({"tokens": toks, "page_size": ps, "prior_hash": prior,
                    "extra_key": rng.choice(names), "cache_salt": rng.choice(names)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="recompute every answer and compare with the file")
    mode.add_argument("--write", action="store_true", help="recompute the answers and rewrite the file")
    ap.add_argument("--new", type=int, metavar="N", help="with --write: N fresh random cases instead of the file's")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import sglang

    data = json.loads(FILE.read_text()) if FILE.exists() else {"cases": []}
    cases = random_inputs(args.new, args.seed) if args.new else data["cases"]
    bad = 0
    for i, c in enumerate(cases):
        seed, expected = sglang_answers(c)
        if args.check and (seed != c["namespace_seed"] or expected != c["expected"]):
            print(f"case {i}: SGLang {sglang.__version__} gives other hashes", file=sys.stderr)
            bad += 1
        c["namespace_seed"], c["expected"] = seed, expected
    if args.check:
        print(f"{len(cases) - bad} of {len(cases)} cases equal SGLang {sglang.__version__}'s {FUNCTION}")
        return 1 if bad else 0
    header = {
        "source": f"sglang {sglang.__version__} {FUNCTION}",
        "sglang_version": sglang.__version__,
        "generated_by": "tests/data/make_sglang_hash_vectors.py --write (see its docstring)",
        "expected": "one hex SHA-256 per page, a trailing partial page included (as SGLang hashes it)",
    }
    FILE.write_text(json.dumps({**header, "cases": cases}, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
