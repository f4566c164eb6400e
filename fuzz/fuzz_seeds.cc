// Writes seed corpora the golden files do not give as they are: valid Denoise, Generate and
// reflection requests (Denoise and Generate for the sd3_tiny golden model, from its golden
// inputs; Generate prompts for the digits model; the first byte picks the message, as in
// request_fuzz), and small safetensors files in each stored dtype (the
// golden checkpoints are over a megabyte, too large to mutate usefully).
//   fuzz_seeds REQUEST_DIR SAFETENSORS_DIR
#include <fstream>
#include <iostream>
#include <string>

#include "core/npy.h"
#include "core/safetensors.h"
#include "grpc/reflection/v1/reflection.pb.h"
#include "mmdit/v1/denoiser.pb.h"
#include "proto/tensor_codec.h"

namespace {

bool Write(const std::string& path, char kind, const google::protobuf::Message& message) {
  std::ofstream out(path, std::ios::binary);
  out << kind << message.SerializeAsString();
  return static_cast<bool>(out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: fuzz_seeds REQUEST_DIR SAFETENSORS_DIR\n";
    return 2;
  }
  const std::string golden = std::string(MMDIT_FUZZ_MODEL_DIR) + "/", out = std::string(argv[1]) + "/";
  const std::string checkpoints = std::string(argv[2]) + "/";
  auto img = mmdit::ReadNpy(golden + "img_latent.npy"), txt = mmdit::ReadNpy(golden + "txt_embed.npy"),
       timestep = mmdit::ReadNpy(golden + "timestep.npy"), pooled = mmdit::ReadNpy(golden + "pooled_text.npy");
  if (!img.ok() || !txt.ok() || !timestep.ok() || !pooled.ok()) {
    std::cerr << "fuzz_seeds: cannot read the golden inputs in " << golden << "\n";
    return 1;
  }
  bool ok = true;
  for (mmdit::v1::DType dtype : {mmdit::v1::FP32, mmdit::v1::BF16, mmdit::v1::FP16}) {
    mmdit::v1::DenoiseRequest denoise;
    mmdit::EncodeTensor(*img, dtype, denoise.mutable_img_latent());
    mmdit::EncodeTensor(*txt, dtype, denoise.mutable_txt_embed());
    mmdit::EncodeTensor(*timestep, mmdit::v1::FP32, denoise.mutable_timestep());
    mmdit::EncodeTensor(*pooled, dtype, denoise.mutable_pooled_text());
    denoise.set_request_id("seed");
    ok = ok && Write(out + "denoise_" + mmdit::v1::DType_Name(dtype), '\0', denoise);
  }
  // One sample of the golden batch as batch-1 prompts.
  mmdit::Tensor txt_one = *txt, pooled_one = *pooled;
  txt_one.shape[0] = 1;
  txt_one.data.resize(txt_one.NumElements());
  pooled_one.shape[0] = 1;
  pooled_one.data.resize(pooled_one.NumElements());
  mmdit::v1::GenerateRequest generate;
  mmdit::EncodeTensor(txt_one, mmdit::v1::FP32, generate.mutable_txt_embed());
  mmdit::EncodeTensor(pooled_one, mmdit::v1::FP32, generate.mutable_pooled_text());
  for (int64_t dim : {4, 8, 8}) generate.add_latent_shape(dim);
  generate.set_steps(4);
  generate.set_guidance_scale(1.0f);
  generate.set_seed(7);
  ok = ok && Write(out + "generate_plain", '\1', generate);
  mmdit::EncodeTensor(txt_one, mmdit::v1::BF16, generate.mutable_negative_txt_embed());
  mmdit::EncodeTensor(pooled_one, mmdit::v1::BF16, generate.mutable_negative_pooled_text());
  generate.set_guidance_scale(7.0f);
  generate.mutable_skip_layer_guidance()->add_layers(1);
  generate.set_preview_every(2);
  generate.set_output_dtype(mmdit::v1::FP16);
  ok = ok && Write(out + "generate_cfg_slg", '\1', generate);
  // Prompts for the digits model's text encoder (first byte 3), and one for sd3_tiny, which has none.
  mmdit::v1::GenerateRequest prompted;
  prompted.set_prompt("a seven");
  prompted.set_steps(4);
  prompted.set_seed(3);
  ok = ok && Write(out + "generate_prompt", '\3', prompted);
  prompted.set_negative_prompt("the digit 1");
  prompted.add_latent_shape(1);
  prompted.add_latent_shape(8);
  prompted.add_latent_shape(8);
  ok = ok && Write(out + "generate_prompt_negative", '\3', prompted);
  ok = ok && Write(out + "generate_prompt_no_encoder", '\1', prompted);
  grpc::reflection::v1::ServerReflectionRequest reflection;
  reflection.set_list_services("");
  ok = ok && Write(out + "reflection_list", '\2', reflection);
  reflection.set_file_containing_symbol("mmdit.v1.Denoiser.Denoise");
  ok = ok && Write(out + "reflection_symbol", '\2', reflection);
  reflection.set_file_by_filename("google/protobuf/type.proto");
  ok = ok && Write(out + "reflection_file", '\2', reflection);
  reflection.mutable_file_containing_extension()->set_containing_type("google.protobuf.FieldOptions");
  reflection.mutable_file_containing_extension()->set_extension_number(1000);
  ok = ok && Write(out + "reflection_extension", '\2', reflection);
  const mmdit::Tensor small({2, 3}, {1, -2, 3.5f, 0, 1e-3f, -7}), vector({4}, {0.5f, 1, 2, 4});
  for (mmdit::DType dtype : {mmdit::DType::kF32, mmdit::DType::kBF16, mmdit::DType::kF16}) {
    ok = ok && mmdit::WriteSafetensors(checkpoints + "small_" + mmdit::DTypeName(dtype) + ".safetensors",
                                       {{"proj.weight", small}, {"proj.bias", vector}}, dtype)
                   .ok();
  }
  if (!ok) {
    std::cerr << "fuzz_seeds: cannot write to " << out << " or " << checkpoints << "\n";
    return 1;
  }
  return 0;
}
