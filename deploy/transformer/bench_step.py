"""The baseline for edge-client/benches/transformer_step.rs: the identical LoRA training step in
PyTorch + HF transformers + PEFT, on the same machine.

    bash deploy/transformer/hf-env.sh python deploy/transformer/bench_step.py MODEL_DIR [--threads N]

all-MiniLM-L6-v2 as BertForSequenceClassification (5 labels), PEFT LoRA rank 8 on query and value
(lora_alpha 16, no LoRA dropout), the classifier trained too; AdamW (lr 1e-3, no weight decay) over
the trainable parameters; batch 16 of random token ids, every input 64 tokens; the model in eval
mode (no dropout), as Flotilla trains. Prints the median ms per step of 5 x 10 steps after a
warm-up, and the peak resident memory of the process.
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

BATCH, LENGTH, STEPS = 16, 64, 10


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=5)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(model, config).to(args.device)
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    ids = torch.randint(1000, 30000, (BATCH * 8, LENGTH)).to(args.device)
    labels = torch.randint(0, 5, (BATCH * 8,)).to(args.device)
    mask = torch.ones(BATCH * 8, LENGTH, dtype=torch.long).to(args.device)
    generator = torch.Generator().manual_seed(3)

    def steps(n):
        for _ in range(n):
            pick = torch.randint(0, BATCH * 8, (BATCH,), generator=generator).to(args.device)
            out = model(input_ids=ids[pick], attention_mask=mask[pick])
            loss = torch.nn.functional.cross_entropy(out.logits, labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()

    steps(STEPS)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        steps(STEPS)
        times.append((time.perf_counter() - start) * 1000 / STEPS)
    times.sort()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"implementation": "pytorch+peft", "device": args.device, "threads": args.threads, "batch": BATCH, "length": LENGTH,
                      "rank": 8, "step_ms": times[2], "peak_rss_mib": peak_mib}))


if __name__ == "__main__":
    main()
