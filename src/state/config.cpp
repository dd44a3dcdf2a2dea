#include "eplb/config.hpp"

#include <limits>
#include <nlohmann/json.hpp>

#include "util/fail.hpp"
#include "util/json_text.hpp"

namespace eplb {

void check_timeout(std::string_view field, std::chrono::milliseconds timeout, errc code) {
  if (timeout >= min_timeout && timeout <= max_timeout) return;
  fail(code, "{}: {} is not allowed (must be in {}..{} ms, i.e. 1 ms to 24 h)", field, timeout.count(),
       min_timeout.count(), max_timeout.count());
}

void config::validate() const {
  const auto positive = [](const char* field, long v) {
    if (v <= 0) fail(errc::invalid_config, "{}: {} is not allowed (must be > 0)", field, v);
  };
  positive("window_size", window_size);
  positive("step_interval", step_interval);
  positive("log_balancedness_interval", log_balancedness_interval);
  check_timeout("timeout_ms", timeout);
  if (num_redundant_experts < 0) {
    fail(errc::invalid_config, "num_redundant_experts: {} is not allowed (must be >= 0)", num_redundant_experts);
  }
  if (commit_lag_steps < 0 || commit_lag_steps > 1000) {
    fail(errc::invalid_config, "commit_lag_steps: {} is not allowed (must be in 0..1000)", commit_lag_steps);
  }
  if (policy != "default" && policy != "min_move") {
    fail(errc::invalid_config, "policy: \"{}\" is not allowed (allowed: \"default\", \"min_move\")", excerpt(policy));
  }
  if (!(min_improvement >= -1.0 && min_improvement <= 1.0)) {
    fail(errc::invalid_config, "min_improvement: {} is not allowed (must be in -1..1)", min_improvement);
  }
  if (history_size < 1 || history_size > 100'000) {
    fail(errc::invalid_config, "history_size: {} is not allowed (must be in 1..100000)", history_size);
  }
  if (register_buffers && use_async) {
    fail(errc::invalid_config,
         "register_buffers: true is not allowed with use_async = true (async communicators move bytes through their "
         "own mailboxes)");
  }
  (void)resolved_communicator();
}

comm::backend config::resolved_communicator() const {
  comm::backend b;
  if (communicator == "auto") {
    // Elastic sync mode takes vLLM's choice (a stateless NCCL communicator per rank set); async mode
    // cannot use NCCL from the background thread, and gloo is made again for a new set as easily.
    b = use_async ? comm::backend::gloo : elastic ? comm::backend::stateless_nccl : comm::backend::nccl;
  } else {
    try {
      b = comm::parse_backend(communicator);
    } catch (const error&) {
      fail(errc::invalid_config,
           "communicator: \"{}\" is not allowed (allowed: auto, nccl, gloo, stateless_nccl, cuda_ipc, loopback)",
           excerpt(communicator));
    }
  }
  if (use_async && (b == comm::backend::nccl || b == comm::backend::stateless_nccl)) {
    fail(errc::invalid_config,
         "communicator: \"{}\" is not allowed with use_async = true (NCCL kernels launched from the background "
         "thread collide with the serving loop's NCCL and all-to-all kernels and hang; use gloo, cuda_ipc or auto)",
         communicator == "auto" ? std::string(comm::to_string(b)) : communicator);
  }
  return b;
}

policy_kind config::resolved_policy() const {
  return parse_policy(policy, "policy");
}

namespace {

long json_integer(const std::string& key, const nlohmann::json& v) {
  if (!v.is_number_integer()) {
    fail(errc::invalid_config, "{}: {} is not allowed (must be an integer)", key, json_excerpt(v));
  }
  const auto x = v.get<std::int64_t>();
  if (x < -1'000'000'000'000 || x > 1'000'000'000'000) fail(errc::invalid_config, "{}: {} is out of range", key, x);
  return static_cast<long>(x);
}

// Fields held in an int: a larger value would wrap around (4294967297 would become 1).
int json_int(const std::string& key, const nlohmann::json& v) {
  const long x = json_integer(key, v);
  if (x < std::numeric_limits<int>::min() || x > std::numeric_limits<int>::max()) {
    fail(errc::invalid_config, "{}: {} is out of range ({}..{})", key, x, std::numeric_limits<int>::min(),
         std::numeric_limits<int>::max());
  }
  return static_cast<int>(x);
}

bool json_bool(const std::string& key, const nlohmann::json& v) {
  if (!v.is_boolean()) {
    fail(errc::invalid_config, "{}: {} is not allowed (must be true or false)", key, json_excerpt(v));
  }
  return v.get<bool>();
}

std::string json_string(const std::string& key, const nlohmann::json& v) {
  if (!v.is_string()) fail(errc::invalid_config, "{}: {} is not allowed (must be a string)", key, json_excerpt(v));
  return v.get<std::string>();
}

double json_number(const std::string& key, const nlohmann::json& v) {
  if (!v.is_number()) fail(errc::invalid_config, "{}: {} is not allowed (must be a number)", key, json_excerpt(v));
  return v.get<double>();
}

using field_setter = void (*)(config&, const std::string&, const nlohmann::json&);

// Every field a config JSON may hold, in the order the "unknown field" error lists them.
const std::vector<std::pair<std::string_view, field_setter>>& json_fields() {
  static const std::vector<std::pair<std::string_view, field_setter>> fields = {
      {"window_size", [](config& c, const std::string& k, const nlohmann::json& v) { c.window_size = json_int(k, v); }},
      {"step_interval",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.step_interval = json_int(k, v); }},
      {"num_redundant_experts",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.num_redundant_experts = json_int(k, v); }},
      {"log_balancedness",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.log_balancedness = json_bool(k, v); }},
      {"log_balancedness_interval",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.log_balancedness_interval = json_int(k, v); }},
      {"use_async", [](config& c, const std::string& k, const nlohmann::json& v) { c.use_async = json_bool(k, v); }},
      {"elastic", [](config& c, const std::string& k, const nlohmann::json& v) { c.elastic = json_bool(k, v); }},
      {"policy", [](config& c, const std::string& k, const nlohmann::json& v) { c.policy = json_string(k, v); }},
      {"communicator",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.communicator = json_string(k, v); }},
      {"staging_bytes",
       [](config& c, const std::string& k, const nlohmann::json& v) {
         const long x = json_integer(k, v);
         if (x < 0) fail(errc::invalid_config, "staging_bytes: {} is not allowed (must be >= 0)", x);
         c.staging_bytes = static_cast<std::size_t>(x);
       }},
      {"timeout_ms", [](config& c, const std::string& k,
                        const nlohmann::json& v) { c.timeout = std::chrono::milliseconds(json_integer(k, v)); }},
      {"commit_lag_steps",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.commit_lag_steps = json_int(k, v); }},
      {"register_buffers",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.register_buffers = json_bool(k, v); }},
      {"reserve_memory",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.reserve_memory = json_bool(k, v); }},
      {"history_size",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.history_size = json_int(k, v); }},
      {"min_improvement",
       [](config& c, const std::string& k, const nlohmann::json& v) { c.min_improvement = json_number(k, v); }},
  };
  return fields;
}

}  // namespace

config config::from_json(std::string_view text) {
  const auto doc = parse_json(text, errc::invalid_config, "config");
  if (!doc.is_object()) fail(errc::invalid_config, "config: must be a JSON object, got {}", doc.type_name());
  const auto& fields = json_fields();
  config c;
  for (const auto& [key, v] : doc.items()) {
    const std::string& name = key;  // clang 14 cannot capture a structured binding
    const auto it = std::find_if(fields.begin(), fields.end(), [&](const auto& f) { return f.first == name; });
    if (it == fields.end()) {
      std::string known;
      for (const auto& f : fields) known += fmt::format("{}{}", known.empty() ? "" : ", ", f.first);
      fail(errc::invalid_config, "{}: unknown field (known: {})", excerpt(key), known);
    }
    it->second(c, key, v);
  }
  c.validate();
  return c;
}

}  // namespace eplb
