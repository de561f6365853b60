// BackendRouter: a request goes to the first backend that runs its method and head dim; the
// reason the preferred one declined travels with the route.
#include "service/backend_router.h"

#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/cuda_backend.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

// The CPU reference under the CUDA backend's support policy (CheckCudaMethodSupported, the
// real one), so routing is tested on a GPU-less machine exactly as kvcd decides it with a GPU.
class GpuPolicyBackend final : public Backend {
 public:
  GpuPolicyBackend() : cpu_(MakeCpuBackend(1)) {}
  std::string_view name() const override { return "gpu-policy"; }
  absl::Status Supports(const MethodSpec& spec, int head_dim) const override {
    return CheckCudaMethodSupported(spec, head_dim);
  }
  absl::Status CompressLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                              std::span<const LayerJob> jobs,
                              std::span<LayerResult> results) override {
    return cpu_->CompressLayers(geometry, spec, jobs, results);
  }
  absl::Status ScoreLayers(const CacheGeometry& geometry, const MethodSpec& spec,
                           std::span<const LayerJob> jobs, std::span<LayerScores> scores) override {
    return cpu_->ScoreLayers(geometry, spec, jobs, scores);
  }

 private:
  std::unique_ptr<Backend> cpu_;
};

BackendRouter GpuThenCpu() {
  std::vector<std::unique_ptr<Backend>> backends;
  backends.push_back(std::make_unique<GpuPolicyBackend>());
  backends.push_back(MakeCpuBackend(1));
  return BackendRouter(std::move(backends));
}

TEST(BackendRouterTest, PreferredBackendTakesWhatItRuns) {
  const BackendRouter router = GpuThenCpu();
  MethodSpec spec;
  spec.scorer = ScorerKind::kKnorm;
  absl::StatusOr<BackendRoute> route = router.Choose(spec, 128);
  ASSERT_TRUE(route.ok()) << route.status();
  EXPECT_EQ(route->backend->name(), "gpu-policy");
  EXPECT_TRUE(route->passed_over.ok());
  EXPECT_EQ(&router.preferred(), route->backend);
}

TEST(BackendRouterTest, MergingReducersStayOnTheGpu) {
  const BackendRouter router = GpuThenCpu();
  for (ReducerKind reducer : {ReducerKind::kMergeSimilar, ReducerKind::kMergeNearest}) {
    MethodSpec merge;
    merge.reducer = reducer;
    absl::StatusOr<BackendRoute> route = router.Choose(merge, 128);
    ASSERT_TRUE(route.ok()) << route.status();
    EXPECT_EQ(route->backend->name(), "gpu-policy") << ReducerName(reducer);
    EXPECT_TRUE(route->passed_over.ok());
  }
}

TEST(BackendRouterTest, FallsBackWithTheStageNamed) {
  const BackendRouter router = GpuThenCpu();
  // A head dim the GPU kernels are not built for.
  absl::StatusOr<BackendRoute> odd_dim = router.Choose(MethodSpec{}, 96);
  ASSERT_TRUE(odd_dim.ok());
  EXPECT_EQ(odd_dim->backend->name(), "cpu");
  EXPECT_EQ(odd_dim->passed_over.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(odd_dim->passed_over.message(), HasSubstr("head_dim 96"));
}

TEST(BackendRouterTest, NoBackendRunsItAnswersTheLastRefusal) {
  std::vector<std::unique_ptr<Backend>> only_gpu;
  only_gpu.push_back(std::make_unique<GpuPolicyBackend>());
  const BackendRouter router(std::move(only_gpu));
  absl::StatusOr<BackendRoute> route = router.Choose(MethodSpec{}, 80);
  ASSERT_FALSE(route.ok());
  EXPECT_EQ(route.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(route.status().message(), HasSubstr("head_dim 80"));
}

TEST(BackendRouterTest, ListsBackendsInPreferenceOrder) {
  const BackendRouter router = GpuThenCpu();
  ASSERT_EQ(router.backends().size(), 2u);
  EXPECT_EQ(router.backends()[0]->name(), "gpu-policy");
  EXPECT_EQ(router.backends()[1]->name(), "cpu");
}

}  // namespace
}  // namespace kvcompress
