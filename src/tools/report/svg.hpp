// Charts as inline SVG text for the HTML report of `eplb simulate`: no scripts, no external files,
// so the page renders anywhere (also offline and in a headless browser).
#pragma once

#include <string>
#include <vector>

namespace eplb::tools::svg {

struct series {
  std::string name;
  std::vector<double> y;  ///< one value per x
  std::string color;
};

/// A vertical line at x, e.g. a rebalance, with a colour saying how it ended and a tooltip.
struct marker {
  double x;
  std::string color;
  std::string label;
};

struct axis_range {
  double lo, hi;
};

/// A line chart over shared x values; `y` fixed, or fitted to the data when lo == hi.
[[nodiscard]] std::string line_chart(const std::string& id, const std::string& title, const std::vector<double>& x,
                                     const std::vector<series>& lines, axis_range y, const std::vector<marker>& marks);

/// Grouped bars: for each label, one bar per series (series[i].y[label index]).
[[nodiscard]] std::string bar_chart(const std::string& id, const std::string& title,
                                    const std::vector<std::string>& labels, const std::vector<series>& groups);

/// The i-th of a palette of distinguishable colours.
[[nodiscard]] std::string palette(std::size_t i);

/// Text made safe inside HTML and SVG elements and attributes.
[[nodiscard]] std::string escape(const std::string& text);

}  // namespace eplb::tools::svg
