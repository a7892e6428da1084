"""The thin early-bird trainer end to end on tiny data: run directory, tickets, resume after kill -9,
DDP on 2 CPU processes (gloo), bad input."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ebkernels import load_ticket, train
from ebkernels.train import main
from ebkernels.train.loop import EpochRunner
from helpers import REPO, env, kill_when, only_run_dir, start_run

TINY = ["--train-subset", "256", "--test-subset", "128", "--width", "0.125", "--batch-size", "32", "--no-progress"]
# a setting whose verdict is not on a knife's edge: the lr drops at epochs 4 and 6 settle the masks
STABLE = ["--precision", "fp32", "--train-subset", "512", "--test-subset", "128", "--width", "0.25",
          "--batch-size", "64", "--lr", "0.02", "--eps", "0.05", "--window", "3", "--epochs", "8",
          "--ratio", "0.3,0.5", "--no-progress"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def first_found(distances, eps, window):
    """The paper's rule recomputed from the recorded distances: 1-based epoch or None."""
    d = distances[1:]  # the first epoch has no previous mask
    for t in range(window, len(d) + 1):
        if max(d[t - window:t]) < eps:
            return t + 1
    return None


# --------------------------------------------------------------------------------------- end to end
def test_end_to_end_int8_search_two_ratios(tmp_path, capsys):
    # int8 on CPU runs the float64 reference of the int8 ops: few, large steps
    args = TINY + ["--precision", "int8", "--batch-size", "64", "--epochs", "8", "--retrain-epochs", "2",
                   "--eps", "0.2", "--window", "2", "--ratio", "0.3,0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    run = only_run_dir(tmp_path)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["finished"] and summary["search"]["precision"] == "int8"
    found = summary["search"]["found_epoch"]
    for key in ("0.3", "0.5"):
        assert found[key] == first_found(summary["search"]["distances"][key], 0.2, 2), key
        assert found[key] is not None and f"ticket p={key}: found by the detector at epoch {found[key]}" in printed
    assert summary["search"]["epochs_run"] == max(found.values())  # stops once every ratio has its ticket
    settings = json.load(open(os.path.join(run, "settings.json")))
    assert settings["hash"] in os.path.basename(run) and settings["precision"] == "int8"

    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    search = [r for r in records if r["phase"] == "search"]
    assert [r["epoch"] for r in search] == list(range(1, summary["search"]["epochs_run"] + 1))
    assert all({"train_loss", "train_acc", "test_acc", "lr", "time"} <= r.keys() for r in records)
    assert all(r["distances"].keys() == {"0.3", "0.5"} for r in search)
    assert len([r for r in records if r["phase"] == "retrain"]) == 2 * 2  # two tickets, two epochs each

    masks = np.load(os.path.join(run, "masks.npz"))
    assert masks["p0.5"].shape[0] == summary["search"]["epochs_run"]
    for t in summary["tickets"]:
        model, info = load_ticket(os.path.join(run, t["path"]), with_info=True)
        assert sum(p.numel() for p in model.parameters()) == t["params_after"] < t["params_before"]
        assert t["flops_after"] < t["flops_before"] and t["epoch"] == found[f"{t['ratio']:g}"]
        # the pruned channels are the detector's mask of that epoch (packed: bit i%32 of word i//32)
        words = masks[f"p{t['ratio']:g}"][t["epoch"] - 1].astype(np.uint32)
        bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
        detector_mask = bits.reshape(-1)[: int(masks["channels"])].astype(bool)
        assert np.array_equal(info["mask"].numpy(), detector_mask)
        assert int(detector_mask.sum()) == t["channels_kept"]
        retrained = load_ticket(os.path.join(run, t["retrain_path"]))
        assert type(retrained) is type(model) and 0 <= t["retrain_acc"] <= 100
        with torch.no_grad():
            assert retrained(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    for png in ("mask_distance_matrix.png", "mask_distance.png", "accuracy.png"):
        with open(os.path.join(run, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not glob.glob(os.path.join(run, ".tmp-*"))  # atomic writes leave no temp files

    # a finished run: said so, nothing rewritten
    mtimes = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run, "*"))}
    assert main(args) == 0
    assert "already finished" in capsys.readouterr().out
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(run, "*"))} == mtimes


