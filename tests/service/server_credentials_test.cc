#include "service/server_credentials.h"

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/kvcd_process.h"
#include "tests/integration/test_certificates.h"

namespace kvcompress {
namespace {

using ::testing::HasSubstr;

class ServerCredentialsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::MakeScratchDir());
    absl::StatusOr<testing::TestCertificates> made = testing::MakeTestCertificates(*dir_);
    ASSERT_TRUE(made.ok()) << made.status();
    certificates_ = new testing::TestCertificates(*made);
  }
  static void TearDownTestSuite() {
    delete certificates_;
    delete dir_;
  }

  static std::string Write(const std::string& name, const std::string& content) {
    const std::string path = *dir_ + "/" + name;
    std::ofstream(path, std::ios::trunc) << content;
    return path;
  }

  static std::string* dir_;
  static testing::TestCertificates* certificates_;
};

std::string* ServerCredentialsTest::dir_ = nullptr;
testing::TestCertificates* ServerCredentialsTest::certificates_ = nullptr;

TEST_F(ServerCredentialsTest, NoFilesMeansPlaintext) {
  absl::StatusOr<ServerSecurity> security = MakeServerSecurity({});
  ASSERT_TRUE(security.ok()) << security.status();
  EXPECT_NE(security->credentials, nullptr);
  EXPECT_FALSE(security->tls);
  EXPECT_FALSE(security->client_certificates_verified);
}

TEST_F(ServerCredentialsTest, CertificateAndKeyMeanTlsAndAClientCaMeansMtls) {
  const testing::TestCertificates& c = *certificates_;
  absl::StatusOr<ServerSecurity> tls = MakeServerSecurity({c.server_cert, c.server_key, ""});
  ASSERT_TRUE(tls.ok()) << tls.status();
  EXPECT_TRUE(tls->tls);
  EXPECT_FALSE(tls->client_certificates_verified);
  absl::StatusOr<ServerSecurity> mtls =
      MakeServerSecurity({c.server_cert, c.server_key, c.ca_cert});
  ASSERT_TRUE(mtls.ok()) << mtls.status();
  EXPECT_TRUE(mtls->tls);
  EXPECT_TRUE(mtls->client_certificates_verified);
}

TEST_F(ServerCredentialsTest, CertificateAndKeyGoTogether) {
  const testing::TestCertificates& c = *certificates_;
  absl::StatusOr<ServerSecurity> only_cert = MakeServerSecurity({c.server_cert, "", ""});
  EXPECT_EQ(only_cert.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      only_cert.status().message(),
      HasSubstr("--tls_cert and --tls_key go together: --tls_cert is set, --tls_key is not"));
  absl::StatusOr<ServerSecurity> only_key = MakeServerSecurity({"", c.server_key, ""});
  EXPECT_THAT(only_key.status().message(), HasSubstr("--tls_key is set, --tls_cert is not"));
  absl::StatusOr<ServerSecurity> only_ca = MakeServerSecurity({"", "", c.ca_cert});
  EXPECT_EQ(only_ca.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(only_ca.status().message(), HasSubstr("--tls_client_ca is set but --tls_cert"));
}

TEST_F(ServerCredentialsTest, MissingFilesAreNotFoundNamingTheFlagAndPath) {
  const testing::TestCertificates& c = *certificates_;
  absl::StatusOr<ServerSecurity> cert = MakeServerSecurity({"/missing/cert.pem", c.server_key, ""});
  EXPECT_EQ(cert.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(cert.status().message(), HasSubstr("--tls_cert /missing/cert.pem: no such file"));
  absl::StatusOr<ServerSecurity> key = MakeServerSecurity({c.server_cert, "/missing/key.pem", ""});
  EXPECT_THAT(key.status().message(), HasSubstr("--tls_key /missing/key.pem: no such file"));
  absl::StatusOr<ServerSecurity> ca =
      MakeServerSecurity({c.server_cert, c.server_key, "/missing/ca.pem"});
  EXPECT_THAT(ca.status().message(), HasSubstr("--tls_client_ca /missing/ca.pem: no such file"));
  absl::StatusOr<ServerSecurity> directory = MakeServerSecurity({*dir_, c.server_key, ""});
  EXPECT_EQ(directory.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(directory.status().message(), HasSubstr("is a directory"));
}

TEST_F(ServerCredentialsTest, ContentThatIsNotWhatTheFlagNeedsIsNamed) {
  const testing::TestCertificates& c = *certificates_;
  const std::string garbage = Write("garbage.pem", "not a certificate\n");
  absl::StatusOr<ServerSecurity> cert = MakeServerSecurity({garbage, c.server_key, ""});
  EXPECT_EQ(cert.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(cert.status().message(), HasSubstr("no PEM certificate found"));

  // A certificate where the key belongs.
  absl::StatusOr<ServerSecurity> key = MakeServerSecurity({c.server_cert, c.server_cert, ""});
  EXPECT_THAT(key.status().message(), HasSubstr("no usable PEM private key"));

  // Somebody else's key.
  absl::StatusOr<ServerSecurity> mismatch = MakeServerSecurity({c.server_cert, c.client_key, ""});
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(mismatch.status().message(), HasSubstr("does not belong"));

  absl::StatusOr<ServerSecurity> ca = MakeServerSecurity({c.server_cert, c.server_key, garbage});
  EXPECT_THAT(ca.status().message(), HasSubstr("--tls_client_ca " + garbage));
}

}  // namespace
}  // namespace kvcompress
