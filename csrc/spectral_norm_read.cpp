// sn_fused._C: the eager read of an sn_fused layer, with its autograd node, in C++.
//
// What it replaces is host time, not GPU time. An eager read in Python (the layer, then
// sn_fused.ops.spectral_norm._SpectralNormFunction) spends ~10 us of a CPU's time in the
// Python autograd.Function machinery (apply, ctx, save_for_backward) and ~10 more in the
// forward body (plan lookup, two torch.empty, the runner key, the argument tuple), per read,
// around one kernel launch of a few microseconds; its backward ~10 us in the same way. Here
// the same read is a C++ torch::autograd::Function whose forward allocates the outputs, packs
// the launch arguments and calls the launch it was prepared with, and whose backward does the
// same for the backward kernel.
//
// What stays in Python, on purpose: every decision. The launch itself is the Python runner
// sn_fused keeps per compiled kernel (ops.spectral_norm._direct_runner on a GPU), or, when
// none is kept yet (first read, new alignment, Triton's interpreter), ops' own _launch; so
// this file holds no CUDA or Triton code and builds against a CPU-only torch. Which reads come
// here at all is chosen in Python (_spectral_norm_checked): eager, not traced, no torch.func
// wrapper, no dispatch mode, no Triton launch hooks. A backward the prepared launches do not
// take (create_graph=True, batched gradients, a gradient of other strides) calls back into
// ops (_eager_backward), which chooses as the Python Function does.
//
// Memory plan: a read allocates W_sn (the weight's strides, at::empty_like with
// preserve_format, as torch.empty_like) and saved = [v | u | sigma] (M + N + 1 elements,
// the weight's dtype), its backward dW (the weight's strides); each, where its launch needs
// one, a workspace (ops._workspace's size and dtype). A launch that touches no workspace gets
// the tensor ops keeps for it.

// Only what is used (not <torch/extension.h>, all of libtorch's C++ API): builds in ~1/3 the time.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <memory>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

// Hidden, as pybind11's own types are: a class holding py::objects must not be more visible.
#pragma GCC visibility push(hidden)
namespace sn_fused {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ops.spectral_norm._eager_backward(grad, weight, saved, sem, dim) -> dW, the backward of every
// read the prepared backward does not take; and ops.spectral_norm._fast_launches_ok() -> bool.
// Set once by ops (set_callbacks); leaked on purpose: a static py::object would be released
// after Python finalized.
static py::object* backward_callback = nullptr;
static py::object* fast_launches_ok = nullptr;

void set_callbacks(py::object backward, py::object fast_ok) {
  if (backward_callback == nullptr) {
    backward_callback = new py::object();
    fast_launches_ok = new py::object();
  }
  *backward_callback = std::move(backward);
  *fast_launches_ok = std::move(fast_ok);
}

// The launches of one kernel for one launch signature (shapes, strides, dtypes, device, flags),
// prepared by ops (_prepared_launches): what stays the same from call to call, so that a call
// only packs its tensors in front. Every method runs with the GIL held.
class PreparedLaunches {
 public:
  // The kernel's arguments are: the tensors, with the workspace at ws_index; then scalars;
  // then tails[i] for launch i (sizes, strides, flags, blocks: the plan's). launches[i](args)
  // launches it through ops._launch and returns the runner ops kept for it, or None (none
  // kept: interpreter, launch hooks). workspace: the tensor to pass when ws_numel == 0, else
  // a 0-element tensor of the workspace's dtype and device to allocate ws_numel elements like.
  PreparedLaunches(int64_t ws_index, int64_t ws_numel, at::Tensor workspace, py::tuple scalars,
                   std::vector<py::tuple> tails, std::vector<py::object> launches)
      : ws_index_(ws_index), ws_numel_(ws_numel), workspace_(std::move(workspace)),
        scalars_(std::move(scalars)), tails_(std::move(tails)), launches_(std::move(launches)) {
    TORCH_CHECK(tails_.size() == launches_.size() && !launches_.empty(),
                "sn_fused: prepared launches need one tail per launch");
  }

