#include "service/server_credentials.h"

#include <grpcpp/security/server_credentials.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "service/internal/small_file.h"

namespace kvcompress {
namespace {

// Certificate bundles of public CAs are a few hundred KiB; nothing legitimate is near this.
constexpr size_t kMaxPemBytes = 4 << 20;

struct BioDeleter {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
struct X509Deleter {
  void operator()(X509* cert) const { X509_free(cert); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }
};
using BioPtr = std::unique_ptr<BIO, BioDeleter>;
using X509Ptr = std::unique_ptr<X509, X509Deleter>;
using KeyPtr = std::unique_ptr<EVP_PKEY, KeyDeleter>;

BioPtr MemoryBio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase;
// a server must fail instead.
int RefusePassphrase(char*, int, int, void*) { return -1; }

// The certificates in `pem`, in order.
std::vector<X509Ptr> ReadCertificates(const std::string& pem) {
  std::vector<X509Ptr> certificates;
  BioPtr bio = MemoryBio(pem);
  while (bio != nullptr) {
    X509Ptr certificate(PEM_read_bio_X509(bio.get(), nullptr, RefusePassphrase, nullptr));
    if (certificate == nullptr) break;
    certificates.push_back(std::move(certificate));
  }
  ERR_clear_error();  // the loop ends on an "end of data" error
  return certificates;
}

absl::StatusOr<std::string> ReadPem(const std::string& path, absl::string_view flag) {
  return ReadSmallFile(path, flag, kMaxPemBytes);
}

absl::Status CheckCertificates(const std::string& pem, const std::string& path,
                               absl::string_view flag) {
  if (ReadCertificates(pem).empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " ", path, ": no PEM certificate found; expected \"-----BEGIN CERTIFICATE-----\""));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServerSecurity> MakeServerSecurity(const ServerTlsFiles& files) {
  ServerSecurity security;
  if (files.cert.empty() && files.key.empty()) {
    if (!files.client_ca.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca is set but --tls_cert and --tls_key are not; mTLS runs over TLS, "
          "so the server needs its own certificate and key too");
    }
    security.credentials = grpc::InsecureServerCredentials();
    return security;
  }
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_cert and --tls_key go together: ", files.cert.empty() ? "--tls_key" : "--tls_cert",
        " is set, ", files.cert.empty() ? "--tls_cert" : "--tls_key", " is not"));
  }

  absl::StatusOr<std::string> cert = ReadPem(files.cert, "--tls_cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem(files.key, "--tls_key");
  if (!key.ok()) return key.status();

  std::vector<X509Ptr> chain = ReadCertificates(*cert);
  if (chain.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_cert ", files.cert,
                     ": no PEM certificate found; expected \"-----BEGIN CERTIFICATE-----\""));
  }
  BioPtr key_bio = MemoryBio(*key);
  KeyPtr private_key(key_bio == nullptr ? nullptr
                                        : PEM_read_bio_PrivateKey(key_bio.get(), nullptr,
                                                                  RefusePassphrase, nullptr));
  ERR_clear_error();
  if (private_key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_key ", files.key,
        ": no usable PEM private key found; expected an unencrypted \"-----BEGIN PRIVATE "
        "KEY-----\" (or RSA/EC PRIVATE KEY) block"));
  }
  // The leaf certificate comes first in a chain file.
  const int matches = X509_check_private_key(chain.front().get(), private_key.get());
  ERR_clear_error();
  if (matches != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_key ", files.key,
                     ": the private key does not belong to the first "
                     "certificate of --tls_cert ",
                     files.cert, " (the server's own certificate must come first)"));
  }

  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({*key, *cert});
  if (!files.client_ca.empty()) {
    absl::StatusOr<std::string> client_ca = ReadPem(files.client_ca, "--tls_client_ca");
    if (!client_ca.ok()) return client_ca.status();
    if (absl::Status status = CheckCertificates(*client_ca, files.client_ca, "--tls_client_ca");
        !status.ok()) {
      return status;
    }
    options.pem_root_certs = *client_ca;
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
    security.client_certificates_verified = true;
  }
  security.credentials = grpc::SslServerCredentials(options);
  security.tls = true;
  return security;
}

}  // namespace kvcompress
