// Python bindings of the CUDA I2Correlation kernels (fod_kernels._C_cuda; host API in
// i2corr_cuda.cu). The signatures are those of the CPU extension (fod_kernels._C), so
// fod_kernels/backend_cuda.py mirrors backend_cpu.py.
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> i2corr_cuda_forward(const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
                                            const std::vector<at::Tensor>& vs,
                                            const std::vector<at::Tensor>& sigmas, int64_t rows, int64_t cols,
                                            double scale, double eps, const std::vector<bool>& need_stats,
                                            const std::vector<at::Tensor>& masks);

std::vector<at::Tensor> i2corr_cuda_backward(
    const std::vector<at::Tensor>& g_outs, const std::vector<at::Tensor>& g_kl_attns,
    const std::vector<at::Tensor>& g_kl_priors, const std::vector<at::Tensor>& g_ents,
    const std::vector<at::Tensor>& dfulls, const std::vector<at::Tensor>& qs, const std::vector<at::Tensor>& ks,
    const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas, const std::vector<at::Tensor>& lses,
    int64_t rows, int64_t cols, double scale, double eps, const std::vector<at::Tensor>& masks);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fod_kernels: fused I2Correlation kernels for CUDA (float32, bfloat16, float16; fp32 accumulation)";
  m.def("forward", &i2corr_cuda_forward,
        "I2Correlation forward over a list of branches: per branch out, lse, kl, ent, r1, r2 (masks: one "
        "key_padding_mask per branch, an empty tensor for none; no list: none)",
        py::arg("qs"), py::arg("ks"), py::arg("vs"), py::arg("sigmas"), py::arg("rows"), py::arg("cols"),
        py::arg("scale"), py::arg("eps"), py::arg("need_stats"), py::arg("masks") = std::vector<at::Tensor>{});
  m.def("backward", &i2corr_cuda_backward,
        "I2Correlation backward over a list of branches: per branch dq, dk, dv, dsigma",
        py::arg("g_outs"), py::arg("g_kl_attns"), py::arg("g_kl_priors"), py::arg("g_ents"), py::arg("dfulls"), py::arg("qs"),
        py::arg("ks"), py::arg("vs"), py::arg("sigmas"), py::arg("lses"), py::arg("rows"), py::arg("cols"),
        py::arg("scale"), py::arg("eps"), py::arg("masks") = std::vector<at::Tensor>{});
}
