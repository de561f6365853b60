#include "tests/integration/reference_results.h"

#include <memory>
#include <utility>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/compression_pipeline.h"
#include "service/spec_conversion.h"

namespace kvcompress::testing {

std::vector<std::vector<LayerResult>> ReferenceResults(
    const v1::CompressHeader& header, const std::vector<std::vector<LayerInput>>& layers,
    int cpu_threads) {
  absl::StatusOr<CacheGeometry> geometry = GeometryFromProto(header.geometry());
  absl::StatusOr<MethodSpec> spec = MethodSpecFromProto(header.method());
  EXPECT_TRUE(geometry.ok() && spec.ok());
  std::vector<SequenceShape> shapes;
  for (const v1::SequenceShape& sequence : header.sequences()) {
    shapes.push_back(SequenceShapeFromProto(sequence));
  }
  std::unique_ptr<Backend> cpu = MakeCpuBackend(cpu_threads);
  auto pipeline = CompressionPipeline::Create(cpu.get(), *geometry, *spec, shapes);
  EXPECT_TRUE(pipeline.ok()) << pipeline.status();
  std::vector<std::vector<LayerResult>> results(layers.size());
  for (size_t s = 0; s < layers.size(); ++s) {
    for (const LayerInput& layer : layers[s]) {
      // LayerInput owns its tensors and is not copyable; the pipeline takes a copy.
      LayerInput copy;
      copy.sequence = layer.sequence;
      copy.layer = layer.layer;
      copy.shape = layer.shape;
      copy.keys = layer.keys;
      copy.values = layer.values;
      copy.queries = layer.queries;
      copy.scores = layer.scores;
      auto done = (*pipeline)->AddLayer(std::move(copy));
      EXPECT_TRUE(done.ok()) << done.status();
      for (LayerResult& result : *done) results[s].push_back(std::move(result));
    }
  }
  return results;
}

}  // namespace kvcompress::testing
