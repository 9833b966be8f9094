"""``glance train``: train or fine-tune GLANCE on 2D / 2.5D patches (paper "Implementation and
training details"; eq. 9-10; deep supervision x 0.3).

AdamW (lr 1e-4, weight decay 0.05), CosineAnnealingWarmRestarts with T0 in
epochs (stepped every iteration with a fractional epoch), batch 8, AMP on GPU.
A checkpoint is written atomically after every epoch and ``--resume`` continues
exactly: every sample is a function of (seed, epoch, index) and the checkpoint
holds the model, optimizer, scheduler and history. Under ``torchrun`` each
process trains on its share of every batch through DistributedDataParallel.
A finished run registers a model version (fp16 safetensors + model card).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from glance.errors import GlanceError
from glance_training.targets import MIN_SIGMA_PX

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"


@dataclass
class TrainConfig:
    name: str = "glance-site"
    data: list[str] = field(default_factory=list)
    preset: str = "small"
    ablation: str = "full"
    base_model: str | None = None  # fine-tune from this registered model or folder
    # Distil from this registered model or folder: its maps averaged over the four in-plane flips are soft
    # targets (glance_training.losses.distillation_loss), weighted by distill_weight, next to the labels.
    teacher: str | None = None
    distill_weight: float = 1.0
    context_slices: int = 0  # 2.5D: 2k+1 input channels
    pixel_spacing_mm: float = 0.7
    patch_size: int = 128
    crop_patch_size: int = 64
    positive_prob: float = 0.6
    flip_prob: float = 0.0  # mirror each sample left-right and front-back with this probability
    epochs: int = 20
    steps_per_epoch: int = 100
    batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.05
    t0_epochs: int = 20
    val_samples: int = 96
    cache_cases: int = 64  # loaded cases kept in memory per loader
    samples_per_case: int = 1  # consecutive samples from one case (raise when cases are costly to load)
    # Dice over the whole batch (eq. 10 summed over samples): nodule-free patches then do not
    # each pull every pixel to zero, which otherwise stalls learning on 2 % foreground.
    batch_dice: bool = True
    # Floor of the heatmap Gaussians' sigma (pixels of the model's input): 1 keeps a micronodule's
    # peak one pixel sharp; wider lets the network answer a small nodule with a broader peak.
    heatmap_min_sigma_px: float = MIN_SIGMA_PX
    # After registration, choose the model's default thresholds on the validation patients
    # (glance_training.calibrate) and store them in its card.
    calibrate: bool = True
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    held_out: tuple[str, ...] = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GlanceError(f"{path}: unreadable training config ({exc})") from None
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise GlanceError(f"{path}: unknown training config keys: {', '.join(unknown)}")
        for key in ("split", "held_out"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK; then one process per device (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def _device(name: str, dist_local_rank: int) -> torch.device:
    from glance.infer import select_device

    device = select_device(name)
    if device.type == "cuda" and "WORLD_SIZE" in os.environ:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist_local_rank)))
        torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------- the run


@dataclass
class EpochRecord:
    epoch: int
    step: int
    lr: float
    loss: float
    dice_loss: float
    bce: float
    focal: float
    deep: float
    val_dice: float
    val_loss: float
    seconds: float
    distill: float = float("nan")  # the distillation term, when the run has a teacher


def sampling_config(cfg: TrainConfig):
    """The sampler's config for ``cfg``; a field out of range is one GlanceError, not a traceback."""
    from glance_training.datasets import SliceSamplingConfig

    try:  # cache_cases: generated phantoms are the costly cases to rebuild, so loaded ones stay cached
        return SliceSamplingConfig(pixel_spacing_mm=cfg.pixel_spacing_mm, context_slices=cfg.context_slices,
                                   positive_prob=cfg.positive_prob, flip_prob=cfg.flip_prob,
                                   samples_per_case=cfg.samples_per_case,
                                   cache_cases=cfg.cache_cases, heatmap_min_sigma_px=cfg.heatmap_min_sigma_px)
    except ValueError as exc:
        raise GlanceError(f"training config: {exc}") from None


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, progress: Callable[[str], None] | None = None):
        from glance.model import build_model, config_for
        from glance_training.data import build_groups
        from glance_training.datasets import SplitConfig
        from glance_training.losses import GlanceLoss, LossConfig

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.emit = progress or (lambda line: None)
        self.device = _device(cfg.device, 0)
        self.dist = init_distributed(self.device)
        torch.manual_seed(cfg.seed)
        split = SplitConfig(cfg.split, cfg.seed, cfg.held_out)
        self.groups = build_groups(cfg.data, cfg.seed, split, cfg.patch_size, cfg.crop_patch_size)
        self.sampling = sampling_config(cfg)
        self.model, self.base_card = self._initial_model(build_model, config_for)
        self.model.to(self.device)
        self.teacher = self._teacher()
        self.loss_fn = GlanceLoss(LossConfig(batch_dice=cfg.batch_dice))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.optimizer, T_0=cfg.t0_epochs)
        self.history: list[EpochRecord] = []
        self.epoch = 0
        self._sets: list | None = None
        self._val_sets: list | None = None
        self.net = self.model
        if self.dist.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _load_fitting(self, spec: str, role: str):
        """(model, card) of a registered model or folder whose input is this run's input."""
        from glance.model.weights import load_model
        from glance.registry import resolve_model

        cfg = self.cfg
        model, card = load_model(resolve_model(spec))
        if card.prep.context_slices != cfg.context_slices or card.prep.pixel_spacing_mm != cfg.pixel_spacing_mm:
            raise GlanceError(f"{role} {card.name}@{card.version} expects context_slices="
                              f"{card.prep.context_slices}, pixel_spacing_mm={card.prep.pixel_spacing_mm}")
        return model, card

    def _initial_model(self, build_model, config_for):
        cfg = self.cfg
        if cfg.base_model:
            model, card = self._load_fitting(cfg.base_model, "base model")
            return model.train(), card
        model = build_model(config_for(cfg.preset, cfg.ablation, in_channels=2 * cfg.context_slices + 1))
        return model.train(), None

    def _teacher(self):
        """The frozen teacher network in eval mode, or None."""
        if not self.cfg.teacher:
            return None
        if not self.cfg.distill_weight > 0:
            raise GlanceError(f"training config: distill_weight must be positive, got {self.cfg.distill_weight}")
        model, card = self._load_fitting(self.cfg.teacher, "teacher")
        log.info("distilling from %s@%s averaged over the in-plane flips (weight %g)", card.name, card.version,
                 self.cfg.distill_weight)
        return model.to(self.device).eval().requires_grad_(False)

    # -- data -------------------------------------------------------------------------------

    def _train_sets(self) -> list:
        """One dataset per patch group, built once so loaded cases stay cached across epochs."""
        if self._sets is None:
            steps = np.bincount(self._schedule, minlength=len(self.groups["train"]))
            self._sets = [g.dataset(self.sampling, int(n) * self.cfg.batch, self.cfg.seed, augment=True)
                          for g, n in zip(self.groups["train"], steps)]
            for g in self.groups["train"]:
                if g.patch_size == self.cfg.patch_size and g.n_cases > self.cfg.cache_cases:
                    # Whole volumes (phantoms above all: seconds each) beyond the cache are reloaded on most draws.
                    log.warning("%d training volumes but cache_cases %d: the rest are reloaded on most draws; "
                                "raise cache_cases to %d if memory allows", g.n_cases, self.cfg.cache_cases, g.n_cases)
            if self.cfg.workers:
                for ds in self._sets:
                    ds.preload()
        return self._sets

    def _loaders(self, epoch: int) -> list:
        """One loader per patch group for this epoch; each rank sees its own share."""
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        loaders = []
        for ds in self._train_sets():
            ds.set_epoch(epoch)
            sampler = DistributedSampler(ds, self.dist.world, self.dist.rank, shuffle=False)
            loaders.append(DataLoader(ds, batch_size=self.cfg.batch // self.dist.world, sampler=sampler,
                                      num_workers=self.cfg.workers, drop_last=True))
        return loaders

    @property
    def _schedule(self) -> list[int]:
        """The patch group of each step of an epoch (shares from the sources' weights)."""
        from glance_training.data import step_schedule

        return step_schedule([g.share for g in self.groups["train"]], self.cfg.steps_per_epoch)

    def _batches(self, epoch: int):
        iters = [iter(loader) for loader in self._loaders(epoch)]
        for group in self._schedule:
            yield next(iters[group])

    # -- steps --------------------------------------------------------------------------------

    def _autocast(self):
        from contextlib import nullcontext

        if self.device.type != "cuda":
            return nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_epoch(self) -> dict[str, float]:
        self.net.train()
        sums: dict[str, float] = {}
        n = 0
        for step, batch in enumerate(self._batches(self.epoch)):
            batch = self._to_device(batch)
            with self._autocast():
                out = self.net(batch["image"])
            total, parts = self.loss_fn(_float(out), batch)
            if self.teacher is not None:
                total, parts = self._with_distillation(out, batch["image"], total, parts)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.scheduler.step(self.epoch + (step + 1) / self.cfg.steps_per_epoch)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if self.dist.main:
                done = self.epoch * self.cfg.steps_per_epoch + step + 1
                self.emit(f"PROGRESS {done}/{self.cfg.epochs * self.cfg.steps_per_epoch}")
        return {k: v / max(n, 1) for k, v in sums.items()}

    def _with_distillation(self, out, image: torch.Tensor, total: torch.Tensor, parts: dict):
        from glance.infer import mean_over_flips
        from glance_training.losses import distillation_loss

        with torch.no_grad(), self._autocast():
            maps = mean_over_flips(self.teacher, image)
        term = distillation_loss(_float(out), maps, self.loss_fn.config.det_weight)
        total = total + self.cfg.distill_weight * term
        return total, {**parts, "distill": term.detach(), "total": total.detach()}

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """(mean Dice at p >= 0.5 over validation nodule slices, mean validation loss)."""
        from torch.utils.data import DataLoader

        if not self.groups["val"]:
            return float("nan"), float("nan")
        if self._val_sets is None:
            self._val_sets = [g.dataset(self.sampling, self.cfg.val_samples, self.cfg.seed + 1, augment=False)
                              for g in self.groups["val"]]
            if self.cfg.workers:
                for ds in self._val_sets:
                    ds.preload()
        self.model.eval()
        dices, losses = [], []
        for ds in self._val_sets:
            for batch in DataLoader(ds, batch_size=self.cfg.batch, num_workers=self.cfg.workers):
                batch = self._to_device(batch)
                out = self.model(batch["image"])
                losses.append(float(self.loss_fn(_float(out), batch)[0]))
                dices += _slice_dice(out.seg, batch)
        self.model.train()
        return float(np.mean(dices)) if dices else float("nan"), float(np.mean(losses))

    # -- the loop ------------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> list[EpochRecord]:
        """Train to ``cfg.epochs`` (or to epoch ``stop_after``, as if interrupted there)."""
        last = self.cfg.epochs if stop_after is None else min(stop_after, self.cfg.epochs)
        while self.epoch < last:
            t = time.perf_counter()
            parts = self.train_epoch()
            val_dice, val_loss = self.validate()
            rec = EpochRecord(self.epoch + 1, (self.epoch + 1) * self.cfg.steps_per_epoch,
                              self.optimizer.param_groups[0]["lr"], parts.get("total", float("nan")),
                              parts.get("dice", float("nan")), parts.get("bce", float("nan")),
                              parts.get("focal", float("nan")), parts.get("deep", float("nan")),
                              val_dice, val_loss, time.perf_counter() - t, parts.get("distill", float("nan")))
            self.history.append(rec)
            self.epoch += 1
            if self.dist.main:
                self.emit(f"METRIC epoch={rec.epoch} loss={rec.loss:.4f} val_dice={rec.val_dice:.4f}")
                log.info("epoch %d/%d: loss %.4f, val Dice %.3f (%.0f s)", rec.epoch, self.cfg.epochs,
                         rec.loss, rec.val_dice, rec.seconds)
                self.save_checkpoint()
        return self.history

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        from glance.io import atomic_path

        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "config": json.dumps(asdict(self.cfg)),
            "history": json.dumps([asdict(r) for r in self.history]),
        }
        path = self.run_dir / CHECKPOINT
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        write_history(self.history, self.run_dir)
        return path

    def load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT
        try:
            # weights_only: a restricted unpickler that only rebuilds tensors and plain containers.
            state = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise GlanceError(f"{path}: no checkpoint to resume from") from None
        except Exception as exc:  # a truncated or foreign file
            raise GlanceError(f"{path}: unreadable checkpoint ({exc})") from None
        saved = TrainConfig(**_tuples(json.loads(state["config"])))
        if asdict(saved) != asdict(self.cfg):
            raise GlanceError(f"{path}: was made with a different training config; resume with the same one")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = [EpochRecord(**r) for r in json.loads(state["history"])]
        log.info("resumed %s at epoch %d", path, self.epoch)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if k in ("split", "held_out") else v for k, v in d.items()}


