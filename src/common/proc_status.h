#pragma once
// This process's memory figures from /proc/self/status (Linux).
#include <cstdint>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

namespace ferry {

// The kB fields of /proc/self/status named in `fields` ("VmHWM", "RssAnon", ...), in bytes and in
// the order asked; 0 for a field, or the whole file, that is not there.
inline std::vector<int64_t> proc_status_bytes(std::initializer_list<const char*> fields) {
  std::vector<int64_t> out(fields.size(), 0);
  std::ifstream f("/proc/self/status");
  std::string key;
  int64_t kib = 0;
  while (f >> key) {
    size_t i = 0;
    for (const char* name : fields) {
      if (key == std::string(name) + ":" && f >> kib) out[i] = kib * 1024;
      ++i;
    }
    f.ignore(1 << 20, '\n');
  }
  return out;
}

}  // namespace ferry
