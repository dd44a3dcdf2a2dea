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
                                             int ranks, std::chrono::steady_clock::time_point deadline) {
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
  for (int r = 0; r < ranks; ++r) {
    auto& o = out[static_cast<std::size_t>(r)];
    int status = 0;
    while (::waitpid(children[static_cast<std::size_t>(r)], &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        for (pid_t p : children) ::kill(p, SIGKILL);
        ::waitpid(children[static_cast<std::size_t>(r)], &status, 0);
        o.killed = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    o.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    std::ifstream in(result_files[static_cast<std::size_t>(r)]);
    std::ostringstream text;
    text << in.rdbuf();
    o.result = text.str();
  }
  std::filesystem::remove_all(dir);
  return out;
}

}  // namespace eplb::tools