def _float(out):
    """Network outputs as float32 (autocast may give half precision) for the loss."""
    from glance.model import GlanceOutput

    return GlanceOutput(out.seg.float(), out.heatmap.float(), tuple(a.float() for a in out.aux))


def _slice_dice(seg_logits: torch.Tensor, batch: dict) -> list[float]:
    pred = seg_logits >= 0  # p >= 0.5
    gt = batch["mask"] > 0.5
    keep = (batch["mask_valid"] > 0) & gt.flatten(1).any(1)
    inter = (pred & gt).flatten(1).sum(1).float()
    denom = pred.flatten(1).sum(1) + gt.flatten(1).sum(1)
    dice = 2 * inter / denom.clamp(min=1)
    return dice[keep].tolist()


def write_history(history: list[EpochRecord], run_dir: Path) -> None:
    """history.csv and a loss / validation-Dice curve PNG (the GUI plots the CSV too)."""
    from glance.io import atomic_path, atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(EpochRecord)])
    writer.writeheader()
    for r in history:
        writer.writerow(asdict(r))
    atomic_write_text(run_dir / HISTORY, buf.getvalue())
    if not history:
        return
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    epochs = [r.epoch for r in history]
    ax.plot(epochs, [r.loss for r in history], label="training loss")
    ax.plot(epochs, [r.val_loss for r in history], label="validation loss")
    ax.set_xlabel("epoch")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r.val_dice for r in history], "g--", label="validation Dice")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("Dice")
    ax.set_ylabel("loss")
    handles = ax.get_lines() + ax2.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    fig.tight_layout()
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png")


