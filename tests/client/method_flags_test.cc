#include "client/method_flags.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<ParsedFlags> Parse(std::vector<std::string> args) {
  return ParseFlags(args, MethodFlagSpecs(), "compress");
}

absl::StatusOr<v1::MethodSpec> Spec(std::vector<std::string> args) {
  absl::StatusOr<ParsedFlags> flags = Parse(std::move(args));
  if (!flags.ok()) return flags.status();
  return MethodSpecFromFlags(*flags);
}

std::string ErrorOf(std::vector<std::string> args) {
  absl::StatusOr<v1::MethodSpec> spec = Spec(std::move(args));
  EXPECT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(spec.status().message());
}

TEST(ParseFlagsTest, BothSpellingsAndBooleans) {
  const std::vector<FlagSpec> known = {
      {"input", true, ""}, {"padded", false, ""}, {"local", false, ""}};
  auto flags =
      ParseFlags(std::vector<std::string>{"--input", "a.safetensors", "--padded", "--local=false"},
                 known, "compress");
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(*flags->Get("input"), "a.safetensors");
  EXPECT_TRUE(flags->GetBool("padded"));
  EXPECT_FALSE(flags->GetBool("local"));
  EXPECT_TRUE(flags->Has("local"));
  flags = ParseFlags(std::vector<std::string>{"--input=b=c"}, known, "compress");
  ASSERT_TRUE(flags.ok());
  EXPECT_EQ(*flags->Get("input"), "b=c");
}

TEST(ParseFlagsTest, Errors) {
  const std::vector<FlagSpec> known = {{"input", true, ""}, {"padded", false, ""}};
  auto error = [&](std::vector<std::string> args) {
    auto flags = ParseFlags(args, known, "compress");
    EXPECT_FALSE(flags.ok());
    return std::string(flags.status().message());
  };
  EXPECT_THAT(error({"--nope"}), HasSubstr("unknown flag --nope"));
  EXPECT_THAT(error({"--input"}), HasSubstr("--input needs a value"));
  EXPECT_THAT(error({"--input", "--padded"}), HasSubstr("--input needs a value"));
  EXPECT_THAT(error({"--input="}), HasSubstr("empty value"));
  EXPECT_THAT(error({"--input=a", "--input=b"}), HasSubstr("given twice"));
  EXPECT_THAT(error({"stray"}), HasSubstr("unexpected argument \"stray\""));
  EXPECT_THAT(error({"--padded=maybe"}), HasSubstr("true or false"));
}

