// A request's live pages as the HSA kernels enumerate them ("virtual" pages: the kept prompt
// pages [0, nk), then the pages from the one holding gap_end on), as in triton_common.py's
// virtual_pages / pages_in_table / logical_page / page_len.
#pragma once

#include <cstdint>

namespace rocketkv {

struct Pages {
  int seq, keep, gap, ps;
  int nk;    // kept prompt pages
  int tail;  // first logical page after the evicted gap
  int n;     // virtual pages, cut where the block table (npv logical pages) ends

  __device__ Pages(int seq_, int keep_, int gap_, int ps_, int64_t npv) : seq(seq_), keep(keep_), gap(gap_), ps(ps_) {
    nk = (keep + ps - 1) / ps;
    tail = max(nk, gap / ps);
    const int all = nk + max((seq + ps - 1) / ps - tail, 0);
    n = static_cast<int>(min(min(static_cast<int64_t>(all), npv), static_cast<int64_t>(nk) + max(npv - tail, int64_t{0})));
  }
  __device__ int logical(int v) const { return v < nk ? v : tail + v - nk; }
  // live tokens of logical page p: [0, min(keep, seq)) and [max(gap, keep), seq) meet it
  __device__ int length(int p) const {
    const int64_t start = static_cast<int64_t>(p) * ps, end = start + ps;
    const int64_t before_keep = max(min(end, static_cast<int64_t>(min(keep, seq))) - start, int64_t{0});
    const int64_t after_gap =
        max(min(end, static_cast<int64_t>(seq)) - max(start, static_cast<int64_t>(max(gap, keep))), int64_t{0});
    return static_cast<int>(before_keep + after_gap);
  }
  __device__ bool live(int v) const { return length(logical(v)) > 0; }
};

}  // namespace rocketkv
