"""``ebkernels --method NAME`` end to end on tiny digits: every criterion searches or scores, draws a
channel mask, prunes physically, retrains, summarises (with its scoring cost) and resumes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ebkernels import load_ticket, prune, train
from ebkernels.data import load_dataset
from ebkernels.train import main
from ebkernels.train.loop import build_dense_model, float_copy
from helpers import REPO, env, kill_when, only_run_dir, start_run

TINY = ["--train-subset", "64", "--test-subset", "64", "--width", "0.125", "--batch-size", "32", "--no-progress",
        "--retrain-epochs", "1", "--ratio", "0.5", "--quiet"]
# the settings each method reads; the others are an error with it (test_a_setting_a_method_does_not_read...)
OWN = {"eb": ["--precision", "fp32", "--epochs", "2"],
       "ns": ["--precision", "fp32", "--epochs", "2"],
       "lt": ["--precision", "fp32", "--epochs", "2"],
       "thinet": ["--precision", "fp32", "--epochs", "2", "--score-batches", "1"],
       "snip": ["--score-batches", "1"],
       "synflow": ["--synflow-rounds", "5"]}
MODE_WORD = {"eb": "eb", "ns": "baseline", "lt": "lt", "thinet": "thinet", "snip": "snip", "synflow": "synflow"}


def summary_of(run):
    with open(os.path.join(run, "summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("method", list(OWN))
def test_every_method_runs_from_the_cli(tmp_path, method):
    assert main(TINY + OWN[method] + ["--method", method, "--out", str(tmp_path)]) == 0
    run = only_run_dir(tmp_path)
    assert f"-digits-{MODE_WORD[method]}-" in os.path.basename(run)
    s = summary_of(run)
    assert s["finished"] and s["method"] == method and os.path.exists(os.path.join(run, "accuracy.png"))
    (t,) = s["tickets"]
    assert t["tag"] == "0.5" and t["params_after"] < t["params_before"] and "retrain_acc" in t
    model, info = load_ticket(os.path.join(run, t["path"]), with_info=True)
    assert info["meta"]["method"] == method and int(info["mask"].sum()) < info["mask"].numel()
    flops = t["train_flops"]
    assert flops["total"] == flops["search"] + flops["scoring"] + flops["retrain"]
    at_init = method in ("snip", "synflow")
    assert (t["epoch"] == 0 and flops["search"] == 0) if at_init else t["epoch"] >= 1
    # the criterion's own network passes are training cost; a sort of |gamma| or of weight norms is not
    assert (flops["scoring"] > 0) == (method in ("snip", "synflow", "thinet")), flops
    assert "score" in s["wall_time_s"] and s["wall_time_s"]["score"] >= 0
    assert t["criterion"]["criterion"]


def test_lt_ticket_holds_exactly_the_initial_weights_of_its_kept_channels(tmp_path):
    """Frankle & Carbin's rewinding: the ticket is the trained network's mask on the *initial* weights."""
    args = TINY + OWN["lt"] + ["--method", "lt", "--retrain-epochs", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    run = only_run_dir(tmp_path)
    ticket, info = load_ticket(os.path.join(run, summary_of(run)["tickets"][0]["path"]), with_info=True)
    s = train.resolve_settings(train.settings_from_args(train.build_parser().parse_args(args)))
    ds = load_dataset(s.dataset, s.data_dir, False, s.train_subset, s.test_subset, seed=s.seed)
    initial, _ = prune(float_copy(build_dense_model(s, ds)), info["mask"], input_shape=ds.input_shape)
    got, want = ticket.state_dict(), initial.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["lt", "snip"])
def test_a_killed_method_run_resumes_to_the_same_result(tmp_path, method):
    """Killed after its first checkpoint (lt: in the search; snip: after drawing, in retraining), the
    same command finishes with the uninterrupted run's tickets and accuracies."""
    args = [a for a in TINY if a != "--quiet"] + OWN[method] + ["--method", method, "--retrain-epochs", "3"]
    killed = tmp_path / "killed"
    kill_when(start_run(args, killed), str(killed / "*" / "checkpoint.pt"))
    run = only_run_dir(killed)
    assert not os.path.exists(os.path.join(run, "summary.json"))
    done = subprocess.run([sys.executable, "-m", "ebkernels", *args, "--out", str(killed)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming" in done.stdout, done.stdout + done.stderr
    assert main(args + ["--out", str(tmp_path / "reference"), "--quiet"]) == 0
    resumed, reference = summary_of(run), summary_of(only_run_dir(tmp_path / "reference"))
    for key in ("retrain_acc", "acc_before_retrain", "params_after", "epoch"):
        assert [t[key] for t in resumed["tickets"]] == [t[key] for t in reference["tickets"]], key
    a = load_ticket(os.path.join(run, resumed["tickets"][0]["path"])).state_dict()
    b = load_ticket(os.path.join(only_run_dir(tmp_path / "reference"), reference["tickets"][0]["path"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("extra, message", [
    (["--method", "obd"], "--method 'obd' is not supported; accepted: eb, ns, lt, snip, synflow, thinet"),
    (["--method", "snip", "--baseline"], "--baseline is --method ns; it contradicts --method snip"),
    (["--method", "lt", "--sparsity", "1e-3"], "--sparsity is network slimming's L1 on the BN scaling factors, "
                                               "which --method lt does not use"),
    (["--method", "snip", "--epochs", "3"], "--epochs is the dense training schedule; --method snip scores the "
                                            "initial network"),
    (["--method", "synflow", "--precision", "fp32"], "--precision is the dense search's precision"),
    (["--method", "synflow", "--score-batches", "2"], "--score-batches is the training batches"),
    (["--method", "ns", "--synflow-rounds", "3"], "--synflow-rounds is SynFlow's; --method ns has no rounds"),
    (["--method", "thinet", "--draw-at", "1"], "--draw-at is for extra |gamma| tickets"),
    (["--method", "snip", "--eps", "0.2"], "--eps is the early-bird detector's"),
])
def test_a_setting_a_method_does_not_read_is_a_clear_error(tmp_path, capsys, extra, message):
    out = tmp_path / "runs"
    assert main(TINY + extra + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ebkernels: error: ") and message in err, err
    assert not out.exists()


def test_eb_and_ns_run_directories_keep_the_names_they_had_before_methods():
    """Float searches: hashes computed with the trainer before --method existed (main at 29d4b3b^2), kept
    by every setting added since. Int8 searches: renamed on purpose by issue 22 (their default quantization
    changed: E rounded stochastically, so a directory of an earlier int8 run must not be resumed or reused);
    the names below are the ones since then (--int8-mode / --int8-rounding-e always hashed for int8)."""
    names = {(): "vgg11-digits-eb-3021f7e504", ("--baseline",): "vgg11-digits-baseline-8065c14c49",
             ("--method", "ns"): "vgg11-digits-baseline-8065c14c49", ("--method", "eb"): "vgg11-digits-eb-3021f7e504",
             ("--dataset", "fashion-mnist", "--model", "vgg11", "--width", "0.25", "--epochs", "24",
              "--retrain-epochs", "12", "--ratio", "0.3,0.5,0.7", "--baseline"):
                 "vgg11-fashion-mnist-baseline-039594e235",
             ("--precision", "fp32"): "vgg11-digits-eb-a297f2ce23",
             ("--precision", "fp32", "--baseline"): "vgg11-digits-baseline-6f1b3b80eb"}
    for argv, name in names.items():
        s = train.resolve_settings(train.settings_from_args(train.build_parser().parse_args(list(argv))))
        assert os.path.basename(train.run_dir_for(s)) == name, argv
