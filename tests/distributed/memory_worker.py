"""Peak memory of one training forward + backward on CPU (launched by tests/test_memory.py).

Builds a random-init Qwen2 of the given shape (vocabulary 151,936 unless told), runs
``forward_logps`` over ``rows`` completions and backpropagates their sum, and prints the peak
resident-set increase over the RSS after the model and inputs were built (bytes), as JSON.
"""
import json
import resource
import sys

import torch


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(spec: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rltk.trainer.logprobs import ForwardOptions, TokenBatch, forward_logps

    s = json.loads(spec)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         tie_word_embeddings=s["tied"], max_position_embeddings=s["prompt"] + s["completion"] + 8,
                         attn_implementation=s["attn"])
    model = Qwen2ForCausalLM(config).train()
    if s["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n, p, t = s["rows"], s["prompt"], s["completion"]
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    prompt_mask[0, : p // 2] = 0  # left padding, so the attention mask is a real one
    batch = TokenBatch(torch.randint(0, s["vocab"], (n, p)), prompt_mask, torch.randint(0, s["vocab"], (n, t)),
                       torch.ones(n, t, dtype=torch.long))
    before = _rss_bytes()
    out = forward_logps(model, batch, 1.0, options=ForwardOptions(chunk=s["head_chunk"]))
    out.logps.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"increase": peak - before, "params": sum(q.numel() for q in model.parameters())}))


if __name__ == "__main__":
    main(sys.argv[1])
