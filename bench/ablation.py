"""Equal-budget ablation (paper Table 4; issue 6 point 5): full GLANCE against w/o GCT, w/o MRGAM,
w/o CSCF and the baseline U-Net, and 1-slice against 2.5D input.

Every variant trains with the same data, seed, steps and hyper-parameters: its training config
is the base config with exactly one field changed (``ablation``, or ``context_slices`` for
2.5D), so a difference in the results comes from that field alone. Each trained model is
registered into a temporary work folder (never the user registry) and scored on data it never
trained on: per-nodule Dice of the held-out (test-split) real LIDC max-slice crops; optionally
the two held-out full LIDC scans (``--full-scans``: segmentation and detection FROC/CPM) and
unseen volumetric phantoms (``--phantoms N``).

The max-slice crops are single axial slices: a 2.5D model sees the same slice repeated in its
three channels there, so the 1-slice vs 2.5D comparison only means something on volumetric
data (the phantoms, or full scans); the table says so.

Run from the repository root (defaults take about an hour for all six variants on 2 idle CPU cores):

    python bench/ablation.py [--config JSON] [--epochs E] [--steps-per-epoch S] [--variants full unet ...]
                             [--phantoms N] [--full-scans] [--out bench/results]

Writes ablation.json and ablation.md to --out (bench/results/ is git-ignored) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BASE_CONFIG = ROOT / "GLANCETraining" / "configs" / "glance-small.json"
OUT = ROOT / "bench" / "results"
CROPS_SPEC = f"maxslice:{DATA / 'lidc-maxslice-crops'}"
# The two full scans of shared/data: LIDC-IDRI-0001 and -0003, reserved test patients.
FULL_SCAN_SPECS = (f"lidc:{DATA / 'LIDC-IDRI-0001'}", f"lidc:{DATA / 'scans'}")

# The budget: the full model learns nothing measurable in its first ~400 steps at the shipped
# config's learning rate (glance-small's history: validation Dice 0.00 at step 300, 0.15 at 400,
# 0.38 at 500), and a 5 x 100-step run that anneals to zero by step 500 ends at Dice 0.00. So the
# default is 10 x 100 steps, annealed over the run: about 40 s per 100 steps on 2 idle cores,
# plus ~2 minutes of scoring per variant, ~1 hour for the six. The script prints its own
# estimate after the first variant.
DEFAULT_EPOCHS = 10
DEFAULT_STEPS = 100
DEFAULT_VAL_SAMPLES = 32



@dataclass(frozen=True)
class Variant:
    name: str
    field: str  # the one TrainConfig field that differs from the base
    value: object
    label: str  # the paper's wording (Table 4)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("full", "ablation", "full", "Full GLANCE (GCT+MRGAM+CSCF), 1 slice"),
    Variant("no_gct", "ablation", "no_gct", "w/o GCT (no transformer branch)"),
    Variant("no_mrgam", "ablation", "no_mrgam", "w/o MRGAM (no atrous conv branch)"),
    Variant("no_cscf", "ablation", "no_cscf", "w/o CSCF (no cross-scale fusion)"),
    Variant("unet", "ablation", "unet", "baseline U-Net (w/o GCT & MRGAM & CSCF)"),
    Variant("2.5d", "context_slices", 1, "Full GLANCE, 2.5D input (3 slices)"),
)}

TWO_D_NOTE = ("The max-slice crops are single slices (repeated across a 2.5D model's channels), so the "
              "1-slice vs 2.5D comparison is only meaningful on volumetric data (phantom / full-scan columns).")


# ----------------------------------------------------------------------------- configs


def _absolute_spec(text: str) -> str:
    """A data spec with a repository-relative path made absolute (configs are written for the repo root)."""
    from glance_training.data import DataSpec

    spec = DataSpec.parse(text)
    if spec.kind == "phantom" or Path(spec.arg).is_absolute():
        return text
    return str(replace(spec, arg=str((ROOT / spec.arg).resolve())))  # keeps the spec's options and weight


def base_config(path: Path = BASE_CONFIG, epochs: int = DEFAULT_EPOCHS, steps_per_epoch: int = DEFAULT_STEPS,
                val_samples: int = DEFAULT_VAL_SAMPLES, device: str = "auto"):
    """The shared reference config: ``path`` with a shorter budget, the full model on 1 slice.

    The cosine cycle is scaled with the budget (the shipped config anneals over its whole run,
    T0 = epochs), so every variant ends its run at the same low learning rate. Variants are not
    calibrated: all are scored at the same built-in thresholds (p >= 0.5, heatmap >= 0.3), so the
    table compares networks, not operating points.
    """
    from glance_training.train import TrainConfig

    cfg = TrainConfig.from_json(path)
    t0 = max(1, round(cfg.t0_epochs * epochs / cfg.epochs))
    return replace(cfg, name="glance-ablation", base_model=None, ablation="full", context_slices=0,
                   epochs=epochs, steps_per_epoch=steps_per_epoch, t0_epochs=t0, val_samples=val_samples,
                   device=device, data=[_absolute_spec(d) for d in cfg.data], calibrate=False)


def variant_config(base, variant: Variant):
    """The base config with the variant's one field set."""
    return replace(base, **{variant.field: variant.value})


