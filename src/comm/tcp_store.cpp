// A TCP rendezvous store. The server is a coroutine per connection on one io_context thread, so its
// map needs no lock; a GET for a missing key parks on a timer that a later SET cancels or that
// expires at the GET's own deadline (the reply then says "not set", and the connection stays).
// Clients talk synchronously with a deadline on every exchange; after a timeout the connection is
// dropped (its late reply must not be read as the answer to the next request).
#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>

#include "comm/counter.hpp"
#include "eplb/comm/store.hpp"
#include "util/asio.hpp"

#include <boost/asio/experimental/awaitable_operators.hpp>
#include "util/deadline.hpp"
#include "util/fail.hpp"

namespace eplb::comm {
namespace {

using tcp = asio::ip::tcp;
using clock = std::chrono::steady_clock;

// op_get_by waits at most the milliseconds in its value, and its reply says whether the key came
// ('1' + value) or not ('0'): a get that times out keeps its connection, so waits that poll in short
// slices (the state's agreements) reuse one connection instead of opening one per slice.
enum : char { op_set = 'S', op_get_by = 'T', op_add = 'A', op_set_if_absent = 'C', op_erase = 'D', op_usage = 'U' };

enum class key_wait { present, timed_out, closed };

struct wire_header {
  char op;
  std::uint32_t key_size;
  std::uint32_t value_size;
};

}  // namespace

struct tcp_store_server::impl {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::map<std::string, std::string> values;
  std::multimap<std::string, asio::steady_timer*> waiters;
  std::thread thread;
  std::atomic<std::uint64_t> accepted{0};

  asio::awaitable<void> serve(tcp::socket socket) {
    try {
      for (;;) {
        wire_header h{};
        co_await asio::async_read(socket, asio::buffer(&h, sizeof h), asio::use_awaitable);
        if (h.key_size > (1U << 20) || h.value_size > (1U << 30)) co_return;  // not our protocol
        std::string key(h.key_size, '\0');
        std::string value(h.value_size, '\0');
        co_await asio::async_read(socket, asio::buffer(key), asio::use_awaitable);
        co_await asio::async_read(socket, asio::buffer(value), asio::use_awaitable);
        std::string reply;
        if (h.op == op_set) {
          values[key] = std::move(value);
          wake(key);
        } else if (h.op == op_add) {
          auto& v = values[key];
          const auto now = parse_counter(v, key) + parse_counter(value, key);
          v = std::to_string(now);
          reply = v;
          wake(key);
        } else if (h.op == op_set_if_absent) {
          const auto [it, inserted] = values.try_emplace(key, std::move(value));
          reply = it->second;
          if (inserted) wake(key);
        } else if (h.op == op_erase) {
          values.erase(key);
        } else if (h.op == op_usage) {
          reply = usage_text();
        } else if (h.op == op_get_by) {
          const auto waited = co_await wait_for_key(socket, key, deadline_in(value));
          if (waited == key_wait::closed) co_return;
          reply = waited == key_wait::present ? "1" + values[key] : "0";
        } else {
          co_return;
        }
        const auto size = static_cast<std::uint32_t>(reply.size());
        std::array<asio::const_buffer, 2> out{asio::buffer(&size, sizeof size), asio::buffer(reply)};
        co_await asio::async_write(socket, out, asio::use_awaitable);
      }
    } catch (const std::exception&) {
      // The client went away; its requests die with the connection.
    }
  }

  // Parks until `key` is set or the deadline passes; `closed` when the client closed the connection
  // first (its caller gave up on the reply). Waits that poll in short slices would otherwise leave
  // one parked connection per slice for a key that is never set. A client sends nothing while it
  // waits, so the socket turning readable means it closed. Resumed on the server's io thread.
  asio::awaitable<key_wait> wait_for_key(tcp::socket& socket, const std::string& key, clock::time_point deadline) {
    using namespace asio::experimental::awaitable_operators;
    while (values.count(key) == 0) {
      if (clock::now() >= deadline) co_return key_wait::timed_out;
      asio::steady_timer timer(io, deadline);  // wake() cancels it; expiry is the deadline
      auto it = waiters.emplace(key, &timer);
      boost::system::error_code timer_ec, socket_ec;
      const auto woke =
          co_await (timer.async_wait(asio::redirect_error(asio::use_awaitable, timer_ec)) ||
                    socket.async_wait(tcp::socket::wait_read, asio::redirect_error(asio::use_awaitable, socket_ec)));
      waiters.erase(it);
      if (woke.index() == 1 || !socket.is_open()) co_return key_wait::closed;
    }
    co_return key_wait::present;
  }

