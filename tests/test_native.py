"""The compiled kernels' switch, report and checked wrappers (``twotower.native``); the kernels
themselves are tested against their PyTorch paths beside those paths (test_losses, test_evaluator,
test_optim)."""
import json

import numpy as np
import pytest
import torch

from twotower import RunConfig, native, train
from twotower.cli import main
from twotower.errors import ConfigError
from twotower.run import Run

WRAPPERS = ("softmax_blocks", "softmax_row_shift", "exp2_column_sums", "top_k", "rowadam_catch_up", "rowadam_step")


# ---- the switch and the report ------------------------------------------------------------------------
def test_the_environment_switch_wins_over_the_config(monkeypatch, native_on):
    assert native.enabled()
    native.configure(False)
    assert not native.enabled() and not native.active("rowadam")
    native.configure(True)
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(native.ENV, off)
        assert not native.enabled() and not any(native.active(k) for k in native.KERNELS)
    monkeypatch.setenv(native.ENV, "1")
    assert native.enabled()
    monkeypatch.setenv(native.ENV, "maybe")
    with pytest.raises(ConfigError, match="TWOTOWER_NATIVE='maybe': expected 0"):
        native.enabled()
    with pytest.raises(ConfigError, match="TWOTOWER_NATIVE"):
        native.configure(True)


def test_report_says_which_path_runs_and_why(monkeypatch, native_on):
    rep = native.report()
    for kernel in native.KERNELS:
        k = rep["kernels"][kernel]
        assert k["path"] == ("compiled" if native.available(kernel) else "pytorch")
    monkeypatch.setenv(native.ENV, "0")
    rep = native.report()
    assert rep["switch"] == {"on": False, "env": "0", "config": True}
    for kernel in native.KERNELS:
        k = rep["kernels"][kernel]
        assert k["path"] == "pytorch"
        if native.available(kernel):
            assert k["why"] == "switched off (TWOTOWER_NATIVE=0)"
    assert native.summary(rep).startswith("compiled: none; PyTorch path: softmax (")
    monkeypatch.delenv(native.ENV)
    native.configure(False)
    assert all(k["why"] in ("switched off (train.native = false)",) or not native.available(name)
               for name, k in native.report()["kernels"].items())
    json.dumps(native.report())  # written into metrics.json as it is


def test_report_of_a_kernel_that_was_not_built_or_lacks_mkl(monkeypatch, native_on):
    monkeypatch.setitem(native._MODULES, "topk", None)
    monkeypatch.setattr(native._blas, "lookup", lambda: {"sgemm_": 1, "mkl_set_num_threads_local": None})
    k = native.report()["kernels"]
    assert k["topk"] == {"built": False, "blas_found": False, "path": "pytorch",
                         "why": "not built (no C compiler at install: reinstall with one)"}
    if native.built("softmax"):
        assert k["softmax"]["path"] == "pytorch" and k["softmax"]["blas_found"] is False
        assert k["softmax"]["why"].startswith("mkl_set_num_threads_local not found in ")
    assert not native.active("softmax") and not native.active("topk")


