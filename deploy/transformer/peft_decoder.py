"""Checks a decoder run's export against HF transformers + PEFT (docs/decoder.md).

    bash deploy/transformer/hf-env.sh python deploy/transformer/peft_decoder.py EXPORT_DIR GGUF_FILE FLOTILLA_COORDINATOR

EXPORT_DIR is `flotilla-coordinator export --merged --out EXPORT_DIR` of a [model.decoder] run. For
fixed prompts (chat template applied), it compares:

1. PEFT: `PeftModel.from_pretrained(LlamaForCausalLM from GGUF_FILE, EXPORT_DIR/adapter)` -- every
   adapter tensor lands in the model -- against Flotilla's `generate --model EXPORT_DIR/merged`:
   next-token logits within 1e-4 (max abs), greedy continuation token-identical (32 tokens);
2. the merged directory loaded by `AutoModelForCausalLM` / `AutoTokenizer`: the same logits and
   tokens, and the tokenizer's ids equal to Flotilla's.

Prints what it measured; exits 1 on any mismatch.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Write a headline for this news article.\n\nShares in the carmaker rose 8% on Tuesday after it reported record profits and raised its forecast for the year.",
    "What is the capital of France?",
    "Write a headline for this news article.\n\nThe England captain will miss the next two matches with a knee injury, the team's coach said.",
]
NEW_TOKENS = 32
TOLERANCE = 1e-4


def flotilla(binary, merged_dir, work):
    prompts = os.path.join(work, "prompts.jsonl")
    with open(prompts, "w") as f:
        for prompt in PROMPTS:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    logits = os.path.join(work, "logits.safetensors")
    out = subprocess.run(
        [binary, "generate", "--model", merged_dir, "--input", prompts, "--format", "json",
         "--max-new-tokens", str(NEW_TOKENS), "--logits-out", logits],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return rows, load_file(logits)


def hf_run(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
        generated = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2,
        )[0, len(ids):].tolist()
    return logits, generated


def main(export_dir, gguf_file, binary):
    torch.set_num_threads(1)
    failures = []
    directory, name = os.path.split(os.path.abspath(gguf_file))
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    adapter_dir = os.path.join(export_dir, "adapter")
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = peft_model.state_dict()
    landed = 0
    for key, tensor in saved.items():
        # PEFT's state dict names the adapter ("default") inside the module path.
        target = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        if target in state and torch.equal(state[target], tensor):
            landed += 1
    print(f"PEFT: {landed} of {len(saved)} adapter tensors landed in LlamaForCausalLM")
    if landed != len(saved):
        failures.append("adapter tensors did not all land")

    merged_dir = os.path.join(export_dir, "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    with tempfile.TemporaryDirectory() as work:
        rows, ours = flotilla(binary, merged_dir, work)
    for index, (prompt, row) in enumerate(zip(PROMPTS, rows)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != row["prompt_ids"]:
            failures.append(f"prompt {index}: token ids differ")
        our_logits = ours[f"prompt_{index}"]
        for label, model in (("PEFT over GGUF", peft_model), ("merged directory", merged)):
            logits, generated = hf_run(model, row["prompt_ids"])
            worst = (logits - our_logits).abs().max().item()
            same = generated == row["generated_ids"]
            print(f"prompt {index}, {label}: logits max |diff| {worst:.2e}, greedy {len(generated)} tokens identical: {same}")
            if worst > TOLERANCE:
                failures.append(f"prompt {index}, {label}: logits differ by {worst:.2e}")
            if not same:
                failures.append(f"prompt {index}, {label}: greedy tokens differ")
        print(f"  Flotilla: {row['text']!r}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)
    print("OK: the export loads in HF transformers + PEFT with Flotilla's logits and greedy output")


if __name__ == "__main__":
    main(*sys.argv[1:4])
