"""``python -m benchmarks static``: the sm_90 (H200) static profile of every GPU kernel; compiled, not run.

Compiles every Triton kernel for ``GPUTarget("cuda", 90, 32)`` at the configurations users run (the loss in
bf16/fp16 at d = 256..2048 and fp32 at d = 256 and 768, with and without ``positive_index``; the EMA for every
dtype pair), reads the CUDA kernels of the built extension (``conmim/_C*.so``, sm_90), and records per kernel
what the binary says: warps, registers, spill stores, stack, shared memory, resident warps per SM, and the SASS
instruction mix (MMA, FFMA inside loops, 16-byte global accesses, cp.async, TMA). It adds an *estimate*, labelled
as one, for the benchmark grid (B=256, N=196, 75 masked patches per image; the EMA at ViT-B size): bytes over
4.8 TB/s, MMA FLOPs actually issued (tile padding and warp replication included) over the tensor-core peak, and
waves. Nothing here runs a kernel; the tools (ptxas, cuobjdump) ship inside the triton wheel.

Compilation runs in a worker subprocess (``--worker``) with TRITON_INTERPRET=0 and the chosen Triton first on
its path: the installed one, and each folder named in CONMIM_EXTRA_TRITON (``pip install --target DIR triton==X``,
separated by os.pathsep; .ci/run adds the GPU machine's 3.6). Triton's own on-disk cache keys every binary by
source and options, so tests/test_triton_sm90.py, which calls :func:`profile_triton`, and this benchmark compile
each kernel once between them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = ROOT / "docs" / "performance.md"  # the generated page; the README links it
START, END = "<!-- static:start -->", "<!-- static:end -->"


@dataclass(frozen=True)
class H200:
    """Per-SM limits of sm_90 and the H200's datasheet rates (dense)."""

    sms: int = 132
    regs: int = 65536
    smem: int = 228 * 1024  # per SM; a block may use 227 KB, and 1 KB per block is reserved
    smem_reserved: int = 1024
    max_warps: int = 64
    max_blocks: int = 32
    hbm_bytes_per_s: float = 4.8e12
    mma_flops_per_s: tuple = (("BF16", 989e12), ("F16", 989e12), ("TF32", 494e12))
    ffma_flops_per_s: float = 67e12


GPU = H200()
# The estimate's grid: a ViT-B/16 batch at 224 px with ~40% of 196 patches masked; the EMA over ViT-B + head.
GRID = dict(B=256, N=196, masked=75)
VIT_B_BATCH = 128  # conmim/configs/vit_b.yaml's batch per GPU: the loss's B on one GPU of that recipe
# What the estimate cannot see, stated next to its numbers (docs/performance.md, the results file)
ASSUMPTIONS = (
    "each kernel's time is max(DRAM bytes / 4.8 TB/s, issued MMA FLOPs / dense peak), as if every load were "
    "in flight and every MMA issued back to back: memory latency, instruction issue, barriers, the softmax's "
    "FP32 and MUFU work, L2 misses on re-read rows and clocks below boost are not modelled; waves are reported "
    "but not charged (a partial last wave would add up to ceil(waves) / waves to a compute-bound kernel), nor is "
    "occupancy too low to hide latency; kernels "
    "run back to back with no launch overhead, and the forward's work order (torch ops) is not counted"
)
EMA_PARAMS = 106_000_000
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
LOSS_DIMS = {"bf16": (256, 384, 768, 1024, 2048), "fp16": (256, 384, 768, 1024, 2048), "fp32": (256, 768)}


@dataclass(frozen=True)
class LossKernel:
    """What one loss kernel computes over GRID, for the estimate. Each iteration of its main loop computes the
    logits over every feature chunk (``logits``) and/or one gradient product over its own chunk
    (``gradient``); its programs own query tiles and loop over the keys, or own key tiles and loop over the
    masked queries (``over_keys``); ``per_chunk``: one program per feature chunk of its output. ``writes``:
    "loss" (loss and lse), "w" (the stored gradient of the logits, fp32) or "grad" (one feature gradient);
    ``reads_w``: reads that stored gradient."""

    logits: bool
    gradient: bool
    over_keys: bool
    per_chunk: bool
    writes: str
    reads_w: bool = False

    @property
    def products(self) -> int:
        return int(self.logits) + int(self.gradient)


