"""Distil a timm student from teachers of your own on an image folder, with the Python API.

The folder holds one subfolder per class under ``train/`` and ``test/``::

    my_data/train/cat/0001.png  my_data/train/dog/...  my_data/test/cat/...  my_data/test/dog/...

The teachers are ``my_models:small_convnet`` (examples/my_models.py: any module of yours that your working
directory or an installed package provides works the same way); the toolkit trains them once (a natural
teacher and a SAT-robust one) and caches them. The student is a timm model. Then B-MTARD distils both teachers
into it, and the result is evaluated under PGD. Run from the repository root::

    python examples/distil_your_own.py --data-root my_data
    python examples/distil_your_own.py --demo-from data --data-root runs/demo-folder   # no folder yet: write
                                                                                       # one from CIFAR-10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bmtard_ray
from bmtard_ray.errors import BmtardError


def write_demo_folder(cifar_root: Path, out: Path, per_class: int, test_per_class: int) -> None:
    """An image folder of PNGs from CIFAR-10 (``<cifar_root>/cifar-10-batches-py``), as a user's data would be."""
    from PIL import Image

    from bmtard_ray.data import load_dataset

    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    train, test, _ = load_dataset("cifar10", cifar_root)
    for part, split, n in (("train", train, per_class), ("test", test, test_per_class)):
        for k, name in enumerate(classes):
            folder = out / part / name
            folder.mkdir(parents=True, exist_ok=True)
            rows = (split.labels == k).nonzero().flatten()[:n]
            for i in rows.tolist():
                Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="the image folder (train/<class>/..., test/<class>/...)")
    p.add_argument("--demo-from", metavar="CIFAR_ROOT", help="first write --data-root from CIFAR-10 under this folder")
    p.add_argument("--per-class", type=int, default=300, help="with --demo-from: training images per class")
    p.add_argument("--student", default="timm:resnet10t", help="any timm:<name> (default timm:resnet10t)")
    p.add_argument("--teacher", default="my_models:small_convnet", help="<module>:<callable> of both teachers")
    p.add_argument("--epochs", type=int, default=10, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--val-size", type=int, default=500, help="validation images carved from train/")
    p.add_argument("--output-dir", default="runs/examples")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny settings (tests): 64 test images, 2 attack steps")
    args = p.parse_args()

    if args.demo_from:
        write_demo_folder(Path(args.demo_from), Path(args.data_root), args.per_class, max(args.per_class // 5, 10))
    teacher = {"arch": args.teacher, "epochs": args.teacher_epochs, "batch_size": 64, "lr": 0.05}
    config = {
        "name": "own-models-and-data", "output_dir": args.output_dir, "device": args.device,
        "data": {"dataset": "imagefolder", "root": args.data_root, "val_size": args.val_size},
        "student": args.student, "method.name": "bmtard",
        "teachers": {"clean": {**teacher, "train_method": "natural"}, "robust": {**teacher, "train_method": "sat"}},
        "optim": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05, "milestones": [max(args.epochs - 2, 1)]},
        "val_examples": min(args.val_size, 500),
    }
    if args.quick:
        config.update({"attack.steps": 2, "eval": {"n_examples": 64, "batch_size": 64}, "val_examples": 64})
    try:
        result = bmtard_ray.train(config, preset="cpu")
        attacks = {"attacks": "clean,fgsm,pgd_sat", "n_examples": 64 if args.quick else None}
        report = bmtard_ray.evaluate(result, attacks, data_root=args.data_root, device=args.device)
    except BmtardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run folder: {result.run_dir}")
    print(f"student {args.student}: W-Robust (PGD) {report.w_robust['pgd_sat']:.2f} "
          f"(clean {report.accuracy['clean']:.2f}, robust {report.accuracy['pgd_sat']:.2f}) "
          f"on {report.n_examples} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
