// A POSIX shared-memory object mapped into this process: the control block every mailbox
// transport shares, and gloo's host mailboxes. The mapping goes with this object; the name goes on
// unlink() (once every rank has mapped it) or with the object that created it, if never unlinked.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace eplb::comm {

class shm_mapping {
 public:
  /// How a new object gets its size: ftruncate (pages come on first touch), or posix_fallocate
  /// (reserved now: on a full /dev/shm creation fails instead of a later page fault killing us).
  enum class sizing { truncate, reserve };

  shm_mapping() = default;
  ~shm_mapping();
  shm_mapping(shm_mapping&& o) noexcept;
  shm_mapping& operator=(shm_mapping&& o) noexcept;
  shm_mapping(const shm_mapping&) = delete;
  shm_mapping& operator=(const shm_mapping&) = delete;

  /// A fresh name under /dev/shm: `prefix`, this pid and 64 random bits.
  [[nodiscard]] static std::string unique_name(std::string_view prefix);
  /// Creates `name` (it must not exist yet), `bytes` long, and maps it. Errors name `who`.
  [[nodiscard]] static shm_mapping create(std::string name, std::size_t bytes, sizing how, std::string_view who);
  /// Maps the existing object `name`; nullopt, with errno set, when it cannot be opened (the
  /// caller says what that means). An mmap failure is an error naming `who`.
  [[nodiscard]] static std::optional<shm_mapping> open(std::string name, std::size_t bytes, std::string_view who);

  /// Removes the name; mappings stay valid.
  void unlink() noexcept;

  [[nodiscard]] std::byte* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return bytes_; }
  [[nodiscard]] const std::string& name() const noexcept { return name_; }

 private:
  shm_mapping(std::string name, int fd, std::size_t bytes, bool created, std::string_view who);
  void swap(shm_mapping& o) noexcept;

  std::string name_;
  std::byte* data_ = nullptr;
  std::size_t bytes_ = 0;
  bool linked_ = false;  // created here and not unlinked yet
};

}  // namespace eplb::comm