LOSS_KERNELS = {
    "fwd": LossKernel(logits=True, gradient=False, over_keys=False, per_chunk=False, writes="loss"),
    "bwd_q": LossKernel(logits=True, gradient=True, over_keys=False, per_chunk=True, writes="grad"),
    "bwd_k": LossKernel(logits=True, gradient=True, over_keys=True, per_chunk=True, writes="grad"),
    "bwd_w": LossKernel(logits=True, gradient=False, over_keys=False, per_chunk=False, writes="w"),
    "bwd_wq": LossKernel(
        logits=False, gradient=True, over_keys=False, per_chunk=True, writes="grad", reads_w=True
    ),
    "bwd_wk": LossKernel(
        logits=False, gradient=True, over_keys=True, per_chunk=True, writes="grad", reads_w=True
    ),
}


@dataclass(frozen=True)
class Case:
    """One Triton kernel configuration. dtype: features' dtype (loss) or "teacher/student" (EMA)."""

    kernel: str
    dtype: str
    d: int = 0
    has_pos: bool = False

    @property
    def id(self) -> str:
        if self.kernel == "ema":
            return f"ema-{self.dtype.replace('/', '-')}"
        return f"{self.kernel}-{self.dtype}-d{self.d}" + ("-pos" if self.has_pos else "")


def loss_kernels(dtype: str, d: int) -> tuple[str, ...]:
    """The loss kernels a GPU launches at GRID's N for features of this dtype and width, teacher gradient on
    (the launcher's own choice of backward, with the GPU's tiles)."""
    import torch

    from conmim.kernels.patch_contrast import backward_kernels

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return ("fwd", *backward_kernels(dt, dt, GRID["N"], d, True, interpret=False))


def cases() -> list[Case]:
    loss = [
        Case(k, dt, d, pos)
        for dt, dims in LOSS_DIMS.items()
        for d in dims
        for pos in (False, True)
        for k in loss_kernels(dt, d)
    ]
    return loss + [Case("ema", f"{t}/{s}") for t in ITEMSIZE for s in ITEMSIZE]


# ----------------------------------------------------------------------------------------------- SASS reading
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
# fp16 operands carry no type suffix (HMMA.16816.F32, HGMMA.64x32x16.F32)
_HMMA = re.compile(r"HMMA\.(16)(8)(\d+)\.F32(?:\.(\w+))?")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?")


def _tools() -> Path:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        raise RuntimeError("benchmarks static: triton is not installed; its wheel ships cuobjdump")
    return Path(spec.origin).parent / "backends" / "nvidia" / "bin"


def _cuobjdump(*args: str) -> str:
    out = subprocess.run(
        [str(_tools() / "cuobjdump"), *args], capture_output=True, text=True, check=True, timeout=300
    )
    return out.stdout


def mma_flops(opcode: str) -> tuple[str, int, bool] | None:
    """(operand kind, FLOPs, per warpgroup) of one MMA instruction, or None for any other opcode."""
    m = _HGMMA.match(opcode) or _HMMA.match(opcode)
    if m is None:
        return None
    a, b, c = (int(x) for x in m.groups()[:3])
    return m.group(4) or "F16", 2 * a * b * c, opcode.startswith("HGMMA")


