"""predict's accuracy on photographed pages: real MNIST test digits written onto synthetic pages
of each kind (`tests/photo_pages.py`: ruled, squared, margin, tilted, shadow, coloured, noisy,
notebook), read by a model trained on the packaged sample.

    python benchmarks/photo_pages.py --workdir=/tmp/photo_model [--digits=150] [--seed=7]
        [--epochs=8] [--photo_size=4032x3024]

The model is the one tests/test_predict_photos.py trains (the fast recipe with augmentation,
--epochs on the packaged sample), trained into --workdir unless a checkpoint is already there.
The digits are --digits of the sample's 1,000 test digits, drawn with --seed. The last line is
JSON: accuracy per kind, "overall" (the mean over the kinds) and "raw 28x28" (the digits as they
are). --photo_size=WxH enlarges each 640x480 page to that size first (bicubic), as a phone
photographs the same page (4032x3024: 12 megapixels). To measure another checkout's image
preparation with the same model, run this file with PYTHONPATH pointing at that checkout.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import photo_pages  # noqa: E402

from mnist_flax import checkpoints, configs, digit_images, input_pipeline, predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--digits", type=int, default=150)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=8, help="training epochs, if it trains")
    parser.add_argument("--photo_size", default="", help="WxH: each page enlarged to it first")
    args = parser.parse_args()
    size = tuple(int(n) for n in args.photo_size.split("x")) if args.photo_size else None
    if checkpoints.latest_step(args.workdir) is None:
        from mnist_flax import train

        config = configs.load(str(pathlib.Path(__file__).resolve().parent.parent
                                  / "experiments" / "fast.py"))
        config.update(data_source="sample", num_epochs=args.epochs, augment_max_shift=2.0,
                      augment_max_rotation=10.0)
        train.train_and_evaluate(config, args.workdir)
    dataset = input_pipeline.load_packaged_sample()
    index = np.random.default_rng(args.seed).permutation(len(dataset.test_labels))[:args.digits]
    digits, labels = dataset.test_images[index, ..., 0], dataset.test_labels[index]
    predict_fn = predict.load(args.workdir)
    accuracy = {"raw 28x28": float(np.mean(predict_fn(digits).argmax(1) == labels))}
    for kind in photo_pages.KINDS:
        images = [digit_images.preprocess(page.resize(size, Image.Resampling.BICUBIC) if size
                                          else page)
                  for page, _ in photo_pages.pages(digits, labels, kind, seed=args.seed)]
        accuracy[kind] = float(np.mean(predict_fn(np.stack(images)).argmax(1) == labels))
        print(f"{kind}: {accuracy[kind]:.1%}", file=sys.stderr, flush=True)
    accuracy["overall"] = float(np.mean([accuracy[kind] for kind in photo_pages.KINDS]))
    print(json.dumps({k: round(v, 4) for k, v in accuracy.items()}))


if __name__ == "__main__":
    main()