def test_baseline_trains_fully_and_draws_at_the_end(tmp_path):
    args = TINY + ["--precision", "fp32", "--epochs", "4", "--retrain-epochs", "1", "--eps", "0.5", "--window", "1",
                   "--baseline", "--draw-at", "2", "--retrain-init", "both", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    run = only_run_dir(tmp_path)
    assert "-baseline-" in os.path.basename(run)
    s = json.load(open(os.path.join(run, "summary.json")))
    assert s["mode"] == "baseline" and s["search"]["epochs_run"] == 4
    assert s["search"]["found_epoch"]["0.5"] == 2  # recorded, but the baseline does not stop
    tickets = {t["tag"]: t for t in s["tickets"]}
    assert tickets["0.5"]["epoch"] == 4 and tickets["0.5@2"]["epoch"] == 2
    for t in tickets.values():  # inherited and re-initialised retraining of each ticket
        assert "retrain_acc" in t and "retrain_reinit_acc" in t
        assert t["train_flops"]["search"] == 3 * s["dense"]["flops"] * 256 * t["epoch"]


def test_a_last_batch_of_one_sample_trains(tmp_path):
    # 65 samples in batches of 64: the last batch would hold one sample, which BatchNorm cannot train on
    args = ["--train-subset", "65", "--test-subset", "64", "--width", "0.125", "--batch-size", "64",
            "--precision", "fp32", "--epochs", "1", "--retrain-epochs", "1", "--no-progress", "--quiet",
            "--out", str(tmp_path)]
    assert main(args) == 0
    run = only_run_dir(tmp_path)
    assert json.load(open(os.path.join(run, "summary.json")))["finished"]
    assert "a last batch of one sample is merged into the batch before it" in " ".join(
        train.build_parser().format_help().split())


# ----------------------------------------------------------------------------------------- resume
def test_resume_after_kill_9_continues_with_the_same_detector_state(tmp_path):
    args = TINY + ["--precision", "fp32", "--epochs", "10", "--retrain-epochs", "4", "--eps", "0.2", "--window", "2"]
    killed = tmp_path / "killed"
    # kill -9 right after the first checkpoint (search phase) ...
    kill_when(start_run(args, killed), str(killed / "*" / "checkpoint.pt"))
    run = only_run_dir(killed)
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert state["phase"] == "search" and 1 <= state["epoch"] < 4
    assert not os.path.exists(os.path.join(run, "summary.json"))
    # ... and again during retraining (the first ticket file exists)
    proc = start_run(args, killed)
    kill_when(proc, os.path.join(run, "ticket_*.pt"))
    resumed_log = proc.stdout.read()
    assert f"resuming {run} from its checkpoint (search epoch {state['epoch']} done)" in resumed_log
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)["phase"] in ("search", "retrain")
    done = subprocess.run([sys.executable, "-m", "ebkernels", *args, "--out", str(killed)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout
    resumed = json.load(open(os.path.join(run, "summary.json")))

    # an uninterrupted run of the same settings computes exactly the same thing
    ref_out = tmp_path / "reference"
    assert main(args + ["--out", str(ref_out), "--quiet"]) == 0
    reference = json.load(open(os.path.join(only_run_dir(ref_out), "summary.json")))
    assert resumed["search"]["distances"] == reference["search"]["distances"]
    assert resumed["search"]["found_epoch"] == reference["search"]["found_epoch"]
    assert [t["retrain_acc"] for t in resumed["tickets"]] == [t["retrain_acc"] for t in reference["tickets"]]
    records = read_jsonl(os.path.join(run, "metrics.jsonl"))
    searched = resumed["search"]["epochs_run"]
    assert [r["epoch"] for r in records if r["phase"] == "search"] == list(range(1, searched + 1))

    again = subprocess.run([sys.executable, "-m", "ebkernels", *args, "--out", str(killed)], cwd=REPO, env=env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout and "resuming" not in again.stdout


def test_an_int8_search_resumes_bit_identically(tmp_path):
    """The int8 layers' stochastic rounding draws from a device-side random state: it is seeded from
    --seed and kept in the checkpoint, so a killed int8 search continues exactly where it stopped."""
    args = TINY + ["--precision", "int8", "--epochs", "3", "--retrain-epochs", "0", "--eps", "0.001"]
    killed = tmp_path / "killed"
    kill_when(start_run(args, killed), str(killed / "*" / "checkpoint.pt"))
    run = only_run_dir(killed)
    state = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert state["phase"] == "search" and state["epoch"] < 3 and state["ebk_rng"]["devices"]
    assert main(args + ["--out", str(killed), "--quiet"]) == 0
    assert main(args + ["--out", str(tmp_path / "reference"), "--quiet"]) == 0
    resumed, reference = (read_jsonl(os.path.join(r, "metrics.jsonl"))
                          for r in (run, only_run_dir(tmp_path / "reference")))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in reference]


def test_compile_runs_the_int8_search_as_eager_does(tmp_path, monkeypatch):
    """--compile: the search's forward and backward through torch.compile(fullgraph=True) (aot_eager here: the
    same ops as eager, compiled in seconds on CPU; inductor is the default), the same losses as an eager run."""
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(kw) or real(m, **kw))
    args = TINY + ["--precision", "int8", "--epochs", "1", "--retrain-epochs", "0", "--train-subset", "64",
                   "--test-subset", "32", "--bn-recal-batches", "1", "--quiet"]
    assert main(args + ["--compile", "--compile-backend", "aot_eager", "--out", str(tmp_path / "c")]) == 0
    assert compiled == [{"fullgraph": True, "backend": "aot_eager", "mode": None}]
    assert main(args + ["--out", str(tmp_path / "e")]) == 0
    got, want = (read_jsonl(os.path.join(only_run_dir(tmp_path / d), "metrics.jsonl")) for d in "ce")
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]


