// RocketKV HSA top-k: from the page logits of the logits kernel (triton_hsa.py), each
// (request, KV head)'s top k live pages by group-softmax-mean score, in ascending page order,
// ties to the lower page. Same inputs, outputs and result as triton_hsa._hsa_topk_kernel
// (the Triton version stays the path without this extension); faster because a radix pass
// here is one shared-memory histogram of 8-bit digits and one warp's scan, where Triton's
// register tensors pay several block-wide reductions and barriers a pass.
//
// One CUDA block per chunk of a request's virtual pages (grid: batch x Hkv x chunks). A
// request of one chunk is selected there. A longer one: each chunk writes its own top k
// (the request's top k are among them) as candidates, and the block that takes the last
// arrival ticket selects the top k of those. Keys: the score's float bits as int32 (scores
// are >= 0, so the order is kept); -1 marks a page that cannot be chosen.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_scan.cuh>

#include "hsa_pages.cuh"

#include <cstdint>
#include <optional>
#include <utility>

namespace rocketkv {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxChunk = 4096;  // a chunk's keys, or the merge's keys and pages, live in shared memory
constexpr int kLoadsPerThread = kMaxChunk / kThreads;  // keys a thread loads, all issued before any is used
constexpr int kPerThread = 8;    // consecutive keys a thread takes when writing in page order
constexpr int kTile = kThreads * kPerThread;
constexpr int kBins = 256;       // 8-bit radix digits
constexpr int kMaxGroup = 64;    // query heads per KV head
constexpr int kEveryPage = 0x7fffffff;  // ops.reference.EVERY_PAGE: a row that attends every live page

using BlockScan = cub::BlockScan<int, kThreads>;

struct Shared {
  int key[kMaxChunk];
  int page[kMaxChunk];  // the merge's candidate pages
  int hist[kBins];
  int digit[4];  // the k-th key's digit, keys above its bucket, keys in its bucket; keys counted
  int last;      // this block took the last arrival ticket
  float m[kMaxGroup];
  float inv[kMaxGroup];
  typename BlockScan::TempStorage scan;
};

// The top k of a set of keys: those with key >> shift above threshold >> shift, then the
// first take_equal (in position order) with key >> shift equal to it.
struct Cut {
  int threshold;
  int shift;
  int take_equal;
};

// Histogram of key bits [lo, lo + 8) over the present keys whose bits above agree with
// threshold's. Plain shared-memory atomics: aggregating a warp's equal bins first
// (__match_any_sync) measured 3-8x slower on the H100 (2,900-8,500 vs 940-1,020 cycles a
// pass over 4,096 keys), private histograms per warp 1.4x slower.
template <class KeyAt>
__device__ void digit_histogram(const KeyAt& key_at, int n, int threshold, int hi, int lo, Shared& sh) {
  for (int i = threadIdx.x; i < kBins; i += kThreads) sh.hist[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int key = key_at(i);
    if (key >= 0 && (key >> hi) == (threshold >> hi)) atomicAdd(&sh.hist[(key >> lo) & (kBins - 1)], 1);
  }
  __syncthreads();
}

// Warp 0 finds the bin (scanning from the top) holding the `remaining`-th largest key.
__device__ void find_digit(int remaining, Shared& sh) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  int count[kBins / 32];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kBins / 32; ++j) {
    count[j] = sh.hist[kBins - 1 - (lane * (kBins / 32) + j)];
    sum += count[j];
  }
  int inclusive = sum;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) sh.digit[3] = inclusive;
  int above = inclusive - sum;
  if (above < remaining && inclusive >= remaining) {
#pragma unroll
    for (int j = 0; j < kBins / 32; ++j) {
      if (above + count[j] >= remaining) {
        sh.digit[0] = kBins - 1 - (lane * (kBins / 32) + j);
        sh.digit[1] = above;
        sh.digit[2] = count[j];
        break;
      }
      above += count[j];
    }
  }
}

// Takes every present key (keys are >= 0, so all lie above its bound).
constexpr Cut kAll{-1, 0, 0};

// The cut of the k largest of n keys (k >= 1; kAll when k covers the present keys): digits
// of 7, 8, 8 and 8 bits from the top, stopping once the k-th key's bucket is taken whole.
template <class KeyAt>
__device__ Cut radix_select(const KeyAt& key_at, int n, int k, Shared& sh) {
  Cut cut{0, 31, k};
  for (int lo = 24; lo >= 0; lo -= 8) {
    digit_histogram(key_at, n, cut.threshold, cut.shift, lo, sh);
    find_digit(cut.take_equal, sh);
    __syncthreads();
    const int digit = sh.digit[0], above = sh.digit[1], bucket = sh.digit[2], counted = sh.digit[3];
    __syncthreads();  // sh.digit and sh.hist are reused by the next pass
    if (lo == 24 && k >= counted) return kAll;
    cut.threshold |= digit << lo;
    cut.take_equal -= above;
    cut.shift = lo;
    if (bucket == cut.take_equal) break;
  }
  return cut;
}

