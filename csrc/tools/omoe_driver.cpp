// omoe_driver: runs the compiled omoe ops (forward, then backward) at a docs/contract.md §6
// shape and prints their median times, so the kernels can be profiled on their own:
//
//   nsys profile -o omoe ./omoe_driver --shape llama7b
//   ncu --set full -k regex:token_ ./omoe_driver --shape llama7b-top2 --iters 1 --warmup 1
//
// Options: --shape cpu|llama7b|llama7b-top2|wide, --device cuda|cpu, --tokens T,
// --iters N, --warmup N, --dtype fp32|bf16|fp16, --check (compares with the CPU ops in
// float64 on the same inputs). Without a GPU (or a CUDA build) it runs on the CPU, where
// the default shape is `cpu`. It calls the ops through the dispatcher, as Python does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#ifdef OMOE_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#if __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define OMOE_HAVE_NVTX 1
#endif
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Shape {
  const char* name;
  int64_t tokens, d_model, experts, rank, top_k;  // top_k == experts: dense
  at::ScalarType dtype;
};

// docs/contract.md §6.
const Shape kShapes[] = {
    {"cpu", 4096, 1024, 4, 16, 4, at::kFloat},
    {"llama7b", 8192, 4096, 4, 16, 4, at::kBFloat16},
    {"llama7b-top2", 8192, 4096, 8, 16, 2, at::kBFloat16},
    {"wide", 8192, 4096, 16, 8, 2, at::kBFloat16},
};

using ForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

struct Ops {
  c10::TypedOperatorHandle<ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const OptTensor&, const OptTensor&,
                                      double, int64_t, bool, bool, double)>
      forward;
  c10::TypedOperatorHandle<BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const OptTensor&,
                                       const at::Tensor&, const at::Tensor&, double, int64_t,
                                       bool, bool, double)>
      backward;
};

Ops find_ops() {
  auto& dispatcher = c10::Dispatcher::singleton();
  return Ops{dispatcher.findSchemaOrThrow("omoe::forward", "")
                 .typed<ForwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, const OptTensor&,
                                   double, int64_t, bool, bool, double)>(),
             dispatcher.findSchemaOrThrow("omoe::backward", "")
                 .typed<BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const OptTensor&,
                                    const at::Tensor&, const at::Tensor&, double, int64_t, bool,
                                    bool, double)>()};
}

bool cuda_usable() {
#ifdef OMOE_WITH_CUDA
  return at::hasCUDA();
#else
  return false;
#endif
}

