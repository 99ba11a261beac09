// saebench sparse-decoder kernels: plain CUDA C++ core (no torch headers), so `nvcc -c` alone builds it.
//
// Every layout is CSR: entry p of token b lies in [offsets[b], offsets[b+1]); a fixed-k batch is
// CSR with offsets[b] = b * k. Matrices are row-major; W is [n, d] (a decoder, or an encoder
// stored latent-major); fp32 accumulation for every dtype.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace saebench {

// out[b, :] = sum_{p in row b} coef[p] * W[idx[p], :] (+ bias)            (decode forward, encoder dx)
// W is [n, d]; an index outside [0, n) fails a device assert.
template <typename T>
cudaError_t gather_rows(const T* coef, const int64_t* idx, const int64_t* offsets, int64_t batch,
                        const T* W, int64_t n, const T* bias, int64_t d, T* out, cudaStream_t stream);

// Column chunks bucketed_grad splits d into for these pointers (alignment picks the vector width):
// dcoef_parts holds one row of nnz partial dots per chunk.
template <typename T>
int64_t bucketed_grad_chunks(int64_t d, const T* G, const T* W, const T* dW);

// Latent-bucketed backward. Entries sorted by latent: perm[e] is an entry id, latent j owns
// e in [lat_offsets[j], lat_offsets[j+1]); row_of[p] is entry p's token. For every latent j:
//   dW[j, :]          = sum_e coef[perm[e]] * G[row_of[perm[e]], :]   (all n rows written, zeros included)
//   dcoef_parts[c, p] = <G[row_of[p]], W[j, :]> over column chunk c  (fp32, only if W and dcoef_parts are given)
//   dbias[j]          = sum_e coef[perm[e]]                          (fp32, only if dbias is given)
// Every sum runs in a fixed order (warp shuffles, then warps in index order): the results are
// bitwise deterministic. dcoef = dcoef_parts summed over chunks (the caller does it).
// Decoder backward: G = grad of x_hat, coef = values, W = W_dec  -> dW_dec, dvalues.
// Encoder backward: G = centred input, coef = grad of pre at the active entries -> dW_enc^T, db_enc.
template <typename T>
cudaError_t bucketed_grad(const T* G, const T* coef, const int64_t* perm, const int64_t* lat_offsets,
                          const int64_t* row_of, int64_t n, int64_t d, int64_t nnz, const T* W, T* dW,
                          float* dcoef_parts, float* dbias, cudaStream_t stream);

}  // namespace saebench
