// The host's loopback TCP capacity for the Gloo exchange's traffic pattern: `ranks` simulated ranks,
// every ordered pair with `lanes` connections on 127.0.0.1, each rank sending `bytes` in all (split
// over its peers and lanes) while receiving as much, one thread per connection end, no GPU. Prints
// one JSON "limit" line with GB/s per rank, the ceiling any TCP-staged exchange between ranks of one
// host can reach (bench/gpu/run.sh puts it beside the gloo numbers).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// A socket that closes itself.
class socket_fd {
 public:
  explicit socket_fd(int fd = -1) noexcept : fd_(fd) {}
  socket_fd(socket_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  socket_fd& operator=(socket_fd&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  socket_fd(const socket_fd&) = delete;
  socket_fd& operator=(const socket_fd&) = delete;
  ~socket_fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  [[nodiscard]] int get() const noexcept { return fd_; }

 private:
  int fd_;
};

[[noreturn]] void sys_fail(const char* what) {
  throw std::runtime_error(fmt::format("{}: {}", what, std::strerror(errno)));
}

// Two connected ends over 127.0.0.1 (through a listener that lives only for the handshake).
std::pair<socket_fd, socket_fd> connected_pair() {
  socket_fd listener(::socket(AF_INET, SOCK_STREAM, 0));
  if (listener.get() < 0) sys_fail("socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) sys_fail("bind");
  if (::listen(listener.get(), 1) != 0) sys_fail("listen");
  socklen_t len = sizeof addr;
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) sys_fail("getsockname");
  socket_fd client(::socket(AF_INET, SOCK_STREAM, 0));
  if (client.get() < 0) sys_fail("socket");
  if (::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) sys_fail("connect");
  socket_fd server(::accept(listener.get(), nullptr, nullptr));
  if (server.get() < 0) sys_fail("accept");
  const int one = 1;
  (void)::setsockopt(client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // A stuck transfer fails (EAGAIN) instead of blocking forever.
  const timeval limit{.tv_sec = 60, .tv_usec = 0};
  for (int fd : {client.get(), server.get()}) {
    (void)::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    (void)::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  }
  return {std::move(client), std::move(server)};
}

void send_all(int fd, const std::vector<char>& buf, std::size_t total) {
  for (std::size_t done = 0; done < total;) {
    const auto n = ::send(fd, buf.data(), std::min(buf.size(), total - done), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) sys_fail("send");
    done += static_cast<std::size_t>(n);
  }
}

void recv_all(int fd, std::vector<char>& buf, std::size_t total) {
  for (std::size_t done = 0; done < total;) {
    const auto n = ::recv(fd, buf.data(), std::min(buf.size(), total - done), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) sys_fail("recv");
    done += static_cast<std::size_t>(n);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loopback TCP capacity for a Gloo-like exchange"};
  int ranks = 2, lanes = 16, reps = 3;
  std::size_t bytes = 1'409'286'144;  // DeepSeek-V3: 32 experts of 44 MB per rank
  std::size_t io_bytes = 16U << 20;
  app.add_option("--ranks", ranks)->check(CLI::Range(2, 64));
  app.add_option("--lanes", lanes, "connections per ordered pair")->check(CLI::Range(1, 64));
  app.add_option("--bytes", bytes, "bytes each rank sends (and receives)");
  app.add_option("--io-bytes", io_bytes, "bytes per send()/recv() call")->check(CLI::Range(4096, 1 << 30));
  app.add_option("--reps", reps)->check(CLI::Range(1, 100));
  CLI11_PARSE(app, argc, argv);
  try {
    const auto pairs = static_cast<std::size_t>(ranks) * static_cast<std::size_t>(ranks - 1);
    const auto conns = pairs * static_cast<std::size_t>(lanes);
    const std::size_t per_conn = bytes / (static_cast<std::size_t>(ranks - 1) * static_cast<std::size_t>(lanes));
    std::vector<std::pair<socket_fd, socket_fd>> links;
    for (std::size_t i = 0; i < conns; ++i) links.push_back(connected_pair());
    std::vector<double> seconds;
    for (int rep = 0; rep < reps; ++rep) {
      std::atomic<bool> go{false};
      std::vector<std::thread> threads;
      std::vector<std::string> errors(2 * conns);
      for (std::size_t i = 0; i < conns; ++i) {
        threads.emplace_back([&, i] {
          std::vector<char> buf(io_bytes, 'x');
          while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
          try {
            send_all(links[i].first.get(), buf, per_conn);
          } catch (const std::exception& e) {
            errors[2 * i] = e.what();
          }
        });
        threads.emplace_back([&, i] {
          std::vector<char> buf(io_bytes);
          while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
          try {
            recv_all(links[i].second.get(), buf, per_conn);
          } catch (const std::exception& e) {
            errors[2 * i + 1] = e.what();
          }
        });
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // every thread is waiting
      const auto start = std::chrono::steady_clock::now();
      go.store(true, std::memory_order_release);
      for (auto& t : threads) t.join();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      for (const auto& e : errors) {
        if (!e.empty()) throw std::runtime_error(e);
      }
    }
    std::sort(seconds.begin(), seconds.end());
    const double median = seconds[seconds.size() / 2];
    const double per_rank = static_cast<double>(per_conn) * static_cast<double>(ranks - 1) * lanes;
    std::cout << fmt::format(
        R"({{"bench":"limit","path":"tcp_loopback_{}r_{}lanes","ranks":{},"lanes":{},"connections":{},"bytes":{:.0f},)"
        R"("seconds":{:.4f},"gbps":{:.2f},"aggregate_gbps":{:.2f}}})"
        "\n",
        ranks, lanes, ranks, lanes, conns, per_rank, median, per_rank / median / 1e9, per_rank * ranks / median / 1e9);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "tcp_limit: " << e.what() << '\n';
    return 1;
  }
}
