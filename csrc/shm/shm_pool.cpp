#include "shm/shm_pool.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

#include "shm/copy_hash.h"

namespace kvd::shm {

namespace {
constexpr char kMagic[8] = {'K', 'V', 'D', 'S', 'H', 'M', 'P', '1'};
constexpr uint32_t kVersion = 1;
constexpr uint32_t kNil = 0xFFFFFFFFu;
constexpr uint64_t kHeaderRegion = 4096;
constexpr uint32_t kHasChecksum = 1;

enum : uint32_t { kFree = 0, kWriting = 1, kPublished = 2, kDead = 3 };

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
uint64_t next_pow2(uint64_t x) {
  uint64_t p = 16;
  while (p < x) p <<= 1;
  return p;
}
std::string human(uint64_t b) {
  char buf[64];
  if (b >= (1ULL << 30) && b % (1ULL << 30) == 0) snprintf(buf, sizeof buf, "%lluGiB", (unsigned long long)(b >> 30));
  else if (b >= (1ULL << 20) && b % (1ULL << 20) == 0) snprintf(buf, sizeof buf, "%lluMiB", (unsigned long long)(b >> 20));
  else snprintf(buf, sizeof buf, "%llu bytes", (unsigned long long)b);
  return buf;
}
}  // namespace

struct Header {
  char magic[8];  // written last at creation: a zero magic means "being created"
  uint32_t version;
  uint32_t header_size;   // sizeof(Header): guards against ABI changes (pthread_mutex_t)
  uint32_t objrec_size;
  uint32_t pin_slots;
  uint64_t file_size, block_size, nblocks;
  uint32_t max_objects, index_slots;
  uint64_t objs_off, index_off, next_off, pins_off, data_off;
  uint32_t creator_uid, reserved0;
  alignas(64) pthread_mutex_t mu;
  // ---- everything below is guarded by mu ----
  uint32_t free_block_head, free_blocks, free_obj_head, free_pin_head;
  uint32_t lru_head, lru_tail, objects, writing;
  uint64_t seq, used_blocks, object_bytes, pins_held;
  uint64_t hits, misses, evictions, puts, put_failures, corrupt, removes;
  uint64_t recoveries, reaped_pins, reaped_writes;
};
static_assert(sizeof(Header) <= kHeaderRegion, "header must fit its region");

struct ObjRec {
  uint32_t state, pins, pid, key_len;
  uint64_t key_hash, size, checksum, seq, stamp;
  uint32_t first_block, nblocks, prev, next, next_free, flags;
  char key[kMaxKeyBytes + 1];
};

struct PinRec {
  uint32_t pid;  // 0: free. Written last when taking a pin.
  uint32_t obj, next_free, reserved;
};

namespace {
struct Layout {
  uint64_t objs_off, index_off, next_off, pins_off, data_off, nblocks;
  uint32_t index_slots;
};

// The layout is a pure function of (size, block_size, pin_slots): open
// recomputes it and compares with the header to detect damaged headers.
bool compute_layout(uint64_t size, uint64_t bs, uint32_t pin_slots, Layout* L) {
  uint64_t fixed = kHeaderRegion + uint64_t(pin_slots) * sizeof(PinRec) + 3 * 4096;
  if (size <= fixed + bs) return false;
  uint64_t n = (size - fixed) / (bs + sizeof(ObjRec) + 4 + 16);
  if (n > 0xFFFFFFF0ULL) n = 0xFFFFFFF0ULL;
  while (n > 0) {
    L->index_slots = uint32_t(next_pow2(2 * n));
    L->objs_off = kHeaderRegion;
    L->index_off = align_up(L->objs_off + n * sizeof(ObjRec), 64);
    L->next_off = align_up(L->index_off + uint64_t(L->index_slots) * 8, 64);
    L->pins_off = align_up(L->next_off + n * 4, 64);
    L->data_off = align_up(L->pins_off + uint64_t(pin_slots) * sizeof(PinRec), 4096);
    if (L->data_off + n * bs <= size) {
      L->nblocks = n;
      return true;
    }
    uint64_t over = L->data_off + n * bs - size;
    n -= std::max<uint64_t>(1, over / bs);
  }
  return false;
}

Status fail(std::string* err, Status s, std::string msg) {
  if (err) *err = std::move(msg);
  return s;
}
}  // namespace

// ---------------------------------------------------------------------------
// open / create / destroy

bool Pool::valid_name(const std::string& name) {
  if (name.empty() || name.size() > 200 || name[0] == '.') return false;
  for (char c : name)
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-')) return false;
  return true;
}

std::string Pool::path_for(const std::string& name) { return "/dev/shm/" + std::string(kFilePrefix) + name; }

Status Pool::destroy(const std::string& name, std::string* err) {
  if (!valid_name(name))
    return fail(err, Status::kInvalidArgument, "bad pool name '" + name + "': use letters, digits, '.', '_', '-'");
  std::string path = path_for(name);
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return fail(err, Status::kNotFound, "pool '" + name + "' does not exist (" + path + ")");
    return fail(err, Status::kIoError, "cannot remove " + path + ": " + strerror(errno));
  }
  return Status::kOk;
}