def sass_stats(sass: str, warps: int | None) -> dict:
    """Instruction mix of one function's SASS. Loops are the address ranges closed by a backward branch; the MMA
    FLOPs inside them are one iteration's work of one program (HMMA per warp, HGMMA per warpgroup), those in a
    loop nested inside another (the loss kernels' loop over feature chunks) once per inner iteration."""
    insns = [(int(a, 16), op, rest) for a, op, rest in _INSN.findall(sass)]
    ends: dict[int, int] = {}  # loop head -> its last backward branch
    for addr, op, rest in insns:
        if op.startswith("BRA") and (t := re.search(r"0x[0-9a-f]+", rest)):
            target = int(t.group(0), 16)
            if target < addr:
                ends[target] = max(addr, ends.get(target, addr))
    loops = list(ends.items())

    def depth(addr: int) -> int:
        return sum(lo <= addr <= hi for lo, hi in loops)

    def in_loop(addr: int) -> bool:
        return depth(addr) > 0

    def count(pred) -> int:
        return sum(1 for _, op, _ in insns if pred(op))

    mma_kinds: dict[str, int] = {}
    loop_flops: dict[str, float] = {}
    nested_flops: dict[str, float] = {}
    for addr, op, _ in insns:
        mma = mma_flops(op)
        if mma is None:
            continue
        kind, flops, per_group = mma
        mma_kinds[kind] = mma_kinds.get(kind, 0) + 1
        if in_loop(addr) and warps:
            loop_flops[kind] = loop_flops.get(kind, 0) + flops * (warps / 4 if per_group else warps)
        if depth(addr) > 1 and warps:
            nested_flops[kind] = nested_flops.get(kind, 0) + flops * (warps / 4 if per_group else warps)
    return {
        "instructions": len(insns),
        "mma": mma_kinds,
        "hgmma": count(lambda op: op.startswith("HGMMA")),
        "hmma": count(lambda op: op.startswith("HMMA")),
        "ffma": count(lambda op: op.startswith("FFMA")),
        "ffma_in_loops": sum(1 for a, op, _ in insns if op.startswith("FFMA") and in_loop(a)),
        "ldg_128": count(lambda op: op.startswith("LDG") and ".128" in op),
        "ldg": count(lambda op: op.startswith("LDG")),
        "stg_128": count(lambda op: op.startswith("STG") and ".128" in op),
        "stg": count(lambda op: op.startswith("STG")),
        "cp_async": count(lambda op: op.startswith("LDGSTS")),
        "tma": count(lambda op: op.startswith(("UTMALDG", "UTMASTG", "UBLKCP"))),
        "spill_stores": count(lambda op: op.startswith("STL")),
        "spill_loads": count(lambda op: op.startswith("LDL")),
        "spill_stores_in_loops": sum(1 for a, op, _ in insns if op.startswith("STL") and in_loop(a)),
        "loops": len(loops),
        "loop_mma_flops": loop_flops,
        "nested_mma_flops": nested_flops,
    }


def resource_usage(text: str) -> dict[str, dict]:
    """cuobjdump -res-usage: {function: {REG, STACK, SHARED, LOCAL}}."""
    out, name = {}, None
    for line in text.splitlines():
        if (m := re.match(r"\s*Function ([^:\s]+):", line)) is not None:
            name = m.group(1)
        elif name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return out


def split_sass(text: str) -> dict[str, str]:
    """cuobjdump -sass of several functions: {function: its SASS}."""
    parts = re.split(r"\n\s*Function : (\S+)\n", "\n" + text)
    return dict(zip(parts[1::2], parts[2::2]))


