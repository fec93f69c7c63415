// Python module rocketkv_vllm._C and the torch ops torch.ops.rocketkv.write_kv and torch.ops.rocketkv.hsa_topk.
#include <torch/extension.h>
#include <torch/library.h>

void write_kv_cuda(at::Tensor kv_cache, at::Tensor key, at::Tensor value, at::Tensor slot_mapping,
                   int64_t block_size, int64_t page_size, int64_t summary_group);

void hsa_topk_cuda(at::Tensor logits, at::Tensor stats, at::Tensor seq_lens, at::Tensor keep_lens,
                   at::Tensor gap_ends, at::Tensor top_pages, int64_t page_size, at::Tensor index, at::Tensor count,
                   at::Tensor keys, at::Tensor cand_key, at::Tensor cand_page, at::Tensor ticket, int64_t chunk,
                   const std::optional<at::Tensor>& newest, bool pdl);

TORCH_LIBRARY(rocketkv, m) {
  m.def(
      "write_kv(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping, int block_size, "
      "int page_size, int summary_group) -> ()");
  m.def(
      "hsa_topk(Tensor logits, Tensor stats, Tensor seq_lens, Tensor keep_lens, Tensor gap_ends, Tensor top_pages, "
      "int page_size, Tensor(a!) index, Tensor(b!) count, Tensor(c!) keys, Tensor(d!) cand_key, Tensor(e!) cand_page, "
      "Tensor(f!) ticket, int chunk, Tensor? newest_page, bool pdl) -> ()");
}

TORCH_LIBRARY_IMPL(rocketkv, CUDA, m) {
  m.impl("write_kv", &write_kv_cuda);
  m.impl("hsa_topk", &hsa_topk_cuda);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RocketKV CUDA kernels";
  m.def("write_kv", &write_kv_cuda, "KV store fused with the page max/min update (CUDA)", pybind11::arg("kv_cache"),
        pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("slot_mapping"), pybind11::arg("block_size"),
        pybind11::arg("page_size"), pybind11::arg("summary_group"));
}