// Appends value_at(i) for the chosen of n keys, in position order, at dst[slot]; chosen:
// key >> shift above the cut's, or among the first take_equal equal ones. Returns the count.
template <class KeyAt, class Emit>
__device__ int write_chosen(const KeyAt& key_at, int n, Cut cut, const Emit& emit, Shared& sh) {
  int above_seen = 0, equal_seen = 0;
  const int bound = cut.threshold >> cut.shift;
  for (int base = 0; base < n; base += kTile) {
    const int first = base + threadIdx.x * kPerThread;
    int flags[kPerThread];  // 2: above, 1: equal, 0: not chosen
    int above = 0, equal = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = first + j;
      const int key = i < n ? key_at(i) : -1;
      const int prefix = key >> cut.shift;
      flags[j] = key < 0 ? 0 : prefix > bound ? 2 : prefix == bound ? 1 : 0;
      above += flags[j] == 2;
      equal += flags[j] == 1;
    }
    int before, total;  // (above << 16) | equal, summed over the block's earlier threads (kTile < 2^16)
    BlockScan(sh.scan).ExclusiveSum((above << 16) | equal, before, total);
    __syncthreads();  // sh.scan is reused by the next tile
    int eq = equal_seen + (before & 0xffff);
    int slot = above_seen + (before >> 16) + min(eq, cut.take_equal);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (flags[j] == 2 || (flags[j] == 1 && eq < cut.take_equal)) emit(slot++, first + j);
      eq += flags[j] == 1;
    }
    above_seen += total >> 16;
    equal_seen += total & 0xffff;
  }
  return above_seen + min(equal_seen, cut.take_equal);
}

// The top k of n keys, in position order: all present ones when k covers them, none for k = 0.
template <class KeyAt, class Emit>
__device__ int select_and_write(const KeyAt& key_at, int n, int k, const Emit& emit, Shared& sh) {
  if (k <= 0) return 0;
  return write_chosen(key_at, n, radix_select(key_at, n, k, sh), emit, sh);
}

// Each query head's softmax max and 1 / (G * sum of exp) over all its logits, from the
// logits programs' partial statistics [.., NS, 2, G_P] (triton_hsa._combined_stats and
// _group_weights): a warp per head, each lane merging its parts online (loads independent).
__device__ __forceinline__ void merge_stats(float& m, float& s, float m_other, float s_other) {
  const float m_new = fmaxf(m, m_other);
  const float m_safe = m_new == -INFINITY ? 0.f : m_new;
  s = s * __expf(m - m_safe) + s_other * __expf(m_other - m_safe);
  m = m_new;
}

__device__ void group_weights(const float* __restrict__ stats, int64_t bh, int ns, int g_p, int group, Shared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int g = warp; g < group; g += kWarps) {
    const float* at = stats + bh * ns * 2 * g_p + g;
    float m = -INFINITY, s = 0.f;
#pragma unroll 4
    for (int i = lane; i < ns; i += 32) merge_stats(m, s, at[i * 2 * g_p], at[i * 2 * g_p + g_p]);
    for (int d = 16; d > 0; d /= 2)
      merge_stats(m, s, __shfl_xor_sync(0xffffffffu, m, d), __shfl_xor_sync(0xffffffffu, s, d));
    if (lane == 0) {
      const bool ok = s > 0.f;
      sh.m[g] = ok ? m : 0.f;
      sh.inv[g] = ok ? 1.f / s / group : 0.f;
    }
  }
  __syncthreads();
}

// The count of a list of `written` pages once the row's newest page (newest[b]; -1 or no
// newest: none) is appended at idx[written] (ops/newest_page.py). Thread 0 alone.
__device__ __forceinline__ int with_newest(int* idx, int written, const int* __restrict__ newest, int64_t b,
                                           int64_t npv) {
  const int page = newest != nullptr ? newest[b] : -1;
  if (page < 0 || written >= npv) return written;
  idx[written] = page;
  return written + 1;
}

