#!/usr/bin/env python
"""End-to-end preference training step: TRL's DPOTrainer default path vs with our kernels.

    python benchmarks/e2e_step.py                          # sizes for this device, both variants
    python benchmarks/e2e_step.py --csv e2e.csv --steps 8

A random Qwen2-style model (GPU: the Qwen2.5-0.5B shape, ~0.5B parameters, bf16, vocabulary
151936; CPU: 2 layers, D=256, V=32000, fp32) is trained with ``DPOTrainer`` (``loss_type=
"apo_zero"``, a reference model copy) on synthetic preference pairs whose chosen and rejected
answers differ in a few words (CLAIR-like). Variants, each in its own subprocess:

- ``trl``: TRL 1.16's default path (its fused LM head: ``ChunkedLogProbFunction``);
- ``apo``: the same after ``apo_kernels.integrations.trl.enable()`` (skipped, with the reason
  printed, when that integration is not importable).

Reported per variant: tokens per second over the timed steps (all prompt + completion tokens of
chosen and rejected sequences, after warm-up steps), median step time, peak memory (CUDA: max
allocated; CPU: peak resident set after the warm-up), and the first and last steps' losses
(both variants see the same model and data, so they must agree to about 1e-3; at the first step
the policy equals the reference and APO-zero's loss is exactly 1).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("trl", "apo")
GPU_CONFIG = dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                  prompt=128, completion=384, pairs=8, dtype="bfloat16")
CPU_CONFIG = dict(vocab=32000, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512,
                  prompt=32, completion=96, pairs=4, dtype="float32")


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = {tok: i for i, tok in enumerate(specials)}
    words.update({f"w{i}": i + len(specials) for i in range(vocab - len(specials))})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _dataset(cfg: dict, rows: int, seed: int):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    n_words = cfg["vocab"] - 4

    def words(k: int) -> list[str]:
        return [f"w{rng.randrange(n_words)}" for _ in range(k)]

    data = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(rows):
        rejected = words(cfg["completion"] - 1)
        chosen = list(rejected)
        for i in rng.sample(range(len(chosen)), k=max(1, len(chosen) // 20)):  # a minimal revision
            chosen[i] = f"w{rng.randrange(n_words)}"
        data["prompt"].append(" ".join(words(cfg["prompt"])) + " ")
        data["chosen"].append(" ".join(chosen))
        data["rejected"].append(" ".join(rejected))
    return Dataset.from_dict(data)


def _rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(variant: str, cfg: dict, steps: int, warmup: int, seed: int) -> dict:
    """Train ``steps`` steps in this process and return the measurements."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if variant == "apo":
        try:
            from apo_kernels.integrations.trl import enable
        except ImportError as exc:
            return {"variant": variant, "status": "skipped",
                    "error": f"apo_kernels.integrations.trl.enable is not importable: {exc}"}
        enable()
    cuda = torch.cuda.is_available()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["intermediate"],
                         tie_word_embeddings=True, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = Qwen2ForCausalLM(config).to(getattr(torch, cfg["dtype"]))
    if cuda:
        model = model.cuda()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # TRL would reload it by name
    tokens_per_step = 2 * cfg["pairs"] * (cfg["prompt"] + cfg["completion"])

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == warmup:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                else:
                    _rss_reset()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=cfg["pairs"], max_steps=steps,
                         learning_rate=1e-6, logging_steps=1, report_to="none", save_strategy="no",
                         loss_type="apo_zero", beta=0.1, max_length=None, seed=seed,
                         bf16=cfg["dtype"] == "bfloat16", use_cpu=not cuda, dataloader_num_workers=0,
                         disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=_tokenizer(cfg["vocab"]),
                             train_dataset=_dataset(cfg, rows=cfg["pairs"] * steps, seed=seed),
                             callbacks=[clock])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = clock.times[warmup:]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mib("VmHWM")
    step_s = statistics.median(timed)
    return {"variant": variant, "status": "ok", "error": "",
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "tokens_per_step": tokens_per_step, "timed_steps": len(timed),
            "median_step_s": step_s, "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
            "peak_mem_mib": peak, "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, **cfg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=None, help="default: 8 on GPU, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="JSON overriding model/data sizes")
    parser.add_argument("--csv", default=None, help="write the rows here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one variant, in this process
        job = json.loads(args.worker)
        print("@@E2E " + json.dumps(run_variant(**job)), flush=True)
        return 0

    import torch

    cfg = dict(GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG)
    cfg.update(json.loads(args.config) if args.config else {})
    steps = args.steps or (8 if torch.cuda.is_available() else 5)
    rows = []
    for variant in args.variants:
        job = json.dumps(dict(variant=variant, cfg=cfg, steps=steps, warmup=args.warmup, seed=args.seed))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", job],
                              capture_output=True, text=True, env=env)
        found = [ln[6:] for ln in proc.stdout.splitlines() if ln.startswith("@@E2E ")]
        if found:
            row = json.loads(found[-1])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            row = {"variant": variant, "status": "error", "error": tail[:300]}
        rows.append(row)
        if row["status"] == "ok":
            print(f"{variant:4s}: {row['tokens_per_s']:10.1f} tokens/s, step {row['median_step_s'] * 1e3:8.1f} ms, "
                  f"peak {row['peak_mem_mib']:9.1f} MiB, first loss {row['first_loss']:.5f} "
                  f"({row['params_m']:.1f}M params, {row['tokens_per_step']} tokens/step)", flush=True)
        else:
            print(f"{variant:4s}: {row['status']}: {row['error']}", flush=True)
    ok = {r["variant"]: r for r in rows if r["status"] == "ok"}
    if len(ok) == 2:
        a, t = ok["apo"], ok["trl"]
        print(f"apo vs trl: {a['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, "
              f"{a['peak_mem_mib'] / t['peak_mem_mib']:.2f}x peak memory, "
              f"loss difference first step {abs(a['first_loss'] - t['first_loss']):.2e}, "
              f"last step {abs(a['last_loss'] - t['last_loss']):.2e}")
    if args.csv:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
