"""Scores a run's exported adapter with HF transformers + PEFT on exactly the texts the run
evaluated, and compares with the accuracy the run reported for its last round at R_max.

    bash deploy/transformer/hf-env.sh python deploy/transformer/peft_heldout.py RUN_DIR DATA_DIR

RUN_DIR   a finished run with `export --merged --out RUN_DIR/export` done (the quickstart does it):
          evaluation-examples.txt, summary.json, export/adapter/, export/merged/
DATA_DIR  the labelled texts the run evaluated (a folder per label), e.g. ~/.cache/flotilla/datasets/bbc-news

The base is the checkpoint the adapter names (`base_model_name_or_path`). Exits with status 1 if
the two accuracies differ by more than one text.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification

from hf_reference import padded


def main(run_dir, data_dir):
    export = os.path.join(run_dir, "export")
    merged = json.load(open(os.path.join(export, "merged", "config.json")))
    labels = [merged["id2label"][str(i)] for i in range(len(merged["id2label"]))]
    adapter_config = json.load(open(os.path.join(export, "adapter", "adapter_config.json")))
    keys = [k.strip() for k in open(os.path.join(run_dir, "evaluation-examples.txt")) if k.strip()]
    texts, truth = [], []
    for key in keys:
        with open(os.path.join(data_dir, key), "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace").strip())
        truth.append(labels.index(key.split("/")[0]))
    tokenizer = Tokenizer.from_file(os.path.join(export, "merged", "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(merged["flotilla"]["max_length"])
    base = AutoModelForSequenceClassification.from_pretrained(
        adapter_config["base_model_name_or_path"], num_labels=len(labels)
    )
    model = PeftModel.from_pretrained(base, os.path.join(export, "adapter")).eval()
    predicted = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            ids, mask = padded([tokenizer.encode(t).ids for t in texts[start : start + 64]])
            predicted += model(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()
    correct = [p == t for p, t in zip(predicted, truth)]
    hf = sum(correct) / len(correct)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    last = [r for r in summary["rounds"] if r["evaluation"]][-1]
    reported = next(e for e in last["evaluation"] if e["rank"] == summary["max_rank"])
    print(f"{len(texts)} listed texts: HF transformers + PEFT {hf * 100:.2f}%, "
          f"Flotilla round {last['round']} at R_max {reported['accuracy'] * 100:.2f}%")
    for index, label in enumerate(labels):
        of_label = [c for c, t in zip(correct, truth) if t == index]
        if of_label:
            print(f"  {label:14s} {sum(of_label) / len(of_label) * 100:6.1f}% of {len(of_label)}")
    if abs(hf - reported["accuracy"]) * len(texts) > 1.0 + 1e-9:
        print("FAILED: the accuracies differ by more than one text")
        sys.exit(1)
    print("OK: the same accuracy, to within one text")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
