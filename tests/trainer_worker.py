"""``transformers.Trainer`` with ``LoRAAdam``: the runs of ``tests/test_trainer.py``.

The packaged MiniLM with a sequence-classification head (``BertForSequenceClassification``,
offline, dropout off), the docstring task, ``Trainer(..., optimizers=(LoRAAdam(...), scheduler))``
with gradient accumulation 2 and a linear warmup schedule, Trainer's own clipping off
(``max_grad_norm=0``) and ``LoRAAdam(max_grad_norm=1.0)`` instead (the clip graph LoRA does, see
docs/interop.md). Run as a script in a fresh process::

    python tests/trainer_worker.py OUT_DIR MODE [CHECKPOINT]

``MODE`` is ``full`` (all ``TOTAL_STEPS`` steps), ``interrupted`` (stops after the checkpoint at
``CHECKPOINT_AT``) or ``resume`` (from ``CHECKPOINT``, to the end); the final model and optimizer
state go to ``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

TOTAL_STEPS, CHECKPOINT_AT, WARMUP = 6, 3, 2
BATCH, ACCUMULATION, EXAMPLES, MAX_LENGTH = 4, 2, 48, 32


class _Examples(torch.utils.data.Dataset):
    def __init__(self, encodings: dict, labels) -> None:
        self.encodings, self.labels = encodings, torch.as_tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {**{k: v[index] for k, v in self.encodings.items()}, "labels": self.labels[index]}


def build(output_dir: str | os.PathLike[str], *, stop_at: int | None = None):
    """The Trainer of one run (model, LoRAAdam, warmup schedule, data), built from scratch."""
    import transformers
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    from lora_optim import LoRAAdam
    from lora_optim.examples import minilm_task as mt

    transformers.logging.set_verbosity_error()
    task = mt.build_docstring_task(seed=0)
    tokenizer = mt.load_tokenizer()
    encodings = mt.tokenize(task.train_texts[:EXAMPLES], tokenizer, MAX_LENGTH)
    data = _Examples(encodings, task.train_labels[:EXAMPLES])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the classifier head's init
        model = AutoModelForSequenceClassification.from_pretrained(
            str(mt.model_dir()), num_labels=task.num_labels, local_files_only=True, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    linear = [m.weight for name, m in model.bert.encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    head = list(model.classifier.parameters())
    model.requires_grad_(False)
    for p in linear + head:
        p.requires_grad_(True)
    optimizer = LoRAAdam([{"params": linear, "rank": 8, "alpha": 16}, {"params": head, "rank": None}],
                         lr=1e-3, max_grad_norm=1.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, TOTAL_STEPS)
    arguments = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        max_steps=TOTAL_STEPS, save_strategy="steps", save_steps=CHECKPOINT_AT, report_to=[], seed=0,
        use_cpu=True, logging_strategy="no", max_grad_norm=0.0, dataloader_num_workers=0, disable_tqdm=True,
    )
    callbacks = []
    if stop_at is not None:
        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= stop_at:
                    control.should_training_stop = True
                return control

        callbacks.append(_Stop())
    return Trainer(model=model, args=arguments, train_dataset=data, optimizers=(optimizer, scheduler),
                   callbacks=callbacks)


def final_state(trainer) -> dict:
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": trainer.optimizer.state_dict()}


def run(output_dir: str | os.PathLike[str], mode: str, checkpoint: str | None = None) -> dict:
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build(output_dir, stop_at=CHECKPOINT_AT if mode == "interrupted" else None)
        trainer.train(resume_from_checkpoint=checkpoint if mode == "resume" else None)
    return final_state(trainer)


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    state = run(out, mode, sys.argv[3] if len(sys.argv) > 3 else None)
    torch.save(state, out / "final.pt")
