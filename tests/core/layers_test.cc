// Each layer of core/layers.h against a naive loop written from MODEL_SPEC, on tiny random shapes.
#include "core/layers.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "tests/core/test_util.h"

namespace mmdit {
namespace {

using ::mmdit::testing::MaxAbsDiff;
using ::mmdit::testing::RandomTensor;

constexpr double kTolerance = 1e-5;

TEST(LayerNormModulate, MatchesNaiveLoop) {
  const int64_t rows = 5, dim = 37;
  const Tensor x = RandomTensor({rows, dim}, 1, 3.0f), shift = RandomTensor({dim}, 2), scale = RandomTensor({dim}, 3);
  Tensor out({rows, dim}), naive({rows, dim});
  LayerNormModulate(x.data.data(), rows, dim, shift.data.data(), scale.data.data(), out.data.data());
  for (int64_t r = 0; r < rows; ++r) {
    double mean = 0, var = 0;
    for (int64_t e = 0; e < dim; ++e) mean += x.data[r * dim + e] / dim;
    for (int64_t e = 0; e < dim; ++e) var += std::pow(x.data[r * dim + e] - mean, 2) / dim;
    for (int64_t e = 0; e < dim; ++e) {
      naive.data[r * dim + e] =
          (x.data[r * dim + e] - mean) / std::sqrt(var + 1e-6) * (1 + scale.data[e]) + shift.data[e];
    }
  }
  EXPECT_LE(MaxAbsDiff(out, naive), kTolerance);
}

TEST(LayerNormModulate, MayWriteInPlace) {
  const int64_t rows = 3, dim = 16;
  Tensor x = RandomTensor({rows, dim}, 4);
  const Tensor shift = RandomTensor({dim}, 5), scale = RandomTensor({dim}, 6);
  Tensor separate({rows, dim});
  LayerNormModulate(x.data.data(), rows, dim, shift.data.data(), scale.data.data(), separate.data.data());
  LayerNormModulate(x.data.data(), rows, dim, shift.data.data(), scale.data.data(), x.data.data());
  EXPECT_EQ(x.data, separate.data);
}

TEST(GatedResidualAdd, AddsGateTimesUpdate) {
  const int64_t rows = 4, dim = 9;
  const Tensor y = RandomTensor({rows, dim}, 7), gate = RandomTensor({dim}, 8);
  Tensor x = RandomTensor({rows, dim}, 9);
  Tensor naive = x;
  for (int64_t i = 0; i < rows * dim; ++i) naive.data[i] += gate.data[i % dim] * y.data[i];
  GatedResidualAdd(y.data.data(), rows, dim, gate.data.data(), x.data.data());
  EXPECT_LE(MaxAbsDiff(x, naive), kTolerance);
}

TEST(RmsNormHeads, NormalisesEachHeadSeparately) {
  const int64_t rows = 3, heads = 4, head_dim = 8;
  Tensor x = RandomTensor({rows, heads * head_dim}, 10, 2.0f);
  const Tensor gamma = RandomTensor({head_dim}, 11);
  Tensor naive = x;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      float* z = naive.data.data() + (r * heads + h) * head_dim;
      double mean_sq = 0;
      for (int64_t e = 0; e < head_dim; ++e) mean_sq += z[e] * z[e] / head_dim;
      for (int64_t e = 0; e < head_dim; ++e) z[e] = z[e] / std::sqrt(mean_sq + 1e-6) * gamma.data[e];
    }
  }
  RmsNormHeads(x.data.data(), rows, heads, head_dim, gamma.data.data());
  EXPECT_LE(MaxAbsDiff(x, naive), kTolerance);
}

TEST(SiLU, IsXTimesSigmoid) {
  const Tensor x = RandomTensor({50}, 12, 5.0f);
  Tensor out({50});
  SiLU(x.data.data(), 50, out.data.data());
  for (int i = 0; i < 50; ++i) EXPECT_NEAR(out.data[i], x.data[i] / (1 + std::exp(-double(x.data[i]))), 1e-6);
}

TEST(TimestepFeatures, CosineHalfFirstWithGeometricFrequencies) {
  for (float t : {0.0f, 1.0f, 500.5f, 999.0f}) {
    std::vector<float> features(kTimestepFeatures);
    TimestepFeatures(t, features.data());
    for (int k = 0; k < 128; ++k) {
      const double angle = t * std::exp(-std::log(10000.0) * k / 128);
      EXPECT_NEAR(features[k], std::cos(angle), 1e-6) << "t " << t << " k " << k;
      EXPECT_NEAR(features[128 + k], std::sin(angle), 1e-6) << "t " << t << " k " << k;
    }
  }
}

TEST(Patchify, ChannelSlowestWithinEachPatch) {
  const int64_t c = 3, h = 4, w = 6, p = 2;
  const Tensor latent = RandomTensor({c, h, w}, 13);
  Tensor tokens({(h / p) * (w / p), c * p * p});
  Patchify(latent.data.data(), c, h, w, p, tokens.data.data());
  for (int64_t i = 0; i < h / p; ++i)
    for (int64_t j = 0; j < w / p; ++j)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t u = 0; u < p; ++u)
          for (int64_t v = 0; v < p; ++v)
            EXPECT_EQ(tokens.data[(i * (w / p) + j) * c * p * p + ch * p * p + u * p + v],
                      latent.data[(ch * h + i * p + u) * w + j * p + v]);
}

