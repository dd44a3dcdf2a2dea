#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "comm/counter.hpp"
#include "eplb/comm/store.hpp"
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

using clock = std::chrono::steady_clock;
// How long add() waits for a counter file that another process holds locked (see lock_counter).
constexpr milliseconds counter_lock_wait(2000);

class memory_store final : public store {
 public:
  void set(const std::string& key, const std::string& value) override {
    {
      std::lock_guard lock(mutex_);
      values_[key] = value;
    }
    cv_.notify_all();
  }
  std::string get(const std::string& key, milliseconds timeout) override {
    std::unique_lock lock(mutex_);
    if (!cv_.wait_until(lock, deadline_after(timeout), [&] { return values_.count(key) != 0; })) {
      fail(errc::timeout, "store: key \"{}\" not set within {} ms", key, timeout.count());
    }
    return values_[key];
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override {
    std::int64_t now = 0;
    {
      std::lock_guard lock(mutex_);
      auto& v = values_[key];
      now = parse_counter(v, key) + delta;
      v = std::to_string(now);
    }
    cv_.notify_all();
    return now;
  }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    std::string held;
    {
      std::lock_guard lock(mutex_);
      held = values_.try_emplace(key, value).first->second;
    }
    cv_.notify_all();
    return held;
  }
  void erase(const std::string& key) override {
    std::lock_guard lock(mutex_);
    values_.erase(key);
  }
  store_usage usage() override {
    std::lock_guard lock(mutex_);
    store_usage u{.keys = values_.size()};
    for (const auto& [k, v] : values_) u.bytes += k.size() + v.size();
    return u;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<std::string, std::string> values_;
};

namespace fs = std::filesystem;

// Keys become file names: every byte outside [A-Za-z0-9._-] is written as %XX.
std::string file_name(const std::string& key) {
  std::string out;
  for (unsigned char c : key) {
    if (std::isalnum(c) || c == '.' || c == '_' || c == '-') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("%{:02X}", c);
    }
  }
  return out;
}

