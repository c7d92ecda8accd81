"""Static facts about the Triton kernels of the ε-DPO head, compiled ahead of time for sm_80 and sm_90 (no GPU).

Each kernel variant is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` using the
specialisation the JIT applies at launch on a full tile of the plan ``auto`` runs at the 8B shape on an H100
(benchmarks/results/roofline.json: token chunk 4096 × vocabulary tile 65536, d = 4096, V = 128256: pointers, strides and
sizes 16-divisible), the launch's own block sizes (:func:`edpo_plugin.ops.plan.fold_blocks`), and reports registers,
spill bytes (Triton's bundled ``ptxas -v`` on the generated PTX), stack and shared memory (``cuobjdump -res-usage`` on
the cubin) and the theoretical occupancy (resident warps per SM out of 64). The GEMMs are cuBLAS calls, not Triton
kernels.

    python benchmarks/kernel_report.py --json benchmarks/results/kernel_report.json

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces the compiler); needs no GPU or driver.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the JIT does by default in Triton 3.9 (and quiet)

# per-architecture limits: registers, shared memory a block may use, max resident warps and blocks per SM
ARCH = {
    80: {"name": "sm_80 (A100)", "regs": 65536, "smem_block": 163 * 1024, "smem_sm": 164 * 1024, "warps": 64},
    90: {"name": "sm_90 (H100/H200)", "regs": 65536, "smem_block": 227 * 1024, "smem_sm": 228 * 1024, "warps": 64},
}
TILE = {"rows": 4096, "cols": 65536, "dim": 4096, "vocab": 128256}  # the H100 auto plan's tile at the 8B shape


@dataclass
class Variant:
    """One compiled form of a kernel: which kernel, the GEMM operand dtype (P, dL/du and W are in it), flags."""

    label: str
    kind: str  # "fold", "grad_fold", "grad_probs", "targets" or "finish"
    dtype: str  # "bf16", "fp16" or "fp32"
    flags: dict = field(default_factory=dict)
    kept_p: bool = False  # P rows strided by the whole vocabulary (a trainable plan that keeps P)


ALL = {"HAS_BIAS": True, "HAS_SCALE": True, "HAS_SOFTCAP": True}


def variants() -> list[Variant]:
    out = []
    for dt in ("bf16", "fp16", "fp32"):
        out += [
            Variant("fold, frozen head (P, D), soft cap, scale, biases", "fold", dt,
                    {**ALL, "HAS_REF_BIAS": True, "WITH_P": True, "WITH_D": True}),
            Variant("fold, frozen head (P, D), plain logits", "fold", dt, {"WITH_P": True, "WITH_D": True}),
            Variant("fold, trainable head keeping P, plain logits", "fold", dt, {"WITH_P": True}, kept_p=True),
            Variant("fold, statistics only (recomputing trainable head / eval)", "fold", dt, {}),
            Variant("grad fold from recomputed logits, soft cap, scale, bias", "grad_fold", dt, dict(ALL)),
            Variant("grad fold from kept P, soft cap, scale", "grad_probs", dt,
                    {"HAS_SCALE": True, "HAS_SOFTCAP": True}, kept_p=True),
            Variant("grad fold from kept P, scale only", "grad_probs", dt, {"HAS_SCALE": True}, kept_p=True),
            Variant("target logits, bias, scale, soft cap", "targets", dt, dict(ALL)),
            Variant("direction finish, soft cap, scale", "finish", dt, {"HAS_SCALE": True, "HAS_SOFTCAP": True}),
        ]  # fmt: skip
    return out


def _kernel_and_args(v: Variant) -> tuple[object, dict, dict, int, int]:
    """(kernel, signature, constexprs, num_warps, num_stages) for variant ``v`` on a full production tile."""
    from edpo_plugin.ops import triton_fold as tf
    from edpo_plugin.ops.plan import fold_blocks

    t = "*" + v.dtype
    rows, cols, dim, vocab = TILE["rows"], TILE["cols"], TILE["dim"], TILE["vocab"]
    p_stride = vocab if v.kept_p else cols
    block_m, block_n, warps = fold_blocks(v.kind if v.kind != "grad_probs" else "grad_fold", cols, False)
    if v.kind == "fold":
        kernel = tf._fold_kernel
        args = {
            "z_ptr": "*fp32",
            "plane_stride": ("i32", rows * cols),
            "row_stride": ("i32", cols),
            "bp_ptr": t,
            "br_ptr": t,
            "max_ptr": "*fp32",
            "sum_ptr": "*fp32",
            "stat_stride": ("i32", 8192),
            "r_in_ptr": "*fp32",
            "r_out_ptr": "*fp32",
            "p_ptr": t,
            "p_row_stride": ("i32", p_stride),
            "d_ptr": "*fp32",
            "d_row_stride": ("i32", dim),
            "dim": ("i32", dim),
            "rows": ("i32", rows),
            "cols": ("i32", cols),
            "epsilon": "fp32",
            "scale": "fp32",
            "softcap": "fp32",
            "tau": "fp32",
        }
        const = {
            "HAS_BIAS": False,
            "HAS_REF_BIAS": False,
            "HAS_SCALE": False,
            "HAS_SOFTCAP": False,
            "WITH_P": False,
            "WITH_D": False,
        }
    elif v.kind == "grad_fold":
        kernel = tf._grad_fold_kernel
        args = {
            "u_ptr": "*fp32",
            "u_row_stride": ("i32", cols),
            "b_ptr": t,
            "y_ptr": "*i64",
            "v0": ("i32", cols),
            "max_ptr": "*fp32",
            "logsum_ptr": "*fp32",
            "g_ptr": "*fp32",
            "out_ptr": t,
            "out_row_stride": ("i32", cols),
            "rows": ("i32", rows),
            "cols": ("i32", cols),
            "scale": "fp32",
            "softcap": "fp32",
        }
        const = {"HAS_BIAS": False, "HAS_SCALE": False, "HAS_SOFTCAP": False}
    elif v.kind == "grad_probs":
        kernel = tf._grad_probs_kernel
        args = {
            "p_ptr": t,
            "p_row_stride": ("i32", p_stride),
            "pref_ptr": "*fp32",
            "y_ptr": "*i64",
            "v0": ("i32", cols),
            "max_ptr": "*fp32",
            "logsum_ptr": "*fp32",
            "zy_ptr": "*fp32",
            "g_ptr": "*fp32",
            "rows": ("i32", 8192),
            "cols": ("i32", cols),
            "scale": "fp32",
            "softcap": "fp32",
        }
        const = {"HAS_SCALE": False, "HAS_SOFTCAP": False}
    elif v.kind == "targets":
        block_m, block_n, warps = fold_blocks("targets", dim, False)
        kernel = tf._target_kernel
        args = {
            "h_ptr": t,
            "h_row_stride": ("i32", dim),
            "w_ptr": t,
            "w_row_stride": ("i32", dim),
            "y_ptr": "*i64",
            "b_ptr": t,
            "out_ptr": "*fp32",
            "rows": ("i32", 8192),
            "dim": ("i32", dim),
            "scale": "fp32",
            "softcap": "fp32",
        }
        const = {"HAS_BIAS": False, "HAS_SCALE": False, "HAS_SOFTCAP": False}
    else:
        block_m, block_n, warps = fold_blocks("finish", dim, False)
        kernel = tf._finish_kernel
        args = {
            "d_ptr": "*fp32",
            "d_row_stride": ("i32", dim),
            "w_ptr": t,
            "w_row_stride": ("i32", dim),
            "y_ptr": "*i64",
            "vocab": ("i32", vocab),
            "ref_ptr": "*fp32",
            "max_ptr": "*fp32",
            "logsum_ptr": "*fp32",
            "zy_ptr": "*fp32",
            "rows": ("i32", 8192),
            "dim": ("i32", dim),
            "scale": "fp32",
            "softcap": "fp32",
        }
        const = {"HAS_SCALE": False, "HAS_SOFTCAP": False}
    const.update(v.flags)
    block_names = ("BLOCK_M", "BLOCK_D") if v.kind in ("targets", "finish") else ("BLOCK_M", "BLOCK_N")
    const.update(dict(zip(block_names, (block_m, block_n))))
    return kernel, args, const, warps, 3


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


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for ``sm_{arch}`` and return its resource facts (see module docstring)."""
    kernel, args, const, warps, stages = _kernel_and_args(v)
    row = compile_kernel(kernel, args, const, arch, warps, stages)
    row.update(variant=v.label, dtype=v.dtype, block_m=const["BLOCK_M"],
               block_n=const.get("BLOCK_N", const.get("BLOCK_D")))  # fmt: skip
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


