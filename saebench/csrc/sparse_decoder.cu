// saebench sparse-decoder kernels (see sparse_decoder.cuh for the contracts).
#include "sparse_decoder.cuh"

#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace saebench {
namespace {

constexpr int kChunk = 128;  // entries staged in shared memory at a time
constexpr int kMaxWarps = 32;  // 1024 threads per block at most

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N consecutive elements moved with one load/store (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[N]) {
  const Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(p.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* ptr, const float (&in)[N]) {
  Pack<T, N> p;
#pragma unroll
  for (int i = 0; i < N; ++i) p.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = p;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One block per (token, column chunk); each thread owns N consecutive columns.
template <typename T, int N>
__global__ void gather_rows_kernel(const T* __restrict__ coef, const int64_t* __restrict__ idx,
                                   const int64_t* __restrict__ offsets, const T* __restrict__ W, int64_t n,
                                   const T* __restrict__ bias, int64_t d, T* __restrict__ out) {
  __shared__ int64_t s_idx[kChunk];
  __shared__ float s_coef[kChunk];
  const int64_t b = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * N;
  const bool active = col < d;
  float acc[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = 0.f;

  const int64_t start = offsets[b], end = offsets[b + 1];
  for (int64_t base = start; base < end; base += kChunk) {
    const int m = static_cast<int>(min(static_cast<int64_t>(kChunk), end - base));
    __syncthreads();
    for (int t = threadIdx.x; t < m; t += blockDim.x) {
      const int64_t j = idx[base + t];
      assert(j >= 0 && j < n && "saebench gather_rows: latent index out of range");
      s_idx[t] = j;
      s_coef[t] = to_float(coef[base + t]);
    }
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int t = 0; t < m; ++t) {
        float w[N];
        load_floats<T, N>(W + s_idx[t] * d + col, w);
        const float c = s_coef[t];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = fmaf(c, w[i], acc[i]);
      }
    }
  }
  if (!active) return;
  if (bias != nullptr) {
    float bv[N];
    load_floats<T, N>(bias + col, bv);
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += bv[i];
  }
  store_floats<T, N>(out + b * d + col, acc);
}

// One block per (latent, column chunk): dW rows are written whole by their owner, no atomics.
// Each warp keeps its partial dot per entry in shared memory; the warps' partials are then summed
// in warp order, and each column chunk writes its own row of dcoef_parts: no atomics anywhere.
template <typename T, int N>
__global__ void bucketed_grad_kernel(const T* __restrict__ G, const T* __restrict__ coef,
                                     const int64_t* __restrict__ perm, const int64_t* __restrict__ lat_offsets,
                                     const int64_t* __restrict__ row_of, int64_t d, int64_t nnz, const T* __restrict__ W,
                                     T* __restrict__ dW, float* __restrict__ dcoef_parts, float* __restrict__ dbias) {
  __shared__ int64_t s_row[kChunk];
  __shared__ int64_t s_entry[kChunk];
  __shared__ float s_coef[kChunk];
  __shared__ float s_part[kMaxWarps][kChunk];
  const int64_t j = blockIdx.x;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * N;
  const bool active = col < d;
  const bool want_dot = (W != nullptr) && (dcoef_parts != nullptr);
  const int warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  float acc[N], w[N];
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i] = w[i] = 0.f;
  if (want_dot && active) load_floats<T, N>(W + j * d + col, w);

  float coef_sum = 0.f;
  const int64_t start = lat_offsets[j], end = lat_offsets[j + 1];
  for (int64_t base = start; base < end; base += kChunk) {
    const int m = static_cast<int>(min(static_cast<int64_t>(kChunk), end - base));
    __syncthreads();
    for (int t = threadIdx.x; t < m; t += blockDim.x) {
      const int64_t p = perm[base + t];
      assert(p >= 0 && p < nnz && "saebench bucketed_grad: entry id out of range");
      s_entry[t] = p;
      s_row[t] = row_of[p];
      s_coef[t] = to_float(coef[p]);
    }
    __syncthreads();
    for (int t = 0; t < m; ++t) {
      float g[N];
      if (active) {
        load_floats<T, N>(G + s_row[t] * d + col, g);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) g[i] = 0.f;
      }
      const float c = s_coef[t];
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        acc[i] = fmaf(c, g[i], acc[i]);
        dot = fmaf(g[i], w[i], dot);
      }
      if (want_dot) {
        dot = warp_sum(dot);
        if ((threadIdx.x & 31) == 0) s_part[warp][t] = dot;
      }
    }
    __syncthreads();
    if (want_dot) {
      float* row = dcoef_parts + static_cast<int64_t>(blockIdx.y) * nnz;
      for (int t = threadIdx.x; t < m; t += blockDim.x) {
        float total = 0.f;
        for (int w = 0; w < n_warps; ++w) total += s_part[w][t];
        row[s_entry[t]] = total;
      }
    }
    if (threadIdx.x == 0)
      for (int t = 0; t < m; ++t) coef_sum += s_coef[t];
  }
  if (dbias != nullptr && blockIdx.y == 0 && threadIdx.x == 0) dbias[j] = coef_sum;
  if (active) store_floats<T, N>(dW + j * d + col, acc);
}