def test_info_command(monkeypatch, native_on, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for kernel in native.KERNELS:
        assert f"  {kernel} " in out
    monkeypatch.setenv(native.ENV, "0")
    assert main(["info", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {k["path"] for k in rep["kernels"].values()} == {"pytorch"}
    monkeypatch.setenv(native.ENV, "2")
    assert main(["info"]) == 2
    assert "TWOTOWER_NATIVE='2': expected 0" in capsys.readouterr().err


# ---- with the switch off, nothing compiled is called -------------------------------------------------
@pytest.mark.parametrize("switch", ["env", "config", "on"])
def test_training_evaluation_and_recommendation_call_no_kernel_when_switched_off(monkeypatch, tmp_path, native_on,
                                                                                switch):
    """A whole run (DeferredAdam, the fused loss, validation and test ranking, batch recommendation)
    with every wrapper counted: none called with the switch off (by the environment, or by
    ``train.native = false``); with it on, each kernel is (so the count can tell)."""
    if switch == "on" and not all(native.available(k) for k in native.KERNELS):
        pytest.skip("not every kernel is built here")
    calls = {name: 0 for name in WRAPPERS}
    for name in WRAPPERS:
        def counted(*a, _name=name, _f=getattr(native, name), **k):
            calls[_name] += 1
            return _f(*a, **k)
        monkeypatch.setattr(native, name, counted)
    if switch == "env":
        monkeypatch.setenv(native.ENV, "0")
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 100},
                               "model": {"dim": 8}, "eval": {"ks": [10]},
                               "train": {"epochs": 2, "batch_size": 256, "optimizer": "deferred_adam",
                                         "native": switch != "config"}})
    lines = []
    res = train(cfg, tmp_path / "run", quiet=True, log=lines.append)
    run = Run(tmp_path / "run")
    frame = run.recommend(run.users.decode(np.arange(3)), k=5)
    assert len(frame) == 15 and res.test["recall@10"] >= 0
    native_line = next(line for line in lines if line.startswith("native: "))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    paths = {k: v["path"] for k, v in metrics["native"]["kernels"].items()}
    if switch == "on":
        assert all(calls[name] for name in WRAPPERS if name != "exp2_column_sums"), calls
        assert set(paths.values()) == {"compiled"} and native_line.startswith("native: compiled: softmax, topk, rowadam")
    else:
        assert calls == dict.fromkeys(WRAPPERS, 0)
        assert set(paths.values()) == {"pytorch"} and native_line.startswith("native: compiled: none")


# ---- the wrappers refuse what the C would misread -----------------------------------------------------
needs = pytest.mark.skipif(not all(native.available(k) for k in native.KERNELS), reason="kernels not built, or no MKL")


@needs
def test_softmax_wrappers_name_the_argument_that_is_wrong():
    B, C, d = 6, 5, 4
    v, q = torch.randn(C, d), torch.randn(B, d)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    ok = dict(v=v, q2=q * 1.4, q=q, target=target, block=4)
    total, gq, gv, goff, denom = native.softmax_blocks(**ok)
    assert gq.shape == (B, d) and gv.shape == (C, d) and goff is None and denom.shape == (B,)
    bad = [
        (dict(target=target.int()), "argument 'target' must be torch.int64, got torch.int32"),
        (dict(q=torch.randn(B, d + 1)), r"argument 'q' must have shape \[B=6, d=4\], got \[6, 5\]"),
        (dict(v=torch.randn(d, C).T), "argument 'v' must be contiguous"),
        (dict(v=torch.randn(C, d, device="meta")), "argument 'v' must be on the CPU, got meta"),
        (dict(target=torch.tensor([0, 1, 2, 3, 5, 0])), r"argument 'target' holds 5, outside \[0, 5\)"),
        (dict(hit_rows=torch.tensor([3, 1]), hit_cols=torch.tensor([0, 0])), "argument 'hit_rows' must be sorted"),
        (dict(hit_rows=torch.tensor([1, 3]), hit_cols=torch.tensor([0, 7])), r"argument 'hit_cols' holds 7"),
        (dict(hit_rows=torch.tensor([1, 3])), "argument 'hit_cols' is required"),
        (dict(offset2=torch.zeros(C + 1)), r"argument 'offset2' must have shape \[C=5\]"),
        (dict(q=q.double(), q2=q.double()), "argument 'q2' must be torch.float32"),
        (dict(block=0), "argument 'block' must be a positive int"),
    ]
    for change, message in bad:
        with pytest.raises(native.NativeArgumentError, match=message):
            native.softmax_blocks(**{**ok, **change})
    with pytest.raises(native.NativeArgumentError, match=r"softmax_row_shift: argument 'off2' must have shape \[C=5\]"):
        native.softmax_row_shift(q, v, torch.zeros(3), -120.0, 64.0)
    z = torch.randn(3, 7)
    before = z.clone()
    with pytest.raises(native.NativeArgumentError, match=r"argument 'row_offset' must have shape \[rows=3\]"):
        native.exp2_column_sums(z, torch.zeros(7))
    assert torch.equal(z, before)  # refused before anything was written


