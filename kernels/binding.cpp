// Thin torch binding of the sparse-decoder kernels: argument checks, the latent sort, dispatch by dtype.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include "sparse_decoder.cuh"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "saebench kernel ", what, " failed: ", cudaGetErrorString(err));
}

void check_csr(const torch::Tensor& coef, const torch::Tensor& idx, const torch::Tensor& offsets) {
  TORCH_CHECK(coef.is_cuda() && idx.is_cuda() && offsets.is_cuda(), "saebench kernels take CUDA tensors");
  TORCH_CHECK(coef.dim() == 1 && idx.dim() == 1 && coef.numel() == idx.numel(), "coef and idx must be [nnz]");
  TORCH_CHECK(idx.scalar_type() == torch::kInt64 && offsets.scalar_type() == torch::kInt64, "idx and offsets must be int64");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "offsets must be [batch+1]");
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

// out [batch d] = sum_{p in row b} coef[p] * W[idx[p]] (+ bias)
torch::Tensor gather_rows(torch::Tensor coef, torch::Tensor idx, torch::Tensor offsets, torch::Tensor W,
                          c10::optional<torch::Tensor> bias) {
  check_csr(coef, idx, offsets);
  TORCH_CHECK(W.is_cuda() && W.dim() == 2 && coef.scalar_type() == W.scalar_type(), "W must be a CUDA [n d] matrix of coef's dtype");
  const c10::cuda::CUDAGuard guard(W.device());
  W = W.contiguous();
  coef = coef.contiguous();
  torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == W.size(1) && b.scalar_type() == W.scalar_type()), "bias must be [d] of W's dtype");
  const int64_t batch = offsets.numel() - 1, d = W.size(1);
  auto out = torch::empty({batch, d}, W.options());
  dispatch(W.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_cuda(saebench::gather_rows<T>(ptr<T>(coef), idx.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), batch, ptr<T>(W),
                                        ptr<T>(b), d, ptr<T>(out), at::cuda::getCurrentCUDAStream()),
               "gather_rows");
  });
  return out;
}

// -> (dW [n d], dcoef fp32 [nnz] (empty without W), dbias fp32 [n] (empty unless want_dbias))
std::vector<torch::Tensor> bucketed_grad(torch::Tensor G, torch::Tensor coef, torch::Tensor idx, torch::Tensor offsets,
                                         int64_t n, c10::optional<torch::Tensor> W, bool want_dbias) {
  check_csr(coef, idx, offsets);
  TORCH_CHECK(G.is_cuda() && G.dim() == 2 && G.size(0) == offsets.numel() - 1 && coef.scalar_type() == G.scalar_type(),
              "G must be a CUDA [batch d] matrix of coef's dtype");
  const c10::cuda::CUDAGuard guard(G.device());
  G = G.contiguous();
  coef = coef.contiguous();
  const int64_t nnz = idx.numel(), batch = G.size(0), d = G.size(1);
  torch::Tensor w = W.has_value() ? W->contiguous() : torch::Tensor();
  TORCH_CHECK(!w.defined() || (w.size(0) == n && w.size(1) == d && w.scalar_type() == G.scalar_type()), "W must be [n d] of G's dtype");

  // Bucket entries by latent: a stable sort gives each latent a contiguous run, in token order.
  auto perm = std::get<1>(torch::sort(idx, /*stable=*/true));
  auto counts = torch::bincount(idx, {}, n);
  auto lat_offsets = torch::zeros({n + 1}, idx.options());
  lat_offsets.slice(0, 1).copy_(counts.cumsum(0));
  auto row_of = torch::repeat_interleave(torch::arange(batch, idx.options()), offsets.diff(), /*dim=*/0, /*output_size=*/nnz);

  auto dW = torch::empty({n, d}, G.options());
  auto f32 = G.options().dtype(torch::kFloat32);
  auto dcoef = w.defined() ? torch::zeros({nnz}, f32) : torch::Tensor();
  auto dbias = want_dbias ? torch::empty({n}, f32) : torch::Tensor();
  dispatch(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_cuda(saebench::bucketed_grad<T>(ptr<T>(G), ptr<T>(coef), perm.data_ptr<int64_t>(), lat_offsets.data_ptr<int64_t>(),
                                          row_of.data_ptr<int64_t>(), n, d, ptr<T>(w), ptr<T>(dW), ptr<float>(dcoef),
                                          ptr<float>(dbias), at::cuda::getCurrentCUDAStream()),
               "bucketed_grad");
  });
  return {dW, w.defined() ? dcoef : torch::empty({0}, f32), want_dbias ? dbias : torch::empty({0}, f32)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_rows", &gather_rows, "sparse rows gather: out[b] = sum coef[p] W[idx[p]] (+ bias)");
  m.def("bucketed_grad", &bucketed_grad, "latent-bucketed backward: dW, dcoef, dbias");
}
