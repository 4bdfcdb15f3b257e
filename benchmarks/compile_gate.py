"""Compile gate: every Triton launch the real launchers make, compiled ahead of time for A100, H100
and B200 on a CPU, and checked for spills, shared memory and occupancy (issue 15).

    python benchmarks/compile_gate.py                          # all targets; table; exit 1 on a failure
    python benchmarks/compile_gate.py --markdown docs/KERNELS.md   # also rewrite the table there
    python benchmarks/compile_gate.py --targets sm_90 --jobs 2 --json gate.json
    python benchmarks/compile_gate.py --list                   # the captured launches only (no compile)

How (docs/KERNELS.md, "Compile gate"):

1. **Capture.**  Each case calls the public kernel functions (forward and backward) on *meta*
   tensors inside ``kernels.targets.capture_target(props)``: the launchers then take the GPU path,
   read the target's limits instead of a device's, and choose their blocks, warps, stages and
   constexpr flags as they would on that GPU.  ``KernelInterface.__getitem__`` is intercepted, so
   ``kernel[grid](*args, **kwargs)`` records its arguments and runs nothing.  Meta tensors carry
   shapes and dtypes but no memory: a 10^7-row table costs nothing.  (Their data_ptr() is 0, i.e.
   16-byte aligned, as every fresh CUDA allocation is.)
2. **Specialise.**  Each launch's arguments go through Triton's own binder for the target's backend
   (``create_function_from_signature`` + ``JITFunction._pack_args``, what ``JITFunction.run`` does
   before compiling), giving the signature, constexprs, alignment attributes and options a GPU
   launch would compile.  Identical (kernel, specialisation, options, target) compile once.
3. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))``, in
   ``--jobs`` processes, with Triton's cache in ``TRITON_CACHE_DIR`` (default ``.triton_cache/`` in
   the repository, git-ignored).  ptxas's ``-v`` report gives registers, spill stores/loads and stack;
   ``metadata.shared`` the shared memory.
4. **Gate.**  A configuration fails when it does not compile, spills, needs more shared memory per
   block than the target allows, or falls below its kernel's occupancy floor (FLOORS below).

The cases cover the paper model, gpu_check.py's own calls (so a lent GPU's minutes measure speed,
not compile errors) and the extremes: 10^6 / 10^7-row tables, H = 1024, dims that are not powers of
two, one attribute, M = 0 and M = 10^6, fp32 / fp16 / bf16, every fused variant and backward.
"""

from __future__ import annotations

import os
import sys

# The kernels must be defined as JITFunctions (not for the interpreter) and nothing may run.
os.environ["TRITON_INTERPRET"] = "0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, ".triton_cache"))
if ROOT not in sys.path:  # runs from a bare checkout
    sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import compute_cache_key, create_function_from_signature  # noqa: E402

import kernels.gather_concat_mean as gcm  # noqa: E402
import kernels.multi_label_ce as mlce  # noqa: E402
from kernels.targets import TARGETS, GPUProps, capture_target, occupancy  # noqa: E402

META = torch.device("meta")

# Occupancy floors (resident warps / the SM's 64), docs/KERNELS.md "Compile gate" says why:
# tensor-core kernels hide latency with their pipelined tiles and need two warps per scheduler;
# the memory-bound gathers need warps in flight.
FLOORS = {
    "_ce_fwd_kernel": 0.125, "_ce_bwd_dh_kernel": 0.125, "_ce_bwd_dw_kernel": 0.125,
    "_gcm_fwd_kernel": 0.25, "_gcm_bwd_atomic_kernel": 0.25, "_gcm_bwd_sorted_kernel": 0.25,
}


# ------------------------------------------------------------------------------------------------
# Capture
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _MetaScalars(TorchFunctionMode):
    """Host reads of meta tensors (``.tolist()``, ``.item()``, ``bool()``) return zeros, so code
    around the launchers (statistics, error checks of the benchmarks) runs on meta tensors."""

    _FUNCS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FUNCS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return func(torch.zeros(args[0].shape, dtype=args[0].dtype), *args[1:], **kwargs)
        return func(*args, **kwargs)


