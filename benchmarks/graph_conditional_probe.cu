// What a CUDA-graph conditional node costs against the launches it would skip.
//
// A full-graph decode step launches, per layer, the page selection's three kernels (prep,
// logits, top-k) even when no row selects pages (they exit at once). This builds 32 layers of
// write -> [selection] -> attention -> reduce as one graph by stream capture and times replays:
//   floor         no selection kernels
//   three_empty   the three selection kernels, exiting at once (today's full graph)
//   if_skip/if_run  a setter kernel (any top_pages != EVERY) then an IF node holding the three
//                 kernels, captured into its body on a side stream (cudaStreamBeginCaptureToGraph)
//   fused_skip/fused_run  the write kernel sets the condition itself (no setter launch)
//   shared_skip/shared_run  one setter kernel per step sets every layer's condition
//   pdl_skip/pdl_run  as if_*, the body's second kernel launched programmatically dependent
//                 (Triton's launch_pdl): whether such an edge is allowed inside a body
// Each: median and range of 3 repeats of 200 replays (CUDA events), per layer in microseconds.
//
//   nvcc -O2 -std=c++17 -arch=sm_90 benchmarks/graph_conditional_probe.cu -o /tmp/probe && /tmp/probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e = (x);                                                                \
    if (e != cudaSuccess) {                                                             \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));     \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

constexpr int kLayers = 32, kEvery = -1, kRows = 1, kKvHeads = 8;
constexpr size_t kAttnFloats = 1 << 20;  // 4 MiB read by each layer's "attention"

__global__ void write_kernel(float* cache, const float* src) { cache[threadIdx.x] = src[threadIdx.x] + 1.f; }

__global__ void write_and_set(float* cache, const float* src, cudaGraphConditionalHandle h, const int* top_pages,
                              int rows) {
  cache[threadIdx.x] = src[threadIdx.x] + 1.f;
  int any = threadIdx.x < rows && top_pages[threadIdx.x] != kEvery;
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) cudaGraphSetConditional(h, any);
}

__global__ void set_condition(cudaGraphConditionalHandle h, const int* top_pages, int rows) {
  int any = threadIdx.x < rows && top_pages[threadIdx.x] != kEvery;
  any = __syncthreads_or(any);
  if (threadIdx.x == 0) cudaGraphSetConditional(h, any);
}

// a selection kernel of a dense row: reads its budget and exits
__global__ void selection_kernel(const int* top_pages, int* out) {
  if (top_pages[blockIdx.x % kRows] == kEvery) return;
  out[blockIdx.x] = 1;
}

__global__ void attention_kernel(const float4* kv, float* partial) {
  float acc = 0.f;
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < kAttnFloats / 4; i += gridDim.x * blockDim.x) {
    float4 v = kv[i];
    acc += v.x + v.y + v.z + v.w;
  }
  if (acc == 12345.f) partial[blockIdx.x] = acc;
}

__global__ void reduce_kernel(const float* partial, float* out) { out[threadIdx.x] = partial[threadIdx.x] * 0.5f; }

struct Buffers {
  float *cache, *src, *partial, *out;
  float4* kv;
  int *top_pages, *sel_out;
};

enum class Variant { floor, three_empty, if_node, fused, shared, pdl };

struct Handles {
  cudaGraphConditionalHandle h[kLayers];
};

__global__ void set_all(Handles handles, const int* top_pages, int rows) {
  int any = threadIdx.x < rows && top_pages[threadIdx.x] != kEvery;
  any = __syncthreads_or(any);
  if (threadIdx.x < kLayers) cudaGraphSetConditional(handles.h[threadIdx.x], any);
}

static void selection_kernels(const Buffers& b, cudaStream_t s, bool pdl = false) {
  selection_kernel<<<kRows * kKvHeads, 128, 0, s>>>(b.top_pages, b.sel_out);
  if (pdl) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(kRows * kKvHeads * 16);
    config.blockDim = dim3(128);
    config.stream = s;
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    CHECK(cudaLaunchKernelEx(&config, selection_kernel, (const int*)b.top_pages, b.sel_out));
  } else {
    selection_kernel<<<kRows * kKvHeads * 16, 128, 0, s>>>(b.top_pages, b.sel_out);
  }
  selection_kernel<<<kRows * kKvHeads, 512, 0, s>>>(b.top_pages, b.sel_out);
}

// the three selection kernels inside an IF node on `h`, captured from `s` (capturing) via `side`
static void selection_if(const Buffers& b, cudaStream_t s, cudaStream_t side, cudaGraphConditionalHandle h,
                         bool pdl = false) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph;
  const cudaGraphNode_t* deps;
  const cudaGraphEdgeData* edges;
  size_t ndeps;
  CHECK(cudaStreamGetCaptureInfo(s, &status, nullptr, &graph, &deps, &edges, &ndeps));
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = h;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t node;
  CHECK(cudaGraphAddNode(&node, graph, deps, edges, ndeps, &params));
  cudaGraph_t body = params.conditional.phGraph_out[0];
  CHECK(cudaStreamBeginCaptureToGraph(side, body, nullptr, nullptr, 0, cudaStreamCaptureModeRelaxed));
  selection_kernels(b, side, pdl);
  cudaGraph_t ended;
  CHECK(cudaStreamEndCapture(side, &ended));
  CHECK(cudaStreamUpdateCaptureDependencies(s, &node, nullptr, 1, cudaStreamSetCaptureDependencies));
}

