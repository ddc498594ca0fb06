"""A tiny random Llama and a word-level tokenizer with a chat template, built offline and
saved to a folder (loads with ``from_pretrained``; ``transformers serve`` serves it)."""

from __future__ import annotations

WORDS = ["what", "is", "the", "sum", "of", "two", "and", "three", "four", "five", "six", "seven",
         "eight", "nine", "a", "cat", "dog", "runs", "fast", "slow", "big", "small", "red",
         "blue", "green", "it", "yes", "no"]
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|system|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_model_dir(path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIAL[4:])
    fast.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False, initializer_range=0.5)
    model = LlamaForCausalLM(cfg)
    # Random weights this large make the answers depend on the prompt (a padding bug shows).
    # Never emit the other special tokens (they decode to nothing), and give "</s>" the row of
    # a word so some answers stop early and others run to the length limit.
    with torch.no_grad():
        model.lm_head.weight[:7] = 0.0
        model.lm_head.weight[3] = model.lm_head.weight[10]
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