Status Pool::open(const std::string& name, OpenMode mode, const CreateOptions& opt,
                  std::unique_ptr<Pool>* out, std::string* err, bool* created) {
  if (created) *created = false;
  if (!valid_name(name))
    return fail(err, Status::kInvalidArgument,
                "bad pool name '" + name + "': use 1..200 of letters, digits, '.', '_', '-' (not starting with '.')");
  const std::string path = path_for(name);
  const std::string recreate = "; recreate it: `kvdirect pool destroy " + name + "` (then it is created again on first use)";
  std::unique_ptr<Pool> p(new Pool());
  p->name_ = name;

  for (int attempt = 0; attempt < 3; ++attempt) {
    if (mode != OpenMode::kCreate) {
      int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
      if (fd >= 0) {
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
          ::close(fd);
          return fail(err, Status::kIoError, path + " is not a regular file" + recreate);
        }
        if (st.st_uid != geteuid()) {
          ::close(fd);
          return fail(err, Status::kUnavailable,
                      path + " is owned by uid " + std::to_string(st.st_uid) + ", not by this user (uid " +
                          std::to_string(geteuid()) + "): refusing to share a pool across users; use another name");
        }
        if (st.st_mode & 022) {
          ::close(fd);
          char m[16];
          snprintf(m, sizeof m, "%03o", unsigned(st.st_mode & 0777));
          return fail(err, Status::kUnavailable,
                      path + " has mode " + m + " (group/world writable): refusing to use it; `chmod 600 " + path +
                          "` or `kvdirect pool destroy " + name + "`");
        }
        // A creator holds flock(LOCK_EX) while it initialises and writes the magic
        // last: wait for a live creator however long it takes (fallocate of a big
        // pool), but only ~1 s for one that may have died before taking the flock.
        Header h{};
        for (int i = 0; i < 100; ++i) {
          std::memset(&h, 0, sizeof h);
          ssize_t r = pread(fd, &h, sizeof h, 0);
          fstat(fd, &st);
          if (r == ssize_t(sizeof h) && std::memcmp(h.magic, kMagic, 8) == 0) break;
          bool zero_magic = r < 8 || std::all_of(h.magic, h.magic + 8, [](char c) { return c == 0; });
          if (!zero_magic) break;
          if (flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
            flock(fd, LOCK_SH);  // blocks until the creator finishes or dies
            flock(fd, LOCK_UN);
            continue;
          }
          flock(fd, LOCK_UN);
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
        }
        auto bad = [&](const std::string& why) {
          ::close(fd);
          return fail(err, Status::kCorrupt, "shm pool '" + name + "' (" + path + "): " + why + recreate);
        };
        if (st.st_size < off_t(sizeof(Header))) return bad("file truncated to " + std::to_string(st.st_size) + " bytes");
        if (std::memcmp(h.magic, kMagic, 8) != 0) {
          if (std::all_of(h.magic, h.magic + 8, [](char c) { return c == 0; }))
            return bad("never finished initialising (its creator died?)");
          return bad("not a kvdirect pool (bad magic)");
        }
        if (h.version != kVersion)
          return bad("created with pool format v" + std::to_string(h.version) + ", this kvdirect reads v" +
                     std::to_string(kVersion));
        if (h.header_size != sizeof(Header) || h.objrec_size != sizeof(ObjRec))
          return bad("created by an incompatible build (header/record sizes differ)");
        if (uint64_t(st.st_size) != h.file_size)
          return bad("file is " + std::to_string(st.st_size) + " bytes but its header says " +
                     std::to_string(h.file_size) + " (truncated?)");
        Layout L;
        if (!compute_layout(h.file_size, h.block_size, h.pin_slots, &L) || L.nblocks != h.nblocks ||
            L.index_slots != h.index_slots || L.objs_off != h.objs_off || L.index_off != h.index_off ||
            L.next_off != h.next_off || L.pins_off != h.pins_off || L.data_off != h.data_off ||
            h.max_objects != h.nblocks)
          return bad("header layout parameters are inconsistent (damaged header)");
        void* m = mmap(nullptr, h.file_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
          ::close(fd);
          return fail(err, Status::kIoError, "mmap " + path + ": " + strerror(errno));
        }
        p->fd_ = fd;
        p->base_ = static_cast<uint8_t*>(m);
        p->map_size_ = h.file_size;
        break;
      }
      if (errno != ENOENT)
        return fail(err, Status::kIoError, "cannot open " + path + ": " + strerror(errno));
      if (mode == OpenMode::kOpen)
        return fail(err, Status::kNotFound,
                    "shm pool '" + name + "' does not exist; create it with `kvdirect pool create " + name +
                        " --size 8GiB` or open shm://" + name + "?size=8GiB&create=auto");
    }
    // ---- create ----
    if (opt.block_size < 4096 || opt.block_size > (64ULL << 20) || (opt.block_size & (opt.block_size - 1)))
      return fail(err, Status::kInvalidArgument,
                  "block size " + std::to_string(opt.block_size) + " must be a power of two in 4KiB..64MiB");
    if (opt.pin_slots < 16 || opt.pin_slots > (1u << 20))
      return fail(err, Status::kInvalidArgument, "pin slots must be in 16..1048576");
    Layout L;
    if (!compute_layout(opt.size, opt.block_size, opt.pin_slots, &L))
      return fail(err, Status::kInvalidArgument,
                  "pool size " + human(opt.size) + " is too small for block size " + human(opt.block_size));
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
      if (errno == EEXIST && mode == OpenMode::kAuto) continue;  // lost a creation race: open it
      if (errno == EEXIST)
        return fail(err, Status::kInvalidArgument,
                    "shm pool '" + name + "' already exists; use it, or `kvdirect pool destroy " + name + "` first");
      return fail(err, Status::kIoError, "cannot create " + path + ": " + strerror(errno));
    }
    flock(fd, LOCK_EX);  // released by the close below or by our death: openers wait on it
    fchmod(fd, 0600);    // regardless of umask
    int rc = posix_fallocate(fd, 0, off_t(opt.size));
    if (rc != 0) {
      ::unlink(path.c_str());
      ::close(fd);
      return fail(err, rc == ENOSPC ? Status::kNoSpace : Status::kIoError,
                  "cannot reserve " + human(opt.size) + " in /dev/shm for pool '" + name + "': " + strerror(rc) +
                      " (free space in /dev/shm or choose a smaller --size)");
    }
    void* m = mmap(nullptr, opt.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
      ::unlink(path.c_str());
      ::close(fd);
      return fail(err, Status::kIoError, "mmap " + path + ": " + strerror(errno));
    }
    auto* h = static_cast<Header*>(m);
    h->version = kVersion;
    h->header_size = sizeof(Header);
    h->objrec_size = sizeof(ObjRec);
    h->pin_slots = opt.pin_slots;
    h->file_size = opt.size;
    h->block_size = opt.block_size;
    h->nblocks = L.nblocks;
    h->max_objects = uint32_t(L.nblocks);
    h->index_slots = L.index_slots;
    h->objs_off = L.objs_off;
    h->index_off = L.index_off;
    h->next_off = L.next_off;
    h->pins_off = L.pins_off;
    h->data_off = L.data_off;
    h->creator_uid = geteuid();
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&h->mu, &a);
    pthread_mutexattr_destroy(&a);
    p->fd_ = fd;
    p->base_ = static_cast<uint8_t*>(m);
    p->map_size_ = opt.size;
    p->hdr_ = h;
    p->objs_ = reinterpret_cast<ObjRec*>(p->base_ + h->objs_off);
    p->next_ = reinterpret_cast<uint32_t*>(p->base_ + h->next_off);
    p->pins_ = reinterpret_cast<PinRec*>(p->base_ + h->pins_off);
    // fallocate'd tmpfs pages are zero: index empty, records FREE, pins free.
    // repair_locked() builds the free lists and counters from that state.
    p->index_ = reinterpret_cast<uint64_t*>(p->base_ + h->index_off);
    p->data_ = p->base_ + h->data_off;
    p->repair_locked();
    h->recoveries = 0;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    std::memcpy(h->magic, kMagic, 8);
    flock(fd, LOCK_UN);
    if (created) *created = true;
    break;
  }
  if (!p->base_)
    return fail(err, Status::kUnavailable, "could not open or create shm pool '" + name + "' (creation race)");
  p->hdr_ = reinterpret_cast<Header*>(p->base_);
  p->objs_ = reinterpret_cast<ObjRec*>(p->base_ + p->hdr_->objs_off);
  p->index_ = reinterpret_cast<uint64_t*>(p->base_ + p->hdr_->index_off);
  p->next_ = reinterpret_cast<uint32_t*>(p->base_ + p->hdr_->next_off);
  p->pins_ = reinterpret_cast<PinRec*>(p->base_ + p->hdr_->pins_off);
  p->data_ = p->base_ + p->hdr_->data_off;
  *out = std::move(p);
  return Status::kOk;
}

