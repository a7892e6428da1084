"""The early-bird job (SPEC §3-4, paper Algorithm 1): low-precision search -> detect -> prune -> retrain.

1. Search: train the dense network (int8, bf16 or fp32) with L1 on the BN scaling factors; after every
   epoch the detector records each ratio's channel mask and its distance to the previous ones. EB mode
   stops once every ratio's ticket is found (or at ``--epochs``); ``--baseline`` trains all epochs (the
   paper's "progressive pruning and training"). ``--draw-at`` draws extra tickets (Fig. 1).
   ``--method`` picks the ticket criterion (``ebkernels/methods/``): ``lt`` and ``thinet`` train all
   epochs too (without the L1 term) and then apply their criterion; ``snip`` and ``synflow`` skip the
   search and score the initial network.
2. Prune: each drawn ticket is the mask of its epoch applied physically (``ticket_<tag>.pt``); with
   ``lt`` the mask is applied to the dense network's initial weights (rewinding).
3. Retrain: every ticket, inheriting its weights and/or re-initialised (``pruned_<tag>[_reinit].pt``).
4. Summarise: ``summary.json``, the plots and the printed summary (report.py).

A checkpoint after every epoch lets a killed run continue where it stopped (rundir.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time

import torch
import torch.nn as nn

from .. import _rng
from .. import data as data_mod
from .._io import WriteFailed
from ..detector import EarlyBird, NonFiniteImportanceError
from ..methods import ScoringData, get_method
from ..pruning import count_flops, count_params, load_ticket, prune, reinit, save_ticket
from .dist import Dist
from .energy import EnergyMeter
from .loop import (EpochRunner, build_dense_model, float_copy, int8_layers_line, local_batch_size, lr_at,
                   make_optimizer, prepare_for_training, search_qconfig)
from .report import (Log, build_summary, epoch_line, print_summary, report_dict, start_lines, ticket_line,
                     write_plots)
from .rundir import RunDir, describe_progress, new_state, ratio_key
from .settings import Settings, TrainerError

__all__ = ["Job", "make_detector"]


def make_detector(s: Settings):
    """The run's detector: one EarlyBird over all ratios (a tuple, so its views are dicts by ratio)."""
    return EarlyBird(tuple(s.ratios), eps=s.eps, window=s.window, mode=s.detector_mode)


