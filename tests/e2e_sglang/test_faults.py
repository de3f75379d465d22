"""A real server whose store fails: gets and puts fail at random (a failed get also leaves
garbage in the device slots it was loading, as a real transport may), under memory pressure
so that evicted documents load back from the pool. Outputs equal the references, and the
pool audit finds every page the server wrote equal to a clean server's: a page computed on
top of a failed load never reaches the pool.

The faults come from ``faulty+URL`` (``kvdirect.stores._testing.FlakyStore``), which a server
accepts only with ``KVDIRECT_TEST_STORE_FAULTS`` set (test only).
"""
from __future__ import annotations

import json

from audit import assert_pool_clean, audit, key_prefix, page_keys, sequences
from kvdirect.stores import open_store
from kvdirect.demo.sglang_cpu.client import cached_tokens
from test_shared_pool import kv_config
from workload import OUTPUT_LEN, Workload

FAULTS = {"fail_rate": 0.05, "fail_ops": ["get", "put"], "seed": 3}


def test_store_faults_never_poison_the_pool(farm, pools, references, clean_pool):
    wl = Workload()
    url = pools.new()
    s = farm.start(page_size=16, max_total_tokens=1024, name="faults", kvdirect_config=kv_config("faulty+" + url),
                   env={"KVDIRECT_TEST_STORE_FAULTS": json.dumps(FAULTS)}, args=["--log-level", "info"])
    for rnd in range(2):  # the second round loads what the first wrote and the device evicted
        cached = []
        for doc, r in zip(wl.docs, s.generate_many(wl.docs, OUTPUT_LEN)):
            assert r["output_ids"] == references[doc.tobytes()], "wrong output with a failing store"
            cached.append(cached_tokens(r["meta_info"]))
    pool = sum(c["pool"] for c in cached)
    assert pool > 0, "no page loaded back from the pool"
    # 1024 device tokens hold 4 of the 24 documents: most of the second round can only come from the
    # pool, and with 5% of gets failing about half of the 15-page loads fail (all or nothing)
    assert sum(c["total"] for c in cached) < len(wl.docs) * 240, "no load failed: were faults injected?"
    assert "pages not stored" in s.log_text(), f"no put failed: were faults injected?\n{s.log_tail(20)}"
    reqs = [(d, OUTPUT_LEN) for d in wl.docs]
    r = assert_pool_clean(url, clean_pool, s, reqs, [references[d.tobytes()] for d in wl.docs], 16)
    print(f"pool audit: {r['found']} pages, 0 wrong")

    # the audit sees a wrong page: one object replaced by one with a single bit flipped
    s.stop()
    keys = page_keys(key_prefix(s), sequences(wl.docs, [references[d.tobytes()] for d in wl.docs]), 16)
    store = open_store(url)
    try:
        k = next(k for k in keys if store.exists([k])[0])
        obj = bytearray(store.get_bytes(k))
        obj[len(obj) // 2] ^= 1
        assert store.remove([k]) == 1 and store.put_bytes(k, bytes(obj))
    finally:
        store.close()
    bad = audit(url, clean_pool.url(16), keys)
    assert bad["wrong"] == [k] and bad["found"] == r["found"]
