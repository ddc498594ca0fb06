"""``apo-kernels train``: APO / DPO training of a Hugging Face causal LM with the fused loss.

With no arguments it trains a tiny model built in code on the preference pairs shipped with the
package (about a minute on a 2-core CPU, no network) and saves it to ``apo-kernels-out/``.
Reference log-probs are precomputed once (forward-only) by default, so no second model is held.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .._optional import require

TINY = "tiny"
# Defaults for the built-in tiny model: sized so the default run takes about a minute on 2 cores.
TINY_STEPS = 600
TINY_HIDDEN = 128
TINY_LAYERS = 4
TINY_LR = 1e-3
MODEL_LR = 5e-7
_SHOWN = (("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc"),
          ("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"))


class _HelpFormatter(argparse.HelpFormatter):
    """Append ``(default: X)`` to an option's help, unless its help already states the default or
    the default says nothing (``None``, or ``False`` for a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand (``func`` returns the exit code)."""
    p = subparsers.add_parser(
        "train",
        help="APO/DPO training of a causal LM on a preference dataset (default: a tiny demo run)",
        description="Train a Hugging Face causal LM (or the tiny built-in model) with APO / DPO on "
                    "prompt/chosen/rejected pairs, computing log-probs with apo-kernels' fused op "
                    "(no [tokens, vocab] logits). With no arguments: a ~1 minute CPU demo.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default=TINY,
                   help="a local model directory (a previous --output-dir works; a Hugging Face Hub id only where "
                        "the Hub is reachable), or 'tiny' for a small Llama built in code with a word-level "
                        "tokenizer over the dataset")
    p.add_argument("--gguf-file", default=None,
                   help="GGUF file name inside the --model directory; it is dequantised to float32 for "
                        "training (needs apo-kernels[trl])")
    p.add_argument("--dataset", default=None,
                   help="JSONL/JSON/parquet file or HF datasets directory with prompt/chosen/rejected "
                        "(strings or chat messages), e.g. clair_out/dataset.messages; default: the "
                        "pairs shipped with apo-kernels")
    p.add_argument("--split", default=None, help="split of a DatasetDict directory (default: train)")
    p.add_argument("--loss-type", default="apo_zero",
                   help="apo_zero, apo_down, sigmoid (DPO), ipo, hinge, ... (any of apo_kernels.LOSS_TYPES)")
    p.add_argument("--beta", type=float, default=0.1, help="KL strength beta")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"AdamW learning rate (default {TINY_LR} for tiny, {MODEL_LR} otherwise)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {TINY_STEPS} for tiny, else one pass over the data)")
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step and device")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=512, help="longest prompt + completion in tokens")
    p.add_argument("--max-prompt-length", type=int, default=None, help="longest prompt in tokens")
    p.add_argument("--reference", choices=("precompute", "model"), default="precompute",
                   help="precompute reference log-probs once before training, or keep a frozen reference model")
    p.add_argument("--packed", action="store_true", help="padding-free batches (sequences packed into one row)")
    p.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank (needs peft); 0: full")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="training dtype; auto (the default): bf16 autocast on a CUDA GPU that supports it, else fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--logging-steps", type=int, default=25, help="log every this many steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--output-dir", default="apo-kernels-out", help="where the model, tokenizer and logs go")
    p.add_argument("--no-save", action="store_true", help="do not save the trained model")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"apo-kernels train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Entry point of ``apo-kernels train``; returns the exit code."""
    for name in ("steps", "batch_size", "grad_accum", "max_length", "logging_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.beta <= 0 or not math.isfinite(args.beta):
        return _fail(f"--beta must be a positive number, got {args.beta}")
    if args.gguf_file and args.model == TINY:
        return _fail("--gguf-file needs --model: the directory that holds the GGUF file")
    try:
        return _train(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        return _fail(str(exc))


def _load_model(args: argparse.Namespace, dataset: Any) -> tuple[Any, Any]:
    if args.model == TINY:
        from ..integrations.tiny import build_tiny_model, build_tiny_tokenizer

        texts = [list(dataset[c]) for c in dataset.column_names if c in ("prompt", "chosen", "rejected")]
        tokenizer = build_tiny_tokenizer(texts)
        model = build_tiny_model(tokenizer, hidden_size=TINY_HIDDEN, num_layers=TINY_LAYERS, num_heads=4, seed=args.seed)
        return model, tokenizer
    from ..integrations.models import load_causal_lm

    return load_causal_lm(args.model, args.gguf_file)


def _lora(model: Any, rank: int) -> Any:
    require("peft", "trl", "--lora-r", load=False)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _train(args: argparse.Namespace) -> int:
    import copy

    for module in ("transformers", "datasets", "accelerate"):  # the Trainer needs all three
        require(module, "trl", "apo-kernels train", load=False)
    import torch
    from rich.console import Console
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from .. import FusedLinearPreferenceLoss
    from ..integrations.collator import PreferenceCollator
    from ..integrations.data import identical_pairs, load_preference_dataset, tiny_dataset_path
    from ..integrations.trainer import PreferenceTrainer, precompute_ref_logps
    from ..integrations.transformers import output_head

    console = Console(stderr=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.model == TINY and not torch.cuda.is_available():
        # A tiny model gains nothing from intra-op threads, and on a busy CPU their spin-waits
        # made steps ~50x slower (measured: 1 s/step with 2 threads under load vs 40 ms with 1).
        torch.set_num_threads(1)
    dataset_path = args.dataset or str(tiny_dataset_path())
    dataset = load_preference_dataset(dataset_path, split=args.split)
    same = identical_pairs(dataset)
    if same:
        print(f"apo-kernels train: warning: {same} of {len(dataset)} pairs have `chosen` identical to `rejected` "
              f"(no preference to learn from them; check {dataset_path})", file=sys.stderr)
    model, tokenizer = _load_model(args, dataset)
    output_head(model)  # a clear error for a model without an output embedding
    loss_fn = FusedLinearPreferenceLoss(loss_type=args.loss_type, beta=args.beta)

    cuda = torch.cuda.is_available()
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and cuda and torch.cuda.is_bf16_supported())
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.lora_r:
        model = _lora(model, args.lora_r)
    collator = PreferenceCollator(tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                  padding_free=args.packed)
    console.print(f"[bold]apo-kernels train[/]: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                  f"params, vocab {output_head(model)[0].shape[0]}), {len(dataset)} pairs from {dataset_path}, "
                  f"loss {args.loss_type} beta {args.beta}")

    ref_model = None
    device = torch.device("cuda" if cuda else "cpu")
    if args.reference == "precompute":
        model.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            dataset = precompute_ref_logps(model, dataset, collator, batch_size=args.batch_size)
    else:
        ref_model = copy.deepcopy(model)

    tiny = args.model == TINY
    steps = args.steps or (TINY_STEPS if tiny else -1)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=steps,
        num_train_epochs=1,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate or (TINY_LR if tiny else MODEL_LR),
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=bf16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    log_path = Path(args.output_dir) / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    trainer = PreferenceTrainer(model, training_args, ref_model=ref_model, loss_fn=loss_fn,
                                data_collator=collator, processing_class=tokenizer, train_dataset=dataset)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_metrics_progress(log_path))
    result = trainer.train()

    history = [h for h in trainer.state.log_history if "loss" in h]
    if not args.no_save:
        trainer.save_model(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
    summary = {"train_runtime_s": round(time.perf_counter() - started, 1), "steps": trainer.state.global_step,
               "final_train_loss": result.training_loss, "first": history[0] if history else None,
               "last": history[-1] if history else None, "saved_to": None if args.no_save else args.output_dir}
    (Path(args.output_dir) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(console, history, summary)
    return 0


def _fmt(entry: dict[str, Any]) -> str:
    signed = {"rewards/margins", "rewards/chosen", "rewards/rejected"}
    return "  ".join(f"{short} {entry[key]:+.4f}" if key in signed else f"{short} {entry[key]:.4f}"
                     for key, short in _SHOWN if key in entry)


def _print_summary(console: Any, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from rich.table import Table

    if history:
        table = Table(title="apo-kernels train", show_header=True)
        table.add_column("")
        for _, short in _SHOWN:
            table.add_column(short, justify="right")
        for label, entry in (("first log", history[0]), ("last log", history[-1])):
            table.add_row(label, *(f"{entry.get(key, float('nan')):.4f}" for key, _ in _SHOWN))
        console.print(table)
    where = f"model saved to {summary['saved_to']}" if summary["saved_to"] else "model not saved (--no-save)"
    console.print(f"{summary['steps']} steps in {summary['train_runtime_s']} s; {where}")


def _metrics_progress(log_path: Path) -> Any:
    """The Trainer's tqdm bar, logging one compact line per logging step (and to a JSONL file).

    Built on first use so that importing this module (``apo-kernels --help``, ``check``) does not
    import transformers.
    """
    from transformers.trainer_callback import ProgressCallback

    class _MetricsProgress(ProgressCallback):
        def __init__(self) -> None:
            super().__init__()
            log_path.write_text("")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            with log_path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            if "loss" in logs and self.training_bar is not None:
                self.training_bar.write(f"step {state.global_step:>5}  {_fmt(logs)}")

    return _MetricsProgress()


def main(argv: list[str] | None = None) -> int:
    """``python -m apo_kernels.commands.train [ARGS]``: the subcommand on its own."""
    parser = argparse.ArgumentParser(prog="apo-kernels")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
