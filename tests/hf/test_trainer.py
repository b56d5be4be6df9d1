"""transformers' Trainer on attn_implementation="metalm_span", with the flattening collator:
the same losses, step by step, as sdpa on the same packed batches."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer's own dependency

from metalm_fast import hf  # noqa: E402


def _losses(tmp_path, implementation: str) -> list[float]:
    hf.register()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation(implementation)
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 19, 3, 25, 11, 16, 9, 21]
    examples = [
        {"input_ids": torch.randint(0, 128, (n,), generator=generator).tolist()} for n in lengths
    ]
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / implementation),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=examples,
        data_collator=transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True),
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_on_metalm_span_matches_sdpa(tmp_path):
    ours, theirs = _losses(tmp_path, "metalm_span"), _losses(tmp_path, "sdpa")
    assert len(ours) == len(theirs) == 3
    # sdpa reads the packed documents through restarting position_ids (use_cache is off in
    # training), so both compute the same loss; the steps then see the same gradients.
    assert ours == pytest.approx(theirs, rel=1e-4)