static cudaGraphExec_t build(Variant v, const Buffers& b, cudaStream_t s, cudaStream_t side) {
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
  Handles all = {};
  if (v == Variant::shared) {
    cudaStreamCaptureStatus status;
    cudaGraph_t graph;
    CHECK(cudaStreamGetCaptureInfo(s, &status, nullptr, &graph));
    for (int layer = 0; layer < kLayers; ++layer)
      CHECK(cudaGraphConditionalHandleCreate(&all.h[layer], graph, 0, cudaGraphCondAssignDefault));
    set_all<<<1, 256, 0, s>>>(all, b.top_pages, kRows);
  }
  for (int layer = 0; layer < kLayers; ++layer) {
    cudaGraphConditionalHandle h = 0;
    if (v == Variant::if_node || v == Variant::fused || v == Variant::pdl) {
      cudaStreamCaptureStatus status;
      cudaGraph_t graph;
      CHECK(cudaStreamGetCaptureInfo(s, &status, nullptr, &graph));
      CHECK(cudaGraphConditionalHandleCreate(&h, graph, 0, cudaGraphCondAssignDefault));
    }
    if (v == Variant::fused) {
      write_and_set<<<1, 256, 0, s>>>(b.cache, b.src, h, b.top_pages, kRows);
    } else {
      write_kernel<<<1, 256, 0, s>>>(b.cache, b.src);
    }
    if (v == Variant::three_empty) selection_kernels(b, s);
    if (v == Variant::if_node || v == Variant::pdl) {
      set_condition<<<1, 256, 0, s>>>(h, b.top_pages, kRows);
      selection_if(b, s, side, h, v == Variant::pdl);
    }
    if (v == Variant::shared) selection_if(b, s, side, all.h[layer]);
    if (v == Variant::fused) selection_if(b, s, side, h);
    attention_kernel<<<528, 256, 0, s>>>(b.kv, b.partial);
    reduce_kernel<<<1, 256, 0, s>>>(b.partial, b.out);
  }
  cudaGraph_t graph;
  CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec;
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphDestroy(graph));
  return exec;
}

static void time_it(const char* name, cudaGraphExec_t exec, cudaStream_t s) {
  for (int i = 0; i < 20; ++i) CHECK(cudaGraphLaunch(exec, s));
  CHECK(cudaStreamSynchronize(s));
  std::vector<float> per_layer_us;
  for (int r = 0; r < 3; ++r) {
    cudaEvent_t a, z;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&z));
    CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < 200; ++i) CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(z, s));
    CHECK(cudaEventSynchronize(z));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, z));
    per_layer_us.push_back(ms * 1000.f / 200 / kLayers);
  }
  std::sort(per_layer_us.begin(), per_layer_us.end());
  std::printf("{\"variant\": \"%s\", \"us_per_layer_median\": %.3f, \"min\": %.3f, \"max\": %.3f}\n", name, per_layer_us[1],
              per_layer_us[0], per_layer_us[2]);
}

int main() {
  Buffers b;
  CHECK(cudaMalloc(&b.cache, 1024 * sizeof(float)));
  CHECK(cudaMalloc(&b.src, 1024 * sizeof(float)));
  CHECK(cudaMalloc(&b.partial, 1024 * sizeof(float)));
  CHECK(cudaMalloc(&b.out, 1024 * sizeof(float)));
  CHECK(cudaMalloc(&b.kv, kAttnFloats * sizeof(float)));
  CHECK(cudaMalloc(&b.top_pages, 256 * sizeof(int)));
  CHECK(cudaMalloc(&b.sel_out, 65536 * sizeof(int)));
  CHECK(cudaMemset(b.kv, 0, kAttnFloats * sizeof(float)));
  cudaStream_t s, side;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  std::vector<int> dense(256, kEvery), sparse(256, 100);
  auto set_rows = [&](const std::vector<int>& v) {
    CHECK(cudaMemcpy(b.top_pages, v.data(), v.size() * sizeof(int), cudaMemcpyHostToDevice));
  };
  cudaGraphExec_t floor_g = build(Variant::floor, b, s, side), three = build(Variant::three_empty, b, s, side),
                  ifn = build(Variant::if_node, b, s, side), fused = build(Variant::fused, b, s, side),
                  shared = build(Variant::shared, b, s, side);
  set_rows(dense);
  time_it("floor", floor_g, s);
  time_it("three_empty", three, s);
  time_it("if_skip", ifn, s);
  time_it("fused_skip", fused, s);
  time_it("shared_skip", shared, s);
  set_rows(sparse);
  time_it("three_selecting", three, s);
  time_it("if_run", ifn, s);
  time_it("fused_run", fused, s);
  time_it("shared_run", shared, s);
  // the IF body really runs only when some row selects
  CHECK(cudaMemset(b.sel_out, 0, 65536 * sizeof(int)));
  set_rows(dense);
  CHECK(cudaGraphLaunch(ifn, s));
  int flag = -1;
  CHECK(cudaMemcpyAsync(&flag, b.sel_out, sizeof(int), cudaMemcpyDeviceToHost, s));
  CHECK(cudaStreamSynchronize(s));
  int skipped = flag == 0;
  set_rows(sparse);
  CHECK(cudaGraphLaunch(fused, s));
  CHECK(cudaMemcpyAsync(&flag, b.sel_out, sizeof(int), cudaMemcpyDeviceToHost, s));
  CHECK(cudaStreamSynchronize(s));
  std::printf("{\"body_skipped_when_dense\": %s, \"body_ran_when_selecting\": %s}\n", skipped ? "true" : "false",
              flag == 1 ? "true" : "false");
  // last: a programmatic edge inside a body may be refused (CHECK then exits)
  cudaGraphExec_t pdl = build(Variant::pdl, b, s, side);
  set_rows(dense);
  time_it("pdl_skip", pdl, s);
  set_rows(sparse);
  time_it("pdl_run", pdl, s);
  return 0;
}
