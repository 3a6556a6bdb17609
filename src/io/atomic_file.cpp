#include "src/io/atomic_file.h"

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "src/common/error.h"

namespace ferry::io {
namespace {
std::string parent_dir(const std::string& path) {
  auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}
}  // namespace

atomic_file::atomic_file(std::string path) : path_(std::move(path)) {
  temp_path_ = path_ + ".tmp." + std::to_string(::getpid());
  fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  FERRY_CHECK(fd_ >= 0, "cannot create ", temp_path_, ": ", std::strerror(errno),
              " (check that the directory exists and is writable)");
}

atomic_file::~atomic_file() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temp_path_.c_str());
}

void atomic_file::write(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::write(fd_, p, bytes);
    if (n < 0 && errno == EINTR) continue;
    FERRY_CHECK(n > 0, "cannot write ", path_, ": ", std::strerror(n < 0 ? errno : ENOSPC),
                " (the previous file, if any, is untouched)");
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

void atomic_file::commit() {
  FERRY_CHECK(::fsync(fd_) == 0, "cannot flush ", path_, ": ", std::strerror(errno),
              " (the previous file, if any, is untouched)");
  int rc = ::close(fd_);
  fd_ = -1;
  FERRY_CHECK(rc == 0, "cannot close ", temp_path_, ": ", std::strerror(errno));
  FERRY_CHECK(::rename(temp_path_.c_str(), path_.c_str()) == 0, "cannot rename ", temp_path_, " to ", path_,
              ": ", std::strerror(errno));
  committed_ = true;
  fsync_directory(parent_dir(path_));
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  atomic_file f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

void check_output_path(const std::string& flag, const std::string& path) {
  struct stat st {};
  FERRY_CONFIG_CHECK(!path.empty() && !(::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)), flag,
                     " needs a file name, got '", path, "'");
  const std::string dir = parent_dir(path);
  FERRY_CONFIG_CHECK(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "cannot write ", flag, " ", path,
                     ": directory ", dir, " does not exist; create it or give another path");
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FERRY_CHECK(in.good(), "cannot read ", path, ": ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void fsync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some filesystems refuse directory fds
  ::fsync(fd);
  ::close(fd);
}

}  // namespace ferry::io

namespace ferry::io {
namespace {
int remove_entry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }
}  // namespace

void remove_tree(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  FERRY_CHECK(::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS) == 0, "cannot remove ", path, ": ",
              std::strerror(errno));
}

}  // namespace ferry::io