Pool::~Pool() { close(); }

void Pool::close() {
  std::unique_lock<std::shared_mutex> g(close_mu_);
  if (base_) munmap(base_, map_size_);
  if (fd_ >= 0) ::close(fd_);
  base_ = nullptr;
  fd_ = -1;
}

// ---------------------------------------------------------------------------
// locking and crash repair

void Pool::lock() {
  int rc = pthread_mutex_lock(&hdr_->mu);
  if (rc == EOWNERDEAD) {
    // The previous owner died inside a critical section: rebuild, then mark usable.
    repair_locked();
    pthread_mutex_consistent(&hdr_->mu);
  } else if (rc != 0) {
    throw std::runtime_error("shm pool '" + name_ + "': lock failed (" + strerror(rc) +
                             "); recreate it: `kvdirect pool destroy " + name_ + "`");
  }
}

void Pool::unlock() { pthread_mutex_unlock(&hdr_->mu); }

class Pool::Guard {
 public:
  explicit Guard(Pool* p) : p_(p) { p_->lock(); }
  ~Guard() { p_->unlock(); }

 private:
  Pool* p_;
};

bool Pool::dead(uint32_t pid) { return pid == 0 || (kill(pid_t(pid), 0) != 0 && errno == ESRCH); }

void Pool::maybe_hold(const char* phase) {
  if (hold_phase_.empty() || hold_phase_ != phase) return;
  hold_phase_.clear();  // one shot
  if (!hold_marker_.empty()) {
    int fd = ::open(hold_marker_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) ::close(fd);
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(hold_seconds_));
}

void Pool::debug_hold(const std::string& phase, double seconds, const std::string& marker) {
  hold_phase_ = phase;
  hold_seconds_ = seconds;
  hold_marker_ = marker;
}

// Rebuilds free lists, index, LRU, pin counts and counters from the object and
// pin records. Records are the source of truth; everything else is derived.
void Pool::repair_locked() {
  Header* h = hdr_;
  const uint32_t N = h->max_objects;
  const uint64_t NB = h->nblocks, bs = h->block_size;
  std::vector<std::pair<uint32_t, bool>> pid_cache;
  auto is_dead = [&](uint32_t pid) {
    for (auto& e : pid_cache)
      if (e.first == pid) return e.second;
    bool d = dead(pid);
    pid_cache.emplace_back(pid, d);
    return d;
  };
  std::vector<uint32_t> pincount(N, 0);
  for (uint32_t i = 0; i < h->pin_slots; ++i) {
    PinRec& p = pins_[i];
    if (p.pid == 0) continue;
    if (p.obj >= N || is_dead(p.pid)) {
      p.pid = 0;
      h->reaped_pins++;
    } else {
      pincount[p.obj]++;
    }
  }
  std::vector<uint8_t> owned(NB, 0);
  std::vector<uint32_t> chain;
  std::vector<uint32_t> published;
  auto walk = [&](ObjRec& o) {  // collects the chain if valid and unowned
    chain.clear();
    if (o.key_len == 0 || o.key_len > kMaxKeyBytes) return false;
    if (o.nblocks != (o.size + bs - 1) / bs) return false;
    uint32_t b = o.first_block;
    for (uint32_t k = 0; k < o.nblocks; ++k) {
      if (b >= NB || owned[b]) return false;
      chain.push_back(b);
      b = next_[b];
    }
    return true;
  };
  for (uint32_t id = 0; id < N; ++id) {
    ObjRec& o = objs_[id];
    bool keep = false;
    if (o.state == kPublished) keep = true;
    else if (o.state == kWriting) {
      keep = !is_dead(o.pid);
      if (!keep) h->reaped_writes++;
    } else if (o.state == kDead) keep = pincount[id] > 0;
    if (keep && !walk(o)) {
      keep = false;
      h->corrupt++;
    }
    if (keep) {
      for (uint32_t b : chain) owned[b] = 1;
      o.pins = pincount[id];
      if (o.state == kPublished) published.push_back(id);
    } else {
      o.state = kFree;
      o.pins = 0;
      pincount[id] = 0;
    }
  }
  // drop pins on objects that were just freed
  for (uint32_t i = 0; i < h->pin_slots; ++i)
    if (pins_[i].pid != 0 && objs_[pins_[i].obj].state == kFree) pins_[i].pid = 0;
  // index: later publications of a key win over earlier ones
  std::memset(index_, 0, uint64_t(h->index_slots) * 8);
  std::sort(published.begin(), published.end(), [&](uint32_t a, uint32_t b) { return objs_[a].seq < objs_[b].seq; });
  for (uint32_t id : published) {
    ObjRec& o = objs_[id];
    int64_t old = index_find(o.key, o.key_len, o.key_hash);
    if (old >= 0) {
      index_erase(uint32_t(old));
      ObjRec& x = objs_[old];
      if (x.pins > 0) {
        x.state = kDead;
      } else {
        x.state = kFree;
        uint32_t b = x.first_block;
        for (uint32_t k = 0; k < x.nblocks; ++k, b = next_[b]) owned[b] = 0;
      }
    }
    index_insert(id);
  }
  // free lists (only free blocks' next pointers are rewritten; owned chains stay)
  h->free_block_head = kNil;
  h->free_blocks = 0;
  for (uint64_t b = NB; b-- > 0;)
    if (!owned[b]) {
      next_[b] = h->free_block_head;
      h->free_block_head = uint32_t(b);
      h->free_blocks++;
    }
  h->free_obj_head = kNil;
  h->objects = h->writing = 0;
  h->object_bytes = 0;
  h->pins_held = 0;
  h->lru_head = h->lru_tail = kNil;
  std::vector<uint32_t> live;
  for (uint32_t id = N; id-- > 0;) {
    ObjRec& o = objs_[id];
    if (o.state == kFree) {
      o.next_free = h->free_obj_head;
      h->free_obj_head = id;
    } else if (o.state == kWriting) {
      h->writing++;
    } else if (o.state == kPublished) {
      live.push_back(id);
    }
    h->pins_held += o.pins;
  }
  // LRU: restore recency order from the stamps
  std::sort(live.begin(), live.end(), [&](uint32_t a, uint32_t b) { return objs_[a].stamp < objs_[b].stamp; });
  for (uint32_t id : live) {
    lru_push_front(id);
    h->objects++;
    h->object_bytes += objs_[id].size;
  }
  h->free_pin_head = kNil;
  for (uint32_t i = h->pin_slots; i-- > 0;)
    if (pins_[i].pid == 0) {
      pins_[i].next_free = h->free_pin_head;
      h->free_pin_head = i;
    }
  h->used_blocks = NB - h->free_blocks;
  h->recoveries++;
}