  void run(std::initializer_list<at::Tensor> tensors) {
    std::vector<at::Tensor> all(tensors);
    all.insert(all.begin() + ws_index_,
               ws_numel_ > 0 ? at::empty({ws_numel_}, workspace_.options()) : workspace_);
    // Triton specializes a pointer argument on its 16-byte alignment: the kept runners are
    // those of one alignment pattern (ops._launch keys them the same way).
    uint32_t alignment = 0;
    const size_t head = all.size() + scalars_.size();
    std::vector<py::object> objects;
    objects.reserve(head);
    for (size_t i = 0; i < all.size(); i++) {
      if (reinterpret_cast<uintptr_t>(all[i].data_ptr()) % 16 == 0) alignment |= 1u << i;
      objects.push_back(py::cast(all[i]));
    }
    for (auto scalar : scalars_) objects.push_back(py::reinterpret_borrow<py::object>(scalar));
    // The runners of one alignment pattern, taken and replaced as a whole: a runner call is
    // Python, during which another thread may read this layer and keep another set.
    const bool kept = have_runners_ && alignment == alignment_;
    std::vector<py::object> runners = kept ? runners_ : std::vector<py::object>(launches_.size());
    bool all_kept = true;
    for (size_t l = 0; l < launches_.size(); l++) {
      const py::tuple& tail = tails_[l];
      py::tuple args(head + tail.size());
      for (size_t i = 0; i < head; i++) args[i] = objects[i];
      for (size_t i = 0; i < tail.size(); i++) args[head + i] = tail[i];
      if (kept) {
        runners[l](args);
      } else {
        runners[l] = launches_[l](args);
        all_kept = all_kept && !runners[l].is_none();
      }
    }
    if (!kept && all_kept) {  // (a launch that raised kept nothing)
      runners_ = std::move(runners);
      alignment_ = alignment;
      have_runners_ = true;
    }
  }

 private:
  int64_t ws_index_;
  int64_t ws_numel_;
  at::Tensor workspace_;
  py::tuple scalars_;
  std::vector<py::tuple> tails_;
  std::vector<py::object> launches_;
  std::vector<py::object> runners_;
  bool have_runners_ = false;
  uint32_t alignment_ = 0;
};

class PreparedRead;

// Every PreparedRead alive, by id. An autograd node keeps only the id of the one it was read
// with (its saved_data holds ints and tensors, which compiled autograd can collect; a capsule it
// cannot): the layer owns the PreparedRead, and a node whose PreparedRead is gone (the layer
// prepared anew, or was freed) calls the Python backward. Used with the GIL held, always:
// PreparedReads are made and freed by Python objects, and a node's backward takes the GIL first.
static std::unordered_map<int64_t, PreparedRead*> prepared_reads;
static int64_t next_prepared_id = 0;

// One layer's reads for one signature and training flag (ops._prepared_read): the forward's
// launches and, for an incoming gradient with W_sn's strides (autograd's usual), the backward's.
class PreparedRead {
 public:
  PreparedRead(int64_t saved_numel, bool writes_uv, std::shared_ptr<PreparedLaunches> forward,
               std::shared_ptr<PreparedLaunches> backward, std::vector<int64_t> weight_strides,
               std::vector<int64_t> grad_strides)
      : id(next_prepared_id++), saved_numel_(saved_numel), writes_uv_(writes_uv), forward_(std::move(forward)),
        backward_(std::move(backward)), weight_strides_(std::move(weight_strides)),
        grad_strides_(std::move(grad_strides)) {
    prepared_reads[id] = this;
  }
  ~PreparedRead() { prepared_reads.erase(id); }
  PreparedRead(const PreparedRead&) = delete;
  PreparedRead& operator=(const PreparedRead&) = delete;

  static PreparedRead* find(int64_t id) {
    auto it = prepared_reads.find(id);
    return it == prepared_reads.end() ? nullptr : it->second;
  }

