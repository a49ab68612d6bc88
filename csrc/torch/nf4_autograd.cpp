// nf4_autograd.cpp: the autograd of fusedrl::nf4_lora_linear, in C++ (one kernel at the Autograd key for every
// device). Why not Python's torch.library.register_autograd: that puts a Python function in front of every call,
// grad or not, and runs the backward's bookkeeping in Python; at decode and per-projection sizes this host time is
// larger than the GPU work. Here a call that needs no gradient goes straight to the device kernel, and the
// backward (nf4_lora_linear_backward, plus the bias gradient) runs without Python.
//
// Gradients: x, lora_A, lora_B and bias (the sum of grad_y over tokens); the NF4 weight is frozen. The backward honours
// grad_output and computes only what needs_input_grad asks for (the backward op's output_mask).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

namespace fusedrl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                              at::ArrayRef<double>, at::IntArrayRef, int64_t, const at::Tensor&, const at::Tensor&,
                              double, const std::optional<at::Tensor>&);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
    at::ArrayRef<double>, at::IntArrayRef, int64_t, const at::Tensor&, const at::Tensor&, double, std::array<bool, 3>);

const c10::TypedOperatorHandle<ForwardSig>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedrl::nf4_lora_linear", "").typed<ForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSig>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedrl::nf4_lora_linear_backward", "").typed<BackwardSig>();
  return op;
}

// The device kernel, below autograd.
at::Tensor forward_below_autograd(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                  at::TensorList nested_absmax, at::TensorList nested_code,
                                  at::ArrayRef<double> offset, at::IntArrayRef rows, int64_t blocksize,
                                  const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                  const std::optional<at::Tensor>& bias) {
  at::AutoDispatchBelowADInplaceOrView below;
  return forward_op().call(x, packed, absmax, nested_absmax, nested_code, offset, rows, blocksize, lora_A, lora_B,
                           scaling, bias);
}

class Nf4LoraLinearFunction : public torch::autograd::Function<Nf4LoraLinearFunction> {
 public:
  // Function::apply counts one backward slot per tensor of each list and one per other argument, in order.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                            at::TensorList nested_absmax, at::TensorList nested_code, at::ArrayRef<double> offset,
                            at::IntArrayRef rows, int64_t blocksize, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, const std::optional<at::Tensor>& bias) {
    variable_list saved{x, lora_A, lora_B};
    for (at::TensorList list : {packed, absmax, nested_absmax, nested_code})
      saved.insert(saved.end(), list.begin(), list.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["shards"] = static_cast<int64_t>(packed.size());
    ctx->saved_data["nested"] = static_cast<int64_t>(nested_absmax.size());
    ctx->saved_data["offset"] = offset.vec();
    ctx->saved_data["rows"] = rows.vec();
    ctx->saved_data["blocksize"] = blocksize;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return forward_below_autograd(x, packed, absmax, nested_absmax, nested_code, offset, rows, blocksize, lora_A,
                                  lora_B, scaling, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t shards = ctx->saved_data["shards"].toInt(), nested = ctx->saved_data["nested"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const at::Tensor &x = saved[0], &lora_A = saved[1], &lora_B = saved[2];
    auto slice = [&](int64_t begin, int64_t count) {
      return std::vector<at::Tensor>(saved.begin() + 3 + begin, saved.begin() + 3 + begin + count);
    };
    const std::vector<at::Tensor> packed = slice(0, shards), absmax = slice(shards, shards);
    const std::vector<at::Tensor> nested_absmax = slice(2 * shards, nested), nested_code = slice(2 * shards + nested, nested);
    // Slots of the differentiable inputs among the variables (x, the weight's tensors, lora_A, lora_B, bias).
    const size_t var_a = 1 + 2 * shards + 2 * nested, var_b = var_a + 1, var_bias = var_a + 2;
    const at::Tensor& grad_y = grad_outputs[0];
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(var_a),
                                      ctx->needs_input_grad(var_b)};
    at::Tensor grad_x, grad_a, grad_b, grad_bias;
    if (grad_y.defined() && (mask[0] || mask[1] || mask[2])) {
      const std::vector<double> offset = ctx->saved_data["offset"].toDoubleVector();
      const std::vector<int64_t> rows = ctx->saved_data["rows"].toIntVector();
      std::tie(grad_x, grad_a, grad_b) =
          backward_op().call(grad_y, x, packed, absmax, nested_absmax, nested_code, offset, rows,
                             ctx->saved_data["blocksize"].toInt(), lora_A, lora_B,
                             ctx->saved_data["scaling"].toDouble(), mask);
    }
    if (grad_y.defined() && has_bias && ctx->needs_input_grad(var_bias))
      grad_bias = grad_y.reshape({-1, grad_y.size(-1)}).sum(0);
    // One slot per forward argument: x, packed..., absmax..., nested_absmax..., nested_code..., offset, rows,
    // blocksize, lora_A, lora_B, scaling, bias.
    variable_list grads;
    grads.reserve(1 + 2 * shards + 2 * nested + 7);
    grads.push_back(mask[0] ? grad_x : at::Tensor());
    grads.insert(grads.end(), 2 * shards + 2 * nested + 3, at::Tensor());
    grads.push_back(mask[1] ? grad_a : at::Tensor());
    grads.push_back(mask[2] ? grad_b : at::Tensor());
    grads.push_back(at::Tensor());  // scaling
    grads.push_back(grad_bias);
    return grads;
  }
};

at::Tensor nf4_lora_linear_autograd(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                    at::TensorList nested_absmax, at::TensorList nested_code,
                                    at::ArrayRef<double> offset, at::IntArrayRef rows, int64_t blocksize,
                                    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                    const std::optional<at::Tensor>& bias) {
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || lora_A.requires_grad() || lora_B.requires_grad() ||
                           (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!wants_grad)  // inference, scoring, decode: no graph node, no saved tensors
    return forward_below_autograd(x, packed, absmax, nested_absmax, nested_code, offset, rows, blocksize, lora_A,
                                  lora_B, scaling, bias);
  return Nf4LoraLinearFunction::apply(x, packed, absmax, nested_absmax, nested_code, offset, rows, blocksize, lora_A,
                                      lora_B, scaling, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedrl, Autograd, m) { m.impl("nf4_lora_linear", &nf4_lora_linear_autograd); }

}  // namespace fusedrl
