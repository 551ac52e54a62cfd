// A minimal test harness for the C++ tests (no third-party dependency).
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace dspark_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

std::vector<Case>& registry();
void fail(const char* file, int line, const std::string& what);

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

}  // namespace dspark_test

#define DSPARK_TEST(name)                                                   \
  static void name();                                                       \
  static ::dspark_test::Register register_##name(#name, name);              \
  static void name()

#define EXPECT(cond)                                                        \
  do {                                                                      \
    if (!(cond)) ::dspark_test::fail(__FILE__, __LINE__, #cond);            \
  } while (0)

#define EXPECT_THROWS(type, stmt)                                           \
  do {                                                                      \
    bool thrown = false;                                                    \
    try {                                                                   \
      stmt;                                                                 \
    } catch (const type&) {                                                 \
      thrown = true;                                                        \
    }                                                                       \
    if (!thrown) ::dspark_test::fail(__FILE__, __LINE__, "expected " #type " from " #stmt); \
  } while (0)