# ----------------------------------------------------------------------------- one variant


def _seg_summary(report: dict) -> dict:
    seg = report.get("segmentation_per_nodule")
    if not seg:
        return {"n_nodules": 0}
    return {"n_nodules": seg["dice"]["n"] + seg["dice"]["n_excluded"], "dice": seg["dice"]["mean"],
            "dice_std": seg["dice"]["std"], "iou": seg["iou"]["mean"], "sensitivity": seg["sensitivity"]["mean"],
            "hd95_mm": seg["hd95"]["mean"]}


def _det_summary(report: dict) -> dict:
    det = report.get("detection")
    if not det:
        return {}
    return {"cpm": det["cpm"], "cpm_ci": det["cpm_ci"], "n_scans": det["n_scans"],
            "n_nodules_detected": f"{det['n_detected']}/{det['n_nodules']}"}


def _evaluate(model: Path, data: list[str], split: str, out: Path, args) -> dict:
    from glance_training.evaluate import EvaluateConfig, evaluate

    t = time.perf_counter()
    report = evaluate(EvaluateConfig(model=str(model), data=data, split=split, out=str(out), device=args.device,
                                     n_bootstrap=args.bootstrap, max_cases=args.max_cases))
    return {"data": data, "split": split, **_seg_summary(report), **_det_summary(report),
            "seconds": round(time.perf_counter() - t, 1)}


def run_variant(variant: Variant, cfg, work: Path, args, phantoms) -> dict:
    """Train, register into ``work`` and score one variant (``phantoms``: the open ``synthetic.PhantomCache``)."""
    from glance_training.train import Trainer, register

    folder = work / variant.name.replace(".", "_")
    t, generated = time.perf_counter(), phantoms.seconds
    trainer = Trainer(cfg, folder / "run")
    history = trainer.fit()
    # Training time without the phantoms generated for it: only the first variant pays for those.
    generating = phantoms.seconds - generated
    train_s = time.perf_counter() - t - generating
    model = register(trainer, out=folder / "model")
    last = history[-1]
    result = {"label": variant.label, "field": variant.field, "value": variant.value,
              "train_seconds": round(train_s, 1), "phantom_seconds": round(generating, 1),
              "final_loss": last.loss, "val_slice_dice": last.val_dice,
              "parameters": sum(p.numel() for p in trainer.model.parameters())}
    del trainer
    result["crops"] = _evaluate(model, [CROPS_SPEC], "test", folder / "eval-crops", args)
    if args.phantoms:
        # Evaluation phantoms come from another seed than training's: "all" holds only unseen ones.
        result["phantoms"] = _evaluate(model, [f"phantom:{args.phantoms}"], "all", folder / "eval-phantoms", args)
    if args.full_scans:
        result["full_scans"] = _evaluate(model, list(FULL_SCAN_SPECS), "test", folder / "eval-scans", args)
    result["seconds"] = round(time.perf_counter() - t, 1)
    return result


# ----------------------------------------------------------------------------- the report