  // op_get_by's value: the milliseconds to wait, counted from now.
  static clock::time_point deadline_in(const std::string& value) {
    std::int64_t ms = 0;
    const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), ms);
    if (ec != std::errc() || ms < 0) ms = 0;  // not a number: answer at once
    return clock::now() + std::chrono::milliseconds(std::min<std::int64_t>(ms, 24LL * 3600 * 1000));
  }

  // "keys bytes", counted on the io thread that owns the map.
  [[nodiscard]] std::string usage_text() const {
    std::size_t bytes = 0;
    for (const auto& [k, v] : values) bytes += k.size() + v.size();
    return fmt::format("{} {}", values.size(), bytes);
  }

  void wake(const std::string& key) {
    auto [first, last] = waiters.equal_range(key);
    for (auto it = first; it != last; ++it) it->second->cancel();
  }

  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto socket = co_await acceptor.async_accept(asio::use_awaitable);
      socket.set_option(tcp::no_delay(true));
      accepted.fetch_add(1, std::memory_order_relaxed);
      asio::co_spawn(io, serve(std::move(socket)), [](std::exception_ptr) {});  // serve() catches its own errors
    }
  }
};

tcp_store_server::tcp_store_server(const std::string& bind_address, std::uint16_t port)
    : impl_(std::make_unique<impl>()) {
  try {
    const tcp::endpoint ep(asio::ip::make_address(bind_address), port);
    impl_->acceptor.open(ep.protocol());
    impl_->acceptor.set_option(tcp::acceptor::reuse_address(true));
    impl_->acceptor.bind(ep);
    impl_->acceptor.listen();
  } catch (const std::exception& e) {
    fail(errc::transport, "tcp store server: cannot listen on {}:{}: {}", bind_address, port, e.what());
  }
  asio::co_spawn(impl_->io, impl_->accept_loop(), [](std::exception_ptr) {});  // ends when the acceptor closes
  impl_->thread = std::thread([this] { impl_->io.run(); });
}

tcp_store_server::~tcp_store_server() {
  impl_->io.stop();
  impl_->thread.join();
}

std::uint16_t tcp_store_server::port() const noexcept {
  return impl_->acceptor.local_endpoint().port();
}

std::uint64_t tcp_store_server::connections_accepted() const noexcept {
  return impl_->accepted.load(std::memory_order_relaxed);
}

namespace {

// Threads share the store: each request borrows an idle connection (or opens one), so a GET that
// waits for a key never blocks another thread's SET.
class tcp_store final : public store {
 public:
  tcp_store(std::string host, std::uint16_t port, milliseconds connect_timeout)
      : host_(std::move(host)), port_(port), connect_timeout_(connect_timeout) {
    give_back(connect(deadline_after(connect_timeout_)));
  }

  void set(const std::string& key, const std::string& value) override {
    (void)exchange(op_set, key, value, connect_timeout_);
  }
  // The server answers within `timeout`, so the connection survives a key that does not come; a
  // reply later than that plus a grace means the server is gone (the connection is then dropped).
  // Asked in waits of at most an hour, so that no deadline sum overflows (timeouts up to
  // milliseconds::max() mean "wait").
  std::string get(const std::string& key, milliseconds timeout) override {
    const auto deadline = deadline_after(timeout);
    const auto grace = std::min(connect_timeout_, milliseconds(2000));
    for (;;) {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - clock::now());
      const auto wait = std::clamp(left, milliseconds(0), milliseconds(std::chrono::hours(1)));
      auto reply = exchange(op_get_by, key, std::to_string(wait.count()), wait + grace);
      if (!reply.empty() && reply[0] == '1') return reply.substr(1);
      if (clock::now() >= deadline) {
        fail(errc::timeout, "tcp store {}:{}: key \"{}\" not set within {} ms", host_, port_, key, timeout.count());
      }
    }
  }
  std::int64_t add(const std::string& key, std::int64_t delta) override {
    return parse_counter(exchange(op_add, key, std::to_string(delta), connect_timeout_), key);
  }
  std::string set_if_absent(const std::string& key, const std::string& value) override {
    return exchange(op_set_if_absent, key, value, connect_timeout_);
  }
  void erase(const std::string& key) override { (void)exchange(op_erase, key, {}, connect_timeout_); }
  store_usage usage() override {
    const auto text = exchange(op_usage, {}, {}, connect_timeout_);
    store_usage u;
    if (std::sscanf(text.c_str(), "%zu %zu", &u.keys, &u.bytes) != 2) {
      fail(errc::transport, "tcp store: bad usage reply \"{}\"", text);
    }
    return u;
  }