// Reclaims pins and reservations of processes that died outside the lock.
void Pool::reap_dead_locked() {
  Header* h = hdr_;
  std::vector<std::pair<uint32_t, bool>> cache;
  auto is_dead = [&](uint32_t pid) {
    for (auto& e : cache)
      if (e.first == pid) return e.second;
    bool d = dead(pid);
    cache.emplace_back(pid, d);
    return d;
  };
  for (uint32_t i = 0; i < h->pin_slots; ++i)
    if (pins_[i].pid != 0 && is_dead(pins_[i].pid)) {
      unpin(i);
      h->reaped_pins++;
    }
  for (uint32_t id = 0; id < h->max_objects; ++id)
    if (objs_[id].state == kWriting && is_dead(objs_[id].pid)) {
      free_object(id);
      h->writing--;
      h->reaped_writes++;
    }
}

// ---------------------------------------------------------------------------
// metadata primitives (all under the lock)

ObjRec* Pool::obj(uint32_t id) { return &objs_[id]; }
uint8_t* Pool::block_ptr(uint32_t b) { return data_ + uint64_t(b) * hdr_->block_size; }

int64_t Pool::index_find(const char* key, size_t len, uint64_t hash) {
  const uint64_t mask = hdr_->index_slots - 1;
  const uint32_t tag = uint32_t(hash >> 32);
  for (uint64_t i = hash & mask;; i = (i + 1) & mask) {
    uint64_t s = index_[i];
    if (s == 0) return -1;
    uint32_t id = uint32_t(s) - 1;
    if (uint32_t(s >> 32) == tag && objs_[id].key_len == len && std::memcmp(objs_[id].key, key, len) == 0)
      return id;
  }
}

void Pool::index_insert(uint32_t id) {
  const uint64_t mask = hdr_->index_slots - 1;
  uint64_t hash = objs_[id].key_hash;
  uint64_t i = hash & mask;
  while (index_[i] != 0) i = (i + 1) & mask;
  index_[i] = (uint64_t(uint32_t(hash >> 32)) << 32) | (uint64_t(id) + 1);
}

void Pool::index_erase(uint32_t id) {
  const uint64_t mask = hdr_->index_slots - 1;
  uint64_t i = objs_[id].key_hash & mask;
  while (index_[i] != 0 && uint32_t(index_[i]) != id + 1) i = (i + 1) & mask;
  if (index_[i] == 0) return;
  // backward-shift deletion keeps probe chains intact without tombstones
  uint64_t j = i;
  for (;;) {
    j = (j + 1) & mask;
    if (index_[j] == 0) break;
    uint64_t home = objs_[uint32_t(index_[j]) - 1].key_hash & mask;
    bool movable = (j > i) ? (home <= i || home > j) : (home <= i && home > j);
    if (movable) {
      index_[i] = index_[j];
      i = j;
    }
  }
  index_[i] = 0;
}

void Pool::lru_unlink(uint32_t id) {
  ObjRec& o = objs_[id];
  if (o.prev != kNil) objs_[o.prev].next = o.next;
  else hdr_->lru_head = o.next;
  if (o.next != kNil) objs_[o.next].prev = o.prev;
  else hdr_->lru_tail = o.prev;
  o.prev = o.next = kNil;
}

void Pool::lru_push_front(uint32_t id) {
  ObjRec& o = objs_[id];
  o.prev = kNil;
  o.next = hdr_->lru_head;
  if (o.next != kNil) objs_[o.next].prev = id;
  hdr_->lru_head = id;
  if (hdr_->lru_tail == kNil) hdr_->lru_tail = id;
  o.stamp = ++hdr_->seq;
}

void Pool::free_object(uint32_t id) {
  ObjRec& o = objs_[id];
  o.state = kFree;  // first: from here on repair treats the blocks as free
  if (o.nblocks) {
    uint32_t last = o.first_block;
    for (uint32_t k = 1; k < o.nblocks; ++k) last = next_[last];
    next_[last] = hdr_->free_block_head;
    hdr_->free_block_head = o.first_block;
    hdr_->free_blocks += o.nblocks;
    hdr_->used_blocks -= o.nblocks;
  }
  o.pins = 0;
  o.next_free = hdr_->free_obj_head;
  hdr_->free_obj_head = id;
}

// Removes a published object from index and LRU; frees it unless pinned.
void Pool::unlink_published(uint32_t id) {
  ObjRec& o = objs_[id];
  index_erase(id);
  lru_unlink(id);
  hdr_->objects--;
  hdr_->object_bytes -= o.size;
  if (o.pins > 0) o.state = kDead;
  else free_object(id);
}

bool Pool::evict_one() {
  for (uint32_t id = hdr_->lru_tail; id != kNil; id = objs_[id].prev) {
    if (objs_[id].pins == 0) {
      unlink_published(id);
      hdr_->evictions++;
      return true;
    }
  }
  return false;
}

Status Pool::reserve(const std::string& key, uint64_t size, uint32_t* out) {
  Header* h = hdr_;
  const uint64_t bs = h->block_size;
  const uint64_t nb = (size + bs - 1) / bs;
  if (nb > h->nblocks) return Status::kTooLarge;
  bool reaped = false;
  while (h->free_blocks < nb || h->free_obj_head == kNil) {
    if (evict_one()) continue;
    if (!reaped) {
      reap_dead_locked();
      reaped = true;
      continue;
    }
    return Status::kNoSpace;
  }
  uint32_t id = h->free_obj_head;
  ObjRec& o = objs_[id];
  h->free_obj_head = o.next_free;
  uint32_t first = nb ? h->free_block_head : kNil;
  if (nb) {  // the first nb free blocks are already a chain: cut it off the free list
    uint32_t last = first;
    for (uint64_t k = 1; k < nb; ++k) last = next_[last];
    h->free_block_head = next_[last];
    maybe_hold("alloc");  // test hook: dying here leaks blocks unless repair works
    next_[last] = kNil;
    h->free_blocks -= uint32_t(nb);
    h->used_blocks += nb;
  }
  o.pid = uint32_t(getpid());
  o.key_len = uint32_t(key.size());
  std::memcpy(o.key, key.data(), key.size());
  o.key[key.size()] = 0;
  o.key_hash = key_hash64(key.data(), key.size());
  o.size = size;
  o.checksum = 0;
  o.flags = 0;
  o.first_block = first;
  o.nblocks = uint32_t(nb);
  o.pins = 0;
  o.prev = o.next = kNil;
  __atomic_thread_fence(__ATOMIC_RELEASE);
  o.state = kWriting;  // last: the record is complete
  h->writing++;
  *out = id;
  return Status::kOk;
}

