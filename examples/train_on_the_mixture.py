"""Mid-train on the proposed mixture with the Hugging Face Trainer: the run's base, its domains' documents
drawn at the proposal's ratios within their epoch caps (`mixture_dataset`).

    python examples/train_on_the_mixture.py recipes/demo.yaml --steps 200 --out runs/demo-midtrained

The recipe's run must have a proposal (mergemix propose RECIPE); its base is the model trained here.
"""

from __future__ import annotations

import argparse

from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from mergemix import MixtureRun, load_recipe, mixture_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted recipe overrides, as on the mergemix command line")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, help="where the Trainer writes its checkpoints")
    args = p.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    ws = MixtureRun(recipe).workspace  # the run's base model and tokenizer
    tokenizer = ws.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = mixture_dataset(recipe.resolved_run_dir(), seed=recipe.seed).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=recipe.data.seq_len),
        batched=True, remove_columns=["text", "domain"])
    trainer = Trainer(
        model=ws.model,
        args=TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                               learning_rate=recipe.experts.lr, lr_scheduler_type="constant", report_to=[],
                               logging_steps=max(args.steps // 10, 1), save_strategy="no"),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    trainer.save_model(args.out)
    print(f"mid-trained on the proposed mixture for {args.steps} steps; saved to {args.out}")


if __name__ == "__main__":
    main()
