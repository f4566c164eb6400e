#include "tests/server/server_test_util.h"

#include <grpcpp/generic/generic_stub.h>

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

namespace mmdit::testing {

std::unique_ptr<DenoiserServer> StartServer(ServerOptions options, const std::string& golden, bool serve) {
  if (serve) return StartModelServer(std::move(options), GoldenDir(golden));
  options.host = "127.0.0.1";
  options.port = 0;
  options.metrics_port = 0;
  if (options.model_dir.empty()) options.model_dir = GoldenDir(golden);
  auto server = DenoiserServer::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

std::unique_ptr<DenoiserServer> StartModelServer(ServerOptions options, const std::string& model_dir) {
  options.host = "127.0.0.1";
  options.port = 0;
  options.metrics_port = 0;
  if (options.model_dir.empty()) options.model_dir = model_dir;  // names the model: "sd3_tiny"
  auto server = DenoiserServer::Start(options);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return nullptr;
  auto engine = Engine::Load(model_dir);
  EXPECT_TRUE(engine.ok()) << engine.status();
  auto flow_match = LoadFlowMatchConfig(model_dir);
  EXPECT_TRUE(flow_match.ok()) << flow_match.status();
  if (!engine.ok() || !flow_match.ok()) return nullptr;
  const ModelConfig& c = (*engine)->config();
  auto text_encoder = LoadTextEncoder(model_dir, c.joint_attention_dim, c.pooled_projection_dim);
  EXPECT_TRUE(text_encoder.ok()) << text_encoder.status();
  if (!text_encoder.ok()) return nullptr;
  const absl::Status status = (*server)->Serve(std::move(*engine), {}, *flow_match, std::move(*text_encoder));
  EXPECT_TRUE(status.ok()) << status;
  return std::move(*server);
}

std::unique_ptr<DenoiserClient> ClientFor(const DenoiserServer& server) {
  auto client = DenoiserClient::Connect({.target = "127.0.0.1:" + std::to_string(server.port())});
  EXPECT_TRUE(client.ok()) << client.status();
  return std::move(*client);
}

Inputs RandomSd3TinyInputs(int64_t batch, int64_t height, int64_t width, int64_t text_tokens, uint32_t seed) {
  Inputs inputs{RandomTensor({batch, 4, height, width}, seed), RandomTensor({batch, text_tokens, 40}, seed + 1),
                Tensor({batch}), RandomTensor({batch, 24}, seed + 2)};
  for (int64_t b = 0; b < batch; ++b) inputs.timestep.data[b] = 100.0f * (seed % 10) + b;
  return inputs;
}

std::unique_ptr<AsyncCall> StartDenoise(DenoiserClient& client, const Inputs& inputs,
                                        std::chrono::milliseconds timeout, bool wait_for_batch) {
  auto call = std::make_unique<AsyncCall>();
  call->request = MakeDenoiseRequest(inputs.View(), v1::FP32);
  call->request.set_wait_for_batch(wait_for_batch);
  call->context.set_deadline(std::chrono::system_clock::now() + timeout);
  AsyncCall* raw = call.get();
  client.stub().async()->Denoise(&raw->context, &raw->request, &raw->response,
                                 [raw](grpc::Status status) { raw->done.set_value(status); });
  return call;
}

bool Eventually(const std::function<bool()>& condition, std::chrono::milliseconds limit) {
  const auto give_up = std::chrono::steady_clock::now() + limit;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

namespace {

// A socket connected to 127.0.0.1:`port`, or -1.
int ConnectLoopback(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

IdleConnection::IdleConnection(int port) : fd_(ConnectLoopback(port)), connected_(fd_ >= 0) {}

IdleConnection::~IdleConnection() {
  if (fd_ >= 0) ::close(fd_);
}

std::string HttpGet(int port, const std::string& path, std::chrono::milliseconds read_timeout) {
  const int fd = ConnectLoopback(port);
  if (fd < 0) return "";
  if (read_timeout.count() > 0) {
    const timeval timeout = {static_cast<time_t>(read_timeout.count() / 1000),
                             static_cast<suseconds_t>(read_timeout.count() % 1000 * 1000)};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  }
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  [[maybe_unused]] ssize_t sent = ::send(fd, request.data(), request.size(), 0);
  std::string response;
  char buffer[4096];
  while (ssize_t n = ::read(fd, buffer, sizeof(buffer))) {
    if (n < 0) break;
    response.append(buffer, n);
  }
  ::close(fd);
  return response;
}

// Raw bytes to `method`, as a client with the wrong message (or none) would send them.
grpc::Status CallWithBody(const DenoiserServer& server, const std::string& method, const std::string& body) {
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  grpc::Slice slice(body);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, method, grpc::StubOptions(), &request, &response,
                 [&](grpc::Status status) { done.set_value(std::move(status)); });
  return done.get_future().get();
}

}  // namespace mmdit::testing
