// A small persistent thread pool for splitting one batch over the cores.
//
// Contract: run(n, fn) calls fn(w) for w in [0, n) (n capped at size()) and
// returns when all are done; w = 0 runs on the calling thread, the others on
// workers created once at construction, so no thread is created per call.
// One batch at a time: run() must not be called concurrently (callers that
// may race use try_run, which reports "busy" instead of waiting).
//
// try_run_units(units, helpers, fn) is the form for a batch of small work
// units on a machine that may be oversubscribed: the caller and up to
// `helpers` workers take units one by one as they free up, and the call
// returns as soon as every unit is done. A worker that was descheduled and
// wakes late finds nothing left and touches nothing of the caller's, so the
// caller never waits for a thread that has no work, only for a unit in
// progress.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kvd {

class ThreadPool {
 public:
  explicit ThreadPool(unsigned threads);  // threads includes the caller; 0 means 1
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  unsigned size() const { return static_cast<unsigned>(workers_.size()) + 1; }
  // Runs fn(w) for w in [0, n) with n <= size(); w = 0 runs on the caller. Blocks.
  void run(unsigned n, const std::function<void(unsigned)>& fn);
  // As run(), but returns false at once (running nothing) when another thread
  // is inside run()/try_run() on this pool.
  bool try_run(unsigned n, const std::function<void(unsigned)>& fn);
  // Calls fn(u, w) once for every u in [0, units); w is 0 on the caller, else
  // the worker's id (1..helpers). false, running nothing, when another batch
  // holds the pool.
  bool try_run_units(size_t units, unsigned helpers, const std::function<void(size_t, unsigned)>& fn);

 private:
  struct UnitBatch;
  void loop(unsigned id);
  void run_locked(unsigned n, const std::function<void(unsigned)>& fn);
  static void work_units(UnitBatch& b, unsigned w);
  std::vector<std::thread> workers_;
  std::mutex busy_;  // held for a whole batch
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::shared_ptr<UnitBatch> units_;  // the unit batch in progress, if any
  unsigned job_n_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// One per hardware thread (at least 1).
unsigned hardware_threads();

}  // namespace kvd
