"""A minimal HTTP client for SGLang's ``/generate`` (standard library only).

Prompts are token ids (``input_ids``), decoding is greedy, and every request
runs to ``max_new_tokens`` (``ignore_eos``). Streaming is used so that the time
to the first token is measured by the client.

Run as a script it reads ``{"url": ..., "requests": [[ids...], ...], "max_new_tokens": n, "logprobs": bool}``
on stdin and prints the results as JSON: the tests use that to talk to a server
inside a network namespace (``ip netns exec NS python -m kvdirect.demo.sglang_cpu.client``).
"""
from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse
import urllib.request


def _conn(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    u = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout), u.path.rstrip("/")


def generate(url: str, input_ids, max_new_tokens: int = 4, timeout: float = 300, *,
             logprobs: bool = False) -> dict:
    """One greedy request; returns ``output_ids``, ``meta_info`` (of the last chunk),
    ``ttft_s`` (first streamed chunk) and ``latency_s``. ``logprobs=True`` also returns
    ``logprobs``: each output token's log-probability (SGLang's ``output_token_logprobs``)."""
    req = {"input_ids": [int(t) for t in input_ids], "stream": True,
           "sampling_params": {"temperature": 0, "max_new_tokens": int(max_new_tokens), "ignore_eos": True}}
    if logprobs:  # output tokens only (no prompt logprobs, no top-k)
        req.update(return_logprob=True, logprob_start_len=-1, top_logprobs_num=0)
    body = json.dumps(req)
    conn, base = _conn(url, timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", base + "/generate", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"/generate returned HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft = None
        last = None
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"/generate error: {chunk['error']}")
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = chunk
        latency = time.perf_counter() - t0
    finally:
        conn.close()
    if last is None:
        raise RuntimeError("/generate streamed no data")
    out = last.get("output_ids")
    if out is None:
        raise RuntimeError(f"/generate gave no output_ids: {sorted(last)}")
    meta = last.get("meta_info", {})
    result = {"output_ids": list(out), "meta_info": meta, "ttft_s": ttft, "latency_s": latency}
    if logprobs:
        result["logprobs"] = [float(x[0]) for x in meta.get("output_token_logprobs") or ()]
    return result


def disconnect_after_first_chunk(url: str, input_ids, max_new_tokens: int, timeout: float = 300) -> None:
    """Start a streamed request, read its first chunk, then drop the connection."""
    body = json.dumps({"input_ids": [int(t) for t in input_ids], "stream": True,
                       "sampling_params": {"temperature": 0, "max_new_tokens": int(max_new_tokens),
                                           "ignore_eos": True}})
    conn, base = _conn(url, timeout)
    try:
        conn.request("POST", base + "/generate", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        for raw in resp:
            if raw.strip().startswith(b"data:"):
                break
    finally:
        conn.sock and conn.sock.close()
        conn.close()


def get(url: str, path: str, timeout: float = 30) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, path: str, payload=None, timeout: float = 60) -> tuple[int, bytes]:
    data = json.dumps(payload or {}).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cached_tokens(meta: dict) -> dict:
    """``{"total": n, "device": d, "pool": p}`` from SGLang's meta_info: kvdirect's pool
    hits are reported as ``host`` (SGLang's name for its load-back tier), HiCache's
    L3 hits as ``storage``."""
    det = meta.get("cached_tokens_details") or {}
    return {"total": int(meta.get("cached_tokens") or 0), "device": int(det.get("device") or 0),
            "pool": int(det.get("host") or 0), "storage": int(det.get("storage") or 0)}


def main() -> int:
    job = json.load(sys.stdin)
    results = []
    for ids in job["requests"]:
        try:
            results.append(generate(job["url"], ids, job.get("max_new_tokens", 4),
                                    logprobs=job.get("logprobs", False)))
        except Exception as e:  # reported per request; the caller decides
            results.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
