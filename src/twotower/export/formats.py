"""Writing an exported tower (``towers.TowerExport``) as ONNX or TorchScript, and running it back.

ONNX goes through ``torch.onnx.export`` with the ``torch.export``-based exporter (the default of
PyTorch 2.13; the TorchScript-based one is deprecated): every input's varying dimensions are
declared (``batch``, ``history_length``, each feature's own lengths), so that one file serves any
batch. TorchScript is ``torch.jit.trace`` of the same module, frozen (``torch.jit.freeze``), which
keeps only the weights the tower reads (not the other tower's).

One lowering is ours: ``nn.EmbeddingBag`` (the categorical features' mean of codes). The stock
ONNX translation of ``aten::embedding_bag`` is a ``Loop`` over the bags, one iteration per entity:
at 256 users with three categorical features, ONNX Runtime took ~20 ms against ~1 ms for PyTorch.
``embedding_bag_onnx`` computes the same sums without a loop, as scatter-adds over the codes'
bag numbers, and is used when every bag of the tower is of a mode it covers (sum or mean, no
``padding_idx``, no ``include_last_offset``); otherwise the stock translation runs.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .towers import ExportError, TowerExport, dimension_names

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
INSTALL = "pip install 'twotower[export]'"
# Above this many bytes of weights, an ONNX file keeps them in a file beside it (protobuf's 2 GiB limit).
ONNX_INLINE_MAX = 1 << 30


def require(*packages: str, why: str) -> None:
    """Refuse cleanly when an optional package is missing (the ``export`` extra)."""
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"{why} needs the package(s) {', '.join(missing)}, not installed: {INSTALL}")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """The exporter's log lines (which optional operator sets it skipped) silenced while it runs."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _reason(e: BaseException) -> str:
    """The root cause of an exporter's error, in one line (its own text wraps it in advice)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else 'no message'}"


# ---- ONNX ----------------------------------------------------------------------------------------
def embedding_bag_onnx(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                       per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """``aten::embedding_bag`` (sum or mean mode) in ONNX operators, without a loop over bags.

    With ``N`` codes and ``B`` bags starting at ``offsets``, code ``i`` belongs to bag
    ``seg_i = #{b : offsets_b <= i} - 1`` (a cumulative sum of marks scattered at the offsets, so an
    empty bag, whose offset repeats the next one, is skipped); then

        sum_b  = sum_{i: seg_i = b} w_i * weight[indices_i]         (ScatterND, reduction add)
        mean_b = sum_b / max(count_b, 1)                            (an empty bag gives zero)

    as ``torch.nn.functional.embedding_bag`` computes them. Returns the four outputs of the aten op
    (the bag vectors, each code's bag, the bag sizes twice: the last two are never read)."""
    from onnx import TensorProto
    from onnxscript import opset18 as op

    if mode not in (0, 1) or include_last_offset or (padding_idx is not None and padding_idx >= 0):
        raise ExportError("embedding_bag_onnx covers sum and mean bags without padding_idx or include_last_offset")
    one = op.Constant(value_ints=[1])
    n = op.Shape(indices, start=0, end=1)
    b = op.Shape(offsets, start=0, end=1)
    zero_f, one_f = op.Constant(value_float=0.0), op.Constant(value_float=1.0)
    marks = op.ScatterElements(op.Expand(zero_f, op.Add(n, one)), offsets, op.Expand(one_f, b), axis=0, reduction="add")
    seg = op.Sub(op.Cast(op.CumSum(op.Slice(marks, op.Constant(value_ints=[0]), n), op.Constant(value_int=0)),
                         to=TensorProto.INT64), op.Constant(value_int=1))
    rows = op.Gather(weight, indices, axis=0)
    if per_sample_weights is not None:
        rows = op.Mul(rows, op.Unsqueeze(op.CastLike(per_sample_weights, rows), one))
    dim = op.Shape(weight, start=1, end=2)
    sums = op.ScatterND(op.Expand(op.CastLike(zero_f, weight), op.Concat(b, dim, axis=0)), op.Unsqueeze(seg, one), rows,
                        reduction="add")
    counts = op.ScatterElements(op.Expand(zero_f, b), seg, op.Expand(one_f, n), axis=0, reduction="add")
    out = sums if mode == 0 else op.Div(sums, op.CastLike(op.Unsqueeze(op.Max(counts, one_f), one), sums))
    sizes = op.Cast(counts, to=TensorProto.INT64)
    return out, seg, sizes, sizes


def embedding_bag_translations(module: nn.Module) -> dict:
    """The custom translations for ``module``: ours for ``embedding_bag`` when every bag qualifies."""
    bags = [m for m in module.modules() if isinstance(m, nn.EmbeddingBag)]
    if not bags or any(m.mode not in ("sum", "mean") or m.padding_idx is not None or m.include_last_offset for m in bags):
        return {}
    aten = torch.ops.aten
    return {aten._embedding_bag.default: embedding_bag_onnx, aten.embedding_bag.padding_idx: embedding_bag_onnx,
            aten.embedding_bag.default: embedding_bag_onnx}


def save_onnx(module: TowerExport, example: tuple[torch.Tensor, ...], path: str | Path) -> list[str]:
    """Export ``module`` to ONNX at ``path`` (inputs named as its signature, output ``vectors``,
    varying dimensions declared). Returns the files written (the model, and its weights file when
    they are too large to be inline)."""
    require("onnx", "onnxscript", why="exporting to ONNX")
    path = Path(path)
    sig = module.sig
    dims: dict[str, torch.export.Dim] = {}
    dynamic = tuple({i: dims.setdefault(d, torch.export.Dim(d)) for i, d in enumerate(names) if d is not None}
                    for names in dimension_names(sig))
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > ONNX_INLINE_MAX
    quiet = io.StringIO()
    loggers = _quiet_loggers("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(quiet), loggers:
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals, not the user's business
        try:
            program = torch.onnx.export(module, example, input_names=[s.name for s in sig.inputs], output_names=["vectors"],
                                        dynamo=True, dynamic_shapes=(dynamic,),  # forward(*tensors)
                                        custom_translation_table=embedding_bag_translations(module),
                                        verbose=False, optimize=True, report=False)
        except Exception as e:
            raise ExportError(f"the {sig.tower} tower could not be exported to ONNX ({_reason(e)}); --format "
                              "torchscript may still work") from e
        program.save(str(path), external_data=external)
    return [path.name] + ([path.name + ".data"] if external else [])


class OnnxTower:
    """An exported ONNX tower run with ONNX Runtime (CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        require("onnxruntime", why="running an ONNX tower")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # warnings about graph rewrites are not the caller's concern
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["vectors"], feed)[0]


# ---- TorchScript ---------------------------------------------------------------------------------
def save_torchscript(module: TowerExport, example: tuple[torch.Tensor, ...], path: str | Path) -> list[str]:
    """Trace ``module`` on ``example``, freeze it and save it at ``path``."""
    path = Path(path)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in PyTorch 2.13, still the format asked for
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a trace that may not generalise is refused
        try:
            traced = torch.jit.trace(module, example, check_trace=False)
            frozen = torch.jit.freeze(traced)
        except Exception as e:
            raise ExportError(f"the {module.sig.tower} tower could not be traced to TorchScript ({_reason(e)})") from e
    frozen.save(str(path))
    return [path.name]


class TorchScriptTower:
    """An exported TorchScript tower, loaded (``torch.jit.load``, CPU)."""

    def __init__(self, path: str | Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location="cpu")

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return self.module(*(torch.from_numpy(np.asarray(v)) for v in feed.values())).numpy()


SAVE = {"onnx": save_onnx, "torchscript": save_torchscript}
LOAD = {"onnx": OnnxTower, "torchscript": TorchScriptTower}
