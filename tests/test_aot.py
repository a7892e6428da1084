"""`python -m ebkernels.aot` compiles every shipped kernel for sm_80 and sm_90 without a GPU."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_aot(tmp_path, *extra_args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "ebkernels.aot", "--arch", "80,90", "--json", str(out),
                           *extra_args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc, rows


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return run_aot(tmp_path_factory.mktemp("aot"))


def test_every_kernel_compiles_for_sm80_and_sm90(shipped):
    proc, rows = shipped
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from ebkernels._registry import registered_kernels

    names = {k.name for k in registered_kernels()}
    assert names, "no kernels registered"
    kernels = {k.name: k for k in registered_kernels()}
    for name in names:
        for arch in kernels[name].arches or (80, 90):
            mine = [r for r in rows if r["kernel"] == name and r["arch"] == arch]
            assert mine and all(r["compiled"] for r in mine), (name, arch)
    assert "| quantize_codes_kernel |" in proc.stdout
    assert "byte-wise smem stores" in proc.stdout


def test_the_report_shows_byte_wise_shared_memory_transposes(shipped):
    """sm_90 int8 wgmma takes K-major operands only: an MN-major operand goes through registers and byte-wise
    shared-memory stores (issue 11 item 5). The report counts them per build; the 1×1 weight-grad with both
    operands channel-major (X_CM) has none, the NHWC-X 3×3 weight-grad still has them."""
    _, rows = shipped
    wg = [r for r in rows if r["kernel"] == "conv2d_int8_wgrad_kernel" and r["arch"] == 90 and r["compiled"]]
    assert all(isinstance(r["smem_b8_stores"], int) for r in wg)
    xcm = [r for r in wg if r["config"].get("X_CM")]
    assert xcm and all(r["smem_b8_stores"] == 0 for r in xcm)


def test_tma_weight_grad_has_no_byte_wise_transpose(shipped):
    """Item 5 of issue 11: the sm_90 TMA weight-grad (3×3 and every stride-1 kernel with two or more taps)
    fills both operands by TMA, K-major: no byte-wise shared-memory store in any of its builds."""
    _, rows = shipped
    tma = [r for r in rows if r["kernel"] == "conv2d_int8_wgrad_tma_kernel"]
    assert tma and {r["arch"] for r in tma} == {90} and all(r["compiled"] for r in tma)
    assert all(r["smem_b8_stores"] == 0 and r["tma_loads"] > 0 and r["spills"] in (0, None) for r in tma)
    generic = [r for r in rows if r["kernel"] == "conv2d_int8_wgrad_kernel" and r["arch"] == 90
               and not r["config"].get("X_CM") and r["config"]["BM"] >= 64]
    assert max(r["smem_b8_stores"] for r in generic) > 0  # what it replaces


def test_the_report_counts_fences_and_atomics(shipped):
    """Fences and global atomics per build (issue 20: the cost model reads them; the SASS where nvdisasm is
    bundled): every compiled build has counts, and a split-K build of the forward / input-grad (its fix-up adds
    its tile into the int64 workspace with atomics) has more atomics than any one-split build."""
    proc, rows = shipped
    assert "| fences | atomics |" in proc.stdout
    built = [r for r in rows if r["compiled"]]
    assert all(isinstance(r["fences"], int) and isinstance(r["atomics"], int) for r in built)
    conv = [r for r in built if r["kernel"] == "conv2d_int8_fwd_dgrad_kernel"]
    split = [r["atomics"] for r in conv if r["config"].get("SPLIT_FIX")]
    plain = [r["atomics"] for r in conv if not r["config"].get("SPLIT_FIX")]
    assert split and plain and min(split) > max(plain)


def test_split_fixups_have_at_most_one_fence_per_program(shipped):
    """Issue 20 item 2: every split-K build (``SPLIT_FIX``: the int64 fix-up of ``mainloop.split_fixup``) of every
    GEMM kernel has at most one GPU-scope fence per program on sm_90 (relaxed int64 adds, one acquire-release
    on the tile's semaphore; it had one per element: 66 per thread at 128×128), and so has every other build
    (the last-arriver merges, the published maxima: one count-in each, at most two in one program)."""
    _, rows = shipped
    sm90 = [r for r in rows if r["arch"] == 90 and r["compiled"]]
    split = [r for r in sm90 if r["config"].get("SPLIT_FIX")]
    gemms = {"linear_int8_gemm_kernel", "conv2d_int8_fwd_dgrad_kernel", "conv2d_int8_wgrad_kernel",
             "conv2d_int8_wgrad_tma_kernel"}
    assert {r["kernel"] for r in split} == gemms
    assert all(r["fences"] <= 1 for r in split), [(r["kernel"], r["config"], r["fences"]) for r in split
                                                   if r["fences"] > 1]
    assert max(r["fences"] for r in sm90) <= 2
    assert all(r["atomics"] > 1 for r in split)  # the adds themselves are still there, as relaxed REDs


def test_gemm_kernels_use_int8_tensor_cores(shipped):
    _, rows = shipped
    for r in rows:
        if r["int8_mma_expected"]:
            # sm_90: wgmma, except tiles below its 64-row minimum (the 16/32-row weight-grad tiles of the
            # tile table), which Triton builds with mma.sync: int8 tensor cores all the same
            want = "wgmma" if r["arch"] == 90 and r["config"].get("BM", 64) >= 64 else "mma.sync"
            assert any(want in m and ".s8" in m for m in r["mma_s8"]), r


def test_failures_are_reported_with_nonzero_exit(tmp_path):
    bad = tmp_path / "bad_kernels.py"
    bad.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        from ebkernels._registry import aot_kernel

        @aot_kernel(signature={"x_ptr": "*fp32"}, constexprs={"BLOCK": 100}, name="aot_test_bad_block")
        @triton.jit
        def bad_block(x_ptr, BLOCK: tl.constexpr):
            tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # arange needs a power of two

        @aot_kernel(signature={"x_ptr": "*fp32", "y_ptr": "*fp32"}, constexprs={"BLOCK": 32},
                    name="aot_test_float_dot", int8_mma=True)
        @triton.jit
        def float_dot(x_ptr, y_ptr, BLOCK: tl.constexpr):
            r = tl.arange(0, BLOCK)
            a = tl.load(x_ptr + r[:, None] * BLOCK + r[None, :])
            tl.store(y_ptr + r[:, None] * BLOCK + r[None, :], tl.dot(a, a))  # float, not int8
    '''))
    proc, rows = run_aot(tmp_path, "--extra-module", str(bad), "--kernel", "aot_test")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    by_name = {(r["kernel"], r["arch"]): r for r in rows}
    assert not by_name[("aot_test_bad_block", 80)]["compiled"]
    assert "NO:" in proc.stdout
    assert by_name[("aot_test_float_dot", 90)]["compiled"]
    assert by_name[("aot_test_float_dot", 90)]["mma_s8"] == []
    assert "MISSING" in proc.stdout


def test_bad_arch_is_rejected(tmp_path):
    proc, _ = run_aot(tmp_path, "--arch", "75")
    assert proc.returncode == 2 and "compute capability 80 or newer" in proc.stderr


def test_no_register_spills(shipped):
    """Spills are local-memory traffic in every loop iteration: the shipped configs have none."""
    _, rows = shipped
    spilled = [(r["kernel"], r["config"], r["arch"], r["spills"]) for r in rows if r["spills"]]
    assert not spilled, spilled


def test_a_build_report_is_kept_by_the_binary_hash(tmp_path, monkeypatch):
    """A build Triton takes from its cache runs no ptxas: its registers and spills come from the report kept for
    the same binary (``aot._binary_report``); another binary gets its own, and a damaged report is made again."""
    from ebkernels import aot

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    log = "ptxas info    : Used 40 registers\n    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads"
    first = aot._binary_report(b"cubin-one", "no fences here", 90, log)
    assert (first["registers"], first["spills"], first["fences"], first["atomics"]) == (40, 12, 0, 0)
    monkeypatch.setattr(aot, "_resource_usage", lambda ptx, arch: (None, None))  # no ptxas from here on
    assert aot._binary_report(b"cubin-one", "no fences here", 90, "") == first
    assert aot._binary_report(b"cubin-two", "no fences here", 90, "")["registers"] is None
    kept = list(tmp_path.glob("ebkernels_aot/*/*.json"))
    assert len(kept) == 1
    kept[0].write_text("{")  # damaged
    again = aot._binary_report(b"cubin-one", "no fences here", 90, log.replace("40", "41"))
    assert again["registers"] == 41