void Pool::publish(uint32_t id, uint64_t checksum, bool has_checksum) {
  Header* h = hdr_;
  ObjRec& o = objs_[id];
  o.checksum = checksum;
  o.flags = has_checksum ? kHasChecksum : 0;
  o.seq = ++h->seq;
  int64_t old = index_find(o.key, o.key_len, o.key_hash);
  if (old >= 0) unlink_published(uint32_t(old));
  __atomic_thread_fence(__ATOMIC_RELEASE);
  o.state = kPublished;
  h->writing--;
  h->objects++;
  h->object_bytes += o.size;
  index_insert(id);
  lru_push_front(id);
  h->puts++;
}

uint32_t Pool::pin_obj(uint32_t id) {
  Header* h = hdr_;
  if (h->free_pin_head == kNil) reap_dead_locked();
  if (h->free_pin_head == kNil) return kNil;
  uint32_t p = h->free_pin_head;
  h->free_pin_head = pins_[p].next_free;
  pins_[p].obj = id;
  objs_[id].pins++;
  h->pins_held++;
  __atomic_thread_fence(__ATOMIC_RELEASE);
  pins_[p].pid = uint32_t(getpid());
  return p;
}

void Pool::unpin(uint32_t p) {
  Header* h = hdr_;
  uint32_t id = pins_[p].obj;
  pins_[p].pid = 0;
  pins_[p].next_free = h->free_pin_head;
  h->free_pin_head = p;
  ObjRec& o = objs_[id];
  if (o.pins > 0) o.pins--;
  h->pins_held--;
  if (o.pins == 0 && o.state == kDead) free_object(id);
}

// ---------------------------------------------------------------------------
// data copies (no lock held: the blocks belong to a reservation or a pinned object)

namespace {
template <bool kToPool>
void copy_object(uint8_t* data, const uint32_t* next, uint64_t bs, uint32_t first_block, const uint64_t* addrs,
                 const uint64_t* sizes, size_t nseg, CopyHasher* hasher, bool stream = false) {
  uint32_t b = first_block;
  uint64_t boff = 0;
  for (size_t j = 0; j < nseg; ++j) {
    auto* p = reinterpret_cast<uint8_t*>(addrs[j]);
    uint64_t rem = sizes[j];
    while (rem) {
      if (boff == bs) {
        b = next[b];
        boff = 0;
      }
      uint64_t n = std::min(rem, bs - boff);
      uint8_t* bp = data + uint64_t(b) * bs + boff;
      uint8_t* dst = kToPool ? bp : p;
      const uint8_t* src = kToPool ? p : bp;
      if (hasher) hasher->copy(dst, src, n);
      else fast_copy(dst, src, n, stream);
      p += n;
      rem -= n;
      boff += n;
    }
  }
}

// Bytes [from, from + len) of an object whose blocks are listed in `blocks`.
template <bool kToPool>
void copy_range(uint8_t* data, const uint32_t* blocks, uint64_t bs, const uint64_t* addrs, const uint64_t* sizes,
                size_t nseg, uint64_t from, uint64_t len, CopyHasher* hasher, bool stream) {
  size_t j = 0;
  uint64_t seg_off = from;
  while (j < nseg && seg_off >= sizes[j]) seg_off -= sizes[j++];
  uint64_t bi = from / bs, boff = from % bs;
  while (len && j < nseg) {
    const uint64_t n = std::min(std::min(len, sizes[j] - seg_off), bs - boff);
    uint8_t* bp = data + uint64_t(blocks[bi]) * bs + boff;
    uint8_t* p = reinterpret_cast<uint8_t*>(addrs[j]) + seg_off;
    uint8_t* dst = kToPool ? bp : p;
    const uint8_t* src = kToPool ? p : bp;
    if (n) {
      if (hasher) hasher->copy(dst, src, n);
      else fast_copy(dst, src, n, stream);
    }
    len -= n;
    seg_off += n;
    boff += n;
    if (seg_off == sizes[j]) {
      ++j;
      seg_off = 0;
    }
    if (boff == bs) {
      ++bi;
      boff = 0;
    }
  }
}

bool key_ok(const std::string& k) { return !k.empty() && k.size() <= kMaxKeyBytes; }
}  // namespace

// A published record is read only when its size agrees with its block count and its first
// block lies in the pool: a damaged record is a miss, never a walk past the data region.
bool Pool::record_ok(uint32_t id) const {
  const ObjRec& o = objs_[id];
  const uint64_t nb = hdr_->nblocks, bs = hdr_->block_size;
  return o.nblocks <= nb && o.nblocks == (o.size + bs - 1) / bs && (o.nblocks == 0 || o.first_block < nb);
}

void Pool::exists(const std::string* keys, size_t n, uint8_t* out) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  Guard g(this);
  for (size_t i = 0; i < n; ++i)
    out[i] = key_ok(keys[i]) && index_find(keys[i].data(), keys[i].size(), key_hash64(keys[i].data(), keys[i].size())) >= 0;
}

uint64_t Pool::prefault(uint64_t offset, uint64_t length) {
#ifdef MADV_POPULATE_WRITE
  constexpr int kAdvice = MADV_POPULATE_WRITE;
#else
  constexpr int kAdvice = 23;  // MADV_POPULATE_WRITE (Linux 5.14); older kernels answer EINVAL
#endif
  std::shared_lock<std::shared_mutex> g(close_mu_);
  const uint64_t total = data_bytes();
  if (offset >= total) return 0;
  offset &= ~uint64_t(4095);  // madvise wants a page-aligned start (data_ is block-aligned)
  const uint64_t n = std::min(length, total - offset);
  return n && madvise(data_ + offset, n, kAdvice) == 0 ? n : 0;
}

void Pool::set_copy_options(const CopyOptions& o) {
  std::lock_guard<std::mutex> g(copiers_mu_);
  copy_opt_ = o;  // a batch uses copy_opt_.threads of the pool's threads (grown when short)
}

std::shared_ptr<ThreadPool> Pool::copiers() {
  std::lock_guard<std::mutex> g(copiers_mu_);
  const int pid = int(getpid());
  if (copiers_ && copiers_pid_ != pid)  // forked: those threads are not ours; never join them
    new std::shared_ptr<ThreadPool>(std::move(copiers_));
  const unsigned want = std::max(copy_opt_.threads, hardware_threads());
  if (!copiers_ || copiers_->size() < want) {  // a batch still running keeps the old one alive
    copiers_ = std::make_shared<ThreadPool>(want);
    copiers_pid_ = pid;
  }
  return copiers_;
}

