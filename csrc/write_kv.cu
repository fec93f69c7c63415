// RocketKV write_kv: store K/V into the paged cache fused with the page max/min update.
//
// Cache layout (rocketkv_vllm/kv_layout.py), one tensor per layer:
//   [num_blocks, Hkv, 2 * block_size + 2 * pages_per_block, D]
//   rows [0, bs): keys, [bs, 2bs): values, then the page summaries in groups of gw channels:
//   channel c of page j's max at (c / gw) * 2 * pages_per_block * gw + j * gw + c % gw from
//   the end of the value rows, its min pages_per_block * gw further (gw = D: row-major).
//
// Several (token, KV head) pairs per CUDA block, 16 bytes of channels a thread (one channel
// where rows are not 16-byte aligned). Each pair stores its token's key/value. The first
// token of each run of consecutive same-page tokens in slot_mapping (the "leader") folds the
// whole run (at most page_size tokens) into the page summary: a run containing the page's
// first slot restarts the page, otherwise the old summary is widened. Every page touched is
// therefore written by exactly one pair (deterministic, no atomics). Tokens of one page must
// be adjacent in slot_mapping, which holds for vLLM (a request's new tokens are consecutive
// and in position order).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace rocketkv {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC channels a thread: 16-byte accesses (VEC * sizeof(scalar_t) == 16) when every row is
// 16-byte aligned and the summary groups hold whole vectors, else one channel a thread
// (VEC == 1). Either way a thread's channels lie together in one summary group.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, typename idx_t, int VEC>
__global__ void write_kv_kernel(scalar_t* __restrict__ kv, const scalar_t* __restrict__ key,
                                const scalar_t* __restrict__ value, const idx_t* __restrict__ slots,
                                int64_t num_tokens, int64_t hkv, int64_t s_cb, int64_t s_ch, int64_t s_cr,
                                int64_t s_kt, int64_t s_kh, int64_t s_vt, int64_t s_vh, int head_dim,
                                int block_size, int page_size, int gw, int lanes) {
  // `lanes` threads per (token, KV head) pair, several pairs per CUDA block; consecutive
  // pairs are the heads of one token (adjacent rows of key/value).
  using P = Pack<scalar_t, VEC>;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes;
  if (pair >= num_tokens * hkv) return;
  const int64_t t = pair / hkv;
  const int64_t h = pair % hkv;
  const int d0 = (threadIdx.x % lanes) * VEC;
  const int64_t slot = static_cast<int64_t>(slots[t]);
  if (slot < 0 || d0 >= head_dim) return;
  const int64_t blk = slot / block_size;
  const int64_t off = slot % block_size;
  const int pages_per_block = block_size / page_size;
  scalar_t* base = kv + blk * s_cb + h * s_ch;
  const P k = *reinterpret_cast<const P*>(key + t * s_kt + h * s_kh + d0);
  *reinterpret_cast<P*>(base + off * s_cr + d0) = k;
  *reinterpret_cast<P*>(base + (block_size + off) * s_cr + d0) =
      *reinterpret_cast<const P*>(value + t * s_vt + h * s_vh + d0);

  const int64_t page = slot / page_size;
  if (t > 0) {
    const int64_t prev = static_cast<int64_t>(slots[t - 1]);
    if (prev >= 0 && prev / page_size == page) return;  // not the leader of its run
  }
  // Extent of the run: tokens t .. t + run - 1 are on this page (uniform across the pair's lanes).
  int run = 1;
  bool restart = (off % page_size) == 0;
  for (int j = 1; j < page_size && t + j < num_tokens; ++j) {
    const int64_t s2 = static_cast<int64_t>(slots[t + j]);
    if (s2 < 0 || s2 / page_size != page) break;
    restart |= (s2 % page_size) == 0;
    ++run;
  }
  float mx[VEC], mn[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) mx[i] = mn[i] = to_float(k.v[i]);
  for (int j = 1; j < run; ++j) {
    const P kj = *reinterpret_cast<const P*>(key + (t + j) * s_kt + h * s_kh + d0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      mx[i] = fmaxf(mx[i], to_float(kj.v[i]));
      mn[i] = fminf(mn[i], to_float(kj.v[i]));
    }
  }
  scalar_t* region = base + 2 * block_size * s_cr;
  const int64_t jp = page % pages_per_block;
  const int64_t min_at = static_cast<int64_t>(pages_per_block) * gw;
  P* pmax = reinterpret_cast<P*>(region + (d0 / gw) * 2 * min_at + jp * gw + d0 % gw);
  P* pmin = reinterpret_cast<P*>(reinterpret_cast<scalar_t*>(pmax) + min_at);
  P new_max, new_min;
  if (restart) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      new_max.v[i] = from_float<scalar_t>(mx[i]);
      new_min.v[i] = from_float<scalar_t>(mn[i]);
    }
  } else {
    const P old_max = *pmax, old_min = *pmin;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      new_max.v[i] = from_float<scalar_t>(fmaxf(to_float(old_max.v[i]), mx[i]));
      new_min.v[i] = from_float<scalar_t>(fminf(to_float(old_min.v[i]), mn[i]));
    }
  }
  *pmax = new_max;
  *pmin = new_min;
}