def out_version(name: str, base_card=None) -> str:
    """Version of a model written to an explicit folder: the next minor version of the base model it
    was fine-tuned from when it keeps the base's name (a shipped model's next release), else 1.0.0."""
    if base_card is None or base_card.name != name:
        return "1.0.0"
    major, minor = (int(part) for part in base_card.version.split(".")[:2])
    return f"{major}.{minor + 1}.0"


def register(trainer: Trainer, out: Path | None = None) -> Path:
    """Save the trained network as a new model version (never over an existing one)."""
    from glance.model.card import provenance
    from glance.model.weights import ModelCard, Preprocessing, save_model
    from glance.registry import next_version_dir
    from glance_training.data import describe

    cfg = trainer.cfg
    if out is None:
        version, out = next_version_dir(cfg.name)
    else:
        version = out_version(cfg.name, trainer.base_card)
        if (Path(out) / "card.json").exists():
            raise GlanceError(f"{out}: already holds a model; choose a new folder")
    last = trainer.history[-1] if trainer.history else None
    card = ModelCard(
        name=cfg.name, version=version, config={},
        preprocessing=asdict(Preprocessing(pixel_spacing_mm=cfg.pixel_spacing_mm,
                                           context_slices=cfg.context_slices)),
        training={"config": asdict(cfg), "data": describe(trainer.groups),
                  "epochs": trainer.epoch, "steps": trainer.epoch * cfg.steps_per_epoch,
                  "seconds": round(sum(r.seconds for r in trainer.history), 1),
                  "base_model": (f"{trainer.base_card.name}@{trainer.base_card.version}"
                                 if trainer.base_card else None),
                  "split": "by patient (SHA-256 of seed:patient_id); held-out patients never trained on"},
        metrics={"validation_slice_dice": last.val_dice if last else None},
        provenance=provenance(),
    )
    folder = save_model(trainer.model, out, card)
    if cfg.calibrate:
        _calibrate(folder, cfg)
    return folder


def _calibrate(folder: Path, cfg: TrainConfig) -> None:
    """Calibrate the registered model's thresholds. The weights are already saved, so a failure here
    (no labelled validation case, or anything unforeseen) must not throw away hours of training:
    it becomes one warning and a note in the card, and the model runs at the built-in defaults
    until ``glance calibrate --model FOLDER --write`` succeeds."""
    from glance_training.calibrate import CalibrationConfig, calibrate, write_to_card

    try:
        result = calibrate(CalibrationConfig(str(folder), list(cfg.data), device=cfg.device))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, GlanceError) else f"{type(exc).__name__}: {exc}"
        log.warning("%s: thresholds not calibrated (%s); the built-in defaults apply", folder, reason)
        log.debug("calibration failed", exc_info=True)
        _note_in_card(folder, "calibration", f"not calibrated: {reason}; run glance calibrate --model {folder} --write")
        return
    write_to_card(folder, result)
    log.info("calibrated thresholds: segmentation %.2f, detection %.2f", result.segmentation, result.detection)


def _note_in_card(folder: Path, key: str, text: str) -> None:
    from glance.model.card import read_card, write_card

    card = read_card(folder)
    card.metrics = {**(card.metrics or {}), key: text}
    write_card(folder, card)
