#pragma once
// Worker ranks as processes for the tests of tests/dist: torchrun's variables on the loopback, one
// log per rank, and a bounded wait. FERRY_DIST_WORKER is the worker's path (the test's CMake).
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

extern char** environ;

namespace ferry::dist::test {

// A port no one listens on right now (the kernel's pick for port 0).
inline int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

inline std::string scratch(const std::string& name) {
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp && *tmp ? tmp : "/tmp") + "/ferry-dist-" + std::to_string(::getpid()) + "-" + name;
}

struct rank_proc {
  pid_t pid = -1;
  std::string log;
};

// Starts `world` worker ranks with torchrun's variables; args after the worker path.
inline std::vector<rank_proc> spawn_ranks(int world, const std::vector<std::string>& args, const std::string& tag,
                                   double timeout_s) {
  const int port = free_port();
  std::vector<rank_proc> procs;
  for (int r = 0; r < world; ++r) {
    std::vector<std::string> env_s;
    for (char** e = environ; *e; ++e) env_s.push_back(*e);
    for (const auto& kv : std::vector<std::pair<std::string, std::string>>{
             {"RANK", std::to_string(r)}, {"WORLD_SIZE", std::to_string(world)}, {"LOCAL_RANK", std::to_string(r)},
             {"LOCAL_WORLD_SIZE", std::to_string(world)}, {"MASTER_ADDR", "127.0.0.1"},
             {"MASTER_PORT", std::to_string(port)}, {"FERRY_TEST_DIST_TIMEOUT_S", std::to_string(timeout_s)}})
      env_s.push_back(kv.first + "=" + kv.second);
    std::vector<std::string> argv_s{FERRY_DIST_WORKER};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv, envp;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    for (auto& s : env_s) envp.push_back(s.data());
    envp.push_back(nullptr);
    rank_proc p;
    p.log = scratch(tag + ".log" + std::to_string(r));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, p.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    EXPECT_EQ(posix_spawn(&p.pid, argv[0], &fa, nullptr, argv.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&fa);
    procs.push_back(p);
  }
  return procs;
}

inline std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Waits for every rank (killing what is still running after limit_s); returns the exit codes.
inline std::vector<int> wait_ranks(std::vector<rank_proc>& procs, double limit_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(limit_s);
  std::vector<int> codes(procs.size(), -1);
  size_t left = procs.size();
  while (left > 0) {
    for (size_t i = 0; i < procs.size(); ++i) {
      if (codes[i] != -1 || procs[i].pid < 0) continue;
      int st = 0;
      if (::waitpid(procs[i].pid, &st, WNOHANG) == procs[i].pid) {
        codes[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        --left;
      }
    }
    if (left > 0 && std::chrono::steady_clock::now() > deadline) {
      for (size_t i = 0; i < procs.size(); ++i)
        if (codes[i] == -1) {
          ADD_FAILURE() << "rank " << i << " still running after " << limit_s << " s: killed";
          ::kill(procs[i].pid, SIGKILL);
        }
      limit_s = 1e9;
    }
    ::usleep(20000);
  }
  return codes;
}

}  // namespace ferry::dist::test
