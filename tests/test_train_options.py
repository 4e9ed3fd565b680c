"""GPU-ready training options, checked on CPU: gradient checkpointing and sequence packing change
how a step is computed, never what it computes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from datm import config as C
from datm import data, models
from datm.languages import Direction
from datm.train import (
    collate,
    collate_packed,
    pack_rows,
    set_activation_checkpointing,
    target_loss,
    train_adapter,
)


def _examples(model_dir, alma_dir, n=12):
    tok = models.load_tokenizer(str(model_dir))
    pattern = str(alma_dir / "train.{xx}-en.jsonl")
    pairs = data.read_direction(pattern, Direction("de", "en")) + data.read_direction(
        pattern, Direction("en", "cs")
    )
    ex, _ = data.tokenize_pairs(pairs, data.PromptFormat(tok), 128)
    return tok, ex[:n]


def _lora_model(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = models.load_model(str(model_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for (
        n,
        p,
    ) in model.named_parameters():  # LoRA B starts at zero: give the gradients something to flow through
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    return base, model


def _loss_and_grads(model, base, batch):
    model.zero_grad()
    loss = target_loss(base, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_gradient_checkpointing_same_loss_and_gradients(arch, tiny_model_dir, tiny_gemma_dir, alma_dir):
    model_dir = tiny_model_dir if arch == "llama" else tiny_gemma_dir
    tok, ex = _examples(model_dir, alma_dir)
    batch = collate(ex, tok.pad_token_id)
    base, model = _lora_model(model_dir)
    loss_a, grads_a = _loss_and_grads(model, base, batch)
    set_activation_checkpointing(base, True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    loss_b, grads_b = _loss_and_grads(model, base, batch)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], atol=1e-6), k


def test_pack_rows_fills_rows_first_fit():
    rows = pack_rows([5, 3, 4, 2, 9], capacity=8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 4, 2, 9][i] for i in r) <= 8 or len(r) == 1 for r in rows)
    assert len(rows) == 3  # [9], [5,3], [4,2]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_packing_same_loss_and_gradients_on_the_same_examples(arch, tiny_model_dir, tiny_gemma_dir, alma_dir):
    model_dir = tiny_model_dir if arch == "llama" else tiny_gemma_dir
    tok, ex = _examples(model_dir, alma_dir)
    padded = collate(ex, tok.pad_token_id)
    packed = collate_packed(ex, tok.pad_token_id, capacity=96)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really packed
    assert (packed["labels"] != -100).sum() == (padded["labels"] != -100).sum()
    base, model = _lora_model(model_dir)
    loss_a, grads_a = _loss_and_grads(model, base, padded)
    loss_b, grads_b = _loss_and_grads(model, base, packed)
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], atol=1e-5), k
    # Without the position reset the examples would attend to each other: a different loss.
    leaky = dict(
        packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    )
    loss_c, _ = _loss_and_grads(model, base, leaky)
    assert abs(loss_c - loss_a) > 1e-3


def test_train_adapter_with_packing_and_checkpointing_matches_plain(tiny_model_dir, alma_dir, tmp_path):
    tok, ex = _examples(tiny_model_dir, alma_dir, n=24)
    lora = C.LoraConfig(r=4, alpha=8, dropout=0.0)
    plain = C.TrainConfig(steps=4, batch_size=6, precision="fp32", seed=3, checkpoint_every=0)
    fast = C.TrainConfig(**{**plain.__dict__, "packing": True, "gradient_checkpointing": True})
    model = models.load_model(str(tiny_model_dir))
    a = train_adapter(model, tok, ex, tmp_path / "plain", lora, plain, progress=False)
    b = train_adapter(model, tok, ex, tmp_path / "fast", lora, fast, progress=False)
    # the shared base model is handed back as it was
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert a.final_loss == pytest.approx(b.final_loss, abs=1e-5)
    wa = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "fast" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_fsdp_gathered_state_saves_the_same_adapter(tiny_model_dir, tmp_path):
    """Under FSDP the main process writes the adapter from a gathered state dict; its keys must map
    onto peft's so that the files are those peft writes from the model itself."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from datm.train import TargetLoss, gathered_lora_state

    base, model = _lora_model(tiny_model_dir)
    loss_module = TargetLoss(model.get_base_model())
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, get_state_dict=lambda m: m.state_dict())
    state = gathered_lora_state(fsdp, loss_module)
    assert state and all("lora_" in k for k in state)
    assert gathered_lora_state(SimpleNamespace(distributed_type=DistributedType.NO), loss_module) is None
    model.save_pretrained(tmp_path / "own")
    model.save_pretrained(tmp_path / "gathered", state_dict=state)
    a = load_file(str(tmp_path / "own" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "gathered" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