void synchronize(const at::Device& device) {
#ifdef OMOE_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

struct Range {  // an NVTX range around a timed region, so nsys shows the phases
  explicit Range(const char* name) {
#ifdef OMOE_HAVE_NVTX
    nvtxRangePushA(name);
#else
    (void)name;
#endif
  }
  ~Range() {
#ifdef OMOE_HAVE_NVTX
    nvtxRangePop();
#endif
  }
};

struct Inputs {
  at::Tensor x, A, B, W, base, grad_y;
};

Inputs make_inputs(const Shape& s, const at::TensorOptions& opt) {
  const auto f32 = opt.dtype(at::kFloat);
  const double d = double(s.d_model);
  Inputs in;
  in.x = at::randn({s.tokens, s.d_model}, f32).to(opt);
  in.A = (at::randn({s.experts, s.rank, s.d_model}, f32) / std::sqrt(d)).to(opt);
  in.B = (at::randn({s.experts, s.d_model, s.rank}, f32) / std::sqrt(double(s.rank))).to(opt);
  in.W = (at::randn({s.experts, s.d_model}, f32) / std::sqrt(d)).to(opt);
  in.base = at::randn({s.tokens, s.d_model}, f32).to(opt);
  in.grad_y = at::randn({s.tokens, s.d_model}, f32).to(opt);
  return in;
}

struct Options {
  double scaling = 2.0, eps = 1e-6;
  bool orthogonalize = true, normalize = true;
};

BackwardOut run_backward(const Ops& ops, const Inputs& in, const ForwardOut& fwd,
                         const Shape& s, const Options& o) {
  return ops.backward.call(in.grad_y, in.x, in.A, in.B, in.W, std::nullopt, std::get<1>(fwd),
                           std::get<2>(fwd), o.scaling, s.top_k, o.orthogonalize, o.normalize,
                           o.eps);
}

ForwardOut run_forward(const Ops& ops, const Inputs& in, const Shape& s, const Options& o) {
  return ops.forward.call(in.x, in.A, in.B, in.W, std::nullopt, in.base, o.scaling, s.top_k,
                          o.orthogonalize, o.normalize, o.eps);
}

double median_ms(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double relative_error(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kCPU, at::kDouble), w = want.to(at::kCPU, at::kDouble);
  return (g - w).norm().item<double>() / std::max(w.norm().item<double>(), 1e-300);
}

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "omoe_driver: %s\nusage: omoe_driver [--shape cpu|llama7b|llama7b-top2|wide] "
               "[--device cuda|cpu] [--tokens T] [--iters N] [--warmup N] "
               "[--dtype fp32|bf16|fp16] [--check]\n",
               why);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::string shape_name, device_name = cuda_usable() ? "cuda" : "cpu", dtype_name;
  int64_t tokens = 0, iters = 20, warmup = 3;
  bool check = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
      return argv[++i];
    };
    if (arg == "--shape") shape_name = value();
    else if (arg == "--device") device_name = value();
    else if (arg == "--tokens") tokens = std::atoll(value().c_str());
    else if (arg == "--iters") iters = std::atoll(value().c_str());
    else if (arg == "--warmup") warmup = std::atoll(value().c_str());
    else if (arg == "--dtype") dtype_name = value();
    else if (arg == "--check") check = true;
    else usage(("unknown argument " + arg).c_str());
  }
  if (device_name != "cpu" && device_name != "cuda") usage("--device must be cpu or cuda");
  if (device_name == "cuda" && !cuda_usable())
    usage("--device cuda, but this build has no CUDA kernels or no GPU is visible");
  if (shape_name.empty()) shape_name = device_name == "cuda" ? "llama7b" : "cpu";
  const Shape* found = nullptr;
  for (const Shape& s : kShapes)
    if (shape_name == s.name) found = &s;
  if (!found) usage(("unknown shape " + shape_name).c_str());
  Shape shape = *found;
  if (tokens > 0) shape.tokens = tokens;
  if (dtype_name == "fp32") shape.dtype = at::kFloat;
  else if (dtype_name == "bf16") shape.dtype = at::kBFloat16;
  else if (dtype_name == "fp16") shape.dtype = at::kHalf;
  else if (!dtype_name.empty()) usage("--dtype must be fp32, bf16 or fp16");
  if (iters < 1 || warmup < 0) usage("--iters must be >= 1 and --warmup >= 0");

  const at::Device device(device_name == "cuda" ? at::kCUDA : at::kCPU);
  const auto options = at::TensorOptions().device(device).dtype(shape.dtype);
  at::manual_seed(0);
  const Ops ops = find_ops();
  const Options o;
  const Inputs in = make_inputs(shape, options);

  for (int64_t i = 0; i < warmup; ++i)
    run_backward(ops, in, run_forward(ops, in, shape, o), shape, o);
  synchronize(device);
  std::vector<double> fwd_ms, bwd_ms;
  using clock = std::chrono::steady_clock;
  for (int64_t i = 0; i < iters; ++i) {
    const auto t0 = clock::now();
    ForwardOut fwd;
    {
      Range range("omoe::forward");
      fwd = run_forward(ops, in, shape, o);
      synchronize(device);
    }
    const auto t1 = clock::now();
    {
      Range range("omoe::backward");
      run_backward(ops, in, fwd, shape, o);
      synchronize(device);
    }
    const auto t2 = clock::now();
    fwd_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    bwd_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
  }
  std::printf("shape=%s T=%lld d=%lld E=%lld r=%lld top_k=%lld dtype=%s device=%s\n",
              shape.name, (long long)shape.tokens, (long long)shape.d_model,
              (long long)shape.experts, (long long)shape.rank, (long long)shape.top_k,
              c10::toString(shape.dtype), device_name.c_str());
  const double f = median_ms(fwd_ms), b = median_ms(bwd_ms);
  std::printf(
      "median over %lld iters: forward %.3f ms, backward %.3f ms, forward+backward %.3f ms\n",
      (long long)iters, f, b, f + b);

  if (check) {
    // The CPU ops in float64 on the same inputs: the same algorithm, another device and
    // precision, so this catches kernel bugs, not algorithm bugs (the Python tests compare
    // with the eager reference).
    const auto to64 = [](const at::Tensor& t) { return t.to(at::kCPU, at::kDouble); };
    const Inputs ref_in{to64(in.x), to64(in.A),    to64(in.B),
                        to64(in.W), to64(in.base), to64(in.grad_y)};
    const ForwardOut fwd = run_forward(ops, in, shape, o);
    const BackwardOut bwd = run_backward(ops, in, fwd, shape, o);
    const ForwardOut ref_fwd = run_forward(ops, ref_in, shape, o);
    const BackwardOut ref_bwd = run_backward(ops, ref_in, ref_fwd, shape, o);
    std::printf(
        "check against CPU float64: y %.3e, grad_x %.3e, grad_A %.3e, grad_B %.3e, "
        "grad_router_weight %.3e\n",
        relative_error(std::get<0>(fwd), std::get<0>(ref_fwd)),
        relative_error(std::get<0>(bwd), std::get<0>(ref_bwd)),
        relative_error(std::get<1>(bwd), std::get<1>(ref_bwd)),
        relative_error(std::get<2>(bwd), std::get<2>(ref_bwd)),
        relative_error(std::get<3>(bwd), std::get<3>(ref_bwd)));
  }
  return 0;
}