TEST(MethodFlagsTest, SnapKvWithEveryOption) {
  auto spec = Spec({"--method", "snapkv", "--keep", "0.1", "--window", "32", "--kernel-size=7",
                    "--pooling", "max", "--group-reduction", "sum", "--skip-layers", "0,1",
                    "--protect-sinks", "4", "--protect-recent", "8"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_TRUE(spec->scorer().has_snapkv());
  EXPECT_EQ(spec->scorer().snapkv().window_size(), 32u);
  EXPECT_EQ(spec->scorer().snapkv().kernel_size(), 7u);
  EXPECT_EQ(spec->scorer().snapkv().pooling(), v1::POOLING_MAX);
  EXPECT_EQ(spec->scorer().snapkv().group_reduction(), v1::GROUP_REDUCTION_SUM);
  EXPECT_DOUBLE_EQ(spec->keep_ratio(), 0.1);
  EXPECT_EQ(spec->budget_case(), v1::MethodSpec::kKeepRatio);
  EXPECT_THAT(spec->skip_layers(), ::testing::ElementsAre(0u, 1u));
  EXPECT_EQ(spec->protect_sinks(), 4u);
  EXPECT_EQ(spec->protect_recent(), 8u);
  EXPECT_TRUE(spec->layer_budget().has_uniform());
  EXPECT_TRUE(spec->head_budget().has_uniform());
  EXPECT_TRUE(spec->reducer().has_drop());
  EXPECT_EQ(MethodName(*spec), "snapkv");
}

TEST(MethodFlagsTest, DefaultsStayUnset) {
  auto spec = Spec({"--method=snapkv", "--keep-tokens=256"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->keep_tokens(), 256u);
  EXPECT_EQ(spec->scorer().snapkv().window_size(), 0u);  // server default 64
  EXPECT_EQ(spec->scorer().snapkv().kernel_size(), 0u);
  EXPECT_EQ(spec->scorer().snapkv().pooling(), v1::POOLING_UNSPECIFIED);
  EXPECT_EQ(MethodSpecToJson(*spec),
            R"({"scorer":{"snapkv":{}},"layer_budget":{"uniform":{}},)"
            R"("head_budget":{"uniform":{}},"reducer":{"drop":{}},"keep_tokens":256})");
}

TEST(MethodFlagsTest, OtherScorers) {
  auto spec = Spec({"--method", "streaming", "--keep", "0.25", "--sinks", "8"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->scorer().streaming().sinks(), 8u);
  spec = Spec({"--method", "knorm", "--keep", "0.5", "--skip-layers", "0, 1"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->scorer().has_knorm());
  EXPECT_EQ(spec->skip_layers_size(), 2);
  spec = Spec({"--method", "h2o", "--keep", "0.5", "--group-reduction", "max"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->scorer().observed().group_reduction(), v1::GROUP_REDUCTION_MAX);
  for (const char* name : {"tova", "keydiff", "TOVA", "KeyDiff"}) {
    EXPECT_TRUE(Spec({"--method", name, "--keep", "1"}).ok()) << name;
  }
}

TEST(MethodFlagsTest, PresetsAndStageOverrides) {
  auto spec = Spec({"--method", "pyramidkv", "--keep", "0.1", "--beta", "10"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->scorer().has_snapkv());
  EXPECT_DOUBLE_EQ(spec->layer_budget().pyramid().beta(), 10.0);
  EXPECT_EQ(MethodName(*spec), "snapkv+pyramid");

  spec = Spec({"--method", "adakv", "--keep", "0.1", "--alpha", "0.3", "--layer-budget", "dynamic",
               "--r-max", "5", "--update-interval", "2"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_DOUBLE_EQ(spec->head_budget().adaptive().alpha(), 0.3);
  EXPECT_DOUBLE_EQ(spec->layer_budget().dynamic().r_max(), 5.0);
  EXPECT_EQ(spec->layer_budget().dynamic().update_interval(), 2u);
  EXPECT_EQ(MethodName(*spec), "snapkv+dynamic+adaptive");

  spec = Spec({"--method", "kvmerger", "--keep", "0.2", "--sigma", "auto", "--similarity-threshold",
               "0.8", "--protect-fraction", "0.4", "--scale-values"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  const auto& merge = spec->reducer().merge_similar();
  EXPECT_TRUE(merge.auto_sigma());
  EXPECT_DOUBLE_EQ(merge.similarity_threshold(), 0.8);
  EXPECT_DOUBLE_EQ(merge.protect_fraction(), 0.4);
  EXPECT_TRUE(merge.scale_values_by_set_size());

  spec = Spec({"--method", "kvmerger", "--keep", "0.2", "--reducer", "drop"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->reducer().has_drop());

  spec = Spec({"--method", "snapkv", "--keep", "0.2", "--reducer", "merge-nearest", "--head-budget",
               "adaptive"});
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->reducer().has_merge_nearest());
  EXPECT_TRUE(spec->head_budget().has_adaptive());
  EXPECT_EQ(MethodName(*spec), "snapkv+adaptive+merge_nearest");
}

TEST(MethodFlagsTest, PreciseErrors) {
  EXPECT_THAT(ErrorOf({"--keep", "0.1"}), HasSubstr("--method is required"));
  EXPECT_THAT(ErrorOf({"--method", "snapkvv", "--keep", "0.1"}),
              HasSubstr("--method=snapkvv: expected one of snapkv"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv"}), HasSubstr("exactly one of --keep"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--keep-tokens", "5"}),
              HasSubstr("exactly one of --keep"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0"}), HasSubstr("--keep=0"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "1.5"}), HasSubstr("(0, 1]"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "abc"}), HasSubstr("--keep=abc"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep-tokens", "0"}), HasSubstr("--keep-tokens=0"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep-tokens", "-3"}),
              HasSubstr("--keep-tokens=-3"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--kernel-size", "4"}),
              HasSubstr("odd"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--window", "0"}),
              HasSubstr("--window=0"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--pooling", "median"}),
              HasSubstr("avg or max"));
  EXPECT_THAT(ErrorOf({"--method", "knorm", "--keep", "0.1", "--pooling", "max"}),
              HasSubstr("--pooling applies to snapkv"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--sinks", "4"}),
              HasSubstr("--sinks applies to --method streaming"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--beta", "3"}),
              HasSubstr("--beta applies to --layer-budget pyramid"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--alpha", "0.3"}),
              HasSubstr("--alpha applies to --head-budget adaptive"));
  EXPECT_THAT(ErrorOf({"--method", "adakv", "--keep", "0.1", "--alpha", "0"}),
              HasSubstr("0 cannot be expressed"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--sigma", "2"}),
              HasSubstr("--sigma applies to --reducer merge_similar"));
  EXPECT_THAT(ErrorOf({"--method", "kvmerger", "--keep", "0.1", "--sigma", "-2"}),
              HasSubstr("positive number or auto"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--layer-budget", "steep"}),
              HasSubstr("uniform, pyramid or dynamic"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--reducer", "fold"}),
              HasSubstr("drop, merge_similar or merge_nearest"));
  EXPECT_THAT(ErrorOf({"--method", "snapkv", "--keep", "0.1", "--skip-layers", "0,x"}),
              HasSubstr("--skip-layers=0,x"));
}

}  // namespace
}  // namespace kvcompress
