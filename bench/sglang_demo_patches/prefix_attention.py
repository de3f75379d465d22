"""BENCHMARK-ONLY: "torch_native attention without the redundant prefix rows".

SGLang 0.5.23's CPU attention backends without ``sgl_kernel``'s CPU operators
(``torch_native``, and ``torch_flex``, which does the same through ``flex_attention``)
compute an extend request's attention with a query padded to the whole sequence:
``_run_sdpa_forward_extend`` builds ``[heads, seq_len_kv, dim]``, fills the last
``extend`` rows with the real queries and runs a square causal SDPA, then keeps those
rows. The cached prefix's KV is read from the pool, not recomputed, but its attention
rows are: a 3584-token request that hits 3520 tokens still pays seq x seq attention, so
a device hit, a pool hit and a cold prefill's attention cost the same and every mode
sits on one floor. (``intel_amx`` needs ``sgl_kernel``'s CPU operators, which are built
from source; the demo's ``sgl_kernel`` stand-in has none.)

This replaces that method with one that runs only the ``extend`` query rows against
the whole KV, under a bottom-right-aligned causal mask (query row ``i`` sees keys
``0 .. prefix + i``): the same attention for those rows, without the rows that are
thrown away. Sliding-window and cross-attention calls keep SGLang's method. Every mode
of a demo run uses it (baseline and ideal included), so they stay comparable; results
measured with it are labelled with the patch's name.
"""
import torch
from torch.nn.functional import scaled_dot_product_attention

from after_import import install


def _patch(module) -> None:
    cls = module.TorchNativeAttnBackend
    original = cls._run_sdpa_forward_extend

    def _run_sdpa_forward_extend(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices,
                                 seq_lens, extend_prefix_lens, extend_seq_lens, encoder_lens=None, scaling=None,
                                 enable_gqa=False, causal=False, is_cross_attn=False, sliding_window_size=None):
        if is_cross_attn or encoder_lens is not None or sliding_window_size not in (None, -1):
            return original(self, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            extend_prefix_lens, extend_seq_lens, encoder_lens, scaling=scaling,
                            enable_gqa=enable_gqa, causal=causal, is_cross_attn=is_cross_attn,
                            sliding_window_size=sliding_window_size)
        query = query.movedim(0, query.dim() - 2)  # [tokens, heads, dim] -> [heads, tokens, dim]
        start_q = 0
        for i in range(seq_lens.shape[0]):  # per request, as SGLang's method
            q_len, prefix, kv_len = int(extend_seq_lens[i]), int(extend_prefix_lens[i]), int(seq_lens[i])
            q = query[:, start_q:start_q + q_len, :]
            tokens = req_to_token[req_pool_indices[i], :kv_len]
            k = k_cache[tokens].movedim(0, query.dim() - 2)
            v = v_cache[tokens].movedim(0, query.dim() - 2)
            if not (q.dtype == k.dtype == v.dtype):
                k, v = k.to(q.dtype), v.to(q.dtype)
            mask = None
            if causal:
                rows = torch.arange(q_len, device=q.device).unsqueeze(1) + prefix
                mask = torch.arange(kv_len, device=q.device).unsqueeze(0) <= rows
            out = scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               enable_gqa=enable_gqa, scale=scaling)
            output[start_q:start_q + q_len, :, :] = out.squeeze(0).movedim(query.dim() - 2, 0)
            start_q += q_len
        return output

    cls._run_sdpa_forward_extend = _run_sdpa_forward_extend
    cls._run_sdpa_forward_extend_as_shipped = original  # for the patch's own test


install({"sglang.srt.layers.attention.torch_native_backend": _patch})
