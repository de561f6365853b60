#include "service/call_authenticator.h"

#include <sys/stat.h>

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kToken[] = "s3cr3t-Token_value.42";

std::string WriteFile(const std::string& name, const std::string& content) {
  static const std::string dir = testing::MakeScratchDir();
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << content;
  return path;
}

TEST(ReadAuthTokenFileTest, TrailingNewlinesAndSpacesAreNotPartOfTheToken) {
  for (const char* content : {"s3cr3t-Token_value.42", "s3cr3t-Token_value.42\n",
                              "s3cr3t-Token_value.42\r\n", "s3cr3t-Token_value.42 \n\n"}) {
    absl::StatusOr<std::string> token = ReadAuthTokenFile(WriteFile("token", content));
    ASSERT_TRUE(token.ok()) << token.status();
    EXPECT_EQ(*token, kToken);
  }
}

TEST(ReadAuthTokenFileTest, MissingFileIsNotFoundNamingFlagAndPath) {
  absl::StatusOr<std::string> token = ReadAuthTokenFile("/nonexistent/kvcd/token");
  ASSERT_FALSE(token.ok());
  EXPECT_EQ(token.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(token.status().message(), HasSubstr("--auth_token_file /nonexistent/kvcd/token"));
  EXPECT_THAT(token.status().message(), HasSubstr("no such file"));
}

TEST(ReadAuthTokenFileTest, DirectoryEmptyFileAndControlCharactersAreRejected) {
  absl::StatusOr<std::string> directory = ReadAuthTokenFile(testing::MakeScratchDir());
  EXPECT_EQ(directory.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(directory.status().message(), HasSubstr("is a directory"));

  absl::StatusOr<std::string> empty = ReadAuthTokenFile(WriteFile("empty", "\n"));
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("empty"));

  absl::StatusOr<std::string> control = ReadAuthTokenFile(WriteFile("control", "abc\x01xyz"));
  EXPECT_EQ(control.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(control.status().message(), HasSubstr("byte 3"));
  EXPECT_THAT(control.status().message(), Not(HasSubstr("abc")));

  absl::StatusOr<std::string> huge = ReadAuthTokenFile(WriteFile("huge", std::string(5000, 'a')));
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(huge.status().message(), HasSubstr("at most 4096"));
}

TEST(CallAuthenticatorTest, WithoutATokenEveryCallPasses) {
  CallAuthenticator authenticator("", false);
  EXPECT_FALSE(authenticator.token_required());
  EXPECT_TRUE(authenticator.CheckAuthorization({}).ok());
  EXPECT_TRUE(authenticator.CheckAuthorization({"Bearer anything"}).ok());
}

TEST(CallAuthenticatorTest, MissingTokenSaysWhatWasExpected) {
  CallAuthenticator authenticator(kToken, false);
  const absl::Status status = authenticator.CheckAuthorization({});
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(status.message(), HasSubstr("missing bearer token"));
  EXPECT_THAT(status.message(), HasSubstr("authorization: Bearer <token>"));
  EXPECT_THAT(status.message(), Not(HasSubstr(kToken)));
}

TEST(CallAuthenticatorTest, WrongTokenWrongSchemeAndDuplicatesAreRejectedWithoutEchoingThem) {
  CallAuthenticator authenticator(kToken, false);
  struct Case {
    std::vector<absl::string_view> values;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {{"Bearer s3cr3t-Token_value.43"}, "not valid for this server"},
           {{"Bearer s3cr3t-Token_value.4"}, "not valid for this server"},
           {{"Bearer "}, "not valid for this server"},
           {{kToken}, "does not use the Bearer scheme"},
           {{"Basic czNjcjN0"}, "does not use the Bearer scheme"},
           {{"Bearer s3cr3t-Token_value.42", "Bearer s3cr3t-Token_value.42"}, "2 authorization"},
       }) {
    const absl::Status status = authenticator.CheckAuthorization(c.values);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated) << c.values.front();
    EXPECT_THAT(status.message(), HasSubstr(c.message));
    EXPECT_THAT(status.message(), Not(HasSubstr("s3cr3t")));
    EXPECT_THAT(status.message(), Not(HasSubstr("czNjcjN0")));
  }
}

TEST(CallAuthenticatorTest, RightTokenPassesWithTheSchemeInAnyCase) {
  CallAuthenticator authenticator(kToken, false);
  EXPECT_TRUE(authenticator.token_required());
  for (const char* value : {"Bearer s3cr3t-Token_value.42", "bearer s3cr3t-Token_value.42",
                            "BEARER   s3cr3t-Token_value.42"}) {
    EXPECT_TRUE(authenticator.CheckAuthorization({value}).ok()) << value;
  }
}

}  // namespace
}  // namespace kvcompress
