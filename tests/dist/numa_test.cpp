// dist/numa.h on fake sysfs trees: CPU lists, a GPU's node from its PCI bus id, and the placement
// of a machine's ranks (bound to their GPU's node, splitting it with the ranks that share it; no
// binding on one node or where sysfs gives -1).
#include "src/dist/numa.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/io/atomic_file.h"

namespace ferry::dist {
namespace {

namespace fs = std::filesystem;

// A sysfs root with `node_cpus[k]` as node k's cpulist and the PCI devices `gpus` (bus id, node).
class fake_sys {
 public:
  fake_sys(const std::vector<std::string>& node_cpus, const std::vector<std::pair<std::string, int>>& gpus) {
    root_ = (fs::temp_directory_path() / ("ferry_numa_" + std::to_string(getpid()) + "_" + std::to_string(count_++)))
                .string();
    std::string online;
    for (size_t k = 0; k < node_cpus.size(); ++k) {
      write("devices/system/node/node" + std::to_string(k) + "/cpulist", node_cpus[k]);
      online += (k ? "," : "") + std::to_string(k);
    }
    write("devices/system/node/online", online);
    for (const auto& [id, node] : gpus) write("bus/pci/devices/" + id + "/numa_node", std::to_string(node));
  }
  ~fake_sys() { io::remove_tree(root_); }   // not fs::remove_all: see atomic_file.h
  const std::string& root() const { return root_; }

 private:
  void write(const std::string& rel, const std::string& text) {
    const fs::path p = fs::path(root_) / rel;
    fs::create_directories(p.parent_path());
    std::ofstream(p) << text << "\n";
  }
  std::string root_;
  static inline int count_ = 0;
};

std::vector<int> range(int lo, int hi) {
  std::vector<int> v;
  for (int c = lo; c <= hi; ++c) v.push_back(c);
  return v;
}

TEST(numa, parse_cpu_list) {
  EXPECT_EQ(parse_cpu_list("0-3,8,10-11", "x"), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_EQ(parse_cpu_list("5", "x"), (std::vector<int>{5}));
  EXPECT_TRUE(parse_cpu_list("", "x").empty());
  for (const char* bad : {"a-3", "3-1", "1-", "2x", "-1"}) EXPECT_THROW(parse_cpu_list(bad, "x"), error) << bad;
}

TEST(numa, gpu_node_from_cuda_bus_id) {
  fake_sys sys({"0-3", "4-7"}, {{"0000:3b:00.0", 0}, {"0000:d8:00.0", 1}});
  // CUDA's form: 8-digit domain, upper case.
  EXPECT_EQ(pci_numa_node("00000000:D8:00.0", sys.root()), 1);
  EXPECT_EQ(pci_numa_node("0000:3b:00.0", sys.root()), 0);
  EXPECT_EQ(pci_numa_node("0000:99:00.0", sys.root()), -1);
  EXPECT_EQ(pci_numa_node("", sys.root()), -1);
}

TEST(numa, ranks_bound_to_their_gpus_node_and_split_it) {
  // Two nodes of 8 cores; GPUs 0, 1 on node 0, GPUs 2, 3 on node 1.
  fake_sys sys({"0-7", "8-15"}, {{"0000:01:00.0", 0}, {"0000:02:00.0", 0}, {"0000:81:00.0", 1}, {"0000:82:00.0", 1}});
  const std::vector<std::string> ids = {"0000:01:00.0", "0000:02:00.0", "0000:81:00.0", "0000:82:00.0"};
  for (int r = 0; r < 4; ++r) {
    const numa_placement p = plan_numa_placement(ids, r, sys.root());
    EXPECT_EQ(p.node, r / 2);
    EXPECT_EQ(p.cpus, range(8 * (r / 2), 8 * (r / 2) + 7));
    EXPECT_EQ(p.ranks_on_node, 2);
    EXPECT_EQ(p.threads(), 4);
  }
  // Three GPUs on node 0, one on node 1: node 0's ranks take 8 / 3 cores each, node 1's rank all 8.
  fake_sys skewed({"0-7", "8-15"}, {{"0000:01:00.0", 0}, {"0000:02:00.0", 0}, {"0000:03:00.0", 0}, {"0000:81:00.0", 1}});
  const std::vector<std::string> ids2 = {"0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:81:00.0"};
  EXPECT_EQ(plan_numa_placement(ids2, 1, skewed.root()).threads(), 2);
  EXPECT_EQ(plan_numa_placement(ids2, 3, skewed.root()).threads(), 8);
}

TEST(numa, no_binding_on_one_node_or_unknown_node) {
  fake_sys one({"0-15"}, {{"0000:01:00.0", 0}, {"0000:02:00.0", 0}});
  EXPECT_EQ(plan_numa_placement({"0000:01:00.0", "0000:02:00.0"}, 1, one.root()).node, -1);
  fake_sys vm({"0-7", "8-15"}, {{"0000:01:00.0", -1}, {"0000:02:00.0", -1}});
  const numa_placement p = plan_numa_placement({"0000:01:00.0", "0000:02:00.0"}, 0, vm.root());
  EXPECT_EQ(p.node, -1);
  EXPECT_TRUE(p.cpus.empty());
  // No bus id (the host backend, or a driver without one): no binding either.
  EXPECT_EQ(plan_numa_placement({"", ""}, 0, vm.root()).node, -1);
  // A node that has only memory (no CPUs) does not count as a second node.
  fake_sys memonly({"0-7", ""}, {{"0000:01:00.0", 0}});
  EXPECT_EQ(plan_numa_placement({"0000:01:00.0"}, 0, memonly.root()).node, -1);
}

TEST(numa, bind_to_cpus_keeps_the_thread_on_them) {
  cpu_set_t before;
  ASSERT_EQ(sched_getaffinity(0, sizeof before, &before), 0);
  int first = -1;
  for (int c = 0; c < CPU_SETSIZE && first < 0; ++c)
    if (CPU_ISSET(c, &before)) first = c;
  ASSERT_GE(first, 0);
  ASSERT_TRUE(bind_to_cpus({first}));
  cpu_set_t now;
  ASSERT_EQ(sched_getaffinity(0, sizeof now, &now), 0);
  EXPECT_EQ(CPU_COUNT(&now), 1);
  EXPECT_TRUE(CPU_ISSET(first, &now));
  EXPECT_FALSE(bind_to_cpus({}));
  // Only CPUs in the affinity mask are kept: now just `first`.
  std::vector<int> all;
  for (int c = 0; c < CPU_SETSIZE; ++c) all.push_back(c);
  EXPECT_EQ(allowed_cpus_of(all), (std::vector<int>{first}));
  ASSERT_EQ(sched_setaffinity(0, sizeof before, &before), 0);
}

}  // namespace
}  // namespace ferry::dist