// Moves objects [0, n) (obj[i] == kNil: skipped) between their blocks and their
// segments; hash[i]: fold object i into a checksum, returned in sums[i]; ok[i]
// is cleared for an object whose block chain leaves the pool (nothing copied).
// Small batches: whole objects on the caller. Large ones: units of whole
// blocks, spread over the copy threads, each unit hashed apart and the parts
// merged in object order.
void Pool::copy_batch(bool to_pool, size_t n, const uint32_t* obj, const uint8_t* hash, const uint64_t* addrs,
                      const uint64_t* sizes, size_t nseg, uint64_t batch_bytes, uint64_t* sums, uint8_t* ok,
                      const char* hold_phase) {
  const uint64_t bs = hdr_->block_size, nb = hdr_->nblocks;
  const bool stream = batch_bytes >= copy_opt_.stream_min_bytes;
  const unsigned threads = copy_opt_.threads ? copy_opt_.threads : hardware_threads();
  bool held = false;
  auto hold_once = [&](unsigned w) {
    if (w == 0 && !held) {
      held = true;
      maybe_hold(hold_phase);  // test hook: dying here leaves reservations / pins to reclaim
    }
  };
  // Block lists first (the chain is walked once per object), bounded by the pool.
  std::vector<uint64_t> first(n + 1, 0);
  std::vector<uint32_t> blocks;
  for (size_t i = 0; i < n; ++i) {
    first[i] = blocks.size();
    if (obj[i] == kNil) continue;
    const ObjRec& o = objs_[obj[i]];
    uint32_t b = o.first_block;
    for (uint32_t k = 0; k < o.nblocks; ++k) {
      if (b >= nb) {
        ok[i] = 0;
        break;
      }
      blocks.push_back(b);
      b = next_[b];
    }
  }
  first[n] = blocks.size();
  if (batch_bytes < copy_opt_.parallel_min_bytes || threads <= 1) {
    for (size_t i = 0; i < n; ++i) {
      if (obj[i] == kNil || !ok[i]) continue;
      const uint64_t size = objs_[obj[i]].size;
      CopyHasher h(stream);
      auto* hp = hash[i] ? &h : nullptr;
      if (to_pool)
        copy_range<true>(data_, blocks.data() + first[i], bs, addrs + i * nseg, sizes + i * nseg, nseg, 0, size, hp, stream);
      else
        copy_range<false>(data_, blocks.data() + first[i], bs, addrs + i * nseg, sizes + i * nseg, nseg, 0, size, hp, stream);
      if (hp) sums[i] = h.digest();
      hold_once(0);
    }
    if (stream) copy_fence();
    return;
  }
  // Units: about kUnitBytes of whole blocks of one object each.
  constexpr uint64_t kUnitBytes = 256 << 10;
  const uint64_t unit = std::max<uint64_t>(bs, kUnitBytes / bs * bs);
  struct Unit {
    uint32_t i;
    uint64_t from, len;
  };
  std::vector<Unit> units;
  for (size_t i = 0; i < n; ++i) {
    if (obj[i] == kNil || !ok[i]) continue;
    const uint64_t size = objs_[obj[i]].size;
    if (size == 0 && hash[i]) sums[i] = CopyHasher().digest();  // no unit: nothing to merge
    for (uint64_t off = 0; off < size; off += unit) units.push_back({uint32_t(i), off, std::min(unit, size - off)});
  }
  std::vector<CopyHasher> parts(units.size());
  const std::function<void(size_t, unsigned)> one = [&](size_t u, unsigned w) {
    const Unit& x = units[u];
    const uint32_t* bl = blocks.data() + first[x.i];
    const uint64_t* a = addrs + x.i * nseg;
    const uint64_t* z = sizes + x.i * nseg;
    CopyHasher* hp = nullptr;
    if (hash[x.i]) {
      parts[u] = CopyHasher::part_at(x.from, stream);
      hp = &parts[u];
    }
    if (to_pool)
      copy_range<true>(data_, bl, bs, a, z, nseg, x.from, x.len, hp, stream);
    else
      copy_range<false>(data_, bl, bs, a, z, nseg, x.from, x.len, hp, stream);
    if (stream) copy_fence();  // this thread's stores are complete before the batch is
    hold_once(w);
  };
  if (!copiers()->try_run_units(units.size(), threads - 1, one))
    for (size_t u = 0; u < units.size(); ++u) one(u, 0);  // the threads serve another batch
  for (size_t u = 0; u < units.size();) {  // merge each object's parts, in order
    const uint32_t i = units[u].i;
    size_t v = u + 1;
    if (hash[i]) {
      CopyHasher h = parts[u];
      for (; v < units.size() && units[v].i == i; ++v) h.merge(parts[v]);
      sums[i] = h.digest();
    } else {
      while (v < units.size() && units[v].i == i) ++v;
    }
    u = v;
  }
}

size_t Pool::exists_prefix(const KeyView* keys, size_t n) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  Guard g(this);
  size_t i = 0;
  for (; i < n; ++i) {
    const KeyView& k = keys[i];
    if (k.size == 0 || k.size > kMaxKeyBytes || index_find(k.data, k.size, key_hash64(k.data, k.size)) < 0) break;
  }
  return i;
}

void Pool::put(const std::string* keys, size_t n, const uint64_t* addrs, const uint64_t* sizes, size_t nseg,
               int32_t* status) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  std::vector<uint32_t> ids(n, kNil);
  uint64_t batch = 0;
  {
    Guard g(this);
    maybe_hold("lock");
    for (size_t i = 0; i < n; ++i) {
      uint64_t total = 0;
      for (size_t j = 0; j < nseg; ++j) total += sizes[i * nseg + j];
      Status s = key_ok(keys[i]) ? reserve(keys[i], total, &ids[i]) : Status::kInvalidArgument;
      status[i] = int32_t(s);
      if (s != Status::kOk) hdr_->put_failures++;
      else batch += total;
    }
  }
  std::vector<uint64_t> sums(n, 0);
  std::vector<uint8_t> hash(n, write_checksum_ ? 1 : 0), ok(n, 1);
  copy_batch(true, n, ids.data(), hash.data(), addrs, sizes, nseg, batch, sums.data(), ok.data(), "put_copy");
  Guard g(this);
  for (size_t i = 0; i < n; ++i)
    if (ids[i] != kNil) publish(ids[i], sums[i], write_checksum_);
}

