#pragma once
// Integers from environment variables, checked: a decimal (digits, after a '-' for a negative one;
// no space or '+') in [lo, hi], or a config_error that names the variable, its value and the valid
// range.
#include <cerrno>
#include <cstdlib>

#include "src/common/error.h"

namespace ferry {

// `value` is the variable's text (getenv's result). what: appended to the error (what the value
// means), or null.
inline long env_integer(const char* name, const char* value, long lo, long hi, const char* what = nullptr) {
  errno = 0;
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  const char* digits = value[0] == '-' ? value + 1 : value;   // strtol would also skip spaces and a '+'
  FERRY_CONFIG_CHECK(*digits >= '0' && *digits <= '9' && end && *end == '\0' && errno == 0 && v >= lo && v <= hi,
                     "environment variable ",
                     name, "='", value, "' is not an integer in [", lo, ", ", hi, "]", what ? ": " : "",
                     what ? what : "");
  return v;
}

}  // namespace ferry
