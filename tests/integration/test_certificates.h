// Test PKI made at test time with the `openssl` command-line tool: a CA, a server
// certificate for 127.0.0.1 / localhost, a client certificate, and a second CA that signed
// neither (for "the peer is not trusted" cases). Keys are unencrypted P-256, certificates
// valid for two days. Nothing is checked in, so nothing expires in the repository.
#ifndef KVCOMPRESS_TESTS_INTEGRATION_TEST_CERTIFICATES_H_
#define KVCOMPRESS_TESTS_INTEGRATION_TEST_CERTIFICATES_H_

#include <string>

#include "absl/status/statusor.h"

namespace kvcompress::testing {

// Paths of PEM files.
struct TestCertificates {
  std::string ca_cert;
  std::string server_cert;  // SAN IP:127.0.0.1, DNS:localhost; CN localhost; serverAuth
  std::string server_key;
  std::string client_cert;  // CN kvc-test-client; clientAuth
  std::string client_key;
  std::string other_ca_cert;      // an unrelated CA
  std::string other_client_cert;  // signed by the unrelated CA
  std::string other_client_key;
};

// Writes the files into `dir` (which must exist). INTERNAL with openssl's output when a
// command fails; NOT_FOUND when there is no openssl binary.
absl::StatusOr<TestCertificates> MakeTestCertificates(const std::string& dir);

// The whole content of a file ("" when unreadable).
std::string ReadWholeFile(const std::string& path);

}  // namespace kvcompress::testing

#endif  // KVCOMPRESS_TESTS_INTEGRATION_TEST_CERTIFICATES_H_
