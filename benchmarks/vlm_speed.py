"""Speed of visual-token reduction in a LLaVA-shaped VLM on the CPU: time to first token, 32 new tokens, KV cache.

The model is a ``transformers.LlavaForConditionalGeneration`` built from configs with random weights (no download):
a CLIP ViT-L/14-336 vision tower (hidden 1024, 24 layers, 16 heads, patch 14, 336 px -> 576 patch tokens, features
of the second-to-last layer as LLaVA-1.5 reads them) and a language model shaped like Qwen2.5-0.5B's config (hidden
896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151936, tied embeddings). One image, a prompt of 576
``<image>`` placeholders between 8 and 16 text tokens, greedy ``generate()`` of exactly 32 new tokens (EOS off).

Each method of :mod:`tpsvit.vlm` is applied with ``tpsvit.vlm.patch(model, method, tokens=N)`` for N in 576, 288,
144, 64, 32 (576 = nothing removed: the patch's own overhead) and removed again with ``unpatch``; all configurations
and the unpatched model run interleaved in every round (the same model object, the same input), and each number is
the median over rounds. Per configuration, from hooks on the model's own modules within one ``generate`` call:

* ``ttft``: time to first token (start of ``generate`` -> end of the language model's first forward; includes the
  vision tower, the reduction, the projector and the LM prefill), and its parts ``vision`` (tower) and ``lm_prefill``;
* ``gen32``: the whole ``generate`` of 32 new tokens, and ``decode``: its part after the first token, per token;
* ``kv``: bytes of the KV cache after the prefill (keys and values of every layer);
* ``reduction``: the time spent in tpsvit's selection (scores, top-k, squeeze / merge) as a share of ``ttft``;
* counted GMACs of the prefill forward (``torch.utils.flop_counter`` with eager attention; one method per N: the
  LM's shape depends on N only).

Targets: the LM prefill time falls at least 80% as fast as the sequence length (1 - t_N / t_full >= 0.8 x (1 - L_N /
L_full)), and the reduction costs under 5% of the time to first token.

    python benchmarks/vlm_speed.py --threads 1 [--rounds 3] [--json benchmarks/results/vlm_speed.json]
    python benchmarks/vlm_speed.py --quick      # tiny shapes, seconds

The full form takes about 40 minutes on one thread of this project's 2-core CPU (about 3.3 GB of fp32 weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

import tpsvit.vlm as vlm
from tpsvit.measure.bench import environment, format_environment
from tpsvit.measure.evaluation import format_table, write_json

FULL_TOKENS = (576, 288, 144, 64, 32)
TARGET_OF_LENGTH = 0.80
TARGET_REDUCTION_SHARE = 0.05
TEXT_BEFORE, TEXT_AFTER = 8, 16


@dataclass(frozen=True)
class Shape:
    """The sizes of the benchmark's model."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    image: int = 336
    patch: int = 14
    hidden: int = 896
    layers: int = 24
    heads: int = 14
    kv_heads: int = 2
    intermediate: int = 4864
    vocab: int = 151936

    @property
    def visual_tokens(self) -> int:
        return (self.image // self.patch) ** 2


QUICK = Shape(vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128, image=56, patch=8, hidden=64,
              layers=2, heads=2, kv_heads=1, intermediate=128, vocab=1000)
QUICK_TOKENS = (49, 24, 12)


def build_model(shape: Shape, seed: int = 0):
    """The LLaVA-shaped model, random weights, eval mode, EOS off (every generate runs to max_new_tokens)."""
    import transformers as t

    vision = t.CLIPVisionConfig(hidden_size=shape.vision_hidden, num_hidden_layers=shape.vision_layers,
                                num_attention_heads=shape.vision_heads, intermediate_size=shape.vision_intermediate,
                                image_size=shape.image, patch_size=shape.patch, projection_dim=768,
                                hidden_act="quick_gelu")
    text = t.Qwen2Config(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                         vocab_size=shape.vocab, tie_word_embeddings=True, rope_theta=1_000_000.0,
                         max_position_embeddings=32768)
    config = t.LlavaConfig(vision_config=vision, text_config=text, image_token_id=shape.vocab - 1,
                           image_seq_length=shape.visual_tokens, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = t.LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt(shape: Shape, seed: int = 0) -> dict:
    """input_ids (1, 8 + 576 + 16) with the image placeholders, and one random image."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, shape.vocab - 1, (TEXT_BEFORE + TEXT_AFTER,), generator=gen)
    image = torch.full((shape.visual_tokens,), shape.vocab - 1)
    ids = torch.cat([text[:TEXT_BEFORE], image, text[TEXT_BEFORE:]])[None]
    pixels = torch.randn(1, 3, shape.image, shape.image, generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a transformers cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
                   if t is not None)
    return sum(t.numel() * t.element_size() for t in [*cache.key_cache, *cache.value_cache])


class Probe:
    """Forward hooks that timestamp the vision tower and every language-model forward of one ``generate``."""

    def __init__(self, model):
        self.marks: dict[str, float] = {}
        self.lm_ends: list[float] = []
        self.lm_start = None
        self.kv = None
        self.seq = None
        inner = model.model
        self.handles = [
            inner.vision_tower.register_forward_pre_hook(lambda *_: self._mark("vision_start")),
            inner.vision_tower.register_forward_hook(lambda *_: self._mark("vision_end")),
            inner.language_model.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
            inner.language_model.register_forward_hook(self._lm_post, with_kwargs=True),
        ]

    def _mark(self, name):
        self.marks.setdefault(name, time.perf_counter())

    def _lm_pre(self, module, args, kwargs):
        if self.lm_start is None:
            self.lm_start = time.perf_counter()
            embeds = kwargs.get("inputs_embeds")
            self.seq = None if embeds is None else embeds.shape[1]

    def _lm_post(self, module, args, kwargs, output):
        self.lm_ends.append(time.perf_counter())
        if self.kv is None:
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            self.kv = None if cache is None else kv_bytes(cache)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@contextmanager
def reduction_timer():
    """Accumulate the wall time spent in tpsvit.vlm's token selection (wherever a tpsvit.vlm module calls it)."""
    spent = [0.0]
    try:
        from tpsvit.vlm.methods import base
    except ImportError:
        yield spent
        return
    original = base.select

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    owners = [m for name, m in list(sys.modules.items())
              if name.startswith("tpsvit.vlm") and getattr(m, "select", None) is original]
    for module in owners:
        module.select = timed
    try:
        yield spent
    finally:
        for module in owners:
            module.select = original


def measure(model, inputs: dict, new_tokens: int) -> dict:
    """One greedy generate of ``new_tokens`` tokens, timed by a :class:`Probe` (milliseconds, bytes)."""
    probe = Probe(model)
    try:
        with torch.inference_mode(), reduction_timer() as spent:
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            end = time.perf_counter()
    finally:
        probe.remove()
    if out.shape[1] - inputs["input_ids"].shape[1] != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not {new_tokens}")
    first = probe.lm_ends[0]
    ms = 1e3
    return {
        "ttft_ms": (first - start) * ms, "vision_ms": (probe.marks["vision_end"] - probe.marks["vision_start"]) * ms,
        "lm_prefill_ms": (first - probe.lm_start) * ms, "gen_ms": (end - start) * ms,
        "decode_ms_per_token": (end - first) * ms / max(1, new_tokens - 1), "reduction_ms": spent[0] * ms,
        "kv_bytes": probe.kv, "seq_len": probe.seq,
    }


def counted_prefill_gmacs(model, inputs: dict) -> float:
    """GMACs of one prefill forward (logits of the last position only, as generate computes them), counted with
    eager attention: torch's flop counter does not see the CPU SDPA kernel, and eager attention's matmuls are the
    full L x L score matrix (no causal saving)."""
    from torch.utils.flop_counter import FlopCounterMode

    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(**inputs, logits_to_keep=1)
    finally:
        model.set_attn_implementation(before)
    return counter.get_total_flops() / 2e9


def reduced(model, method: str, tokens: int):
    """``model`` with ``method`` at ``tokens`` visual tokens inside the block ("unpatched": as it is)."""
    return nullcontext(model) if method == "unpatched" else vlm.reduced(model, method, tokens=tokens)


def configurations(methods, tokens) -> list[tuple[str, int]]:
    """(method, N) in timing order: the unpatched model first, then every method at every N."""
    return [("unpatched", tokens[0])] + [(m, n) for m in methods for n in tokens]


def time_rounds(model, inputs, configs, rounds: int, new_tokens: int, log=print) -> dict:
    """Per configuration, the list of per-round measurements; every round runs every configuration once."""
    results = {c: [] for c in configs}
    for r in range(rounds):
        for method, n in configs:
            with reduced(model, method, n):
                results[(method, n)].append(measure(model, inputs, new_tokens))
            row = results[(method, n)][-1]
            log(f"round {r + 1}/{rounds} {method:>9} N={n:<4} ttft {row['ttft_ms']:8.1f} ms  gen {row['gen_ms']:8.1f}"
                f" ms  reduction {row['reduction_ms']:6.2f} ms  seq {row['seq_len']}")
    return results


def summarize(results: dict, gmacs: dict, full: int) -> list[dict]:
    """Median over rounds per configuration, with ratios against the unpatched model of the same run."""
    keys = ("ttft_ms", "vision_ms", "lm_prefill_ms", "gen_ms", "decode_ms_per_token", "reduction_ms")
    base_key = ("unpatched", full)
    medians = {c: {k: statistics.median(r[k] for r in rows) for k in keys} for c, rows in results.items()}
    base = medians[base_key]
    base_seq = results[base_key][0]["seq_len"]
    out = []
    for (method, n), med in medians.items():
        first = results[(method, n)][0]
        seq = first["seq_len"]
        length_cut = 1 - seq / base_seq
        prefill_cut = 1 - med["lm_prefill_ms"] / base["lm_prefill_ms"]
        ttft_cut = 1 - med["ttft_ms"] / base["ttft_ms"]
        out.append({
            "method": method, "tokens": n, "seq_len": seq, **med, "kv_bytes": first["kv_bytes"],
            "kv_ratio": first["kv_bytes"] / results[base_key][0]["kv_bytes"], "gmacs": gmacs.get(n),
            "lm_prefill_speedup": base["lm_prefill_ms"] / med["lm_prefill_ms"],
            "ttft_speedup": base["ttft_ms"] / med["ttft_ms"], "gen_speedup": base["gen_ms"] / med["gen_ms"],
            "length_cut": length_cut, "lm_prefill_cut": prefill_cut, "ttft_cut": ttft_cut,
            "prefill_cut_of_length_cut": prefill_cut / length_cut if length_cut > 0 else None,
            "reduction_share": med["reduction_ms"] / med["ttft_ms"],
            "ttft_ms_per_round": [r["ttft_ms"] for r in results[(method, n)]],
        })
    return out


def targets(rows: list[dict]) -> list[dict]:
    """The two targets for every patched row that removes tokens."""
    found = []
    for row in rows:
        if row["method"] == "unpatched":
            continue
        if row["length_cut"] > 0:
            value = row["prefill_cut_of_length_cut"]
            found.append({"target": f"{row['method']} N={row['tokens']}: LM prefill falls >= {TARGET_OF_LENGTH:.0%} "
                                    "as fast as the sequence length", "value": value,
                          "met": value >= TARGET_OF_LENGTH})
        found.append({"target": f"{row['method']} N={row['tokens']}: reduction < {TARGET_REDUCTION_SHARE:.0%} of the "
                                "time to first token", "value": row["reduction_share"],
                      "met": row["reduction_share"] < TARGET_REDUCTION_SHARE})
    return found


COLUMNS = [
    ("method", "method", ""), ("tokens", "N", ""), ("seq_len", "LM seq", ""), ("gmacs", "GMACs", ".4g"),
    ("ttft_ms", "TTFT ms", ".0f"), ("vision_ms", "tower ms", ".0f"), ("lm_prefill_ms", "LM prefill ms", ".0f"),
    ("lm_prefill_speedup", "prefill x", ".2f"), ("prefill_cut_of_length_cut", "cut/len cut", ".2f"),
    ("gen_ms", "gen ms", ".0f"), ("decode_ms_per_token", "ms/tok", ".1f"), ("kv_mib", "KV MiB", ".2f"),
    ("reduction_ms", "reduce ms", ".2f"), ("reduction_pct", "reduce %", ".2f"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, nargs="+", help=f"visual tokens kept (default {FULL_TOKENS})")
    parser.add_argument("--methods", nargs="+", help="tpsvit.vlm methods (default: all)")
    parser.add_argument("--vocab", type=int, default=Shape.vocab, help="LM vocabulary (default Qwen2.5's 151936)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 round, 4 new tokens: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="save the table, the targets and the settings as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else Shape(vocab=args.vocab)
    tokens = tuple(args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS))
    if args.quick:
        args.rounds, args.new_tokens = 1, 4
    if tokens[0] != shape.visual_tokens:
        tokens = (shape.visual_tokens, *[n for n in tokens if n != shape.visual_tokens])
    methods = tuple(args.methods or vlm.METHODS)
    unknown = [m for m in methods if m not in vlm.METHODS]
    if unknown:
        parser.error(f"methods {unknown} are not in tpsvit.vlm; available: {', '.join(vlm.METHODS)}")
    env = environment("cpu")
    import transformers

    env["transformers"] = transformers.__version__
    print(format_environment(env) + f", transformers {env['transformers']}")
    print(f"model: {asdict(shape)}; visual tokens {shape.visual_tokens}; methods {', '.join(methods) or 'none'}")
    model = build_model(shape)
    inputs = prompt(shape)
    configs = configurations(methods, tokens)
    gmacs = {}
    for n in tokens:  # the LM's work depends on N only; counted once per N (the first method, or unpatched)
        method = methods[0] if methods and n != shape.visual_tokens else "unpatched"
        with reduced(model, method, n):
            gmacs[n] = counted_prefill_gmacs(model, inputs)
    measure(model, inputs, 2)  # warm-up, untimed
    results = time_rounds(model, inputs, configs, args.rounds, args.new_tokens)
    rows = summarize(results, gmacs, shape.visual_tokens)
    for row in rows:
        row["kv_mib"] = row["kv_bytes"] / 2**20
        row["reduction_pct"] = 100 * row["reduction_share"]
    print(format_table(rows, COLUMNS))
    checks = targets(rows)
    if args.quick:
        print("(--quick: tiny shapes, a millisecond per step; the targets below say nothing at this size)")
    for check in checks:
        print(f"{'met' if check['met'] else 'MISSED':>6}  {check['target']}: {check['value']:.3f}")
    if args.json:
        write_json({"environment": env, "shape": asdict(shape), "tokens": list(tokens), "methods": list(methods),
                    "rounds": args.rounds, "new_tokens": args.new_tokens, "rows": rows, "targets": checks,
                    "gmacs_note": f"counted for {methods[0] if methods else 'unpatched'} at each N"}, args.json)
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