class file_store final : public store {
 public:
  explicit file_store(fs::path dir) : dir_(std::move(dir)) {
    std::error_code ec;
    fs::create_directories(dir_, ec);
    if (ec) fail(errc::invalid_argument, "file store: cannot create directory {}: {}", dir_.string(), ec.message());
  }
  void set(const std::string& key, const std::string& value) override {
    const auto path = dir_ / file_name(key);
    // Write then rename: readers see the whole value or nothing.
    const auto tmp = write_temp(path, value);
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) fail(errc::transport, "file store: cannot rename {} to {}: {}", tmp, path.string(), ec.message());
  }
  std::string get(const std::string& key, milliseconds timeout) override {
    const auto path = dir_ / file_name(key);
    const auto deadline = deadline_after(timeout);
    auto step = milliseconds(1);
    for (;;) {
      std::ifstream in(path, std::ios::binary);
      if (in) {
        std::ostringstream text;
        text << in.rdbuf();
        return text.str();
      }
      if (clock::now() >= deadline) {
        fail(errc::timeout, "store: key \"{}\" not set within {} ms (file store {})", key, timeout.count(),
             dir_.string());
      }
      std::this_thread::sleep_for(step);
      step = std::min(step * 2, milliseconds(20));
    }
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override {
    const auto path = dir_ / (file_name(key) + ".counter");
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
    if (fd < 0) fail(errc::transport, "file store: cannot open {}", path.string());
    lock_counter(fd, key);  // processes serialise on the counter file
    char buf[32] = {};
    const auto n = ::pread(fd, buf, sizeof buf - 1, 0);
    std::int64_t now = 0;
    try {
      now = parse_counter(std::string(buf, static_cast<std::size_t>(std::max<ssize_t>(n, 0))), key) + delta;
    } catch (...) {
      ::flock(fd, LOCK_UN);
      ::close(fd);
      throw;
    }
    const auto text = std::to_string(now);
    const bool ok =
        ::ftruncate(fd, 0) == 0 && ::pwrite(fd, text.data(), text.size(), 0) == static_cast<ssize_t>(text.size());
    ::flock(fd, LOCK_UN);
    ::close(fd);
    if (!ok) fail(errc::transport, "file store: cannot update {}", path.string());
    set(key, text);  // so that get() sees counters too
    return now;
  }
  // A holder keeps the lock for a read and a write, microseconds; one that never lets go was
  // frozen or killed in between (SIGSTOP: a killed process's lock goes with it), and a blocking
  // flock would hang every other process's add() for good (the fault campaign found it). So: tries
  // with a growing pause, and after counter_lock_wait an errc::timeout naming the counter.
  static void lock_counter(int fd, const std::string& key) {
    const auto deadline = deadline_after(counter_lock_wait);
    auto pause = std::chrono::microseconds(50);
    while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK && errno != EINTR) {
        ::close(fd);
        fail(errc::transport, "file store: cannot lock the counter of \"{}\"", key);
      }
      if (clock::now() >= deadline) {
        ::close(fd);
        fail(errc::timeout,
             "file store: the counter of \"{}\" stayed locked for {} ms (a process holding it is stopped or stuck)",
             key, counter_lock_wait.count());
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(20'000));
    }
  }

  std::string set_if_absent(const std::string& key, const std::string& value) override {
    const auto path = dir_ / file_name(key);
    const auto tmp = write_temp(path, value);
    // link() fails when the name exists: of several processes exactly one creates it, whole.
    const bool created = ::link(tmp.c_str(), path.c_str()) == 0;
    const int link_errno = errno;
    std::error_code ec;
    fs::remove(tmp, ec);
    if (created) return value;
    if (link_errno != EEXIST)
      fail(errc::transport, "file store: cannot create {}: {}", path.string(), std::strerror(link_errno));
    return get(key, milliseconds(0));
  }
  void erase(const std::string& key) override {
    std::error_code ec;
    fs::remove(dir_ / file_name(key), ec);
    fs::remove(dir_ / (file_name(key) + ".counter"), ec);
  }
  // Counters are kept twice (the locked counter file and the readable value): counted once.
  store_usage usage() override {
    store_usage u;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir_, ec)) {
      const auto name = entry.path().filename().string();
      if (name.find(".tmp.") != std::string::npos || name.ends_with(".counter")) continue;
      ++u.keys;
      std::error_code size_ec;
      const auto size = entry.file_size(size_ec);
      // The key's length: every %XX in the file name stands for one byte.
      const auto escapes = static_cast<std::size_t>(std::count(name.begin(), name.end(), '%'));
      u.bytes += name.size() - 2 * escapes + (size_ec ? 0 : static_cast<std::size_t>(size));
    }
    return u;
  }

 private:
  static std::string write_temp(const fs::path& path, const std::string& value) {
    auto tmp =
        path.string() + fmt::format(".tmp.{}.{}", ::getpid(), std::hash<std::thread::id>{}(std::this_thread::get_id()));
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << value;
    out.close();
    if (!out) fail(errc::transport, "file store: cannot write {}", tmp);
    return tmp;
  }

  fs::path dir_;
};

class prefix_store final : public store {
 public:
  prefix_store(std::shared_ptr<store> inner, std::string prefix)
      : inner_(std::move(inner)), prefix_(std::move(prefix) + "/") {}
  void set(const std::string& key, const std::string& value) override { inner_->set(prefix_ + key, value); }
  std::string get(const std::string& key, milliseconds timeout) override { return inner_->get(prefix_ + key, timeout); }
  std::int64_t add(const std::string& key, std::int64_t delta) override { return inner_->add(prefix_ + key, delta); }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    return inner_->set_if_absent(prefix_ + key, value);
  }
  void erase(const std::string& key) override { inner_->erase(prefix_ + key); }
  store_usage usage() override { return inner_->usage(); }

 private:
  std::shared_ptr<store> inner_;
  std::string prefix_;
};

}  // namespace

std::shared_ptr<store> make_memory_store() {
  return std::make_shared<memory_store>();
}
std::shared_ptr<store> make_file_store(const std::string& directory) {
  return std::make_shared<file_store>(directory);
}
std::shared_ptr<store> make_prefix_store(std::shared_ptr<store> inner, std::string prefix) {
  return std::make_shared<prefix_store>(std::move(inner), std::move(prefix));
}

void store_barrier(store& s, const std::string& name, int count, milliseconds timeout) {
  const auto deadline = deadline_after(timeout);
  std::int64_t seen = s.add(name, 1);
  auto step = milliseconds(1);
  while (seen < count) {
    if (clock::now() >= deadline) {
      fail(errc::timeout, "barrier \"{}\": {} of {} ranks arrived within {} ms", name, seen, count, timeout.count());
    }
    std::this_thread::sleep_for(step);
    step = std::min(step * 2, milliseconds(20));
    seen = s.add(name, 0);
  }
}

}  // namespace eplb::comm