class _Autocast:
    """``torch.autocast`` for the capture: on "meta" (the capture's stand-in for "cuda") it sets
    CUDA's autocast state, which the launchers read (a CPU-only torch refuses torch.autocast("cuda"))."""

    _real = torch.autocast

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        self.meta = device_type in ("meta", "cuda")
        self.inner = None if self.meta else self._real(device_type, dtype=dtype, enabled=enabled)
        self.dtype, self.enabled = dtype or torch.float16, enabled

    def __enter__(self):
        if self.inner is not None:
            return self.inner.__enter__()
        self.prev = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        torch.set_autocast_enabled("cuda", self.enabled)
        torch.set_autocast_dtype("cuda", self.dtype)
        return self

    def __exit__(self, *exc):
        if self.inner is not None:
            return self.inner.__exit__(*exc)
        torch.set_autocast_enabled("cuda", self.prev[0])
        torch.set_autocast_dtype("cuda", self.prev[1])
        return False


@contextlib.contextmanager
def intercept(record: list[Launch], case: str):
    """``kernel[grid](...)`` records a Launch instead of running (as Triton's own compile warm-up)."""
    prev_getitem = triton.KernelInterface.__getitem__
    prev_autocast = torch.autocast

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            record.append(Launch(kernel, tuple(grid), args, kwargs, case))
        return launch

    triton.KernelInterface.__getitem__ = getitem
    torch.autocast = _Autocast
    try:
        with _MetaScalars():
            yield
    finally:
        triton.KernelInterface.__getitem__ = prev_getitem
        torch.autocast = prev_autocast


def clear_launcher_caches() -> None:
    """The launchers cache small device tensors per layout; the capture's are meta tensors."""
    for mod in (gcm, mlce):
        for name in ("_layout", "_schedule"):
            f = getattr(mod, name, None)
            if f is not None and hasattr(f, "cache_clear"):
                f.cache_clear()
    from kernels import _triton_utils

    _triton_utils._ptr_array_cached.cache_clear()
    _triton_utils._int_array_cached.cache_clear()


# ------------------------------------------------------------------------------------------------
# Cases: real calls of the public functions on meta tensors
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    run: Callable[[], None]
    group: str = "extreme"


def _t(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META, requires_grad=grad)


@contextlib.contextmanager
def _matmul_mode(autocast: torch.dtype | None, tf32: bool = False):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with _Autocast("meta", dtype=autocast, enabled=autocast is not None):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def gather_call(vocabs, dims, n_words, actions_per_word, dtype, *, zero=True, pos=True, seg=True,
                backward=gcm.BACKWARD_VARIANTS, index_dtype=torch.int32, n_positions=512):
    K, D = len(vocabs), sum(dims)
    n_actions = int(n_words * actions_per_word)
    tables = [_t(v, d, dtype=dtype, grad=True) for v, d in zip(vocabs, dims)]
    attr_ids, offs = _t(n_actions, K, dtype=index_dtype), _t(n_words + 1, dtype=index_dtype)
    kw = {}
    if zero:
        kw["zero_mask"] = _t(n_words, dtype=torch.bool)
    if pos:
        kw["pos_table"], kw["word_pos"] = _t(n_positions, D, dtype=dtype, grad=True), _t(n_words, dtype=index_dtype)
    if seg:
        kw["seg_vec"] = _t(D, dtype=dtype, grad=True)
    if not backward:  # forward only
        gcm.gather_concat_mean(tables, attr_ids, offs, impl="triton", **kw)
    for variant in backward:
        out = gcm.gather_concat_mean(tables, attr_ids, offs, impl="triton", backward=variant, **kw)
        out.backward(torch.empty_like(out))