@needs
def test_top_k_wrapper_checks_the_exclusion_csr():
    u, v = torch.randn(3, 4), torch.randn(10, 4)
    indptr, indices = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 5, 9])
    rows = torch.tensor([2, 0, 1])
    values, index = native.top_k(u, v, 4, None, rows, indptr, indices)
    assert index.shape == (3, 4) and 9 not in index[0].tolist() and not {1, 5} & set(index[1].tolist())
    bad = [
        (dict(k=11), "argument 'k' must be at most the item count 10"),
        (dict(indptr=torch.tensor([0, 2, 2, 4])), "argument 'indptr' must start at 0 and end at len"),
        (dict(indptr=torch.tensor([0, 3, 2, 3])), "argument 'indptr' must not decrease"),
        (dict(rows=torch.tensor([0, 1, 3])), r"argument 'rows' holds 3, outside \[0, 3\)"),
        (dict(rows=None), "argument 'rows' is required"),
        (dict(bias=torch.zeros(9)), r"argument 'bias' must have shape \[m=10\]"),
        (dict(users=torch.randn(3, 5)), r"argument 'items' must have shape \[m=10, d=5\]"),
    ]
    args = dict(users=u, items=v, k=4, bias=None, rows=rows, indptr=indptr, indices=indices)
    for change, message in bad:
        with pytest.raises(native.NativeArgumentError, match=message):
            native.top_k(**{**args, **change})


@needs
def test_rowadam_wrappers_check_the_table_and_the_gradient():
    N, D = 8, 3
    p, moments = torch.randn(N, D), torch.zeros(N, 2, D)
    clock, tail = torch.zeros(N, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.float64)
    table = native.RowAdamTable(p, moments, clock, tail, 0, (0.9, 0.999), 1e-8)
    slot = torch.full((N,), -1, dtype=torch.int32)
    assert native.rowadam_step(table, torch.tensor([1, 1, 4]), torch.ones(3, D), 1, 0.1, slot) == 2
    with pytest.raises(native.NativeArgumentError, match=r"rowadam: argument 'moments' must have shape \[N=8, 2, D=3\]"):
        native.RowAdamTable(p, torch.zeros(N, D), clock, tail, 0, (0.9, 0.999), 1e-8)
    with pytest.raises(native.NativeArgumentError, match="argument 'tail' must be torch.float64"):
        native.RowAdamTable(p, moments, clock, tail.float(), 0, (0.9, 0.999), 1e-8)
    before = p.clone()
    with pytest.raises(native.NativeArgumentError, match=r"argument 'grad' must have shape \[n=2, D=3\]"):
        native.rowadam_step(table, torch.tensor([1, 2]), torch.ones(2, D + 1), 2, 0.1, slot)
    with pytest.raises(native.NativeArgumentError, match="argument 'slot' must be torch.int32"):
        native.rowadam_step(table, torch.tensor([1, 2]), torch.ones(2, D), 2, 0.1, slot.long())
    with pytest.raises(native.NativeArgumentError, match="argument 'rows' must be torch.int64"):
        native.rowadam_catch_up(table, torch.tensor([1, 2], dtype=torch.int32), 1)
    assert torch.equal(p, before)


# ---- OpenMP's wait policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("env, first, expected", [
    ({}, "twotower", {"GOMP_SPINCOUNT": "30000", "OMP_WAIT_POLICY": None, "set_by": "twotower", "in_effect": True}),
    ({}, "torch", {"GOMP_SPINCOUNT": "30000", "OMP_WAIT_POLICY": None, "set_by": "twotower", "in_effect": False}),
    ({"OMP_WAIT_POLICY": "passive"}, "twotower",
     {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "passive", "set_by": "environment", "in_effect": True}),
    ({"GOMP_SPINCOUNT": "300000"}, "twotower",
     {"GOMP_SPINCOUNT": "300000", "OMP_WAIT_POLICY": None, "set_by": "environment", "in_effect": True}),
])
@pytest.mark.slow
def test_import_twotower_bounds_the_openmp_spin_unless_the_environment_chose(env, first, expected):
    """In a fresh process (OpenMP reads its environment once): twotower's default, a user's choice
    kept, and the default reported as too late when torch was imported first."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = f"import {first}, twotower, json; print(json.dumps(twotower.openmp.status()))"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == expected
