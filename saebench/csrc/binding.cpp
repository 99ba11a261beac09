// Thin torch binding of the sparse-decoder kernels: argument checks and dispatch by dtype.
// The latent bucketing (a stable sort) is done by the caller, in torch, once per step (saebench/kernels.py).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "sparse_decoder.cuh"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "saebench kernel ", what, " failed: ", cudaGetErrorString(err));
}

void check_index(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 1 && t.scalar_type() == torch::kInt64, name, " must be a 1-D int64 CUDA tensor");
}

template <typename F>
void dispatch(torch::ScalarType t, F&& f) {
  switch (t) {
    case torch::kFloat32: f(float{}); break;
    case torch::kFloat16: f(__half{}); break;
    case torch::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "saebench kernels support fp32, fp16 and bf16, not ", t);
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) { return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr; }

}  // namespace

// out [batch d] = sum_{p in row b} coef[p] * W[idx[p]] (+ bias); idx [nnz], offsets [batch+1] (CSR)
torch::Tensor gather_rows(torch::Tensor coef, torch::Tensor idx, torch::Tensor offsets, torch::Tensor W,
                          c10::optional<torch::Tensor> bias) {
  check_index(idx, "idx");
  check_index(offsets, "offsets");
  TORCH_CHECK(coef.is_cuda() && coef.dim() == 1 && coef.numel() == idx.numel(), "coef must be a CUDA [nnz] tensor");
  TORCH_CHECK(offsets.numel() >= 1, "offsets must be [batch+1]");
  TORCH_CHECK(W.is_cuda() && W.dim() == 2 && coef.scalar_type() == W.scalar_type(), "W must be a CUDA [n d] matrix of coef's dtype");
  const c10::cuda::CUDAGuard guard(W.device());
  W = W.contiguous();
  coef = coef.contiguous();
  idx = idx.contiguous();
  offsets = offsets.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == W.size(1) && b.scalar_type() == W.scalar_type()), "bias must be [d] of W's dtype");
  const int64_t batch = offsets.numel() - 1, d = W.size(1);
  auto out = torch::empty({batch, d}, W.options());
  dispatch(W.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_cuda(saebench::gather_rows<T>(ptr<T>(coef), idx.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), batch, ptr<T>(W),
                                        W.size(0), ptr<T>(b), d, ptr<T>(out), c10::cuda::getCurrentCUDAStream()),
               "gather_rows");
  });
  return out;
}

// Buckets (perm [nnz], lat_offsets [n+1], row_of [nnz]) come from saebench.kernels.bucket.
// -> (dW [n d], dcoef fp32 [nnz] (empty without W), dbias fp32 [n] (empty unless want_dbias))
std::vector<torch::Tensor> bucketed_grad(torch::Tensor G, torch::Tensor coef, torch::Tensor perm, torch::Tensor lat_offsets,
                                         torch::Tensor row_of, c10::optional<torch::Tensor> W, bool want_dbias) {
  check_index(perm, "perm");
  check_index(lat_offsets, "lat_offsets");
  check_index(row_of, "row_of");
  TORCH_CHECK(coef.is_cuda() && coef.dim() == 1 && coef.numel() == perm.numel() && row_of.numel() == perm.numel(),
              "coef, perm and row_of must be CUDA [nnz] tensors");
  TORCH_CHECK(G.is_cuda() && G.dim() == 2 && coef.scalar_type() == G.scalar_type(), "G must be a CUDA [batch d] matrix of coef's dtype");
  TORCH_CHECK(lat_offsets.numel() >= 1, "lat_offsets must be [n+1]");
  const c10::cuda::CUDAGuard guard(G.device());
  G = G.contiguous();
  coef = coef.contiguous();
  perm = perm.contiguous();
  lat_offsets = lat_offsets.contiguous();
  row_of = row_of.contiguous();
  const int64_t n = lat_offsets.numel() - 1, nnz = perm.numel(), d = G.size(1);
  torch::Tensor w = W.has_value() ? W->contiguous() : torch::Tensor();
  TORCH_CHECK(!w.defined() || (w.size(0) == n && w.size(1) == d && w.scalar_type() == G.scalar_type()), "W must be [n d] of G's dtype");

  auto dW = torch::empty({n, d}, G.options());
  auto f32 = G.options().dtype(torch::kFloat32);
  auto dbias = want_dbias ? torch::empty({n}, f32) : torch::Tensor();
  torch::Tensor parts;
  int64_t chunks = 1;
  dispatch(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (w.defined()) {
      chunks = saebench::bucketed_grad_chunks<T>(d, ptr<T>(G), ptr<T>(w), ptr<T>(dW));
      parts = torch::zeros({chunks, nnz}, f32);
    }
    check_cuda(saebench::bucketed_grad<T>(ptr<T>(G), ptr<T>(coef), perm.data_ptr<int64_t>(), lat_offsets.data_ptr<int64_t>(),
                                          row_of.data_ptr<int64_t>(), n, d, nnz, ptr<T>(w), ptr<T>(dW), ptr<float>(parts),
                                          ptr<float>(dbias), c10::cuda::getCurrentCUDAStream()),
               "bucketed_grad");
  });
  auto dcoef = !w.defined() ? torch::empty({0}, f32) : (chunks == 1 ? parts[0] : parts.sum(0));
  return {dW, dcoef, want_dbias ? dbias : torch::empty({0}, f32)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_rows", &gather_rows, "sparse rows gather: out[b] = sum coef[p] W[idx[p]] (+ bias)");
  m.def("bucketed_grad", &bucketed_grad, "latent-bucketed backward over sorted entries: dW, dcoef, dbias");
}
