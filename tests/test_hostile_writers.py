"""Hostile cases of the commands that write (issue 17, classes 2, 3, 4 and 11): two writers of one
run directory, the mode of every artifact, file-system failures (read-only, full, a file where a
folder should be), killed writers, resumed runs and manifests that point outside the run.

Every refusal is checked against the contract of ``_hostile.assert_refused``: exit code 2, one
message naming the place and the fix, no traceback. Full and read-only file systems are small
tmpfs mounts, so those cases run as root only (skipped with the reason elsewhere).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _hostile import FAST, assert_refused, can_mount, cli, no_temporaries, run, spawn, tiny_config, tmpfs

MOUNT = can_mount()
needs_mount = pytest.mark.skipif(MOUNT is not None, reason=MOUNT or "")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with the tiny data and config, and a finished run in ``run``."""
    d = tmp_path_factory.mktemp("hostile")
    cfg = tiny_config(d)
    rc, _, err = cli("train", cfg, "--out", d / "run", *FAST)
    assert rc == 0, err
    return d


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base / "run", out)
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {path} appeared: {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


def _holder(target: Path, folder: bool = True, name: str | None = None, beside: bool = False) -> subprocess.Popen:
    """Another process that holds ``target``'s lock until it is terminated."""
    code = ("import sys, time\nfrom twotower import locks\n"
            f"with locks.exclusive({str(target)!r}, 'holder job', folder={folder}, name={name!r}, beside={beside}):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# ---- class 2: two writers, one run directory ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_two_trainings_started_together_never_both_succeed(base, tmp_path, n):
    """``n`` real processes, started at once, same --out: exactly one trains; the others are refused,
    naming the holder (or, if they came later, finding the directory taken). The run left is one
    run: epochs 1..N once each, the config of the winner, a manifest that verifies."""
    out = tmp_path / "same"
    common = ["train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=12", "--set", "train.patience=0"]
    procs = {seed: spawn(*common, "--set", f"train.seed={seed}") for seed in (11, 22, 33, 44)[:n]}
    results = {seed: (p.wait(300), *p.communicate()) for seed, p in procs.items()}
    winners = [seed for seed, r in results.items() if r[0] == 0]
    assert len(winners) == 1, results
    for loser in (seed for seed in results if seed not in winners):
        msg = assert_refused(results[loser])
        assert "is writing this folder" in msg or "already exists and is not empty" in msg, msg
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == winners[0]
    from twotower.run import Run

    Run(out)  # the manifest verifies
    assert not no_temporaries(out)


_SLOW_EPOCHS = ("import time\nfrom twotower.training.trainer import Trainer\n_e = Trainer.train_epoch\n"
                "Trainer.train_epoch = lambda self, epoch: (time.sleep(0.4), _e(self, epoch))[1]\n")


@pytest.mark.slow
def test_a_second_training_is_refused_naming_the_first(base, tmp_path):
    """The overlap made certain: the first training is slowed down, the second starts while the first
    holds the lock; it is refused with the first's pid and host, and the first completes."""
    out = tmp_path / "run"
    first = spawn("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=6", "--set", "train.patience=0",
                  prelude=_SLOW_EPOCHS)
    _wait_for(out / ".twotower.lock", first)
    second = cli("train", base / "tiny.toml", "--out", out, *FAST)
    assert_refused(second, str(out), f"pid {first.pid} on {socket.gethostname()}", "twotower train", "choose another --out")
    resumed = cli("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=6", "--set", "train.patience=0",
                  "--resume")
    assert_refused(resumed, f"pid {first.pid}")
    assert first.wait(300) == 0, first.communicate()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not (out / ".twotower.lock").exists()


@pytest.mark.slow
def test_two_index_builds_at_once(base, run_copy):
    """``index`` twice on one run: the second, started while the first (slowed down) holds the lock,
    is refused naming it; started together with no slowing, never a failure other than the refusal,
    and the index left loads and matches the weights."""
    slow = ("import time\nimport twotower.index.run_index as r\n_t = r.tune_measure_save\n"
            "r.tune_measure_save = lambda *a, **k: (time.sleep(2), _t(*a, **k))[1]\n")
    first = spawn("index", run_copy, "--quiet", prelude=slow)
    _wait_for(run_copy / ".index.lock", first)
    assert_refused(cli("index", run_copy, "--quiet"), f"pid {first.pid}", "twotower index", "is writing this folder")
    assert first.wait(300) == 0, first.communicate()

    procs = [spawn("index", run_copy, "--quiet") for _ in range(2)]
    results = [(p.wait(300), *p.communicate()) for p in procs]
    assert any(r[0] == 0 for r in results), results
    for r in results:
        if r[0] != 0:
            assert_refused(r, "is writing this folder")
    from twotower.index.run_index import load_run_index
    from twotower.run import Run

    assert load_run_index(Run(run_copy), required=True).n_items == 40
    assert not no_temporaries(run_copy)


@pytest.mark.parametrize("case", ["index", "index_out", "index_update", "embed", "embed_same_job", "recommend_out", "mine_out",
                                  "compare", "train_resume", "export"])
@pytest.mark.slow
def test_every_writer_is_refused_while_another_process_holds_its_lock(base, run_copy, tmp_path, case):
    target, folder, name, args = {
        "index": (run_copy / "index", True, None, ["index", run_copy, "--quiet"]),
        "index_update": (run_copy / "index", True, None, ["index", run_copy, "--update", "--add-new"]),
        "index_out": (tmp_path / "ix", True, None, ["index", run_copy, "--out", tmp_path / "ix", "--quiet"]),
        "embed": (run_copy / "embeddings", True, ".twotower-job-0-of-1.lock", ["embed", run_copy, "--quiet"]),
        "embed_same_job": (tmp_path / "parts", True, ".twotower-job-1-of-2.lock",
                           ["embed", run_copy, "--out", tmp_path / "parts", "--job", "1/2", "--chunk-size", "10", "--quiet"]),
        "recommend_out": (tmp_path / "recs.parquet", False, None,
                          ["recommend", run_copy, "--all-users", "--out", tmp_path / "recs.parquet"]),
        "mine_out": (tmp_path / "mined.csv", False, None, ["mine", run_copy, "--out", tmp_path / "mined.csv",
                                                          "--top-r", "20", "--window", "2", "20"]),
        "compare": (tmp_path / "report", True, None, ["compare", base / "tiny.toml", "--out", tmp_path / "report", "--quiet"]),
        "train_resume": (run_copy, True, None, ["train", base / "tiny.toml", "--out", run_copy, "--resume", *FAST]),
        "export": (tmp_path / "exp", True, None, ["export", run_copy, "--format", "torchscript", "--out", tmp_path / "exp"]),
    }[case]
    holder = _holder(target, folder, name, beside=case in ("export", "index", "index_out", "index_update"))
    try:
        assert_refused(cli(*args), f"holder job (pid {holder.pid} on {socket.gethostname()}", "One writer at a time")
    finally:
        holder.terminate()
        holder.wait()
    if case == "embed_same_job":  # other jobs of the set write beside it
        holder = _holder(target, True, ".twotower-job-1-of-2.lock")
        try:
            rc, _, err = cli("embed", run_copy, "--out", target, "--job", "0/2", "--chunk-size", "10", "--quiet")
            assert rc == 0, err
        finally:
            holder.terminate()
            holder.wait()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_training_is_taken_over(base, tmp_path):
    """SIGKILL after the first epoch line: the lock file stays (no cleanup code ran); --resume
    takes it over, says so, and completes."""
    out = tmp_path / "run"
    die = ("import os, signal\nfrom twotower.run_dir import RunDir\n_a = RunDir.append_epoch\n"
           "def append(self, r):\n    _a(self, r)\n    os.kill(os.getpid(), signal.SIGKILL)\nRunDir.append_epoch = append\n")
    rc, _, _ = run("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=3", prelude=die)
    assert rc == -signal.SIGKILL
    lock = json.loads((out / ".twotower.lock").read_text())
    assert lock["host"] == socket.gethostname() and lock["command"] == "twotower train"
    rc, _, err = cli("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=3", "--resume")
    assert rc == 0, err
    assert f"took over the lock left by twotower train (pid {lock['pid']}" in err
    assert not no_temporaries(out)


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """A file system without ``flock``: a lock of a live process of this host, or of another host, is
    honoured (the latter with the file to remove); one of a dead process is taken over."""
    import errno

    from twotower import locks
    from twotower.errors import LockedError

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    target = tmp_path / "run"
    target.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        cases = {"live": {"pid": live.pid, "host": socket.gethostname()},
                 "other host": {"pid": 1, "host": "elsewhere.example"},
                 "dead": {"pid": dead.pid, "host": socket.gethostname()}}
        for case, holder in cases.items():
            (target / ".twotower.lock").write_text(json.dumps({**holder, "command": "twotower train", "started": "t"}))
            if case == "dead":
                taken = []
                with locks.exclusive(target, "me", log=taken.append) as lock:
                    assert lock.taken_over["pid"] == dead.pid
                assert taken and "no longer running" in taken[0]
                assert not (target / ".twotower.lock").exists()
            else:
                with pytest.raises(LockedError) as e:
                    with locks.exclusive(target, "me", log=lambda m: None):
                        pass
                assert f"pid {holder['pid']}" in str(e.value)
                assert (f"remove {target / '.twotower.lock'}" in str(e.value)) == (case == "other host")
    finally:
        live.kill()
        live.wait()


def test_a_refused_or_failed_command_releases_its_lock_and_writes_nothing(base, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((base / "tiny.toml").read_text().replace(str(base / "inter.csv"), str(tmp_path / "missing.csv")))
    out = tmp_path / "new" / "run"
    assert_refused(cli("train", bad, "--out", out, *FAST), "missing.csv", "file not found")
    assert not (tmp_path / "new").exists()  # neither --out nor the parent the lock created
    assert_refused(cli("train", base / "tiny.toml", "--out", out, *FAST, "--set", "model.dim=0"), "model.dim")
    rc, _, err = cli("train", base / "tiny.toml", "--out", out, *FAST)  # the lock is free again
    assert rc == 0, err
    assert not no_temporaries(out)


# ---- class 3: every artifact gets the umask's mode -----------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_file_written_gets_the_umask_mode(base, tmp_path, mask):
    """Every file of a run directory (checkpoint/ and refit/ too), of its index, of its embedding
    parts, of recommend/mine outputs and of an export: 0666 minus the umask. safetensors used to leave 0600."""
    old = os.umask(mask)
    try:
        out = tmp_path / "run"
        assert cli("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.refit=true")[0] == 0
        assert cli("index", out, "--quiet")[0] == 0
        assert cli("embed", out, "--chunk-size", "16", "--quiet")[0] == 0
        assert cli("index", out, "--from-parts", out / "embeddings", "--out", tmp_path / "ix2", "--quiet")[0] == 0
        assert cli("recommend", out, "--all-users", "-k", "5", "--out", tmp_path / "recs.parquet")[0] == 0
        assert cli("mine", out, "--out", tmp_path / "mined.parquet", "--top-r", "20", "--window", "2", "20")[0] == 0
        assert cli("export", out, "--format", "torchscript", "--out", tmp_path / "exp")[0] == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {str(p.relative_to(tmp_path)) for p in files}
    for expected in ("run/model.safetensors", "run/known.safetensors", "run/checkpoint/last.safetensors",
                     "run/checkpoint/optimizer.pt", "run/refit/checkpoint/last.safetensors", "run/index/index.faiss",
                     "run/embeddings/part-00000.parquet", "ix2/item_embeddings.npy", "recs.parquet", "mined.parquet",
                     "exp/user_tower.pt", "exp/items.parquet", "exp/export.json"):
        assert expected in names, sorted(names)
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~mask and p.name not in ("inter.csv", "tiny.toml")}
    assert not wrong, wrong


# ---- class 4: file-system failures are one line, exit 2, nothing half-written ---------------------------
def _writers(run_dir: Path, base: Path, dest: Path) -> dict[str, list]:
    """Each writing command with its output at ``dest``."""
    return {
        "train": ["train", base / "tiny.toml", "--out", dest, *FAST],
        "index": ["index", run_dir, "--out", dest, "--quiet"],
        "embed": ["embed", run_dir, "--out", dest, "--quiet"],
        "recommend": ["recommend", run_dir, "--all-users", "--out", dest / "recs.parquet"],
        "mine": ["mine", run_dir, "--out", dest / "mined.parquet", "--top-r", "20", "--window", "2", "20"],
        "compare": ["compare", base / "tiny.toml", "--out", dest, "--quiet"],
        "export": ["export", run_dir, "--format", "torchscript", "--out", dest],
    }


@needs_mount
@pytest.mark.parametrize("command", ["train", "index", "embed", "recommend", "mine", "compare", "export"])
def test_a_read_only_file_system_is_one_line(base, tmp_path, command):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        args = _writers(base / "run", base, ro / "out")[command]
        assert_refused(cli(*args), str(ro / "out"), "read-only", "Choose a writable place")


def test_permission_denied_is_one_line(base, tmp_path, monkeypatch):
    """As root no folder is closed to us, so the kernel's answer is played: the atomic writer's
    temporary file cannot be created."""
    from twotower import artifacts

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(artifacts, "new_temp_file", denied)
    out = tmp_path / "run"
    msg = assert_refused(cli("train", base / "tiny.toml", "--out", out, *FAST), "permission denied", "Check the permissions")
    assert msg.count("\n") == 0
    assert_refused(cli("recommend", base / "run", "--all-users", "--out", tmp_path / "r.csv"), "r.csv", "permission denied")


@needs_mount
@pytest.mark.parametrize("size", ["16k", "40k", "64k"])
def test_a_full_disk_during_training_then_resume(base, tmp_path, size):
    """The disk fills at different writes (vocabularies, weights, the checkpoint); each time one
    line, exit 2, no temporary file; with space again, --resume completes the run."""
    with tmpfs(tmp_path / "disk", size) as disk:
        out = disk / "run"
        assert_refused(cli("train", base / "tiny.toml", "--out", out, *FAST), str(out), "no space left on the device",
                       "--resume")
        assert not [p for p in no_temporaries(disk) if p.name.endswith(".tmp")]
        assert not (out / ".twotower.lock").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        rc, _, err = cli("train", base / "tiny.toml", "--out", out, *FAST, "--resume")
        assert rc == 0, err
        from twotower.run import Run

        Run(out)


@needs_mount
@pytest.mark.parametrize("command", ["index", "embed", "recommend", "mine", "index_from_parts", "export"])
def test_a_full_disk_during_index_embed_recommend_mine(base, tmp_path, command):
    run_dir = base / "run"
    if command == "index_from_parts":
        assert cli("embed", run_dir, "--out", tmp_path / "parts", "--quiet")[0] == 0
    with tmpfs(tmp_path / "disk", "8k") as disk:
        (disk / "filler").write_bytes(b"x" * 4096)
        args = {**_writers(run_dir, base, disk / "out"),
                "index_from_parts": ["index", run_dir, "--from-parts", tmp_path / "parts", "--out", disk / "out", "--quiet"]}
        assert_refused(cli(*args[command]), "no space left on the device")
        assert not no_temporaries(disk)


@pytest.mark.parametrize("case", ["train_out_is_file", "train_out_under_file", "index_out_is_file", "embed_out_is_file",
                                  "compare_out_is_file", "index_out_under_file", "recommend_out_under_file",
                                  "recommend_out_is_dir", "mine_out_is_dir", "mine_out_under_file", "export_out_is_file",
                                  "export_out_under_file"])
def test_out_that_is_a_file_or_lies_under_one_or_names_a_folder(base, tmp_path, case):
    f = tmp_path / "afile"
    f.write_text("x")
    run_dir = base / "run"
    args, fragments = {
        "train_out_is_file": (["train", base / "tiny.toml", "--out", f, *FAST], ["is a file, not a folder"]),
        "train_out_under_file": (["train", base / "tiny.toml", "--out", f / "run", *FAST], ["is a file, not a folder"]),
        "index_out_is_file": (["index", run_dir, "--out", f, "--quiet"], ["is a file, not a folder"]),
        "embed_out_is_file": (["embed", run_dir, "--out", f, "--quiet"], ["is a file, not a folder"]),
        "compare_out_is_file": (["compare", base / "tiny.toml", "--out", f, "--quiet"], ["is a file, not a folder"]),
        "index_out_under_file": (["index", run_dir, "--out", f / "ix", "--quiet"], ["is a file, not a folder"]),
        "recommend_out_under_file": (["recommend", run_dir, "--all-users", "--out", f / "r.csv"], ["is a file, not a folder"]),
        "recommend_out_is_dir": (["recommend", run_dir, "--all-users", "--out", tmp_path], ["is a folder", "file name"]),
        "mine_out_is_dir": (["mine", run_dir, "--out", tmp_path / "d.csv", "--top-r", "20", "--window", "2", "20"],
                            ["is a folder, not a file", "Give a file name"]),
        "mine_out_under_file": (["mine", run_dir, "--out", f / "m.csv", "--top-r", "20", "--window", "2", "20"],
                                ["is a file, not a folder"]),
        "export_out_is_file": (["export", run_dir, "--format", "torchscript", "--out", f], ["is a file, not a folder"]),
        "export_out_under_file": (["export", run_dir, "--format", "torchscript", "--out", f / "e"],
                                  ["is a file, not a folder"]),
    }[case]
    if case == "mine_out_is_dir":
        (tmp_path / "d.csv").mkdir()
    msg = assert_refused(cli(*args), *fragments)
    assert "\n" not in msg
    assert f.read_text() == "x"
    assert not no_temporaries(tmp_path)


@pytest.mark.parametrize("command", ["train", "index", "embed", "recommend", "mine", "compare", "export"])
def test_an_empty_out_is_refused_by_the_parser(base, tmp_path, command):
    """``--out ""`` was the current folder (``Path("")``): a run written wherever the shell stood."""
    args = _writers(base / "run", base, tmp_path)[command]
    args[args.index("--out") + 1] = ""
    assert_refused(cli(*args), "argument --out", "expected a folder or file name, got ''")


def test_export_to_the_root_folder_is_refused(base):
    assert_refused(cli("export", base / "run", "--format", "torchscript", "--out", "/"), "--out /",
                   "choose a new or empty folder")


# ---- class 11: killed writers, resumed runs, manifests that point outside --------------------------------
def test_index_sample_users_zero_is_refused(base):
    assert_refused(cli("index", base / "run", "--sample-users", "0"), "--sample-users", "from 1")
    from twotower.errors import ConfigError
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    with pytest.raises(ConfigError, match="sample-users 0"):
        build_run_index(Run(base / "run"), IndexParams(), base / "never", sample=0, progress=False)
    assert not (base / "never").exists()


@pytest.mark.slow
def test_a_killed_index_leaves_temporaries_the_next_build_removes(run_copy):
    """SIGKILL in the middle of writing the FAISS file: a hidden temporary and the lock stay behind;
    the next ``index`` takes the lock over, removes them, and leaves none of its own."""
    die = ("import os, signal\nimport faiss\n_w = faiss.write_index\n"
           "def write(index, path):\n    open(path, 'wb').write(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
           "faiss.write_index = write\n")
    rc, _, _ = run("index", run_copy, "--quiet", prelude=die)
    assert rc == -signal.SIGKILL
    left = no_temporaries(run_copy)
    assert any(p.name.startswith(".index.faiss.") for p in left) and any(p.name == ".index.lock" for p in left)
    rc, _, err = cli("index", run_copy, "--quiet")
    assert rc == 0, err
    assert not no_temporaries(run_copy)
    assert "took over the lock" in err


@pytest.mark.parametrize("command", ["recommend", "mine"])
@pytest.mark.slow
def test_a_killed_file_writer_leaves_temporaries_the_next_run_removes(base, tmp_path, command):
    """SIGKILL while ``recommend --out`` / ``mine --out`` writes its Parquet file: the next run of the
    command on that file takes its lock over and removes the temporary; another file's stays."""
    die = ("import os, signal\nimport pandas as pd\n"
           "def write(self, path, *a, **k):\n    open(path, 'wb').write(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
           "pd.DataFrame.to_parquet = write\n")
    out = tmp_path / "out.parquet"
    args = {"recommend": ["recommend", base / "run", "--all-users", "-k", "5", "--out", out],
            "mine": ["mine", base / "run", "--out", out, "--top-r", "20", "--window", "2", "20"]}[command]
    other = tmp_path / ".other.parquet.0123456789ab.tmp"
    other.write_bytes(b"not ours")
    rc, _, _ = run(*args, prelude=die)
    assert rc == -signal.SIGKILL
    left = {p.name for p in no_temporaries(tmp_path)}
    assert ".out.parquet.lock" in left and any(n.startswith(".out.parquet.") and n.endswith(".tmp") for n in left), left
    rc, _, err = cli(*args)
    assert rc == 0, err
    assert {p.name for p in no_temporaries(tmp_path)} == {other.name}
    assert out.stat().st_size > 4


def test_resume_of_a_finished_run_keeps_its_training_time(run_copy, base):
    before = json.loads((run_copy / "metrics.json").read_text())
    rc, _, err = cli("train", base / "tiny.toml", "--out", run_copy, *FAST, "--resume")
    assert rc == 0, err
    after = json.loads((run_copy / "metrics.json").read_text())
    assert after["seconds"] == before["seconds"] and after["seconds_this_invocation"] > 0
    assert after["test"] == before["test"]


@pytest.mark.slow
def test_resume_of_an_interrupted_run_counts_the_epochs_it_carries(base, tmp_path):
    out = tmp_path / "run"
    die = ("import os, signal\nfrom twotower.run_dir import RunDir\n_s = RunDir.save_checkpoint\n_n = [0]\n"
           "def save(self, *a, **k):\n    _s(self, *a, **k)\n    _n[0] += 1\n"
           "    if _n[0] == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\nRunDir.save_checkpoint = save\n")
    slow = ("import time\nfrom twotower.training.trainer import Trainer\n_st = Trainer.step\n"  # 5 steps an epoch
            "Trainer.step = lambda self, *a: (time.sleep(0.1), _st(self, *a))[1]\n")
    rc, _, _ = run("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=3", prelude=slow + die)
    assert rc == -signal.SIGKILL
    carried = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(carried) == 2 and all(r["seconds"] >= 0.4 for r in carried)
    rc, _, err = cli("train", base / "tiny.toml", "--out", out, *FAST, "--set", "train.epochs=3", "--resume")
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    earlier = sum(r["seconds"] + r.get("eval_seconds", 0.0) for r in carried)
    assert earlier >= 1.0 and m["seconds"] > earlier  # the carried epochs (5 steps of 0.1 s each) and this invocation


@pytest.mark.parametrize("entry", ["../escape.json", "/etc/hostname", "sub/../../x", "symlink"])
def test_manifest_entries_outside_the_run_are_refused(run_copy, tmp_path, entry):
    man = json.loads((run_copy / "manifest.json").read_text())
    outside = tmp_path / "escape.json"
    outside.write_text("{}")
    if entry == "symlink":  # a run file replaced by a link to a copy elsewhere, digest unchanged
        copy = tmp_path / "weights-elsewhere"
        shutil.copy(run_copy / "model.safetensors", copy)
        (run_copy / "model.safetensors").unlink()
        (run_copy / "model.safetensors").symlink_to(copy)
        fragment = "model.safetensors is a symbolic link"
    else:
        man["sha256"][entry] = hashlib.sha256(outside.read_bytes()).hexdigest()
        fragment = "is not a file name of this folder"
    (run_copy / "manifest.json").write_text(json.dumps(man))
    assert_refused(cli("recommend", run_copy, "--user", "1"), str(run_copy), fragment, "Re-run training")
    assert_refused(cli("index", run_copy, "--quiet"), fragment)


def test_a_manifest_listing_thousands_of_missing_files_is_one_short_line(run_copy):
    (run_copy / "manifest.json").write_text(json.dumps({"sha256": {f"f{i}": "0" * 64 for i in range(5000)}}))
    msg = assert_refused(cli("evaluate", run_copy), "f0 is missing", "f4 is missing", "and 4,995 more", "Re-run training")
    assert "f5 is missing" not in msg and len(msg) < 600


def test_parts_manifest_naming_a_file_outside_is_refused(run_copy, tmp_path):
    parts = tmp_path / "parts"
    assert cli("embed", run_copy, "--out", parts, "--quiet")[0] == 0
    m = json.loads((parts / "embeddings.json").read_text())
    m["parts"][0]["file"] = "../escape.parquet"
    (parts / "embeddings.json").write_text(json.dumps(m))
    assert_refused(cli("index", run_copy, "--from-parts", parts, "--out", tmp_path / "ix", "--quiet"),
                   "part 0 is not part-00000.parquet", "twotower embed")