void Pool::get(const std::string* keys, size_t n, const uint64_t* addrs, const uint64_t* sizes, size_t nseg,
               int32_t* status) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  std::vector<uint32_t> pins(n, kNil);
  uint64_t batch = 0;
  {
    Guard g(this);
    for (size_t i = 0; i < n; ++i) {
      Status s = Status::kOk;
      if (!key_ok(keys[i])) {
        s = Status::kInvalidArgument;
      } else {
        int64_t id = index_find(keys[i].data(), keys[i].size(), key_hash64(keys[i].data(), keys[i].size()));
        uint64_t total = 0;
        for (size_t j = 0; j < nseg; ++j) total += sizes[i * nseg + j];
        if (id < 0) s = Status::kNotFound;
        else if (!record_ok(uint32_t(id))) s = Status::kCorrupt;
        else if (objs_[id].size != total) s = Status::kInvalidArgument;  // nothing copied
        else if ((pins[i] = pin_obj(uint32_t(id))) == kNil) s = Status::kBusy;
        else {
          lru_unlink(uint32_t(id));
          lru_push_front(uint32_t(id));
          batch += total;
        }
      }
      status[i] = int32_t(s);
      if (s == Status::kOk) hdr_->hits++;
      else hdr_->misses++;
    }
  }
  std::vector<uint32_t> obj(n, kNil);
  std::vector<uint8_t> hash(n, 0), ok(n, 1), bad(n, 0);
  std::vector<uint64_t> sums(n, 0);
  for (size_t i = 0; i < n; ++i) {
    if (pins[i] == kNil) continue;
    obj[i] = pins_[pins[i]].obj;
    hash[i] = verify_ && (objs_[obj[i]].flags & kHasChecksum);
  }
  copy_batch(false, n, obj.data(), hash.data(), addrs, sizes, nseg, batch, sums.data(), ok.data(), "get_copy");
  for (size_t i = 0; i < n; ++i)
    if (obj[i] != kNil) bad[i] = !ok[i] || (hash[i] && sums[i] != objs_[obj[i]].checksum);
  Guard g(this);
  for (size_t i = 0; i < n; ++i) {
    if (pins[i] == kNil) continue;
    uint32_t id = pins_[pins[i]].obj;
    if (bad[i]) {
      status[i] = int32_t(Status::kCorrupt);
      hdr_->corrupt++;
      hdr_->hits--;
      hdr_->misses++;
      if (objs_[id].state == kPublished) unlink_published(id);  // pinned by us: freed at unpin
    }
    unpin(pins[i]);
  }
}

size_t Pool::read_session_size(const ReadSession& s) { return s.pins.size(); }

std::unique_ptr<Pool::ReadSession> Pool::read_begin(const std::string* keys, size_t n, const uint64_t* total_sizes,
                                                    int32_t* status) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  auto s = std::make_unique<ReadSession>();
  s->pins.assign(n, kNil);
  s->block.assign(n, 0);
  s->boff.assign(n, 0);
  s->pos.assign(n, 0);
  s->size.assign(n, 0);
  s->hash.resize(n);
  s->status.assign(n, int32_t(Status::kOk));
  Guard g(this);
  for (size_t i = 0; i < n; ++i) {
    Status st = Status::kOk;
    int64_t id = -1;
    if (!key_ok(keys[i])) st = Status::kInvalidArgument;
    else if ((id = index_find(keys[i].data(), keys[i].size(), key_hash64(keys[i].data(), keys[i].size()))) < 0)
      st = Status::kNotFound;
    else if (!record_ok(uint32_t(id))) st = Status::kCorrupt;
    else if (objs_[id].size != total_sizes[i]) st = Status::kInvalidArgument;
    else if ((s->pins[i] = pin_obj(uint32_t(id))) == kNil) st = Status::kBusy;
    else {
      lru_unlink(uint32_t(id));
      lru_push_front(uint32_t(id));
      s->block[i] = objs_[id].first_block;
      s->size[i] = objs_[id].size;
    }
    s->status[i] = status[i] = int32_t(st);
    if (st == Status::kOk) hdr_->hits++;
    else hdr_->misses++;
  }
  return s;
}

void Pool::read_next(ReadSession& s, size_t n, const uint64_t* addrs, const uint64_t* sizes, size_t nseg) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  if (s.ended) throw std::runtime_error("shm read session already ended");
  n = std::min(n, s.pins.size());
  const uint64_t bs = hdr_->block_size;
  for (size_t i = 0; i < n; ++i) {
    if (s.status[i] != int32_t(Status::kOk)) continue;
    uint64_t piece = 0;
    for (size_t j = 0; j < nseg; ++j) piece += sizes[i * nseg + j];
    if (s.pos[i] + piece > s.size[i]) {
      s.status[i] = int32_t(Status::kInvalidArgument);
      continue;
    }
    // same block walk as copy_object, resumable: the state lives in the session
    uint32_t b = s.block[i];
    uint64_t boff = s.boff[i];
    for (size_t j = 0; j < nseg; ++j) {
      auto* p = reinterpret_cast<uint8_t*>(addrs[i * nseg + j]);
      uint64_t rem = sizes[i * nseg + j];
      while (rem) {
        if (boff == bs) {
          b = next_[b];
          boff = 0;
        }
        uint64_t c = std::min(rem, bs - boff);
        const uint8_t* bp = data_ + uint64_t(b) * bs + boff;
        if (verify_) s.hash[i].copy(p, bp, c);
        else fast_copy(p, bp, c);
        p += c;
        rem -= c;
        boff += c;
      }
    }
    s.block[i] = b;
    s.boff[i] = boff;
    s.pos[i] += piece;
  }
}

void Pool::read_end(ReadSession& s, int32_t* status) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  if (s.ended) throw std::runtime_error("shm read session already ended");
  s.ended = true;
  Guard g(this);
  for (size_t i = 0; i < s.pins.size(); ++i) {
    if (s.pins[i] == kNil) {
      status[i] = s.status[i];
      continue;
    }
    uint32_t id = pins_[s.pins[i]].obj;
    const ObjRec& o = objs_[id];
    if (s.status[i] == int32_t(Status::kOk) && s.pos[i] != s.size[i])
      s.status[i] = int32_t(Status::kInvalidArgument);  // not every byte was delivered
    if (s.status[i] == int32_t(Status::kOk) && verify_ && (o.flags & kHasChecksum) &&
        s.hash[i].digest() != o.checksum) {
      s.status[i] = int32_t(Status::kCorrupt);
      hdr_->corrupt++;
      if (objs_[id].state == kPublished) unlink_published(id);
    }
    status[i] = s.status[i];
    unpin(s.pins[i]);
  }
}

size_t Pool::remove(const std::string* keys, size_t n) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  Guard g(this);
  size_t removed = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!key_ok(keys[i])) continue;
    int64_t id = index_find(keys[i].data(), keys[i].size(), key_hash64(keys[i].data(), keys[i].size()));
    if (id < 0) continue;
    unlink_published(uint32_t(id));
    hdr_->removes++;
    removed++;
  }
  return removed;
}

Status Pool::put_one(const std::string& key, const void* data, size_t size) {
  uint64_t addr = reinterpret_cast<uint64_t>(data), sz = size;
  int32_t st;
  put(&key, 1, &addr, &sz, 1, &st);
  return Status(st);
}