TEST(Unpatchify, ChannelFastestWithinEachToken) {
  const int64_t c = 3, h = 4, w = 6, p = 2;
  const Tensor tokens = RandomTensor({(h / p) * (w / p), p * p * c}, 14);
  Tensor latent({c, h, w});
  Unpatchify(tokens.data.data(), c, h, w, p, latent.data.data());
  for (int64_t i = 0; i < h / p; ++i)
    for (int64_t j = 0; j < w / p; ++j)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t u = 0; u < p; ++u)
          for (int64_t v = 0; v < p; ++v)
            EXPECT_EQ(latent.data[(ch * h + i * p + u) * w + j * p + v],
                      tokens.data[(i * (w / p) + j) * p * p * c + (u * p + v) * c + ch]);
}

TEST(AddCroppedPositions, AddsTheCentredWindowOfTheTable) {
  const int64_t m = 5, dim = 3, gh = 2, gw = 3;  // top = 1, left = 1
  const Tensor table = RandomTensor({m * m, dim}, 15);
  Tensor tokens = RandomTensor({gh * gw, dim}, 16);
  Tensor naive = tokens;
  for (int64_t i = 0; i < gh; ++i)
    for (int64_t j = 0; j < gw; ++j)
      for (int64_t e = 0; e < dim; ++e)
        naive.data[(i * gw + j) * dim + e] += table.data[((1 + i) * m + 1 + j) * dim + e];
  AddCroppedPositions(table.data.data(), m, gh, gw, dim, tokens.data.data());
  EXPECT_EQ(tokens.data, naive.data);
}

// softmax(Q K^T / sqrt(hd)) V per head over the concatenation of a sample's segments.
void NaiveAttention(const std::vector<const Tensor*>& q, const std::vector<const Tensor*>& k,
                    const std::vector<const Tensor*>& v, int64_t heads, int64_t hd, std::vector<Tensor*> out) {
  std::vector<std::pair<int, int64_t>> rows;  // (segment, row) in sequence order
  for (size_t s = 0; s < q.size(); ++s)
    for (int64_t r = 0; r < q[s]->shape[0]; ++r) rows.emplace_back(s, r);
  const int64_t dim = heads * hd;
  for (int64_t h = 0; h < heads; ++h) {
    for (auto [qs, qr] : rows) {
      std::vector<double> scores;
      for (auto [ks, kr] : rows) {
        double dot = 0;
        for (int64_t e = 0; e < hd; ++e) dot += q[qs]->data[qr * dim + h * hd + e] * k[ks]->data[kr * dim + h * hd + e];
        scores.push_back(dot / std::sqrt(double(hd)));
      }
      const double max = *std::max_element(scores.begin(), scores.end());
      double sum = 0;
      for (double& s : scores) sum += (s = std::exp(s - max));
      for (int64_t e = 0; e < hd; ++e) {
        double acc = 0;
        for (size_t j = 0; j < rows.size(); ++j)
          acc += scores[j] / sum * v[rows[j].first]->data[rows[j].second * dim + h * hd + e];
        out[qs]->data[qr * dim + h * hd + e] = acc;
      }
    }
  }
}

TEST(Attention, MatchesNaiveSoftmaxOverConcatenatedSegments) {
  const int64_t heads = 3, hd = 8, dim = heads * hd;
  // Two sequences: (text 5 + image 40 rows: more than one query tile) and (image 7 alone).
  const Tensor tq = RandomTensor({5, dim}, 20), tk = RandomTensor({5, dim}, 21), tv = RandomTensor({5, dim}, 22);
  const Tensor iq = RandomTensor({40, dim}, 23), ik = RandomTensor({40, dim}, 24), iv = RandomTensor({40, dim}, 25);
  const Tensor sq = RandomTensor({7, dim}, 26), sk = RandomTensor({7, dim}, 27), sv = RandomTensor({7, dim}, 28);
  Tensor t_out({5, dim}), i_out({40, dim}), s_out({7, dim});
  AttentionSequence joint, alone;
  joint.segments[0] = {tq.data.data(), tk.data.data(), tv.data.data(), t_out.data.data(), 5};
  joint.segments[1] = {iq.data.data(), ik.data.data(), iv.data.data(), i_out.data.data(), 40};
  joint.num_segments = 2;
  alone.segments[0] = {sq.data.data(), sk.data.data(), sv.data.data(), s_out.data.data(), 7};
  alone.num_segments = 1;
  std::vector<float> scratch(AttentionScratchFloats(45, omp_get_max_threads()));
  const AttentionSequence sequences[] = {joint, alone};
  Attention(sequences, heads, hd, dim, absl::MakeSpan(scratch));

  Tensor t_naive({5, dim}), i_naive({40, dim}), s_naive({7, dim});
  NaiveAttention({&tq, &iq}, {&tk, &ik}, {&tv, &iv}, heads, hd, {&t_naive, &i_naive});
  NaiveAttention({&sq}, {&sk}, {&sv}, heads, hd, {&s_naive});
  EXPECT_LE(MaxAbsDiff(t_out, t_naive), kTolerance);
  EXPECT_LE(MaxAbsDiff(i_out, i_naive), kTolerance);
  EXPECT_LE(MaxAbsDiff(s_out, s_naive), kTolerance);
}

}  // namespace
}  // namespace mmdit
