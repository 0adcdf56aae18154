"""The trainer: builds the components from the config and runs epochs, validation, early stopping, checkpoints.

One code path for every world size (1 process is a world of one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cammsr.base import SampledCandidates
from cammsr.factory import build_model
from data_shards.reader import PreparedDataset
from train.checkpoint import Checkpointer, atomic_write_text
from train.config import Config, ConfigError, in_id_warmup
from train.data import LocalSequences, TrainPlan
from train.distributed import DistEnv, init_distributed, shutdown
from train.embeddings import build_item_table, describe_plan
from train.engine import backward_pass, build_engine, compute_dtype
from train.evaluate import evaluate, evaluation_users
from train.items import ensure_feature_stores, load_item_inputs
from train.media import MediaStream, computed_modalities, prefetched
from train.monitor import Monitor, progress_bar, write_metrics
from train.negatives import NegativeSampler, distinct_ids, training_counts
from train.step import model_inputs, training_loss
from train.trained_modules import RecommenderWithEncoders, recommender_of


def data_fingerprint(data: PreparedDataset) -> str:
    shards = data.manifest["shards"]
    payload = [e["sha256"] for e in shards["items"] + shards["users"]]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _log(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, flush=True)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        model_cfg = cfg.model
        uses = model_cfg.used_modalities
        computed = computed_modalities(cfg, uses)  # text/image computed in the run, not read from a store
        stored = tuple(m for m in ("text", "image") if m in uses and m not in computed)
        # before the process group: extraction may take longer than a collective timeout
        ensure_feature_stores(cfg.data, stored, model_cfg.reads_tokens)
        self.env = env = init_distributed(cfg.distributed.timeout_s, cfg.distributed.backend)
        self.checkpointer = Checkpointer(self.run_dir, env.rank, cfg.checkpoint.keep)
        if not resume and self.checkpointer.latest_tag() is not None:
            raise ConfigError(f"--run-dir {self.run_dir} already holds a run with checkpoints; pass --resume to "
                              "continue it or choose a new run directory")
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        data = PreparedDataset(cfg.data.path, verify=env.is_main)
        if env.world_size > 1:
            dist.barrier()
        need_categories = model_cfg.reads_categories
        self.items = load_item_inputs(data, stored, need_categories, env.device, cfg.categories,
                                      model_cfg.reads_tokens)
        # loading an encoder draws from torch's generator: before the seeded model initialisation
        self.media = (MediaStream(data, computed, cfg.data, cfg.features, env.device, env.rank, env.world_size,
                                  cfg.train.seed + 2) if computed else None)
        if self.media is not None:
            self.media.fit_side_states(self._shows_progress)
        if need_categories and model_cfg.category_levels is None and len(set(self.items.category_levels)) > 1:
            model_cfg = dataclasses.replace(model_cfg, category_levels=self.items.category_levels)
            cfg.model = model_cfg
        self.category_names = self.items.category_names
        if self.items.category_summary:
            _log(env, "categories: " + ", ".join(f"{k} {v}" for k, v in self.items.category_summary.items()))
        self.data_fp, self.config_fp = data_fingerprint(data), cfg.fingerprint()
        if env.is_main:
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())

        self.local = LocalSequences(data, env.rank, env.world_size)
        self.plan = TrainPlan(self.local, model_cfg.sequence_mode, model_cfg.max_seq_len, cfg.train.batch_size,
                              cfg.train.seed, env.rank, env.world_size, cfg.train.batching == "by_length",
                              cfg.train.batch_unit)
        self.num_items = data.num_items + cfg.data.extra_items  # the catalogue: ids 1..num_items
        _seed_all(cfg.train.seed)  # identical dense initialisation on every rank, for every world size
        model = build_model(model_cfg, self.items.num_categories, self._feature_dim("text"),
                            self._feature_dim("image"))
        self._fit_feature_statistics(model)
        self.table = build_item_table(self.num_items, model_cfg.hidden_size, cfg.embedding.backend,
                                      cfg.embedding.sharding, cfg.embedding.optimizer, cfg.embedding.lr,
                                      cfg.embedding.eps, cfg.train.seed + 1, model_cfg.init_method, env.device)
        model.to(env.device)
        self.sampler = None
        if model_cfg.loss_type != "full_softmax":
            t = cfg.train
            counts = training_counts(self.local, self.num_items + 1) if t.negative_sampler == "popularity" else None
            self.sampler = NegativeSampler(t.negative_sampler, self.num_items + 1, t.num_negatives, t.seed, counts,
                                           t.negative_sampler_exponent)
        self.eval_users = evaluation_users(self.local, cfg.eval.max_users, cfg.train.seed)
        total_steps = self.plan.steps_per_epoch * cfg.train.max_epochs
        trained = {} if self.media is None else self.media.trained_modules()
        for module in trained.values():
            module.to(env.device)
        self.engine, self.scheduler = build_engine(RecommenderWithEncoders(model, trained) if trained else model,
                                                   cfg.train, env.world_size, total_steps, cfg.features)
        self.dtype = compute_dtype(cfg.train)
        _seed_all(cfg.train.seed + 1000 * (env.rank + 1))  # dropout / swap draws differ across ranks
        # called as on_validation(epoch, metric) after each validation round that may select the best epoch (a
        # tuning study reports it to its pruner, which may stop the run by raising)
        self.on_validation = None
        self.monitor = Monitor(self.run_dir, cfg.logging.tensorboard, env.is_main)
        self.monitor.config_text(cfg.to_yaml())
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": None, "best_epoch": None,
                      "bad_rounds": 0, "best_valid": None, "best_test": None, "best_tag": None, "history": [],
                      "stopped_early": False}
        loss = "full softmax" if self.sampler is None else (
            f"{model_cfg.loss_type.replace('_', ' ')}, "
            + self.sampler.describe(cfg.train.negative_sharing == "per_target"))
        _log(env, f"world size {env.world_size} ({env.backend}, {env.device}); {self.plan.num_users:,} users, "
                  f"{self.num_items:,} items, {self.plan.num_samples:,} training samples with "
                  f"{self.plan.num_targets:,} targets ({model_cfg.sequence_mode}), {self.plan.steps_per_epoch} "
                  f"steps/epoch of {cfg.train.batch_size} {cfg.train.batch_unit}; {loss}; ID table: "
                  f"{cfg.embedding.backend}/{cfg.embedding.sharding}; dense: DeepSpeed ZeRO {cfg.train.zero_stage}, "
                  f"{cfg.train.precision}" + (f"; {self.media.describe()}" if self.media else ""))
        if resume and self.checkpointer.latest_tag() is None:
            _log(env, f"--resume: no checkpoint in {self.run_dir} yet; starting the run")
        if resume and self.checkpointer.latest_tag() is not None:
            saved = self.checkpointer.load(self.table, self.engine, cfg.to_dict(), self.config_fp, self.data_fp)
            self.state.update({k: v for k, v in saved.items() if k in self.state})
            _log(env, f"resumed from {saved['tag']}: epoch {self.state['epoch']}, step {self.state['step_in_epoch']}")

    # ------------------------------------------------------------------ helpers
    def _feature_dim(self, modality: str) -> int:
        if self.media is not None and modality in self.media.paths:
            return self.media.dim(modality)
        return self.items.text_dim if modality == "text" else self.items.image_dim

    def _fit_feature_statistics(self, model) -> None:
        """The input statistics of the content features, from the catalogue's tables (stream mode: encoded once)."""
        if self.media is None:
            model.fit_feature_statistics(self.items.text, self.items.image)
        elif self.cfg.model.feature_normalization != "none":
            catalogue = self.media.catalogue(self.items, self._shows_progress, "feature statistics: catalogue")
            model.fit_feature_statistics(catalogue.text, catalogue.image)

    @property
    def model(self):
        """The recommender (the engine's module, or its recommender where encoders train with it)."""
        return recommender_of(self.engine.module)

    def _checkpoint(self, tag_epoch: int, tag_step: int) -> None:
        if not self.cfg.checkpoint.enabled:
            return
        tag = f"ep{tag_epoch:04d}-st{tag_step:07d}"
        state = dict(self.state, config=self.cfg.to_dict(), config_fingerprint=self.config_fp,
                     data_fingerprint=self.data_fp, world_size=self.env.world_size)
        self.checkpointer.save(tag, self.table, self.engine, state, self.state.get("best_tag"))

    def evaluate_split(self, split: str) -> dict:
        """Metrics of this rank's part of `split` ("valid" | "test"), all-reduced: the same on every rank."""
        cfg = self.cfg
        items = self.items if self.media is None else self.media.catalogue(self.items, self._shows_progress,
                                                                           f"{split}: encoding the catalogue")
        return evaluate(self.model, self.table, items, self.local, split, cfg.model.max_seq_len,
                        cfg.eval.batch_size, tuple(cfg.eval.ks), self.env.device, self.dtype,
                        users=self.eval_users, chunk_size=cfg.model.score_chunk_size, progress=self._shows_progress,
                        exclude_history=cfg.eval.exclude_history)

    @property
    def _shows_progress(self) -> bool:
        return self.env.is_main and self.cfg.logging.progress

    def _write_metrics(self) -> None:
        media = None if self.media is None else {"problems": self.media.problems(),  # a collective
                                                 "rank0_totals": self.media.totals}
        if not self.env.is_main:
            return
        s = self.state
        write_metrics(self.run_dir, {
            "valid": s["best_valid"], "test": s["best_test"], "best_epoch": s["best_epoch"],
            "selection_metric": f"valid {self.cfg.eval.metric}", "epochs_run": s["epoch"],
            "stopped_early": s["stopped_early"], "history": s["history"], "world_size": self.env.world_size,
            "config_fingerprint": self.config_fp, "data_fingerprint": self.data_fp,
            **({"categories": self.items.category_summary} if self.items.category_summary else {}),
            **({"media": media} if media else {})})

    # ------------------------------------------------------------------ training
    def train_step(self, batch, media=None) -> tuple:
        """One optimizer step on this rank's slice of the global batch (global step = state["global_step"]).
        Stream mode: `media` is the step's prepared MediaBatch (prepared here when None)."""
        batch = batch.to(self.env.device)
        terms, output = self.losses(batch, media)
        return self._apply(terms, output, batch)

    def losses(self, batch, media=None) -> tuple:
        """(loss terms, model output) of this rank's slice of a global batch (on the device); no optimizer step."""
        if self.sampler is not None:
            if self.media is None:
                return self._sampled_losses(batch, self.items)
            if media is None:
                media = self.media.prepare(self.step_item_ids(batch, self.state["global_step"]))
            return self._sampled_losses(batch, self.media.encode(media, self.items, training=self.model.training))
        seq_emb, all_rows = self.table.lookup(batch.item_seq)
        items, dtype = self.items, self.dtype
        output = self.engine(*model_inputs(batch, seq_emb, items, dtype))
        candidates = self.model.item_candidates(all_rows.to(dtype), *(None if t is None else t.to(dtype)
                                                                     for t in (items.text, items.image)))
        return training_loss(self.model, output, candidates, batch, self.cfg.train.mscl_negatives), output

    def _draw_negatives(self, batch) -> torch.Tensor:
        """This step's negative ids: [S] shared, or [T, S] for the T scored targets of this rank's slice."""
        step = self.state["global_step"]
        if self.cfg.train.negative_sharing == "shared":
            return self.sampler.draw(step)
        return self.sampler.draw_per_target(step, batch.target_keys(self.cfg.model.max_seq_len))

    def step_item_ids(self, batch, global_step: int) -> torch.Tensor:
        """Every item id the step at `global_step` reads on this rank (stream mode): sequences, targets, negatives."""
        return torch.cat([batch.item_seq.reshape(-1), batch.targets.reshape(-1),
                          self.sampler.draw(global_step).to(batch.item_seq.device)])

    def _sampled_losses(self, batch, items) -> tuple:
        """Sampled losses: ONE lookup of the sequence ids and of the rows the loss needs (this rank's scored
        targets + their negatives, deduplicated); features of the same ids (`items`: the catalogue's tables or
        a stream-mode step's encoded rows); candidates on those."""
        dtype, device = self.dtype, self.env.device
        negatives = self._draw_negatives(batch).to(device)
        targets = batch.targets.reshape(-1)
        targets = targets[targets > 0]
        ids, inverse = distinct_ids(torch.cat([targets, negatives.reshape(-1)]), self.num_items + 1)
        seq_emb, id_rows = self.table.lookup(batch.item_seq, ids)
        output = self.engine(*model_inputs(batch, seq_emb, items, dtype))
        if self.media is None:  # the catalogue's tables
            rows = self.model.candidates_of(ids, id_rows.to(dtype), items.text, items.image)
        else:  # the step's encoded rows
            rows = self.model.item_candidates(id_rows.to(dtype), *(None if t is None else t.to(dtype) for t in
                                                                   (items.rows("text", ids), items.rows("image", ids))))
        per_target = negatives.dim() == 2  # their vectors stay the distinct rows, indexed (scoring._per_row_scores)
        negative_index = inverse[len(targets):].reshape(negatives.shape) if per_target else None
        negative_rows = rows if per_target else rows[inverse[len(targets):]]
        sampled = SampledCandidates(rows[inverse[: len(targets)]], negative_rows, negatives,
                                    self.sampler.log_q(negatives), self.sampler.log_q(targets),
                                    self.sampler.num_negatives / max(self.num_items - 1, 1), negative_index)
        return training_loss(self.model, output, None, batch, self.cfg.train.mscl_negatives, sampled), output

    def _apply(self, terms, output, batch) -> tuple:
        backward_pass(self.engine, terms.total)
        self.engine.step()
        self.table.step()
        return terms, output, batch

    def _signals(self, output, batch, acc: dict) -> None:
        """Accumulate the routing signals: modality weight per category (CAMMSR), expert usage (every MoE)."""
        if output.modality_weights is not None and self.items.categories is not None:
            cats = self.items.categories[batch.item_seq]  # [B, L, C]
            mask = (output.valid & batch.real[:, None] & self.items.has_category[batch.item_seq]).float()
            w = output.modality_weights.detach().float() * mask[..., None]
            acc["weights"] = acc.get("weights", 0) + torch.einsum("blm,blc->cm", w, cats)
            acc["counts"] = acc.get("counts", 0) + torch.einsum("bl,blc->c", mask, cats)
        usage = output.expert_usage()
        if usage is not None:
            acc["usage"] = acc.get("usage", 0) + usage.detach().float()
            acc["usage_n"] = acc.get("usage_n", 0) + 1
            acc["expert_groups"] = output.expert_groups or self.cfg.model.modalities

    def train(self) -> dict:
        cfg, env, s = self.cfg, self.env, self.state
        every, log_every = cfg.checkpoint.every_steps, cfg.logging.every_steps
        self.engine.train()
        while s["epoch"] < cfg.train.max_epochs and not s["stopped_early"]:
            epoch = s["epoch"]
            self.set_id_warmup(epoch)
            start = time.perf_counter()
            window = self._new_window()
            signals: dict = {}
            epoch_loss, epoch_n = torch.zeros(5), 0
            bar = progress_bar(self.plan.steps_per_epoch, f"epoch {epoch}", "step", self._shows_progress,
                               initial=s["step_in_epoch"])
            for (step, batch), media in self.epoch_steps(epoch):
                window["samples"] += int(batch.real.sum())  # CPU tensors: no device sync
                window["targets"] += batch.num_targets
                window["tokens"] += int(batch.seq_len[batch.real].sum())
                terms, output, batch = self.train_step(batch, media)
                values = terms.logged()
                window["loss"] = window["loss"] + values.float()  # stays on the device until logged
                window["n"] += 1
                self._signals(output, batch, signals)
                s["global_step"] += 1
                s["step_in_epoch"] = step + 1
                if s["global_step"] % log_every == 0 or step + 1 == self.plan.steps_per_epoch:
                    epoch_loss += window["loss"].cpu()
                    epoch_n += window["n"]
                    bar.set_postfix(self._log_window(window), refresh=False)
                    window = self._new_window()
                if every and s["global_step"] % every == 0 and step + 1 < self.plan.steps_per_epoch:
                    self._checkpoint(epoch, step + 1)
                bar.update()
            bar.close()
            elapsed = time.perf_counter() - start
            losses = epoch_loss / max(epoch_n, 1)
            _log(env, f"epoch {epoch}: loss {losses[0]:.4f} (rec {losses[1]:.4f}, mscl {losses[2]:.4f}, "
                      f"aux {losses[4]:.4f}) in {elapsed:.1f}s")
            self._log_signals(signals)
            s["epoch"], s["step_in_epoch"] = epoch + 1, 0
            last = s["epoch"] >= cfg.train.max_epochs
            skip_warmup = in_id_warmup(cfg, epoch) and not cfg.eval.in_warmup
            if ((epoch + 1) % cfg.eval.every == 0 or last) and not skip_warmup:
                self._validate(epoch, elapsed)
            if (epoch + 1) % cfg.eval.every == 0 or last or s["stopped_early"]:
                self._checkpoint(s["epoch"], 0)
        self.test_best()
        self._write_metrics()
        self.monitor.flush()
        return {"valid": s["best_valid"], "test": s["best_test"]}

    def epoch_steps(self, epoch: int):
        """((step, batch), media) of this rank for the rest of `epoch`; media: the step's prepared MediaBatch, made
        features.prefetch steps ahead in a thread (stream mode), or None."""
        s = self.state
        steps = self.plan.epoch_batches(epoch, s["step_in_epoch"])
        if self.media is None:
            return ((step, None) for step in steps)
        first_step, first_global = s["step_in_epoch"], s["global_step"]

        def prepare(step_and_batch):
            step, batch = step_and_batch
            return self.media.prepare(self.step_item_ids(batch, first_global + step - first_step))
        return prefetched(steps, prepare, self.cfg.features.prefetch)

    def _new_window(self) -> dict:
        """What is summed between two log lines: samples, tokens, targets, the 5 loss terms (on the device), steps, and
        (stream mode) the media totals at its start."""
        return {"t": time.perf_counter(), "samples": 0, "tokens": 0, "targets": 0,
                "loss": torch.zeros(5, device=self.env.device),
                "n": 0, "media": None if self.media is None else dict(self.media.totals)}

    def _log_window(self, window: dict) -> dict[str, str]:
        """Writes the window's losses and rates to TensorBoard; returns the two the progress bar shows."""
        env, s = self.env, self.state
        counts = torch.tensor([window["samples"], window["tokens"], window["targets"]], dtype=torch.float64)
        loss = window["loss"].detach().cpu().double() / max(window["n"], 1)
        packed = torch.cat([counts, loss])
        if env.world_size > 1:
            packed = packed.to(env.device)  # nccl reduces device tensors only
            dist.all_reduce(packed)
            packed = packed.cpu()
        seconds = max(time.perf_counter() - window["t"], 1e-9)
        loss = packed[3:] / env.world_size
        step = s["global_step"]
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.cfg.train.lr
        self.monitor.scalars({
            "train/loss/total": float(loss[0]), "train/loss/recommendation": float(loss[1]),
            "train/loss/mscl": float(loss[2]), "train/loss/category": float(loss[3]),
            "train/loss/auxiliary": float(loss[4]), "train/lr": lr,
            "perf/samples_per_s": float(packed[0]) / seconds, "perf/tokens_per_s": float(packed[1]) / seconds,
            "perf/targets_per_s": float(packed[2]) / seconds, "perf/step_time_s": seconds / max(window["n"], 1)}, step)
        self.monitor.memory(step)
        shown = {"loss": f"{float(loss[0]):.4f}", "tokens/s": f"{float(packed[1]) / seconds:,.0f}"}
        if window["media"] is not None:  # stream mode: targets/s beside the media rates
            shown = {"loss": shown["loss"], "targets/s": f"{float(packed[2]) / seconds:,.0f}",
                     **self._log_media_window(window, seconds)}
        return shown

    def _log_media_window(self, window: dict, seconds: float) -> dict[str, str]:
        """Stream mode: images/s and texts/s over all ranks, and rank 0's seconds per step in each media phase."""
        now, before = self.media.totals, window["media"]
        counts = torch.tensor([now["images"] - before["images"], now["texts"] - before["texts"]],
                              dtype=torch.float64)
        if self.env.world_size > 1:
            counts = counts.to(self.env.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        steps = max(window["n"], 1)
        self.monitor.scalars({"perf/images_per_s": float(counts[0]) / seconds,
                              "perf/texts_per_s": float(counts[1]) / seconds,
                              **{f"perf/stream/{phase}_s": (now[phase] - before[phase]) / steps
                                 for phase in ("read", "decode", "tokenize", "encode")}}, self.state["global_step"])
        return {"img/s": f"{float(counts[0]) / seconds:,.0f}", "txt/s": f"{float(counts[1]) / seconds:,.0f}"}

    def _log_signals(self, signals: dict) -> None:
        if not signals:
            return
        packed = []
        for key in ("weights", "counts", "usage"):
            if key in signals:
                tensor = signals[key].double()
                if self.env.world_size > 1:
                    dist.all_reduce(tensor)
                packed.append((key, tensor.cpu()))
        got = dict(packed)
        usage = got.get("usage")
        if usage is not None:
            usage = usage / (signals["usage_n"] * self.env.world_size)
        self.monitor.cammsr_signals(got.get("weights"), got.get("counts"), usage, self.cfg.model.modalities,
                                    signals.get("expert_groups", ()), self.category_names,
                                    self.cfg.logging.max_category_scalars, self.state["global_step"])

    def set_id_warmup(self, epoch: int) -> None:
        """The model's mode for `epoch`: the ID modality alone during train.id_warmup_epochs (CAMMSR), else all."""
        if self.cfg.model.name != "cammsr" or not self.cfg.train.id_warmup_epochs:
            return
        warmup = in_id_warmup(self.cfg, epoch)
        if warmup != self.model.id_only:
            _log(self.env, f"epoch {epoch}: " + ("ID warm-up, the ID modality alone (train.id_warmup_epochs="
                                                   f"{self.cfg.train.id_warmup_epochs})" if warmup
                                                   else "every modality from now on"))
        self.model.set_id_only(warmup)

    def _validate(self, epoch: int, epoch_seconds: float) -> None:
        cfg, s = self.cfg, self.state
        start = time.perf_counter()
        valid = self.evaluate_split("valid")
        metric = valid[cfg.eval.metric]
        record = {"epoch": epoch, "valid": valid, "epoch_seconds": round(epoch_seconds, 3),
                  "valid_seconds": round(time.perf_counter() - start, 3)}
        self.monitor.scalars({f"valid/{k}": v for k, v in valid.items() if k != "count"}, s["global_step"])
        if in_id_warmup(cfg, epoch):
            record["id_warmup"] = True
            s["history"].append(record)
            _log(self.env, f"  valid {cfg.eval.metric} {metric:.4f} in {record['valid_seconds']:.1f}s "
                           "(ID warm-up: not a candidate for the best epoch)")
            self._write_metrics()
            return
        if s["best_metric"] is None or metric > s["best_metric"]:
            s.update(best_metric=metric, best_epoch=epoch, bad_rounds=0, best_valid=valid, best_test=None,
                     best_tag=f"ep{epoch + 1:04d}-st{0:07d}")
            if cfg.eval.test == "each_best":
                s["best_test"] = record["test"] = self._test()
        else:
            s["bad_rounds"] += 1
            if cfg.eval.patience and s["bad_rounds"] >= cfg.eval.patience:
                s["stopped_early"] = True
        s["history"].append(record)
        _log(self.env, f"  valid {cfg.eval.metric} {metric:.4f} in {record['valid_seconds']:.1f}s (best "
                       f"{s['best_metric']:.4f} at epoch {s['best_epoch']})" + ("; early stop" if s["stopped_early"]
                                                                               else ""))
        self._write_metrics()
        self.monitor.flush()
        if self.on_validation is not None:
            self.on_validation(epoch, metric)

    def _test(self) -> dict:
        test = self.evaluate_split("test")
        self.monitor.scalars({f"test/{k}": v for k, v in test.items() if k != "count"}, self.state["global_step"])
        return test

    def test_best(self) -> None:
        """eval.test=end: rank the test split once, with the weights of the best validation round's checkpoint.
        Training is over, so the engine's state may be replaced."""
        s = self.state
        if self.cfg.eval.test != "end" or s["best_tag"] is None or s["best_test"] is not None:
            return
        if s["best_tag"] != self.checkpointer.latest_tag():  # else the weights in memory are the best round's
            self.checkpointer.load_weights(s["best_tag"], self.table, self.engine)
        self.set_id_warmup(s["best_epoch"])
        s["best_test"] = self._test()
        _log(self.env, f"test at the best validation epoch {s['best_epoch']} (checkpoint {s['best_tag']}): "
                       + ", ".join(f"{k} {v:.4f}" for k, v in s["best_test"].items() if k != "count"))

    def release(self) -> None:
        """Close the monitor and the engine; the process group stays (another Trainer may follow)."""
        self.monitor.close()
        if self.media is not None:
            self.media.close()
        self.engine.destroy()  # removes ZeRO's grad hooks, which keep the engine and its process groups alive

    def close(self, wait_for_peers: bool = True) -> None:
        try:
            self.release()
        finally:
            shutdown(wait_for_peers)


def run_training(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    trainer = Trainer(cfg, run_dir, resume)
    try:
        result = trainer.train()
    except BaseException:  # KeyboardInterrupt included
        trainer.close(wait_for_peers=False)
        raise
    trainer.close()
    return result


__all__ = ["Trainer", "run_training", "describe_plan"]