  // W_sn and saved = [v | u | sigma]; u, v updated in place (training).
  std::pair<at::Tensor, at::Tensor> read(const at::Tensor& weight, const at::Tensor& u,
                                         const at::Tensor& v, const at::Tensor& sigma_buf,
                                         const at::Tensor& sem) {
    at::Tensor out = at::empty_like(weight, at::MemoryFormat::Preserve);  // torch.empty_like's
    at::Tensor saved = at::empty({saved_numel_}, weight.options());
    forward_->run({weight, out, u, v, saved, sigma_buf, sem});
    // The kernel wrote these through raw pointers: their version counters must say so, as an
    // in-place op's do, or a backward that saved one before this read would use the new values
    // without a word (autograd's "modified by an inplace operation" error, as PyTorch's SN gives).
    // Not the semaphore, which the barriers leave as they found it.
    bump_version(sigma_buf);
    if (writes_uv_) {
      bump_version(u);
      bump_version(v);
    }
    return {out, saved};
  }

  // dW through the prepared backward, or an undefined tensor where it does not take these
  // inputs: it needs grad mode off (not create_graph=True), a plain dense gradient (not vmapped:
  // batched gradients; not a subclass) with the strides it was prepared for, the weight as saved
  // with the strides it was read with (a saved-tensor hook, or .data set meanwhile, may give it
  // others) and the dtype of the gradient, and ops to say its launches may run kept (no
  // dispatch mode, launch hook or torch.func transform). Else ops._eager_backward decides.
  at::Tensor backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& saved,
                      const at::Tensor& sem) {
    if (!backward_ || at::GradMode::is_enabled()) return at::Tensor();
    const c10::TensorImpl* impl = grad.unsafeGetTensorImpl();
    if (typeid(*impl) != typeid(c10::TensorImpl) || impl->key_set().has(c10::DispatchKey::Python) ||
        grad.strides() != c10::IntArrayRef(grad_strides_) ||
        weight.strides() != c10::IntArrayRef(weight_strides_) ||
        weight.scalar_type() != grad.scalar_type() || saved.scalar_type() != grad.scalar_type() ||
        fast_launches_ok == nullptr || !(*fast_launches_ok)().cast<bool>()) {
      return at::Tensor();
    }
    at::Tensor grad_weight = at::empty_like(weight, at::MemoryFormat::Preserve);
    backward_->run({grad, weight, grad_weight, saved, sem});
    return grad_weight;
  }

  const int64_t id;

 private:
  // (torch.autograd.graph.increment_version's: an inference tensor has no version counter)
  static void bump_version(const at::Tensor& t) {
    if (!t.is_inference()) torch::autograd::impl::bump_version(t);
  }

  int64_t saved_numel_;
  bool writes_uv_;  // a training read with power iterations: u and v are written
  std::shared_ptr<PreparedLaunches> forward_;
  std::shared_ptr<PreparedLaunches> backward_;  // null: none prepared (ops._eager_backward)
  std::vector<int64_t> weight_strides_;
  std::vector<int64_t> grad_strides_;
};

