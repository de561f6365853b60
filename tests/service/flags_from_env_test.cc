#include "service/flags_from_env.h"

#include <cstdint>
#include <map>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

ABSL_FLAG(std::string, env_test_address, "0.0.0.0:1", "a string flag");
ABSL_FLAG(uint32_t, env_test_max_layers, 512, "an integer flag");
ABSL_FLAG(bool, env_test_verbose, false, "a boolean flag");
ABSL_FLAG(absl::Duration, env_test_deadline, absl::Seconds(5), "a duration flag");

namespace kvcompress {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kThisFile[] = "service/flags_from_env_test.cc";

class FlagsFromEnvTest : public ::testing::Test {
 protected:
  // Restores every flag this test changes.
  absl::FlagSaver saver_;
  std::map<std::string, std::string> environment_;

  absl::StatusOr<std::vector<std::string>> Apply() {
    return ApplyFlagsFromEnvironment(
        "KVCD_",
        [](const absl::CommandLineFlag& flag) {
          return FlagDefinedIn(flag, kThisFile) && absl::StartsWith(flag.Name(), "env_test_");
        },
        [this](const char* name) -> const char* {
          auto it = environment_.find(name);
          return it == environment_.end() ? nullptr : it->second.c_str();
        });
  }
};

TEST_F(FlagsFromEnvTest, VariableNameIsThePrefixAndTheUpperCaseFlagName) {
  EXPECT_EQ(EnvironmentVariableFor("KVCD_", "tls_client_ca"), "KVCD_TLS_CLIENT_CA");
}

TEST_F(FlagsFromEnvTest, SetsFlagsOfEveryTypeAndReportsWhichVariablesApplied) {
  environment_ = {{"KVCD_ENV_TEST_ADDRESS", "127.0.0.1:7"},
                  {"KVCD_ENV_TEST_MAX_LAYERS", "64"},
                  {"KVCD_ENV_TEST_VERBOSE", "true"},
                  {"KVCD_ENV_TEST_DEADLINE", "250ms"},
                  {"KVCD_SERVICE_HOST", "10.0.0.1"}};  // a Kubernetes service link: ignored
  absl::StatusOr<std::vector<std::string>> applied = Apply();
  ASSERT_TRUE(applied.ok()) << applied.status();
  EXPECT_THAT(*applied, ElementsAre("KVCD_ENV_TEST_ADDRESS", "KVCD_ENV_TEST_DEADLINE",
                                    "KVCD_ENV_TEST_MAX_LAYERS", "KVCD_ENV_TEST_VERBOSE"));
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_address), "127.0.0.1:7");
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_max_layers), 64u);
  EXPECT_TRUE(absl::GetFlag(FLAGS_env_test_verbose));
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_deadline), absl::Milliseconds(250));
}

TEST_F(FlagsFromEnvTest, UnsetVariablesLeaveDefaultsAndEmptyIsAValue) {
  environment_ = {{"KVCD_ENV_TEST_ADDRESS", ""}};
  ASSERT_TRUE(Apply().ok());
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_address), "");
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_max_layers), 512u);
}

TEST_F(FlagsFromEnvTest, ValueThatDoesNotParseNamesTheVariableAndTheFlag) {
  environment_ = {{"KVCD_ENV_TEST_MAX_LAYERS", "lots"}};
  absl::StatusOr<std::vector<std::string>> applied = Apply();
  ASSERT_FALSE(applied.ok());
  EXPECT_EQ(applied.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(applied.status().message(), HasSubstr("KVCD_ENV_TEST_MAX_LAYERS=\"lots\""));
  EXPECT_THAT(applied.status().message(), HasSubstr("--env_test_max_layers"));
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_max_layers), 512u);
}

TEST_F(FlagsFromEnvTest, FlagsOutsideTheSelectionAreNotTouched) {
  environment_ = {{"KVCD_ENV_TEST_ADDRESS", "set"}};
  absl::StatusOr<std::vector<std::string>> applied = ApplyFlagsFromEnvironment(
      "KVCD_",
      [](const absl::CommandLineFlag& flag) { return FlagDefinedIn(flag, "service/main.cc"); },
      [this](const char* name) -> const char* {
        auto it = environment_.find(name);
        return it == environment_.end() ? nullptr : it->second.c_str();
      });
  ASSERT_TRUE(applied.ok());
  EXPECT_TRUE(applied->empty());
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_address), "0.0.0.0:1");
}

TEST_F(FlagsFromEnvTest, CommandLineSetAfterwardsWins) {
  // kvcd applies the environment first, then absl::ParseCommandLine sets flags again.
  environment_ = {{"KVCD_ENV_TEST_MAX_LAYERS", "64"}};
  ASSERT_TRUE(Apply().ok());
  char program[] = "kvcd";
  char flag[] = "--env_test_max_layers=8";
  char* argv[] = {program, flag};
  absl::ParseCommandLine(2, argv);
  EXPECT_EQ(absl::GetFlag(FLAGS_env_test_max_layers), 8u);
}

TEST_F(FlagsFromEnvTest, UsageNamesThePrefixAndThePrecedence) {
  EXPECT_THAT(EnvironmentUsage("KVCD_"), HasSubstr("KVCD_TLS_CERT"));
  EXPECT_THAT(EnvironmentUsage("KVCD_"), HasSubstr("command line wins"));
}

}  // namespace
}  // namespace kvcompress