class Job:
    def __init__(self, s: Settings, dist: Dist, log_stream=None):
        self.s = s
        self.dist = dist
        self.run_dir = RunDir(s)
        self.log = self.run_dir.say = Log(self.run_dir.path, log_stream, quiet=s.quiet, is_main=dist.is_main)
        self.energy = EnergyMeter(dist.device)
        self.method = get_method(s.method, **({"rounds": s.synflow_rounds} if s.method == "synflow" else {}))

    # ---- setup ----------------------------------------------------------------------------------
    def prepare(self):
        """Load data, build the model, create the run directory. Raises TrainerError on bad input."""
        s = self.s
        if s.cuda_graphs and self.dist.device.type != "cuda":
            raise TrainerError(f"--cuda-graphs needs a CUDA device; this run uses {self.dist.device} "
                               "(accepted: --device cuda or auto on a machine with a GPU)")
        if s.cuda_graphs and s.compile:
            raise TrainerError("--cuda-graphs and --compile both capture the step; accepted: one of them "
                               "(--compile uses CUDA graphs itself on a GPU)")
        if s.cuda_graphs and self.dist.enabled:
            raise TrainerError("--cuda-graphs is not supported with torchrun / several processes yet; "
                               "accepted: a single-process run")
        try:
            self.ds = data_mod.load_dataset(s.dataset, s.data_dir, s.download, s.train_subset,
                                            s.test_subset, seed=s.seed)
        except data_mod.DatasetError as e:
            raise TrainerError(str(e)) from e
        local_batch = local_batch_size(s.batch_size, self.dist.world_size, len(self.ds.train_labels))
        self.epochs = EpochRunner(self.ds, self.dist, local_batch, s.seed, s.augment,
                                  show_progress=s.progress and not s.quiet, int8_autocast=s.int8_autocast)
        self.model = build_dense_model(s, self.ds)
        # the seed rebuilds these same initial weights on a resume, so they need no checkpoint
        self.initial_weights = (copy.deepcopy(self.model.state_dict())
                                if self.method.ticket_weights == "initial" else None)
        self.scoring_data = ScoringData(self.ds, s.batch_size, s.score_batches, s.seed, self.dist.device)
        error = None
        if self.dist.is_main:
            try:
                self.run_dir.create()
            except TrainerError as e:
                error = str(e)
        error = self.dist.broadcast_obj(error)  # every rank stops, none waits on a barrier forever
        if error:
            raise TrainerError(error)

    # ---- the whole job --------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        summary = self.run_dir.read_summary()
        if summary is not None:
            if self.dist.is_main and not s.quiet:  # printed only: a finished run's files stay untouched
                print(f"run {self.run_dir.path} is already finished (summary.json); nothing to do.",
                      file=self.log.stream)
                print_summary(summary, self.log.stream, finished_before=True)
            return summary
        with self.run_dir.lock() if self.dist.is_main else contextlib.nullcontext():
            try:
                return self._run_locked()
            except WriteFailed as e:  # disk full, quota, I/O error: nothing is lost but this epoch
                raise TrainerError(f"{e}. {self.run_dir.checkpoint_note()}: free space (or fix the disk) and run "
                                   f"the same command again to resume") from e

    def _run_locked(self) -> dict:
        s = self.s
        if self.dist.is_main:
            self.run_dir.remove_stale_temporaries()
        state = self.run_dir.load_checkpoint()
        if state is not None:
            self.log(f"resuming {self.run_dir.path} from its checkpoint ({describe_progress(state)})")
            torch.set_rng_state(state["rng"])
            if state.get("ebk_rng"):  # the int8 layers' stochastic rounding continues where it stopped
                _rng.set_state(state["ebk_rng"])
        else:
            for line in start_lines(s, self.ds, self.run_dir.path):
                self.log(line)
            state = self._fresh_state()
        if state["phase"] == "search":
            state = self.draw_at_init(state) if self.method.draws == "init" else self.search(state)
        if state["phase"] == "retrain":
            state = self.retrain_all(state)
        return self.finish(state)

    def _fresh_state(self) -> dict:
        dense = float_copy(self.model)
        return new_state(params=count_params(dense), flops=count_flops(dense, self.ds.input_shape))

    def _trainable(self, model: nn.Module, precision: str, state: dict):
        """``(model, wrapped, optimizer)`` for training, continuing from the checkpointed phase's weights
        and optimizer state when it holds them."""
        if state["model"] is not None:
            model.load_state_dict(state["model"])
        model, wrapped = prepare_for_training(model, precision, self.dist, self.s.sync_bn, search_qconfig(self.s))
        opt = make_optimizer(model, self.s)
        if state["optimizer"] is not None:
            opt.load_state_dict(state["optimizer"])
        return model, wrapped, opt

    def _checkpoint(self, state: dict) -> None:
        if self.dist.is_main:
            self.run_dir.save_checkpoint(state)

    def _diverged(self, problem: str):
        """Stop on a non-finite loss or BN gammas, naming the checkpoint a fixed run resumes from."""
        state = self.run_dir.load_checkpoint()
        path = self.run_dir.checkpoint_path
        where = (f"the last good checkpoint is {path} (after {state['phase']} epoch {state['epoch']})"
                 if state else f"no checkpoint was written yet (run directory {self.run_dir.path})")
        raise TrainerError(f"{problem}: training stopped; {where}. "
                           f"Lower --lr or check the data, then run again (a new --lr is a new run).")

    # ---- 1. search, detect, draw ----------------------------------------------------------------
    def search(self, state: dict) -> dict:
        s = self.s
        model, wrapped, opt = self._trainable(self.model, s.precision, state)
        if s.precision == "int8":
            self.log(int8_layers_line(model))
        graphed = self.epochs.graphed_step(model, s.sparsity, s.precision) if s.cuda_graphs else None
        if s.compile:  # the whole forward and backward in one graph; CUDA graphs on a GPU (no host cost per launch)
            cuda_graphs = s.compile_backend == "inductor" and self.dist.device.type == "cuda"
            wrapped = torch.compile(wrapped, fullgraph=True, backend=s.compile_backend,
                                    mode="reduce-overhead" if cuda_graphs else None)
        detector = make_detector(s)  # one detector, all ratios: one fused update per epoch
        if state["detector"] is not None:
            detector.load_state_dict(state["detector"])
        sparsity = s.sparsity if self.method.l1_on_gamma else 0.0  # L1 on gamma: NS's and EB's ingredient only
        for epoch in range(state["epoch"], s.epochs):
            t0, e0 = time.perf_counter(), self.energy.read()
            lr = lr_at(epoch, s.lr, s.epochs)
            train = self.epochs.train_epoch(model, wrapped, opt, epoch, lr, sparsity, s.precision,
                                            f"search {epoch + 1}/{s.epochs}", graphed)
            if not math.isfinite(train["train_loss"]):
                self._diverged(f"non-finite training loss in search epoch {epoch + 1}")
            t1 = time.perf_counter()
            test = self.epochs.evaluate_search(model, s.precision, s.bn_recal_batches)  # BN re-estimated
            t2 = time.perf_counter()
            try:
                newly, distances = self._detect(detector, model, state)
            except NonFiniteImportanceError as e:  # a finite loss, yet the detector's importance diverged
                self._diverged(f"non-finite BatchNorm gammas after search epoch {epoch + 1} in {e.where}")
            self.energy.add_since(state["energy"], "search", e0)
            state["wall"]["search"] += t1 - t0
            state["wall"]["eval"] += t2 - t1
            stop = epoch + 1 == s.epochs or (self.method.draws == "early" and not s.search_to_end
                                             and all(ratio_key(r) in state["found"] for r in s.ratios))
            self._draw(state, model, self._tickets_to_draw(state, epoch + 1, newly, stop), epoch + 1)
            state["records"].append({"phase": "search", "epoch": epoch + 1, "lr": lr, **train, **test,
                                     "distances": distances, "found": sorted(state["found"].items()),
                                     "time": round(t2 - t0, 4)})
            self.log(epoch_line("search", epoch + 1, s.epochs, lr, train, test, t2 - t0, distances,
                                [ratio_key(r) for r in newly]))
            state.update(epoch=epoch + 1, model=float_copy(model).state_dict(), optimizer=opt.state_dict(),
                         detector=detector.state_dict())
            if stop:
                state.update(phase="retrain", epoch=0, model=None, optimizer=None,
                             search_epochs=epoch + 1, retrain_jobs=self._retrain_jobs(state))
            self._checkpoint(state)
            if stop:
                break
        return state

    def _detect(self, detector, model, state: dict) -> tuple[list, dict]:
        """One detector step; records newly found tickets in ``state["found"]`` (1-based epochs).
        Returns (ratios found this epoch, this epoch's mask distance per ratio key)."""
        detector.step(model)  # every rank: parameters are identical, so are the verdicts
        # rank 0's verdict is the verdict (guards against float noise between ranks)
        found_now = self.dist.broadcast_obj(dict(detector.found_epoch))
        distances, newly = {}, []
        for r in self.s.ratios:
            key = ratio_key(r)
            d = detector.distances[r]
            distances[key] = d[-1] if d else None
            if found_now[r] is not None and key not in state["found"]:
                state["found"][key] = found_now[r] + 1  # the detector counts epochs from 0
                newly.append(r)
        return newly, distances

    def _tickets_to_draw(self, state: dict, epoch: int, newly: list, stop: bool) -> list:
        """``(ratio, tag, by_detector)``: at the detector's verdict (EB mode), at ``--draw-at`` epochs,
        and when the search stops, every main ticket not drawn yet (baseline's, or EB's never found)."""
        draws = [(r, ratio_key(r), True) for r in newly] if self.method.draws == "early" else []
        if epoch in self.s.draw_at:
            draws += [(r, f"{ratio_key(r)}@{epoch}", False) for r in self.s.ratios]
        if stop:
            drawn = {t["tag"] for t in state["tickets"]} | {d[1] for d in draws}
            draws += [(r, ratio_key(r), False) for r in self.s.ratios if ratio_key(r) not in drawn]
        return draws

    def draw_at_init(self, state: dict) -> dict:
        """Criteria at initialisation (SNIP, SynFlow): no search; every ratio's ticket is drawn from the
        initial network (epoch 0), then retrained from its initial weights."""
        self._draw(state, self.model, [(r, ratio_key(r), False) for r in self.s.ratios], 0)
        state.update(phase="retrain", epoch=0, model=None, optimizer=None, search_epochs=0,
                     retrain_jobs=self._retrain_jobs(state))
        self._checkpoint(state)
        return state

    def _draw(self, state: dict, model: nn.Module, draws: list, epoch: int) -> None:
        """Score once for all ``draws`` (``(ratio, tag, by_detector)``) with the run's criterion, then
        prune and save each ticket; the scoring time is training time (``wall["score"]``)."""
        if not draws:
            return
        dense = float_copy(model)
        t0 = time.perf_counter()
        masks = self.method.masks(dense, self.scoring_data, sorted({r for r, _, _ in draws}))
        masks = self.dist.broadcast_obj(masks)  # rank 0's masks are the masks (float noise between ranks)
        t1 = time.perf_counter()
        state["wall"]["score"] = state["wall"].get("score", 0.0) + t1 - t0
        if self.method.ticket_weights == "initial":  # LT: the kept weights rewind to their initial values
            dense.load_state_dict(self.initial_weights)
        for r, tag, by_detector in draws:
            mask, criterion = masks[r]
            state["tickets"].append(self.draw_ticket(dense, r, tag, epoch, by_detector, mask, criterion))
        state["wall"]["prune"] += time.perf_counter() - t1

    def draw_ticket(self, dense: nn.Module, ratio: float, tag: str, epoch: int, by_detector: bool,
                    mask, criterion: dict) -> dict:
        """Prune the float network ``dense`` with the criterion's ``mask``, save it (rank 0)."""
        try:
            pruned, report = prune(dense, mask, ratio=ratio, input_shape=self.ds.input_shape, coupled=self.s.coupled)
        except (ImportError, ValueError) as e:  # torch-pruning missing, a structure it cannot prune exactly
            raise TrainerError(f"cannot prune --model {self.s.model} at p={ratio_key(ratio)}: {e}") from e
        acc = self.epochs.evaluate(pruned)["test_acc"]
        path = self.run_dir.ticket_path(tag)
        if self.dist.is_main:  # save_ticket writes atomically itself
            save_ticket(path, (pruned, report), meta={"ratio": ratio, "epoch": epoch, "tag": tag,
                                                      "by_detector": by_detector, "dataset": self.s.dataset,
                                                      "search_precision": self.s.precision,
                                                      "method": self.s.method})
        report = report_dict(report)
        self.log(ticket_line(tag, epoch, by_detector, report, acc))
        return {"tag": tag, "ratio": ratio, "epoch": epoch, "by_detector": by_detector, "path": path,
                "acc_before_retrain": acc, **report, "criterion": criterion}

    def _retrain_jobs(self, state: dict) -> list:
        inits = ["inherit", "reinit"] if self.s.retrain_init == "both" else [self.s.retrain_init]
        return [{"ticket": i, "init": init} for i in range(len(state["tickets"])) for init in inits]

    # ---- 2. retrain each ticket -----------------------------------------------------------------
    def retrain_all(self, state: dict) -> dict:
        self.dist.barrier()  # tickets written by rank 0 are on disk for every rank
        jobs = state["retrain_jobs"]
        while state["retrain_index"] < len(jobs):
            state = self.retrain_one(state, jobs[state["retrain_index"]])
        state.update(phase="done", model=None, optimizer=None)
        self._checkpoint(state)
        return state

    def retrain_one(self, state: dict, job: dict) -> dict:
        s = self.s
        ticket = state["tickets"][job["ticket"]]
        name = ticket["tag"] + ("" if job["init"] == "inherit" else "+reinit")
        try:
            model = load_ticket(ticket["path"])
        except (OSError, ValueError) as e:
            raise TrainerError(f"ticket {ticket['tag']}: {e}. Retraining needs it: restore the file from a copy, "
                               f"or move the run directory away to start this run afresh") from e
        if job["init"] == "reinit":
            torch.manual_seed(s.seed + 1 + job["ticket"])
            reinit(model)
        model, wrapped, opt = self._trainable(model, "fp32", state)
        total = s.retrain_epochs
        test = self.epochs.evaluate(model) if total == 0 else None
        for epoch in range(state["epoch"], total):
            t0, e0 = time.perf_counter(), self.energy.read()
            lr = lr_at(epoch, s.lr, total)
            train = self.epochs.train_epoch(model, wrapped, opt, epoch, lr, 0.0, s.retrain_precision,
                                            f"retrain {name} {epoch + 1}/{total}")
            if not math.isfinite(train["train_loss"]):
                self._diverged(f"non-finite training loss in retrain ({name}) epoch {epoch + 1}")
            t1 = time.perf_counter()
            test = self.epochs.evaluate(model, s.retrain_precision)
            t2 = time.perf_counter()
            self.energy.add_since(state["energy"], "retrain", e0)
            state["wall"]["retrain"] += t1 - t0
            state["wall"]["eval"] += t2 - t1
            state["records"].append({"phase": "retrain", "job": name, "epoch": epoch + 1, "lr": lr, **train,
                                     **test, "time": round(t2 - t0, 4)})
            self.log(epoch_line(f"retrain {name}", epoch + 1, total, lr, train, test, t2 - t0))
            state.update(epoch=epoch + 1, model=float_copy(model).state_dict(), optimizer=opt.state_dict())
            if epoch + 1 < total:
                self._checkpoint(state)
        path = self.run_dir.pruned_path(name)
        if self.dist.is_main:
            save_ticket(path, float_copy(model), meta={
                "ratio": ticket["ratio"], "drawn_epoch": ticket["epoch"], "retrained_epochs": total,
                "init": job["init"], "retrain_precision": s.retrain_precision, "dataset": s.dataset})
        curve = [r["test_acc"] for r in state["records"] if r.get("job") == name]
        state["results"].append({"job": name, "ticket": ticket["tag"], "init": job["init"],
                                 "final_acc": test["test_acc"], "best_acc": max(curve) if curve else test["test_acc"],
                                 "path": path})
        state.update(retrain_index=state["retrain_index"] + 1, epoch=0, model=None, optimizer=None)
        self._checkpoint(state)
        return state

    # ---- 3. summary and plots -------------------------------------------------------------------
    def finish(self, state: dict) -> dict:
        summary = build_summary(self.s, state, self.run_dir.path, self.ds, self.dist)
        if self.dist.is_main:
            try:
                write_plots(self.run_dir.path, state, self.s, self._pairwise_distances(state))
            except Exception as e:  # plots are a convenience: a plotting failure must not lose the run
                self.log(f"warning: plots not written ({type(e).__name__}: {e})")
            self.run_dir.write_summary(summary)
            if not self.s.quiet:
                print_summary(summary, self.log.stream)
        self.dist.barrier()
        return summary

    def _pairwise_distances(self, state: dict) -> dict:
        """Ratio key -> [T, T] distances between all the search's masks (paper Fig. 3)."""
        if not state.get("detector"):
            return {}
        detector = make_detector(self.s)
        detector.load_state_dict(state["detector"])
        return {ratio_key(r): m.numpy() for r, m in detector.pairwise_distances().items()}