template <typename scalar_t, int VEC>
void launch_vec(at::Tensor& kv, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slots,
                int64_t block_size, int64_t page_size, int64_t gw, cudaStream_t stream) {
  const int64_t num_tokens = slots.size(0);
  const int64_t hkv = kv.size(1);
  const int head_dim = static_cast<int>(kv.size(3));
  const int lanes = (head_dim + VEC - 1) / VEC;
  // Up to ~128 threads a CUDA block, but no fewer blocks than SMs while there is work for
  // them (a decode step has only batch x Hkv pairs), and at least a warp a block.
  const int64_t num_pairs = num_tokens * hkv;
  int sms = 1;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, kv.get_device()));
  const int64_t most = std::max(1, 128 / lanes), least = std::max(1, 32 / lanes);
  const int pairs = static_cast<int>(std::clamp<int64_t>((num_pairs + sms - 1) / sms, least, most));
  const int64_t blocks = (num_pairs + pairs - 1) / pairs;
  auto* kv_ptr = reinterpret_cast<scalar_t*>(kv.data_ptr());
  auto* k_ptr = reinterpret_cast<const scalar_t*>(key.data_ptr());
  auto* v_ptr = reinterpret_cast<const scalar_t*>(value.data_ptr());
#define ROCKETKV_LAUNCH(IDX_T)                                                                                \
  write_kv_kernel<scalar_t, IDX_T, VEC><<<static_cast<unsigned>(blocks), pairs * lanes, 0, stream>>>(         \
      kv_ptr, k_ptr, v_ptr, slots.data_ptr<IDX_T>(), num_tokens, hkv, kv.stride(0), kv.stride(1), kv.stride(2), \
      key.stride(0), key.stride(1), value.stride(0), value.stride(1), head_dim, static_cast<int>(block_size),   \
      static_cast<int>(page_size), static_cast<int>(gw), lanes)
  if (slots.scalar_type() == at::kLong) {
    ROCKETKV_LAUNCH(int64_t);
  } else {
    ROCKETKV_LAUNCH(int32_t);
  }
#undef ROCKETKV_LAUNCH
}

// 16-byte accesses when head_dim, every stride and every base pointer allow them.
bool aligned16(const at::Tensor& t, int64_t elt) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if ((t.stride(d) * elt) % 16) return false;
  }
  return true;
}

template <typename scalar_t>
void launch(at::Tensor& kv, const at::Tensor& key, const at::Tensor& value, const at::Tensor& slots,
            int64_t block_size, int64_t page_size, int64_t gw, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t elt = sizeof(scalar_t);
  // groups narrower than a vector (e.g. channel-major summaries, gw = 1) take one channel a
  // thread: with VEC channels each, a thread's summary updates are VEC scattered ones in a
  // chain (H100, gw = 1, one decode token of 8 requests: 4.8 us, one channel a thread 2.8).
  // Prefill is slow either way there (8,192 tokens: 92 / 128 us, Triton 42): the
  // dispatcher (kernels/__init__.py) hands such layouts to Triton.
  if (gw % kVec == 0 && kv.size(3) % kVec == 0 && aligned16(kv, elt) && aligned16(key, elt) &&
      aligned16(value, elt)) {
    launch_vec<scalar_t, kVec>(kv, key, value, slots, block_size, page_size, gw, stream);
  } else {
    launch_vec<scalar_t, 1>(kv, key, value, slots, block_size, page_size, gw, stream);
  }
}

}  // namespace rocketkv

void write_kv_cuda(at::Tensor kv_cache, at::Tensor key, at::Tensor value, at::Tensor slot_mapping,
                   int64_t block_size, int64_t page_size, int64_t summary_group) {
  TORCH_CHECK(kv_cache.is_cuda() && key.is_cuda() && value.is_cuda() && slot_mapping.is_cuda(),
              "write_kv: all tensors must be on CUDA");
  TORCH_CHECK(kv_cache.dim() == 4, "write_kv: kv_cache must be [num_blocks, Hkv, rows, D]");
  TORCH_CHECK(block_size > 0 && page_size > 0 && block_size % page_size == 0, "write_kv: bad block/page size");
  TORCH_CHECK(kv_cache.size(2) == 2 * block_size + 2 * (block_size / page_size),
              "write_kv: kv_cache rows do not match the layout");
  TORCH_CHECK(kv_cache.stride(3) == 1 && kv_cache.stride(2) == kv_cache.size(3),
              "write_kv: kv_cache must be contiguous within each block and KV head");
  TORCH_CHECK(summary_group > 0 && kv_cache.size(3) % summary_group == 0,
              "write_kv: summary_group must divide head_dim");
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3, "write_kv: key/value must be [T, Hkv, D]");
  TORCH_CHECK(kv_cache.size(3) > 0 && kv_cache.size(3) <= 1024, "write_kv: head_dim must be in [1, 1024]");
  TORCH_CHECK(key.size(1) == kv_cache.size(1) && key.size(2) == kv_cache.size(3), "write_kv: key shape mismatch");
  TORCH_CHECK(value.sizes() == key.sizes(), "write_kv: value shape mismatch");
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() && value.scalar_type() == kv_cache.scalar_type(),
              "write_kv: key/value dtype must equal the cache dtype");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), "write_kv: slot_mapping must be [T]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
              "write_kv: slot_mapping must be int32 or int64");
  if (slot_mapping.size(0) == 0) return;
  key = key.stride(2) == 1 ? key : key.contiguous();
  value = value.stride(2) == 1 ? value : value.contiguous();
  slot_mapping = slot_mapping.contiguous();
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(kv_cache.device().index()).stream();
  switch (kv_cache.scalar_type()) {
    case at::kFloat:
      rocketkv::launch<float>(kv_cache, key, value, slot_mapping, block_size, page_size, summary_group, stream);
      break;
    case at::kHalf:
      rocketkv::launch<__half>(kv_cache, key, value, slot_mapping, block_size, page_size, summary_group, stream);
      break;
    case at::kBFloat16:
      rocketkv::launch<__nv_bfloat16>(kv_cache, key, value, slot_mapping, block_size, page_size, summary_group, stream);
      break;
    default:
      TORCH_CHECK(false, "write_kv: unsupported cache dtype ", kv_cache.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
