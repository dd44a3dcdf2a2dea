#include "tools/rank_processes.hpp"

#include <fmt/format.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "util/fail.hpp"

namespace eplb::tools {

std::vector<rank_process> run_rank_processes(const std::string& self_exe, const std::vector<std::string>& child_args,
                                             int ranks, std::chrono::steady_clock::time_point deadline,
                                             std::chrono::milliseconds grace) {
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
    const pid_t pid = ::fork();
    if (pid < 0) fail(errc::internal, "could not fork rank {}", r);
    if (pid == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(self_exe.c_str(), argv.data());
      std::_Exit(127);
    }
    children.push_back(pid);
  }
  std::vector<rank_process> out(static_cast<std::size_t>(ranks));
  std::vector<bool> done(static_cast<std::size_t>(ranks), false);
  for (int left = ranks; left > 0;) {
    for (int r = 0; r < ranks; ++r) {
      if (done[static_cast<std::size_t>(r)]) continue;
      int status = 0;
      if (::waitpid(children[static_cast<std::size_t>(r)], &status, WNOHANG) == 0) continue;
      auto& o = out[static_cast<std::size_t>(r)];
      o.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      done[static_cast<std::size_t>(r)] = true;
      --left;
      if (o.exit_status != 0) deadline = std::min(deadline, std::chrono::steady_clock::now() + grace);
    }
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      for (int r = 0; r < ranks; ++r) {
        if (done[static_cast<std::size_t>(r)]) continue;
        ::kill(children[static_cast<std::size_t>(r)], SIGKILL);
        ::waitpid(children[static_cast<std::size_t>(r)], nullptr, 0);
        out[static_cast<std::size_t>(r)].killed = true;
        done[static_cast<std::size_t>(r)] = true;
        --left;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (int r = 0; r < ranks; ++r) {
    std::ifstream in(result_files[static_cast<std::size_t>(r)]);
    std::ostringstream text;
    text << in.rdbuf();
    out[static_cast<std::size_t>(r)].result = text.str();
  }
  std::filesystem::remove_all(dir);
  return out;
}

}  // namespace eplb::tools
