// PrefixIndex implementation. See index.h for the contract.
//
// Layout: a radix tree of nodes, each a run of whole pages. A node's device
// pages are a prefix of its pages (n_dev), matching the tree-wide invariant.
// Children are keyed by a 64-bit hash of their first page; pages are always
// verified token by token (hash collisions only chain, never alias).
//
// Two recency structures:
//  * an intrusive list of device-resident nodes, most recent first. Touching a
//    path moves its nodes to the front deepest first, so the list is ordered by
//    (tick, -depth): the tail is the next eviction candidate region.
//  * an ordered set of nodes holding pool-only pages keyed by (tick, -depth),
//    because pages become pool-only (on eviction) without being touched.
#include "index/index.h"

#include <algorithm>
#include <cstring>
#include <sstream>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvd {

// Field order follows use: what a match reads and writes on every node of its
// path (the walk, the state scan, recency, slot runs) comes first, so a match
// touches the node's first cache lines only; bookkeeping for writes, locks
// and eviction follows.
struct alignas(64) PrefixIndex::Node {
  // ---- read by every match on the path (the first cache line)
  Node* hnext = nullptr;  // next sibling with the same first-page hash
  Node* parent = nullptr;
  int64_t n_pages = 0, n_dev = 0;
  uint64_t ts = 0;
  Node* lru_prev = nullptr;  // toward the head (more recent)
  Node* lru_next = nullptr;  // toward the tail (older)
  bool narrow = false;
  // Device slots, either one entry per slot (runs == false) or, when every
  // device page's slots are consecutive (s, s+1, ..., s+P-1) -- what paged
  // allocators hand out -- one base slot per page: less memory, and match
  // hands over runs instead of reading every slot back.
  bool runs = false;
  bool in_lru = false;
  bool in_pool = false;
  bool is_root = false;
  // Token ids, n_pages * P: int32 when every id of the node fits (the usual
  // case: half the bytes to compare), else int64. Keys are values either way.
  std::vector<int32_t> tokens32;
  std::vector<int64_t> slots;
  std::vector<uint8_t> state;       // n_pages (PoolState)
  std::vector<uint8_t> has_digest;  // n_pages, empty until first digest
  uint64_t id = 0;
  std::unordered_map<uint64_t, Node*> children;
  // ---- bookkeeping
  std::vector<int64_t> tokens;      // wide ids (narrow == false)
  uint64_t hkey = 0;                // hash of this node's first page
  std::vector<uint8_t> digest;      // n_pages * 32, empty until first digest
  int64_t end_depth = 0;  // pages from the namespace root to this node's end
  int64_t lock_ref = 0;  // locks on this node's path end or below
  int64_t own_locks = 0;  // lock(node) calls on this very handle not yet unlocked
  int64_t own_writing = 0, last_writing = -1;
  int64_t pin_sub = 0;  // WRITING pages in this subtree, this node included
  int64_t dev_children = 0;
  int64_t prot_pages = 0;  // this node's contribution to protected_pages_
  PoolKey pk{};
};

namespace {

constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;
constexpr size_t kScanChildren = 4;

inline uint64_t mix(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

// Hash of one page, identical for int32 and int64 spellings of the same ids.
// Four independent lanes keep the multiply chain short.
template <class T>
inline uint64_t page_hash(const T* p, int64_t n) {
  uint64_t h0 = 1, h1 = 2, h2 = 3, h3 = 4;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    h0 = (h0 ^ static_cast<uint64_t>(static_cast<int64_t>(p[i]))) * kMul;
    h1 = (h1 ^ static_cast<uint64_t>(static_cast<int64_t>(p[i + 1]))) * kMul;
    h2 = (h2 ^ static_cast<uint64_t>(static_cast<int64_t>(p[i + 2]))) * kMul;
    h3 = (h3 ^ static_cast<uint64_t>(static_cast<int64_t>(p[i + 3]))) * kMul;
  }
  for (; i < n; ++i) h0 = (h0 ^ static_cast<uint64_t>(static_cast<int64_t>(p[i]))) * kMul;
  return mix(h0 ^ mix(h1) ^ (mix(h2) << 1) ^ (mix(h3) >> 1) ^ static_cast<uint64_t>(n));
}

// Index of the first differing token in [0, n), or n.
inline int64_t first_mismatch(const int64_t* a, const int64_t* b, int64_t n) {
  if (std::memcmp(a, b, n * sizeof(int64_t)) == 0) return n;  // the common case: all equal
  constexpr int64_t kBlock = 64;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock)
    if (std::memcmp(a + i, b + i, kBlock * sizeof(int64_t)) != 0) break;
  for (; i < n; ++i)
    if (a[i] != b[i]) return i;
  return n;
}

inline int64_t first_mismatch(const int32_t* a, const int32_t* b, int64_t n) {
  if (std::memcmp(a, b, n * sizeof(int32_t)) == 0) return n;
  constexpr int64_t kBlock = 64;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock)
    if (std::memcmp(a + i, b + i, kBlock * sizeof(int32_t)) != 0) break;
  for (; i < n; ++i)
    if (a[i] != b[i]) return i;
  return n;
}

// Mixed widths (an int64 query against int32 node tokens, the usual case with
// SGLang's array('q') keys): compare values, 32 at a time, widening the int32
// side. The AVX2 loop is 3 instructions per 4 tokens (widening load, xor with
// the query, or into the block's accumulator); a block with a difference falls
// through to the exact scalar scan.
int64_t first_mismatch_mixed_portable(const int64_t* a, const int32_t* b, int64_t n, int64_t i) {
  constexpr int64_t kBlock = 32;
  for (; i + kBlock <= n; i += kBlock) {
    uint64_t acc = 0;
    for (int64_t j = 0; j < kBlock; ++j)
      acc |= static_cast<uint64_t>(a[i + j] ^ static_cast<int64_t>(b[i + j]));
    if (acc) break;
  }
  for (; i < n; ++i)
    if (a[i] != static_cast<int64_t>(b[i])) return i;
  return n;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) int64_t first_mismatch_mixed_avx2(const int64_t* a,
                                                                  const int32_t* b, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i acc = _mm256_setzero_si256();
    for (int j = 0; j < 32; j += 4) {
      const __m256i w = _mm256_cvtepi32_epi64(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i + j)));
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i + j));
      acc = _mm256_or_si256(acc, _mm256_xor_si256(w, q));
    }
    if (!_mm256_testz_si256(acc, acc)) break;
  }
  return first_mismatch_mixed_portable(a, b, n, i);
}
bool have_avx2() {
  static const bool v = __builtin_cpu_supports("avx2");
  return v;
}
#endif

