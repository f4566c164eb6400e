// TLS and mutual TLS, with certificates made by openssl for this test run.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "tests/server/server_test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::RandomSd3TinyInputs;
using ::mmdit::testing::StartServer;

// A CA, a server certificate for localhost and 127.0.0.1, and a client certificate, made once
// per test binary run; empty if openssl failed.
const std::string& CertificateDir() {
  static const std::string dir = [] {
    const std::string d = testing::MakeTempDir("tls");
    const std::string key = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
    const std::string script =
        "cd " + d +
        " && set -e && exec >openssl.log 2>&1 && "
        "openssl req -x509" +
        key +
        "-keyout ca.key -out ca.crt -days 2 -subj /CN=mmdit-test-ca && "
        "openssl req" +
        key +
        "-keyout server.key -out server.csr -subj /CN=localhost && "
        "echo subjectAltName=DNS:localhost,IP:127.0.0.1 > san.ext && "
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 "
        "-extfile san.ext && "
        "openssl req" +
        key +
        "-keyout client.key -out client.csr -subj /CN=mmdit-test-client && "
        "openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2";
    return std::system(("bash -c '" + script + "'").c_str()) == 0 ? d : std::string();
  }();
  return dir;
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_FALSE(CertificateDir().empty()) << "openssl could not make the certificates"; }
  static std::string Path(const std::string& file) { return CertificateDir() + "/" + file; }

  absl::StatusOr<DenoiseResult> Call(const DenoiserServer& server, ClientOptions options) {
    options.target = "127.0.0.1:" + std::to_string(server.port());
    auto client = DenoiserClient::Connect(options);
    if (!client.ok()) return client.status();
    return (*client)->Denoise(RandomSd3TinyInputs(1, 8, 8, 7, 1).View(), v1::FP32, std::chrono::seconds(10));
  }
};

TEST_F(TlsTest, ServerTlsRoundTripAndPlaintextClientsAreRefused) {
  ServerOptions options;
  options.tls = {Path("server.crt"), Path("server.key"), ""};
  auto server = StartServer(options);
  EXPECT_TRUE(Call(*server, {.tls_ca_file = Path("ca.crt")}).ok());
  EXPECT_FALSE(Call(*server, {}).ok());
}

TEST_F(TlsTest, MutualTlsAcceptsASignedClientAndRefusesOneWithoutACertificate) {
  ServerOptions options;
  options.tls = {Path("server.crt"), Path("server.key"), Path("ca.crt")};
  auto server = StartServer(options);
  auto with_certificate =
      Call(*server,
           {.tls_ca_file = Path("ca.crt"), .tls_cert_file = Path("client.crt"), .tls_key_file = Path("client.key")});
  EXPECT_TRUE(with_certificate.ok()) << with_certificate.status();
  auto without = Call(*server, {.tls_ca_file = Path("ca.crt")});
  EXPECT_EQ(without.status().code(), absl::StatusCode::kUnavailable) << without.status();
}

TEST_F(TlsTest, HalfATlsConfigurationIsRefusedAtStart) {
  ServerOptions options;
  options.tls = {Path("server.crt"), "", ""};
  EXPECT_EQ(DenoiserServer::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.tls = {Path("server.crt"), "/nonexistent.key", ""};
  EXPECT_EQ(DenoiserServer::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mmdit
