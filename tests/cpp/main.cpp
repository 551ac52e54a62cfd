#include <cstdio>
#include <exception>
#include <stdexcept>

#include "harness.h"

namespace dspark_test {

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void fail(const char* file, int line, const std::string& what) {
  throw Failure(std::string(file) + ":" + std::to_string(line) + ": " + what);
}

}  // namespace dspark_test

int main() {
  int failed = 0;
  for (const auto& c : dspark_test::registry()) {
    try {
      c.fn();
      std::printf("[ ok ] %s\n", c.name);
    } catch (const std::exception& e) {
      ++failed;
      std::printf("[FAIL] %s: %s\n", c.name, e.what());
    }
  }
  std::printf("%zu tests, %d failed\n", dspark_test::registry().size(), failed);
  return failed == 0 ? 0 : 1;
}
