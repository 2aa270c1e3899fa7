// Shared by the shim's translation units: runs `f`, turning a C++ exception into a message kept in the one
// per-thread error slot (read from Rust with lmim_last_error()) and a non-zero return, so no exception crosses
// into Rust.
#pragma once
#include <c10/util/Exception.h>

#include <exception>
#include <string>

// The calling thread's last error message (defined once, in optim_shim.cpp, which every build compiles).
std::string& lmim_error_slot();

template <class F>
int lmim_guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    lmim_error_slot() = e.what_without_backtrace();
  } catch (const std::exception& e) {
    lmim_error_slot() = e.what();
  }
  return 1;
}
