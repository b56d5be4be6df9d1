"""Tests of the GPU readiness tool (metalm_fast.tools.gpu_readiness).

Three layers:

- parsers, on canned ``ptxas -v`` / ``cuobjdump`` text (always run);
- the compile pipeline end to end on a private fixture (``tiny_configs``: a
  small Triton matmul, plus a copy of it too big for shared memory, and a
  kernel that does no matmul) and on a throwaway .cu file with nvcc;
- the shipped span-attention configurations: a representative subset (one per
  pass/arch/dtype, the largest tiles) must have zero spills, shared memory
  within the per-block limit and tensor-core instructions. The CLI checks
  every config; its recorded table is benchmarks/results/gpu_readiness_*.txt.

Compilation runs in worker subprocesses with TRITON_INTERPRET removed, so
these tests pass even when other test modules set TRITON_INTERPRET=1 in this
process (``test_compile_ignores_interpreter_flag`` makes sure of it). Skipped
with a reason when Triton or its bundled ptxas is missing.
"""

from __future__ import annotations

import importlib.util

import pytest

from metalm_fast.tools import gpu_readiness as gr
from metalm_fast.tools import ptx_tools

_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_toolchain = pytest.mark.skipif(
    not _HAS_TRITON or ptx_tools._triton_bin("ptxas-blackwell") is None,
    reason="needs triton with its bundled ptxas-blackwell (triton/backends/nvidia/bin)",
)
TINY = f"{__name__}:tiny_configs"


# ----------------------------------------------------------------------------- fixture kernels
def tiny_configs():
    """The private fixture: KernelConfigs for small kernels with known resource profiles.

    Imported by the tool's worker processes (``module:function`` provider spec);
    defined here so the tool is tested without depending on the real kernels.
    """
    import triton
    import triton.language as tl

    from metalm_fast.tools.gpu_readiness import import_kernel_module

    import_kernel_module("_config")  # registers metalm_fast.kernels from the source tree
    from metalm_fast.kernels._config import KernelConfig

    @triton.jit
    def tiny_matmul(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        inner = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rows[:, None] * K + (k + inner)[None, :])
            b = tl.load(b_ptr + (k + inner)[:, None] * BN + cols[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rows[:, None] * BN + cols[None, :], acc.to(tl.bfloat16))

    @triton.jit
    def tiny_copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n), mask=offsets < n)

    matmul_signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "K": "i32"}
    configs = []
    for arch in (80, 90):
        configs.append(
            KernelConfig(
                kernel=tiny_matmul,
                op="tiny",
                pass_name="fwd",
                arch=arch,
                signature=matmul_signature,
                constexprs={"BM": 64, "BN": 64, "BK": 32},
                num_warps=4,
                num_stages=2,
                label="bf16 64x64x32",
            )
        )
        # 256x256 tiles, K=256, 4 stages: far over any per-block shared memory limit.
        configs.append(
            KernelConfig(
                kernel=tiny_matmul,
                op="tiny",
                pass_name="fwd",
                arch=arch,
                signature=matmul_signature,
                constexprs={"BM": 256, "BN": 256, "BK": 256},
                num_warps=8,
                num_stages=4,
                label="bf16 huge-smem",
            )
        )
        configs.append(
            KernelConfig(
                kernel=tiny_copy,
                op="tiny",
                pass_name="copy",
                arch=arch,
                signature={"src_ptr": "*fp32", "dst_ptr": "*fp32", "n": "i32"},
                constexprs={"BLOCK": 1024},
                num_warps=4,
                num_stages=1,
                uses_matmul=False,
                label="fp32 BLOCK=1024",
            )
        )
    return configs


def broken_configs():
    """A provider that breaks the contract: its listing raises."""
    raise RuntimeError("shipped_configs exploded")


# ----------------------------------------------------------------------------- parsers
CANNED_TRITON_PTXAS = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function 'attn_fwd' for 'sm_90a'
ptxas-blackwell info    : Function properties for attn_fwd
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 168 registers, used 1 barriers, 1024 bytes smem
ptxas-blackwell info    : Compile time = 90.293 ms
"""

CANNED_NVCC_PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z13scatter_rowsPKfPfi' for 'sm_80'
ptxas info    : Function properties for _Z13scatter_rowsPKfPfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, 2048 bytes smem, 372 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z9big_tilesv' for 'sm_80'
ptxas info    : Function properties for _Z9big_tilesv
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 356 bytes cmem[0]
"""


def test_parse_ptxas_verbose_triton():
    usage = ptx_tools.parse_ptxas_verbose(CANNED_TRITON_PTXAS)
    assert list(usage) == ["attn_fwd"]
    entry = usage["attn_fwd"]
    assert (entry.registers, entry.static_smem, entry.arch) == (168, 1024, "sm_90a")
    assert (entry.spill_stores, entry.spill_loads) == (0, 0)


