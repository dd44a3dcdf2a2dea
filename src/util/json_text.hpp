// Hostile JSON in, bounded errors out: the one place that parses the JSON eplb reads (config,
// `eplb plan`) with a nesting limit, and that turns a bad value into a short, printable excerpt for
// error messages. Echoing a value with dump() is unbounded: a 100,000-deep array overflowed the
// stack while serialising, and a megabyte-long string went into the message whole.
#pragma once

#include <fmt/format.h>

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "util/fail.hpp"

namespace eplb {

/// No input eplb reads nests deeper than 3; 64 leaves room and keeps recursion over a value shallow.
inline constexpr int max_json_depth = 64;
/// How many characters of a bad value an error message shows.
inline constexpr std::size_t excerpt_chars = 40;

/// At most `max` characters of `text`, control characters escaped (\n, \x01), "..." when cut; never
/// ends inside a UTF-8 sequence.
[[nodiscard]] inline std::string excerpt(std::string_view text, std::size_t max = excerpt_chars) {
  std::string out;
  std::size_t i = 0;
  for (; i < text.size() && out.size() < max; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7f) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  if (i < text.size()) {
    // Bytes >= 0x80 are copied one for one, so dropping continuation bytes drops a partial character.
    while (i > 0 && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80 && !out.empty()) {
      --i;
      out.pop_back();
    }
    out += "...";
  }
  return out;
}

namespace detail {

inline std::string quoted_prefix(const std::string& s, std::size_t budget) {
  // replace: a cut may split a UTF-8 sequence, which dump() would otherwise throw on.
  return nlohmann::json(s.substr(0, budget)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Serialises `v` until `out` holds more than `budget` characters; containers deeper than a few
// levels print as "...", so neither the depth nor the size of `v` matters.
inline void excerpt_into(const nlohmann::json& v, std::string& out, std::size_t budget, int depth) {
  if (v.is_string()) {
    out += quoted_prefix(v.get_ref<const std::string&>(), budget);
    return;
  }
  if (!v.is_structured()) {
    out += v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return;
  }
  const bool object = v.is_object();
  out += object ? '{' : '[';
  for (auto it = v.begin(); it != v.end() && out.size() <= budget; ++it) {
    if (it != v.begin()) out += ',';
    if (depth >= 8) {
      out += "...";
      break;
    }
    if (object) out += quoted_prefix(it.key(), budget) + ':';
    excerpt_into(*it, out, budget, depth + 1);
  }
  out += object ? '}' : ']';
}

}  // namespace detail

/// A JSON value as text for an error message: at most `max` characters (see excerpt()).
[[nodiscard]] inline std::string json_excerpt(const nlohmann::json& v, std::size_t max = excerpt_chars) {
  std::string text;
  detail::excerpt_into(v, text, max + 1, 0);
  return excerpt(text, max);
}

/// The byte offset where `text` first nests containers deeper than `max_depth`, or npos. A scan
/// outside strings, without recursion or allocation, run before the parser builds anything.
[[nodiscard]] inline std::size_t too_deep_at(std::string_view text, int max_depth = max_json_depth) noexcept {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return i;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return std::string_view::npos;
}

/// Parses `text` as JSON; error(code) starting with `what` ("input", "config") when it is not JSON
/// or nests deeper than max_json_depth. The parser's own message is kept, its echo of the bad
/// token cut to an excerpt.
[[nodiscard]] inline nlohmann::json parse_json(std::string_view text, errc code, std::string_view what) {
  if (const auto at = too_deep_at(text); at != std::string_view::npos) {
    fail(code, "{}: nested deeper than {} levels at byte {} (allowed: at most {})", what, max_json_depth, at,
         max_json_depth);
  }
  // nlohmann ends its messages with the token it read: "...; last read: 'TOKEN'" (syntax errors)
  // or "number overflow parsing 'TOKEN'".
  const auto shorten = [](std::string message) {
    for (const std::string_view marker : {"last read: '", "parsing '"}) {
      const auto at = message.find(marker);
      if (at == std::string::npos) continue;
      auto token = std::string_view(message).substr(at + marker.size());
      if (!token.empty() && token.back() == '\'') token.remove_suffix(1);
      message = message.substr(0, at + marker.size()) + excerpt(token) + "'";
      break;
    }
    return excerpt(message, 400);
  };
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    fail(code, "{}: not valid JSON (byte {}: {})", what, e.byte, shorten(e.what()));
  } catch (const nlohmann::json::exception& e) {  // e.g. a number out of range (found by fuzz_plan_json)
    fail(code, "{}: not valid JSON ({})", what, shorten(e.what()));
  }
  return doc;
}

}  // namespace eplb