inline int64_t first_mismatch_mixed(const int64_t* a, const int32_t* b, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) return first_mismatch_mixed_avx2(a, b, n);
#endif
  return first_mismatch_mixed_portable(a, b, n, 0);
}

inline int64_t first_mismatch(const int64_t* a, const int32_t* b, int64_t n) {
  return first_mismatch_mixed(a, b, n);
}
inline int64_t first_mismatch(const int32_t* a, const int64_t* b, int64_t n) {
  return first_mismatch_mixed(b, a, n);
}

template <class T>
inline bool fits_int32(const T* p, int64_t n) {
  if (sizeof(T) == 4) return true;
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i)
    bad |= static_cast<int64_t>(p[i]) != static_cast<int64_t>(static_cast<int32_t>(p[i]));
  return bad == 0;
}

// Calls f with the node's token array, whichever width it is stored in.
template <class N, class F>
inline auto with_tokens(N* n, F&& f) {
  return n->narrow ? f(n->tokens32.data()) : f(n->tokens.data());
}

// Writes base[p] + i for every page p and offset i < P: the slots of run pages.
// Wide stores matter here (it is most of a match's work), so the loop is built
// for AVX-512 / AVX2 too and picked at load time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void fill_runs(int64_t* __restrict dst, const int64_t* __restrict base, int64_t pages, int64_t P) {
  for (int64_t p = 0; p < pages; ++p) {
    const int64_t b = base[p];
    int64_t* __restrict d = dst + p * P;
    for (int64_t i = 0; i < P; ++i) d[i] = b + i;
  }
}

inline bool pages_are_runs(const int64_t* s, int64_t pages, int64_t P) {
  if (P == 1) return false;
  for (int64_t p = 0; p < pages; ++p) {
    const int64_t* x = s + p * P;
    int64_t bad = 0;
    for (int64_t i = 1; i < P; ++i) bad |= x[i] ^ (x[0] + i);
    if (bad) return false;
  }
  return true;
}

template <class S, class T>
inline bool page_equal(const S* a, const T* b, int64_t P) {
  return first_mismatch(a, b, P) == P;
}

}  // namespace

PrefixIndex::PrefixIndex(int64_t page_size, int64_t max_pool_only_pages)
    : P_(page_size < 1 ? 1 : page_size),
      max_pool_only_(max_pool_only_pages < 0 ? 0 : max_pool_only_pages) {
  default_root_ = new Node();
  default_root_->is_root = true;
}

PrefixIndex::~PrefixIndex() {
  clear_all();
  delete default_root_;
}

// ---- small helpers ----------------------------------------------------------

PrefixIndex::Node* PrefixIndex::root_for(const std::string* ns, bool create) {
  if (ns == nullptr || ns->empty()) return default_root_;
  auto it = ns_roots_.find(*ns);
  if (it != ns_roots_.end()) return it->second;
  if (!create) return nullptr;
  Node* r = new Node();
  r->is_root = true;
  ns_roots_.emplace(*ns, r);
  return r;
}

PrefixIndex::Node* PrefixIndex::resolve(uint64_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : it->second;
}

template <class T>
PrefixIndex::Node* PrefixIndex::find_child(Node* parent, const T* page) const {
  if (parent->children.empty()) return nullptr;
  if (parent->children.size() <= kScanChildren) {
    // A few children (a split node has one): comparing their first pages, which
    // mostly differ in the first tokens, is cheaper than hashing the page.
    for (auto& kv : parent->children)
      for (Node* c = kv.second; c; c = c->hnext)
        if (with_tokens(c, [&](const auto* t) { return page_equal(t, page, P_); })) return c;
    return nullptr;
  }
  auto it = parent->children.find(page_hash(page, P_));
  if (it == parent->children.end()) return nullptr;
  for (Node* c = it->second; c; c = c->hnext)
    if (with_tokens(c, [&](const auto* t) { return page_equal(t, page, P_); })) return c;
  return nullptr;
}

// Number of leading whole pages of n that equal toks (at most max_pages).
template <class T>
int64_t PrefixIndex::match_pages(const Node* n, const T* toks, int64_t max_pages,
                                 int64_t known) const {
  const int64_t lim = std::min(max_pages, n->n_pages);
  if (known >= lim) return lim;
  const int64_t off = known * P_, len = lim * P_ - off;
  return known + with_tokens(n, [&](const auto* t) {
           return first_mismatch(t + off, toks + off, len);
         }) / P_;
}

PrefixIndex::Node* PrefixIndex::new_node(Node* parent) {
  Node* n = new Node();
  n->id = next_id_++;
  n->parent = parent;
  by_id_.emplace(n->id, n);
  return n;
}

void PrefixIndex::attach_child(Node* parent, Node* child) {
  child->parent = parent;
  child->hkey = with_tokens(child, [&](const auto* t) { return page_hash(t, P_); });
  child->hnext = nullptr;
  auto [it, fresh] = parent->children.emplace(child->hkey, child);
  if (!fresh) {  // hash collision with a different first page: chain it
    child->hnext = it->second;
    it->second = child;
  }
  if (child->n_dev > 0) parent->dev_children++;
}

void PrefixIndex::detach_child(Node* parent, Node* child) {
  auto it = parent->children.find(child->hkey);
  if (it != parent->children.end()) {
    Node** link = &it->second;
    while (*link && *link != child) link = &(*link)->hnext;
    if (*link) *link = child->hnext;
    if (it->second == nullptr) parent->children.erase(it);
  }
  child->hnext = nullptr;
  if (child->n_dev > 0) parent->dev_children--;
}

