// The `eplb` command: offline planning now; simulate, exchange, info and bench join as they land.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <fstream>
#include <iostream>
#include <sstream>

#include "eplb/comm/communicator.hpp"
#include "eplb/device/device.hpp"
#include "eplb/error.hpp"
#include "eplb_build_config.hpp"
#include "tools/plan_json.hpp"

namespace {

// Exit statuses: 0 ok, 1 runtime failure, 2 bad input.
constexpr int exit_bad_input = 2;

std::string read_input(const std::string& path) {
  std::ostringstream text;
  if (path == "-") {
    text << std::cin.rdbuf();
    return text.str();
  }
  std::ifstream file(path, std::ios::binary);
  if (!file) throw eplb::error(eplb::errc::invalid_argument, fmt::format("{}: cannot open for reading", path));
  text << file.rdbuf();
  return text.str();
}

int run_plan(const std::string& path, bool text) {
  const auto request = eplb::tools::parse_plan_text(read_input(path));
  const auto result = eplb::tools::run_plan(request);
  if (text) {
    std::cout << eplb::tools::to_text(request, result);
  } else {
    std::cout << eplb::tools::to_json(result).dump() << '\n';
  }
  return 0;
}

int run_info() {
  std::cout << fmt::format("eplb {}\n", EPLB_VERSION);
  const int gpus = eplb::device::cuda_device_count();
  std::cout << fmt::format("devices:\n  {:<16} built, runnable\n", "host");
  std::cout << fmt::format("  {:<16} {}, {}\n", "cuda", EPLB_HAVE_CUDA ? "built" : "not built",
                           gpus > 0 ? fmt::format("runnable ({} GPU(s))", gpus) : std::string("not runnable (no GPU)"));
  std::cout << "communicators:\n";
  for (const auto& b : eplb::comm::backend_report()) {
    std::cout << fmt::format("  {:<16} {}, {}{}\n", eplb::comm::to_string(b.kind), b.built ? "built" : "not built",
                             b.runnable ? "runnable" : "not runnable", b.reason.empty() ? "" : " (" + b.reason + ")");
  }
  return 0;
}

bool is_bad_input(eplb::errc code) {
  using eplb::errc;
  return code == errc::invalid_argument || code == errc::invalid_json || code == errc::invalid_map ||
         code == errc::invalid_config;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"eplb: expert-parallel load balancing for MoE serving"};
  app.require_subcommand(1);

  std::string plan_path;
  bool plan_text = false;
  auto* plan = app.add_subcommand("plan", "Compute a placement from a JSON load description (offline)");
  plan->add_option("file", plan_path, "JSON request, or - for stdin")->required();
  plan->add_flag("--text", plan_text, "Print a readable per-rank table instead of JSON");

  auto* info = app.add_subcommand("info", "Show which device and communicator backends were built and can run here");

  CLI11_PARSE(app, argc, argv);
  try {
    if (plan->parsed()) return run_plan(plan_path, plan_text);
    if (info->parsed()) return run_info();
  } catch (const eplb::error& e) {
    std::cerr << "eplb: " << e.what() << '\n';
    return is_bad_input(e.code()) ? exit_bad_input : 1;
  } catch (const std::exception& e) {
    std::cerr << "eplb: unexpected error: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
