// oneDNN's convolutions (the CPU kernels PyTorch runs) as XLA FFI custom calls: forward, input
// gradient and weight gradient of a 2-D convolution on channels-last fp32 arrays. Compiled and
// registered by pand_jax/models/onednn.py, which documents why and when it is used.
//
// Layouts: x [N, H, W, C] (NHWC), w [KH, KW, C / groups, O] (HWIO), y [N, OH, OW, O]. oneDNN reads
// and writes x and y in place; the weights are reordered to and from the blocked layout its
// fastest kernels want (a copy of the filter, tiny next to the activations).
#include <cstdint>
#include <mutex>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One stream, and one convolution at a time: XLA may run two custom calls at once (two fake
// devices, or independent ops), while oneDNN already spreads each call over every core.
std::mutex stream_mutex;

dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

struct Conv {
  memory::desc src, dst, weights, weights_any;
  memory::dims strides, padding_l, padding_r;

  // `wanted`: the weights' layout, either plain HWIO or any the implementation prefers.
  dnnl::convolution_forward::primitive_desc Forward(const memory::desc& wanted) const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            src, wanted, dst, strides, padding_l, padding_r};
  }
};

Conv Describe(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
              ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
              ffi::Span<const int64_t> padding, int64_t groups) {
  const int64_t kh = w[0], kw = w[1], cg = w[2], o = w[3];
  const auto f32 = memory::data_type::f32;
  Conv c;
  c.src = memory::desc({x[0], x[3], x[1], x[2]}, f32, memory::format_tag::nhwc);
  c.dst = memory::desc({y[0], y[3], y[1], y[2]}, f32, memory::format_tag::nhwc);
  // HWIO by explicit strides, as oneDNN's logical (groups,) O, I, KH, KW.
  if (groups == 1) {
    c.weights = memory::desc({o, cg, kh, kw}, f32, {1, o, kw * cg * o, cg * o});
  } else {
    c.weights = memory::desc({groups, o / groups, cg, kh, kw}, f32,
                             {o / groups, 1, o, kw * cg * o, cg * o});
  }
  c.weights_any = memory::desc(c.weights.get_dims(), f32, memory::format_tag::any);
  c.strides = {strides[0], strides[1]};
  c.padding_l = {padding[0], padding[2]};
  c.padding_r = {padding[1], padding[3]};
  return c;
}

// The weights in the layout `wanted`: the caller's buffer itself, or a reordered copy.
memory WeightsIn(const memory::desc& wanted, const memory::desc& plain, void* data) {
  memory given(plain, Engine(), data);
  if (wanted == plain) return given;
  memory blocked(wanted, Engine());
  dnnl::reorder(given, blocked).execute(Stream(), given, blocked);
  return blocked;
}

template <typename F>
ffi::Error Guarded(F run) {
  try {
    std::lock_guard<std::mutex> lock(stream_mutex);
    run();
    Stream().wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

using Buffer = ffi::Buffer<ffi::F32>;
using Result = ffi::ResultBuffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(Buffer x, Buffer w, Result y, Ints strides, Ints padding, int64_t groups) {
  Conv c = Describe(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding, groups);
  return Guarded([&] {
    // Dense: oneDNN's fastest forward kernel reads HWIO as it is; depthwise ones want blocks.
    auto pd = c.Forward(groups == 1 ? c.weights : c.weights_any);
    dnnl::convolution_forward(pd).execute(
        Stream(), {{DNNL_ARG_SRC, memory(c.src, Engine(), x.typed_data())},
                   {DNNL_ARG_WEIGHTS, WeightsIn(pd.weights_desc(), c.weights, w.typed_data())},
                   {DNNL_ARG_DST, memory(c.dst, Engine(), y->typed_data())}});
  });
}

ffi::Error InputGrad(Buffer dy, Buffer w, Result dx, Ints strides, Ints padding, int64_t groups) {
  Conv c = Describe(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding, groups);
  return Guarded([&] {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, c.src, c.weights_any, c.dst, c.strides,
        c.padding_l, c.padding_r, c.Forward(c.weights_any));
    dnnl::convolution_backward_data(pd).execute(
        Stream(), {{DNNL_ARG_DIFF_DST, memory(c.dst, Engine(), dy.typed_data())},
                   {DNNL_ARG_WEIGHTS, WeightsIn(pd.weights_desc(), c.weights, w.typed_data())},
                   {DNNL_ARG_DIFF_SRC, memory(c.src, Engine(), dx->typed_data())}});
  });
}

ffi::Error WeightGrad(Buffer x, Buffer dy, Result dw, Ints strides, Ints padding,
                      int64_t groups) {
  Conv c = Describe(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding, groups);
  return Guarded([&] {
    dnnl::convolution_backward_weights::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, c.src, c.weights_any, c.dst, c.strides,
        c.padding_l, c.padding_r, c.Forward(c.weights_any));
    memory out(c.weights, Engine(), dw->typed_data());
    const bool blocked = pd.diff_weights_desc() != c.weights;
    memory computed = blocked ? memory(pd.diff_weights_desc(), Engine()) : out;
    dnnl::convolution_backward_weights(pd).execute(
        Stream(), {{DNNL_ARG_SRC, memory(c.src, Engine(), x.typed_data())},
                   {DNNL_ARG_DIFF_DST, memory(c.dst, Engine(), dy.typed_data())},
                   {DNNL_ARG_DIFF_WEIGHTS, computed}});
    if (blocked) dnnl::reorder(computed, out).execute(Stream(), computed, out);
  });
}

}  // namespace

#define PAND_CONV_BINDING                                                    \
  ffi::Ffi::Bind()                                                           \
      .Arg<Buffer>()                                                         \
      .Arg<Buffer>()                                                         \
      .Ret<Buffer>()                                                         \
      .Attr<Ints>("strides")                                                 \
      .Attr<Ints>("padding")                                                 \
      .Attr<int64_t>("groups")

XLA_FFI_DEFINE_HANDLER_SYMBOL(PandConvForward, Forward, PAND_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PandConvInputGrad, InputGrad, PAND_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PandConvWeightGrad, WeightGrad, PAND_CONV_BINDING);
