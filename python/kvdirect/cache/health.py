"""Store health: which errors are store failures; count them, log each kind at most once
per interval, back off."""
from __future__ import annotations

import logging
import time

from kvdirect.cache.stats import CacheStats
from kvdirect.config import CacheConfig
from kvdirect.errors import StoreError
from kvdirect.stores._remote import CallTimeout, CallUnavailable

log = logging.getLogger("kvdirect")

#: What a store call may raise when the pool itself fails (unreachable, timed out, I/O):
#: counted as misses with back-off. Anything else (ConfigError, BackendUnavailableError,
#: programming errors) is a bug or a configuration error and propagates to the caller.
STORE_FAILURES = (StoreError, OSError, CallTimeout, CallUnavailable)


class StoreHealth:
    """After a store failure the store is skipped for a back-off interval that doubles
    (``retry_initial_s`` .. ``retry_max_s``) until a call succeeds again."""

    def __init__(self, store, config: CacheConfig, stats: CacheStats):
        self.store = store
        self.config = config
        self.stats = stats
        self._last_log: dict = {}
        self._down_until = 0.0
        self._backoff = config.retry_initial_s

    def available(self) -> bool:
        return self.store is not None and time.monotonic() >= self._down_until

    def failed(self, kind: str, err) -> None:
        """Count, log at most once per interval, back off before the next store use."""
        self.stats.failure(kind)
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self.config.log_interval_s:
            self._last_log[kind] = now
            log.warning("kvdirect: store %s failed (%s); pages are misses, retrying in %.1fs",
                        kind, err, self._backoff)
        self._down_until = now + self._backoff
        self._backoff = min(self._backoff * 2, self.config.retry_max_s)

    def partial(self, kind: str, err) -> None:
        """Some keys of a call failed, others succeeded (a full pool, a lost object): count and
        log, but do not back off: the store answered, and skipping it would turn every page
        of every request into a miss for a while because of a few pages."""
        self.stats.failure(kind)
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e9) >= self.config.log_interval_s:
            self._last_log[kind] = now
            log.warning("kvdirect: store %s failed for some pages (%s); those pages are misses", kind, err)
        self.recovered()

    def recovered(self) -> None:
        self._backoff = self.config.retry_initial_s
