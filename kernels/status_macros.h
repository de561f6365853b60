// Error-propagation macros for absl::Status / absl::StatusOr.
//
// Our Abseil predates ABSL_RETURN_IF_ERROR, so these are defined once here and used
// everywhere (kernels, service, client).
#ifndef KVCOMPRESS_KERNELS_STATUS_MACROS_H_
#define KVCOMPRESS_KERNELS_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVC_STATUS_CONCAT_INNER(a, b) a##b
#define KVC_STATUS_CONCAT(a, b) KVC_STATUS_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define KVC_RETURN_IF_ERROR(expr)                   \
  do {                                              \
    ::absl::Status kvc_status_tmp = (expr);         \
    if (!kvc_status_tmp.ok()) return kvc_status_tmp; \
  } while (false)

// `lhs = value of expr` when expr (an absl::StatusOr) is OK, else returns its status.
#define KVC_ASSIGN_OR_RETURN(lhs, expr) \
  KVC_ASSIGN_OR_RETURN_IMPL(KVC_STATUS_CONCAT(kvc_statusor_, __LINE__), lhs, expr)

#define KVC_ASSIGN_OR_RETURN_IMPL(statusor, lhs, expr) \
  auto statusor = (expr);                              \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // KVCOMPRESS_KERNELS_STATUS_MACROS_H_
