// An in-process server on a loopback port, and clients for it.
#pragma once

#include <grpcpp/grpcpp.h>

#include <future>
#include <memory>
#include <string>

#include "client/denoiser_client.h"
#include "server/denoiser_server.h"
#include "tests/core/test_util.h"

namespace mmdit::testing {

// Starts a server on 127.0.0.1, port 0, serving the golden case `golden`'s model (or only
// listening, with `serve` false). Fails the test on error.
std::unique_ptr<DenoiserServer> StartServer(ServerOptions options, const std::string& golden = "sd3_tiny",
                                            bool serve = true);

// The same for the model directory `model_dir`, with its scheduler_config.json and its text
// encoder when it has one (as mmdit-server loads them).
std::unique_ptr<DenoiserServer> StartModelServer(ServerOptions options, const std::string& model_dir);

std::unique_ptr<DenoiserClient> ClientFor(const DenoiserServer& server);

// Batched random inputs that fit sd3_tiny: `batch` samples of [4, height, width] with
// `text_tokens` tokens; owns its tensors.
struct Inputs {
  Tensor img_latent, txt_embed, timestep, pooled_text;
  DenoiseInputs View() const { return {img_latent, txt_embed, timestep, pooled_text, "test"}; }
};
Inputs RandomSd3TinyInputs(int64_t batch, int64_t height, int64_t width, int64_t text_tokens, uint32_t seed);

// One asynchronous Denoise call; `status` completes when it is answered.
struct AsyncCall {
  grpc::ClientContext context;
  v1::DenoiseRequest request;
  v1::DenoiseResponse response;
  std::promise<grpc::Status> done;
  std::future<grpc::Status> status = done.get_future();
};
// With `wait_for_batch`, the call asks to wait up to --max_queue_delay_us for company.
std::unique_ptr<AsyncCall> StartDenoise(DenoiserClient& client, const Inputs& inputs,
                                        std::chrono::milliseconds timeout = std::chrono::seconds(30),
                                        bool wait_for_batch = false);

// Polls `condition` every millisecond for up to `limit`; true once it holds. (For waiting on
// another thread's progress, not for timing anything.)
bool Eventually(const std::function<bool()>& condition, std::chrono::milliseconds limit = std::chrono::seconds(20));

// The body and head of an HTTP/1.0 GET to 127.0.0.1:`port`; empty if it cannot connect. With a
// `read_timeout`, what arrived by then (a server that does not answer in time reads as "").
std::string HttpGet(int port, const std::string& path,
                    std::chrono::milliseconds read_timeout = std::chrono::milliseconds(0));

// Raw bytes to `method` (e.g. "/mmdit.v1.Denoiser/Denoise"), as a client with the wrong message
// (or none) would send them; its status.
grpc::Status CallWithBody(const DenoiserServer& server, const std::string& method, const std::string& body);

// A TCP connection to 127.0.0.1:`port` that sends nothing, closed on destruction.
class IdleConnection {
 public:
  explicit IdleConnection(int port);
  ~IdleConnection();
  IdleConnection(const IdleConnection&) = delete;
  IdleConnection& operator=(const IdleConnection&) = delete;
  bool connected() const { return connected_; }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

}  // namespace mmdit::testing