void PrefixIndex::refresh(Node* n) {
  int64_t p;
  if (n->lock_ref > 0 || n->pin_sub - n->own_writing > 0)
    p = n->n_dev;
  else
    p = n->last_writing + 1;  // WRITING pages are device pages: < n_dev
  protected_pages_ += p - n->prot_pages;
  n->prot_pages = p;
}

void PrefixIndex::recompute_writing(Node* n) {
  int64_t cnt = 0, last = -1;
  for (int64_t j = 0; j < n->n_pages; ++j)
    if (n->state[j] == static_cast<uint8_t>(PoolState::kWriting)) {
      cnt++;
      last = j;
    }
  int64_t delta = cnt - n->own_writing;
  n->own_writing = cnt;
  n->last_writing = last;
  if (delta != 0)
    for (Node* x = n; x && !x->is_root; x = x->parent) {
      x->pin_sub += delta;
      if (x != n) refresh(x);
    }
  refresh(n);
}

void PrefixIndex::lru_push_front(Node* n) {
  n->lru_prev = nullptr;
  n->lru_next = lru_head_;
  if (lru_head_) lru_head_->lru_prev = n;
  lru_head_ = n;
  if (!lru_tail_) lru_tail_ = n;
  n->in_lru = true;
}

void PrefixIndex::lru_insert_before(Node* n, Node* pos) {  // n just ahead of pos
  n->lru_next = pos;
  n->lru_prev = pos->lru_prev;
  if (pos->lru_prev)
    pos->lru_prev->lru_next = n;
  else
    lru_head_ = n;
  pos->lru_prev = n;
  n->in_lru = true;
}

void PrefixIndex::lru_unlink(Node* n) {
  if (!n->in_lru) return;
  if (n->lru_prev)
    n->lru_prev->lru_next = n->lru_next;
  else
    lru_head_ = n->lru_next;
  if (n->lru_next)
    n->lru_next->lru_prev = n->lru_prev;
  else
    lru_tail_ = n->lru_prev;
  n->lru_prev = n->lru_next = nullptr;
  n->in_lru = false;
}

void PrefixIndex::pool_erase(Node* n) {
  if (!n->in_pool) return;
  pool_set_.erase(n->pk);
  n->in_pool = false;
}

void PrefixIndex::pool_sync(Node* n) {
  pool_erase(n);
  if (n->n_dev < n->n_pages) {
    n->pk = PoolKey{n->ts, -n->end_depth, n->id, n};
    pool_set_.insert(n->pk);
    n->in_pool = true;
  }
}

void PrefixIndex::set_digest(Node* n, int64_t j, const uint8_t* d) {
  if (n->has_digest.empty()) {
    n->has_digest.assign(n->n_pages, 0);
    n->digest.assign(n->n_pages * 32, 0);
  }
  std::memcpy(n->digest.data() + j * 32, d, 32);
  n->has_digest[j] = 1;
}

int64_t PrefixIndex::slot_entries(const Node* n) const { return n->runs ? 1 : P_; }

void PrefixIndex::append_slots(Node* n, const int64_t* s, int64_t pages) {
  if (n->n_dev == 0) {
    n->slots.clear();
    n->runs = pages_are_runs(s, pages, P_);
  } else if (n->runs && !pages_are_runs(s, pages, P_)) {
    std::vector<int64_t> full(n->n_dev * P_);
    write_slots(n, 0, n->n_dev, full.data());
    n->slots.swap(full);
    n->runs = false;
  }
  if (n->runs) {
    for (int64_t p = 0; p < pages; ++p) n->slots.push_back(s[p * P_]);
  } else {
    n->slots.insert(n->slots.end(), s, s + pages * P_);
  }
}

void PrefixIndex::write_slots(const Node* n, int64_t first, int64_t pages, int64_t* dst) const {
  if (!n->runs) {
    std::memcpy(dst, n->slots.data() + first * P_, pages * P_ * sizeof(int64_t));
    return;
  }
  fill_runs(dst, n->slots.data() + first, pages, P_);
}

