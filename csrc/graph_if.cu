// Conditional work inside a CUDA graph capture: rocketkv::capture_if_begin / capture_if_end.
//
// A full-CUDA-graph decode step is captured once for whatever rows later steps hold, so it
// launches every layer's page selection even in steps where no row selects pages (dense
// rows: the kernels exit at once, but each launch still costs ~2 us). Between begin and end,
// the work launched on the current stream goes into the body of an IF node instead (CUDA
// 12.4+ conditional nodes), which runs at replay only when some values[i] != sentinel: a
// one-block setter kernel, launched before the node, decides from the step's data.
//
// The body is captured on a side stream (cudaStreamBeginCaptureToGraph) made the current
// stream meanwhile, so Triton and torch launches land in it; its allocations, if any, come
// from a memory pool of its own that is never released (the graph's replays use them).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <map>
#include <vector>

#if defined(CUDART_VERSION) && CUDART_VERSION >= 12040
#define ROCKETKV_HAS_CONDITIONAL_NODES 1
#endif

namespace rocketkv {

#ifdef ROCKETKV_HAS_CONDITIONAL_NODES
namespace {

__global__ void set_if_any_differs(cudaGraphConditionalHandle handle, const int* values, int n, int sentinel) {
  int any = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) any |= values[i] != sentinel;
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) cudaGraphSetConditional(handle, any ? 1u : 0u);
}

struct OpenBody {
  c10::cuda::CUDAStream outer;
  c10::cuda::CUDAStream body;
  cudaGraphNode_t node;
};

thread_local std::vector<OpenBody> open_bodies;  // at most one: bodies do not nest (one side stream)

cudaStream_t body_stream(c10::DeviceIndex device) {
  // one per device, made by capture_if_prepare before vLLM's captures (else on first use) and
  // kept: a pool stream could be in use elsewhere
  static std::map<c10::DeviceIndex, cudaStream_t> streams;
  auto found = streams.find(device);
  if (found != streams.end()) return found->second;
  cudaStream_t stream;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return streams[device] = stream;
}

c10::MempoolId_t body_pool() {
  static const c10::MempoolId_t pool = at::cuda::graph_pool_handle();
  return pool;
}

void capture_info(cudaStream_t stream, cudaStreamCaptureStatus* status, unsigned long long* id, cudaGraph_t* graph,
                  const cudaGraphNode_t** deps, const cudaGraphEdgeData** edges, size_t* num_deps) {
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, status, id, graph, deps, edges, num_deps));
#else
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo_v3(stream, status, id, graph, deps, edges, num_deps));
#endif
}

}  // namespace

void capture_if_begin(at::Tensor values, int64_t sentinel) {
  TORCH_CHECK(values.is_cuda() && values.scalar_type() == at::kInt && values.dim() == 1 && values.is_contiguous(),
              "capture_if_begin: values must be a contiguous 1-D int32 CUDA tensor");
  TORCH_CHECK(open_bodies.empty(), "capture_if_begin: conditional bodies do not nest");
  const c10::cuda::CUDAGuard guard(values.device());
  const c10::DeviceIndex device = values.device().index();
  const auto outer = c10::cuda::getCurrentCUDAStream(device);
  cudaStreamCaptureStatus status;
  cudaGraph_t graph;
  capture_info(outer.stream(), &status, nullptr, &graph, nullptr, nullptr, nullptr);
  TORCH_CHECK(status == cudaStreamCaptureStatusActive, "capture_if_begin outside a CUDA graph capture");

  cudaGraphConditionalHandle handle;
  C10_CUDA_CHECK(cudaGraphConditionalHandleCreate(&handle, graph, 0, cudaGraphCondAssignDefault));
  set_if_any_differs<<<1, 256, 0, outer.stream()>>>(handle, values.data_ptr<int>(), static_cast<int>(values.numel()),
                                                    static_cast<int>(sentinel));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const cudaGraphNode_t* deps;
  const cudaGraphEdgeData* edges;
  size_t num_deps;
  capture_info(outer.stream(), &status, nullptr, &graph, &deps, &edges, &num_deps);
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = handle;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t node;
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaGraphAddNode(&node, graph, deps, edges, num_deps, &params));
#else
  C10_CUDA_CHECK(cudaGraphAddNode_v2(&node, graph, deps, edges, num_deps, &params));
#endif

  const cudaStream_t side = body_stream(device);
  C10_CUDA_CHECK(cudaStreamBeginCaptureToGraph(side, params.conditional.phGraph_out[0], nullptr, nullptr, 0,
                                               cudaStreamCaptureModeRelaxed));
  unsigned long long body_id = 0;
  const cudaError_t info = cudaStreamGetCaptureInfo(side, &status, &body_id);
  if (info != cudaSuccess) {  // (leave no side capture open behind the error)
    cudaGraph_t abandoned;
    (void)cudaStreamEndCapture(side, &abandoned);
    C10_CUDA_CHECK(info);
  }
  c10::cuda::CUDACachingAllocator::beginAllocateToPool(device, body_pool(), [body_id](cudaStream_t stream) {
    cudaStreamCaptureStatus s;
    unsigned long long id;
    if (cudaStreamGetCaptureInfo(stream, &s, &id) != cudaSuccess) {
      (void)cudaGetLastError();  // (e.g. the legacy stream during a capture: not ours, and no error left behind)
      return false;
    }
    return s == cudaStreamCaptureStatusActive && id == body_id;
  });
  const auto body = c10::cuda::getStreamFromExternal(side, device);
  open_bodies.push_back({outer, body, node});
  c10::cuda::setCurrentCUDAStream(body);
}

void capture_if_end() {
  TORCH_CHECK(!open_bodies.empty(), "capture_if_end without capture_if_begin");
  const OpenBody open = open_bodies.back();
  open_bodies.pop_back();
  const c10::DeviceIndex device = open.outer.device_index();
  c10::cuda::CUDACachingAllocator::endAllocateToPool(device, body_pool());
  c10::cuda::setCurrentCUDAStream(open.outer);
  cudaGraph_t body;
  C10_CUDA_CHECK(cudaStreamEndCapture(open.body.stream(), &body));
  cudaGraphNode_t node = open.node;
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaStreamUpdateCaptureDependencies(open.outer.stream(), &node, nullptr, 1,
                                                     cudaStreamSetCaptureDependencies));
#else
  C10_CUDA_CHECK(cudaStreamUpdateCaptureDependencies_v2(open.outer.stream(), &node, nullptr, 1,
                                                        cudaStreamSetCaptureDependencies));
#endif
}

void capture_if_prepare(int64_t device) { body_stream(static_cast<c10::DeviceIndex>(device)); }

#else  // CUDA < 12.4: no conditional nodes

void capture_if_prepare(int64_t) {}
void capture_if_begin(at::Tensor, int64_t) { TORCH_CHECK(false, "conditional CUDA graph nodes need CUDA 12.4+"); }
void capture_if_end() { TORCH_CHECK(false, "conditional CUDA graph nodes need CUDA 12.4+"); }

#endif

}  // namespace rocketkv

bool capture_if_supported() {
#ifdef ROCKETKV_HAS_CONDITIONAL_NODES
  int driver = 0;  // conditional nodes need the driver's support as well as the toolkit's
  return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12040;
#else
  return false;
#endif
}

void capture_if_prepare_cuda(int64_t device) { rocketkv::capture_if_prepare(device); }
void capture_if_begin_cuda(at::Tensor values, int64_t sentinel) { rocketkv::capture_if_begin(values, sentinel); }
void capture_if_end_cuda() { rocketkv::capture_if_end(); }
