#include "tools/report/svg.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace eplb::tools::svg {
namespace {

constexpr double width = 900, height = 300, left = 60, right = 160, top = 36, bottom = 40;
constexpr double plot_w = width - left - right, plot_h = height - top - bottom;

struct scale {
  double lo, hi, px_lo, px_hi;
  [[nodiscard]] double operator()(double v) const {
    const double t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    return px_lo + t * (px_hi - px_lo);
  }
};

std::string open_svg(const std::string& id, const std::string& title) {
  return fmt::format(
      "<svg id=\"{}\" class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "viewBox=\"0 0 {} {}\" role=\"img\"><title>{}</title>"
      "<text x=\"{}\" y=\"22\" class=\"title\">{}</text>",
      escape(id), width, height, width, height, escape(title), left, escape(title));
}

// The frame, four ticks on the y axis and five on the x axis.
std::string axes(const scale& xs, const scale& ys) {
  std::string out =
      fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" class=\"frame\"/>", left, top, plot_w, plot_h);
  for (int i = 0; i <= 4; ++i) {
    const double v = ys.lo + (ys.hi - ys.lo) * i / 4;
    out += fmt::format("<line x1=\"{}\" x2=\"{}\" y1=\"{:.1f}\" y2=\"{:.1f}\" class=\"grid\"/>", left, left + plot_w,
                       ys(v), ys(v));
    out += fmt::format("<text x=\"{}\" y=\"{:.1f}\" class=\"tick\" text-anchor=\"end\">{:.3g}</text>", left - 6,
                       ys(v) + 4, v);
  }
  for (int i = 0; i <= 5 && xs.hi > xs.lo; ++i) {
    const double v = xs.lo + (xs.hi - xs.lo) * i / 5;
    out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{:.0f}</text>", xs(v),
                       top + plot_h + 16, v);
  }
  return out;
}

std::string legend(const std::vector<series>& items) {
  std::string out;
  const std::size_t shown = std::min<std::size_t>(items.size(), 16);
  for (std::size_t i = 0; i < shown; ++i) {
    const double y = top + 8 + 16 * static_cast<double>(i);
    out += fmt::format(
        "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" "
        "class=\"legend\">{}</text>",
        width - right + 12, y - 8, items[i].color, width - right + 28, y + 1, escape(items[i].name));
  }
  if (items.size() > shown) {
    out += fmt::format("<text x=\"{}\" y=\"{}\" class=\"legend\">+{} more</text>", width - right + 12,
                       top + 8 + 16 * static_cast<double>(shown), items.size() - shown);
  }
  return out;
}

axis_range fit(const std::vector<series>& lines, axis_range y) {
  if (y.hi > y.lo) return y;
  double lo = 0, hi = 0;
  for (const auto& s : lines) {
    for (double v : s.y) hi = std::max(hi, v);
  }
  return {lo, hi > lo ? hi * 1.05 : 1.0};
}

}  // namespace

std::string line_chart(const std::string& id, const std::string& title, const std::vector<double>& x,
                       const std::vector<series>& lines, axis_range y, const std::vector<marker>& marks) {
  const auto yr = fit(lines, y);
  const double x_lo = x.empty() ? 0 : x.front(), x_hi = x.empty() ? 1 : std::max(x.back(), x_lo + 1);
  const scale xs{x_lo, x_hi, left, left + plot_w}, ys{yr.lo, yr.hi, top + plot_h, top};
  std::string out = open_svg(id, title) + axes(xs, ys);
  for (const auto& m : marks) {
    out += fmt::format(
        "<line x1=\"{0:.1f}\" x2=\"{0:.1f}\" y1=\"{1}\" y2=\"{2}\" stroke=\"{3}\" class=\"marker\">"
        "<title>{4}</title></line>",
        xs(m.x), top, top + plot_h, m.color, escape(m.label));
  }
  for (const auto& s : lines) {
    std::string points;
    for (std::size_t i = 0; i < x.size() && i < s.y.size(); ++i) {
      if (std::isfinite(s.y[i])) points += fmt::format("{:.1f},{:.1f} ", xs(x[i]), ys(s.y[i]));
    }
    out +=
        fmt::format("<polyline class=\"series\" fill=\"none\" stroke=\"{}\" points=\"{}\"><title>{}</title></polyline>",
                    s.color, points, escape(s.name));
  }
  return out + legend(lines) + "</svg>";
}

std::string bar_chart(const std::string& id, const std::string& title, const std::vector<std::string>& labels,
                      const std::vector<series>& groups) {
  const auto yr = fit(groups, {0, 0});
  const scale ys{yr.lo, yr.hi, top + plot_h, top};
  std::string out = open_svg(id, title) + axes({0, 0, left, left}, ys);
  const double slot = labels.empty() ? plot_w : plot_w / static_cast<double>(labels.size());
  const double bar = slot * 0.8 / static_cast<double>(std::max<std::size_t>(1, groups.size()));
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const double x0 = left + slot * static_cast<double>(i) + slot * 0.1;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const double v = i < groups[g].y.size() ? groups[g].y[i] : 0.0;
      out += fmt::format(
          "<rect class=\"bar\" x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\">"
          "<title>{} {}: {:.4g}</title></rect>",
          x0 + bar * static_cast<double>(g), ys(v), std::max(1.0, bar - 1), top + plot_h - ys(v), groups[g].color,
          escape(labels[i]), escape(groups[g].name), v);
    }
    out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{}</text>", x0 + slot * 0.4,
                       top + plot_h + 16, escape(labels[i]));
  }
  return out + legend(groups) + "</svg>";
}

std::string palette(std::size_t i) {
  static const char* colors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return colors[i % (sizeof(colors) / sizeof(colors[0]))];
}

std::string escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += static_cast<unsigned char>(c) < 0x20 && c != '\n' ? ' ' : c;
    }
  }
  return out;
}

}  // namespace eplb::tools::svg
