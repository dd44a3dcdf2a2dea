// Memory that queued work may still touch after a timed-out wait: release_after() and
// stream_buffer free it only once the stream has passed that work, and a device that goes first
// keeps it for good. A hand-completed event holds a host stream back, so "the stream still writes
// after the wait timed out" happens every time; AddressSanitizer reports any early free.
#include <doctest/doctest.h>

#include <chrono>
#include <cstring>
#include <memory>

#include "check_error.hpp"
#include "device/event_state.hpp"
#include "eplb/device/device.hpp"

using namespace eplb;
using namespace std::chrono_literals;

namespace {

// An event completed by the test: a stream that waits on it runs nothing after it until then.
struct gate {
  std::shared_ptr<device::detail::event_state> state = std::make_shared<device::detail::event_state>();
  [[nodiscard]] device::event event() const { return device::event(state); }
  void open() const { state->complete(nullptr); }
};

constexpr std::size_t bytes = 4096;

}  // namespace

TEST_CASE("release_after: memory a stream still writes after a timed-out wait is freed once the stream passed it") {
  auto dev = device::make_host_device();
  auto s = dev->create_stream();
  gate g;
  auto b = dev->allocate(bytes, device::memory_kind::host);
  s->wait(g.event());
  s->fill(b.data(), std::byte{0xCD}, b.size());
  CHECK_EPLB_ERROR(s->synchronize(20ms), errc::timeout, "not complete");
  dev->release_after(std::move(b), *s);
  CHECK(dev->releases_waiting() == 1);
  (void)dev->allocate(16, device::memory_kind::host);  // collects: the fill has not run yet
  CHECK(dev->releases_waiting() == 1);
  g.open();
  s->synchronize(10s);  // the fill wrote into memory that is still allocated
  CHECK(dev->collect_released() == 0);
}

TEST_CASE("stream_buffer: going out of scope mid-work hands the memory over with an event on its stream") {
  auto dev = device::make_host_device();
  auto s = dev->create_stream();
  gate g;
  std::byte src[bytes];
  std::memset(src, 0x5A, sizeof src);
  s->wait(g.event());
  {
    const device::stream_buffer buf(*dev, *s, bytes, device::memory_kind::pinned);
    s->copy(buf.data(), src, bytes);
    CHECK_EPLB_ERROR(s->synchronize(20ms), errc::timeout, "not complete");
  }
  CHECK(dev->releases_waiting() == 1);
  g.open();
  s->synchronize(10s);
  CHECK(dev->collect_released() == 0);
}

TEST_CASE("release_after: memory no queued work touches is freed at once") {
  auto dev = device::make_host_device();
  auto s = dev->create_stream();
  dev->release_after(dev->allocate(bytes, device::memory_kind::host), std::vector<device::event>{});
  CHECK(dev->releases_waiting() == 0);
  const auto done = s->record();
  done.wait(10s);
  dev->release_after(dev->allocate(bytes, device::memory_kind::host), {done});
  CHECK(dev->releases_waiting() == 0);
  // Failed work has ended too: nothing will touch the memory any more.
  gate failed;
  failed.state->complete(std::make_exception_ptr(error(errc::device, "injected")));
  dev->release_after(dev->allocate(bytes, device::memory_kind::host), {failed.event()});
  CHECK(dev->releases_waiting() == 0);
}

TEST_CASE("a destroyed stream cancels its queued work, so the memory that work would touch is freed") {
  auto dev = device::make_host_device();
  auto s = dev->create_stream();
  gate g;
  s->wait(g.event());
  {
    const device::stream_buffer buf(*dev, *s, bytes, device::memory_kind::host);
    s->fill(buf.data(), std::byte{1}, bytes);
  }
  CHECK(dev->releases_waiting() == 1);
  s.reset();  // the worker stops; the fill never runs
  CHECK(dev->collect_released() == 0);
}

TEST_CASE("a device that goes while work on released memory is queued keeps that memory for good") {
  auto dev = device::make_host_device();
  auto s = dev->create_stream();  // host streams do not need their device once made
  gate g;
  s->wait(g.event());
  auto* raw = static_cast<std::byte*>(nullptr);
  {
    const device::stream_buffer buf(*dev, *s, bytes, device::memory_kind::host);
    raw = buf.data();
    s->fill(raw, std::byte{7}, bytes);
  }
  const auto leaked_before = device::leaked_bytes();
  dev.reset();
  CHECK(device::leaked_bytes() == leaked_before + bytes);
  g.open();
  s->synchronize(10s);  // writes into memory that was kept, not freed
  CHECK(raw[bytes - 1] == std::byte{7});
}

TEST_CASE("wrap_stream, wrap_event: the host device has no native handles, said clearly") {
  auto dev = device::make_host_device();
  int dummy = 0;
  CHECK_EPLB_ERROR(dev->wrap_stream(&dummy), errc::invalid_argument, "no native streams");
  CHECK_EPLB_ERROR(dev->wrap_event(&dummy), errc::invalid_argument, "no native events");
}
