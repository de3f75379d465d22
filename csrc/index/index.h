// PrefixIndex: one page-granular radix tree for device-resident and
// pool-resident KV pages ("one prefix match instead of two").
//
// Contract (the Python surface in python/kvdirect/index.py mirrors it).
//
// Pages. P = page_size >= 1. Keys are token ids (int32 or int64 values; a
// node stores them as int32 when they all fit, so both spellings of a key are
// the same key). Only whole pages count:
// a trailing partial page is ignored everywhere. Namespaces never share pages
// (one root per namespace; the empty name is the default namespace).
//
// Per page the index keeps: its P token ids; P device slots or "not on device";
// a pool state (UNKNOWN, IN_POOL, WRITING); an optional 32-byte storage digest.
//
// Invariants (checked by check()):
//  * Device-resident pages form a prefix of every root path: a page without
//    device slots has no device-resident descendant. Pool-only pages follow.
//  * WRITING pages are device-resident and pinned: never evicted.
//  * A page that is neither on device nor IN_POOL ("dead") exists only while
//    it is locked; it is dropped, with its subtree, when unlocked.
//  * pool_only_pages <= max_pool_only_pages after every operation, unless the
//    only pages left to drop are locked (they go once unlocked).
//
// Recency. Every match / insert / insert_pool_only is one tick of a logical
// clock; it stamps every page on its path. Eviction and pool-only dropping take
// the least recently stamped candidate; on a tie (same tick = one path) the
// deeper page goes first. Marks, lock and evict never stamp.
//
// Eviction is page granular: evict(n) frees ceil(n / P) pages (fewer only when
// nothing else is evictable), each time the least recent device page that is
// unlocked, has no WRITING page at or below it, and has no device-resident
// child. An evicted page that is IN_POOL stays as pool-only; any other evicted
// page is removed with its (pool-only) subtree. Pool-only pages beyond the
// bound are dropped the same way: least recent unlocked leaf page first.
//
// Sizes (tokens): total = device-resident; protected = device-resident pages
// that are locked or have a WRITING page at or below them; evictable = total -
// protected, which is exactly what evict(infinity) would free now.
//
// Node handles. match() returns the id of the tree node that ends exactly at
// the end of the matched path (splitting a node if needed), or 0 when nothing
// matched. An id stays valid, and keeps naming the same path end, until the
// page at that end leaves the index (evicted without a pool copy, dropped,
// reset); ids are never reused. Locked handles never go stale. lock(node)
// counts on every page of the path; unlock(node) must pair with a lock of the
// same handle.
//
// Slots: a node keeps one base slot per page when the page's slots are
// consecutive (what paged allocators hand out), else every slot.
//
// Thread safety: every public method takes an internal mutex, so completion
// marks may come from another thread while a single scheduler thread drives
// the rest. No method blocks or calls out while holding it, except match()'s
// slot allocator callback (which must not call back into the index).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace kvd {

enum class PoolState : uint8_t { kUnknown = 0, kInPool = 1, kWriting = 2 };

// Token ids as the caller holds them: contiguous int32 or int64, not copied.
struct TokenSpan {
  const void* data = nullptr;
  int64_t len = 0;  // tokens
  bool is_int32 = false;
};

struct MatchOut {
  int64_t device_len = 0;  // tokens, page aligned, device-resident from the start
  int64_t pool_len = 0;    // tokens after device_len that are IN_POOL (no slots)
  uint64_t node = 0;       // handle of the matched path's end; 0 = nothing matched
  bool has_last_digest = false;
  uint8_t last_digest[32] = {};  // digest of the last matched page, if known
};

// Returns room for n slots (n > 0), or nullptr to abort the copy.
using SlotAlloc = int64_t* (*)(void* ctx, int64_t n);

