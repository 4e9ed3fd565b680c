from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from datm import config as C
from datm import data, models
from datm.languages import Direction
from datm.train import CHECKPOINT, target_loss, train_adapter


def _examples(model_dir, alma_dir):
    tok = models.load_tokenizer(str(model_dir))
    pattern = str(alma_dir / "train.{xx}-en.jsonl")
    pairs = data.read_direction(pattern, Direction("de", "en")) + data.read_direction(
        pattern, Direction("en", "de")
    )
    ex, _ = data.tokenize_pairs(pairs, data.PromptFormat(tok), 128)
    return tok, ex


def _weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_target_only_loss_equals_full_logits_loss(tiny_gemma_dir, alma_dir):
    from datm.train import collate

    tok, ex = _examples(tiny_gemma_dir, alma_dir)
    model = models.load_model(str(tiny_gemma_dir))
    batch = collate(ex[:4], tok.pad_token_id)
    with torch.no_grad():
        ours = target_loss(model, batch)
        full = model(**batch).loss  # transformers: full logits, shifted, ignore -100
    assert torch.allclose(ours, full, atol=1e-5)


def test_training_lowers_loss_and_writes_peft_dir(tiny_model_dir, alma_dir, tmp_path):
    from peft import PeftModel

    tok, ex = _examples(tiny_model_dir, alma_dir)
    base = models.load_model(str(tiny_model_dir))
    cfg = C.TrainConfig(steps=30, batch_size=8, lr=2e-2, schedule="constant", precision="fp32")
    res = train_adapter(
        base, tok, ex, tmp_path / "a", C.LoraConfig(r=4, alpha=8, dropout=0.0), cfg, progress=False
    )
    info = (tmp_path / "a" / "train_info.json").read_text()
    assert res.steps == 30 and '"losses"' in info
    import json

    losses = json.loads(info)["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert not any("lora" in n for n, _ in base.named_modules())  # base handed back clean
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    assert any("lora_A" in n for n, _ in loaded.named_parameters())


def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, alma_dir, tmp_path):
    tok, ex = _examples(tiny_model_dir, alma_dir)
    lora = C.LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout: the RNG state must be restored too
    cfg = C.TrainConfig(steps=8, batch_size=4, checkpoint_every=3, precision="fp32", seed=5)
    ref = train_adapter(
        models.load_model(str(tiny_model_dir)), tok, ex, tmp_path / "ref", lora, cfg, progress=False
    )

    def kill_at_7(step, loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(
            models.load_model(str(tiny_model_dir)),
            tok,
            ex,
            tmp_path / "b",
            lora,
            cfg,
            False,
            False,
            kill_at_7,
        )
    assert (tmp_path / "b" / CHECKPOINT / "state.pt").is_file()  # last checkpoint at step 6
    assert not (tmp_path / "b" / "DONE.json").exists()
    res = train_adapter(
        models.load_model(str(tiny_model_dir)), tok, ex, tmp_path / "b", lora, cfg, progress=False
    )
    assert res.resumed_from == 6 and ref.resumed_from == 0
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert not (tmp_path / "b" / CHECKPOINT).exists()


def test_finished_adapter_is_never_retrained(tiny_model_dir, alma_dir, tmp_path):
    tok, ex = _examples(tiny_model_dir, alma_dir)
    lora, cfg = C.LoraConfig(r=2, alpha=4), C.TrainConfig(steps=2, batch_size=4, precision="fp32")
    base = models.load_model(str(tiny_model_dir))
    first = train_adapter(base, tok, ex, tmp_path / "a", lora, cfg, progress=False)
    f = tmp_path / "a" / "adapter_model.safetensors"
    before = os.stat(f).st_mtime_ns
    again = train_adapter(base, tok, ex[:3], tmp_path / "a", lora, C.TrainConfig(steps=50), progress=False)
    assert os.stat(f).st_mtime_ns == before and again.steps == first.steps == 2


def test_same_seed_same_adapter(tiny_model_dir, alma_dir, tmp_path):
    tok, ex = _examples(tiny_model_dir, alma_dir)
    lora, cfg = C.LoraConfig(r=2, alpha=4), C.TrainConfig(steps=3, batch_size=4, seed=9)
    for name in ("x", "y"):
        train_adapter(
            models.load_model(str(tiny_model_dir)), tok, ex, tmp_path / name, lora, cfg, progress=False
        )
    a, b = _weights(tmp_path / "x"), _weights(tmp_path / "y")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_budget_sets_steps(tiny_model_dir, alma_dir, tmp_path):
    from datm.train import steps_for

    assert steps_for(24, C.TrainConfig(epochs=2, batch_size=8)) == 6
    assert steps_for(25, C.TrainConfig(epochs=1, batch_size=8, grad_accum=2)) == 2
    assert steps_for(25, C.TrainConfig(steps=7)) == 7
