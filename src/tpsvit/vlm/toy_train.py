"""Train the toy VLM (:mod:`tpsvit.vlm.toy`) on a CPU: frozen mini-DeiT tower, projector and tiny LM learn to answer.

Resumable: every ``--save-every`` steps the projector, LM, optimizer and step go to ``OUT/checkpoint.pt`` atomically
(:func:`tpsvit.io.atomic.atomic_write`); a rerun with the same ``--out`` continues from there and replays the same
batches (batch ``s`` is drawn from a generator seeded with ``seed * 1_000_003 + s``). The finished model is
``OUT/toy_vlm_seed{seed}.safetensors`` (fp16 learned weights, a few MB; the tower is the shipped mini-DeiT).

    python -m tpsvit.vlm.toy_train --seed 0 --out runs/toy-vlm --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tpsvit.errors import CheckpointError, InvalidArgumentError
from tpsvit.io.atomic import atomic_write
from tpsvit.vlm import toy


@dataclass(frozen=True)
class ToyRecipe:
    """The one recipe every toy VLM is trained with (only ``seed`` differs between the shipped two)."""

    steps: int = 2000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


LM = toy.ToyLMConfig()
RECIPE = ToyRecipe()


def learning_rate(recipe: ToyRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to zero at ``recipe.steps``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sequence_and_labels(batch: toy.QABatch, tok: toy.ToyTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + answer + ``<eos>``, and LM labels that score only the answer word and ``<eos>``."""
    eos = torch.full((len(batch.answers), 1), tok.eos_id)
    ids = torch.cat([batch.input_ids, batch.answers[:, None], eos], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return ids, labels


def _checkpoint(model, optimizer, step: int, recipe: ToyRecipe, lm: toy.ToyLMConfig) -> dict:
    return {"model": toy.trainable_state(model), "optimizer": optimizer.state_dict(), "step": step,
            "recipe": asdict(recipe), "lm": asdict(lm)}


def train(out: str | Path, recipe: ToyRecipe = RECIPE, lm: toy.ToyLMConfig = LM,
          save_every: int = 100, log_every: int = 50, log=print, data=None) -> Path:
    """Train (or resume) one toy VLM into ``out``; returns the path of the finished safetensors file.

    ``data``: (garments, classes) to train on instead of the Fashion-MNIST training split (tests).
    """
    if recipe.steps < 1 or recipe.batch < 1:
        raise InvalidArgumentError(f"steps and batch must be positive, got {recipe.steps} and {recipe.batch}")
    out = Path(out)
    final = out / f"toy_vlm_seed{recipe.seed}.safetensors"
    state_path = out / "checkpoint.pt"
    tok = toy.ToyTokenizer()
    model = toy.build_toy_vlm(lm, seed=recipe.seed, tokenizer=tok)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    start = 0
    if state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        if saved["recipe"] != asdict(recipe) or saved["lm"] != asdict(lm):
            raise CheckpointError(f"{state_path} was trained with recipe {saved['recipe']} and LM {saved['lm']}, "
                                  f"not {asdict(recipe)} / {asdict(lm)}; use another --out")
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["step"]
        log(f"resumed from {state_path} at step {start}")
    garments, classes = data if data is not None else toy.training_split()
    model.train()
    model.model.vision_tower.eval()  # frozen: no dropout, no statistics
    seen, running, t0 = 0, 0.0, time.perf_counter()
    for step in range(start, recipe.steps):
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        batch = toy.training_batch(garments, classes, recipe.batch, gen, tok)
        ids, labels = sequence_and_labels(batch, tok)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        loss = model(input_ids=ids, pixel_values=batch.pixel_values, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running, seen = running + loss.item(), seen + 1
        done = step + 1
        if done % log_every == 0 or done == recipe.steps:
            log(json.dumps({"step": done, "loss": round(running / seen, 4), "lr": round(learning_rate(recipe, step), 6),
                            "s_per_step": round((time.perf_counter() - t0) / seen, 3)}))
            running, seen, t0 = 0.0, 0, time.perf_counter()
        if done % save_every == 0 or done == recipe.steps:
            payload = _checkpoint(model, optimizer, done, recipe, lm)
            atomic_write(state_path, lambda tmp, p=payload: torch.save(p, tmp))
    model.eval()
    return toy.save_toy_vlm(model, final, lm, {"seed": recipe.seed, "steps": recipe.steps})


def main(argv=None) -> None:
    """``python -m tpsvit.vlm.toy_train``: train (or resume) one toy VLM."""
    defaults = ToyRecipe()
    parser = argparse.ArgumentParser(prog="python -m tpsvit.vlm.toy_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt and the finished model")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = ToyRecipe(steps=args.steps, batch=args.batch, seed=args.seed)
    path = train(args.out, recipe, save_every=args.save_every, log=lambda m: print(m, flush=True))
    print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main()