void PrefixIndex::append_runs(const Node* n, int64_t pages, SlotRuns* runs) const {
  if (pages <= 0) return;
  // The open run lives in (first, count) until a gap closes it.
  int64_t first, count;
  if (!runs->empty()) {
    first = runs->back().first;
    count = runs->back().count;
    runs->pop_back();
  } else {
    first = n->slots[0];
    count = 0;
  }
  const int64_t* s = n->slots.data();
  if (n->runs) {
    for (int64_t p = 0; p < pages; ++p) {
      if (s[p] != first + count) {
        if (count) runs->push_back({first, count});
        first = s[p];
        count = 0;
      }
      count += P_;
    }
  } else {
    const int64_t len = pages * P_;
    for (int64_t i = 0; i < len; ++i) {
      if (s[i] != first + count) {
        if (count) runs->push_back({first, count});
        first = s[i];
        count = 0;
      }
      ++count;
    }
  }
  runs->push_back({first, count});
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void expand_slot_runs(const SlotRun* runs, size_t n, int64_t* dst) {
  for (size_t r = 0; r < n; ++r) {
    const int64_t b = runs[r].first, c = runs[r].count;
    for (int64_t i = 0; i < c; ++i) dst[i] = b + i;
    dst += c;
  }
}

// Splits n after k pages (0 < k < n_pages). The new node M takes the first k
// pages and n's place under the parent; n keeps its id and its path end, so
// handles stay valid across splits.
PrefixIndex::Node* PrefixIndex::split(Node* n, int64_t k) {
  Node* m = new_node(n->parent);
  const int64_t kp = k * P_;
  m->narrow = n->narrow;
  if (n->narrow) {
    m->tokens32.assign(n->tokens32.begin(), n->tokens32.begin() + kp);
    n->tokens32.erase(n->tokens32.begin(), n->tokens32.begin() + kp);
  } else {
    m->tokens.assign(n->tokens.begin(), n->tokens.begin() + kp);
    n->tokens.erase(n->tokens.begin(), n->tokens.begin() + kp);
  }
  m->state.assign(n->state.begin(), n->state.begin() + k);
  n->state.erase(n->state.begin(), n->state.begin() + k);
  if (!n->has_digest.empty()) {
    m->has_digest.assign(n->has_digest.begin(), n->has_digest.begin() + k);
    n->has_digest.erase(n->has_digest.begin(), n->has_digest.begin() + k);
    m->digest.assign(n->digest.begin(), n->digest.begin() + k * 32);
    n->digest.erase(n->digest.begin(), n->digest.begin() + k * 32);
  }
  const int64_t mdev = std::min(n->n_dev, k);
  const int64_t e = slot_entries(n);
  m->runs = n->runs;
  m->slots.assign(n->slots.begin(), n->slots.begin() + mdev * e);
  n->slots.erase(n->slots.begin(), n->slots.begin() + mdev * e);
  m->n_dev = mdev;
  n->n_dev -= mdev;
  m->n_pages = k;
  n->n_pages -= k;
  m->end_depth = n->end_depth - n->n_pages;
  m->lock_ref = n->lock_ref;
  m->ts = n->ts;

  // m replaces n under the parent (same first page, same hash slot).
  Node* parent = n->parent;
  m->hkey = n->hkey;
  auto it = parent->children.find(n->hkey);
  Node** link = &it->second;
  while (*link != n) link = &(*link)->hnext;
  *link = m;
  m->hnext = n->hnext;
  n->hnext = nullptr;
  n->hkey = with_tokens(n, [&](const auto* t) { return page_hash(t, P_); });
  m->children.emplace(n->hkey, n);
  n->parent = m;
  m->dev_children = n->n_dev > 0 ? 1 : 0;

  // Writing summaries: subtree counts are unchanged above m.
  const int64_t old_pin = n->pin_sub;
  int64_t mw = 0, mlast = -1;
  for (int64_t j = 0; j < k; ++j)
    if (m->state[j] == static_cast<uint8_t>(PoolState::kWriting)) {
      mw++;
      mlast = j;
    }
  m->own_writing = mw;
  m->last_writing = mlast;
  m->pin_sub = old_pin;
  n->own_writing -= mw;
  n->last_writing = n->last_writing >= k ? n->last_writing - k : -1;
  n->pin_sub = old_pin - mw;
  refresh(n);
  refresh(m);

  // Recency: m sits just ahead of n (same tick, shallower).
  if (m->n_dev > 0) {
    lru_insert_before(m, n);
    if (n->n_dev == 0) lru_unlink(n);
  }
  pool_sync(n);
  pool_sync(m);
  return m;
}

// Removes n and its subtree; every page in it is without device slots.
void PrefixIndex::delete_subtree(Node* n) {
  for (auto& kv : n->children)
    for (Node* c = kv.second; c;) {
      Node* next = c->hnext;
      delete_subtree(c);
      c = next;
    }
  pool_only_ -= n->n_pages - n->n_dev;
  device_pages_ -= n->n_dev;  // always 0 by the invariant
  protected_pages_ -= n->prot_pages;
  lru_unlink(n);
  pool_erase(n);
  by_id_.erase(n->id);
  delete n;
}

// Drops pages [j, n_pages) of n (all without device slots) and every
// descendant. The truncated node gets a fresh id: its old path end is gone.
void PrefixIndex::truncate_from(Node* n, int64_t j) {
  for (auto& kv : n->children)
    for (Node* c = kv.second; c;) {
      Node* next = c->hnext;
      delete_subtree(c);
      c = next;
    }
  n->children.clear();
  n->dev_children = 0;
  const int64_t removed = n->n_pages - j;
  pool_only_ -= removed;
  if (j == 0) {
    detach_child(n->parent, n);
    protected_pages_ -= n->prot_pages;
    lru_unlink(n);
    pool_erase(n);
    by_id_.erase(n->id);
    delete n;
    return;
  }
  pool_erase(n);
  if (n->narrow)
    n->tokens32.resize(j * P_);
  else
    n->tokens.resize(j * P_);
  n->state.resize(j);
  if (!n->has_digest.empty()) {
    n->has_digest.resize(j);
    n->digest.resize(j * 32);
  }
  n->n_pages = j;
  n->end_depth -= removed;
  by_id_.erase(n->id);
  n->id = next_id_++;
  by_id_.emplace(n->id, n);
  pool_sync(n);
}

// Stamps the path root..end with a new tick; deepest first to the LRU front.
void PrefixIndex::touch_path(Node* end) {
  for (Node* x = end; x && !x->is_root; x = x->parent) {
    x->ts = clock_;
    if (x->n_dev > 0) {
      lru_unlink(x);
      lru_push_front(x);
    }
    if (x->in_pool) pool_sync(x);
  }
}

void PrefixIndex::enforce_pool_bound() {
  if (pool_only_ <= max_pool_only_) return;
  auto it = pool_set_.begin();
  while (pool_only_ > max_pool_only_ && it != pool_set_.end()) {
    Node* x = it->node;
    ++it;
    if (!x->children.empty() || x->lock_ref > 0) continue;
    int64_t drop = std::min(pool_only_ - max_pool_only_, x->n_pages - x->n_dev);
    truncate_from(x, x->n_pages - drop);
  }
}

// chain: nodes whose lock count just reached zero, deepest first.
void PrefixIndex::gc_dead_after_unlock(std::vector<Node*>& chain) {
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
    Node* x = *it;
    for (int64_t j = x->n_dev; j < x->n_pages; ++j)
      if (x->state[j] != static_cast<uint8_t>(PoolState::kInPool)) {
        truncate_from(x, j);
        return;
      }
  }
}

// ---- match ------------------------------------------------------------------

