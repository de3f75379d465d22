"""The benchmark-only HiCache CPU patch (bench/sglang_hicache_cpu) that `kvdirect demo
--engine sglang` loads into its HiCache baseline servers: it installs itself when
SGLang's host-pool modules are imported, and its torch copies move the right rows."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import torch
from sglang.srt.mem_cache.pool_host import base, common, mha
assert base.HICACHE_HOST_MEMORY_RESERVE_BYTES == 1 << 30
assert common.ALLOC_MEMORY_FUNCS["cpu"].__module__ == "sitecustomize"
L, P, H, D, pages = 2, 4, 2, 3, 5
dev_k = [torch.randn(40, H, D) for _ in range(L)]
dev_v = [torch.randn(40, H, D) for _ in range(L)]
host_k, host_v = torch.zeros(pages, L, P, H, D), torch.zeros(pages, L, P, H, D)
src, dst = torch.tensor([8, 9, 10, 11, 20, 21, 22, 23]), torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
mha.transfer_kv_all_layer_direct_lf_pf(src_ptrs=dev_k + dev_v, dst_ptrs=[host_k, host_v], src_indices=src,
                                       dst_indices=dst, page_size=P)
back = torch.tensor([0, 1, 2, 3, 28, 29, 30, 31])
for l in range(L):
    out_k, out_v = torch.zeros(40, H, D), torch.zeros(40, H, D)
    mha.transfer_kv_per_layer_direct_pf_lf(src_ptrs=[host_k, host_v], dst_ptrs=[out_k, out_v], src_indices=dst,
                                           dst_indices=back, layer_id=l, page_size=P)
    assert torch.equal(out_k[back], dev_k[l][src]) and torch.equal(out_v[back], dev_v[l][src])
    assert torch.equal(host_k[1, l], dev_k[l][8:12]) and torch.equal(host_v[3, l], dev_v[l][20:24])
x, y = torch.randn(10, H, D), torch.zeros(10, H, D)
mha.transfer_kv_direct(src_layers=[x], dst_layers=[y], src_indices=torch.tensor([1, 2]),
                       dst_indices=torch.tensor([5, 6]), page_size=1)
assert torch.equal(y[5:7], x[1:3]) and not y[:5].any()
print("ok")
'''


def test_patch_installs_and_copies_rows():
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "sglang_hicache_cpu"),
                                          str(ROOT / "tests" / "e2e_sglang" / "standin")])}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", CHECK], capture_output=True, text=True,
                       env=env, timeout=300, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
