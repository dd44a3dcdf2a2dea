#include "tools/rank_processes.hpp"

#include <fmt/ranges.h>

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "util/deadline.hpp"
#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace eplb::tools {

namespace {

// Starts `self_exe` with `args` (argv[0] included) as a child process.
pid_t spawn(const std::string& self_exe, std::vector<std::string> args, int rank) {
  const pid_t pid = ::fork();
  if (pid < 0) fail(errc::internal, "could not fork rank {}", rank);
  if (pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(self_exe.c_str(), argv.data());
    std::_Exit(127);
  }
  return pid;
}

// Waits for every child; those still running at `deadline`, or `grace` after one failed, are
// killed. Returns each one's exit status, or that it was killed.
std::vector<rank_process> wait_all(const std::vector<pid_t>& children, std::chrono::steady_clock::time_point deadline,
                                   std::chrono::milliseconds grace, int expected_death) {
  const auto ranks = children.size();
  std::vector<rank_process> out(ranks);
  std::vector<bool> done(ranks, false);
  for (std::size_t left = ranks; left > 0;) {
    for (std::size_t r = 0; r < ranks; ++r) {
      int status = 0;
      if (done[r] || ::waitpid(children[r], &status, WNOHANG) == 0) continue;
      out[r].exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      done[r] = true;
      --left;
      if (out[r].exit_status != 0 && static_cast<int>(r) != expected_death) {
        deadline = std::min(deadline, deadline_after(grace));
      }
    }
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      for (std::size_t r = 0; r < ranks; ++r) {
        if (done[r]) continue;
        ::kill(children[r], SIGKILL);
        ::waitpid(children[r], nullptr, 0);
        out[r].killed = true;
        done[r] = true;
        --left;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

std::vector<rank_process> run_rank_processes(const std::string& self_exe, const std::vector<std::string>& child_args,
                                             int ranks, std::chrono::steady_clock::time_point deadline,
                                             std::chrono::milliseconds grace, int expected_death) {
  static int runs = 0;
  const auto dir = std::filesystem::temp_directory_path() / fmt::format("eplb-ranks-{}-{}", ::getpid(), runs++);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::vector<pid_t> children;
  std::vector<std::string> result_files;
  for (int r = 0; r < ranks; ++r) {
    result_files.push_back((dir / fmt::format("result-{}", r)).string());
    std::vector<std::string> args{self_exe};
    args.insert(args.end(), child_args.begin(), child_args.end());
    for (const auto& a : {std::string("--rank"), std::to_string(r), std::string("--store"), (dir / "store").string(),
                          std::string("--result"), result_files.back()}) {
      args.push_back(a);
    }
    children.push_back(spawn(self_exe, std::move(args), r));
  }
  auto out = wait_all(children, deadline, grace, expected_death);
  for (std::size_t r = 0; r < out.size(); ++r) out[r].result = read_file(result_files[r]);
  std::filesystem::remove_all(dir);
  return out;
}

rank_store::rank_store(const std::string& spec, int ranks, int rank, std::chrono::milliseconds timeout)
    : ranks_(ranks), timeout_(timeout) {
  const auto colon = spec.find(':');
  const auto kind = colon == std::string::npos ? std::string() : spec.substr(0, colon);
  if (kind != "tcp" && kind != "tcp-serve") {
    if (spec.empty())
      fail(errc::invalid_argument, "--store: required with --rank (DIR, tcp:HOST:PORT or tcp-serve:HOST:PORT)");
    store_ = comm::make_file_store(kind == "file" ? spec.substr(colon + 1) : spec);
    join_run(spec, rank);
    return;
  }
  const auto rest = spec.substr(colon + 1);
  const auto last = rest.rfind(':');
  int port = -1;
  if (last != std::string::npos && last > 0) {
    try {
      std::size_t used = 0;
      port = std::stoi(rest.substr(last + 1), &used);
      if (used != rest.size() - last - 1) port = -1;
    } catch (const std::exception&) {
      port = -1;
    }
  }
  if (port <= 0 || port > 65535) {
    fail(errc::invalid_argument, "--store: \"{}\" is not {}:HOST:PORT with a port in 1..65535", excerpt(spec), kind);
  }
  const auto host = rest.substr(0, last);
  if (kind == "tcp-serve") server_ = std::make_unique<comm::tcp_store_server>(host, static_cast<std::uint16_t>(port));
  store_ = comm::make_tcp_store(host, static_cast<std::uint16_t>(port), timeout);
  join_run(spec, rank);
}

void rank_store::join_run(const std::string& spec, int rank) {
  const auto joins_of = [&](int q) { return fmt::format("eplb-run/rank-{}", q); };
  const std::int64_t run = store_->add(joins_of(rank), 1) - 1;
  auto mine = comm::make_prefix_store(store_, fmt::format("run-{}", run));
  try {
    comm::store_barrier(*mine, "joined", ranks_, timeout_);
  } catch (const error& e) {
    if (e.code() != errc::timeout) throw;
    std::vector<int> missing;
    for (int q = 0; q < ranks_; ++q) {
      if (store_->add(joins_of(q), 0) <= run) missing.push_back(q);
    }
    fail(errc::timeout, "--store {}: rank {} is in run {} of this store; ranks {} did not join it within {} ms{}",
         excerpt(spec), rank, run, fmt::join(missing, ","), timeout_.count(),
         run > 0 ? " (not started, too slow, or one of the earlier runs on this store did not start every rank: "
                   "then use a fresh store)"
                 : " (not started or too slow)");
  }
  store_ = std::move(mine);
}

void rank_store::finish() {
  if (!server_) {
    (void)store_->add("eplb-ranks-done", 1);
    return;
  }
  const auto deadline = deadline_after(timeout_);
  while (store_->add("eplb-ranks-done", 0) < ranks_ - 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

}  // namespace eplb::tools
