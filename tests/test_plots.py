"""The run's plots as a reader sees them (issue 24.3), asserted on the figure objects, not on pixels.

A short run (3 search epochs, the detector never fires, 1 retraining epoch) is where they used to
mislead: an invisible one-point retraining curve, fractional epoch ticks, no ticket line, no title and
no as-pruned accuracy, a matrix titled "distance" that showed 1 - normalised distance.
"""
import numpy as np
import pytest

from ebkernels.train.plots import accuracy_figure, distance_figure, distance_matrix_figure, ticket_marks, write_plots
from ebkernels.train.settings import Settings

pytestmark = pytest.mark.matplotlib


def short_run(by_detector=False, method="eb", init="inherit"):
    search = [{"phase": "search", "epoch": e, "test_acc": a, "train_acc": a - 5, "distances": {"0.5": d}}
              for e, a, d in ((1, 30.5, None), (2, 86.6, 0.055), (3, 95.8, 0.006))]
    retrain = [{"phase": "retrain", "job": "0.5", "epoch": 1, "test_acc": 58.5, "train_acc": 65.9}]
    state = {"records": search + retrain, "found": {"0.5": 3} if by_detector else {},
             "tickets": [{"tag": "0.5", "ratio": 0.5, "epoch": 3, "by_detector": by_detector,
                          "acc_before_retrain": 10.6}],
             "results": [{"job": "0.5", "ticket": "0.5", "init": init, "final_acc": 58.5}]}
    return state, Settings(ratios=(0.5,), eps=0.1, precision="int8", method=method)


def pairwise():
    return {"0.5": np.array([[0.0, 0.055, 0.06], [0.055, 0.0, 0.006], [0.06, 0.006, 0.0]])}


def whole_numbers(ticks):
    return len(ticks) > 0 and np.allclose(ticks, np.round(ticks))


@pytest.mark.parametrize("by_detector, method, words", [
    (False, "eb", "ticket at epoch 3 (last epoch: the detector did not fire)"),
    (True, "eb", "ticket at epoch 3 (detector)"),
    (False, "ns", "ticket at epoch 3 (end of training)"),
])
def test_the_ticket_epoch_is_marked_however_the_ticket_was_taken(by_detector, method, words):
    state, s = short_run(by_detector, method)
    assert ticket_marks(state, s) == {"0.5": (3, words)}
    fig = distance_figure(state, s)
    ax = fig.axes[0]
    ticket_lines = [line for line in ax.get_lines() if line.get_label() == f"p = 0.5: {words}"]
    assert len(ticket_lines) == 1 and list(ticket_lines[0].get_xdata()) == [3, 3]
    matrix = distance_matrix_figure(state, s, pairwise()).axes[0]
    assert words in matrix.get_title()
    assert sorted({tuple(line.get_xdata()) for line in matrix.get_lines()}) == [(0, 1), (3, 3)]  # red lines


def test_short_run_curves_are_visible_and_epochs_are_whole_numbers():
    state, s = short_run()
    acc = accuracy_figure(state, s).axes[0]
    assert acc.get_title()
    lines = {line.get_label(): line for line in acc.get_lines()}
    retrain = lines["retrain 0.5: test"]
    assert retrain.get_marker() not in (None, "None", "", " ")  # a point even where the curve is one epoch
    assert list(retrain.get_xdata()) == [3, 4] and list(retrain.get_ydata()) == [10.6, 58.5]  # from as-pruned
    as_pruned = lines["ticket 0.5 as pruned (epoch 3, before retraining)"]
    assert list(as_pruned.get_xdata()) == [3] and list(as_pruned.get_ydata()) == [10.6]
    assert as_pruned.get_marker() == "X"
    dist = distance_figure(state, s).axes[0]
    assert all(line.get_marker() not in (None, "None", "", " ") for line in dist.get_lines()
               if line.get_label() == "p = 0.5")
    matrix = distance_matrix_figure(state, s, pairwise()).axes[0]
    for ax in (acc, dist):
        assert whole_numbers(ax.get_xticks()), ax.get_xticks()
    assert whole_numbers(matrix.get_xticks()) and whole_numbers(matrix.get_yticks())


def test_a_reinitialised_retraining_does_not_start_from_the_as_pruned_accuracy():
    state, s = short_run(init="reinit")
    state["results"][0]["job"] = state["records"][-1]["job"] = "0.5+reinit"
    lines = {line.get_label(): line for line in accuracy_figure(state, s).axes[0].get_lines()}
    assert list(lines["retrain 0.5+reinit: test"].get_xdata()) == [4]


def test_the_matrix_shows_the_distance_its_title_names():
    state, s = short_run()
    fig = distance_matrix_figure(state, s, pairwise())
    ax, bar = fig.axes[0], fig.axes[1]
    assert "distance" in fig._suptitle.get_text() and "0 = the same mask" in fig._suptitle.get_text()
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), pairwise()["0.5"])  # not 1 - normalised
    assert ax.images[0].get_clim() == (0.0, 0.06)
    assert "mask distance" in bar.get_ylabel()


def test_write_plots_writes_three_pngs(tmp_path):
    state, s = short_run()
    write_plots(str(tmp_path), state, s, pairwise())
    for name in ("mask_distance_matrix.png", "mask_distance.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_search_curve_says_which_batchnorm_statistics_it_shows():
    """Issue 22: the search's dense accuracy is the one with BN statistics re-estimated; the legend says so,
    and the running statistics' accuracy is drawn beside it; records without it say "running"."""
    state, s = short_run()
    for r, run in zip(state["records"][:3], (20.0, 60.1, 90.2)):
        r["test_acc_running"] = run
    fig = accuracy_figure(state, s)
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "search (int8): test, BN statistics re-estimated (8 training batches)" in labels
    running = [line for line in fig.axes[0].get_lines() if line.get_label() == "search: test, running BN statistics"]
    assert len(running) == 1 and list(running[0].get_ydata()) == [20.0, 60.1, 90.2]
    plain, s = short_run()
    labels = [line.get_label() for line in accuracy_figure(plain, s).axes[0].get_lines()]
    assert "search (int8): test, running BN statistics" in labels
