#include "tests/integration/test_certificates.h"

#include <unistd.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tests/integration/kvcd_process.h"

namespace kvcompress::testing {
namespace {

std::string OpensslBinary() {
  for (const char* candidate : {"/usr/bin/openssl", "/usr/local/bin/openssl", "/bin/openssl"}) {
    if (access(candidate, X_OK) == 0) return candidate;
  }
  return "";
}

absl::Status Run(const std::vector<std::string>& argv) {
  absl::StatusOr<CommandResult> result = RunCommand(argv);
  if (!result.ok()) return result.status();
  if (result->exit_code != 0) {
    return absl::InternalError(absl::StrCat(argv[0], " ", argv[1], " exited with ",
                                            result->exit_code, ": ", result->output));
  }
  return absl::OkStatus();
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  return out.good() ? absl::OkStatus() : absl::InternalError("cannot write " + path);
}

// A self-signed CA certificate and its key.
absl::Status MakeCa(const std::string& openssl, const std::string& dir, const std::string& name) {
  return Run({openssl,
              "req",
              "-x509",
              "-newkey",
              "ec",
              "-pkeyopt",
              "ec_paramgen_curve:prime256v1",
              "-nodes",
              "-keyout",
              dir + "/" + name + ".key",
              "-out",
              dir + "/" + name + ".pem",
              "-days",
              "2",
              "-subj",
              "/CN=" + name,
              "-addext",
              "basicConstraints=critical,CA:TRUE",
              "-addext",
              "keyUsage=critical,keyCertSign,cRLSign"});
}

// A leaf certificate `name` signed by CA `ca`, with the extensions in `extensions`.
absl::Status MakeLeaf(const std::string& openssl, const std::string& dir, const std::string& ca,
                      const std::string& name, const std::string& common_name,
                      const std::string& extensions, int serial) {
  const std::string base = dir + "/" + name;
  if (absl::Status status = WriteText(base + ".ext", extensions); !status.ok()) return status;
  if (absl::Status status = Run({openssl, "req", "-newkey", "ec", "-pkeyopt",
                                 "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", base + ".key",
                                 "-out", base + ".csr", "-subj", "/CN=" + common_name});
      !status.ok()) {
    return status;
  }
  return Run({openssl, "x509", "-req", "-in", base + ".csr", "-CA", dir + "/" + ca + ".pem",
              "-CAkey", dir + "/" + ca + ".key", "-set_serial", std::to_string(serial), "-out",
              base + ".pem", "-days", "2", "-extfile", base + ".ext"});
}

}  // namespace

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::StatusOr<TestCertificates> MakeTestCertificates(const std::string& dir) {
  const std::string openssl = OpensslBinary();
  if (openssl.empty()) return absl::NotFoundError("no openssl binary (apt-get install openssl)");
  const std::string client_extensions =
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
      "extendedKeyUsage=clientAuth\n";
  const std::string server_extensions =
      "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
      "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
  if (absl::Status status = MakeCa(openssl, dir, "ca"); !status.ok()) return status;
  if (absl::Status status = MakeCa(openssl, dir, "other_ca"); !status.ok()) return status;
  if (absl::Status status =
          MakeLeaf(openssl, dir, "ca", "server", "localhost", server_extensions, 1);
      !status.ok()) {
    return status;
  }
  if (absl::Status status =
          MakeLeaf(openssl, dir, "ca", "client", "kvc-test-client", client_extensions, 2);
      !status.ok()) {
    return status;
  }
  if (absl::Status status = MakeLeaf(openssl, dir, "other_ca", "other_client",
                                     "kvc-untrusted-client", client_extensions, 3);
      !status.ok()) {
    return status;
  }
  TestCertificates certificates;
  certificates.ca_cert = dir + "/ca.pem";
  certificates.server_cert = dir + "/server.pem";
  certificates.server_key = dir + "/server.key";
  certificates.client_cert = dir + "/client.pem";
  certificates.client_key = dir + "/client.key";
  certificates.other_ca_cert = dir + "/other_ca.pem";
  certificates.other_client_cert = dir + "/other_client.pem";
  certificates.other_client_key = dir + "/other_client.key";
  return certificates;
}

}  // namespace kvcompress::testing
