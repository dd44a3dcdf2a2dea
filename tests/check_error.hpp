// Asserting that a call throws eplb::error with a given code and a message containing given text.
#pragma once

#include <doctest/doctest.h>

#include <string>

#include "eplb/error.hpp"

#define CHECK_EPLB_ERROR(expr, expected_code, expected_text)                                            \
  do {                                                                                                  \
    bool eplb_threw_ = false;                                                                           \
    try {                                                                                               \
      (void)(expr);                                                                                     \
    } catch (const ::eplb::error& eplb_e_) {                                                            \
      eplb_threw_ = true;                                                                               \
      CHECK_MESSAGE(eplb_e_.code() == (expected_code), "code ", ::eplb::to_string(eplb_e_.code()),      \
                    " message: ", std::string(eplb_e_.what()));                                         \
      CHECK_MESSAGE(std::string(eplb_e_.what()).find(expected_text) != std::string::npos, "message \"", \
                    std::string(eplb_e_.what()), "\" lacks \"", expected_text, "\"");                   \
    }                                                                                                   \
    CHECK_MESSAGE(eplb_threw_, #expr " did not throw eplb::error");                                     \
  } while (false)
