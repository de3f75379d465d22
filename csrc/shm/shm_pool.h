// The embedded shared-memory page pool (kvdirect's default L3 store).
//
// One file /dev/shm/kvdirect-NAME, mapped by every process on the node that
// uses the pool. Contract:
//
// * File: created O_EXCL, mode 0600; opening refuses a file owned by another
//   user or writable by group/world. A versioned header (magic, version,
//   layout parameters, sizes) is checked on open; a wrong magic/version, a
//   truncated file or inconsistent layout is an error that says to recreate
//   the pool (`kvdirect pool destroy NAME`). The creator fills the file
//   (posix_fallocate: a full /dev/shm is a clear error, never a SIGBUS later)
//   under flock(LOCK_EX) and writes the magic last; concurrent openers wait.
// * Layout (all offsets in the header):
//     header | object records | key index | block chain | pin records | data blocks
//   Data is a fixed number of fixed-size blocks; an object is a chain of
//   blocks (block_next[]), so any free blocks serve any size: no external
//   fragmentation, metadata bounded by the block count. Internal waste is at
//   most one block per object (choose block_size ~ the page size or smaller).
//   The key index is an open-addressing (linear probing, backward-shift
//   delete) table of (hash tag, object id) with >= 2 slots per object.
// * Objects: key (1..255 bytes), size, checksum, state, pin count, LRU links.
//   Puts are atomic: blocks are reserved under the lock (state WRITING, not in
//   the index), the bytes are copied and checksummed WITHOUT the lock, then the
//   object is published under the lock. Readers therefore see nothing or the
//   whole object. Overwriting a key publishes the new object; the old one is
//   freed at once when unpinned, else when its last reader unpins.
// * Reads pin objects under the lock (a pin record with the reader's pid),
//   copy without the lock, then unpin. Pinned objects are never evicted,
//   overwritten in place or freed.
// * Eviction: when a reservation lacks blocks, published objects are evicted
//   least-recently-used first (gets and puts refresh recency), skipping pinned
//   ones. If that is not enough, pins and reservations of dead processes are
//   reclaimed (kill(pid, 0)) and eviction retried; then kNoSpace.
// * Checksums: a 64-bit checksum is computed while copying on put (fused with
//   the copy, see copy_hash.h) and verified on get when enabled for this
//   handle. A mismatch returns kCorrupt for that key and drops the object.
// * Copies of a large batch (CopyOptions) are split into units of whole
//   blocks (about 256 KiB) spread over this handle's copy threads: a thread
//   takes the next unit when it is done, so a thread that is descheduled
//   delays the batch by one unit at most and one that never ran delays it not
//   at all; each unit is checksummed apart and the parts merged (copy_hash.h).
//   Large batches use non-temporal stores. A batch that finds the threads busy
//   with another batch of this handle runs on its caller alone.
// * Crash safety: one process-shared robust mutex guards all metadata. A
//   process killed while holding it makes the next locker see EOWNERDEAD; it
//   then rebuilds every derived structure (free lists, index, LRU, counters,
//   pin counts) from the object records, dropping reservations and pins of
//   dead processes and any record whose block chain is inconsistent, and marks
//   the mutex consistent. Object records are written so that a record is
//   PUBLISHED only after its bytes and checksum are complete. A process killed
//   outside the lock (mid-copy) leaves a reservation or pins that are
//   reclaimed when space is needed. Liveness is kill(pid, 0): a zombie (killed
//   but not yet reaped by its parent) still counts as alive, and pids are
//   assumed to be from one pid namespace.
// * Status per key (kvd::Status): put: kOk stored, kNoSpace (nothing
//   evictable), kTooLarge (object larger than the pool), kInvalidArgument
//   (bad key); get: kOk every byte delivered, kNotFound, kInvalidArgument
//   (the segments do not add up to the object size exactly: nothing copied),
//   kCorrupt (checksum mismatch: the destination holds garbage), kBusy (pin
//   table full). Anything but kOk is a miss.
// * Enumeration and verification (operator tools: `kvdirect pool audit`, never
//   the serving path): list() walks the object records in pages, holding the
//   lock for one page at a time so the pool keeps serving; an object present
//   for the whole walk is seen exactly once (records never move), one
//   published or removed during the walk may be seen or missed. verify()
//   recomputes objects' checksums over the pool's bytes in place (pinned, no
//   copy out) and leaves a corrupt object in place unless asked to drop it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "common/thread_pool.h"
#include "shm/copy_hash.h"