def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def markdown(results: dict) -> str:
    extra = [key for key in ("phantoms", "full_scans") if any(key in r for r in results["variants"].values())]
    header = ["variant", "differs in", "train s*", "final loss", "crop Dice % (n)", "crop IoU %"]
    for key in extra:
        header += [f"{key.replace('_', ' ')} Dice %", f"{key.replace('_', ' ')} CPM %"]
    lines = [f"Command: `{results['command']}`", "",
             f"Budget per variant: {results['budget']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results["variants"].items():
        c = r["crops"]
        row = [r["label"], "–" if name == "full" else f"{r['field']}={r['value']}", f"{r['train_seconds']:.0f}",
               f"{r['final_loss']:.3f}", f"{_pct(c.get('dice'))} ({c['n_nodules']})", _pct(c.get("iou"))]
        for key in extra:
            e = r.get(key, {})
            row += [_pct(e.get("dice")), _pct(e.get("cpm"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"Note: {TWO_D_NOTE}", "",
              "*Training seconds including validation, excluding the generation of phantoms (shared by all "
              "variants).", "",
              "Crops: test-split patients of shared/data/lidc-maxslice-crops (never trained on); Dice/IoU per "
              "nodule at p >= 0.5." + (" Phantoms: unseen seeds, full pipeline." if "phantoms" in extra else "")
              + (" Full scans: LIDC-IDRI-0001/0003 (reserved test patients), full pipeline, LUNA16 CPM."
                 if "full_scans" in extra else "")]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    from glance.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "ablation.json", out / "ablation.md"
    atomic_write_text(json_path, json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(md_path, markdown(results))
    return json_path, md_path


# ----------------------------------------------------------------------------- main


def _print_progress(r: dict, base, phantoms, estimate_for: int) -> None:
    """One variant's times; after the first, an estimate for ``estimate_for`` variants."""
    per_step = r["train_seconds"] / (base.epochs * base.steps_per_epoch)
    print(f"    {r['train_seconds']:.0f} s training ({per_step:.2f} s/step incl. validation), {r['seconds']:.0f} s "
          f"in all; crop Dice {_pct(r['crops'].get('dice'))} %", flush=True)
    if estimate_for > 1:
        rest = (r["seconds"] - phantoms.seconds) * (estimate_for - 1)  # later variants reuse the phantoms
        print(f"    {phantoms.generated} phantoms generated in {phantoms.seconds:.0f} s (shared); estimated "
              f"total: {(r['seconds'] + rest) / 60:.0f} min for {estimate_for} variants", flush=True)


def _budget(cfg) -> str:
    data = ", ".join(f"{kind}:{Path(arg).name}" for kind, _, arg in (d.partition(":") for d in cfg.data))
    return (f"{cfg.epochs} epochs x {cfg.steps_per_epoch} steps x batch {cfg.batch}, lr {cfg.lr:g}, "
            f"T0 {cfg.t0_epochs} epochs, seed {cfg.seed}, data {data}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=BASE_CONFIG, help="base training config (default glance-small)")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--steps-per-epoch", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--val-samples", type=int, default=DEFAULT_VAL_SAMPLES, help="validation patches per epoch")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help=f"subset to run (default all: {' '.join(VARIANTS)})")
    ap.add_argument("--phantoms", type=int, default=0, help="also score N unseen volumetric phantoms (2.5D check)")
    ap.add_argument("--full-scans", action="store_true", help="also score the two held-out full LIDC scans")
    ap.add_argument("--max-cases", type=int, default=0, help="score at most this many cases per source (0: all)")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the CPM interval")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--work-dir", type=Path, help="keep runs, models and reports here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for ablation.json / ablation.md")
    args = ap.parse_args(argv)
    for name in ("epochs", "steps_per_epoch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from glance_training.datasets.synthetic import phantom_cache

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (DATA / "lidc-maxslice-crops").is_dir():
        print(f"{DATA / 'lidc-maxslice-crops'}: not found; the ablation needs the shared data", file=sys.stderr)
        return 2
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    base = base_config(args.config, args.epochs, args.steps_per_epoch, args.val_samples, args.device)
    print(f"Command: {command}\nNote: {TWO_D_NOTE}", flush=True)
    results = {"command": command, "budget": _budget(base), "base_config": asdict(base), "notes": [TWO_D_NOTE],
               "variants": {}}
    with tempfile.TemporaryDirectory(prefix="glance-ablation-") as tmp, phantom_cache() as phantoms:
        work = args.work_dir or Path(tmp)
        started = time.perf_counter()
        for n, name in enumerate(args.variants, start=1):
            print(f"[{n}/{len(args.variants)}] {name}: {base.epochs} x {base.steps_per_epoch} steps", flush=True)
            r = run_variant(VARIANTS[name], variant_config(base, VARIANTS[name]), work, args, phantoms)
            results["variants"][name] = r
            _print_progress(r, base, phantoms, len(args.variants) if n == 1 else 0)
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["phantoms_generated"] = phantoms.generated
    json_path, md_path = write_results(results, args.out)
    print()
    print(md_path.read_text(encoding="utf-8"))
    print(f"results in {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