template <class T>
PrefixIndex::Node* PrefixIndex::match_t(const T* toks, int64_t n_pages, const std::string* ns,
                                        MatchOut* out) {
  *out = MatchOut{};
  scratch_.clear();
  Node* node = root_for(ns, false);
  if (!node || n_pages == 0) return nullptr;
  int64_t pos = 0, dev = 0, pool = 0;
  while (pos < n_pages) {
    Node* c = find_child(node, toks + pos * P_);
    if (!c) break;
    // find_child compared the first page: the walk goes on from the second
    int64_t k = match_pages(c, toks + pos * P_, n_pages - pos, 1);
    int64_t u = c->n_dev;
    while (u < c->n_pages && c->state[u] == static_cast<uint8_t>(PoolState::kInPool)) ++u;
    int64_t m = std::min(k, u);
    if (m == 0) break;
    const bool whole = m == c->n_pages;
    if (!whole) c = split(c, m);
    dev += c->n_dev;
    pool += m - c->n_dev;
    scratch_.push_back(c);
    node = c;
    pos += m;
    if (!whole) break;
  }
  if (scratch_.empty()) return nullptr;
  ++clock_;
  touch_path(node);
  out->device_len = dev * P_;
  out->pool_len = pool * P_;
  out->node = node->id;
  const int64_t last = node->n_pages - 1;
  if (!node->has_digest.empty() && node->has_digest[last]) {
    out->has_last_digest = true;
    std::memcpy(out->last_digest, node->digest.data() + last * 32, 32);
  }
  return node;
}

// Leaves the matched path in scratch_ (the mutex is held by the caller).
Status PrefixIndex::match_locked(TokenSpan t, const std::string* ns, MatchOut* out) {
  const int64_t n_pages = t.len / P_;
  if (t.is_int32)
    match_t(static_cast<const int32_t*>(t.data), n_pages, ns, out);
  else
    match_t(static_cast<const int64_t*>(t.data), n_pages, ns, out);
  return Status::kOk;
}

Status PrefixIndex::match(TokenSpan t, const std::string* ns, MatchOut* out, SlotAlloc alloc,
                          void* ctx) {
  std::lock_guard<std::mutex> g(mu_);
  match_locked(t, ns, out);
  if (out->device_len > 0 && alloc) {
    int64_t* dst = alloc(ctx, out->device_len);
    if (!dst) return Status::kNoSpace;
    for (Node* x : scratch_) {
      if (x->n_dev == 0) break;
      write_slots(x, 0, x->n_dev, dst);
      dst += x->n_dev * P_;
    }
  }
  return Status::kOk;
}

Status PrefixIndex::match(TokenSpan t, const std::string* ns, MatchOut* out, SlotRuns* runs) {
  std::lock_guard<std::mutex> g(mu_);
  runs->clear();
  match_locked(t, ns, out);
  for (Node* x : scratch_) {
    if (x->n_dev == 0) break;
    append_runs(x, x->n_dev, runs);
  }
  return Status::kOk;
}

// ---- insert -----------------------------------------------------------------

template <class T>
int64_t PrefixIndex::insert_t(const T* toks, int64_t n_pages, const int64_t* slots,
                              const std::string* ns, const uint8_t* digests, int64_t rows,
                              bool pool_only) {
  if (n_pages == 0) return 0;
  Node* node = root_for(ns, true);
  int64_t pos = 0, cached = 0, changed = 0;
  scratch_.clear();
  std::vector<int64_t> starts;
  while (pos < n_pages) {
    Node* c = find_child(node, toks + pos * P_);
    if (!c) {  // the rest is new: one node
      const int64_t cnt = n_pages - pos;
      c = new_node(node);
      const T* src = toks + pos * P_;
      c->narrow = fits_int32(src, cnt * P_);
      if (c->narrow)
        c->tokens32.assign(src, src + cnt * P_);
      else
        c->tokens.assign(src, src + cnt * P_);
      c->n_pages = cnt;
      c->end_depth = node->is_root ? cnt : node->end_depth + cnt;
      if (pool_only) {
        c->state.assign(cnt, static_cast<uint8_t>(PoolState::kInPool));
        pool_only_ += cnt;
        changed += cnt;
      } else {
        c->state.assign(cnt, static_cast<uint8_t>(PoolState::kUnknown));
        append_slots(c, slots + pos * P_, cnt);
        c->n_dev = cnt;
        device_pages_ += cnt;
        lru_push_front(c);
      }
      attach_child(node, c);
      refresh(c);
      pool_sync(c);
      scratch_.push_back(c);
      starts.push_back(pos);
      node = c;
      pos = n_pages;
      break;
    }
    int64_t k = match_pages(c, toks + pos * P_, n_pages - pos, 1);
    if (k < c->n_pages) c = split(c, k);
    if (pool_only) {
      for (int64_t j = 0; j < k; ++j) {
        uint8_t& s = c->state[j];
        if (s == static_cast<uint8_t>(PoolState::kUnknown)) {
          s = static_cast<uint8_t>(PoolState::kInPool);
          changed++;
        }
      }
    } else {
      if (cached == pos) cached += c->n_dev;
      if (c->n_dev < k) {  // pool-only (or dead) pages come back to device
        const int64_t add = k - c->n_dev;
        append_slots(c, slots + (pos + c->n_dev) * P_, add);
        if (c->n_dev == 0) {
          node->dev_children++;
          lru_push_front(c);
        }
        c->n_dev = k;
        device_pages_ += add;
        pool_only_ -= add;
        refresh(c);
        pool_sync(c);
      }
    }
    scratch_.push_back(c);
    starts.push_back(pos);
    node = c;
    pos += k;
  }
  if (digests && rows > 0) {
    for (size_t i = 0; i < scratch_.size(); ++i) {
      Node* x = scratch_[i];
      for (int64_t j = 0; j < x->n_pages; ++j) {
        int64_t page = starts[i] + j;
        if (page >= rows) break;
        set_digest(x, j, digests + page * 32);
      }
    }
  }
  ++clock_;
  touch_path(node);
  insert_end_ = node;
  enforce_pool_bound();
  return pool_only ? changed : cached * P_;
}

