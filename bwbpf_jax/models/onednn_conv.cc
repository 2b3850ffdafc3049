// oneDNN convolutions for XLA:CPU, as XLA FFI handlers.
//
// XLA:CPU lowers convolutions to Eigen, about 1.4x slower than the oneDNN
// kernels PyTorch runs on the same CPU (experiments/layer_bench.py). These
// handlers run a 2-D float32 convolution's three train-step kernels through
// oneDNN on the buffers XLA owns, with no copies:
//
//   bwbpf_onednn_conv_forward       y  = conv(x, w)
//   bwbpf_onednn_conv_input_grad    dx = d conv(x, w) / dx applied to dy
//   bwbpf_onednn_conv_kernel_grad   dw = d conv(x, w) / dw applied to dy
//
// Layouts are JAX's: activations NHWC, kernels HWIO. Attributes: the strides
// and the four paddings (top, bottom, left, right). oneDNN compiles a kernel
// per shape; primitives are cached per (kind, shape) for the process's life.

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum class Kind { kForward, kInputGrad, kKernelGrad };

// One convolution: shapes in oneDNN's logical order (N, C, H, W / O, I, H, W).
struct Geometry {
  memory::dims src, weights, dst, strides, pad_l, pad_r;

  auto key(Kind kind) const {
    return std::make_tuple(static_cast<int>(kind), src, weights, dst, strides, pad_l, pad_r);
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A compiled primitive, the scratchpad it needs, and the kernel layout it
// chose. Kernels are passed to oneDNN as `any`, so it picks its blocked
// layout (the fast JIT kernels want one); `reorder` converts between that
// layout and JAX's HWIO on every call, which costs little: kernels are small.
struct Compiled {
  dnnl::primitive primitive;
  memory::desc scratchpad;
  memory::desc weights;
  bool blocked = false;  // Whether that layout differs from HWIO.
  dnnl::reorder reorder;
};

memory::desc Plain(const memory::dims& dims, Tag tag) {
  return memory::desc(dims, memory::data_type::f32, tag);
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Plain(g.src, Tag::nhwc), Plain(g.weights, Tag::any), Plain(g.dst, Tag::nhwc), g.strides,
      g.pad_l, g.pad_r, UserScratchpad());
}

Compiled Compile(Kind kind, const Geometry& g) {
  const memory::desc src = Plain(g.src, Tag::nhwc), dst = Plain(g.dst, Tag::nhwc),
                     weights = Plain(g.weights, Tag::any), hwio = Plain(g.weights, Tag::hwio);
  auto forward = ForwardDesc(g);
  Compiled compiled;
  switch (kind) {
    case Kind::kForward:
      compiled = {dnnl::convolution_forward(forward), forward.scratchpad_desc(),
                  forward.weights_desc()};
      break;
    case Kind::kInputGrad: {
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, src, weights, dst, g.strides,
          g.pad_l, g.pad_r, forward, UserScratchpad());
      compiled = {dnnl::convolution_backward_data(pd), pd.scratchpad_desc(), pd.weights_desc()};
      break;
    }
    case Kind::kKernelGrad: {
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, src, weights, dst, g.strides,
          g.pad_l, g.pad_r, forward, UserScratchpad());
      compiled = {dnnl::convolution_backward_weights(pd), pd.scratchpad_desc(),
                  pd.diff_weights_desc()};
      break;
    }
  }
  compiled.blocked = compiled.weights != hwio;
  if (compiled.blocked) {
    compiled.reorder = kind == Kind::kKernelGrad
                           ? dnnl::reorder(dnnl::reorder::primitive_desc(
                                 Engine(), compiled.weights, Engine(), hwio))
                           : dnnl::reorder(dnnl::reorder::primitive_desc(
                                 Engine(), hwio, Engine(), compiled.weights));
  }
  return compiled;
}

const Compiled& Cached(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static auto* cache = new std::map<decltype(g.key(kind)), std::unique_ptr<Compiled>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = (*cache)[g.key(kind)];
  if (!slot) slot = std::make_unique<Compiled>(Compile(kind, g));
  return *slot;
}

// A 64-byte aligned buffer left uninitialised (the primitive writes it first).
class Uninitialized {
 public:
  Uninitialized() = default;
  explicit Uninitialized(size_t bytes)
      : data_(bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr, std::free) {}
  void* get() const { return data_.get(); }

 private:
  std::unique_ptr<void, decltype(&std::free)> data_{nullptr, std::free};
};

// Runs `kind` on its three tensors' data, named by their roles in the forward
// convolution: source (NHWC), weights (HWIO), destination (NHWC).
ffi::Error Run(Kind kind, const Geometry& g, void* src, void* weights, void* dst) {
  try {
    const Compiled& compiled = Cached(kind, g);
    dnnl::stream stream(Engine());
    memory src_mem(Plain(g.src, Tag::nhwc), Engine(), src);
    memory dst_mem(Plain(g.dst, Tag::nhwc), Engine(), dst);
    memory hwio_mem(Plain(g.weights, Tag::hwio), Engine(), weights);
    Uninitialized blocked;  // The kernel in the primitive's layout, if not HWIO.
    memory weights_mem = hwio_mem;
    if (compiled.blocked) {
      blocked = Uninitialized(compiled.weights.get_size());
      weights_mem = memory(compiled.weights, Engine(), blocked.get());
      if (kind != Kind::kKernelGrad) {
        compiled.reorder.execute(stream, hwio_mem, weights_mem);
      }
    }
    Uninitialized scratch(compiled.scratchpad.get_size());
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SCRATCHPAD, memory(compiled.scratchpad, Engine(), scratch.get())}};
    switch (kind) {
      case Kind::kForward:
        args.insert({{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, weights_mem},
                     {DNNL_ARG_DST, dst_mem}});
        break;
      case Kind::kInputGrad:
        args.insert({{DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_WEIGHTS, weights_mem},
                     {DNNL_ARG_DIFF_DST, dst_mem}});
        break;
      case Kind::kKernelGrad:
        args.insert({{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_WEIGHTS, weights_mem},
                     {DNNL_ARG_DIFF_DST, dst_mem}});
        break;
    }
    compiled.primitive.execute(stream, args);
    if (compiled.blocked && kind == Kind::kKernelGrad) {
      compiled.reorder.execute(stream, weights_mem, hwio_mem);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, int64_t stride_h, int64_t stride_w,
                      int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                      int64_t pad_right) {
  // NHWC -> (N, C, H, W); HWIO -> (O, I, H, W).
  return Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]},
                  {y[0], y[3], y[1], y[2]}, {stride_h, stride_w},
                  {pad_top, pad_left},      {pad_bottom, pad_right}};
}

using F32 = ffi::Buffer<ffi::F32, 4>;

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32, 4> y, int64_t stride_h,
                   int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                   int64_t pad_right) {
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), stride_h, stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  return Run(Kind::kForward, g, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error InputGrad(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32, 4> dx, int64_t stride_h,
                     int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                     int64_t pad_right) {
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), stride_h, stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  return Run(Kind::kInputGrad, g, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error KernelGrad(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32, 4> dw, int64_t stride_h,
                      int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                      int64_t pad_right) {
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), stride_h, stride_w,
                        pad_top, pad_bottom, pad_left, pad_right);
  return Run(Kind::kKernelGrad, g, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

// Two rank-4 float32 operands, one result, and the convolution's geometry.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<F32>()
      .Arg<F32>()
      .Ret<F32>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BwbpfOnednnConvForward, Forward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BwbpfOnednnConvInputGrad, InputGrad, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BwbpfOnednnConvKernelGrad, KernelGrad, ConvBinding());
