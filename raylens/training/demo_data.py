"""A small fine-tuning data set for the demo model: "What shape is this?" answered with the shape alone.

Why: the shipped demo model only ever says "a {color} {shape} on a {background} background."; asked
anything, it answers with a caption. Answering "a circle" (the shape, nothing else) is a task it cannot do, so this
data set shows (in the README and in tests) that fine-tuning teaches it something, with numbers: exact-match
accuracy on held-out images before (near 0) and after.

Writes, under OUT:
    images/train/*.png, images/held_out/*.png   shapes images ("train" and "held_out" splits: never the same)
    train.jsonl     LLaVA records: {"id", "image": "images/train/....png", "conversations": [human, gpt]}
    held_out.jsonl  a jobs.caption manifest: {"image", "question", "answer"} (run with --question-column question)

CLI:  python -m raylens.training.demo_data OUT --train 256 --held-out 64 --seed 0
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from raylens.demo import shapes

QUESTION = "What shape is this?"


def answer_for(attrs: shapes.ShapeAttributes) -> str:
    """"a circle": the shape alone, a form the demo model never produces (its answers always name a colour
    and a background). Its words are tokens it knows (" circle"), so a short LoRA run can learn it."""
    return f"a {attrs.shape}"


def write_shape_questions(out_dir, *, train: int = 256, held_out: int = 64, seed: int = 0,
                          question: str = QUESTION) -> dict[str, Path]:
    """Write the data set (see the module docstring); returns the paths of train.jsonl and held_out.jsonl."""
    out = Path(out_dir)
    written = {}
    for split, count, name in (("train", train, "train.jsonl"), ("held_out", held_out, "held_out.jsonl")):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (image, _, attrs) in enumerate(shapes.generate_dataset(count, seed, split=split)):
            relative = f"images/{split}/{i:05d}.png"
            image.save(out / relative)
            if split == "train":
                rows.append({"id": f"shape-{i:05d}", "image": relative, "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer_for(attrs)}]})
            else:
                rows.append({"image": relative, "question": question, "answer": answer_for(attrs)})
        path = out / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        written[split] = path
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m raylens.training.demo_data",
                                     description="Write the demo fine-tuning data set (shape questions).")
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=256, help="training records (default: %(default)s)")
    parser.add_argument("--held-out", type=int, default=64, help="held-out manifest rows (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both splits (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = write_shape_questions(args.out_dir, train=args.train, held_out=args.held_out, seed=args.seed)
    print(f"wrote {paths['train']} ({args.train} records) and {paths['held_out']} ({args.held_out} rows)")


if __name__ == "__main__":
    main()
