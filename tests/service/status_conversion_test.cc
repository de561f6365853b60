#include "service/status_conversion.h"

#include "gtest/gtest.h"

namespace kvcompress {
namespace {

TEST(StatusConversionTest, OkMapsToOk) {
  const grpc::Status status = ToGrpcStatus(absl::OkStatus());
  EXPECT_TRUE(status.ok());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::OK);
  EXPECT_EQ(status.error_message(), "");
}

TEST(StatusConversionTest, EveryCodeKeepsItsNumberAndMessage) {
  struct Case {
    absl::StatusCode absl_code;
    grpc::StatusCode grpc_code;
  };
  const Case cases[] = {
      {absl::StatusCode::kCancelled, grpc::StatusCode::CANCELLED},
      {absl::StatusCode::kUnknown, grpc::StatusCode::UNKNOWN},
      {absl::StatusCode::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {absl::StatusCode::kDeadlineExceeded, grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::StatusCode::kNotFound, grpc::StatusCode::NOT_FOUND},
      {absl::StatusCode::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {absl::StatusCode::kPermissionDenied, grpc::StatusCode::PERMISSION_DENIED},
      {absl::StatusCode::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::StatusCode::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {absl::StatusCode::kAborted, grpc::StatusCode::ABORTED},
      {absl::StatusCode::kOutOfRange, grpc::StatusCode::OUT_OF_RANGE},
      {absl::StatusCode::kUnimplemented, grpc::StatusCode::UNIMPLEMENTED},
      {absl::StatusCode::kInternal, grpc::StatusCode::INTERNAL},
      {absl::StatusCode::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {absl::StatusCode::kDataLoss, grpc::StatusCode::DATA_LOSS},
      {absl::StatusCode::kUnauthenticated, grpc::StatusCode::UNAUTHENTICATED},
  };
  for (const Case& c : cases) {
    const std::string message = "layer 3 keys: expected 8388608 bytes, got 8388000";
    const grpc::Status status = ToGrpcStatus(absl::Status(c.absl_code, message));
    EXPECT_EQ(status.error_code(), c.grpc_code) << absl::StatusCodeToString(c.absl_code);
    EXPECT_EQ(static_cast<int>(status.error_code()), static_cast<int>(c.absl_code));
    EXPECT_EQ(status.error_message(), message);
  }
}

TEST(StatusConversionTest, MessageBytesArePreserved) {
  const std::string message = std::string("multi\nline \xE2\x80\x94 utf-8 and a NUL:") + '\0';
  const grpc::Status status = ToGrpcStatus(absl::InternalError(message));
  EXPECT_EQ(status.error_message(), message);
}

}  // namespace
}  // namespace kvcompress