// Matched device slots as runs of consecutive slot numbers (first, first + 1,
// ..., first + count - 1), in token order. A paged allocator's page is one run
// (consecutive pages merge), so a match hands over a few runs instead of one
// entry per token and the caller expands them only when it needs the slots.
struct SlotRun {
  int64_t first, count;
};
using SlotRuns = std::vector<SlotRun>;
// Writes the slots of runs[0, n) to dst (their counts summed entries).
void expand_slot_runs(const SlotRun* runs, size_t n, int64_t* dst);

enum class MarkOp {
  kWriting,      // device pages UNKNOWN -> WRITING (pinned)
  kInPool,       // any page not IN_POOL -> IN_POOL (unpins WRITING)
  kWriteFailed,  // WRITING -> UNKNOWN (unpinned, never marked stored)
  kNotInPool,    // IN_POOL -> UNKNOWN; pool-only pages are dropped (if unlocked)
};

struct IndexStats {
  int64_t total_tokens, protected_tokens, evictable_tokens;
  int64_t device_pages, pool_only_pages, nodes, namespaces;
  int64_t clock;
};

class PrefixIndex {
 public:
  PrefixIndex(int64_t page_size, int64_t max_pool_only_pages);
  ~PrefixIndex();
  PrefixIndex(const PrefixIndex&) = delete;
  PrefixIndex& operator=(const PrefixIndex&) = delete;

  int64_t page_size() const { return P_; }
  int64_t max_pool_only_pages() const { return max_pool_only_; }

  // ns == nullptr or empty: default namespace. Device slots of the matched
  // device prefix are written into alloc(ctx, device_len) in path order.
  Status match(TokenSpan tokens, const std::string* ns, MatchOut* out, SlotAlloc alloc,
               void* ctx);
  // The same match; the device prefix's slots are appended to *runs (cleared
  // first) as runs: nothing per token is written, nothing is allocated once
  // *runs has grown to its working size.
  Status match(TokenSpan tokens, const std::string* ns, MatchOut* out, SlotRuns* runs);

  // Caches the full pages of `tokens` on device. slots holds at least
  // (len / P) * P entries (slot i belongs to token i). Returns how many leading
  // tokens were already device-resident: the caller frees its own slots for
  // that range. Every later page takes the caller's slots (including pages that
  // were pool-only: they become device-resident and keep their pool state), so
  // the caller must not free those. digests (rows x 32 bytes, rows <= pages)
  // set the digests of the first `rows` pages.
  int64_t insert(TokenSpan tokens, const int64_t* slots, const std::string* ns,
                 const uint8_t* digests, int64_t digest_rows);

  // insert() and what its caller asks next, under one lock (a finished load,
  // a write-back): pages [in_pool_first, full pages) become IN_POOL (none when
  // in_pool_first >= the page count), and *out / *runs describe the inserted
  // path as match(tokens) would now: every full page on device, node = its end.
  int64_t insert_path(TokenSpan tokens, const int64_t* slots, const std::string* ns,
                      const uint8_t* digests, int64_t digest_rows, int64_t in_pool_first,
                      MatchOut* out, SlotRuns* runs);

  // Records the full pages of `tokens` as known to be in the pool. Missing
  // pages are created pool-only; existing UNKNOWN pages become IN_POOL; WRITING
  // pages are left alone. Returns the number of pages whose state changed.
  int64_t insert_pool_only(TokenSpan tokens, const std::string* ns, const uint8_t* digests,
                           int64_t digest_rows);

  Status lock(uint64_t node);
  // kInvalidArgument unless this very handle holds a lock(node) not yet undone.
  Status unlock(uint64_t node);

  // Applies op to path pages [first_page, first_page + n_pages) of `tokens`
  // (walking the tree by tokens, so node splits do not matter). Pages the index
  // does not hold are skipped. Returns the number of pages changed, or -1 if the
  // range exceeds the full pages of `tokens`. With `mask` (n_pages bytes), only
  // pages whose mask byte is non-zero are considered (scattered page sets in one walk).
  int64_t mark(MarkOp op, TokenSpan tokens, int64_t first_page, int64_t n_pages,
               const std::string* ns, const uint8_t* mask = nullptr);