def ce_call(vocabs, H, M, dtype, *, hidden_dtype=None, autocast=None, tf32=False, bias=True, normalize=True,
            labels_per_row=2.0, grads=("hidden", "weight", "bias"), impl="triton"):
    hidden = _t(M, H, dtype=hidden_dtype or dtype, grad="hidden" in grads)
    weights = [_t(v, H, dtype=dtype, grad="weight" in grads) for v in vocabs]
    biases = [_t(v, dtype=dtype, grad="bias" in grads) if bias else None for v in vocabs]
    nnz = int(M * labels_per_row)
    offs = [_t(M + 1, dtype=torch.int32) for _ in vocabs]
    ids = [_t(nnz, dtype=torch.int32) for _ in vocabs]
    with _matmul_mode(autocast, tf32):
        loss = mlce.multi_label_softmax_ce_grouped(hidden, weights, biases, offs, ids, normalize, impl=impl)
    with _matmul_mode(None, tf32):  # torch's TF32 flag is global: the backward reads it too
        if loss.requires_grad:
            loss.sum().backward()


# The paper's layout (Table 1; gpu_check.paper_layout): long-term 6 attributes, short-term 4, H = 128.
PAPER_LONG = ([10, 12, 14, 85124, 11438, 26], [8, 8, 8, 48, 40, 16])
PAPER_SHORT = ([10, 40804, 10386, 8], [16, 64, 40, 8])
PAPER_WORDS = 256 * 128  # 256 users x <= 128 words per segment (257-token grid with CLS + user tokens)
PAPER_M = 10_000


def paper_cases() -> list[Case]:
    cases = []
    for seg_name, (vocabs, dims), apw in (("long", PAPER_LONG, 2.5), ("short", PAPER_SHORT, 6.0)):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            n = str(dt).replace("torch.", "")
            cases.append(Case(f"paper gather {seg_name} {n}", lambda v=vocabs, d=dims, a=apw, dt=dt:
                              gather_call(v, d, PAPER_WORDS, a, dt), "paper"))
        # the model's CE: fp32 parameters, bf16 autocast; and plain fp32 (TF32 off / on), bf16, fp16
        for label, kw in (("fp32 params, bf16 autocast", dict(dtype=torch.float32, autocast=torch.bfloat16)),
                          ("fp32 params, fp16 autocast", dict(dtype=torch.float32, autocast=torch.float16)),
                          ("bf16 hidden, fp32 params, bf16 autocast",
                           dict(dtype=torch.float32, hidden_dtype=torch.bfloat16, autocast=torch.bfloat16)),
                          ("fp32", dict(dtype=torch.float32)), ("fp32 TF32", dict(dtype=torch.float32, tf32=True)),
                          ("bf16", dict(dtype=torch.bfloat16)), ("fp16", dict(dtype=torch.float16))):
            cases.append(Case(f"paper ce {seg_name} {label}", lambda v=vocabs, kw=kw: ce_call(v, 128, PAPER_M, **kw),
                              "paper"))
    cases.append(Case("paper ce long normalize=False, no bias", lambda: ce_call(
        PAPER_LONG[0], 128, PAPER_M, torch.float32, autocast=torch.bfloat16, bias=False, normalize=False), "paper"))
    cases.append(Case("paper ce long hidden grad only", lambda: ce_call(
        PAPER_LONG[0], 128, PAPER_M, torch.float32, autocast=torch.bfloat16, grads=("hidden",)), "paper"))
    cases.append(Case("paper ce long weight grads only", lambda: ce_call(
        PAPER_LONG[0], 128, PAPER_M, torch.float32, autocast=torch.bfloat16, grads=("weight", "bias")), "paper"))
    return cases