struct Launch {
  dim3 grid;
  dim3 block;
};

inline Launch plan(int64_t rows, int64_t d, int vec) {
  const int64_t lanes = (d + vec - 1) / vec;
  const int64_t rounded = ((lanes + 31) / 32) * 32;
  const int threads = static_cast<int>(rounded < 1024 ? rounded : 1024);
  const int64_t chunks = (lanes + threads - 1) / threads;
  return {dim3(static_cast<unsigned>(rows), static_cast<unsigned>(chunks)), dim3(threads)};
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

}  // namespace

template <typename T>
cudaError_t gather_rows(const T* coef, const int64_t* idx, const int64_t* offsets, int64_t batch,
                        const T* W, int64_t n, const T* bias, int64_t d, T* out, cudaStream_t stream) {
  if (batch == 0 || d == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  if (d % V == 0 && aligned16(W) && aligned16(bias) && aligned16(out)) {
    const Launch l = plan(batch, d, V);
    gather_rows_kernel<T, V><<<l.grid, l.block, 0, stream>>>(coef, idx, offsets, W, n, bias, d, out);
  } else {
    const Launch l = plan(batch, d, 1);
    gather_rows_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(coef, idx, offsets, W, n, bias, d, out);
  }
  return cudaGetLastError();
}

namespace {
// The one place that picks bucketed_grad's vector width: its launch and its chunk count both read it.
template <typename T>
bool bucketed_grad_vectorised(int64_t d, const T* G, const T* W, const T* dW) {
  return d % (16 / sizeof(T)) == 0 && aligned16(G) && aligned16(W) && aligned16(dW);
}
}  // namespace

template <typename T>
int64_t bucketed_grad_chunks(int64_t d, const T* G, const T* W, const T* dW) {
  return static_cast<int64_t>(plan(1, d, bucketed_grad_vectorised(d, G, W, dW) ? static_cast<int>(16 / sizeof(T)) : 1).grid.y);
}

template <typename T>
cudaError_t bucketed_grad(const T* G, const T* coef, const int64_t* perm, const int64_t* lat_offsets,
                          const int64_t* row_of, int64_t n, int64_t d, int64_t nnz, const T* W, T* dW,
                          float* dcoef_parts, float* dbias, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  if (bucketed_grad_vectorised(d, G, W, dW)) {
    const Launch l = plan(n, d, V);
    bucketed_grad_kernel<T, V><<<l.grid, l.block, 0, stream>>>(G, coef, perm, lat_offsets, row_of, d, nnz, W, dW, dcoef_parts, dbias);
  } else {
    const Launch l = plan(n, d, 1);
    bucketed_grad_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(G, coef, perm, lat_offsets, row_of, d, nnz, W, dW, dcoef_parts, dbias);
  }
  return cudaGetLastError();
}

#define SAEBENCH_INSTANTIATE(T)                                                                              \
  template cudaError_t gather_rows<T>(const T*, const int64_t*, const int64_t*, int64_t, const T*, int64_t,   \
                                      const T*, int64_t, T*, cudaStream_t);                                   \
  template cudaError_t bucketed_grad<T>(const T*, const T*, const int64_t*, const int64_t*, const int64_t*,  \
                                        int64_t, int64_t, int64_t, const T*, T*, float*, float*, cudaStream_t); \
  template int64_t bucketed_grad_chunks<T>(int64_t, const T*, const T*, const T*);

SAEBENCH_INSTANTIATE(float)
SAEBENCH_INSTANTIATE(__half)
SAEBENCH_INSTANTIATE(__nv_bfloat16)

}  // namespace saebench
