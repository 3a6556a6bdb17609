#include "src/dist/numa.h"

#include <sched.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>

#include "src/common/error.h"

namespace ferry::dist {
namespace {

// The first line of a sysfs file, or "" when it cannot be read.
std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  if (f) std::getline(f, line);
  return line;
}

}  // namespace

std::vector<int> parse_cpu_list(const std::string& text, const std::string& what) {
  std::vector<int> cpus;
  std::stringstream ss(text);
  std::string part;
  while (std::getline(ss, part, ',')) {
    part.erase(std::remove_if(part.begin(), part.end(), [](unsigned char c) { return std::isspace(c); }), part.end());
    if (part.empty()) continue;
    const size_t dash = part.find('-');
    try {
      size_t used = 0;
      const int lo = std::stoi(part.substr(0, dash), &used);
      FERRY_CHECK(used == (dash == std::string::npos ? part.size() : dash), "");
      int hi = lo;
      if (dash != std::string::npos) {
        const std::string rest = part.substr(dash + 1);
        hi = std::stoi(rest, &used);
        FERRY_CHECK(used == rest.size(), "");
      }
      FERRY_CHECK(lo >= 0 && hi >= lo, "");
      for (int c = lo; c <= hi; ++c) cpus.push_back(c);
    } catch (const std::exception&) {
      throw error(what + ": '" + text + "' is not a CPU list such as 0-3,8,10-11");
    }
  }
  return cpus;
}

int pci_numa_node(const std::string& bus_id, const std::string& sys) {
  std::string id = bus_id;
  std::transform(id.begin(), id.end(), id.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  // CUDA gives the domain with 8 digits ("00000000:3B:00.0"); sysfs names it with 4.
  const size_t colon = id.find(':');
  if (colon != std::string::npos && colon > 4) id = id.substr(colon - 4);
  const std::string line = read_line(sys + "/bus/pci/devices/" + id + "/numa_node");
  try {
    return line.empty() ? -1 : std::stoi(line);
  } catch (const std::exception&) {
    return -1;
  }
}

std::vector<int> numa_node_cpus(int node, const std::string& sys) {
  const std::string path = sys + "/devices/system/node/node" + std::to_string(node) + "/cpulist";
  return parse_cpu_list(read_line(path), path);
}

std::vector<int> numa_nodes_with_cpus(const std::string& sys) {
  const std::string online = sys + "/devices/system/node/online";
  std::vector<int> nodes;
  for (int n : parse_cpu_list(read_line(online), online))
    if (!numa_node_cpus(n, sys).empty()) nodes.push_back(n);
  return nodes;
}

numa_placement plan_numa_placement(const std::vector<std::string>& local_bus_ids, int local_rank,
                                   const std::string& sys) {
  numa_placement p;
  FERRY_CHECK(local_rank >= 0 && local_rank < int(local_bus_ids.size()), "bug: local rank ", local_rank, " of ",
              local_bus_ids.size(), " GPUs");
  if (numa_nodes_with_cpus(sys).size() < 2) return p;
  const int node = pci_numa_node(local_bus_ids[local_rank], sys);
  if (node < 0) return p;
  std::vector<int> cpus = numa_node_cpus(node, sys);
  if (cpus.empty()) return p;   // a GPU on a node without CPUs (memory-only): no pinning
  p.node = node;
  p.cpus = std::move(cpus);
  p.ranks_on_node = int(std::count_if(local_bus_ids.begin(), local_bus_ids.end(),
                                      [&](const std::string& b) { return pci_numa_node(b, sys) == node; }));
  return p;
}

std::vector<int> allowed_cpus_of(const std::vector<int>& cpus) {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof mask, &mask) != 0) return cpus;
  std::vector<int> out;
  for (int c : cpus)
    if (c >= 0 && c < CPU_SETSIZE && CPU_ISSET(c, &mask)) out.push_back(c);
  return out;
}

bool bind_to_cpus(const std::vector<int>& cpus) {
  if (cpus.empty()) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus)
    if (c < CPU_SETSIZE) CPU_SET(c, &set);
  return sched_setaffinity(0, sizeof set, &set) == 0;
}

}  // namespace ferry::dist