def extreme_cases() -> list[Case]:
    cases = []
    for dt in (torch.float32, torch.bfloat16):
        n = str(dt).replace("torch.", "")
        for rows in (10**6, 10**7):
            cases.append(Case(f"gather table {rows:.0e} rows {n}", lambda r=rows, dt=dt: gather_call(
                [r, 1000], [96, 32], PAPER_WORDS, 2.5, dt, index_dtype=torch.int64)))
            cases.append(Case(f"ce head V={rows:.0e} {n}", lambda r=rows, dt=dt: ce_call(
                [r], 128, PAPER_M, dt, autocast=torch.bfloat16 if dt == torch.float32 else None)))
        cases.append(Case(f"gather H=1024 {n}", lambda dt=dt: gather_call([85124, 11438, 26], [512, 384, 128],
                                                                          PAPER_WORDS // 4, 2.5, dt)))
        cases.append(Case(f"gather dims not pow2 {n}", lambda dt=dt: gather_call([85124, 11438, 26, 7],
                                                                                [50, 37, 21, 12], PAPER_WORDS, 2.5,
                                                                                dt)))
        cases.append(Case(f"gather one attribute {n}", lambda dt=dt: gather_call([85124], [128], PAPER_WORDS, 2.5, dt,
                                                                                 pos=False, seg=False)))
        cases.append(Case(f"gather one attribute D=1 {n}", lambda dt=dt: gather_call([10], [1], 1000, 1.0, dt,
                                                                                     zero=False, pos=False,
                                                                                     seg=False)))
        cases.append(Case(f"gather no fusion {n}", lambda dt=dt: gather_call(*PAPER_LONG, PAPER_WORDS, 2.5, dt,
                                                                             zero=False, pos=False, seg=False)))
        cases.append(Case(f"gather zero mask only {n}", lambda dt=dt: gather_call(*PAPER_LONG, PAPER_WORDS, 2.5, dt,
                                                                                  pos=False, seg=False)))
    # H = 1024 (any dtype) and ieee fp32 beyond H = 256 are not Triton configurations: impl="auto"
    # must take the torch path (no launch); impl="triton" raises (tests/test_kernels_triton.py)
    for label, kw in (("fp32 params, bf16 autocast", dict(dtype=torch.float32, autocast=torch.bfloat16)),
                      ("fp32", dict(dtype=torch.float32)), ("bf16", dict(dtype=torch.bfloat16))):
        cases.append(Case(f"ce H=1024 {label} (auto: torch path)", lambda kw=kw: _with_reference_stand_ins(
            lambda: ce_call(PAPER_SHORT[0], 1024, PAPER_M, impl="auto", **kw))))
        if label != "fp32":
            cases.append(Case(f"ce H=512 {label}", lambda kw=kw: ce_call(PAPER_SHORT[0], 512, PAPER_M, **kw)))
        cases.append(Case(f"ce H=96 {label}", lambda kw=kw: ce_call(PAPER_SHORT[0], 96, PAPER_M, **kw)))
        cases.append(Case(f"ce one head V=2 {label}", lambda kw=kw: ce_call([2], 128, PAPER_M, **kw)))
        cases.append(Case(f"ce M=0 {label}", lambda kw=kw: ce_call(PAPER_LONG[0], 128, 0, **kw)))
        cases.append(Case(f"ce M=1e6 {label}", lambda kw=kw: ce_call(PAPER_LONG[0], 128, 10**6, **kw)))
        cases.append(Case(f"ce M=1 {label}", lambda kw=kw: ce_call(PAPER_SHORT[0], 128, 1, **kw)))
    cases.append(Case("gather fp16", lambda: gather_call(*PAPER_LONG, PAPER_WORDS, 2.5, torch.float16,
                                                         index_dtype=torch.int64)))
    cases.append(Case("gather no words", lambda: gather_call(*PAPER_LONG, 0, 1.0, torch.float32)))
    return cases


def _ref_gather_stand_in(tables, attr_ids, word_offsets):
    """Shape-only stand-in for the torch reference (it launches nothing; its data-dependent sizes
    have no meta implementation): ``[n_words, D]``, connected to every table."""
    keep = sum(t.sum() for t in tables) * 0
    return torch.zeros(word_offsets.shape[0] - 1, sum(t.shape[1] for t in tables), dtype=tables[0].dtype,
                       device=tables[0].device) + keep


def _ref_ce_stand_in(hidden, weight, bias, label_offsets, label_ids, normalize=True, **_):
    keep = weight.sum() * 0 + (bias.sum() * 0 if bias is not None else 0)
    return hidden.float().sum(1) * 0 + keep


def _with_reference_stand_ins(fn):
    """Run gpu_check code on meta tensors: the torch references (no launches) become shape-only."""
    import torch.fx.experimental._config as fx_config

    prev = (gcm.gather_concat_mean_reference, mlce.multi_label_softmax_ce_reference,
            fx_config.meta_nonzero_assume_all_nonzero)
    gcm.gather_concat_mean_reference, mlce.multi_label_softmax_ce_reference = _ref_gather_stand_in, _ref_ce_stand_in
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        fn()
    finally:
        (gcm.gather_concat_mean_reference, mlce.multi_label_softmax_ce_reference,
         fx_config.meta_nonzero_assume_all_nonzero) = prev


def gpu_check_cases() -> list[Case]:
    """benchmarks/gpu_check.py's own calls, through its own functions, at its paper sizes: the device
    run a lent GPU does compiles exactly these (the V_CHUNK sweep changes no compiled constant)."""
    import gpu_check as gc

    layout, user_vocabs, H = gc.paper_layout()
    state: dict = {}

    def batch():
        if "batch" not in state:
            state["batch"] = gc.synth_batch(layout, user_vocabs, 512, seed=0, device=META)
        return state["batch"]

    def case(name, fn):
        return Case(name, lambda: _with_reference_stand_ins(fn), "gpu_check")

    cases = []
    for i, sl in enumerate(layout):
        cases.append(case(f"gpu_check check_gather {sl.name}", lambda i=i, sl=sl: gc.check_gather(
            batch().segments[i], sl, H, META)))
        cases.append(case(f"gpu_check check_ce {sl.name}", lambda i=i, sl=sl: gc.check_ce(
            batch().segments[i], sl, H, META)))
        cases.append(case(f"gpu_check time_gather {sl.name} bf16", lambda i=i, sl=sl: gc.time_gather(
            batch().segments[i], sl, H, META, None, 1, 0, torch.bfloat16, only=("triton_atomic", "triton_sorted"))))
        cases.append(case(f"gpu_check time_ce {sl.name} bf16 autocast", lambda i=i, sl=sl: gc.time_ce(
            batch().segments[i], sl, H, META, 1, 0, autocast=True, only=("triton",))))
    cases.append(case("gpu_check train step (paper model)", lambda: gc.train_step_launches(
        layout, user_vocabs, H, batch(), META)))
    return cases


def all_cases() -> list[Case]:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    return paper_cases() + gpu_check_cases() + extreme_cases()


def capture(cases: list[Case], props: GPUProps) -> tuple[list[Launch], dict[str, str]]:
    """Every launch of every case for ``props``; and the cases that raised (name -> error)."""
    launches: list[Launch] = []
    errors: dict[str, str] = {}
    with capture_target(props):
        for case in cases:
            clear_launcher_caches()
            n0 = len(launches)
            try:
                with intercept(launches, case.name):
                    case.run()
            except Exception as e:  # a launcher that refuses a case is a gate failure
                del launches[n0:]
                errors[case.name] = f"{type(e).__name__}: {e}"
        clear_launcher_caches()
    return launches, errors


# ------------------------------------------------------------------------------------------------
# Specialise and compile
# ------------------------------------------------------------------------------------------------

_BINDERS: dict = {}


def specialise(launch: Launch, props: GPUProps) -> dict:
    """What JITFunction.run would hand to triton.compile for this launch on ``props``'s target."""
    target = GPUTarget("cuda", props.capability, 32)
    kernel = launch.kernel
    bkey = (id(kernel), props.capability)
    if bkey not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[bkey] = (backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    backend, binder = _BINDERS[bkey]
    kw = dict(launch.kwargs)
    kw["debug"] = kw.get("debug", kernel.debug) or triton.knobs.runtime.debug
    kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    kw["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    bound, spec, opts = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    key = f"{kernel.fn.__qualname__}|sm_{props.capability}|{compute_cache_key({}, spec, opts)}"
    return {"kernel": kernel, "target": target, "signature": signature, "constexprs": constexprs,
            "attrs": attrs, "options": options, "key": hashlib.sha256(key.encode()).hexdigest()[:16]}


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> dict:
    out = {}
    for k, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        out[k] = int(m[-1]) if m else 0
    return out


def _ptxas_log(ptx: str, capability: int) -> str:
    """Re-run ptxas -v (as Triton's make_cubin does) when Triton's cache served the cubin."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src, "-o", os.path.join(d, "k.o")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def ptx_features(ptx: str) -> dict:
    """Counts of the instructions that say whether memory is vectorised and tl.dot uses tensor cores."""
    def n(rx):
        return len(re.findall(rx, ptx))

    return {
        "ld_v4": n(r"\bld\.global(?:\.\w+)*\.v4\."), "ld_v2": n(r"\bld\.global(?:\.\w+)*\.v2\."),
        "ld_scalar": n(r"\bld\.global(?:\.(?!v[248]\b)\w+)*\s"),
        "st_v4": n(r"\bst\.global(?:\.\w+)*\.v4\."), "st_v2": n(r"\bst\.global(?:\.\w+)*\.v2\."),
        "st_scalar": n(r"\bst\.global(?:\.(?!v[248]\b)\w+)*\s"),
        "atom": n(r"\b(?:atom|red)\.global"),
        "mma": n(r"\bmma\.sync"), "wgmma": n(r"\bwgmma\.mma_async"), "tcgen05": n(r"\btcgen05\.mma"),
        "cp_async": n(r"\bcp\.async\.(?:ca|cg)"), "tma": n(r"\bcp\.async\.bulk\.tensor"),
        "fma": n(r"\bfma\.rn\.f32"), "ldmatrix": n(r"\bldmatrix"),
    }


_JOBS: list[dict] = []


def _compile_one(i: int) -> dict:
    job = _JOBS[i]
    t0 = time.perf_counter()
    cap = job["target"].arch
    triton.knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(job["kernel"], job["signature"], job["constexprs"], job["attrs"]),
                                target=job["target"], options=job["options"].__dict__)
    except Exception as e:
        return {"ok_compile": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                "seconds": time.perf_counter() - t0}
    ptx = ck.asm["ptx"]
    log = buf.getvalue()
    side = os.path.join(triton.knobs.cache.dir, "compile_gate", f"{ck.hash}.json")
    if "registers" in log:
        stats = parse_ptxas(log)
        os.makedirs(os.path.dirname(side), exist_ok=True)
        with open(side, "w") as f:
            json.dump(stats, f)
    elif os.path.exists(side):
        with open(side) as f:
            stats = json.load(f)
    else:
        stats = parse_ptxas(_ptxas_log(ptx, cap))
    return {"ok_compile": True, "shared": int(ck.metadata.shared), **stats, "ptx": ptx_features(ptx),
            "seconds": time.perf_counter() - t0}


def compile_all(jobs: list[dict], n_jobs: int) -> list[dict]:
    global _JOBS
    _JOBS = jobs
    if n_jobs <= 1 or len(jobs) <= 1:
        return [_compile_one(i) for i in range(len(jobs))]
    import multiprocessing as mp

    # fork: the workers inherit the captured launches (JITFunctions and meta tensors do not pickle)
    with mp.get_context("fork").Pool(n_jobs) as pool:
        return pool.map(_compile_one, range(len(jobs)), chunksize=1)


# ------------------------------------------------------------------------------------------------
# Gate and report
# ------------------------------------------------------------------------------------------------

_SHOWN = ("W_DTYPE", "DOT", "TAB_DTYPE", "TF32", "HAS_BIAS", "NORMALIZE", "NEED_DH", "NEED_DW", "NEED_DB",
          "HAS_ZERO", "HAS_ADD", "HAS_POS", "HAS_SEG")


def describe(spec: dict) -> dict:
    """A readable configuration: pointer dtypes, block sizes, flags, warps, stages."""
    sig = spec["signature"]
    cex = {k[0] if isinstance(k, tuple) else k: v for k, v in spec["constexprs"].items()}
    names = list(sig)
    cex = {names[k] if isinstance(k, int) else k: v for k, v in cex.items()}
    blocks = {k: v for k, v in cex.items() if isinstance(k, str) and k.startswith("BLOCK")}
    flags = {}
    for k in _SHOWN:
        if k in cex:
            v = cex[k]
            flags[k] = str(v).replace("triton.language.", "").replace("tl.", "") if not isinstance(v, bool) else v
    ptrs = sorted({v for v in sig.values() if isinstance(v, str) and v.startswith("*")})
    o = spec["options"]
    return {"blocks": blocks, "flags": flags, "ptr_dtypes": ptrs, "num_warps": o.num_warps,
            "num_stages": o.num_stages}


def config_str(d: dict) -> str:
    b = "×".join(f"{v}" for v in d["blocks"].values())
    bn = "×".join(k.replace("BLOCK_", "") for k in d["blocks"])
    on = [k for k, v in d["flags"].items() if v is True]
    dt = [f"{k}={v}" for k, v in d["flags"].items() if not isinstance(v, bool)]
    return f"{bn} {b}, {d['num_warps']}w/{d['num_stages']}s, {' '.join(dt)}{' ' if on else ''}{'+'.join(on)}"


@dataclass
class Result:
    kernel: str
    target: str
    key: str
    config: dict
    cases: list[str] = field(default_factory=list)
    grids: list = field(default_factory=list)
    compiled: dict = field(default_factory=dict)
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    failures: list[str] = field(default_factory=list)


def gate(result: Result, props: GPUProps, floors: dict[str, float]) -> None:
    c = result.compiled
    if not c.get("ok_compile"):
        result.failures.append(f"does not compile: {c.get('error')}")
        return
    if c["spill_stores"] or c["spill_loads"]:
        result.failures.append(f"spills {c['spill_stores']} B stores / {c['spill_loads']} B loads")
    if c["shared"] > props.shared_per_block:
        result.failures.append(f"shared memory {c['shared']:,} B > {props.shared_per_block:,} B per block")
    blocks, occ = occupancy(props, c["regs"], result.config["num_warps"], c["shared"])
    result.blocks_per_sm, result.occupancy = blocks, occ
    floor = floors.get(result.kernel, 0.0)
    if blocks and occ < floor:
        result.failures.append(f"occupancy {occ:.1%} < floor {floor:.1%}")


def run_gate(targets: list[str], n_jobs: int, cases: list[Case] | None = None,
             floors: dict[str, float] | None = None, log=print) -> dict:
    cases = all_cases() if cases is None else cases
    floors = FLOORS if floors is None else floors
    t0 = time.perf_counter()
    results: dict[str, Result] = {}
    case_errors: dict[str, dict[str, str]] = {}
    jobs, keys = [], []
    n_launches = 0
    for tname in targets:
        props = TARGETS[tname]
        launches, errors = capture(cases, props)
        case_errors[tname] = errors
        n_launches += len(launches)
        for la in launches:
            spec = specialise(la, props)
            k = spec["key"]
            if k not in results:
                results[k] = Result(la.name, tname, k, describe(spec))
                jobs.append(spec)
                keys.append(k)
            r = results[k]
            if la.case not in r.cases:
                r.cases.append(la.case)
            if la.grid not in r.grids:
                r.grids.append(la.grid)
    t_capture = time.perf_counter() - t0
    log(f"[compile_gate] {len(cases)} cases x {len(targets)} targets: {n_launches} launches, "
        f"{len(jobs)} distinct compiles (captured in {t_capture:.1f}s); compiling with {n_jobs} job(s)")
    compiled = compile_all(jobs, n_jobs)
    for k, c in zip(keys, compiled):
        r = results[k]
        r.compiled = c
        gate(r, TARGETS[r.target], floors)
    failures = [f"{r.kernel} [{config_str(r.config)}] on {r.target}: {f}" for r in results.values() for f in r.failures]
    for tname, errs in case_errors.items():
        failures += [f"case '{c}' on {tname}: launcher raised {e}" for c, e in errs.items()]
    covered = {la for r in results.values() for la in r.cases}
    silent = [c.name for c in cases if c.name not in covered and not any(c.name in e for e in case_errors.values())]
    return {"targets": targets, "cases": [c.name for c in cases], "cases_without_launch": silent,
            "n_launches": n_launches, "n_compiles": len(jobs), "results": list(results.values()),
            "failures": failures, "case_errors": case_errors, "seconds": time.perf_counter() - t0,
            "capture_seconds": t_capture, "ok": not failures}


def _fmt_kb(b: int) -> str:
    return f"{b / 1024:.1f} KiB" if b else "0"


def _ptx_str(p: dict) -> str:
    parts = []
    ld = f"ld v4/v2/1: {p['ld_v4']}/{p['ld_v2']}/{p['ld_scalar']}"
    parts.append(ld)
    if p["st_v4"] or p["st_v2"] or p["st_scalar"]:
        parts.append(f"st {p['st_v4']}/{p['st_v2']}/{p['st_scalar']}")
    if p["atom"]:
        parts.append(f"atom {p['atom']}")
    tc = [f"{n} {p[n]}" for n in ("wgmma", "tcgen05", "mma") if p[n]]
    if tc:
        parts.append(", ".join(tc))
    elif p["fma"]:
        parts.append(f"FMA {p['fma']} (no tensor cores)")
    return "; ".join(parts)


def markdown(rep: dict) -> str:
    lines = [f"{len(rep['cases'])} cases × {len(rep['targets'])} targets ({', '.join(rep['targets'])}): "
             f"{rep['n_launches']} launches, {rep['n_compiles']} distinct configurations compiled. "
             f"Status: {'**all pass**' if rep['ok'] else '**' + str(len(rep['failures'])) + ' failures**'}.",
             "",
             "| kernel | configuration | target | regs | spill st/ld (B) | shared | blocks/SM | occupancy | "
             "global ld v4/v2/scalar; st; atomics; dot | gate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {t: i for i, t in enumerate(rep["targets"])}
    rows = sorted(rep["results"], key=lambda r: (r.kernel, config_str(r.config), order[r.target]))
    for r in rows:
        c = r.compiled
        if not c.get("ok_compile"):
            lines.append(f"| `{r.kernel}` | {config_str(r.config)} | {r.target} | – | – | – | – | – | – | "
                         f"FAIL: {c.get('error', '')[:80]} |")
            continue
        status = "ok" if not r.failures else "FAIL: " + "; ".join(r.failures)
        lines.append(f"| `{r.kernel}` | {config_str(r.config)} | {r.target} | {c['regs']} | "
                     f"{c['spill_stores']}/{c['spill_loads']} | {_fmt_kb(c['shared'])} | {r.blocks_per_sm} | "
                     f"{r.occupancy:.1%} | {_ptx_str(c['ptx'])} | {status} |")
    if rep["case_errors"] and any(rep["case_errors"].values()):
        lines += ["", "Cases the launchers refused:", ""]
        for t, errs in rep["case_errors"].items():
            lines += [f"- {t}: {c}: {e}" for c, e in errs.items()]
    return "\n".join(lines)


BEGIN, END = "<!-- compile-gate:begin -->", "<!-- compile-gate:end -->"


def write_markdown(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def to_json(rep: dict) -> dict:
    out = dict(rep)
    out["results"] = [{"kernel": r.kernel, "target": r.target, "key": r.key, "config": r.config,
                       "config_str": config_str(r.config), "cases": r.cases, "grids": r.grids[:4],
                       "compiled": r.compiled, "blocks_per_sm": r.blocks_per_sm, "occupancy": r.occupancy,
                       "failures": r.failures} for r in rep["results"]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--json", default=None, help="write the full report here")
    ap.add_argument("--markdown", default=None, help="rewrite the table between the compile-gate markers here")
    ap.add_argument("--list", action="store_true", help="print the captured launches and exit (no compile)")
    ap.add_argument("--cases", default=None, help="only cases whose name contains this string")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    cases = all_cases()
    if args.cases:
        cases = [c for c in cases if args.cases in c.name]
    if args.list:
        for t in targets:
            launches, errors = capture(cases, TARGETS[t])
            for la in launches:
                print(t, la.case, "|", la.name, la.grid, config_str(describe(specialise(la, TARGETS[t]))))
            for c, e in errors.items():
                print(t, c, "| RAISED", e)
        return 0
    rep = run_gate(targets, args.jobs, cases)
    table = markdown(rep)
    print(table)
    print(f"[compile_gate] {rep['n_compiles']} compiles in {rep['seconds']:.0f}s; "
          f"{'all pass' if rep['ok'] else str(len(rep['failures'])) + ' failures'}", file=sys.stderr)
    for f in rep["failures"]:
        print("  FAIL", f, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(rep), f, indent=1, default=str)
    if args.markdown:
        write_markdown(args.markdown, table)
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
