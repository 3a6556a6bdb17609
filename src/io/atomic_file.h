#pragma once
// Crash-safe file writes: data goes to "<path>.tmp.<pid>" beside the target, is fsynced, then
// renamed over the target, and the directory is fsynced. A reader sees the old file or the new
// one, never a torn one. On failure (disk full, permissions) the temporary file is removed, the
// old target is untouched, and ferry::error names the path and the OS reason.
#include <cstddef>
#include <cstdio>
#include <string>

namespace ferry::io {

class atomic_file {
 public:
  explicit atomic_file(std::string path);
  ~atomic_file();  // discards the temporary file unless commit() succeeded
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;

  void write(const void* data, size_t bytes);
  void commit();  // fsync, close, rename, fsync the directory
  const std::string& temp_path() const { return temp_path_; }

 private:
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

void write_file_atomic(const std::string& path, const std::string& contents);
// For a flag naming an output file (--metrics-json FILE): throws config_error naming the flag when
// the path is empty or a directory or its directory does not exist, so that a bad path fails
// before a long run rather than after it.
void check_output_path(const std::string& flag, const std::string& path);
std::string read_file(const std::string& path);  // throws ferry::error naming the path
void fsync_directory(const std::string& dir);
// Removes a file or a directory tree; a missing path is fine. (std::filesystem::remove_all is not
// usable in processes that load libtorch: the wheel exports a broken copy of it.)
void remove_tree(const std::string& path);

}  // namespace ferry::io
