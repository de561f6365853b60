// The CPU reference's results for a whole Compress request, computed in process: the header's
// geometry, sequences and method through CompressionPipeline on the CPU backend, with the
// layers fed in order. Integration and GPU tests compare what kvcd returns with these, byte for
// byte. Failures are reported with gtest's EXPECT (the result is then incomplete).
#ifndef KVCOMPRESS_TESTS_INTEGRATION_REFERENCE_RESULTS_H_
#define KVCOMPRESS_TESTS_INTEGRATION_REFERENCE_RESULTS_H_

#include <vector>

#include "kernels/cache_geometry.h"
#include "kernels/layer_result.h"
#include "kvcompress/v1/kvcompress.pb.h"

namespace kvcompress::testing {

// `layers`: [sequence][layer] inputs in the order the pipeline receives them. Returns
// [sequence][final layer results in the order the pipeline emitted them].
std::vector<std::vector<LayerResult>> ReferenceResults(
    const v1::CompressHeader& header, const std::vector<std::vector<LayerInput>>& layers,
    int cpu_threads);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_REFERENCE_RESULTS_H_
