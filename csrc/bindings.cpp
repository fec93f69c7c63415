// Python module rocketkv_vllm._C and the torch op torch.ops.rocketkv.write_kv.
#include <torch/extension.h>
#include <torch/library.h>

void write_kv_cuda(at::Tensor kv_cache, at::Tensor key, at::Tensor value, at::Tensor slot_mapping,
                   int64_t block_size, int64_t page_size, int64_t summary_group);

TORCH_LIBRARY(rocketkv, m) {
  m.def(
      "write_kv(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping, int block_size, "
      "int page_size, int summary_group) -> ()");
}

TORCH_LIBRARY_IMPL(rocketkv, CUDA, m) { m.impl("write_kv", &write_kv_cuda); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RocketKV CUDA kernels";
  m.def("write_kv", &write_kv_cuda, "KV store fused with the page max/min update (CUDA)", pybind11::arg("kv_cache"),
        pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("slot_mapping"), pybind11::arg("block_size"),
        pybind11::arg("page_size"), pybind11::arg("summary_group"));
}
