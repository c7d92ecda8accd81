"""Static facts about every Triton kernel of the ε-DPO head, compiled ahead of time for sm_80 and sm_90 (no GPU).

Each kernel variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` using
the specialisation the JIT applies at launch (pointers, strides, ``dim`` and the vocabulary 16-divisible; the
number of valid tokens not), the default block sizes of :mod:`edpo_plugin.ops.triton_common` for that
architecture, and the bench shape's sizes. For each it reports registers, spill bytes (Triton's bundled ``ptxas -v``
on the generated PTX), stack and shared memory (``cuobjdump -res-usage`` on the cubin), the MMA kind read from the
PTX (``wgmma`` async warpgroup MMA, ``mma.sync``, or ``fma`` for IEEE fp32 dots), ``cp.async`` pipelining and the
theoretical occupancy (resident warps per SM out of 64).

    python scripts/kernel_report.py --json docs/kernel_report.json          # every variant, both archs
    python scripts/kernel_report.py --only defaults --archs 90              # the subset the test checks

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler); needs no GPU or driver.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the JIT does by default in Triton 3.9 (and quiet)

# per-architecture limits: registers, shared memory a block may use, max resident warps and blocks per SM
ARCH = {
    80: {"name": "sm_80 (A100)", "regs": 65536, "smem_block": 163 * 1024, "smem_sm": 164 * 1024, "warps": 64},
    90: {"name": "sm_90 (H100/H200)", "regs": 65536, "smem_block": 227 * 1024, "smem_sm": 228 * 1024, "warps": 64},
}
BENCH = {"n_rows": 8190, "dim": 4096, "vocab": 128256}  # 8190: the valid-token count is rarely a multiple of 16


@dataclass
class Variant:
    """One compiled form of a kernel: which kernel (``kind`` in triton_common's defaults), dtype, constexpr flags."""

    label: str
    kind: str
    dtype: str  # "bf16", "fp16" or "fp32"
    flags: dict = field(default_factory=dict)
    default: bool = False  # part of the subset tests/test_kernel_report.py compiles


def variants() -> list[Variant]:
    out = []
    for dt in ("bf16", "fp32"):
        lp = dt == "bf16"
        out += [
            Variant("forward: statistics only (triton_mix_lse), unshared", "stats", dt,
                    {"SHARED_WEIGHT": False, "WITH_TARGETS": False, "WITH_DIRECTION": False}, default=lp),
            Variant("forward: frozen head (LoRA), shared W, + direction", "direction", dt,
                    {"SHARED_WEIGHT": True, "WITH_TARGETS": True, "WITH_DIRECTION": True}, default=lp),
            Variant("forward: trainable head, unshared, soft cap, bias, + direction", "direction", dt,
                    {"SHARED_WEIGHT": False, "WITH_TARGETS": True, "WITH_DIRECTION": True, "HAS_SOFTCAP": True,
                     "HAS_SCALE": True, "HAS_BIAS": True, "HAS_REF_BIAS": True}, default=lp),
            Variant("two-pass direction (EDPO_TRITON_DIRECTION=two_pass), soft cap, bias", "direction2", dt,
                    {"HAS_BIAS": True, "HAS_SCALE": True, "HAS_SOFTCAP": True}, default=lp),
            Variant("direction epilogue (merge splits, target term), soft cap", "epilogue", dt, {"HAS_SOFTCAP": True},
                    default=lp),
            Variant("backward: logit gradient, soft cap, bias", "logit_grad", dt,
                    {"HAS_BIAS": True, "BIAS_GRAD": True, "HAS_SCALE": True, "HAS_SOFTCAP": True}, default=lp),
        ]  # fmt: skip
    out += [
        Variant("forward: no-grad (eval), shared W, targets only", "stats", "bf16",
                {"SHARED_WEIGHT": True, "WITH_TARGETS": True, "WITH_DIRECTION": False}),
        Variant("forward: frozen head (LoRA), shared W, + direction", "direction", "fp16",
                {"SHARED_WEIGHT": True, "WITH_TARGETS": True, "WITH_DIRECTION": True}),
        Variant("backward: logit gradient, soft cap, bias", "logit_grad", "fp16",
                {"HAS_BIAS": True, "BIAS_GRAD": True, "HAS_SCALE": True, "HAS_SOFTCAP": True}),
    ]  # fmt: skip
    return out


def _kernel_and_args(v: Variant, blocks) -> tuple[object, dict, dict]:
    """(kernel, signature, constexprs) for variant ``v`` with :class:`Blocks` ``blocks``."""
    from edpo_plugin.ops import triton_head_backward as bwd
    from edpo_plugin.ops import triton_head_direction as drn
    from edpo_plugin.ops import triton_head_forward as fwd

    t = "*" + v.dtype
    n, d, vocab = BENCH["n_rows"], BENCH["dim"], BENCH["vocab"]
    lp = v.dtype != "fp32"
    if v.kind in ("stats", "direction"):
        kernel = fwd._head_forward_kernel
        args = {"h_ptr": t, "w_ptr": t, "b_ptr": t, "hr_ptr": t, "wr_ptr": t, "br_ptr": t, "y_ptr": "*i32",
                "max_ptr": "*fp32", "sum_ptr": "*fp32", "tgt_ptr": "*fp32", "acc_ptr": "*fp32",
                "n_rows": ("i32", n), "vocab": ("i32", vocab), "dim": ("i32", d),
                "cols_per_split": ("i32", 43008), "split_stride": ("i32", n * d),
                "epsilon": "fp32", "scale": "fp32", "softcap": "fp32",
                "stride_h": ("i32", d), "stride_w": ("i32", d), "stride_hr": ("i32", d),
                "stride_wr": ("i32", d)}  # fmt: skip
        const = {"HAS_BIAS": False, "HAS_REF_BIAS": False, "SHARED_WEIGHT": False, "HAS_SCALE": False,
                 "HAS_SOFTCAP": False, "WITH_TARGETS": False, "WITH_DIRECTION": False, "IEEE": not lp,
                 "UPCAST": False}  # fmt: skip
        const.update(BLOCK_M=blocks.block_m, BLOCK_V=blocks.block_v, BLOCK_D=blocks.block_d)
    elif v.kind == "direction2":
        kernel = drn._direction_kernel
        args = {"h_ptr": t, "w_ptr": t, "b_ptr": t, "max_ptr": "*fp32", "logsum_ptr": "*fp32", "acc_ptr": "*fp32",
                "n_rows": ("i32", n), "vocab": ("i32", vocab), "dim": ("i32", d), "cols_per_split": ("i32", 43008),
                "split_stride": ("i32", n * d), "scale": "fp32", "softcap": "fp32", "stride_h": ("i32", d),
                "stride_w": ("i32", d)}  # fmt: skip
        const = {"HAS_BIAS": False, "HAS_SCALE": False, "HAS_SOFTCAP": False, "IEEE": not lp, "UPCAST": False,
                 "BLOCK_M": blocks.block_m, "BLOCK_V": blocks.block_v, "BLOCK_D": blocks.block_d}  # fmt: skip
    elif v.kind == "epilogue":
        kernel = fwd._direction_epilogue_kernel
        args = {"acc_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "tgt_ptr": "*fp32", "y_ptr": "*i32",
                "w_ptr": t, "n_rows": ("i32", n), "dim": ("i32", d), "n_splits": ("i32", 3),
                "split_stride": ("i32", n * d), "scale": "fp32", "softcap": "fp32", "stride_w": ("i32", d)}  # fmt: skip
        const = {"HAS_SOFTCAP": False, "NORMALISED": False, "BLOCK_M": blocks.block_m, "BLOCK_D": blocks.block_d}
    else:
        kernel = bwd._logit_grad_kernel
        args = {"h_ptr": t, "w_ptr": t, "b_ptr": t, "y_ptr": "*i32", "g_ptr": "*fp32", "max_ptr": "*fp32",
                "logsum_ptr": "*fp32", "out_ptr": t, "bsum_ptr": "*fp32", "n_rows": ("i32", n),
                "vocab": ("i32", vocab), "dim": ("i32", d), "col0": ("i32", 16384), "n_cols": ("i32", 16384),
                "scale": "fp32", "softcap": "fp32", "stride_h": ("i32", d), "stride_w": ("i32", d),
                "stride_out": ("i32", 16384), "stride_bsum": ("i32", 16384)}  # fmt: skip
        const = {"HAS_BIAS": False, "BIAS_GRAD": False, "TWO_TERM": lp, "HAS_SCALE": False, "HAS_SOFTCAP": False,
                 "IEEE": not lp, "UPCAST": False, "BLOCK_M": blocks.block_m, "BLOCK_V": blocks.block_v,
                 "BLOCK_D": blocks.block_d}  # fmt: skip
    const.update(v.flags)
    return kernel, args, const


def _specialise(kernel, args: dict, const: dict) -> tuple[dict, dict, dict]:
    """The JIT's launch specialisation: pointers (allocator-aligned) and ints divisible by 16 get
    ``tt.divisibility = 16``; an int equal to 1 becomes a constant."""
    names = kernel.arg_names
    signature, attrs, constexprs = {}, {}, dict(const)
    for name in names:
        if name in const:
            signature[name] = "constexpr"
            continue
        spec = args[name]
        typ, value = spec if isinstance(spec, tuple) else (spec, None)
        if typ.startswith("*") or (value is not None and value % 16 == 0):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        if value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = typ
    return signature, constexprs, attrs


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_variant(v: Variant, arch: int, blocks=None) -> dict:
    """Compile ``v`` for ``sm_{arch}`` and return its resource facts (see module docstring)."""
    import torch

    from edpo_plugin.ops.triton_common import default_blocks

    if blocks is None:
        blocks = default_blocks(v.kind, torch.float32 if v.dtype == "fp32" else torch.bfloat16, arch // 10)
    kernel, args, const = _kernel_and_args(v, blocks)
    row = compile_kernel(kernel, args, const, arch, blocks.num_warps, blocks.num_stages)
    row.update(variant=v.label, dtype=v.dtype, block_m=blocks.block_m, block_v=blocks.block_v, block_d=blocks.block_d)
    return row


def compile_kernel(kernel, args: dict, const: dict, arch: int, num_warps: int, num_stages: int) -> dict:
    """AOT-compile one Triton ``kernel`` (a ``JITFunction``) with its launch specialisation; resource facts."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = _specialise(kernel, args, const)
    src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    cc = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": num_warps, "num_stages": num_stages})  # fmt: skip
    ptx = cc.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx_path = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(cc.asm["cubin"])
        with open(ptx_path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True, check=True)
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
        # the flags Triton's own make_cubin passes, with the ptxas Triton picks for the architecture
        ptxas = _tool("ptxas" if arch < 90 else "ptxas-blackwell")
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", ptx_path, "-o",
               os.path.join(tmp, "o.cubin")]  # fmt: skip
        pv = subprocess.run(cmd, capture_output=True, text=True)
        if pv.returncode != 0:
            raise RuntimeError(f"ptxas failed on {kernel.__name__} for {target}:\n{pv.stderr[-2000:]}")
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", pv.stderr + pv.stdout)
    regs = int(usage["REG"])
    shared = int(cc.metadata.shared) + int(usage.get("SHARED", 0))
    if "wgmma.mma_async" in ptx:
        mma = "wgmma"
    elif "mma.sync" in ptx:
        mma = "mma.sync"
    else:
        mma = "fma"
    lim = ARCH[arch]
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * num_warps)
    by_smem = lim["smem_sm"] // (shared + 1024) if shared else 32
    blocks_per_sm = min(by_regs, by_smem, lim["warps"] // num_warps, 32)
    return {
        "kernel": kernel.__name__,
        "arch": f"sm_{arch}",
        "num_warps": num_warps,
        "num_stages": num_stages,
        "registers": regs,
        "spill_store_bytes": int(spills.group(1)),
        "spill_load_bytes": int(spills.group(2)),
        "stack_bytes": int(usage.get("STACK", 0)),
        "shared_bytes": shared,
        "shared_fits": shared <= lim["smem_block"],
        "mma": mma,
        "cp_async": "cp.async" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "blocks_per_sm": blocks_per_sm,
        "occupancy_warps": f"{blocks_per_sm * num_warps}/{lim['warps']}",
    }


def _unwrap(kernel):
    """The ``JITFunction`` under ``triton.heuristics`` / ``triton.autotune`` wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def cce_rows(arch: int) -> list[dict]:
    """Apple cut-cross-entropy 25.1.1's forward (LSE) and backward kernels, compiled the same way: bf16, the same
    bench shape, their non-autotuned default configs (``CCE_AUTOTUNE=0``), no softcap, no valid-row filter; the
    backward with gradient filtering on and ``dC`` requested (a trainable classifier)."""
    from cut_cross_entropy import cce_backward, cce_lse_forward

    n, d, vocab = BENCH["n_rows"], BENCH["dim"], BENCH["vocab"]
    fwd = _unwrap(cce_lse_forward._cce_lse_forward_kernel)
    fwd_args = {"E": "*bf16", "C": "*bf16", "LSE": "*fp32", "Locks": "*i32", "B": ("i32", n), "V": ("i32", vocab),
                "D": ("i32", d), "stride_eb": ("i32", d), "stride_ed": ("i32", 1), "stride_cv": ("i32", d),
                "stride_cd": ("i32", 1), "stride_lse_b": ("i32", 1), "stride_vb": ("i32", 1),
                "num_locks": ("i32", 64), "B_BIN": ("i32", 1024)}  # fmt: skip
    fwd_const = {"LA": None, "Valids": None, "softcap": None, "HAS_VALIDS": False, "BLOCK_B": 256, "BLOCK_V": 128,
                 "BLOCK_D": 32, "GROUP_B": 8, "EVEN_D": True, "HAS_SOFTCAP": False, "HAS_LA": False,
                 "DOT_PRECISION": "ieee"}  # fmt: skip
    bwd = _unwrap(cce_backward._cce_backward_kernel)
    bwd_args = {"E": "*bf16", "C": "*bf16", "LSE": "*fp32", "dOut": "*fp32", "grad_scale": "fp32",
                "Targets": "*i64", "dE": "*bf16", "dELocks": "*i32", "dC": "*bf16", "dCLocks": "*i32",
                "B": ("i32", n), "D": ("i32", d), "V": ("i32", vocab), "n_de_locks_0": ("i32", 256),
                "n_de_locks_1": ("i32", 32), "n_dc_locks_0": ("i32", 4008), "n_dc_locks_1": ("i32", 32),
                "stride_eb": ("i32", d), "stride_ed": ("i32", 1), "stride_cv": ("i32", d), "stride_cd": ("i32", 1),
                "stride_vb": ("i32", 1), "filter_eps": "fp32", "B_BIN": ("i32", 1024)}  # fmt: skip
    bwd_const = {"Valids": None, "VocabOrdering": None, "softcap": None, "BLOCK_B": 128, "BLOCK_V": 128,
                 "BLOCK_D": 32, "MM_BACK_BLOCK_D": 64, "GROUP_B": 8, "EVEN_D": True, "MM_BACK_EVEN_D": True,
                 "ITEM_DO": False, "HAS_VALIDS": False, "HAS_VOCAB_ORDERING": False, "FILTER_GRAD": True,
                 "HAS_TARGETS": True, "HAS_SOFTCAP": False, "SHIFT": False, "REQUIRES_GRAD": True}  # fmt: skip
    rows = []
    for kernel, args, const, warps, stages, label in (
        (fwd, fwd_args, fwd_const, 8, 3, "cut-cross-entropy forward (LSE), default config"),
        (bwd, bwd_args, bwd_const, 4, 4, "cut-cross-entropy backward (dE, dC, filtered), default config"),
    ):
        row = compile_kernel(kernel, args, const, arch, warps, stages)
        row.update(variant=label, dtype="bf16", block_m=const["BLOCK_B"], block_v=const["BLOCK_V"],
                   block_d=const["BLOCK_D"])  # fmt: skip
        rows.append(row)
    return rows


def _compile_job(job: tuple[Variant, int]) -> dict:
    return compile_variant(*job)


def report(only_defaults: bool, archs: tuple[int, ...], jobs: int = 1) -> list[dict]:
    """Facts for every variant (or the test's subset) on each architecture, compiled by ``jobs`` processes."""
    todo = [(v, arch) for arch in archs for v in variants() if v.default or not only_defaults]
    if jobs <= 1:
        return [_compile_job(j) for j in todo]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, todo))


