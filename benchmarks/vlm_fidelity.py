"""Fidelity of visual-token reduction in a VLM: answers and next-token distributions against the full model.

Toy form (default): the toy LLaVA of :mod:`tpsvit.vlm.toy` (the shipped cluttered mini-DeiT as a frozen tower, a tiny
Llama LM) trained with two seeds by ``python -m tpsvit.vlm.toy_train``. Every one of the 10,000 fixed cluttered test
canvases gets one question, the kind cycling garment / side / height with the image index (3,334 / 3,333 / 3,333).
Each method of :mod:`tpsvit.vlm` keeps N = 37, 25, 12, 5 of the 49 visual tokens (~75/50/25/11%; ``prumerge`` picks
its own count, N is its cap; ``pool`` the largest a x b grid with a * b <= N: 36 for 37). Per seed and
configuration: answer accuracy (the first generated token is the answer word), per question kind, first-token
agreement with the full model and KL(full || reduced) of the first token's distribution; tps and visionzip also with
``positions="compact"`` (the shortened sequence renumbered, as VisionZip's release does) at N = 12 and 5. The two
seeds are the toy VLM's training seeds; ``random`` draws its tokens from torch's global generator seeded with the
same number before each configuration.

    python benchmarks/vlm_fidelity.py --threads 1 --json benchmarks/results/vlm_fidelity.json \
        --plot docs/images/vlm_fidelity.png

With ``--model ORG/NAME --images DIR`` (a VLM already in the Hugging Face cache, loaded offline, and a folder of
images): per image, the full model's next-token distribution after a fixed question against the reduced model's at
keep rates 0.75 / 0.5 / 0.25 / 0.11: first-token agreement and mean KL.

    python benchmarks/vlm_fidelity.py --model llava-hf/llava-1.5-7b-hf --images photos/ --limit 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tpsvit.vlm as vlm

KEEP_TOKENS = (37, 25, 12, 5)
KEEP_RATES = (0.75, 0.5, 0.25, 0.11)
SEEDS = (0, 1)
COMPACT, COMPACT_TOKENS = ("tps", "visionzip"), (12, 5)  # also run with the shortened sequence renumbered
QUESTION = "What is shown in this image?"


def first_token_logprobs(model, batches) -> tuple[torch.Tensor, list[int]]:
    """log-softmax of the next-token logits after each prompt (N, vocab), and the visual tokens the LM saw per
    prompt (``tpsvit.vlm.kept_counts`` when patched, else the prompt's placeholder count)."""
    out, counts = [], []
    with torch.inference_mode():
        for batch in batches:
            logits = model(**batch, logits_to_keep=1).logits[:, -1].float()
            out.append(F.log_softmax(logits, dim=-1))
            if vlm.is_patched(model):
                counts.extend(vlm.kept_counts(model))
            else:
                counts.extend(int(r.sum()) for r in batch["input_ids"] == _image_id(model))
    return torch.cat(out), counts


def _image_id(model) -> int:
    config = model.config
    return getattr(config, "image_token_id", None) or config.image_token_index


def compare(full: torch.Tensor, other: torch.Tensor) -> dict:
    """First-token agreement and mean KL(full || other) between two (N, vocab) log-prob tables."""
    agree = (full.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = (full.exp() * (full - other)).sum(-1).clamp_min(0).mean().item()
    return {"agreement": agree, "kl": kl}


# ----------------------------------------------------------------------------------------------------- toy form


def toy_batches(canvases, labels, tok, batch: int, limit: int | None):
    """The toy test prompts in batches (question kind = index mod 3) and the answer ids and kinds."""
    from tpsvit.vlm import toy

    n = len(canvases) if limit is None else min(limit, len(canvases))
    kinds = [toy.KINDS[i % len(toy.KINDS)] for i in range(n)]
    qa = toy.make_batch(canvases[:n], {k: v[:n] for k, v in labels.items()}, kinds, tok)
    batches = [{"input_ids": qa.input_ids[i:i + batch], "pixel_values": qa.pixel_values[i:i + batch]}
               for i in range(0, n, batch)]
    return batches, qa.answers, kinds


def toy_scores(logp: torch.Tensor, answers: torch.Tensor, kinds: list[str]) -> dict:
    """Answer accuracy overall and per question kind (%)."""
    right = logp.argmax(-1) == answers
    out = {"accuracy": 100 * right.float().mean().item()}
    for kind in dict.fromkeys(kinds):
        mask = torch.tensor([k == kind for k in kinds])
        out[f"acc_{kind}"] = 100 * right[mask].float().mean().item()
    return out


def toy_gmacs(model, batch) -> float:
    """Counted GMACs of one prompt's forward (tower, reduction, projector, LM; last-position logits)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] for k, v in batch.items()}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(**one, logits_to_keep=1)
    return counter.get_total_flops() / 2e9


def run_toy(args, log=print) -> dict:
    """Every (seed, method, N) of the toy form; results are saved after each one and reused on a rerun."""
    from tpsvit.vlm import toy

    methods = tuple(args.methods or vlm.METHODS)
    tok = toy.ToyTokenizer()
    canvases, labels = toy.test_split()
    batches, answers, kinds = toy_batches(canvases, labels, tok, args.batch, args.limit)
    done = _load_partial(args.json, {"tokens": list(args.tokens), "limit": args.limit})
    runs = done.get("runs", [])
    have = {(r["seed"], r["method"], r["tokens"]) for r in runs}
    for seed in args.seeds:
        model = toy.load_toy_vlm(_toy_path(args.toy_dir, seed))
        full, _ = first_token_logprobs(model, batches)
        full_gmacs = toy_gmacs(model, batches[0])
        if (seed, "full", 49) not in have:
            runs.append({"seed": seed, "method": "full", "tokens": 49, "mean_tokens": 49.0, "gmacs": full_gmacs,
                         **toy_scores(full, answers, kinds), **compare(full, full)})
        configs = [(m, n, "original") for m in methods for n in args.tokens]
        configs += [(m, n, "compact") for m in args.compact for n in args.compact_tokens]
        for method, n, positions in configs:
            label = method if positions == "original" else f"{method} compact"
            if (seed, label, n) in have:
                continue
            start = time.perf_counter()
            with vlm.reduced(model, method, tokens=grid_budget(n) if method == "pool" else n, positions=positions):
                gmacs = toy_gmacs(model, batches[0])
                torch.manual_seed(seed)  # the selection seed of random
                logp, counts = first_token_logprobs(model, batches)
            runs.append({"seed": seed, "method": label, "tokens": n, "positions": positions,
                         "mean_tokens": statistics.mean(counts), "gmacs": gmacs, **toy_scores(logp, answers, kinds),
                         **compare(full, logp)})
            row = runs[-1]
            log(f"seed {seed} {label:>17} N={n:<3} acc {row['accuracy']:6.2f}  agree {row['agreement']:.4f}  "
                f"KL {row['kl']:.4f}  ({time.perf_counter() - start:.0f} s)")
            _save(args.json, {"tokens": list(args.tokens), "limit": args.limit, "runs": runs})
    result = {"tokens": list(args.tokens), "limit": args.limit, "runs": runs, "table": toy_table(runs)}
    _save(args.json, result)
    return result


def grid_budget(n: int, side: int = 7) -> int:
    """pool's count for a budget of ``n`` on the toy's 7 x 7 grid: the largest a * b <= n (a, b <= 7)."""
    return max(a * b for a in range(1, side + 1) for b in range(1, side + 1) if a * b <= n)


def _toy_path(folder, seed: int) -> Path:
    from tpsvit.io.assets import ASSETS

    return Path(folder or ASSETS) / f"toy_vlm_seed{seed}.safetensors"


def toy_table(runs: list[dict]) -> list[dict]:
    """Mean over seeds (and each seed's value) per (method, N)."""
    keys = ("accuracy", "acc_garment", "acc_side", "acc_height", "agreement", "kl", "mean_tokens", "gmacs")
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["tokens"]), []).append(r)
    rows = []
    for (method, n), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        row = {"method": method, "tokens": n, "keep_pct": 100 * n / 49, "seeds": [r["seed"] for r in group]}
        for key in keys:
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
            row[f"{key}_per_seed"] = values
        rows.append(row)
    return sorted(rows, key=lambda r: (r["method"] != "full", -r["tokens"], r["method"]))


def _load_partial(path, settings: dict) -> dict:
    if not path or not Path(path).is_file():
        return {}
    saved = json.loads(Path(path).read_text())
    return saved if all(saved.get(k) == v for k, v in settings.items()) else {}


def _save(path, obj) -> None:
    if path:
        from tpsvit.io.atomic import atomic_write

        text = json.dumps(obj, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------------- HF form

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def hf_prompt(processor, question: str) -> str:
    """The processor's chat template around one image and ``question``, or LLaVA-1.5's plain USER/ASSISTANT form."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    token = getattr(processor, "image_token", "<image>")
    return f"USER: {token}\n{question} ASSISTANT:"


def load_hf(name: str):
    """(model, processor) of a VLM from the local Hugging Face cache or a folder; never downloads."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(name, local_files_only=True, dtype=torch.float32)
    except OSError as err:
        sys.exit(f"cannot load {name!r} offline (is it in the Hugging Face cache or a saved folder?): {err}")
    return model.eval(), processor


def hf_batches(processor, folder, question: str, limit: int | None) -> list[dict]:
    """One processed prompt per image of ``folder`` (sorted by name, at most ``limit``)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        sys.exit(f"--images {folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        sys.exit(f"--images {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
    text = hf_prompt(processor, question)
    batches = []
    for path in paths:
        with Image.open(path) as image:
            encoded = processor(images=image.convert("RGB"), text=text, return_tensors="pt")
        batches.append({k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)})
    return batches


def run_hf(args, log=print) -> dict:
    """Agreement and KL against the full model at each keep rate, per method, on the images of ``--images``."""
    methods = tuple(args.methods or vlm.METHODS)
    model, processor = load_hf(args.model)
    batches = hf_batches(processor, args.images, args.question, args.limit)
    full, counts = first_token_logprobs(model, batches)
    rows = [{"method": "full", "keep_rate": 1.0, "mean_tokens": statistics.mean(counts), **compare(full, full)}]
    for method in methods:
        for rate in args.keep_rates:
            with vlm.reduced(model, method, keep_rate=rate):
                torch.manual_seed(0)
                logp, counts = first_token_logprobs(model, batches)
            rows.append({"method": method, "keep_rate": rate, "mean_tokens": statistics.mean(counts),
                         **compare(full, logp)})
            log(f"{method:>9} keep {rate:<5} agree {rows[-1]['agreement']:.4f}  KL {rows[-1]['kl']:.4f}")
    result = {"model": args.model, "images": len(batches), "question": args.question, "table": rows}
    _save(args.json, result)
    return result


# ----------------------------------------------------------------------------------------------------- output

TOY_COLUMNS = [("method", "method", ""), ("tokens", "N", ""), ("keep_pct", "keep %", ".0f"),
               ("mean_tokens", "LM sees", ".1f"), ("gmacs", "MMACs", ".2f"), ("accuracy", "answer %", ".2f"),
               ("acc_seeds", "seed 0 / 1", ""), ("acc_garment", "garment %", ".2f"), ("acc_side", "side %", ".2f"),
               ("acc_height", "height %", ".2f"), ("agreement", "agree %", ".2f"), ("kl", "KL", ".4f")]
HF_COLUMNS = [("method", "method", ""), ("keep_rate", "keep", ".2f"), ("mean_tokens", "LM sees", ".1f"),
              ("agreement", "agree %", ".2f"), ("kl", "KL", ".4f")]


def print_toy(table: list[dict]) -> None:
    from tpsvit.measure.evaluation import format_table

    shown = [{**r, "gmacs": None if r["gmacs"] is None else r["gmacs"] * 1e3, "agreement": 100 * r["agreement"],
              "acc_seeds": " / ".join(f"{v:.2f}" for v in r["accuracy_per_seed"])} for r in table]
    print(format_table(shown, TOY_COLUMNS))


def plot_toy(table: list[dict], path) -> None:
    """Answer accuracy and first-token agreement against visual tokens kept, one line per method (seed range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    full = next(r for r in table if r["method"] == "full")
    for ax, key, title in ((axes[0], "accuracy", "answer accuracy %"), (axes[1], "agreement", "agreement with full %")):
        scale = 100 if key == "agreement" else 1
        ax.axhline(full[key] * scale, color="k", ls="--", lw=1, label="full (49 tokens)")
        for method in dict.fromkeys(r["method"] for r in table if r["method"] != "full"):
            rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["tokens"])
            x = [r["tokens"] for r in rows]
            mean = [r[key] * scale for r in rows]
            low = [min(r[f"{key}_per_seed"]) * scale for r in rows]
            high = [max(r[f"{key}_per_seed"]) * scale for r in rows]
            ax.plot(x, mean, marker="o", label=method)
            ax.fill_between(x, low, high, alpha=0.15)
        ax.set_xlabel("visual tokens kept (of 49)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("toy LLaVA on cluttered Fashion-MNIST (10,000 test canvases, 2 training seeds)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", help="tpsvit.vlm methods (default: all)")
    parser.add_argument("--json", metavar="PATH", help="save (and, in the toy form, resume) the results here")
    parser.add_argument("--limit", type=int, help="first N test canvases / images only (smoke runs)")
    parser.add_argument("--batch", type=int, default=500, help="toy prompts per forward")
    toy_args = parser.add_argument_group("toy form")
    toy_args.add_argument("--tokens", type=int, nargs="+", default=list(KEEP_TOKENS))
    toy_args.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds of the toy VLM")
    toy_args.add_argument("--toy-dir", help="folder of toy_vlm_seed{S}.safetensors (default: the shipped ones)")
    toy_args.add_argument("--plot", metavar="PNG", help="accuracy and agreement against tokens kept")
    toy_args.add_argument("--compact", nargs="*", default=list(COMPACT),
                          help="methods also run with positions='compact' (default: tps visionzip)")
    toy_args.add_argument("--compact-tokens", type=int, nargs="+", default=list(COMPACT_TOKENS))
    hf_args = parser.add_argument_group("cached Hugging Face VLM")
    hf_args.add_argument("--model", help="ORG/NAME in the Hugging Face cache, or a saved folder")
    hf_args.add_argument("--images", help="folder of images (with --model)")
    hf_args.add_argument("--keep-rates", type=float, nargs="+", default=list(KEEP_RATES))
    hf_args.add_argument("--question", default=QUESTION)
    args = parser.parse_args(argv)
    if (args.model is None) != (args.images is None):
        parser.error("--model and --images go together")
    torch.set_num_threads(args.threads)
    unknown = [m for m in [*(args.methods or ()), *args.compact] if m not in vlm.METHODS]
    if unknown:
        parser.error(f"methods {unknown} are not in tpsvit.vlm; available: {', '.join(vlm.METHODS)}")
    start = time.perf_counter()
    if args.model:
        result = run_hf(args)
        from tpsvit.measure.evaluation import format_table

        print(format_table([{**r, "agreement": 100 * r["agreement"]} for r in result["table"]], HF_COLUMNS))
    else:
        result = run_toy(args)
        print_toy(result["table"])
        if args.plot:
            plot_toy(result["table"], args.plot)
            print(f"saved {args.plot}")
    print(f"{time.perf_counter() - start:.0f} s on {torch.get_num_threads()} thread(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
