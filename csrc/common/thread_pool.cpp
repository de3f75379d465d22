#include "common/thread_pool.h"

#include <atomic>

namespace kvd {

// Shared by the caller and its helpers; a helper keeps it alive while it looks
// for units, so a late helper never reads the caller's stack.
struct ThreadPool::UnitBatch {
  std::atomic<size_t> next{0}, done{0};
  size_t units = 0;
  unsigned helpers = 0;
  const std::function<void(size_t, unsigned)>* fn = nullptr;  // valid while done < units
  std::mutex mu;
  std::condition_variable all_done;
};

void ThreadPool::work_units(UnitBatch& b, unsigned w) {
  for (size_t u; (u = b.next.fetch_add(1, std::memory_order_relaxed)) < b.units;) {
    (*b.fn)(u, w);  // u < units: not done yet, so the caller is still waiting
    if (b.done.fetch_add(1, std::memory_order_acq_rel) + 1 == b.units) {
      std::lock_guard<std::mutex> g(b.mu);
      b.all_done.notify_all();
    }
  }
}

unsigned hardware_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h ? h : 1;
}

ThreadPool::ThreadPool(unsigned threads) {
  if (threads == 0) threads = 1;
  for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this, i] { loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::loop(unsigned id) {
  uint64_t seen = 0;
  for (;;) {
    const std::function<void(unsigned)>* job = nullptr;
    std::shared_ptr<UnitBatch> batch;
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (units_) {
        if (id <= units_->helpers) batch = units_;
      } else if (id < job_n_) {
        job = job_;
      }
      if (!batch && !job) continue;  // not needed for this batch
    }
    if (batch) {
      work_units(*batch, id);
      continue;
    }
    (*job)(id);
    std::lock_guard<std::mutex> g(mu_);
    if (--pending_ == 0) done_.notify_one();
  }
}

void ThreadPool::run_locked(unsigned n, const std::function<void(unsigned)>& fn) {
  if (n <= 1 || workers_.empty()) {
    fn(0);
    return;
  }
  if (n > size()) n = size();
  {
    std::lock_guard<std::mutex> g(mu_);
    job_ = &fn;
    job_n_ = n;
    pending_ = n - 1;
    ++generation_;
  }
  wake_.notify_all();
  fn(0);
  std::unique_lock<std::mutex> lk(mu_);
  done_.wait(lk, [&] { return pending_ == 0; });
  job_ = nullptr;
}

void ThreadPool::run(unsigned n, const std::function<void(unsigned)>& fn) {
  std::lock_guard<std::mutex> g(busy_);
  run_locked(n, fn);
}

bool ThreadPool::try_run_units(size_t units, unsigned helpers, const std::function<void(size_t, unsigned)>& fn) {
  std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
  if (!busy.owns_lock()) return false;
  auto b = std::make_shared<UnitBatch>();
  b->units = units;
  b->helpers = helpers < workers_.size() ? helpers : static_cast<unsigned>(workers_.size());
  b->fn = &fn;
  if (b->helpers && units > 1) {
    {
      std::lock_guard<std::mutex> g(mu_);
      units_ = b;
      ++generation_;
    }
    wake_.notify_all();
  }
  work_units(*b, 0);
  {
    std::unique_lock<std::mutex> lk(b->mu);
    b->all_done.wait(lk, [&] { return b->done.load(std::memory_order_acquire) == b->units; });
  }
  std::lock_guard<std::mutex> g(mu_);
  if (units_ == b) units_.reset();
  return true;
}

bool ThreadPool::try_run(unsigned n, const std::function<void(unsigned)>& fn) {
  std::unique_lock<std::mutex> g(busy_, std::try_to_lock);
  if (!g.owns_lock()) return false;
  run_locked(n, fn);
  return true;
}

}  // namespace kvd