int64_t PrefixIndex::insert(TokenSpan t, const int64_t* slots, const std::string* ns,
                            const uint8_t* digests, int64_t rows) {
  std::lock_guard<std::mutex> g(mu_);
  const int64_t n_pages = t.len / P_;
  if (t.is_int32)
    return insert_t(static_cast<const int32_t*>(t.data), n_pages, slots, ns, digests, rows, false);
  return insert_t(static_cast<const int64_t*>(t.data), n_pages, slots, ns, digests, rows, false);
}

int64_t PrefixIndex::insert_path(TokenSpan t, const int64_t* slots, const std::string* ns,
                                 const uint8_t* digests, int64_t rows, int64_t in_pool_first,
                                 MatchOut* out, SlotRuns* runs) {
  std::lock_guard<std::mutex> g(mu_);
  *out = MatchOut{};
  runs->clear();
  const int64_t n_pages = t.len / P_;
  if (n_pages == 0) return 0;
  int64_t already;
  insert_end_ = nullptr;
  if (t.is_int32)
    already = insert_t(static_cast<const int32_t*>(t.data), n_pages, slots, ns, digests, rows, false);
  else
    already = insert_t(static_cast<const int64_t*>(t.data), n_pages, slots, ns, digests, rows, false);
  Node* end = insert_end_;
  if (in_pool_first >= 0 && in_pool_first < n_pages) {
    const int64_t cnt = n_pages - in_pool_first;
    if (t.is_int32)
      mark_t(MarkOp::kInPool, static_cast<const int32_t*>(t.data), n_pages, in_pool_first, cnt, ns, nullptr);
    else
      mark_t(MarkOp::kInPool, static_cast<const int64_t*>(t.data), n_pages, in_pool_first, cnt, ns, nullptr);
  }
  // Every page of the path is on device now: the path from the root is the match.
  scratch_.clear();
  for (Node* x = end; x && !x->is_root; x = x->parent) scratch_.push_back(x);
  std::reverse(scratch_.begin(), scratch_.end());
  int64_t dev = 0;
  for (Node* x : scratch_) {
    dev += x->n_dev;
    append_runs(x, x->n_dev, runs);
  }
  out->device_len = dev * P_;
  out->node = end ? end->id : 0;
  if (end && !end->has_digest.empty() && end->has_digest[end->n_pages - 1]) {
    out->has_last_digest = true;
    std::memcpy(out->last_digest, end->digest.data() + (end->n_pages - 1) * 32, 32);
  }
  return already;
}

int64_t PrefixIndex::insert_pool_only(TokenSpan t, const std::string* ns, const uint8_t* digests,
                                      int64_t rows) {
  std::lock_guard<std::mutex> g(mu_);
  const int64_t n_pages = t.len / P_;
  if (t.is_int32)
    return insert_t(static_cast<const int32_t*>(t.data), n_pages, nullptr, ns, digests, rows, true);
  return insert_t(static_cast<const int64_t*>(t.data), n_pages, nullptr, ns, digests, rows, true);
}

// ---- locks ------------------------------------------------------------------

Status PrefixIndex::lock(uint64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  if (id == 0) return Status::kOk;
  Node* n = resolve(id);
  if (!n) return Status::kNotFound;
  n->own_locks++;
  for (Node* x = n; !x->is_root; x = x->parent) {
    x->lock_ref++;
    refresh(x);
  }
  return Status::kOk;
}

Status PrefixIndex::unlock(uint64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  if (id == 0) return Status::kOk;
  Node* n = resolve(id);
  if (!n) return Status::kNotFound;
  if (n->own_locks <= 0) return Status::kInvalidArgument;  // unlock must pair with lock(node)
  n->own_locks--;
  std::vector<Node*> zeroed;
  for (Node* x = n; !x->is_root; x = x->parent) {
    x->lock_ref--;
    refresh(x);
    if (x->lock_ref == 0) zeroed.push_back(x);
  }
  gc_dead_after_unlock(zeroed);
  enforce_pool_bound();
  return Status::kOk;
}

// ---- marks ------------------------------------------------------------------

template <class T>
int64_t PrefixIndex::mark_t(MarkOp op, const T* toks, int64_t n_full, int64_t first,
                            int64_t count, const std::string* ns, const uint8_t* mask) {
  if (first < 0 || count < 0 || first + count > n_full) return -1;
  Node* node = root_for(ns, false);
  if (!node || count == 0) return 0;
  const int64_t end = first + count;
  int64_t pos = 0, changed = 0;
  std::vector<Node*> touched;
  constexpr uint8_t U = static_cast<uint8_t>(PoolState::kUnknown);
  constexpr uint8_t I = static_cast<uint8_t>(PoolState::kInPool);
  constexpr uint8_t W = static_cast<uint8_t>(PoolState::kWriting);
  while (pos < end) {
    Node* c = find_child(node, toks + pos * P_);
    if (!c) break;
    int64_t k = match_pages(c, toks + pos * P_, end - pos, 1);
    int64_t a = std::max<int64_t>(first - pos, 0), b = k;
    if (a < b) {
      int64_t before = changed;
      for (int64_t j = a; j < b; ++j) {
        if (mask && !mask[pos + j - first]) continue;  // page not selected
        uint8_t& s = c->state[j];
        switch (op) {
          case MarkOp::kWriting:
            if (j < c->n_dev && s == U) s = W, changed++;
            break;
          case MarkOp::kInPool:
            if (s != I) s = I, changed++;
            break;
          case MarkOp::kWriteFailed:
            if (s == W) s = U, changed++;
            break;
          case MarkOp::kNotInPool:
            if (s == I) s = U, changed++;
            break;
        }
      }
      if (changed != before) {
        recompute_writing(c);
        touched.push_back(c);
      }
    }
    if (k < c->n_pages) break;
    node = c;
    pos += k;
  }
  if (op == MarkOp::kNotInPool) {
    // Drop pages that are now neither on device nor in the pool, unless locked.
    for (Node* x : touched) {
      if (x->lock_ref > 0) continue;
      bool done = false;
      for (int64_t j = x->n_dev; j < x->n_pages; ++j)
        if (x->state[j] != I) {
          truncate_from(x, j);
          done = true;
          break;
        }
      if (done) break;
    }
  }
  enforce_pool_bound();
  return changed;
}

