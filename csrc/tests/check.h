// A tiny test harness for the C++ unit tests (no gtest: CI has no internet).
// KN_CHECK records a failure and goes on; main() returns the failure count.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

namespace kncore_test {
inline int failures = 0;

// Fixed by default so CI is deterministic; KNCORE_TEST_SEED=N tries other draws.
inline uint64_t seed() {
  const char* s = std::getenv("KNCORE_TEST_SEED");
  return s ? std::strtoull(s, nullptr, 10) : 0;
}

#define KN_CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++kncore_test::failures;                                                       \
    }                                                                                \
  } while (0)

// Records a failure unless fn throws an exception of type E whose message contains `needle`.
template <typename E>
void check_throws(const char* what, const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const E& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      std::fprintf(stderr, "%s: message lacks \"%s\": %s\n", what, needle.c_str(), e.what());
      ++failures;
    }
    return;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: wrong exception type: %s\n", what, e.what());
    ++failures;
    return;
  }
  std::fprintf(stderr, "%s: did not throw\n", what);
  ++failures;
}

inline int report(const char* name) {
  std::printf("%s: %s (%d failures)\n", name, failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
}  // namespace kncore_test