def _compile_job(job: tuple[Variant, int]) -> dict:
    return compile_variant(*job)


def report(archs: tuple[int, ...], jobs: int = 1) -> list[dict]:
    """Facts for every variant on each architecture, compiled by ``jobs`` processes."""
    todo = [(v, arch) for arch in archs for v in variants()]
    if jobs <= 1:
        return [_compile_job(j) for j in todo]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, todo))


def markdown_table(rows: list[dict]) -> str:
    """The rows as the Markdown table of docs/benchmarks.md."""
    out = [
        "| arch | dtype | blocks M/N, warps | regs | spill B | stack B | smem KiB | warps/SM | kernel: variant |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['arch']} | {r['dtype']} | {r['block_m']}/{r['block_n']}, {r['num_warps']} | {r['registers']} | "
            f"{r['spill_store_bytes']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | "
            f"{r['occupancy_warps']} | `{r['kernel']}`: {r['variant']} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="80,90")
    p.add_argument("--json", default=None)
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--markdown", default=None, help="print the table of this JSON report as Markdown and exit")
    args = p.parse_args()
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)["rows"]))
        return
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    archs = tuple(int(a) for a in args.archs.split(","))
    rows = report(archs, args.jobs)
    print(f"{'arch':<6}{'dtype':<5}{'blocks M/N w':<14}{'regs':>5}{'spill':>6}{'stack':>6}{'smem KiB':>9}{'occup':>7}"
          "  kernel / variant")  # fmt: skip
    for r in rows:
        blk = f"{r['block_m']}/{r['block_n']} {r['num_warps']}"
        print(f"{r['arch']:<6}{r['dtype']:<5}{blk:<14}{r['registers']:>5}{r['spill_store_bytes']:>6}"
              f"{r['stack_bytes']:>6}{r['shared_bytes'] / 1024:>9.1f}{r['occupancy_warps']:>7}  {r['kernel']}: "
              f"{r['variant']}")  # fmt: skip
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "tile": TILE, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