int64_t PrefixIndex::mark(MarkOp op, TokenSpan t, int64_t first_page, int64_t n_pages,
                          const std::string* ns, const uint8_t* mask) {
  std::lock_guard<std::mutex> g(mu_);
  const int64_t n_full = t.len / P_;
  if (t.is_int32)
    return mark_t(op, static_cast<const int32_t*>(t.data), n_full, first_page, n_pages, ns, mask);
  return mark_t(op, static_cast<const int64_t*>(t.data), n_full, first_page, n_pages, ns, mask);
}

// ---- eviction ---------------------------------------------------------------

void PrefixIndex::evict(int64_t num_tokens, std::vector<int64_t>* freed) {
  std::lock_guard<std::mutex> g(mu_);
  if (num_tokens <= 0) return;
  int64_t need = (num_tokens + P_ - 1) / P_;
  Node* x = lru_tail_;
  while (need > 0 && x) {
    Node* ahead = x->lru_prev;
    while (need > 0 && x->dev_children == 0 && x->n_dev > x->prot_pages) {
      const int64_t j = x->n_dev - 1;
      const size_t at = freed->size();
      freed->resize(at + P_);
      write_slots(x, j, 1, freed->data() + at);
      x->slots.resize(j * slot_entries(x));
      x->n_dev = j;
      device_pages_--;
      pool_only_++;
      need--;
      refresh(x);
      if (j == 0) {
        lru_unlink(x);
        x->parent->dev_children--;
      }
      if (x->state[j] == static_cast<uint8_t>(PoolState::kInPool)) {
        pool_sync(x);
      } else {
        truncate_from(x, j);  // deletes x when j == 0
      }
      if (j == 0) break;
    }
    x = ahead;
  }
  enforce_pool_bound();
}

// ---- path helpers -------------------------------------------------------------

Status PrefixIndex::path_digests(uint64_t id, std::vector<uint8_t>* digests,
                                 std::vector<uint8_t>* mask) {
  std::lock_guard<std::mutex> g(mu_);
  digests->clear();
  mask->clear();
  if (id == 0) return Status::kOk;
  Node* n = resolve(id);
  if (!n) return Status::kNotFound;
  digests->assign(n->end_depth * 32, 0);
  mask->assign(n->end_depth, 0);
  for (Node* x = n; !x->is_root; x = x->parent) {
    if (x->has_digest.empty()) continue;
    const int64_t base = x->end_depth - x->n_pages;
    for (int64_t j = 0; j < x->n_pages; ++j)
      if (x->has_digest[j]) {
        (*mask)[base + j] = 1;
        std::memcpy(digests->data() + (base + j) * 32, x->digest.data() + j * 32, 32);
      }
  }
  return Status::kOk;
}

Status PrefixIndex::set_path_digests(uint64_t id, const uint8_t* d, int64_t rows,
                                     int64_t first_page) {
  std::lock_guard<std::mutex> g(mu_);
  if (rows < 0 || first_page < 0) return Status::kInvalidArgument;
  if (id == 0) return rows == 0 ? Status::kOk : Status::kInvalidArgument;
  Node* n = resolve(id);
  if (!n) return Status::kNotFound;
  if (first_page + rows > n->end_depth) return Status::kInvalidArgument;
  const int64_t end = first_page + rows;
  for (Node* x = n; !x->is_root; x = x->parent) {
    const int64_t base = x->end_depth - x->n_pages;
    for (int64_t j = 0; j < x->n_pages; ++j) {
      const int64_t page = base + j;
      if (page >= first_page && page < end) set_digest(x, j, d + (page - first_page) * 32);
    }
  }
  return Status::kOk;
}

Status PrefixIndex::path_states(uint64_t id, std::vector<uint8_t>* states, int64_t* device_pages) {
  std::lock_guard<std::mutex> g(mu_);
  states->clear();
  *device_pages = 0;
  if (id == 0) return Status::kOk;
  Node* n = resolve(id);
  if (!n) return Status::kNotFound;
  states->assign(n->end_depth, 0);
  for (Node* x = n; !x->is_root; x = x->parent) {
    const int64_t base = x->end_depth - x->n_pages;
    std::memcpy(states->data() + base, x->state.data(), x->n_pages);
    *device_pages += x->n_dev;
  }
  return Status::kOk;
}

// ---- reset / sizes ------------------------------------------------------------

void PrefixIndex::clear_all() {
  auto wipe = [this](Node* r) {
    for (auto& kv : r->children)
      for (Node* c = kv.second; c;) {
        Node* next = c->hnext;
        std::vector<Node*> stack{c};
        while (!stack.empty()) {
          Node* y = stack.back();
          stack.pop_back();
          for (auto& kv2 : y->children)
            for (Node* z = kv2.second; z; z = z->hnext) stack.push_back(z);
          delete y;
        }
        c = next;
      }
    r->children.clear();
    r->dev_children = 0;
  };
  wipe(default_root_);
  for (auto& kv : ns_roots_) {
    wipe(kv.second);
    delete kv.second;
  }
  ns_roots_.clear();
  by_id_.clear();
  pool_set_.clear();
  lru_head_ = lru_tail_ = nullptr;
  device_pages_ = protected_pages_ = pool_only_ = 0;
}

void PrefixIndex::reset() {
  std::lock_guard<std::mutex> g(mu_);
  clear_all();
}

int64_t PrefixIndex::total_size() const {
  std::lock_guard<std::mutex> g(mu_);
  return device_pages_ * P_;
}
int64_t PrefixIndex::protected_size() const {
  std::lock_guard<std::mutex> g(mu_);
  return protected_pages_ * P_;
}
int64_t PrefixIndex::evictable_size() const {
  std::lock_guard<std::mutex> g(mu_);
  return (device_pages_ - protected_pages_) * P_;
}
int64_t PrefixIndex::pool_only_pages() const {
  std::lock_guard<std::mutex> g(mu_);
  return pool_only_;
}
int64_t PrefixIndex::num_pages() const {
  std::lock_guard<std::mutex> g(mu_);
  return device_pages_ + pool_only_;
}

