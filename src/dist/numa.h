#pragma once
// NUMA placement of a machine's ranks (issue 15): each rank's threads run on the cores of its
// GPU's NUMA node, and the ranks that share a node split that node's cores (no oversubscription).
// Facts come from sysfs (`sys` is "/sys" outside tests): /sys/bus/pci/devices/<bus id>/numa_node
// and /sys/devices/system/node/node<K>/cpulist. One node, or a node sysfs does not name (-1, as in
// many VMs): no pinning, the plain split of all cores.
#include <algorithm>
#include <string>
#include <vector>

namespace ferry::dist {

// "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}; "" -> {}. Throws ferry::error naming `what` on bad text.
std::vector<int> parse_cpu_list(const std::string& text, const std::string& what);

// The NUMA node sysfs gives a PCI device ("0000:3b:00.0"; upper or lower case), -1 when unknown.
int pci_numa_node(const std::string& bus_id, const std::string& sys = "/sys");
// The nodes that have CPUs (node<K> folders with a non-empty cpulist), ascending.
std::vector<int> numa_nodes_with_cpus(const std::string& sys = "/sys");
std::vector<int> numa_node_cpus(int node, const std::string& sys = "/sys");

struct numa_placement {
  int node = -1;            // -1: no pinning (one node, or the GPU's node unknown)
  std::vector<int> cpus;    // the node's CPUs
  int ranks_on_node = 1;    // this machine's ranks whose GPUs sit on `node`
  int threads() const { return std::max(1, int(cpus.size()) / std::max(1, ranks_on_node)); }
};

// Where local rank `local_rank` runs, given the PCI bus ids of the machine's ranks' GPUs (local
// rank r drives local_bus_ids[r]).
numa_placement plan_numa_placement(const std::vector<std::string>& local_bus_ids, int local_rank,
                                   const std::string& sys = "/sys");

// `cpus` less those this process may not run on (its affinity mask: a container's cpuset, taskset).
std::vector<int> allowed_cpus_of(const std::vector<int>& cpus);

// Binds the calling thread (and so the threads it starts later: the AdamW arena, ATen's pool) to
// `cpus`. Returns false, changing nothing, when the kernel refuses (e.g. a cpuset without them).
bool bind_to_cpus(const std::vector<int>& cpus);

}  // namespace ferry::dist
