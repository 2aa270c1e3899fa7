// Shared by the shim's translation units: runs `f`, turning a C++ exception into a message kept in `err` and a
// non-zero return, so no exception crosses into Rust.
#pragma once
#include <c10/util/Exception.h>

#include <exception>
#include <string>

template <class F>
int lmim_guarded(std::string& err, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    err = e.what_without_backtrace();
  } catch (const std::exception& e) {
    err = e.what();
  }
  return 1;
}
