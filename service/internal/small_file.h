// Reads small configuration files (PEM certificates and keys, token files) whole, with
// errors that name what the file is for, its path and why it could not be read.
// Thread-safe.
#ifndef KVCOMPRESS_SERVICE_INTERNAL_SMALL_FILE_H_
#define KVCOMPRESS_SERVICE_INTERNAL_SMALL_FILE_H_

#include <cstddef>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvcompress {

// The content of `path`. `what` names the file in messages ("--tls_cert").
// NOT_FOUND (no such file), PERMISSION_DENIED (unreadable), INVALID_ARGUMENT (a directory or
// other non-regular file, or larger than `max_bytes`), each as "<what> <path>: <reason>".
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, absl::string_view what,
                                          size_t max_bytes);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_INTERNAL_SMALL_FILE_H_
