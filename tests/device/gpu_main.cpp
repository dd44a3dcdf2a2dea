// The main of the single-GPU doctest binaries: without a GPU they skip (exit 77, meson's skip code)
// instead of failing, so the gpu suite can run everywhere.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "eplb/device/device.hpp"

int main(int argc, char** argv) {
  if (eplb::device::cuda_device_count() == 0) {
    std::puts("skip: no GPU");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
