"""Every Triton kernel compiles for an H200 (sm_90) here, without a GPU, so GPU-only compile errors (layout or
type mismatches the interpreter never sees) are caught before a GPU session.

Runs in a subprocess: under TRITON_INTERPRET=1 (set by conftest when no GPU is present) kernels are not compilable.
The installed Triton is always checked. CONMIM_EXTRA_TRITON names more Triton installs (folders made with
``pip install --target DIR triton==X``, separated by os.pathsep) to compile with as well: .ci/run adds the Triton
that the GPU machine has (3.6), so a kernel that only an older Triton rejects is caught here too.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed")

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from conmim.kernels import ema, patch_contrast as pc

    target = GPUTarget("cuda", 90, 32)
    PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}

    def pc_sig(fn, dt, const, N, D):
        # As the JIT specialises a call on contiguous [B, N, D] inputs: ints equal to 1 become constants, small
        # ints are i32, pointers and ints divisible by 16 carry that hint (it changes vector widths and the
        # pipeliner's staging, hence the shared memory this test checks).
        ints = dict(s_sb=N * D, s_sn=D, s_sd=1, t_sb=N * D, t_sn=D, t_sd=1, p_sb=N, p_sn=1, g_sb=N, g_sn=1,
                    N=N, D=D)
        sig, attrs, cx = {}, {}, dict(const)
        for i, n in enumerate(fn.arg_names):
            if n in const:
                sig[n] = "constexpr"
                continue
            if n in ("s_ptr", "t_ptr", "ds_ptr", "dt_ptr"):
                sig[n] = PTR[dt]
            elif n in ("order_ptr", "pos_ptr"):
                sig[n] = "*i64"
            elif n == "counts_ptr":
                sig[n] = "*i32"
            elif n.endswith("_ptr"):
                sig[n] = "*fp32"
            elif n in ("inv_tau", "eps"):
                sig[n] = "fp32"
                continue
            elif ints[n] == 1:
                sig[n] = "constexpr"
                cx[n] = 1
                continue
            else:
                sig[n] = "i32"
                if ints[n] % 16:
                    continue
            attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, cx, attrs

    results = []
    kernels = [pc._patch_contrast_fwd_kernel, pc._patch_contrast_bwd_q_kernel, pc._patch_contrast_bwd_k_kernel]
    cases = [("fp32", 256, True, False), ("bf16", 256, True, False), ("fp16", 256, True, True),
             ("bf16", 16, False, True), ("bf16", 768, True, True), ("fp32", 1024, True, False),
             ("bf16", 2048, True, False)]
    for fn in kernels:
        for dt, D, normalize, has_pos in cases:
            bm, bn, bd, warps = pc._blocks(D, 196)
            const = dict(HAS_POS=has_pos, NORMALIZE=normalize, DOT_FP32=dt == "fp32", IEEE=dt == "fp32",
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
            sig, cx, attrs = pc_sig(fn, dt, const, 196, D)
            src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
            k = triton.compile(src, target=target, options={"num_warps": warps})
            results.append([fn.__name__, dt, D, k.metadata.shared])
    import triton.language as tl
    for t_dt, s_dt in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "fp16")):
        fn = ema._ema_update_kernel
        const = dict(T_DTYPE=getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[t_dt]),
                     S_DTYPE=getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[s_dt]),
                     HAS_MPTR=True, BLOCK=ema.BLOCK)
        sig = {n: ("constexpr" if n in const else ("*i64" if n.endswith("_ptr") and n != "momentum_ptr"
               else ("*fp32" if n == "momentum_ptr" else "fp32"))) for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, constexprs=const), target=target, options={"num_warps": 4})
        results.append([fn.__name__, t_dt + "/" + s_dt, 0, k.metadata.shared])
    print(json.dumps({"triton": triton.__version__, "file": triton.__file__, "kernels": results}))
    """
)


EXTRA = [p for p in os.environ.get("CONMIM_EXTRA_TRITON", "").split(os.pathsep) if p]


@pytest.mark.parametrize("triton_dir", [None, *EXTRA], ids=lambda p: "installed" if p is None else p)
def test_all_triton_kernels_compile_for_sm90(triton_dir):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if triton_dir is not None:
        if not os.path.isdir(os.path.join(triton_dir, "triton")):
            raise FileNotFoundError(f"CONMIM_EXTRA_TRITON entry {triton_dir!r} holds no triton package")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_dir, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if triton_dir is not None:
        assert os.path.realpath(out["file"]).startswith(os.path.realpath(triton_dir)), (
            f"compiled with {out['file']}, not the Triton in {triton_dir}"
        )
    results = out["kernels"]
    assert len(results) == 3 * 7 + 3
    for name, dt, D, shared in results:
        assert shared <= 227 * 1024, (
            f"{name} {dt} (triton {out['triton']}) D={D} needs {shared} bytes of shared memory"
        )