__global__ void __launch_bounds__(kThreads) hsa_topk_kernel(
    const int* __restrict__ seq_lens, const int* __restrict__ keep_lens, const int* __restrict__ gap_ends,
    const int* __restrict__ top_pages, const float* __restrict__ logits, const float* __restrict__ stats,
    int* __restrict__ keys, int* __restrict__ cand_key, int* __restrict__ cand_page, int* __restrict__ ticket,
    int* __restrict__ index, int* __restrict__ count, const int* __restrict__ newest, int64_t npv, int ns, int g_p,
    int group, int page_size, int chunk) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, hkv = gridDim.y, bh = b * hkv + blockIdx.y;
  const int part = blockIdx.z;
  const Pages pages(seq_lens[b], keep_lens[b], gap_ends[b], page_size, npv);
  const int n = pages.n, k = max(top_pages[b], 0);
  const int parts = (n + chunk - 1) / chunk;
  int* idx = index + bh * npv;
#if __CUDA_ARCH__ >= 900
  // launched as a programmatic dependent of the logits kernel: its outputs are read from here
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  if (k >= n) {  // every live page is chosen: nothing to score
    if (part != 0) return;
    if (k == kEveryPage) {  // no list: the attention enumerates the live pages itself
      if (threadIdx.x == 0) count[bh] = 0;
      return;
    }
    const auto live_key = [&](int v) { return pages.live(v) ? 0 : -1; };
    const auto emit = [&](int slot, int v) { idx[slot] = pages.logical(v); };
    const int written = write_chosen(live_key, n, kAll, emit, sh);
    if (threadIdx.x == 0) count[bh] = with_newest(idx, written, newest, b, npv);
    return;
  }
  if (part >= parts) return;

  // this chunk's keys, into shared memory (and to `keys`, for hsa_page_scores)
  group_weights(stats, bh, ns, g_p, group, sh);
  const int v0 = part * chunk, here = min(chunk, n - v0);
  float score[kLoadsPerThread] = {};
#pragma unroll 4
  for (int g = 0; g < group; ++g) {
    const float* row = logits + (bh * group + g) * npv + v0;
    const float m = sh.m[g], inv = sh.inv[g];
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int c = threadIdx.x + j * kThreads;
      if (c < here) score[j] += __expf(row[c] - m) * inv;
    }
  }
#pragma unroll
  for (int j = 0; j < kLoadsPerThread; ++j) {
    const int c = threadIdx.x + j * kThreads;
    if (c >= chunk) break;
    const int key = c < here && pages.live(v0 + c) ? __float_as_int(score[j] == score[j] ? score[j] : 0.f) : -1;
    sh.key[c] = key;
    if (c < here) keys[bh * npv + v0 + c] = key;
  }
  __syncthreads();
  const auto chunk_key = [&](int c) { return sh.key[c]; };

  if (parts == 1) {
    const auto emit = [&](int slot, int c) { idx[slot] = pages.logical(v0 + c); };
    const int written = select_and_write(chunk_key, here, k, emit, sh);
    if (threadIdx.x == 0) count[bh] = with_newest(idx, written, newest, b, npv);
    return;
  }
  // candidates: `per` slots a chunk, its chosen in page order, then absent keys
  const int per = min(k, chunk);
  const int64_t cands = bh * ((npv + chunk - 1) / chunk) * chunk;
  int* my_key = cand_key + cands + static_cast<int64_t>(part) * per;
  int* my_page = cand_page + cands + static_cast<int64_t>(part) * per;
  const auto emit = [&](int slot, int c) {
    my_key[slot] = sh.key[c];
    my_page[slot] = pages.logical(v0 + c);
  };
  const int taken = select_and_write(chunk_key, here, k, emit, sh);
  for (int s = taken + threadIdx.x; s < per; s += kThreads) my_key[s] = -1;
  __threadfence();  // the candidates are visible device-wide before the ticket is taken
  __syncthreads();
  if (threadIdx.x == 0) sh.last = atomicAdd(ticket + bh, 1) == parts - 1;
  __syncthreads();
  if (!sh.last) return;
  __threadfence();
  // the last chunk to arrive: the top k of all chunks' candidates (in page order, chunk by
  // chunk), read past L1 since other SMs wrote them; in shared memory when they fit
  const int total = parts * per;
  const int* all_key = cand_key + cands;
  const int* all_page = cand_page + cands;
  int written;
  if (total <= kMaxChunk) {
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i < total) {
        sh.key[i] = __ldcg(all_key + i);
        sh.page[i] = __ldcg(all_page + i);
      }
    }
    __syncthreads();
    const auto emit = [&](int slot, int i) { idx[slot] = sh.page[i]; };
    written = select_and_write(chunk_key, total, k, emit, sh);
  } else {
    const auto global_key = [&](int i) { return __ldcg(all_key + i); };
    const auto emit = [&](int slot, int i) { idx[slot] = __ldcg(all_page + i); };
    written = select_and_write(global_key, total, k, emit, sh);
  }
  if (threadIdx.x == 0) count[bh] = with_newest(idx, written, newest, b, npv);
}