// What a layer's checks looked at in its inputs (ops.spectral_norm._input_signature, whose
// twin this is): type, sizes, strides, dtype and device of the weight, u, v and sem (sigma_buf:
// no strides), whether u, v, sigma_buf or sem is an inference tensor, whether u or v requires
// grad, the addresses of u, v, sigma_buf and sem (not the weight's), the type and value of dim,
// n_power_iterations and eps. The layer keeps the signature of its last checked read and skips
// the checks while matches() holds, which builds no Python object: ~0.3 us per read on a CPU
// where the Python tuple and its comparison took ~2. Made only for tensors of the plain types
// (torch.Tensor, nn.Parameter; ops decides): a subclass may answer .shape in Python otherwise
// than its TensorImpl, so a tensor of any other type never matches here.
class ReadSignature {
 public:
  ReadSignature(py::handle weight, py::handle u, py::handle v, py::handle sigma_buf, py::handle sem,
                py::object dim, py::object n_power_iterations, py::object eps) {
    py::handle tensors[5] = {weight, u, v, sigma_buf, sem};
    for (int i = 0; i < 5; i++) {
      TORCH_CHECK_TYPE(THPVariable_Check(tensors[i].ptr()), "sn_fused: ReadSignature takes tensors");
      types_[i] = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(Py_TYPE(tensors[i].ptr())));
      const at::Tensor& t = THPVariable_Unpack(tensors[i].ptr());
      sizes_[i] = t.sizes().vec();
      strides_[i] = t.strides().vec();
      dtypes_[i] = t.scalar_type();
      devices_[i] = t.device();
      data_ptrs_[i] = i == 0 ? nullptr : address(t);
      requires_grad_[i] = (i == 1 || i == 2) && t.requires_grad();
    }
    inference_ = any_inference(tensors);
    arguments_[0] = std::move(dim);
    arguments_[1] = std::move(n_power_iterations);
    arguments_[2] = std::move(eps);
  }

  bool matches(py::handle weight, py::handle u, py::handle v, py::handle sigma_buf, py::handle sem,
               py::handle dim, py::handle n_power_iterations, py::handle eps) const {
    py::handle tensors[5] = {weight, u, v, sigma_buf, sem};
    for (int i = 0; i < 5; i++) {
      if (reinterpret_cast<PyObject*>(Py_TYPE(tensors[i].ptr())) != types_[i].ptr()) return false;
      const at::Tensor& t = THPVariable_Unpack(tensors[i].ptr());
      if (t.sizes() != c10::IntArrayRef(sizes_[i]) || t.scalar_type() != dtypes_[i] ||
          t.device() != devices_[i] || (i != 3 && t.strides() != c10::IntArrayRef(strides_[i])) ||
          (i != 0 && address(t) != data_ptrs_[i]) ||
          ((i == 1 || i == 2) && t.requires_grad() != requires_grad_[i])) {
        return false;
      }
    }
    if (any_inference(tensors) != inference_) return false;
    // As the tuple's comparison: the same type, then ==, identity first (a NaN eps matches itself).
    py::handle arguments[3] = {dim, n_power_iterations, eps};
    for (int i = 0; i < 3; i++) {
      if (Py_TYPE(arguments[i].ptr()) != Py_TYPE(arguments_[i].ptr())) return false;
      const int equal = PyObject_RichCompareBool(arguments[i].ptr(), arguments_[i].ptr(), Py_EQ);
      if (equal != 1) {
        if (equal < 0) PyErr_Clear();
        return false;
      }
    }
    return true;
  }

 private:
  // ops.spectral_norm._address's: the data pointer, null for a tensor without storage (a
  // functorch wrapper that outlived its transform), which data_ptr() refuses.
  static const void* address(const at::Tensor& t) { return t.has_storage() ? t.const_data_ptr() : nullptr; }

  // Whether u, v, sigma_buf or sem is an inference tensor (what a read writes).
  static bool any_inference(const py::handle (&tensors)[5]) {
    for (int i = 1; i < 5; i++) {
      if (THPVariable_Unpack(tensors[i].ptr()).is_inference()) return true;
    }
    return false;
  }

  py::object types_[5];
  std::vector<int64_t> sizes_[5];
  std::vector<int64_t> strides_[5];
  at::ScalarType dtypes_[5];
  c10::Device devices_[5] = {c10::kCPU, c10::kCPU, c10::kCPU, c10::kCPU, c10::kCPU};
  const void* data_ptrs_[5];
  bool requires_grad_[5];
  bool inference_;
  py::object arguments_[3];
};

// u, v, sigma_buf and sem, in one argument: autograd::Function takes each tensor argument for an
// input of the node, and these need no gradient (the Python Function hides them in a tuple too).
struct ReadState {
  at::Tensor u, v, sigma_buf, sem;
};

