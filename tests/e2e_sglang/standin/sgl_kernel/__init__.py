"""Import-only stand-in for ``sgl_kernel`` (tests and ``kvdirect demo --engine sglang`` only).

What it is: an empty module named ``sgl_kernel``. Why: with
``SGLANG_USE_CPU_ENGINE=1`` SGLang 0.5.23 imports a few CPU ops from
``sgl_kernel`` at module level (``assign_req_to_token_pool_cpu``,
``copy_all_layer_kv_cache_cpu`` and speculative-decoding helpers), and the CPU
build of sgl-kernel is not on PyPI (the ``sgl-kernel`` wheels there link CUDA).
For a dense Qwen2/Llama without speculative decoding none of these functions is
ever called, so satisfying the imports is enough.

Any call into it is an error: it raises, and appends the function's name to the
file named by ``KVDIRECT_SGL_KERNEL_CALLS`` so that the test which started the
server fails even if SGLang swallowed the exception. It registers no torch ops,
so SGLang's AMX detection (``torch.ops.sgl_kernel.*``) sees none.
"""
import os


class _Forbidden:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        path = os.environ.get("KVDIRECT_SGL_KERNEL_CALLS")
        if path:
            with open(path, "a") as f:
                f.write(self.name + "\n")
        raise RuntimeError(f"sgl_kernel.{self.name} was called, but sgl_kernel here is an "
                           "import-only stand-in (tests/e2e_sglang/standin)")

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in for {self.name}>"


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Forbidden(name)
