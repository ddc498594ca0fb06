"""Worker: FSDP2 with the backbone as the outermost ``fully_shard`` module (no
``fully_shard(model)``). ``hidden_states`` inside ``trainer._in_root`` must run the backbone
through its own hooks (it used to swap the backbone's forward for a redirected one and fail with
a TypeError) and give the unwrapped model's hidden states."""

import copy

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from apo_kernels.integrations.trainer import _in_root
from apo_kernels.integrations.transformers import hidden_states

dist.init_process_group("gloo")
cfg = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
plain = copy.deepcopy(model)
fully_shard(model.model)
ids = torch.randint(0, 67, (2, 5), generator=torch.Generator().manual_seed(1))
(ours,) = _in_root(model, lambda: (hidden_states(model, input_ids=ids),))
torch.testing.assert_close(ours, hidden_states(plain, input_ids=ids))
print(f"rank {dist.get_rank()}: backbone-root ok")
dist.destroy_process_group()