def test_parse_ptxas_verbose_nvcc_many_functions():
    usage = ptx_tools.parse_ptxas_verbose(CANNED_NVCC_PTXAS)
    # The device function _Z6helperv is not an entry, so it is not a kernel row.
    assert sorted(usage) == ["_Z13scatter_rowsPKfPfi", "_Z9big_tilesv"]
    scatter, big = usage["_Z13scatter_rowsPKfPfi"], usage["_Z9big_tilesv"]
    assert (scatter.registers, scatter.static_smem, scatter.spill_stores) == (24, 2048, 0)
    assert (big.registers, big.stack_frame, big.spill_stores, big.spill_loads) == (255, 40, 36, 28)


def test_sass_tensor_core_counts():
    sass = ptx_tools.sass_tensor_core_counts(
        "\tcode for sm_90a\n\t\tFunction : attn_fwd\n"
        "        /*0a00*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;\n"
        "        /*0a10*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
        "        /*0a20*/  FFMA R1, R2, R3, R4 ;\n"
    )
    assert sass == {"attn_fwd": 2}


def test_ptx_tensor_core():
    wgmma = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"
    assert ptx_tools.ptx_tensor_core(wgmma) == "wgmma"
    assert ptx_tools.ptx_tensor_core("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16") == "mma"
    assert ptx_tools.ptx_tensor_core("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_checks():
    base = dict(op="x", pass_name="fwd", kernel="k", label="l", uses_matmul=True)
    good = gr.Result(
        arch=90,
        expected_tensor_core="wgmma",
        ptx_tensor_core="wgmma",
        static_smem=1024,
        dynamic_smem=227 * 1024 - 1024,
        **base,
    )
    assert gr.check(good) == []
    bad = gr.Result(
        arch=90,
        expected_tensor_core="wgmma",
        ptx_tensor_core="mma",
        spill_stores=8,
        static_smem=1024,
        dynamic_smem=227 * 1024,
        **base,
    )
    failures = gr.check(bad)
    assert len(failures) == 3, failures
    assert gr.check(gr.Result(arch=80, error="compile: boom", **base)) == ["compile: boom"]


def test_representative_picks_largest_tiles_per_group():
    listing = [
        {"op": "a", "pass_name": "fwd", "arch": 80, "dtype": "bf16", "tile_size": 192},
        {"op": "a", "pass_name": "fwd", "arch": 80, "dtype": "fp16", "tile_size": 320},
        {"op": "a", "pass_name": "fwd", "arch": 80, "dtype": "fp32", "tile_size": 96},
        {"op": "a", "pass_name": "bwd", "arch": 90, "dtype": "bf16", "tile_size": 64},
    ]
    # fp16 and bf16 share a group (same code shape); fp32 is its own.
    assert gr.representative(listing) == [1, 2, 3]


def test_divisible_by_16_default_and_override():
    class Config:
        signature = {"q_ptr": "*bf16", "stride_qt": "i32", "num_queries": "i32"}
        extra: dict = {}

    assert gr.divisible_by_16(Config) == ["q_ptr", "stride_qt"]
    Config.extra = {"divisible_by_16": ["q_ptr"]}
    assert gr.divisible_by_16(Config) == ["q_ptr"]


def test_short_cuda_names():
    demangled = "void (anonymous namespace)::scatter_kernel<__half, true>(__half*, long const*)"
    assert gr._short_name(demangled) == ("scatter_kernel", "<__half, true>")
    assert gr._short_name("scale_rows(float const*, float*)") == ("scale_rows", "")


# ----------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def tiny_report():
    return gr.collect(ops=[TINY], cuda=False, log=lambda line: None)


def _by_label(report, label, arch):
    (result,) = [r for r in report.results if r.label == label and r.arch == arch]
    return result


@needs_toolchain
@pytest.mark.parametrize("arch", [80, 90])
def test_tiny_matmul_passes(tiny_report, arch):
    result = _by_label(tiny_report, "bf16 64x64x32", arch)
    assert result.ok, result.status
    assert result.registers and 0 < result.registers <= 255
    assert result.spill_bytes == 0
    assert 0 < result.shared_bytes <= gr.SMEM_LIMIT_BYTES[arch]
    assert result.ptx_tensor_core == gr.EXPECTED_TENSOR_CORE[arch]
    assert result.sass_tensor_core_count, "HMMA/HGMMA expected in the SASS"


@needs_toolchain
@pytest.mark.parametrize("arch", [80, 90])
def test_oversized_tiles_fail_shared_memory(tiny_report, arch):
    result = _by_label(tiny_report, "bf16 huge-smem", arch)
    assert not result.ok
    assert any("shared memory" in failure for failure in result.failures), result.status


@needs_toolchain
@pytest.mark.parametrize("arch", [80, 90])
def test_copy_kernel_needs_no_tensor_cores(tiny_report, arch):
    result = _by_label(tiny_report, "fp32 BLOCK=1024", arch)
    assert result.ok, result.status
    assert result.ptx_tensor_core == "none"


@needs_toolchain
def test_compile_ignores_interpreter_flag(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = gr.collect(
        ops=[TINY], archs=(80,), jobs=1, name_filter="64x64x32", cuda=False, log=lambda line: None
    )
    assert [r.status for r in report.results] == ["OK"]


@needs_toolchain
def test_missing_op_module_is_a_note_not_a_failure():
    report = gr.collect(ops=["no_such_op"], jobs=1, cuda=False, log=lambda line: None)
    assert report.results == [] and report.ok
    assert any("no_such_op" in note for note in report.notes)


@needs_toolchain
def test_broken_provider_fails_the_run():
    report = gr.collect(
        ops=[f"{__name__}:broken_configs"], jobs=1, cuda=False, log=lambda line: None
    )
    assert not report.ok
    assert any("shipped_configs exploded" in error for error in report.errors)


@needs_toolchain
def test_report_table_has_every_row(tiny_report):
    text = gr.format_report(tiny_report, "pytest")
    assert "triton:" in text and "ptxas sm_90" in text
    assert text.count("tiny_matmul") == 4 and text.count("tiny_copy") == 2


@needs_toolchain
def test_cli_exit_status_and_output_file(tmp_path, capsys):
    output = tmp_path / "report.txt"
    args = ["--ops", TINY, "--arch", "80", "--jobs", "1", "--no-cuda", "--output", str(output)]
    assert gr.main([*args, "--filter", "64x64x32"]) == 0
    assert "1 configurations, 1 OK, 0 FAIL" in output.read_text()
    assert gr.main([*args, "--filter", "huge-smem"]) == 1
    assert f"> {gr.SMEM_LIMIT_BYTES[80]} B limit" in capsys.readouterr().out


@pytest.mark.skipif(ptx_tools.find_nvcc() is None, reason="needs nvcc (CUDA toolkit)")
def test_nvcc_cuda_source(tmp_path):
    source = tmp_path / "scale_rows.cu"
    source.write_text(
        "#include <cuda_runtime.h>\n"
        "__global__ void scale_rows(const float* x, float* y, float s, int n) {\n"
        "  __shared__ float tile[256];\n"
        "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
        "  tile[threadIdx.x] = i < n ? x[i] : 0.f;\n"
        "  __syncthreads();\n"
        "  if (i < n) y[i] = tile[threadIdx.x] * s;\n"
        "}\n"
    )
    results = gr.collect_cuda([source], archs=(80, 90))
    assert [r.arch for r in results] == [80, 90]
    for result in results:
        assert result.ok, result.status
        assert (result.kernel, result.label) == ("scale_rows", "scale_rows.cu")
        assert result.static_smem == 256 * 4 and result.spill_bytes == 0


# ----------------------------------------------------------------------------- shipped kernels
def _not_ready(op: str) -> str | None:
    """Why ``op`` cannot be checked yet (its module or its shipped_configs() is not written)."""
    path = gr.REPO_ROOT / "kernels" / f"{op}.py"
    if not path.exists():
        return f"kernels/{op}.py does not exist yet"
    if "shipped_configs" not in path.read_text():
        return f"kernels/{op}.py has no shipped_configs() yet"
    return None


@needs_toolchain
@pytest.mark.parametrize("op", gr.OPS)
def test_shipped_configs(op):
    """One config per pass/arch/dtype width (largest tiles): no spills, smem fits, tensor cores."""
    if reason := _not_ready(op):
        pytest.skip(reason)
    report = gr.collect(ops=[op], subset=True, cuda=False, log=lambda line: None)
    assert not report.errors, report.errors
    assert report.results, f"no shipped configs compiled; notes: {report.notes}"
    assert {r.arch for r in report.results} == {80, 90}
    failed = [f"{r.kernel} {r.label} sm_{r.arch}: {r.status}" for r in report.results if not r.ok]
    assert not failed, "\n".join(failed)
    for result in report.results:
        assert result.spill_bytes == 0
        assert result.shared_bytes <= gr.SMEM_LIMIT_BYTES[result.arch]
        if result.uses_matmul:
            assert result.ptx_tensor_core == result.expected_tensor_core
