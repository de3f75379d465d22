"""The benchmark-only patches `kvdirect demo --engine sglang` loads into its servers
(bench/sglang_demo_patches): SGLang's Mooncake linker gets a pool group for dense models,
and the timers record what they wrap, only when asked for."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import json, os, numpy as np, torch
from sglang.srt.mem_cache.hybrid_cache import hybrid_pool_assembler as hpa
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
pool = MHATokenToKVPool(size=64, page_size=16, dtype=torch.float32, head_num=2, head_dim=8, layer_num=3,
                        device="cpu", enable_memory_saver=False)
group = hpa._PlainKvStrategy().build_direct_linker_pool_group(kvcache=pool, params=None, page_size=16)
assert group.num_layers == 3 and list(group.entry_map) == ["kv"], group.entry_map
from kvdirect.cache.transfer import Transfer
assert Transfer.put.__wrapped__
import timers
timers.record("match", 1.25, 0)
print("ok")
'''


ATTENTION = r'''
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend as B
patched, shipped = B._run_sdpa_forward_extend, B._run_sdpa_forward_extend_as_shipped
assert patched.__module__ == "prefix_attention", patched.__module__
torch.manual_seed(0)
heads, kv_heads, dim, slots = 4, 2, 16, 600
k_cache, v_cache = torch.randn(slots, kv_heads, dim), torch.randn(slots, kv_heads, dim)
prefix, extend = torch.tensor([0, 130, 64, 200]), torch.tensor([70, 6, 1, 64])
req_to_token = torch.stack([torch.randperm(slots)[:300] for _ in range(4)])
query = torch.randn(int(extend.sum()), heads, dim)
args = (k_cache, v_cache, req_to_token, torch.arange(4), prefix + extend, prefix, extend)
for causal in (True, False):
    want, got = torch.zeros_like(query), torch.zeros_like(query)
    shipped(None, query, want, *args, scaling=0.25, enable_gqa=True, causal=causal)
    patched(None, query, got, *args, scaling=0.25, enable_gqa=True, causal=causal)
    assert torch.allclose(got, want, atol=1e-5), (causal, (got - want).abs().max())
print("ok")
'''


def run(patches: str, tmp_path, check: str = CHECK):
    env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "KVDIRECT_BENCH_PATCHES": patches,
           "KVDIRECT_BENCH_TIMERS": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench" / "sglang_demo_patches"),
                                          str(ROOT / "tests" / "e2e_sglang" / "standin")])}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", check], capture_output=True, text=True,
                          env=env, timeout=300, cwd="/")


def test_dense_linker_pool_group_and_timers(tmp_path):
    r = run("dense_linker,timers", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    lines = [json.loads(x) for f in tmp_path.glob("*.jsonl") for x in f.read_text().splitlines()]
    assert {"w": "match", "ms": 1.25, "p": 0} in lines


def test_without_the_patches_sglang_refuses_dense_models(tmp_path):
    r = run("", tmp_path)
    assert r.returncode != 0 and "does not support the direct external linker" in r.stderr, r.stderr[-2000:]


def test_prefix_attention_equals_torch_native_on_the_rows_it_keeps(tmp_path):
    """The patch runs only an extend request's new query rows (bottom-right causal mask): the
    same outputs as SGLang's padded-query method, with and without a cached prefix."""
    r = run("prefix_attention", tmp_path, ATTENTION)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