 private:
  struct connection {
    asio::io_context io;
    tcp::socket socket{io};
  };

  // Runs the connection's queued operations until `done` or the deadline. On a timeout the socket
  // is closed and the cancelled handlers are run here, so none outlives the caller's frame.
  static bool finish_by(connection& c, clock::time_point deadline, const bool& done) {
    c.io.run_until(deadline);
    const bool finished = done;  // the cancelled handlers below set it too
    if (!finished) {
      c.socket.close();
      c.io.restart();
      c.io.run();
    }
    c.io.restart();
    return finished;
  }

  std::unique_ptr<connection> connect(clock::time_point deadline) {
    auto step = milliseconds(5);
    for (;;) {
      auto c = std::make_unique<connection>();
      boost::system::error_code ec;
      tcp::resolver resolver(c->io);
      const auto endpoints = resolver.resolve(host_, std::to_string(port_), ec);
      if (!ec) {
        // Asynchronous, bounded by the deadline: a blocking connect to an unreachable host would
        // wait out the kernel's SYN retries (minutes).
        bool done = false;
        asio::async_connect(c->socket, endpoints, [&](boost::system::error_code e, const tcp::endpoint&) {
          ec = e;
          done = true;
        });
        if (!finish_by(*c, deadline, done)) ec = asio::error::timed_out;
      }
      if (!ec) {
        c->socket.set_option(tcp::no_delay(true));
        return c;
      }
      if (clock::now() + step >= deadline) {
        fail(errc::timeout, "tcp store: cannot connect to {}:{} ({})", host_, port_, ec.message());
      }
      std::this_thread::sleep_for(step);
      step = std::min(step * 2, milliseconds(200));
    }
  }

  std::unique_ptr<connection> borrow(clock::time_point deadline) {
    {
      std::lock_guard lock(mutex_);
      if (!idle_.empty()) {
        auto c = std::move(idle_.back());
        idle_.pop_back();
        return c;
      }
    }
    return connect(deadline);
  }

  void give_back(std::unique_ptr<connection> c) {
    std::lock_guard lock(mutex_);
    idle_.push_back(std::move(c));
  }

  std::string exchange(char op, const std::string& key, const std::string& value, milliseconds timeout) {
    const auto deadline = deadline_after(timeout);
    auto c = borrow(deadline);
    auto& socket = c->socket;
    const wire_header h{op, static_cast<std::uint32_t>(key.size()), static_cast<std::uint32_t>(value.size())};
    std::array<asio::const_buffer, 3> out{asio::buffer(&h, sizeof h), asio::buffer(key), asio::buffer(value)};
    std::uint32_t size = 0;
    std::string reply;
    boost::system::error_code failure;
    bool done = false;
    asio::async_write(socket, out, [&](boost::system::error_code ec, std::size_t) {
      if (ec) {
        failure = ec;
        done = true;
        return;
      }
      asio::async_read(socket, asio::buffer(&size, sizeof size), [&](boost::system::error_code ec2, std::size_t) {
        if (ec2 || size == 0) {
          failure = ec2;
          done = true;
          return;
        }
        reply.resize(size);
        asio::async_read(socket, asio::buffer(reply), [&](boost::system::error_code ec3, std::size_t) {
          failure = ec3;
          done = true;
        });
      });
    });
    if (!finish_by(*c, deadline, done)) {
      // The connection is dropped: its late reply belongs to this request.
      fail(errc::timeout, "tcp store {}:{}: no reply for key \"{}\" within {} ms", host_, port_, key, timeout.count());
    }
    if (failure) fail(errc::transport, "tcp store {}:{}: {} (key \"{}\")", host_, port_, failure.message(), key);
    give_back(std::move(c));
    return reply;
  }

  std::string host_;
  std::uint16_t port_;
  milliseconds connect_timeout_;
  std::mutex mutex_;
  std::vector<std::unique_ptr<connection>> idle_;
};

}  // namespace

std::shared_ptr<store> make_tcp_store(const std::string& host, std::uint16_t port, milliseconds connect_timeout) {
  return std::make_shared<tcp_store>(host, port, connect_timeout);
}

}  // namespace eplb::comm
