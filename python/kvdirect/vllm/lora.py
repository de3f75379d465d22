"""What identifies a LoRA adapter in page keys: its files, not vLLM's name and id.

A LoRA adapter changes every layer's KV, so its pages live in a namespace of
their own. vLLM names an adapter by ``lora_name`` and ``lora_int_id``, which each
server assigns as it likes: two servers may give one adapter different ids, or
two different adapters the same name and id. The namespace is therefore a digest
of what defines the adapter: every regular file directly in its folder
(``adapter_config.json``, the weights, extra embeddings), names and contents.

The digest is computed once per adapter folder and kept while the files' names,
sizes and modification times stay the same (a few ``stat`` calls per new
request; an adapter replaced in place is hashed again). An adapter that cannot
be identified (no local folder, and not in the Hugging Face cache) gets no
namespace: its requests are neither loaded nor saved (logged once).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading

log = logging.getLogger("kvdirect.vllm")

_CHUNK = 8 << 20
_lock = threading.Lock()
_digests: dict[str, tuple[tuple, str]] = {}  # folder -> (file signature, digest)
_warned: set[str] = set()


def adapter_identity(lora) -> str | None:
    """16 hex chars identifying the adapter of a vLLM ``LoRARequest``; None when it cannot be identified."""
    path = getattr(lora, "lora_path", None) or getattr(lora, "path", None) or ""
    folder = _local_folder(str(path))
    sig = _signature(folder) if folder else ()
    if not sig:
        _warn_once(str(path), getattr(lora, "lora_name", None))
        return None
    with _lock:
        hit = _digests.get(folder)
        if hit is not None and hit[0] == sig:
            return hit[1]
    digest = _digest(folder, sig)
    with _lock:
        _digests[folder] = (sig, digest)
    return digest


def _local_folder(path: str) -> str | None:
    if not path:
        return None
    if os.path.isdir(path):
        return os.path.realpath(path)
    if os.path.exists(path):
        return None
    try:  # a hub id: the cached snapshot vLLM loads, never a download
        from huggingface_hub import snapshot_download

        return os.path.realpath(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - no hub client, not a repo id, not cached: unidentified
        return None


def _signature(folder: str) -> tuple:
    """(name, size, mtime_ns) of every regular, non-hidden file directly in the folder, sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return ()
    out = []
    for e in entries:
        if e.name.startswith(".") or not e.is_file():
            continue
        st = e.stat()
        out.append((e.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def _digest(folder: str, sig: tuple) -> str:
    h = hashlib.sha256()
    for name, size, _ in sig:
        h.update(f"{name}\0{size}\0".encode())
        with open(os.path.join(folder, name), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()[:16]


def _warn_once(path: str, name) -> None:
    with _lock:
        if path in _warned:
            return
        _warned.add(path)
    log.warning("kvdirect: LoRA adapter %r at %r cannot be identified (no local folder with its files, not in the "
                "Hugging Face cache): its requests are neither loaded from nor saved to the pool", name, path)
