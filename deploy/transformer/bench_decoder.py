"""The baseline for edge-client/benches/decoder_step.rs: the identical LoRA training step and greedy
generation in PyTorch + HF transformers + PEFT, on the same machine.

    bash deploy/transformer/hf-env.sh python deploy/transformer/bench_decoder.py GGUF_FILE [--threads N]

SmolLM2-135M-Instruct loaded from its GGUF (dequantized to f32) as LlamaForCausalLM, PEFT LoRA rank 8
on q_proj and v_proj (lora_alpha 16, no dropout); AdamW (no weight decay) over the LoRA factors;
batch 8 of random token ids, 128 tokens each, the causal-LM loss on every token; eval mode. Prints
the median ms per step of 3 after a warm-up, greedy generation speed (32 new tokens after a prompt
of 64), the load time and the peak resident memory, as one JSON line.
"""

import argparse
import json
import os
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

BATCH, LENGTH, STEPS, NEW_TOKENS = 8, 128, 3, 32


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf_file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(5)
    directory, name = os.path.split(os.path.abspath(args.gguf_file))
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    load_s = time.perf_counter() - started
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model.to(args.device).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    ids = torch.randint(100, 49000, (BATCH, LENGTH), device=args.device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        prompt = ids[:1, :64]
        start = time.perf_counter()
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
        tokens_per_s = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)
    print(
        json.dumps(
            {
                "step_ms": sorted(times)[len(times) // 2],
                "peak_rss_mib": peak,
                "load_s": load_s,
                "tokens_per_s": tokens_per_s,
                "threads": args.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
