"""Checks that a Flotilla export loads in HF transformers and PEFT and computes Flotilla's logits.

    bash deploy/transformer/hf-env.sh python deploy/transformer/peft_interop.py \
        BASE_DIR EXPORT_DIR TEXTS_FILE FLOTILLA_JSONL

BASE_DIR      the base checkpoint the run fine-tuned (config.json, model.safetensors, tokenizer.json)
EXPORT_DIR    `flotilla-coordinator export --merged --out EXPORT_DIR`: adapter/ and merged/
TEXTS_FILE    one text per line
FLOTILLA_JSONL `flotilla-coordinator classify --model EXPORT_DIR/merged --format json --input TEXTS_FILE`

It computes the logits of the texts three ways with HF code and compares each with Flotilla's:
  1. PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(BASE_DIR,
     num_labels=K), EXPORT_DIR/adapter)
  2. the same, merged with merge_and_unload()
  3. AutoModelForSequenceClassification.from_pretrained(EXPORT_DIR/merged)
and exits with status 1 if any differs by more than 1e-4.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification

from hf_reference import padded

TOLERANCE = 1e-4


def batch(tokenizer_path, texts, max_length):
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return padded([tokenizer.encode(t).ids for t in texts])


def logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs[0], attention_mask=inputs[1]).logits


def main(base_dir, export_dir, texts_file, flotilla_jsonl):
    texts = [line.strip() for line in open(texts_file, encoding="utf-8") if line.strip()]
    ours = torch.tensor([json.loads(line)["logits"] for line in open(flotilla_jsonl, encoding="utf-8")])
    merged_dir = os.path.join(export_dir, "merged")
    config = json.load(open(os.path.join(merged_dir, "config.json")))
    labels = len(config["id2label"])
    inputs = batch(os.path.join(merged_dir, "tokenizer.json"), texts, config["flotilla"]["max_length"])

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=labels)
    peft = PeftModel.from_pretrained(base, os.path.join(export_dir, "adapter"))
    results = {"peft_adapter": logits(peft, inputs)}
    results["peft_merge_and_unload"] = logits(peft.merge_and_unload(), inputs)
    results["merged_directory"] = logits(AutoModelForSequenceClassification.from_pretrained(merged_dir), inputs)

    worst = 0.0
    for name, theirs in results.items():
        difference = (theirs - ours).abs().max().item()
        worst = max(worst, difference)
        print(f"{name:24s} max |HF - Flotilla| = {difference:.2e} over {len(texts)} texts x {labels} labels")
    agree = (results["merged_directory"].argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"same predicted label: {agree * 100:.0f}%")
    if worst > TOLERANCE:
        print(f"FAILED: above the tolerance {TOLERANCE}")
        sys.exit(1)
    print(f"OK: within {TOLERANCE}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