namespace kvd::shm {

constexpr size_t kMaxKeyBytes = 255;
constexpr const char* kFilePrefix = "kvdirect-";

struct CreateOptions {
  uint64_t size = 1ULL << 30;        // whole file (metadata + data)
  uint64_t block_size = 64 << 10;    // power of two, 4 KiB .. 64 MiB
  uint32_t pin_slots = 4096;         // concurrent pins, all processes together
};

enum class OpenMode { kOpen, kCreate, kAuto };

// How put/get move bytes (per handle, process-local).
struct CopyOptions {
  unsigned threads = 0;                     // 0: one per hardware thread; 1: the caller only
  uint64_t parallel_min_bytes = 2ULL << 20;  // batches from this size use the threads
  uint64_t stream_min_bytes = 4ULL << 20;    // ... and non-temporal stores from this size
};

struct PoolStats {
  uint64_t size, capacity, used, object_bytes, block_size, blocks, free_blocks;
  uint64_t objects, max_objects, writing, pins;
  uint64_t hits, misses, evictions, puts, put_failures, corrupt, removes;
  uint64_t recoveries, reaped_pins, reaped_writes;
};

// One published object as list() reports it.
struct ObjectInfo {
  std::string key;
  uint64_t size;
  bool has_checksum;  // false: written with checksums off; its content cannot be verified
};

// A key read in place (not copied), e.g. a Python str's UTF-8 bytes.
struct KeyView {
  const char* data;
  size_t size;
};

struct Header;
struct ObjRec;
struct PinRec;

class Pool {
 public:
  // Opens (or creates) /dev/shm/kvdirect-NAME. On failure returns non-OK and a
  // message saying what to do. *created tells whether this call created it.
  static Status open(const std::string& name, OpenMode mode, const CreateOptions& opt,
                     std::unique_ptr<Pool>* out, std::string* err, bool* created = nullptr);
  // Unlinks the pool file (mappings held by other processes stay valid).
  static Status destroy(const std::string& name, std::string* err);
  static bool valid_name(const std::string& name);
  static std::string path_for(const std::string& name);

  ~Pool();
  void close();
  bool closed() const { return base_ == nullptr; }
  const std::string& name() const { return name_; }
  void set_verify_checksum(bool on) { verify_ = on; }
  void set_write_checksum(bool on) { write_checksum_ = on; }
  void set_copy_options(const CopyOptions& o);
  CopyOptions copy_options() const { return copy_opt_; }
  // Populates this process's page tables for bytes [offset, offset + length) of the pool's
  // data region (MADV_POPULATE_WRITE, Linux 5.14+), so that the first get or put of those pages
  // in this process does not take page faults (a fresh process reading 512 MiB paid ~45 ms of
  // faults on one core, as much as the copy). The memory is already allocated (fallocate at
  // create): this only maps it. Returns the bytes populated: 0 past the region's end, when
  // closed, or when the kernel lacks the advice. Holds the handle open for the call: callers
  // populate a large pool in chunks from a thread they can stop (and must join before exit).
  uint64_t prefault(uint64_t offset, uint64_t length);
  uint64_t data_bytes() const { return base_ ? map_size_ - uint64_t(data_ - base_) : 0; }

  void exists(const std::string* keys, size_t n, uint8_t* out);
  // How many leading keys are present; stops at the first absent (or invalid)
  // key, so a miss costs one lookup whatever the batch.
  size_t exists_prefix(const KeyView* keys, size_t n);
  // Segment j of key i: addrs[i*nseg + j], sizes[i*nseg + j].
  void put(const std::string* keys, size_t n, const uint64_t* addrs, const uint64_t* sizes,
           size_t nseg, int32_t* status);
  void get(const std::string* keys, size_t n, const uint64_t* addrs, const uint64_t* sizes,
           size_t nseg, int32_t* status);
  // Piecewise reads, for layer-by-layer loading: pin a batch of objects once,
  // copy each object's bytes in consecutive pieces (one layer at a time, in
  // object byte order, so the running checksum covers the object in order),
  // then verify and unpin. Pinned objects are never evicted or overwritten
  // while a session is open. Sessions must be ended (read_end) by their owner.
  struct ReadSession;
  // status[i]: kOk when pinned and the object's size equals total_sizes[i].
  std::unique_ptr<ReadSession> read_begin(const std::string* keys, size_t n, const uint64_t* total_sizes,
                                          int32_t* status);
  // Copies the next bytes of objects [0, n) of the session (those still kOk):
  // segment j of object i goes to addrs[i*nseg + j]. A piece that would run
  // past an object's end fails that object with kInvalidArgument.
  void read_next(ReadSession& s, size_t n, const uint64_t* addrs, const uint64_t* sizes, size_t nseg);
  // Verifies checksums of objects read to their end and unpins everything.
  // status[i] is kOk only when every byte of object i was delivered and verified.
  void read_end(ReadSession& s, int32_t* status);
  static size_t read_session_size(const ReadSession& s);
  size_t remove(const std::string* keys, size_t n);
  Status put_one(const std::string& key, const void* data, size_t size);
  // get_bytes in two steps: pin (learn the size), then read into a buffer of that size.
  Status pin_one(const std::string& key, uint32_t* pin, uint64_t* size);
  Status read_pinned(uint32_t pin, void* dst, uint64_t size);  // unpins
  PoolStats stats();