// W_sn = W / sigma with its backward dW = (G - <G, W_sn> u v^T) / sigma.
// The C++ counterpart of ops.spectral_norm._SpectralNormFunction's eager branches.
struct SpectralNormFunction : public torch::autograd::Function<SpectralNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const ReadState& state,
                            int64_t dim, PreparedRead* prepared) {
    auto [out, saved] = prepared->read(weight, state.u, state.v, state.sigma_buf, state.sem);
    ctx->save_for_backward({weight, saved});
    ctx->saved_data["sem"] = state.sem;  // not a saved variable: the barrier's counter, never versioned
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["prepared"] = prepared->id;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();  // weight, saved
    at::Tensor sem = ctx->saved_data["sem"].toTensor();
    at::Tensor grad_weight;
    {
      // The engine runs this without the GIL (a Python Function's node takes it the same way).
      py::gil_scoped_acquire gil;
      try {
        PreparedRead* prepared = PreparedRead::find(ctx->saved_data["prepared"].toInt());
        if (prepared != nullptr) grad_weight = prepared->backward(grads[0], saved[0], saved[1], sem);
        if (!grad_weight.defined()) {
          TORCH_CHECK(backward_callback != nullptr, "sn_fused._C: set_callbacks was not called");
          grad_weight = (*backward_callback)(grads[0], saved[0], saved[1], sem, ctx->saved_data["dim"].toInt())
                            .cast<at::Tensor>();
        }
      } catch (py::error_already_set& e) {
        e.restore();  // the Python error itself reaches the caller of backward, as from a PyNode
        throw python_error();
      }
    }
    // One gradient per forward argument: the weight's, then none for the rest.
    return {grad_weight, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// A read that autograd records (the weight requires grad, grad mode on).
at::Tensor read(PreparedRead& prepared, const at::Tensor& weight, const at::Tensor& u,
                const at::Tensor& v, const at::Tensor& sigma_buf, const at::Tensor& sem, int64_t dim) {
  return SpectralNormFunction::apply(weight, ReadState{u, v, sigma_buf, sem}, dim, &prepared);
}

// A read with nothing to record (no_grad, or a weight that does not require grad): W_sn only.
at::Tensor forward(PreparedRead& prepared, const at::Tensor& weight, const at::Tensor& u,
                   const at::Tensor& v, const at::Tensor& sigma_buf, const at::Tensor& sem) {
  return prepared.read(weight, u, v, sigma_buf, sem).first;
}

}  // namespace sn_fused
#pragma GCC visibility pop

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace sn_fused;
  m.doc() = "sn_fused's eager read in C++ (see csrc/spectral_norm_read.cpp)";
  // What sn_fused.ops.spectral_norm expects of this module: a build of an older source is refused.
  m.attr("INTERFACE_VERSION") = 6;
  py::class_<PreparedLaunches, std::shared_ptr<PreparedLaunches>>(m, "PreparedLaunches")
      .def(py::init<int64_t, int64_t, at::Tensor, py::tuple, std::vector<py::tuple>, std::vector<py::object>>(),
           py::arg("ws_index"), py::arg("ws_numel"), py::arg("workspace"), py::arg("scalars"),
           py::arg("tails"), py::arg("launches"));
  py::class_<PreparedRead>(m, "PreparedRead")
      .def(py::init<int64_t, bool, std::shared_ptr<PreparedLaunches>, std::shared_ptr<PreparedLaunches>,
                    std::vector<int64_t>, std::vector<int64_t>>(),
           py::arg("saved_numel"), py::arg("writes_uv"), py::arg("forward"), py::arg("backward"),
           py::arg("weight_strides"), py::arg("grad_strides"));
  py::class_<ReadSignature>(m, "ReadSignature")
      .def(py::init<py::handle, py::handle, py::handle, py::handle, py::handle, py::object, py::object,
                    py::object>(),
           py::arg("weight"), py::arg("u"), py::arg("v"), py::arg("sigma_buf"), py::arg("sem"), py::arg("dim"),
           py::arg("n_power_iterations"), py::arg("eps"))
      .def("matches", &ReadSignature::matches, "whether these inputs have this signature", py::arg("weight"),
           py::arg("u"), py::arg("v"), py::arg("sigma_buf"), py::arg("sem"), py::arg("dim"),
           py::arg("n_power_iterations"), py::arg("eps"));
  m.def("read", &sn_fused::read, "a recorded read: W_sn with its C++ autograd node");
  m.def("forward", &sn_fused::forward, "a read with nothing to record: W_sn");
  m.def("set_callbacks", &set_callbacks, "the Python functions the node's backward calls");
}