  // Frees device slots of ceil(num_tokens / P) pages; appends them to *freed.
  void evict(int64_t num_tokens, std::vector<int64_t>* freed);

  // Path helpers over the pages from the namespace root to `node`'s end.
  Status path_digests(uint64_t node, std::vector<uint8_t>* digests, std::vector<uint8_t>* mask);
  Status set_path_digests(uint64_t node, const uint8_t* digests, int64_t rows,
                          int64_t first_page);
  Status path_states(uint64_t node, std::vector<uint8_t>* states, int64_t* device_pages);

  void reset();

  int64_t total_size() const;
  int64_t protected_size() const;
  int64_t evictable_size() const;
  int64_t pool_only_pages() const;
  int64_t num_pages() const;  // device-resident + pool-only
  IndexStats stats() const;

  // Full consistency check (tests): empty string when every invariant holds.
  std::string check() const;

  struct Node;

 private:
  struct PoolKey {
    uint64_t ts;
    int64_t neg_depth;
    uint64_t id;
    Node* node;
    bool operator<(const PoolKey& o) const {
      return std::tie(ts, neg_depth, id) < std::tie(o.ts, o.neg_depth, o.id);
    }
  };

  Node* root_for(const std::string* ns, bool create);
  Node* resolve(uint64_t id) const;
  template <class T>
  Node* find_child(Node* parent, const T* page) const;
  template <class T>
  int64_t match_pages(const Node* n, const T* toks, int64_t max_pages, int64_t known = 0) const;
  template <class T>
  Node* match_t(const T* toks, int64_t n_pages, const std::string* ns, MatchOut* out);
  Status match_locked(TokenSpan t, const std::string* ns, MatchOut* out);
  template <class T>
  int64_t insert_t(const T* toks, int64_t n_pages, const int64_t* slots, const std::string* ns,
                   const uint8_t* digests, int64_t rows, bool pool_only);
  template <class T>
  int64_t mark_t(MarkOp op, const T* toks, int64_t n_full, int64_t first, int64_t count,
                 const std::string* ns, const uint8_t* mask);

  Node* new_node(Node* parent);
  void attach_child(Node* parent, Node* child);
  void detach_child(Node* parent, Node* child);
  Node* split(Node* n, int64_t k);
  void delete_subtree(Node* n);
  void truncate_from(Node* n, int64_t j);
  void touch_path(Node* end);
  void refresh(Node* n);
  void recompute_writing(Node* n);
  void lru_push_front(Node* n);
  void lru_insert_before(Node* n, Node* pos);
  void lru_unlink(Node* n);
  void pool_sync(Node* n);
  void pool_erase(Node* n);
  void enforce_pool_bound();
  void gc_dead_after_unlock(std::vector<Node*>& chain);
  void set_digest(Node* n, int64_t j, const uint8_t* d);
  int64_t slot_entries(const Node* n) const;
  void append_slots(Node* n, const int64_t* s, int64_t pages);
  void write_slots(const Node* n, int64_t first_page, int64_t pages, int64_t* dst) const;
  void append_runs(const Node* n, int64_t pages, SlotRuns* runs) const;
  void clear_all();
  std::string check_node(const Node* n, int64_t* dev, int64_t* prot, int64_t* pool,
                         int64_t* pin, int64_t* count) const;

  const int64_t P_;
  const int64_t max_pool_only_;
  mutable std::mutex mu_;
  Node* default_root_ = nullptr;
  std::unordered_map<std::string, Node*> ns_roots_;
  std::unordered_map<uint64_t, Node*> by_id_;
  uint64_t next_id_ = 1;
  uint64_t clock_ = 0;
  int64_t device_pages_ = 0, protected_pages_ = 0, pool_only_ = 0;
  Node* lru_head_ = nullptr;  // most recent device-resident node
  Node* lru_tail_ = nullptr;  // least recent
  std::set<PoolKey> pool_set_;  // nodes holding pool-only pages, oldest first
  std::vector<Node*> scratch_;
  Node* insert_end_ = nullptr;  // end of the path the last insert walked
};

}  // namespace kvd