def markdown_table(rows: list[dict]) -> str:
    """The rows as the Markdown table of docs/benchmarks.md."""
    out = [
        "| arch | dtype | blocks M/V/D, warps, stages | regs | spill B | stack B | smem KiB | MMA | cp.async "
        "| warps/SM | kernel: variant |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['arch']} | {r['dtype']} | {r['block_m']}/{r['block_v']}/{r['block_d']}, {r['num_warps']}, "
            f"{r['num_stages']} | {r['registers']} | {r['spill_store_bytes']} | {r['stack_bytes']} | "
            f"{r['shared_bytes'] / 1024:.1f} | {r['mma']} | {'yes' if r['cp_async'] else 'no'} | "
            f"{r['occupancy_warps']} | `{r['kernel']}`: {r['variant']} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="80,90")
    p.add_argument("--only", choices=["all", "defaults"], default="all")
    p.add_argument("--json", default=None)
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--markdown", default=None, help="print the table of this JSON report as Markdown and exit")
    p.add_argument("--cce", default=None, help="directory holding the cut_cross_entropy package: compile it too")
    args = p.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)["rows"]))
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    archs = tuple(int(a) for a in args.archs.split(","))
    rows = report(args.only == "defaults", archs, args.jobs)
    if args.cce:
        sys.path.insert(0, args.cce)
        rows += [r for arch in archs for r in cce_rows(arch)]
    head = f"{'arch':<6}{'dtype':<5}{'blocks M/V/D w s':<18}{'regs':>5}{'spill':>6}{'stack':>6}{'smem KiB':>9}"
    print(head + f"{'mma':>9}{'cp.async':>9}{'occup':>7}  kernel / variant")
    for r in rows:
        blk = f"{r['block_m']}/{r['block_v']}/{r['block_d']} {r['num_warps']} {r['num_stages']}"
        print(f"{r['arch']:<6}{r['dtype']:<5}{blk:<18}{r['registers']:>5}{r['spill_store_bytes']:>6}"
              f"{r['stack_bytes']:>6}{r['shared_bytes'] / 1024:>9.1f}{r['mma']:>9}{'yes' if r['cp_async'] else 'no':>9}"
              f"{r['occupancy_warps']:>7}  {r['kernel']}: {r['variant']}")  # fmt: skip
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "shape": BENCH, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
