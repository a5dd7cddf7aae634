// The decoder stack of a LLaMA-style decode step in one call: every layer's norms, projections, rotary,
// KV-cache write, paged attention and MLP, without returning to Python between them.
//
// At batch 1 a decode step of a small model runs ~13 kernels per layer, each a few microseconds of
// work; called from Python each also paid the interpreter, pybind's argument conversion and a tensor
// allocation made through the dispatcher (~1-3 us apiece on this 2-core VM), about 25 us a layer. Here
// the same kernels are called from C++: the linears of bitmask_linear.cpp (sparse decode, dense GEMV)
// and the layer ops of fused_ops.cpp, compiled into this extension (with SPARSE_SERVE_NO_MODULE, so
// they keep their own modules out), in the order and with the arguments the Python forward
// (sparse_serve/models/llama.py) uses, so the results are bit for bit the same.
//
//   Linear.sparse(masks, values, row_offsets, bias_f32, loops, max_rows) / Linear.dense(w, bias_f32, max_rows) /
//   Linear.coded(low, codes, table, bias_f32, max_rows) / Linear.blocked(prepacked, pairs, bias_f32, max_rows)
//       a bound linear: the decode kernel with its loops, the dense GEMV on a row-major or exponent-coded
//       weight (kernels/exponent_coding.py), or the blocked GEMM on oneDNN's prepacked weight; bias float32 or
//       None. linear.with_blocked(prepacked, pairs, max_rows): a GEMV that hands rows past its own to the
//       blocked GEMM; linear.with_many_rows(max_rows, gather): a sparse decode kernel that hands them to the
//       panels, or with gather to the pair gather
//   Layer(input_norm, input_eps, post_norm, post_eps, qkv, o, gate_up, down, q_heads, kv_heads, head_dim, scale)
//   Decoder(layers, final_norm, final_eps).run(h [T, D], cos, sin [T, d], slots [T], tables [T, nb], lens [T],
//                                              caches [k0, v0, k1, v1, ...]) -> final_norm(h) [T, D]
//       T single-token decodes (T <= max_rows, the fewest rows any linear takes); h is the residual stream
//       after the embedding and is updated in place, the caches get this step's keys and values.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

// bitmask_linear.cpp
torch::Tensor bitmask_gemm_decode(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                                  const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias,
                                  const std::vector<int64_t>& loops);
torch::Tensor bitmask_gemm_panels(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                                  const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias);
torch::Tensor bitmask_gemm_pairs(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& values,
                                 const torch::Tensor& row_offsets, const c10::optional<torch::Tensor>& bias);
torch::Tensor dense_gemm_decode(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias);
torch::Tensor coded_gemm_decode(const torch::Tensor& x, const torch::Tensor& low, const torch::Tensor& codes,
                                const torch::Tensor& table, const c10::optional<torch::Tensor>& bias);
torch::Tensor dense_gemm_blocked(const torch::Tensor& x, const torch::Tensor& weight, int64_t pairs,
                                 const c10::optional<torch::Tensor>& bias);
// fused_ops.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
torch::Tensor add_rms_norm_(torch::Tensor& h, const torch::Tensor& delta, const torch::Tensor& w, double eps);
void rotary_cache_(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& cos,
                   const torch::Tensor& sin, torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots);
torch::Tensor silu_mul(const torch::Tensor& gate_up);
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& tables, const torch::Tensor& lens, double scale);