# -------------------------------------------------------------------------------------------- DDP
def test_ddp_two_cpu_processes_match_a_single_process(tmp_path):
    args = STABLE + ["--retrain-epochs", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ebkernels", *args, "--out", str(tmp_path / "ddp")]
    ddp = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert ddp.stdout.count("== early-bird summary") == 1  # rank 0 alone writes and prints
    assert "Warning" not in ddp.stderr, ddp.stderr[-3000:]  # no deprecated DDP/all_reduce call (24.3)
    assert main(args + ["--out", str(tmp_path / "single"), "--quiet"]) == 0
    d_run, s_run = only_run_dir(tmp_path / "ddp"), only_run_dir(tmp_path / "single")
    assert os.path.basename(d_run) == os.path.basename(s_run)  # the world size is no setting of the run
    d, s = (json.load(open(os.path.join(r, "summary.json"))) for r in (d_run, s_run))
    assert "x2 processes" in d["device"]
    # same verdicts; the trajectories agree up to float rounding of the split reductions
    assert d["search"]["found_epoch"] == s["search"]["found_epoch"] and all(d["search"]["found_epoch"].values())
    for key in ("0.3", "0.5"):
        for a, b in zip(d["search"]["distances"][key][1:], s["search"]["distances"][key][1:]):
            assert abs(a - b) < 0.03
    d_first, s_first = (read_jsonl(os.path.join(r, "metrics.jsonl"))[0] for r in (d_run, s_run))
    # same batches, same augmentation, synchronised BN: only rounding differs (a wrong split: ~1e-2)
    assert d_first["train_loss"] == pytest.approx(s_first["train_loss"], rel=2e-4)
    d_lines, s_lines = (read_jsonl(os.path.join(r, "metrics.jsonl")) for r in (d_run, s_run))
    assert len(d_lines) == len(s_lines)


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, message", [
    (["--model", "vgg7"], "unknown model name 'vgg7'; accepted: vgg11"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; accepted: digits, cifar10, cifar100, fashion-mnist"),
    (["--ratio", "1.5"], "--ratio: ratio=1.5 is out of range; accepted: a float with 0 < ratio < 1"),
    (["--ratio", "0.3,0"], "--ratio: ratio=0.0 is out of range"),
    (["--precision", "int4"], "--precision 'int4' is not supported; accepted: int8, bf16, fp32"),
    (["--batch-size", "1"], "--batch-size 1 is not supported; accepted: an integer from 2 to 1048576 (BatchNorm "
                            "cannot train on batches of one sample)"),
    (["--epochs", "99999999999999999999"], "--epochs 99999999999999999999 is not supported; accepted: an integer "
                                           "from 1 to 100000"),
    (["--retrain-epochs", "-1"], "--retrain-epochs -1 is not supported; accepted: an integer from 0 to 100000"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999 is not supported; accepted: an integer from"),
    (["--eps", "1.5"], "--eps 1.5 is not supported; accepted: a number with 0 < eps <= 1"),
    (["--momentum", "1"], "--momentum 1.0 is not supported; accepted: a number with 0 <= momentum < 1"),
    (["--lr", "inf"], "--lr inf is not supported; accepted: a finite number > 0"),
    (["--detector-mode", "window", "--window", "1"], "--window 1 is not supported with --detector-mode window"),
    (["--train-subset", "1"], "the training set has 1 sample(s) for 1 process(es)"),
    (["--batch-size", "257"], "--batch-size 257 is larger than the training set (256 samples): an epoch would be "
                              "one step on a batch that is not full"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent/fm", "--no-download"],
     "apt-get install dataset-fashion-mnist"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}", "--no-download"], "cifar10 not found in"),
    (["--small-stem"], "--small-stem adapts torchvision:<name> models; vgg11 is one of ebkernels' own"),
    (["--precision", "fp32", "--no-int8-autocast"], "--no-int8-autocast sets the int8 search's arithmetic; "
                                                    "--precision fp32 has none"),
    (["--method", "snip", "--no-int8-autocast"], "--no-int8-autocast is for the dense int8 search, which --method "
                                                 "snip does not run"),
    (["--coupled", "most"], "--coupled 'most' is not supported; accepted: majority, any, all"),
    (["--model", "torchvision:resnet18"], "--width 0.125 is for ebkernels' own models; torchvision:resnet18 is "
                                          "built at torchvision's widths"),
    (["--compile", "--compile-backend", "eager"], "--compile-backend 'eager' is not supported; accepted: inductor, "
                                                  "aot_eager"),
    (["--compile-backend", "aot_eager"], "--compile-backend aot_eager sets the backend of --compile; accepted: with "
                                         "--compile"),
] + ([] if torch.cuda.is_available() else [
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA device; this run uses cpu"),
]))
def test_bad_input_is_a_clear_message_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    assert main(TINY + extra + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebkernels: error: ") and message in err, err
    assert not out.exists()


def test_an_empty_out_is_refused_and_the_current_folder_stays_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        assert main(TINY + ["--out", out]) == 2
        assert "the run directory would go into the current folder; accepted: a folder path" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_quiet_sends_warnings_to_the_log_file_only(tmp_path, capsys, monkeypatch):
    class Noted(train.cli.Job):
        def prepare(self):
            super().prepare()
            import warnings
            warnings.warn("a note that --quiet must not print (24.3)", FutureWarning)

        def run(self):
            return {}

    monkeypatch.setattr(train.cli, "Job", Noted)
    assert main(TINY + ["--epochs", "1", "--quiet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
    log = open(os.path.join(only_run_dir(tmp_path), "log.txt")).read()
    assert "warning: FutureWarning: a note that --quiet must not print (24.3) (test_trainer.py:" in log


def test_unwritable_run_directory(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(TINY + ["--out", str(blocker / "runs")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the run directory" in err and "choose a writable folder with --out" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real = EpochRunner.train_epoch
    calls = []

    def diverging(self, *a, **kw):  # the third epoch's loss blows up
        calls.append(1)
        out = real(self, *a, **kw)
        return dict(out, train_loss=float("nan")) if len(calls) == 3 else out

    monkeypatch.setattr(EpochRunner, "train_epoch", diverging)
    args = TINY + ["--precision", "fp32", "--epochs", "6", "--retrain-epochs", "1", "--eps", "0.001",
                   "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    run = only_run_dir(tmp_path)
    ckpt = os.path.join(run, "checkpoint.pt")
    assert "non-finite training loss in search epoch 3" in err
    assert f"the last good checkpoint is {ckpt} (after search epoch 2)" in err
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert not os.path.exists(os.path.join(run, "summary.json"))
    assert len(read_jsonl(os.path.join(run, "metrics.jsonl"))) == 2
    monkeypatch.setattr(EpochRunner, "train_epoch", real)  # fixed: the same command resumes from epoch 2
    assert main(args + ["--quiet"]) == 0
    assert len([r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["phase"] == "search"]) == 6


class _OpensAFile:
    """Pickles as a call of ``open(path, "w")``: loading it with pickled code allowed creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _run_dir_of(args, capsys) -> str:
    assert main(args + ["--print-run-dir"]) == 0
    return capsys.readouterr().out.strip()


def test_a_checkpoint_with_pickled_code_is_refused_not_run(tmp_path, capsys):
    args = TINY + ["--precision", "fp32", "--epochs", "2", "--retrain-epochs", "1", "--out", str(tmp_path / "runs")]
    run = _run_dir_of(args, capsys)
    os.makedirs(run)
    marker = tmp_path / "code-ran"
    torch.save({"phase": "search", "epoch": 1, "records": [_OpensAFile(str(marker))]},
               os.path.join(run, "checkpoint.pt"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith(f"ebkernels: error: the checkpoint {os.path.join(run, 'checkpoint.pt')} holds more "
                          f"than plain data") and "refused without running any of it" in err, err


def _interrupted_run(out, monkeypatch, epochs_done=1):
    """A run stopped (as by Ctrl-C) after ``epochs_done`` search epochs: (its arguments, its directory)."""
    real, calls = EpochRunner.train_epoch, []

    def stopping(self, *a, **kw):
        if len(calls) == epochs_done:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(EpochRunner, "train_epoch", stopping)
    args = TINY + ["--precision", "fp32", "--epochs", "3", "--retrain-epochs", "1", "--quiet", "--out", str(out)]
    assert main(args) == 130
    monkeypatch.setattr(EpochRunner, "train_epoch", real)
    return args, only_run_dir(out)


def test_a_flipped_bit_in_the_checkpoint_is_reported_as_corrupt(tmp_path, monkeypatch, capsys):
    args, run = _interrupted_run(tmp_path, monkeypatch)
    ckpt = os.path.join(run, "checkpoint.pt")
    raw = bytearray(open(ckpt, "rb").read())
    weights = max(torch.load(ckpt, weights_only=True)["model"].values(), key=lambda t: t.numel())
    at = bytes(raw).find(weights.numpy().tobytes())
    assert at > 0
    raw[at + weights.numel() * 2 + 1] ^= 0x10  # one bit in the middle of the largest weight tensor
    open(ckpt, "wb").write(bytes(raw))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {ckpt} is corrupt: its content does not match the SHA-256 digest" in err, err
    assert not os.path.exists(os.path.join(run, "summary.json"))


def test_a_corrupt_ticket_stops_retraining_with_a_message(tmp_path, monkeypatch, capsys):
    args, run = _interrupted_run(tmp_path, monkeypatch, epochs_done=3)  # search done, retraining not
    ticket = os.path.join(run, "ticket_0.5.pt")
    raw = bytearray(open(ticket, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(ticket, "wb").write(bytes(raw))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebkernels: error: ticket 0.5: ") and "corrupt" in err and "Retraining needs it" in err


def test_a_checkpoint_written_before_digests_resumes_and_says_so_once(tmp_path, monkeypatch):
    args, run = _interrupted_run(tmp_path, monkeypatch)
    ckpt = os.path.join(run, "checkpoint.pt")
    state = torch.load(ckpt, weights_only=True)
    del state["digest"]  # what ebkernels wrote before checkpoints carried a digest
    torch.save(state, ckpt)
    assert main(args) == 0
    log = open(os.path.join(run, "log.txt")).read()
    assert log.count(f"note: the checkpoint {ckpt} carries no content digest") == 1
    assert f"resuming {run} from its checkpoint" in log and os.path.exists(os.path.join(run, "summary.json"))


def test_resume_removes_this_runs_stale_temporaries_and_nothing_else(tmp_path, monkeypatch):
    args, run = _interrupted_run(tmp_path, monkeypatch)
    checkpoint = open(os.path.join(run, "checkpoint.pt"), "rb").read()
    stale = [".tmp-4242-0badc0de-checkpoint.pt", ".tmp-77-12345678-metrics.jsonl", ".write-test-4242"]
    kept = [".tmp-notes.txt", "tmp-4242-0badc0de-checkpoint.pt", ".tmp-4242-0BADC0DE-x.pt", "my.tmp-1-12345678-x",
            ".tmp-4242-0badc0de-", ".write-test-4242.bak", "notes.txt"]
    for name in stale + kept:  # what kill -9 during an atomic write leaves, and look-alikes that are not
        with open(os.path.join(run, name), "wb") as f:
            f.write(checkpoint if name.endswith(".pt") else b"x")
    os.makedirs(os.path.join(run, ".tmp-4242-0badc0de-folder"))
    assert main(args) == 0
    left = set(os.listdir(run))
    assert not left & set(stale) and set(kept) | {".tmp-4242-0badc0de-folder"} <= left
    assert "removed 3 temporary file(s) left by interrupted writes" in open(os.path.join(run, "log.txt")).read()


def test_a_full_disk_during_a_checkpoint_is_a_message_and_the_last_checkpoint_stays(tmp_path, monkeypatch, capsys):
    import errno
    import builtins

    from ebkernels import _io

    args, run = _interrupted_run(tmp_path, monkeypatch)
    ckpt = os.path.join(run, "checkpoint.pt")
    attempted = []

    class FullDisk:  # a file on a disk that takes the first 4 KiB of a write, then is full
        def __init__(self, path):
            self.f = builtins.open(path, "wb")

        def write(self, data):
            attempted.append(len(data))
            self.f.write(bytes(data[:4096]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_on_full_disk(path, mode="r", *a, **kw):
        if os.path.basename(path).endswith("-checkpoint.pt") and "w" in mode:
            return FullDisk(path)
        return builtins.open(path, mode, *a, **kw)

    monkeypatch.setattr(_io, "open", open_on_full_disk, raising=False)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"ebkernels: error: cannot write {ckpt} ({attempted[0]:,} bytes): No space left on device"), err
    assert f"The last checkpoint, {ckpt} (search epoch 1 done), is intact" in err and "run the same command" in err
    assert attempted[0] > 10_000 and not glob.glob(os.path.join(run, ".tmp-*"))
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(_io, "open", builtins.open)  # space freed: the same command resumes and finishes
    assert main(args) == 0 and os.path.exists(os.path.join(run, "summary.json"))


def test_a_corrupt_settings_json_is_detected_and_left_for_the_user(tmp_path, monkeypatch, capsys):
    args, run = _interrupted_run(tmp_path, monkeypatch)
    path = os.path.join(run, "settings.json")
    text = open(path).read()
    changed_lr = json.dumps(dict(json.loads(text), lr=0.2), indent=2)
    for damaged, problem in ((text[: len(text) // 2], "it cannot be read as JSON"),
                             (changed_lr, "it records lr=0.2 where these settings have 0.1"),
                             ("[]", "it holds a JSON list, not the settings object")):
        open(path, "w").write(damaged)
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ebkernels: error: {path} is corrupt: {problem}") and err.count("\n") == 1, err
        assert "The directory name is the hash of the settings" in err and "delete settings.json" in err
        assert open(path).read() == damaged and not os.path.exists(os.path.join(run, "summary.json"))
    os.remove(path)  # what the message says to do: the same command rewrites it and resumes
    assert main(args) == 0 and open(path).read() == text


def test_non_finite_bn_gammas_with_a_finite_loss_stop_the_search(tmp_path, capsys, monkeypatch):
    real, calls = EpochRunner.train_epoch, []

    def gamma_blows_up(self, model, *a, **kw):  # after the second epoch one BN gamma is NaN, the loss is not
        calls.append(1)
        out = real(self, model, *a, **kw)
        if len(calls) == 2:
            bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            with torch.no_grad():
                bn.weight[0] = float("nan")
        return out

    monkeypatch.setattr(EpochRunner, "train_epoch", gamma_blows_up)
    args = TINY + ["--precision", "fp32", "--epochs", "4", "--retrain-epochs", "1", "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    ckpt = os.path.join(only_run_dir(tmp_path), "checkpoint.pt")
    assert re.search(r"non-finite BatchNorm gammas after search epoch 2 in '[\w.]+' \(1 NaN, 0 inf of \d+ channels\)"
                     rf": training stopped; the last good checkpoint is {re.escape(ckpt)} \(after search epoch 1\)",
                     err), err


def test_the_resume_line_says_how_far_the_run_got(tmp_path, monkeypatch):
    from ebkernels.train.rundir import describe_progress

    args, run = _interrupted_run(tmp_path, monkeypatch, epochs_done=3)  # search done, retraining not started
    log = os.path.join(run, "log.txt")
    assert main(args) == 0
    assert f"resuming {run} from its checkpoint (search done after epoch 3, retraining not started)" in open(log).read()
    os.remove(os.path.join(run, "summary.json"))  # as if killed after the last checkpoint, before the summary
    assert main(args) == 0
    assert open(log).read().splitlines()[-1] == (f"resuming {run} from its checkpoint (search and retraining done, "
                                                 f"summary not written yet)")
    jobs = [{"ticket": 0, "init": "inherit"}, {"ticket": 0, "init": "reinit"}]
    assert describe_progress({"phase": "search", "epoch": 4}) == "search epoch 4 done"
    assert describe_progress({"phase": "retrain", "epoch": 2, "retrain_index": 1, "retrain_jobs": jobs}) == \
        "retraining job 2 of 2, epoch 2 done"
    assert describe_progress({"phase": "retrain", "epoch": 0, "retrain_index": 1, "retrain_jobs": jobs}) == \
        "retraining job 1 of 2 done"


def test_explicit_triton_backend_without_cuda_or_interpreter_says_what_it_needs():
    code = ("import torch, ebkernels\n"
            "for call in (lambda: ebkernels.channel_mask(torch.rand(40), 0.5, backend='triton'),\n"
            "             lambda: ebkernels.EarlyBird(0.5, backend='triton').step(torch.rand(40))):\n"
            "    try:\n"
            "        call()\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    e = {k: v for k, v in env().items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr
    for line in lines:
        assert line.startswith("backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                               "before ebkernels is imported") and "the gammas are on cpu" in line
        assert "accepted here: backend='auto'" in line


def test_settings_added_later_leave_the_hash_of_earlier_runs_alone():
    """small_stem and coupled join the hash only when set: runs made before they existed still resume."""
    s = train.resolve_settings(train.Settings())
    assert "small_stem" not in s.hashed() and "coupled" not in s.hashed()
    assert train.settings_hash(s) == train.settings_hash(train.resolve_settings(train.Settings(coupled="majority")))
    assert train.settings_hash(s) != train.settings_hash(train.resolve_settings(train.Settings(coupled="any")))
    tv = train.resolve_settings(train.Settings(model="torchvision:resnet18"))
    assert tv.width == 1.0 and os.path.basename(train.run_dir_for(tv)).startswith("torchvision_resnet18-digits-eb-")
    stem = train.resolve_settings(train.Settings(model="torchvision:resnet18", small_stem=True))
    assert stem.hashed()["small_stem"] is True and train.settings_hash(stem) != train.settings_hash(tv)


def test_reported_search_accuracy_reestimates_bn_and_leaves_the_search_alone(tmp_path, capsys):
    """Issue 22: the printed and saved dense accuracy of the search uses BN statistics re-estimated on
    --bn-recal-batches training batches, on a copy: the search (losses, masks, tickets) is bit for bit the
    one with --bn-recal-batches 0, and the running statistics' accuracy stays beside it."""
    base = TINY + ["--precision", "fp32", "--epochs", "3", "--retrain-epochs", "1", "--baseline"]
    runs = {}
    for n in (0, 3):
        out = tmp_path / f"recal{n}"
        assert main(base + ["--bn-recal-batches", str(n), "--out", str(out)]) == 0
        run = only_run_dir(out)
        runs[n] = (json.load(open(os.path.join(run, "summary.json"))), read_jsonl(os.path.join(run, "metrics.jsonl")),
                   dict(np.load(os.path.join(run, "masks.npz"))))
    printed = capsys.readouterr().out
    (s0, r0, m0), (s3, r3, m3) = runs[0], runs[3]
    assert [r["train_loss"] for r in r0] == [r["train_loss"] for r in r3]  # search and retraining unchanged
    assert all(np.array_equal(m0[k], m3[k]) for k in m0) and m0.keys() == m3.keys()
    search0 = [r for r in r0 if r["phase"] == "search"]
    search3 = [r for r in r3 if r["phase"] == "search"]
    assert all("test_acc_running" not in r for r in search0)
    assert [r["test_acc_running"] for r in search3] == [r["test_acc"] for r in search0]  # running: as before
    assert s0["search"]["bn_statistics"] == "running"
    assert s3["search"]["bn_statistics"] == "re-estimated on 3 training batches"
    assert s3["search"]["final_test_acc"] == search3[-1]["test_acc"]
    assert s3["search"]["final_test_acc_running"] == s0["search"]["final_test_acc"]
    assert "(BN statistics re-estimated on 3 training batches; with the running ones" in printed
    assert "(running BN" in printed
    # the setting is hashed unless default, and int8-only settings with --precision fp32 are errors
    d = train.resolve_settings(train.Settings())
    assert "bn_recal_batches" not in d.hashed() and d.hashed()["int8_rounding_e"] == "stochastic"
    assert "int8_mode" not in train.resolve_settings(train.Settings(precision="fp32")).hashed()
    assert main(TINY + ["--precision", "fp32", "--int8-rounding-e", "nearest", "--out", str(tmp_path / "x")]) == 2
    assert "--int8-rounding-e sets the int8 search's arithmetic; --precision fp32 has none" in \
        capsys.readouterr().err


def test_settings_hash_names_the_run():
    s = train.resolve_settings(train.Settings())
    assert s.model == "vgg11" and s.width == 0.25 and s.precision == "int8"
    other = train.resolve_settings(train.Settings(ratios=(0.3,)))
    same_elsewhere = train.resolve_settings(train.Settings(out="elsewhere", progress=False))
    name = os.path.basename(train.run_dir_for(s))
    assert name != os.path.basename(train.run_dir_for(other))
    assert name == os.path.basename(train.run_dir_for(same_elsewhere))
    assert train.lr_at(0, 0.1, 160) == 0.1 and train.lr_at(80, 0.1, 160) == pytest.approx(0.01)
    assert train.lr_at(120, 0.1, 160) == pytest.approx(0.001)


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="real Fashion-MNIST absent: `apt-get install dataset-fashion-mnist` installs it")
def test_fig3_recipe_smoke_slice_on_real_fashion_mnist(tmp_path, monkeypatch, capsys):
    """A seconds-long slice of a python/ recipe, so the real-data path and the recipe code stay alive."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "python"))
    import fig3_mask_distance

    results = tmp_path / "results"
    fig3_mask_distance.main(["--scale", "smoke", "--runs", str(tmp_path / "runs"), "--results", str(results)])
    table = (results / "fig3.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["0.3", "0.5", "0.7"]
    assert (results / "fig3.png").read_bytes()[:4] == b"\x89PNG" and (results / "fig3.csv").exists()
    assert "fashion-mnist (256 train / 128 test images)" in table