def resident_warps(regs: int, shared: int, warps: int) -> int:
    """Warps of one kernel resident per SM: registers are allocated per warp in units of 256, shared memory per
    block plus 1 KB reserved, at most 32 blocks and 64 warps."""
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = GPU.regs // (regs_per_warp * warps) if regs else GPU.max_blocks
    by_smem = GPU.smem // (shared + GPU.smem_reserved)
    blocks = min(by_regs, by_smem, GPU.max_blocks, GPU.max_warps // warps)
    return blocks * warps


# ----------------------------------------------------------------------------------------------- compiling
def _loss_signature(fn, case: Case, const: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT specialises a call on contiguous [B, N, D] inputs: ints equal to
    1 become constants, pointers and ints divisible by 16 carry that hint (it changes vector widths and the
    pipeliner's staging), other ints are i32."""
    N, D = GRID["N"], case.d
    ints = dict(
        s_sb=N * D, s_sn=D, s_sd=1, t_sb=N * D, t_sn=D, t_sd=1, p_sb=N, p_sn=1, g_sb=N, g_sn=1, N=N, D=D
    )
    ptr = "*" + case.dtype
    sig, attrs, cx = {}, {}, dict(const)
    for i, n in enumerate(fn.arg_names):
        if n in const:
            sig[n] = "constexpr"
            continue
        if n in ("s_ptr", "t_ptr", "ds_ptr", "dt_ptr"):
            sig[n] = ptr
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


def _compile_case(case: Case) -> dict:
    """Compile one case for sm_90 (worker process) and read its binary."""
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from conmim.kernels import ema
    from conmim.kernels import patch_contrast as pc

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if case.kernel == "ema":
        t_dt, s_dt = case.dtype.split("/")
        fn = ema._ema_update_kernel
        tl_dtype = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
        const = dict(
            T_DTYPE=tl_dtype[t_dt], S_DTYPE=tl_dtype[s_dt], HAS_MPTR=True, ALIGNED=True, BLOCK=ema.BLOCK
        )
        warps = ema.NUM_WARPS
        sig = {
            n: "constexpr"
            if n in const
            else "fp32"
            if n == "momentum"
            else "*fp32"
            if n == "momentum_ptr"
            else "*i64"
            for n in fn.arg_names
        }
        src = ASTSource(fn, sig, constexprs=const)
    else:
        fn = pc.KERNELS[case.kernel]
        dt = torch_dtype[case.dtype]
        # ConMIM's temperature, normalized rows: fp32 logits as 3xTF32 (pc.exact_logits)
        const, warps = pc.launch_meta(
            case.kernel, dt, dt, case.d, case.has_pos, True, temperature=0.1, interpret=False
        )
        sig, cx, attrs = _loss_signature(fn, case, const)
        src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
        # D_CHUNKS: feature chunks per row, looped over inside a program or one program each
        const = {k: v for k, v in const.items() if k.startswith("BLOCK")}
        const["D_CHUNKS"] = math.ceil(case.d / const["BLOCK_D"])
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = next(iter(resource_usage(_cuobjdump("-res-usage", str(cubin))).values()))
        sass = _cuobjdump("-sass", str(cubin))
    shared = max(int(k.metadata.shared), res["SHARED"])
    return {
        "id": case.id,
        **asdict(case),
        "source": "triton",
        "warps": warps,
        "tiles": {k: v for k, v in const.items() if k.startswith(("BLOCK", "D_CHUNKS"))},
        "registers": res["REG"],
        "stack_bytes": res["STACK"],
        "local_bytes": res["LOCAL"],
        "shared_bytes": shared,
        "resident_warps": resident_warps(res["REG"], shared, warps),
        **sass_stats(sass, warps),
    }


def _worker(out: str, jobs: int) -> None:
    import triton

    todo = cases()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        records = list(pool.map(_compile_case, todo))
    payload = {"triton": triton.__version__, "triton_file": triton.__file__, "records": records}
    Path(out).write_text(json.dumps(payload))


def profile_triton(triton_dir: str | None = None, jobs: int | None = None) -> dict:
    """Compile every case with the installed Triton, or with the one in ``triton_dir``, in a subprocess.
    Returns {"triton": version, "triton_file": path, "records": [...]}."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    path = [str(ROOT)]
    if triton_dir is not None:
        if not (Path(triton_dir) / "triton").is_dir():
            raise FileNotFoundError(f"CONMIM_EXTRA_TRITON entry {triton_dir!r} holds no triton package")
        path.insert(0, triton_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*path, env.get("PYTHONPATH")) if p)
    jobs = jobs or min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.static", "--worker", str(out), "--jobs", str(jobs)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"static profile worker failed (triton_dir={triton_dir}):\n{proc.stderr[-4000:]}"
            )
        return json.loads(out.read_text())


def extra_tritons() -> list[str]:
    return [p for p in os.environ.get("CONMIM_EXTRA_TRITON", "").split(os.pathsep) if p]


def profile_cuda(so: Path | None = None) -> list[dict]:
    """The sm_90 kernels of the built extension: registers, stack, static shared memory, SASS mix (the launch
    block size is not in the binary, so resident warps are left out)."""
    so = so or next(iter(sorted((ROOT / "conmim").glob("_C*.so"))), None)
    if so is None:
        return []
    res = resource_usage(_cuobjdump("-res-usage", "-arch", "sm_90", str(so)))
    sass = split_sass(_cuobjdump("-sass", "-arch", "sm_90", str(so)))
    names = list(res)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    records = []
    for mangled, pretty in zip(names, demangled.splitlines() or names):
        u = res[mangled]
        short = re.sub(r"conmim::cuda::\(anonymous namespace\)::", "", pretty).split("(")[0]
        records.append(
            {
                "id": "cuda-" + re.sub(r"\W+", "-", short).strip("-"),
                "source": "cuda",
                "kernel": short,
                "registers": u["REG"],
                "stack_bytes": u["STACK"],
                "local_bytes": u["LOCAL"],
                "shared_bytes": u["SHARED"],
                **sass_stats(sass.get(mangled, ""), None),
            }
        )
    return records


# ----------------------------------------------------------------------------------------------- estimate
def _loss_bytes(rec: dict, B: int) -> float:
    """DRAM bytes of one loss kernel over GRID with B images, each operand read once (re-reads of an image's
    rows by the programs of that image are assumed to hit L2)."""
    N, M, d, es = GRID["N"], GRID["masked"], rec["d"], ITEMSIZE[rec["dtype"]]
    kind = LOSS_KERNELS[rec["kernel"]]
    index = B * N * 8 * (2 if rec["has_pos"] else 1)  # work order (+ positive_index)
    feats = B * (M + N) * d * es  # masked student rows + every teacher row
    w = B * M * N * 4  # the stored gradient of the logits, fp32
    rows = 2 * B * N * 4  # loss and lse written, or lse and g read
    out = {"loss": 0, "w": w, "grad": B * N * d * es}[kind.writes]
    return feats + index + (w if kind.reads_w else rows) + out


def memory_floor_s(dtype: str, d: int, need_teacher: bool) -> float:
    """The loss's DRAM floor over GRID at 4.8 TB/s (PERF.md's): the forward reads the masked student rows and the
    teacher, the backward reads them again and writes d(student) (every row, zeros included); a teacher
    gradient adds its write and one more read of both."""
    B, N, M, es = GRID["B"], GRID["N"], GRID["masked"], ITEMSIZE[dtype]
    feats, grad = B * (M + N) * d * es, B * N * d * es
    passes = 3 if need_teacher else 2
    return (passes * feats + (passes - 1) * grad) / GPU.hbm_bytes_per_s


def estimate_loss(rec: dict, B: int = GRID["B"]) -> dict:
    """An estimate, not a measurement (see ASSUMPTIONS): max(bytes / HBM, issued MMA FLOPs / peak) for GRID with
    B images; waves and occupancy are reported beside it, not charged."""
    N, M, d = GRID["N"], GRID["masked"], rec["d"]
    kind = LOSS_KERNELS[rec["kernel"]]
    bm, bn, bd = (rec["tiles"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    chunks = rec["tiles"]["D_CHUNKS"]
    if kind.over_keys:
        programs, iters = B * math.ceil(N / bn), math.ceil(M / bm)
    else:
        programs, iters = B * math.ceil(M / bm), math.ceil(N / bn)
    if kind.per_chunk:
        programs *= chunks  # one program per chunk of the output's columns
    # one iteration: the logits over every feature chunk, the gradient product over one
    tile_flops = 2 * bm * bn * bd * (chunks * kind.logits + kind.gradient)
    useful = kind.products * 2 * M * N * d * B
    peaks = dict(GPU.mma_flops_per_s)
    # one main-loop iteration of one program: the logits' feature-chunk loop inside it runs `chunks` times
    nested = rec.get("nested_mma_flops", {}) if kind.logits else {}
    per_iter = {k: v + nested.get(k, 0) * (chunks - 1) for k, v in rec["loop_mma_flops"].items()}
    if per_iter:
        issued = {k: v * programs * iters for k, v in per_iter.items()}
        compute_s = sum(v / peaks[k] for k, v in issued.items())
        total_issued = sum(issued.values())
    else:  # no tensor cores: the products run as FFMA
        total_issued = tile_flops * programs * iters
        compute_s = total_issued / GPU.ffma_flops_per_s
    memory_s = _loss_bytes(rec, B) / GPU.hbm_bytes_per_s
    slots = GPU.sms * max(1, rec["resident_warps"] // rec["warps"])
    waves = programs / slots
    return {
        "B": B,
        "bytes": _loss_bytes(rec, B),
        "memory_s": memory_s,
        "issued_flops": total_issued,
        "useful_flops": useful,
        "padding": 1 - useful / total_issued,
        "replication": (sum(per_iter.values()) / tile_flops) if per_iter else None,
        "compute_s": compute_s,
        "memory_bound": memory_s >= compute_s,
        "programs": programs,
        "waves": waves,
        "occupancy": rec["resident_warps"] / GPU.max_warps,
        "estimate_s": max(memory_s, compute_s),
    }


def estimate_ema(rec: dict) -> dict:
    t_dt, s_dt = rec["dtype"].split("/")
    nbytes = EMA_PARAMS * (2 * ITEMSIZE[t_dt] + ITEMSIZE[s_dt])
    programs = math.ceil(EMA_PARAMS / 4096)
    slots = GPU.sms * max(1, rec["resident_warps"] // rec["warps"])
    return {
        "bytes": nbytes,
        "memory_s": nbytes / GPU.hbm_bytes_per_s,
        "programs": programs,
        "waves": programs / slots,
        "estimate_s": nbytes / GPU.hbm_bytes_per_s,
    }


def with_estimates(records: list[dict]) -> list[dict]:
    """Each Triton record with its estimate at GRID's B (``estimate``) and, for the loss, at the vit_b recipe's
    batch per GPU (``estimate_vit_b``)."""
    out = []
    for r in records:
        if r["source"] != "triton":
            out.append(r)
        elif r["kernel"] == "ema":
            out.append(r | {"estimate": estimate_ema(r)})
        else:
            out.append(r | {"estimate": estimate_loss(r), "estimate_vit_b": estimate_loss(r, VIT_B_BATCH)})
    return out


def _loss_records(records: list[dict], dtype: str, d: int, need_teacher: bool) -> list[dict]:
    """The kernels one loss fwd+bwd launches (no positive_index), the keys' gradient only with the teacher's."""
    skip = () if need_teacher else ("bwd_k", "bwd_wk")
    return [
        r
        for r in records
        if r.get("kernel") in LOSS_KERNELS
        and r["kernel"] not in skip
        and r["dtype"] == dtype
        and r["d"] == d
        and not r["has_pos"]
    ]


def loss_total(records: list[dict], dtype: str, d: int, need_teacher: bool, key: str = "estimate") -> float:
    """Estimated fwd+bwd seconds of the loss (``key``: "estimate" at GRID's B, "estimate_vit_b" at 128)."""
    return sum(r[key]["estimate_s"] for r in _loss_records(records, dtype, d, need_teacher))


# ----------------------------------------------------------------------------------------------- report
def _mma(r: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(r["mma"].items())) or "none"


def render(payload: dict) -> str:
    """The docs/performance.md section (markdown) for one results file: the installed Triton's loss kernels without
    positive_index, the EMA and the CUDA extension; every row is compiled, not run."""
    tri = payload["tritons"][0]
    recs = tri["records"]
    out = [
        START,
        "",
        f"Static sm_90 profile, **compiled, not run** (no GPU measured these): Triton {tri['triton']}, "
        f"`{payload['file']}`, commit `{payload['commit'][:12]}`. Generated by `python -m benchmarks static`; "
        f"estimates are estimates at B={GRID['B']}, N={GRID['N']}, {GRID['masked']} masked per image, the EMA at "
        f"{EMA_PARAMS / 1e6:.0f} M parameters. The model's assumptions: {ASSUMPTIONS}. Occupancy: resident warps "
        f"per SM of {GPU.max_warps}; waves: programs / ({GPU.sms} SMs x resident programs per SM).",
        "",
        "| kernel | dtype | d | warps | regs | spill stores | stack B | smem KB | warps/SM (occupancy) | MMA (SASS) "
        "| FFMA in loops | LDG/STG .128 | cp.async / TMA | MMA padding | programs / waves | est. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        if r.get("has_pos"):
            continue
        e = r["estimate"]
        pad = f"{100 * e['padding']:.0f}%" if "padding" in e else "-"
        occ = f"{r['resident_warps']} ({100 * r['resident_warps'] / GPU.max_warps:.0f}%)"
        out.append(
            f"| {r['kernel']} | {r['dtype']} | {r['d'] or '-'} | {r['warps']} | {r['registers']} | "
            f"{r['spill_stores']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | {occ} | "
            f"{_mma(r)} | {r['ffma_in_loops']} | {r['ldg_128']}/{r['stg_128']} | {r['cp_async']} / {r['tma']} | "
            f"{pad} | {e['programs']} / {e['waves']:.2f} | {e['estimate_s'] * 1e6:.1f} us |"
        )
    out += ["", "CUDA extension (sm_90 entries of `conmim/_C*.so`):", ""]
    out += [
        "| kernel | regs | spill stores | stack B | static smem B | MMA (SASS) | FFMA in loops | LDG/STG .128 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["cuda"]:
        out.append(
            f"| `{r['kernel']}` | {r['registers']} | {r['spill_stores']} | {r['stack_bytes']} | "
            f"{r['shared_bytes']} | {_mma(r)} | {r['ffma_in_loops']} | {r['ldg_128']}/{r['stg_128']} |"
        )
    out += ["", *summary(payload), "", END]
    return "\n".join(out)


def summary(payload: dict) -> list[str]:
    recs = payload["tritons"][0]["records"]
    lines = []
    for tri in payload["tritons"]:
        rs = tri["records"]
        lines.append(
            f"- Triton {tri['triton']}: {len(rs)} kernel configurations; with spill stores or stack: "
            f"{sum(1 for r in rs if r['spill_stores'] or r['stack_bytes'])}; below 8 resident warps/SM: "
            f"{sum(1 for r in rs if r['resident_warps'] < 8)}."
        )
    for teacher in (False, True):
        t = loss_total(recs, "bf16", 256, teacher)
        floor = memory_floor_s("bf16", 256, teacher)
        kernels = [r["kernel"] for r in _loss_records(recs, "bf16", 256, teacher)]
        what = (
            "the features read by the forward and twice by the backward, d(student) and d(teacher) written"
            if teacher
            else "the features read by the forward and the backward, d(student) written"
        )
        lines.append(
            f"- Estimate, loss fwd+bwd, B=256 N=196 d=256 bf16, teacher gradient {'on' if teacher else 'off'}: "
            f"{t * 1e6:.1f} us = {t / floor:.2f}x its memory floor of {floor * 1e6:.1f} us ({what}, "
            f"at 4.8 TB/s; target 1.3x); {len(kernels)} Triton launches ({', '.join(kernels)}); at vit_b's "
            f"{VIT_B_BATCH} images per GPU: {loss_total(recs, 'bf16', 256, teacher, 'estimate_vit_b') * 1e6:.1f} us."
        )
    for r in recs:
        if r["kernel"] == "ema":
            vec = r["ldg_128"] >= 2 and r["stg_128"] >= 1
            lines.append(
                f"- Estimate, EMA {r['dtype']} (teacher/student) at {EMA_PARAMS / 1e6:.0f} M parameters: "
                f"{r['estimate']['estimate_s'] * 1e3:.3f} ms at 4.8 TB/s, "
                + (
                    "16-byte accesses"
                    if vec
                    else "NOT vectorised (scalar or 8-byte accesses): below HBM rate"
                )
                + f", {r['resident_warps']} warps/SM."
            )
    return lines


def run(jobs: int | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import commit, versions

    tritons = [profile_triton(None, jobs)] + [profile_triton(p, jobs) | {"dir": p} for p in extra_tritons()]
    for t in tritons:
        t["records"] = with_estimates(t["records"])
    return {
        "kind": "static-sm90",
        "note": "compiled, not run: read from sm_90 binaries; estimates are arithmetic, not measurements",
        "assumptions": ASSUMPTIONS,
        "vit_b_batch": VIT_B_BATCH,
        "date": _dt.date.today().isoformat(),
        "commit": commit(),
        "versions": versions(),
        "gpu_model": asdict(GPU),
        "grid": GRID,
        "ema_params": EMA_PARAMS,
        "tritons": tritons,
        "cuda": profile_cuda(),
    }


def write_docs(text: str) -> None:
    page = TARGET.read_text()
    if START in page:
        head, rest = page.split(START, 1)
        page = head + text + rest.split(END, 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n## Static sm_90 profile (compiled, not run)\n\n" + text + "\n"
    TARGET.write_text(page)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks static", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: min(8, CPUs))")
    p.add_argument("--no-save", action="store_true", help="print only; write no results file")
    p.add_argument(
        "--docs",
        "--readme",
        dest="docs",
        action="store_true",
        help="also render the tables into docs/performance.md (--readme is the old name)",
    )
    p.add_argument(
        "--render", metavar="JSON", help="render a results file (into the docs with --docs); no compiling"
    )
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.jobs or 1)
        return 0
    if args.render:
        text = render(json.loads(Path(args.render).read_text()))
        print(text)
        if args.docs:
            write_docs(text)
        return 0
    payload = run(args.jobs)
    path = RESULTS / f"static-sm90-{payload['date']}.json"
    payload["file"] = path.name
    text = render(payload)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"\nwrote {path}")
    if args.docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