namespace sparse_serve_decoder {

// One linear as kernels/cpu/__init__.py binds it for decode-sized batches (bind_avx512, bind_dense).
struct Linear {
  enum class Kind { kSparse, kDense, kCoded };
  Kind kind = Kind::kDense;
  std::vector<torch::Tensor> weight;  // sparse: masks, values, row_offsets; dense: w [N, K]; coded: low, codes, table
  c10::optional<torch::Tensor> bias;  // float32 [N]
  std::vector<int64_t> loops;         // sparse: the decode loop per pass size
  int64_t max_rows = 0;               // the most activation rows this kernel takes
  c10::optional<torch::Tensor> blocked;  // dense or coded: oneDNN's prepacked weight, which takes rows past max_rows
  int64_t pairs = 0;                     // ... column pairs a row of it
  int64_t blocked_rows = 0;              // ... up to this many rows
  int64_t many_rows = 0;     // sparse: rows past max_rows, up to this many, take the panels or the pair gather
  bool pair_gather = false;  // ... the pair gather (a weight with few nonzero column pairs)

  static Linear make_sparse(torch::Tensor masks, torch::Tensor values, torch::Tensor row_offsets,
                            c10::optional<torch::Tensor> bias, std::vector<int64_t> loops, int64_t max_rows) {
    return {Kind::kSparse, {std::move(masks), std::move(values), std::move(row_offsets)}, std::move(bias),
            std::move(loops), max_rows};
  }
  static Linear make_dense(torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t max_rows) {
    return {Kind::kDense, {std::move(w)}, std::move(bias), {}, max_rows};
  }
  static Linear make_coded(torch::Tensor low, torch::Tensor codes, torch::Tensor table,
                           c10::optional<torch::Tensor> bias, int64_t max_rows) {
    return {Kind::kCoded, {std::move(low), std::move(codes), std::move(table)}, std::move(bias), {}, max_rows};
  }
  static Linear make_blocked(torch::Tensor prepacked, int64_t pairs, c10::optional<torch::Tensor> bias,
                             int64_t max_rows) {  // no GEMV: every row count takes the blocked GEMM
    return Linear{Kind::kDense, {}, std::move(bias), {}, 0}.with_blocked(std::move(prepacked), pairs, max_rows);
  }
  Linear with_blocked(torch::Tensor prepacked, int64_t blocked_pairs, int64_t rows) const {
    TORCH_CHECK(kind == Kind::kDense || kind == Kind::kCoded, "only a dense GEMV hands its larger batches on");
    Linear out = *this;
    out.blocked = std::move(prepacked);
    out.pairs = blocked_pairs;
    out.blocked_rows = rows;
    return out;
  }
  Linear with_many_rows(int64_t rows, bool gather) const {
    TORCH_CHECK(kind == Kind::kSparse, "only the sparse decode kernel hands its larger batches to the panels");
    Linear out = *this;
    out.many_rows = rows;
    out.pair_gather = gather;
    return out;
  }
  int64_t rows() const { return std::max({max_rows, blocked ? blocked_rows : 0, many_rows}); }
  torch::Tensor operator()(const torch::Tensor& x) const {  // x [T, K] -> [T, N]
    if (x.size(0) > max_rows) {
      if (blocked) return dense_gemm_blocked(x, *blocked, pairs, bias);
      if (many_rows > 0) {
        const auto& many = pair_gather ? bitmask_gemm_pairs : bitmask_gemm_panels;
        return many(x, weight[0], weight[1], weight[2], bias);
      }
    }
    switch (kind) {
      case Kind::kSparse: return bitmask_gemm_decode(x, weight[0], weight[1], weight[2], bias, loops);
      case Kind::kCoded: return coded_gemm_decode(x, weight[0], weight[1], weight[2], bias);
      default: return dense_gemm_decode(x, weight[0], bias);
    }
  }
};

struct Layer {
  torch::Tensor input_norm;  // [D]
  double input_eps;
  torch::Tensor post_norm;  // [D]
  double post_eps;
  Linear qkv, o, gate_up, down;  // qkv: [(Hq + 2 Hkv) d, D]; gate_up: [2 I, D]
  int64_t q_heads, kv_heads, head_dim;
  double scale;
};

class Decoder {
 public:
  Decoder(std::vector<Layer> layers, torch::Tensor final_norm, double final_eps)
      : layers_(std::move(layers)), final_norm_(std::move(final_norm)), final_eps_(final_eps) {
    TORCH_CHECK(!layers_.empty(), "a decoder needs at least one layer");
    max_rows_ = INT64_MAX;
    for (const Layer& l : layers_)
      for (const Linear* lin : {&l.qkv, &l.o, &l.gate_up, &l.down}) max_rows_ = std::min(max_rows_, lin->rows());
  }

