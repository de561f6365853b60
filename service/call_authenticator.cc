#include "service/call_authenticator.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "service/internal/small_file.h"

namespace kvcompress {
namespace {

constexpr size_t kMaxTokenBytes = 4096;
constexpr char kAuthorizationKey[] = "authorization";
constexpr char kExpected[] =
    "expected the metadata \"authorization: Bearer <token>\" with the token of kvcd's "
    "--auth_token_file";

std::array<unsigned char, 32> Sha256(absl::string_view text) {
  std::array<unsigned char, 32> digest{};
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest.data());
  return digest;
}

}  // namespace

absl::StatusOr<std::string> ReadAuthTokenFile(const std::string& path) {
  absl::StatusOr<std::string> content = ReadSmallFile(path, "--auth_token_file", kMaxTokenBytes);
  if (!content.ok()) return content.status();
  std::string token = std::move(content).value();
  while (!token.empty() && absl::ascii_isspace(static_cast<unsigned char>(token.back()))) {
    token.pop_back();
  }
  if (token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file ", path, ": empty; expected a token on the first line"));
  }
  for (size_t i = 0; i < token.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(token[i]);
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--auth_token_file ", path, ": byte ", i,
          " of the token is not printable ASCII "
          "(0x21-0x7e); a bearer token travels in gRPC metadata, which allows nothing else"));
    }
  }
  return token;
}

CallAuthenticator::CallAuthenticator(std::string token, bool client_certificates_verified)
    : token_required_(!token.empty()), client_certificates_verified_(client_certificates_verified) {
  if (token_required_) token_digest_ = Sha256(token);
}

absl::Status CallAuthenticator::CheckAuthorization(
    const std::vector<absl::string_view>& values) const {
  if (!token_required_) return absl::OkStatus();
  if (values.empty()) {
    return absl::UnauthenticatedError(
        absl::StrCat("missing bearer token: this kvcd requires a token on every KvCompress "
                     "call; ",
                     kExpected));
  }
  if (values.size() > 1) {
    return absl::UnauthenticatedError(
        absl::StrCat("the call carries ", values.size(), " authorization entries; ", kExpected));
  }
  // RFC 6750 / RFC 7235: the scheme is case-insensitive, one or more spaces follow it.
  constexpr absl::string_view kScheme = "bearer ";
  absl::string_view value = values.front();
  if (value.size() < kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError(
        absl::StrCat("the authorization metadata does not use the Bearer scheme; ", kExpected));
  }
  value.remove_prefix(kScheme.size());
  while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  const std::array<unsigned char, 32> presented = Sha256(value);
  if (CRYPTO_memcmp(presented.data(), token_digest_.data(), presented.size()) != 0) {
    return absl::UnauthenticatedError(
        absl::StrCat("the bearer token is not valid for this server; ", kExpected));
  }
  return absl::OkStatus();
}

absl::StatusOr<CallIdentity> CallAuthenticator::Authenticate(
    const grpc::ServerContextBase& context) const {
  CallIdentity identity;
  if (token_required_) {
    std::vector<absl::string_view> values;
    const auto range = context.client_metadata().equal_range(kAuthorizationKey);
    for (auto it = range.first; it != range.second; ++it) {
      values.emplace_back(it->second.data(), it->second.size());
    }
    if (absl::Status status = CheckAuthorization(values); !status.ok()) return status;
    identity.token_checked = true;
  }
  if (client_certificates_verified_) {
    const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
    // The handshake required and verified a certificate; a peer identity (SAN or CN) is
    // what gRPC records for it.
    if (auth != nullptr && auth->IsPeerAuthenticated()) {
      identity.certificate_verified = true;
      const std::vector<grpc::string_ref> names = auth->GetPeerIdentity();
      if (!names.empty())
        identity.certificate_subject.assign(names.front().data(), names.front().size());
    }
  }
  identity.authenticated = identity.token_checked || identity.certificate_verified;
  return identity;
}

}  // namespace kvcompress
