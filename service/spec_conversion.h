// Conversions between the wire API (kvcompress.v1 protos) and the kernels' C++ types.
//
// This is the one place proto enums and oneofs become kernels values, used by kvcd and by
// `kvc compress --local`, so both run exactly the same method for the same request.
// Unset fields take the defaults documented in kernels/method_spec.h. Functions are pure
// and thread-safe. Errors are INVALID_ARGUMENT naming the proto field
// (e.g. "method.scorer: not set; expected one of snapkv, knorm, ...").
#ifndef KVCOMPRESS_SERVICE_SPEC_CONVERSION_H_
#define KVCOMPRESS_SERVICE_SPEC_CONVERSION_H_

#include "absl/status/statusor.h"
#include "kernels/cache_geometry.h"
#include "kernels/method_spec.h"
#include "kvcompress/v1/kvcompress.pb.h"

namespace kvcompress {

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype);
v1::DType DTypeToProto(DType dtype);
absl::StatusOr<Layout> LayoutFromProto(v1::Layout layout);
v1::Layout LayoutToProto(Layout layout);

// Also runs ValidateGeometry.
absl::StatusOr<CacheGeometry> GeometryFromProto(const v1::CacheGeometry& geometry);
SequenceShape SequenceShapeFromProto(const v1::SequenceShape& shape);

// Maps every oneof and option; range checks are ValidateMethodSpec's job, except that
// values proto cannot express as unset (0 for "default") are resolved to defaults here.
absl::StatusOr<MethodSpec> MethodSpecFromProto(const v1::MethodSpec& spec);

}  // namespace kvcompress

#endif  // KVCOMPRESS_SERVICE_SPEC_CONVERSION_H_
