#include "comm/mailbox/shared_memory.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <utility>

#include "util/fail.hpp"

namespace eplb::comm {

std::string shm_mapping::unique_name(std::string_view prefix) {
  std::random_device rd;
  return fmt::format("{}-{}-{:016x}", prefix, ::getpid(), (static_cast<std::uint64_t>(rd()) << 32) ^ rd());
}

// Maps `fd` (closed here, also on failure); a created object is unlinked again if that fails.
shm_mapping::shm_mapping(std::string name, int fd, std::size_t bytes, bool created, std::string_view who)
    : name_(std::move(name)), bytes_(bytes), linked_(created) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    unlink();
    fail(errc::transport, "{}: mmap of {} failed: {}", who, name_, std::strerror(e));
  }
  data_ = static_cast<std::byte*>(p);
}

shm_mapping shm_mapping::create(std::string name, std::size_t bytes, sizing how, std::string_view who) {
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) fail(errc::transport, "{}: shm_open({}) failed: {}", who, name, std::strerror(errno));
  const auto fail_sizing = [&](int e) {
    ::close(fd);
    (void)::shm_unlink(name.c_str());
    if (how == sizing::truncate)
      fail(errc::transport, "{}: sizing shared memory {} failed: {}", who, name, std::strerror(e));
    fail(errc::backend_unavailable, "{}: reserving {} bytes of shared memory for {} failed: {}", who, bytes, name,
         std::strerror(e));
  };
  if (how == sizing::truncate) {
    if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) fail_sizing(errno);
  } else if (const int e = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) {
    fail_sizing(e);
  }
  return shm_mapping(std::move(name), fd, bytes, true, who);
}

std::optional<shm_mapping> shm_mapping::open(std::string name, std::size_t bytes, std::string_view who) {
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) return std::nullopt;
  return shm_mapping(std::move(name), fd, bytes, false, who);
}

shm_mapping::~shm_mapping() {
  if (data_ != nullptr) (void)::munmap(data_, bytes_);
  unlink();
}

shm_mapping::shm_mapping(shm_mapping&& o) noexcept
    : name_(std::move(o.name_)),
      data_(std::exchange(o.data_, nullptr)),
      bytes_(std::exchange(o.bytes_, 0)),
      linked_(std::exchange(o.linked_, false)) {}

shm_mapping& shm_mapping::operator=(shm_mapping&& o) noexcept {
  shm_mapping(std::move(o)).swap(*this);
  return *this;
}

void shm_mapping::swap(shm_mapping& o) noexcept {
  std::swap(name_, o.name_);
  std::swap(data_, o.data_);
  std::swap(bytes_, o.bytes_);
  std::swap(linked_, o.linked_);
}

void shm_mapping::unlink() noexcept {
  if (linked_) (void)::shm_unlink(name_.c_str());
  linked_ = false;
}

}  // namespace eplb::comm
