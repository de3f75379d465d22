"""Pool audit: read every object of a pool and report the ones that are corrupt.

``kvdirect pool audit URL`` is the operator command; :func:`audit` is the library
function behind it (tests call it too). What is checked, per object:

* **content**, where the store keeps a checksum: the embedded shm pool stores one
  per object and the audit recomputes it over the pool's bytes in place. A
  mismatch, or a damaged object record, is *corrupt*. Mooncake and MemCache
  objects carry no checksum: the audit reads them whole (readable, complete),
  and says plainly that their content is unverified (``content_verified`` False,
  ``unverified`` counts them). A checksum trailer on remote objects was not added:
  pages reach those pools straight from device memory and are read back layer by
  layer, so a trailer would need a device-side checksum per page and could only
  be verified after the layers it covers were already used (docs/operations.md).
* **key format**: kvdirect page keys are ``kvd1/<16 hex fingerprint>/<64 hex page
  hash>``; a key that starts with ``kvd1/`` and is not of that form is *corrupt*.
  Keys of any other form belong to someone else sharing the store (*foreign*):
  counted and read, never judged.
* **size within its fingerprint**: every page of one layout fingerprint has the
  same size, so within a fingerprint the size most objects have is the page size
  and an object of another size is *corrupt* (when two sizes tie, every object of
  that fingerprint is, as none can be told right).

Also counted: *unreadable* (the store could not deliver the object: busy, timed
out, unreachable) and *vanished* (listed, then gone before it was read: evicted or
removed while the audit ran; not a fault). A clean audit has no corrupt and no
unreadable object. ``remove_corrupt`` removes the corrupt objects after the pass.

The pass is a walk over a live pool, not a snapshot: objects written while it runs
may be missed. Memory: the audit keeps each object's key and size until the
size check at the end (about 150 bytes per object).
"""
from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter, defaultdict
from typing import Callable, Optional

from kvdirect.errors import StoreError
from kvdirect.stores import base

KEY_RE = re.compile(r"kvd1/([0-9a-f]{16})/[0-9a-f]{64}")
KEY_PREFIX = "kvd1/"
#: objects read per store call
BATCH = 256


@dataclasses.dataclass
class AuditResult:
    """What :func:`audit` found. ``corrupt`` / ``unreadable``: lists of ``(key, reason)``."""

    store: str
    objects: int = 0
    bytes: int = 0
    verified: int = 0        # content checked against the object's checksum: right
    unverified: int = 0      # read whole, but no checksum vouches for the content
    corrupt: list = dataclasses.field(default_factory=list)
    unreadable: list = dataclasses.field(default_factory=list)
    vanished: int = 0
    foreign: int = 0
    removed: int = 0
    remove_failed: list = dataclasses.field(default_factory=list)
    fingerprints: dict = dataclasses.field(default_factory=dict)  # fp -> {objects, page_bytes}

    @property
    def ok(self) -> bool:
        """No corrupt and no unreadable object."""
        return not self.corrupt and not self.unreadable

    @property
    def content_verified(self) -> bool:
        """Every object read was vouched for by a checksum."""
        return self.unverified == 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["corrupt"] = [{"key": k, "reason": r} for k, r in self.corrupt]
        d["unreadable"] = [{"key": k, "reason": r} for k, r in self.unreadable]
        d["remove_failed"] = [{"key": k, "reason": r} for k, r in self.remove_failed]
        d.update(ok=self.ok, content_verified=self.content_verified)
        return d


def key_fingerprint(key: str) -> Optional[str]:
    """The layout fingerprint of a kvdirect page key, None for any other key."""
    m = KEY_RE.fullmatch(key)
    return m.group(1) if m else None