Status Pool::pin_one(const std::string& key, uint32_t* pin, uint64_t* size) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  if (!key_ok(key)) return Status::kInvalidArgument;
  Guard g(this);
  int64_t id = index_find(key.data(), key.size(), key_hash64(key.data(), key.size()));
  if (id < 0) {
    hdr_->misses++;
    return Status::kNotFound;
  }
  if (!record_ok(uint32_t(id))) {
    hdr_->misses++;
    return Status::kCorrupt;
  }
  uint32_t p = pin_obj(uint32_t(id));
  if (p == kNil) {
    hdr_->misses++;
    return Status::kBusy;
  }
  hdr_->hits++;
  lru_unlink(uint32_t(id));
  lru_push_front(uint32_t(id));
  *pin = p;
  *size = objs_[id].size;
  return Status::kOk;
}

Status Pool::read_pinned(uint32_t pin, void* dst, uint64_t size) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  uint32_t id = pins_[pin].obj;
  const ObjRec& o = objs_[id];
  bool bad = false;
  if (dst) {
    uint64_t addr = reinterpret_cast<uint64_t>(dst);
    if (verify_ && (o.flags & kHasChecksum)) {
      CopyHasher hs;
      copy_object<false>(data_, next_, hdr_->block_size, o.first_block, &addr, &size, 1, &hs);
      bad = hs.digest() != o.checksum;
    } else {
      copy_object<false>(data_, next_, hdr_->block_size, o.first_block, &addr, &size, 1, nullptr);
    }
  }
  Guard g(this);
  if (bad) {
    hdr_->corrupt++;
    hdr_->hits--;
    hdr_->misses++;
    if (objs_[id].state == kPublished) unlink_published(id);
  }
  unpin(pin);
  return bad ? Status::kCorrupt : (dst ? Status::kOk : Status::kNotFound);
}

// ---------------------------------------------------------------------------
// enumeration and verification (operator tools)

uint64_t Pool::list(uint64_t cursor, size_t max, std::vector<ObjectInfo>* out) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  constexpr uint64_t kRecordsPerCall = 1 << 16;  // bounds the time the lock is held
  Guard g(this);
  const uint64_t n = hdr_->max_objects;
  const uint64_t end = std::min(n, cursor + kRecordsPerCall);
  uint64_t id = cursor;
  size_t found = 0;
  for (; id < end && found < max; ++id) {
    const ObjRec& o = objs_[id];
    if (o.state != kPublished || o.key_len == 0 || o.key_len > kMaxKeyBytes) continue;
    out->push_back({std::string(o.key, o.key_len), o.size, (o.flags & kHasChecksum) != 0});
    ++found;
  }
  return id >= n ? 0 : id;
}

void Pool::verify(const std::string* keys, size_t n, bool drop_corrupt, int32_t* status, uint8_t* checked,
                  uint64_t* sizes) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  const uint64_t bs = hdr_->block_size, nb = hdr_->nblocks;
  for (size_t i = 0; i < n; ++i) {
    status[i] = int32_t(Status::kOk);
    checked[i] = 0;
    sizes[i] = 0;
    uint32_t pin = kNil, id = kNil;
    {
      Guard g(this);
      int64_t found = key_ok(keys[i]) ? index_find(keys[i].data(), keys[i].size(),
                                                   key_hash64(keys[i].data(), keys[i].size()))
                                      : -1;
      if (!key_ok(keys[i])) status[i] = int32_t(Status::kInvalidArgument);
      else if (found < 0) status[i] = int32_t(Status::kNotFound);
      else {
        id = uint32_t(found);
        sizes[i] = objs_[id].size;
        if (!record_ok(id)) status[i] = int32_t(Status::kCorrupt);
        else if ((pin = pin_obj(id)) == kNil) status[i] = int32_t(Status::kBusy);
      }
      if (status[i] == int32_t(Status::kCorrupt) && drop_corrupt && objs_[id].state == kPublished) {
        unlink_published(id);
        hdr_->corrupt++;
      }
    }
    if (pin == kNil) continue;
    // pinned: the blocks cannot be freed or reused while we hash them (no lock held)
    const ObjRec& o = objs_[id];
    bool bad = false;
    if (o.flags & kHasChecksum) {
      CopyHasher h;
      uint32_t b = o.first_block;
      uint64_t left = o.size;
      for (uint32_t k = 0; k < o.nblocks && !bad; ++k) {
        if (b >= nb) {
          bad = true;  // a chain leaving the pool: damaged, never walked further
          break;
        }
        const uint64_t c = std::min(left, bs);
        h.update(block_ptr(b), c);
        left -= c;
        b = next_[b];
      }
      bad = bad || h.digest() != o.checksum;
      checked[i] = 1;
    }
    Guard g(this);
    if (bad) {
      status[i] = int32_t(Status::kCorrupt);
      if (drop_corrupt && objs_[id].state == kPublished) {
        unlink_published(id);  // pinned by us: freed at unpin
        hdr_->corrupt++;
      }
    }
    unpin(pin);
  }
}

Status Pool::object_extents(const std::string& key, std::vector<std::pair<uint64_t, uint64_t>>* out) {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  if (!key_ok(key)) return Status::kInvalidArgument;
  Guard g(this);
  int64_t id = index_find(key.data(), key.size(), key_hash64(key.data(), key.size()));
  if (id < 0) return Status::kNotFound;
  if (!record_ok(uint32_t(id))) return Status::kCorrupt;
  const ObjRec& o = objs_[id];
  const uint64_t bs = hdr_->block_size;
  uint32_t b = o.first_block;
  uint64_t left = o.size;
  for (uint32_t k = 0; k < o.nblocks; ++k, b = next_[b]) {
    if (b >= hdr_->nblocks) return Status::kCorrupt;
    const uint64_t c = std::min(left, bs);
    out->emplace_back(uint64_t(block_ptr(b) - base_), c);
    left -= c;
  }
  return Status::kOk;
}

PoolStats Pool::stats() {
  std::shared_lock<std::shared_mutex> cg(close_mu_);
  if (!base_) throw std::runtime_error("shm pool is closed");
  Guard g(this);
  const Header* h = hdr_;
  PoolStats s{};
  s.size = h->file_size;
  s.block_size = h->block_size;
  s.blocks = h->nblocks;
  s.capacity = h->nblocks * h->block_size;
  s.free_blocks = h->free_blocks;
  s.used = h->used_blocks * h->block_size;
  s.object_bytes = h->object_bytes;
  s.objects = h->objects;
  s.max_objects = h->max_objects;
  s.writing = h->writing;
  s.pins = h->pins_held;
  s.hits = h->hits;
  s.misses = h->misses;
  s.evictions = h->evictions;
  s.puts = h->puts;
  s.put_failures = h->put_failures;
  s.corrupt = h->corrupt;
  s.removes = h->removes;
  s.recoveries = h->recoveries;
  s.reaped_pins = h->reaped_pins;
  s.reaped_writes = h->reaped_writes;
  return s;
}

}  // namespace kvd::shm
