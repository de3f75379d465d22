#include "common/thread_pool.h"

namespace kvd {

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
    const std::function<void(unsigned)>* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id >= job_n_) continue;  // not needed for this job
      job = job_;
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

bool ThreadPool::try_run(unsigned n, const std::function<void(unsigned)>& fn) {
  std::unique_lock<std::mutex> g(busy_, std::try_to_lock);
  if (!g.owns_lock()) return false;
  run_locked(n, fn);
  return true;
}

}  // namespace kvd
