"""Open-vocabulary generalisation on synthetic data: AP on colour x shape compositions never seen in training.

The synthetic classes are compositions ("红色圆形" = red circle). A Latin-square split holds out one
shape per colour (colour i loses shape (i + offset) mod S), so every colour and every shape occurs in
training but the held-out compositions never do: not as boxes, and not as text either (the training
annotation file lists only the seen categories, so the held-out names are never even negative
prompts). The small open-vocabulary model of ``synth_nano`` (text tower trained from scratch, one
token per character) is trained through ``wedetect.train.Trainer``; at each checkpoint it is
prompted with ALL class names at once on a validation split drawing every class, and COCO AP / AP50
are computed by ``wedetect.eval.detection.evaluate_coco`` separately on the seen and unseen classes.

    python3 benchmarks/open_vocab_synth.py --iters 3000 --output-dir runs/open_vocab_synth

Writes ``results.json`` (per-evaluation seen/unseen/all AP and per-class AP50) to the output folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wedetect.data.synth import SynthConfig, class_list, class_names, make_dataset
from wedetect.eval.detection import evaluate_coco
from wedetect.train.config import load_config
from wedetect.train.dataset import load_coco
from wedetect.train.loop import Trainer, predict_coco


def latin_split(colors: list[str], shapes: list[str], offset: int = 0) -> set[tuple[str, str]]:
    """Held-out (colour, shape) pairs: colour i loses shape (i + offset) mod S. With as many colours as
    shapes every shape is held out exactly once; every colour and shape stays in training if S >= 2."""
    return {(c, shapes[(i + offset) % len(shapes)]) for i, c in enumerate(colors)}


def make_tokenizer(path: Path, texts: list[str]) -> Path:
    """XLM-R special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3) and one token per character, so a
    composition's tokens are those of its colour and its shape."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted({ch for t in texts for ch in t}))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path))
    return path