void check_int32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kInt && t.is_contiguous(), "hsa_topk: ", name,
              " must be a contiguous int32 CUDA tensor");
}

}  // namespace
}  // namespace rocketkv

void hsa_topk_cuda(at::Tensor logits, at::Tensor stats, at::Tensor seq_lens, at::Tensor keep_lens,
                   at::Tensor gap_ends, at::Tensor top_pages, int64_t page_size, at::Tensor index, at::Tensor count,
                   at::Tensor keys, at::Tensor cand_key, at::Tensor cand_page, at::Tensor ticket, int64_t chunk,
                   const std::optional<at::Tensor>& newest, bool pdl) {
  using namespace rocketkv;
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.dim() == 4,
              "hsa_topk: logits must be a contiguous float32 CUDA tensor [rows, Hkv, G, P]");
  TORCH_CHECK(stats.is_cuda() && stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 5 &&
                  stats.size(3) == 2,
              "hsa_topk: stats must be a contiguous float32 CUDA tensor [rows, Hkv, parts, 2, G_P]");
  for (const auto& [t, name] : {std::pair{&seq_lens, "seq_lens"}, {&keep_lens, "keep"}, {&gap_ends, "gap_end"},
                                {&top_pages, "top_pages"}, {&index, "index"}, {&count, "count"}, {&keys, "keys"},
                                {&cand_key, "cand_key"}, {&cand_page, "cand_page"}, {&ticket, "ticket"}})
    check_int32(*t, name);
  const int64_t batch = index.size(0), hkv = index.size(1), group = logits.size(2), npv = logits.size(3);
  TORCH_CHECK(index.dim() == 3 && index.size(2) == npv && count.numel() == batch * hkv, "hsa_topk: index/count shape");
  TORCH_CHECK(logits.size(0) >= batch && logits.size(1) == hkv && stats.size(0) >= batch && stats.size(1) == hkv &&
                  stats.size(4) >= group && keys.numel() >= batch * hkv * npv && ticket.numel() >= batch * hkv,
              "hsa_topk: scratch shapes do not match the batch");
  TORCH_CHECK(seq_lens.numel() >= batch && keep_lens.numel() >= batch && gap_ends.numel() >= batch &&
                  top_pages.numel() >= batch,
              "hsa_topk: per-request tensors shorter than the batch");
  TORCH_CHECK(group >= 1 && group <= kMaxGroup, "hsa_topk: at most ", kMaxGroup, " query heads per KV head");
  TORCH_CHECK(chunk >= 1 && chunk <= kMaxChunk && (chunk & (chunk - 1)) == 0, "hsa_topk: chunk must be a power of two <= ",
              kMaxChunk);
  TORCH_CHECK(page_size >= 1, "hsa_topk: page_size must be positive");
  const int64_t parts = (npv + chunk - 1) / chunk;
  TORCH_CHECK(cand_key.numel() >= batch * hkv * parts * chunk && cand_page.numel() >= batch * hkv * parts * chunk,
              "hsa_topk: candidate buffers too small");
  TORCH_CHECK(hkv <= 65535 && parts <= 65535, "hsa_topk: grid too large");
  if (newest) {
    check_int32(*newest, "newest_page");
    TORCH_CHECK(newest->numel() >= batch, "hsa_topk: newest_page shorter than the batch");
  }
  if (batch == 0 || hkv == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  // programmatic dependent launch (pdl): the launch and the per-request prologue overlap the end
  // of the logits kernel (the kernel waits, griddepcontrol.wait, before reading its outputs; a
  // no-op without it). Off where the caller plans without it (SelectionPlan.pdl).
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(batch), static_cast<unsigned>(hkv), static_cast<unsigned>(parts));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute dependent;
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &dependent;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, logits.device().index()));
  config.numAttrs = pdl && major >= 9 ? 1 : 0;  // sm_90+ only
  C10_CUDA_CHECK(cudaLaunchKernelEx(
      &config, hsa_topk_kernel, seq_lens.data_ptr<int>(), keep_lens.data_ptr<int>(), gap_ends.data_ptr<int>(), top_pages.data_ptr<int>(),
      logits.data_ptr<float>(), stats.data_ptr<float>(), keys.data_ptr<int>(), cand_key.data_ptr<int>(),
      cand_page.data_ptr<int>(), ticket.data_ptr<int>(), index.data_ptr<int>(), count.data_ptr<int>(),
      newest ? newest->data_ptr<int>() : nullptr, npv,
      static_cast<int>(stats.size(2)), static_cast<int>(stats.size(4)), static_cast<int>(group),
      static_cast<int>(page_size), static_cast<int>(chunk)));
}