def audit(store: base.Store, *, remove_corrupt: bool = False,
          progress: Optional[Callable[[int, int], None]] = None, progress_every: int = 10000,
          name: str = "", remove_wait_s: float = 15.0) -> AuditResult:
    """Read every object ``store.list_objects()`` yields and check it (see the module docstring).

    ``progress(objects_done, problems_so_far)`` is called every ``progress_every`` objects.
    ``remove_corrupt``: remove the corrupt objects after the pass (a refused removal is retried for
    ``remove_wait_s``, then listed in ``remove_failed``). Raises StoreError when the store cannot
    list its objects.
    """
    res = AuditResult(store=name or getattr(store, "scheme", "") or type(store).__name__)
    by_fp: dict[str, list] = defaultdict(list)  # fp -> [(key, size)]
    batch: list[str] = []
    next_report = progress_every if progress_every > 0 else None

    def flush():
        nonlocal next_report
        if not batch:
            return
        chk = store.check_objects(batch)
        for i, key in enumerate(batch):
            st = int(chk.status[i])
            if st == base.NOT_FOUND:
                res.vanished += 1
                continue
            res.objects += 1
            if st == base.CORRUPT:
                res.corrupt.append((key, chk.detail.get(i, "corrupt")))
                continue
            if st != base.OK:
                res.unreadable.append((key, chk.detail.get(i) or base.status_name(st)))
                continue
            size = int(chk.sizes[i])
            res.bytes += size
            if chk.checked[i]:
                res.verified += 1
            else:
                res.unverified += 1
            if key.startswith(KEY_PREFIX):
                fp = key_fingerprint(key)
                if fp is None:
                    res.corrupt.append((key, "malformed kvdirect key (expected kvd1/<16 hex>/<64 hex>)"))
                else:
                    by_fp[fp].append((key, size))
            else:
                res.foreign += 1
        batch.clear()
        if progress is not None and next_report is not None and res.objects + res.vanished >= next_report:
            progress(res.objects + res.vanished, len(res.corrupt) + len(res.unreadable))
            while next_report <= res.objects + res.vanished:
                next_report += progress_every

    for key, _size in store.list_objects():
        batch.append(key)
        if len(batch) >= BATCH:
            flush()
    flush()

    for fp, objs in sorted(by_fp.items()):
        sizes = Counter(size for _, size in objs)
        (common, n), *rest = sizes.most_common()
        tie = bool(rest) and rest[0][1] == n
        page = None if tie else common
        res.fingerprints[fp] = {"objects": len(objs), "page_bytes": page,
                                "sizes": {int(s): c for s, c in sorted(sizes.items())}}
        if len(sizes) == 1:
            continue
        for key, size in objs:
            if tie or size != common:
                why = (f"size {size} B: pages of fingerprint {fp} disagree ({dict(sizes)})" if tie else
                       f"size {size} B, but {n} of {len(objs)} pages of fingerprint {fp} have {common} B")
                res.corrupt.append((key, why))

    if remove_corrupt and res.corrupt:
        _remove(store, [k for k, _ in res.corrupt], res, remove_wait_s)
    return res


def _remove(store: base.Store, keys: list, res: AuditResult, wait_s: float) -> None:
    """Remove keys one by one, retrying refusals for up to ``wait_s`` (Mooncake refuses to remove an
    object under the read lease the audit's own read took, 10 s by default)."""
    deadline = time.monotonic() + wait_s
    pending = list(keys)
    while True:
        failed = []
        for k in pending:
            try:
                res.removed += store.remove([k])
            except StoreError as e:
                failed.append((k, str(e)))
        if not failed or time.monotonic() >= deadline:
            res.remove_failed.extend(failed)
            return
        pending = [k for k, _ in failed]
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def render(res: AuditResult, max_keys: int = 50) -> str:
    """The human-readable report (what ``kvdirect pool audit`` prints)."""
    lines = [f"audited {res.store}: {res.objects} objects, {res.bytes} bytes"]
    if res.objects:
        if res.content_verified:
            lines.append(f"  content     verified by checksum for all {res.verified} objects read")
        else:
            lines.append(f"  content     UNVERIFIED for {res.unverified} objects (no checksum in this store: "
                         f"read whole, sizes and keys checked); {res.verified} verified by checksum")
    lines.append(f"  corrupt     {len(res.corrupt)}")
    lines.append(f"  unreadable  {len(res.unreadable)}")
    if res.vanished:
        lines.append(f"  vanished    {res.vanished} (removed or evicted while the audit ran)")
    if res.foreign:
        lines.append(f"  foreign     {res.foreign} (keys not written by kvdirect: read, not judged)")
    for fp, d in res.fingerprints.items():
        page = f"{d['page_bytes']} B pages" if d["page_bytes"] is not None else f"sizes disagree {d['sizes']}"
        lines.append(f"  fingerprint {fp}: {d['objects']} objects, {page}")
    for title, rows in (("corrupt", res.corrupt), ("unreadable", res.unreadable)):
        for k, why in rows[:max_keys]:
            lines.append(f"  {title}: {k}  ({why})")
        if len(rows) > max_keys:
            lines.append(f"  ... {len(rows) - max_keys} more {title} (--json lists all)")
    if res.removed or res.remove_failed:
        lines.append(f"  removed     {res.removed} corrupt objects"
                     + (f"; {len(res.remove_failed)} could not be removed" if res.remove_failed else ""))
    lines.append("result: " + ("clean" if res.ok else "PROBLEMS FOUND"))
    return "\n".join(lines)


__all__ = ["audit", "AuditResult", "render", "key_fingerprint"]