def seen_only_train_file(train_ann: Path, seen_ids: set[int], out: Path) -> Path:
    """The train annotation file with the held-out categories removed (they have no boxes there)."""
    data = json.loads(train_ann.read_text(encoding="utf-8"))
    assert all(a["category_id"] in seen_ids for a in data["annotations"]), "held-out class drawn in train split"
    data["categories"] = [c for c in data["categories"] if c["id"] in seen_ids]
    out.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def subset_ap(gt: dict, rows: list[dict], cat_ids: set[int]) -> dict[str, float]:
    """COCO AP / AP50 over the given categories only (ground truth and detections both restricted)."""
    sub = {**gt, "categories": [c for c in gt["categories"] if c["id"] in cat_ids],
           "annotations": [a for a in gt["annotations"] if a["category_id"] in cat_ids]}
    kept = [r for r in rows if r["category_id"] in cat_ids]
    if not kept:
        return {"AP": 0.0, "AP50": 0.0, "detections": 0}
    m = evaluate_coco(sub, kept)
    return {"AP": m.stats["mAP"], "AP50": m.stats["mAP_50"], "detections": len(kept)}


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two COCO xywh boxes."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def top1_labels(gt: dict, rows: list[dict], cat_ids: set[int], names: dict[int, str]) -> dict:
    """For each ground-truth box of the given classes, the label of the highest-scoring detection
    overlapping it (IoU >= 0.5) among all prompts: accuracy and what the misses were called.

    Per-class AP only ranks detections of one class against each other; this says whether a held-out
    composition wins against its seen neighbours (same colour or same shape) on the same box."""
    by_image: dict[int, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    correct, total, confusion = 0, 0, {}
    for a in gt["annotations"]:
        if a["category_id"] not in cat_ids:
            continue
        total += 1
        hits = [r for r in by_image.get(a["image_id"], []) if _iou(r["bbox"], a["bbox"]) >= 0.5]
        pred = max(hits, key=lambda r: r["score"])["category_id"] if hits else None
        correct += pred == a["category_id"]
        if pred != a["category_id"]:
            row = confusion.setdefault(names[a["category_id"]], {})
            key = names[pred] if pred is not None else "(no box)"
            row[key] = row.get(key, 0) + 1
    return {"accuracy": correct / max(total, 1), "boxes": total, "errors": confusion}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", type=Path, default=Path("runs/open_vocab_synth"))
    ap.add_argument("--iters", type=int, default=3000, help="training iterations (batch 8)")
    ap.add_argument("--eval-every", type=int, default=500, help="iterations between seen/unseen evaluations")
    ap.add_argument("--colors", default="red,green,blue,yellow")
    ap.add_argument("--shapes", default="circle,square,triangle,star")
    ap.add_argument("--offset", type=int, default=0, help="Latin-square shift of the held-out shapes")
    ap.add_argument("--train", type=int, default=800, help="training images")
    ap.add_argument("--val", type=int, default=160, help="validation images (all classes)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.004)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    colors, shapes = args.colors.split(","), args.shapes.split(",")
    held_out = latin_split(colors, shapes, args.offset)
    pairs = [(c, s) for c in colors for s in shapes]
    seen_pairs = tuple(p for p in pairs if p not in held_out)
    synth = SynthConfig(num_train=args.train, num_val=args.val, image_size=args.size, min_object_size=args.size // 6,
                        max_object_size=args.size // 2, max_objects=3, colors=tuple(colors), shapes=tuple(shapes),
                        seed=args.seed + 11, train_pairs=seen_pairs)
    out = args.output_dir
    data_dir = out / "data"
    paths = make_dataset(synth, data_dir, progress=False)
    names = class_names(synth)
    cat_id = {pair: k + 1 for k, pair in enumerate(class_list(synth))}  # make_dataset: category id = index + 1
    seen_ids = {cat_id[p] for p in seen_pairs}
    unseen_ids = {cat_id[p] for p in held_out}
    train_ann = seen_only_train_file(paths["train"], seen_ids, data_dir / "annotations" / "train_seen.json")
    seen_names_file = data_dir / "class_names_seen.json"
    seen_names_file.write_text(json.dumps([names[i - 1] for i in sorted(seen_ids)], ensure_ascii=False),
                               encoding="utf-8")
    tokenizer = make_tokenizer(out / "tokenizer.json", [n for syn in names for n in syn])

    iters_per_epoch = -(-args.train // 8)
    eval_epochs = max(1, round(args.eval_every / iters_per_epoch))
    epochs = max(1, round(args.iters / iters_per_epoch))
    cfg = load_config(
        "synth_nano", ["augment.scaling_ratio_range=[0.75, 1.25]"],
        **{"data.train_ann": str(train_ann), "data.train_images": str(data_dir / "train"),
           "data.classes_file": str(seen_names_file), "data.image_size": args.size, "tokenizer": str(tokenizer),
           "seed": args.seed, "device": "cpu", "augment.mosaic": False, "optim.lr": args.lr, "epochs": epochs,
           "keep_checkpoints": 1, "output": str(out / "run"), "log_interval": 100},
    )
    torch.manual_seed(args.seed)
    trainer = Trainer(cfg, progress=False)
    val = load_coco(paths["val"], data_dir / "val", names, min_size=1)
    print(f"classes: {len(pairs)} ({len(seen_ids)} seen, {len(unseen_ids)} held out: "
          f"{', '.join(names[cat_id[p] - 1][0] + f' ({p[0]} {p[1]})' for p in sorted(held_out))}); "
          f"{trainer.iters_per_epoch} iterations/epoch x {epochs} epochs", flush=True)

    evals = []
    train_seconds = 0.0
    while trainer.state.epoch < epochs:
        tick = time.time()
        trainer.fit(until_epoch=min(trainer.state.epoch + eval_epochs, epochs))
        train_seconds += time.time() - tick
        model = trainer.eval_model().eval()
        rows = predict_coco(model, val, trainer.device, trainer.tokenizer, batch_size=16)
        model.train()
        it = trainer.state.epoch * trainer.iters_per_epoch
        entry = {"iteration": it, "epoch": trainer.state.epoch, "train_seconds": round(train_seconds, 1),
                 "train_loss": trainer.history[-1].get("loss"),
                 "seen": subset_ap(val.raw, rows, seen_ids), "unseen": subset_ap(val.raw, rows, unseen_ids),
                 "all": subset_ap(val.raw, rows, seen_ids | unseen_ids)}
        id_names = {k: names[k - 1][0] for k in seen_ids | unseen_ids}
        entry["top1_seen"] = top1_labels(val.raw, rows, seen_ids, id_names)
        entry["top1_unseen"] = top1_labels(val.raw, rows, unseen_ids, id_names)
        entry["per_class_AP50"] = {names[k - 1][0]: round(subset_ap(val.raw, rows, {k})["AP50"], 4)
                                   for k in sorted(seen_ids | unseen_ids)}
        evals.append(entry)
        print(f"iter {it:5d} ({train_seconds:6.0f}s) loss {entry['train_loss']:.3f}  "
              f"seen AP50 {entry['seen']['AP50']:.3f} AP {entry['seen']['AP']:.3f}  "
              f"unseen AP50 {entry['unseen']['AP50']:.3f} AP {entry['unseen']['AP']:.3f}  top-1 label on GT boxes "
              f"seen {entry['top1_seen']['accuracy']:.3f} unseen {entry['top1_unseen']['accuracy']:.3f}", flush=True)

    wall = time.time() - t0
    final = evals[-1]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "setup": {"colors": colors, "shapes": shapes, "image_size": args.size, "train_images": args.train,
                  "val_images": args.val, "iterations": final["iteration"], "batch_size": cfg.batch_size,
                  "lr": args.lr, "seed": args.seed,
                  "seen": [names[k - 1][0] for k in sorted(seen_ids)],
                  "unseen": [names[k - 1][0] for k in sorted(unseen_ids)]},
        "evaluations": evals,
        "final": {k: final[k] for k in ("seen", "unseen", "all", "top1_seen", "top1_unseen")},
        "wall_seconds": round(wall, 1),
        "train_seconds": round(train_seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"\nfinal after {final['iteration']} iterations (wall {wall:.0f}s, training {train_seconds:.0f}s):")
    print(f"{'split':8} {'classes':>7} {'AP50':>7} {'AP':>7} {'top-1':>7}")
    for split, ids in (("seen", seen_ids), ("unseen", unseen_ids), ("all", seen_ids | unseen_ids)):
        top1 = f"{final['top1_' + split]['accuracy']:7.3f}" if split != "all" else f"{'':7}"
        print(f"{split:8} {len(ids):7d} {final[split]['AP50']:7.3f} {final[split]['AP']:7.3f} {top1}")
    print("held-out boxes given another label:", json.dumps(final["top1_unseen"]["errors"], ensure_ascii=False))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