  int64_t max_rows() const { return max_rows_; }

  torch::Tensor run(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                    const torch::Tensor& tables, const torch::Tensor& lens, std::vector<torch::Tensor> caches) const {
    const int64_t t = h.size(0);
    TORCH_CHECK(t >= 1 && t <= max_rows_, "the compiled decoder takes 1 to ", max_rows_, " rows, got ", t);
    TORCH_CHECK(caches.size() == 2 * layers_.size(), "caches must be (k, v) for each of the ", layers_.size(),
                " layers, got ", caches.size(), " tensors");
    torch::Tensor x = rms_norm(h, layers_[0].input_norm, layers_[0].input_eps);  // [T, D]
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      torch::Tensor& k_cache = caches[2 * i];
      torch::Tensor& v_cache = caches[2 * i + 1];
      torch::Tensor qkv = l.qkv(x).view({t, -1, l.head_dim});  // [T, Hq + 2 Hkv, d]
      torch::Tensor q = qkv.narrow(1, 0, l.q_heads);
      torch::Tensor k = qkv.narrow(1, l.q_heads, l.kv_heads);
      torch::Tensor v = qkv.narrow(1, l.q_heads + l.kv_heads, l.kv_heads);
      rotary_cache_(q, k, v, cos, sin, k_cache, v_cache, slots);
      torch::Tensor attn = paged_decode(q, k_cache, v_cache, tables, lens, l.scale).view({t, -1});  // [T, Hq d]
      x = add_rms_norm_(h, l.o(attn), l.post_norm, l.post_eps);
      const bool last = i + 1 == layers_.size();
      x = add_rms_norm_(h, l.down(silu_mul(l.gate_up(x))), last ? final_norm_ : layers_[i + 1].input_norm,
                        last ? final_eps_ : layers_[i + 1].input_eps);  // the next layer's input, or the output
    }
    return x;
  }

 private:
  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  double final_eps_;
  int64_t max_rows_;
};

}  // namespace sparse_serve_decoder

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace d = sparse_serve_decoder;
  namespace py = pybind11;
  py::class_<d::Linear>(m, "Linear", py::module_local())
      .def_static("sparse", &d::Linear::make_sparse, "the sparse decode kernel on a packed bitmask weight")
      .def_static("dense", &d::Linear::make_dense, "the dense decode GEMV on a row-major bf16 weight")
      .def_static("coded", &d::Linear::make_coded, "the dense decode GEMV on an exponent-coded bf16 weight")
      .def_static("blocked", &d::Linear::make_blocked, "the blocked GEMM on oneDNN's prepacked bf16 weight")
      .def("with_blocked", &d::Linear::with_blocked, "this GEMV, handing rows past its own to the blocked GEMM")
      .def("with_many_rows", &d::Linear::with_many_rows,
           "this sparse decode kernel, handing rows past its own to the panels (or the pair gather)")
      .def_property_readonly("max_rows", &d::Linear::rows)
      .def("__call__", &d::Linear::operator(), "y = x W^T + b for decode-sized x [T, K]");
  py::class_<d::Layer>(m, "Layer", py::module_local())
      .def(py::init<torch::Tensor, double, torch::Tensor, double, d::Linear, d::Linear, d::Linear, d::Linear, int64_t,
                    int64_t, int64_t, double>());
  py::class_<d::Decoder>(m, "Decoder", py::module_local())
      .def(py::init<std::vector<d::Layer>, torch::Tensor, double>())
      .def_property_readonly("max_rows", &d::Decoder::max_rows)
      .def("run", &d::Decoder::run, "every decoder layer of a decode step; returns the final norm of h");
}
