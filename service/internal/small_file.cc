#include "service/internal/small_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcompress {

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, absl::string_view what,
                                          size_t max_bytes) {
  auto failure = [&](absl::StatusCode code, absl::string_view reason) {
    return absl::Status(code, absl::StrCat(what, " ", path, ": ", reason));
  };
  if (path.empty()) return failure(absl::StatusCode::kInvalidArgument, "empty path");
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    if (error == ENOENT || error == ENOTDIR) {
      return failure(absl::StatusCode::kNotFound, "no such file");
    }
    if (error == EACCES || error == EPERM) {
      return failure(absl::StatusCode::kPermissionDenied,
                     "permission denied (the file must be readable by kvcd's user)");
    }
    return failure(absl::StatusCode::kInvalidArgument,
                   absl::StrCat("cannot open: ", std::strerror(error)));
  }
  struct FdCloser {
    int fd;
    ~FdCloser() { close(fd); }
  } closer{fd};
  struct stat info;
  if (fstat(fd, &info) != 0) {
    return failure(absl::StatusCode::kInvalidArgument,
                   absl::StrCat("cannot stat: ", std::strerror(errno)));
  }
  if (!S_ISREG(info.st_mode)) {
    return failure(absl::StatusCode::kInvalidArgument, S_ISDIR(info.st_mode)
                                                           ? "is a directory, expected a file"
                                                           : "not a regular file");
  }
  if (static_cast<uint64_t>(info.st_size) > max_bytes) {
    return failure(absl::StatusCode::kInvalidArgument,
                   absl::StrCat(info.st_size, " bytes; expected at most ", max_bytes));
  }
  std::string content;
  char buffer[4096];
  while (true) {
    const ssize_t got = read(fd, buffer, sizeof(buffer));
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      return failure(absl::StatusCode::kInvalidArgument,
                     absl::StrCat("read failed: ", std::strerror(errno)));
    }
    content.append(buffer, static_cast<size_t>(got));
    // The size can change under us (a Secret being rotated); never hold more than allowed.
    if (content.size() > max_bytes) {
      return failure(absl::StatusCode::kInvalidArgument,
                     absl::StrCat("more than ", max_bytes, " bytes"));
    }
  }
  return content;
}

}  // namespace kvcompress