  // Published objects from record `cursor` on (0: start): appends up to `max`
  // of them to *out and returns the cursor to continue from, 0 when the walk is
  // complete. One call holds the lock for one bounded page of records (it may
  // return fewer than `max`, even none, with a non-zero cursor).
  uint64_t list(uint64_t cursor, size_t max, std::vector<ObjectInfo>* out);
  // Verifies objects in place, whatever this handle's verify flag says:
  // status[i] kOk (checksum matches), kCorrupt (mismatch or damaged record),
  // kNotFound, kBusy (pin table full), kInvalidArgument (bad key); checked[i]
  // is 1 when a checksum was compared (0: the object has none: unverified);
  // sizes[i] the object size (0 when not found). drop_corrupt: a corrupt
  // object is removed (counted in stats().corrupt), as a get would; otherwise
  // it stays for the caller to decide.
  void verify(const std::string* keys, size_t n, bool drop_corrupt, int32_t* status, uint8_t* checked,
              uint64_t* sizes);
  // Where object `key`'s bytes lie in the pool file: (file offset, length) per
  // block, in object order. For tools and tests that inspect or damage the file
  // directly; the answer is stale as soon as the object is replaced or evicted.
  Status object_extents(const std::string& key, std::vector<std::pair<uint64_t, uint64_t>>* out);

  // Test hooks (process-local): at `phase` ("lock", "alloc", "put_copy",
  // "get_copy") create `marker` (if non-empty) then sleep `seconds`.
  void debug_hold(const std::string& phase, double seconds, const std::string& marker);

 private:
  Pool() = default;
  struct Reservation;
  class Guard;
  void lock();
  void unlock();
  void repair_locked();
  void reap_dead_locked();
  void maybe_hold(const char* phase);

  ObjRec* obj(uint32_t id);
  uint8_t* block_ptr(uint32_t b);
  int64_t index_find(const char* key, size_t len, uint64_t h);
  void index_insert(uint32_t id);
  void index_erase(uint32_t id);
  void lru_unlink(uint32_t id);
  void lru_push_front(uint32_t id);
  void free_object(uint32_t id);
  void unlink_published(uint32_t id);
  bool evict_one();
  Status reserve(const std::string& key, uint64_t size, uint32_t* id);
  void publish(uint32_t id, uint64_t checksum, bool has_checksum);
  uint32_t pin_obj(uint32_t id);
  void unpin(uint32_t pin);
  bool dead(uint32_t pid);
  bool record_ok(uint32_t id) const;
  void copy_batch(bool to_pool, size_t n, const uint32_t* obj, const uint8_t* hash, const uint64_t* addrs,
                  const uint64_t* sizes, size_t nseg, uint64_t batch_bytes, uint64_t* sums, uint8_t* ok,
                  const char* hold_phase);
  std::shared_ptr<ThreadPool> copiers();

  std::string name_;
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  size_t map_size_ = 0;
  Header* hdr_ = nullptr;
  ObjRec* objs_ = nullptr;
  uint64_t* index_ = nullptr;
  uint32_t* next_ = nullptr;
  PinRec* pins_ = nullptr;
  uint8_t* data_ = nullptr;
  bool verify_ = true;
  bool write_checksum_ = true;
  std::shared_mutex close_mu_;  // ops shared, close exclusive
  CopyOptions copy_opt_;
  std::mutex copiers_mu_;
  std::shared_ptr<ThreadPool> copiers_;  // created on the first large batch
  int copiers_pid_ = 0;                   // a forked child must not use its parent's threads
  std::string hold_phase_, hold_marker_;
  double hold_seconds_ = 0;
};

// State of a piecewise read (see Pool::read_begin); owned by the caller.
struct Pool::ReadSession {
  std::vector<uint32_t> pins;   // kNil where not pinned
  std::vector<uint32_t> block;  // current block of each object
  std::vector<uint64_t> boff;   // offset inside that block
  std::vector<uint64_t> pos;    // bytes delivered so far
  std::vector<uint64_t> size;   // object sizes
  std::vector<CopyHasher> hash;
  std::vector<int32_t> status;
  bool ended = false;
};

}  // namespace kvd::shm