IndexStats PrefixIndex::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  IndexStats s{};
  s.total_tokens = device_pages_ * P_;
  s.protected_tokens = protected_pages_ * P_;
  s.evictable_tokens = (device_pages_ - protected_pages_) * P_;
  s.device_pages = device_pages_;
  s.pool_only_pages = pool_only_;
  s.nodes = static_cast<int64_t>(by_id_.size());
  s.namespaces = 1 + static_cast<int64_t>(ns_roots_.size());
  s.clock = static_cast<int64_t>(clock_);
  return s;
}

// ---- consistency check (tests) --------------------------------------------------

std::string PrefixIndex::check_node(const Node* n, int64_t* dev, int64_t* prot, int64_t* pool,
                                    int64_t* pin, int64_t* count) const {
  std::ostringstream e;
  const uint8_t I = static_cast<uint8_t>(PoolState::kInPool);
  const uint8_t W = static_cast<uint8_t>(PoolState::kWriting);
  int64_t sub_pin = 0, devc = 0;
  for (auto& kv : n->children)
    for (const Node* c = kv.second; c; c = c->hnext) {
      if (c->parent != n) e << "node " << c->id << ": bad parent; ";
      if (c->hkey != kv.first ||
          with_tokens(c, [&](const auto* t) { return page_hash(t, P_); }) != c->hkey)
        e << "node " << c->id << ": bad hash key; ";
      if (c->n_pages <= 0) e << "node " << c->id << ": empty; ";
      if (c->end_depth != (n->is_root ? 0 : n->end_depth) + c->n_pages)
        e << "node " << c->id << ": bad depth; ";
      if (c->n_dev > 0 && !n->is_root && n->n_dev != n->n_pages)
        e << "node " << c->id << ": device page below a non-device page; ";
      if (!n->is_root && c->lock_ref > n->lock_ref) e << "node " << c->id << ": lock > parent; ";
      if (!n->is_root && c->ts > n->ts) e << "node " << c->id << ": newer than parent; ";
      auto it = by_id_.find(c->id);
      if (it == by_id_.end() || it->second != c) e << "node " << c->id << ": not in id map; ";
      int64_t cp = 0;
      e << check_node(c, dev, prot, pool, &cp, count);
      sub_pin += cp;
      if (c->n_dev > 0) devc++;
    }
  if (n->is_root) {
    *pin += sub_pin;
    return e.str();
  }
  (*count)++;
  if (n->dev_children != devc) e << "node " << n->id << ": dev_children; ";
  const size_t ntok = n->narrow ? n->tokens32.size() : n->tokens.size();
  if ((int64_t)ntok != n->n_pages * P_ || !(n->narrow ? n->tokens.empty() : n->tokens32.empty()) || (int64_t)n->state.size() != n->n_pages ||
      (int64_t)n->slots.size() != n->n_dev * slot_entries(n) || n->n_dev > n->n_pages)
    e << "node " << n->id << ": sizes; ";
  int64_t w = 0, last = -1;
  for (int64_t j = 0; j < n->n_pages; ++j) {
    if (n->state[j] == W) {
      w++;
      last = j;
      if (j >= n->n_dev) e << "node " << n->id << ": WRITING page off device; ";
    }
    if (j >= n->n_dev && n->state[j] != I && n->lock_ref == 0)
      e << "node " << n->id << ": unlocked dead page; ";
  }
  if (w != n->own_writing || last != n->last_writing) e << "node " << n->id << ": writing; ";
  if (n->pin_sub != w + sub_pin) e << "node " << n->id << ": pin_sub; ";
  *pin += n->pin_sub;
  int64_t p = (n->lock_ref > 0 || sub_pin > 0) ? n->n_dev : last + 1;
  if (p != n->prot_pages) e << "node " << n->id << ": prot_pages; ";
  if (n->in_lru != (n->n_dev > 0)) e << "node " << n->id << ": lru membership; ";
  if (n->in_pool != (n->n_dev < n->n_pages)) e << "node " << n->id << ": pool membership; ";
  if (n->in_pool && (n->pk.ts != n->ts || n->pk.neg_depth != -n->end_depth || n->pk.id != n->id))
    e << "node " << n->id << ": stale pool key; ";
  *dev += n->n_dev;
  *prot += p;
  *pool += n->n_pages - n->n_dev;
  return e.str();
}

std::string PrefixIndex::check() const {
  std::lock_guard<std::mutex> g(mu_);
  std::ostringstream e;
  int64_t dev = 0, prot = 0, pool = 0, pin = 0, count = 0;
  e << check_node(default_root_, &dev, &prot, &pool, &pin, &count);
  for (auto& kv : ns_roots_) e << check_node(kv.second, &dev, &prot, &pool, &pin, &count);
  if (dev != device_pages_) e << "device_pages " << device_pages_ << " != " << dev << "; ";
  if (prot != protected_pages_) e << "protected " << protected_pages_ << " != " << prot << "; ";
  if (pool != pool_only_) e << "pool_only " << pool_only_ << " != " << pool << "; ";
  if (count != (int64_t)by_id_.size()) e << "id map size; ";
  // LRU: ordered by (tick, -depth) from the tail.
  int64_t lru_count = 0;
  for (const Node* x = lru_tail_; x; x = x->lru_prev) {
    lru_count++;
    const Node* y = x->lru_prev;
    if (y && (y->ts < x->ts || (y->ts == x->ts && y->end_depth > x->end_depth)))
      e << "lru order at " << x->id << "; ";
  }
  int64_t lru_nodes = 0;
  for (auto& kv : by_id_) lru_nodes += kv.second->in_lru ? 1 : 0;
  if (lru_count != lru_nodes) e << "lru count; ";
  int64_t pool_nodes = 0;
  for (auto& kv : by_id_) pool_nodes += kv.second->in_pool ? 1 : 0;
  if ((int64_t)pool_set_.size() != pool_nodes) e << "pool set size; ";
  return e.str();
}

}  // namespace kvd
